"""threshold_value, dom_mask and union on constructed inputs with known answers."""
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.filters import threshold_otsu

from gpuheart import segment
from gpuheart.segment import dom_mask, robust_sigma, threshold_value, union


def test_otsu_separates_a_bimodal_image():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.normal(50, 5, 5000), rng.normal(150, 5, 3000)]).astype(np.float32)
    t = threshold_value(vals, "otsu")
    assert t == pytest.approx(float(threshold_otsu(vals)))
    assert 55 < t < 145
    assert ((vals > t) == (np.arange(vals.size) >= 5000)).mean() > 0.999


def test_otsu_integer_values_match_skimage():
    rng = np.random.default_rng(1)
    dom = rng.integers(-300, 300, (40, 50)).astype(np.int32)
    assert threshold_value(dom, "otsu") == float(threshold_otsu(dom))


def test_otsu_on_full_range_int32_bins_like_floats():
    """skimage gives integers a bin per value (32 GiB for full-range int32); such data are binned as floats."""
    rng = np.random.default_rng(4)
    vals = np.concatenate([rng.normal(-1e9, 5e7, 3000), rng.normal(1e9, 5e7, 1000)])
    vals = np.clip(vals, -2**31, 2**31 - 1).astype(np.int32).reshape(40, 100)
    vals[0, 0], vals[0, 1] = -2**31, 2**31 - 1
    expected = float(threshold_otsu(vals.astype(np.float64)))
    assert threshold_value(vals, "otsu") == expected
    slab = np.stack([vals, vals[::-1]])
    np.testing.assert_array_equal(segment.threshold_slices(slab, "otsu").ravel(), [expected, expected])


def test_otsu_just_below_the_float_binning_range_stays_exact():
    vals = np.random.default_rng(5).integers(0, 1000, (30, 30)).astype(np.int32)
    vals[0, 0], vals[0, 1] = 0, segment._OTSU_INT_BINS - 1
    assert threshold_value(vals, "otsu") == float(threshold_otsu(vals))
    assert segment.threshold_slices(vals[None], "otsu").item() == float(threshold_otsu(vals))


def test_otsu_constant_values():
    assert threshold_value(np.full((5, 5), 7, np.int16), "otsu") == 7.0


def test_sigma_of_gaussian_noise_is_its_std():
    noise = np.random.default_rng(2).normal(0, 4.0, 200_000)
    assert robust_sigma(noise) == pytest.approx(4.0, rel=0.02)
    assert threshold_value(noise, "sigma", k=3.0) == pytest.approx(12.0, rel=0.02)


def test_sigma_ignores_bright_outliers():
    v = np.random.default_rng(3).normal(0, 2.0, 100_000)
    v[:5000] = 1000  # 5% "vessels" barely move the robust estimate
    assert robust_sigma(v) == pytest.approx(2.0, rel=0.1)
    assert v.std() > 100


def test_sigma_exact_small_case():
    # median 3, |v - 3| = [2, 1, 0, 1, 97] -> MAD 1
    assert threshold_value(np.array([1, 2, 3, 4, 100]), "sigma", k=2) == pytest.approx(2 * 1.4826)


def test_fixed_threshold_and_non_finite_values_ignored():
    assert threshold_value(np.arange(10), 4) == 4.0
    assert threshold_value(np.arange(10), 2.5) == 2.5
    v = np.array([1.0, np.nan, 3.0, np.inf, 2.0])
    assert threshold_value(v, "sigma", k=1) == pytest.approx(1.4826)


@pytest.mark.parametrize("bad", ["triangle", None, True, float("nan")])
def test_threshold_bad_method(bad):
    with pytest.raises(ValueError):
        threshold_value(np.arange(10), bad)


def test_threshold_bad_values():
    with pytest.raises(ValueError):
        threshold_value(np.array([np.nan, np.nan]), "otsu")
    with pytest.raises(ValueError):
        threshold_value(np.array([1.0, 2.0]), "sigma", k=-1)
    with pytest.raises(TypeError):
        threshold_value(np.array(["a", "b"]), "otsu")


def test_dom_mask_finds_a_vessel():
    rng = np.random.default_rng(4)
    x = rng.normal(60, 3, (2, 64, 64))
    x[:, 30:33, 10:50] += 100  # a 3-pixel-wide bright vessel in both slices
    x = np.clip(x, 0, 255).astype(np.uint8)
    truth = np.zeros(x.shape, bool)
    truth[:, 30:33, 10:50] = True
    for threshold in ("otsu", "sigma", 50):
        m = dom_mask(x, threshold=threshold, k=5.0)
        assert m.dtype == bool and m.shape == x.shape
        assert (m & truth).sum() >= 0.95 * truth.sum(), threshold
        assert (m & ~truth).sum() <= 0.01 * truth.size, threshold


def test_dom_mask_equals_scipy_reference():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4000, (40, 41), dtype=np.uint16)
    dom = (ndi.median_filter(x, 3).astype(np.int64) - ndi.median_filter(x, 9).astype(np.int64))
    for thr in ("otsu", 25.0):   # Otsu floored at 0: this noise's own Otsu cut is negative
        t = max(threshold_otsu(dom), 0) if thr == "otsu" else thr
        np.testing.assert_array_equal(dom_mask(x, 3, 9, threshold=thr), dom > t)


def test_dom_mask_of_a_stack_thresholds_each_slice_as_the_pipeline_does():
    """One threshold for the whole stack differed from the pipeline's per-slice masks (0.5 % of a real
    stack's pixels), so building blocks composed by hand did not give `gpuheart segment --method dom`."""
    rng = np.random.default_rng(6)
    x = rng.normal(60, 3, (3, 48, 48))
    x[0, 20:23, 5:40] += 20    # a faint vessel: a stack-wide cut, set by the bright ones, misses it
    x[1:, 20:23, 5:40] += 120
    x = np.clip(x, 0, 255).astype(np.uint8)
    for thr in ("otsu", "sigma", 30.0):
        want = np.stack([dom_mask(s, 3, 9, threshold=thr, k=4.0) for s in x])
        np.testing.assert_array_equal(dom_mask(x, 3, 9, threshold=thr, k=4.0), want)
    from gpuheart.filters import difference_of_medians

    dom = difference_of_medians(x, 3, 9)
    assert not np.array_equal(dom_mask(x, 3, 9), dom > threshold_otsu(dom))   # the stack-wide cut differs here


def test_union():
    a = np.array([[True, False], [False, False]])
    b = np.array([[False, False], [False, True]])
    c = np.array([[0, 1], [0, 0]], np.uint8)
    u = union(a, b, c)
    assert u.dtype == bool
    np.testing.assert_array_equal(u, [[True, True], [False, True]])
    assert union(a) is not a and (union(a) == a).all()
    with pytest.raises(ValueError):
        union()
    with pytest.raises(ValueError):
        union(a, np.zeros((3, 2), bool))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
@pytest.mark.parametrize("method", ["otsu", "sigma", 12.5])
def test_threshold_slices_equals_per_slice_thresholds(dtype, method):
    from gpuheart.segment import threshold_slices, threshold_value

    rng = np.random.default_rng(7)
    slab = rng.normal(0, 20, (5, 31, 17)).astype(dtype)
    slab[1] = 3            # a constant slice
    slab[2, :4, :4] = 200  # a few bright outliers (vessels)
    slab[3] -= 90          # all negative
    t = threshold_slices(slab, method, 3.0)
    assert t.shape == (5, 1, 1)
    expected = [threshold_value(s, method, 3.0) for s in slab]
    np.testing.assert_array_equal(t.ravel(), np.array(expected, dtype=float))
    np.testing.assert_array_equal(slab > t, np.stack([s > e for s, e in zip(slab, expected)]))


def test_noise_threshold_measures_the_negative_half():
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 4.0, (3, 200, 200))
    sparse = noise.copy()
    sparse[:, 100, :] += 60  # a thin bright line: 0.5 % of the pixels, all positive
    for v in (noise, sparse):
        assert abs(segment.negative_sigma(v) - 4.0) < 0.1
    assert segment.threshold_value(sparse, "noise", 5) == pytest.approx(5 * segment.negative_sigma(sparse))
    ints = np.round(sparse).astype(np.int16)
    per_slice = segment.threshold_slices(ints, "noise", 5).ravel()
    np.testing.assert_allclose(per_slice, [segment.threshold_value(s, "noise", 5) for s in ints], rtol=1e-12)
    mask = ints > segment.threshold_slices(ints, "noise", 5)
    assert mask[:, 100].mean() > 0.99 and mask.mean() < 0.006   # the line, almost no noise
    assert segment.negative_sigma(np.abs(ints)) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        segment.threshold_value(sparse, "noise", -1)


def test_union_of_overlapping_masks_keeps_the_overlap():
    # the masks above are disjoint, where OR equals XOR; DoM and U-Net masks mostly agree on vessels
    rng = np.random.default_rng(8)
    a, b = rng.random((2, 3, 20, 20)) > 0.5
    np.testing.assert_array_equal(union(a, b), a | b)
    np.testing.assert_array_equal(union(a, a, b.astype(np.uint8) * 255), a | b)


def test_dom_mask_border_follows_mode():
    x = np.random.default_rng(9).integers(0, 4000, (30, 33), dtype=np.uint16)
    for mode in ("nearest", "mirror", "wrap"):
        dom = (ndi.median_filter(x, 3, mode=mode).astype(np.int64)
               - ndi.median_filter(x, 9, mode=mode).astype(np.int64))
        np.testing.assert_array_equal(dom_mask(x, 3, 9, threshold=25.0, mode=mode), dom > 25, err_msg=mode)


def test_an_otsu_dom_threshold_never_falls_below_zero():
    """A nearly flat slice (after CLAHE: one grey level with a few pixels one step either way) has a DoM of
    mostly exact zeros; skimage's Otsu cuts it at the negative step, which marked 98 % of such a slice."""
    from skimage.filters import threshold_otsu

    from gpuheart.filters import difference_of_medians
    from gpuheart.segment import dom_mask, dom_thresholds, threshold_slices

    rng = np.random.default_rng(0)
    img = np.full((64, 64), 91, np.uint8)
    img[rng.random(img.shape) < 0.19] = 0     # the grey-level counts of the tiny scan's dropout slice
    img[rng.random(img.shape) < 0.04] = 182
    dom = difference_of_medians(img, 3, 15)
    assert threshold_otsu(dom) < 0 and (dom > threshold_otsu(dom)).mean() > 0.9   # the premise
    assert float(threshold_slices(dom[None], "otsu")[0, 0, 0]) == threshold_otsu(dom)
    assert float(dom_thresholds(dom[None], "otsu")[0, 0, 0]) == 0.0
    np.testing.assert_array_equal(dom_mask(img, 3, 15, "otsu"), dom > 0)
    assert (dom > 0).mean() < 0.1
    # a real slice's threshold is positive and passes unchanged; fixed and noise thresholds are left alone
    vessel = (20 + rng.integers(0, 6, img.shape)).astype(np.uint8)
    vessel[30:33, :] = 250
    d2 = difference_of_medians(vessel, 3, 15)
    assert float(dom_thresholds(d2[None], "otsu")[0, 0, 0]) == threshold_otsu(d2) > 0
    assert float(dom_thresholds(dom[None], -5.0)[0, 0, 0]) == -5.0
