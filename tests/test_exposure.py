"""exposure: slice statistics, z-normalization, asinh, CLAHE (against scikit-image), robust scaling."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from skimage.exposure import equalize_adapthist

from gpuheart import exposure
from gpuheart.exposure import SliceStats, ZNorm, asinh_stretch, clahe, robust_scale, slice_stats

Q = [1, 25, 50, 75, 99]


def _skewed(rng, shape, dtype):
    """Mostly dark with a bright tail, like a vessel slice: peaked histograms make CLAHE clip."""
    u = rng.random(shape) ** 3
    if dtype == np.uint8:
        return (u * 200 + 10).astype(np.uint8)
    if dtype == np.uint16:
        return (u * 30000 + 300).astype(np.uint16)
    return u.astype(dtype)


def _base_image(shape=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    img = 100 + 20 * np.sin(x / 5.0) + rng.normal(0, 3, shape)
    img[(np.abs(y - 2 * x / 3 - 5) < 2)] += 400  # a "vessel"
    return img


# -- slice_stats ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_slice_stats_matches_numpy(dtype):
    rng = np.random.default_rng(1)
    x = _skewed(rng, (123, 77), np.uint16 if np.dtype(dtype).kind in "iu" else dtype)
    if dtype == np.uint8:
        x = (x // 200).astype(np.uint8)
    elif dtype == np.int16:
        x = (x.astype(np.int32) - 5000).astype(np.int16)
    s = slice_stats(x, z=3)
    assert isinstance(s, SliceStats) and s.z == 3 and s.n == x.size
    ref = x.astype(np.float64)
    np.testing.assert_allclose([s.p1, s.p25, s.p50, s.p75, s.p99], np.percentile(x, Q), rtol=1e-6)
    np.testing.assert_allclose([s.mean, s.std, s.min, s.max],
                               [ref.mean(), ref.std(), ref.min(), ref.max()], rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=60))
def test_slice_stats_histogram_percentiles_exact(values):
    x = np.array(values, dtype=np.uint16).reshape(1, -1)
    s = slice_stats(x)
    np.testing.assert_allclose([s.p1, s.p25, s.p50, s.p75, s.p99], np.percentile(x, Q), rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_slice_stats_rejects_nonfinite_naming_z(bad):
    x = np.ones((8, 8), np.float32)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"z=17.*1 NaN/Inf"):
        slice_stats(x, z=17)


@pytest.mark.parametrize("x", [np.ones(5), np.ones((2, 3, 4)), np.ones((0, 4))])
def test_slice_stats_rejects_bad_shape(x):
    with pytest.raises(ValueError):
        slice_stats(x)


# -- ZNorm ----------------------------------------------------------------------------------------

def _gain_offset_stack(nz=10, seed=2):
    rng = np.random.default_rng(seed)
    base = _base_image()
    gains = rng.uniform(0.5, 2.0, nz)
    offsets = rng.uniform(-50, 80, nz)
    return (gains[:, None, None] * base + offsets[:, None, None]).astype(np.float32), base


@pytest.mark.parametrize("method", ["robust", "zscore"])
def test_znorm_removes_gain_and_offset(method):
    stack, base = _gain_offset_stack()
    zn = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(stack)], method=method)
    out = zn.apply(stack, 0)
    assert out.dtype == np.float32 and out.shape == stack.shape
    assert not zn.dark.any()
    spread = np.ptp(out, axis=0).max()  # worst per-pixel disagreement across slices
    assert spread <= 1e-4 * zn.scale, spread
    # and the common image is the base one up to one affine map (stack units are kept)
    a, c = np.polyfit(base.ravel(), out[0].ravel().astype(np.float64), 1)
    np.testing.assert_allclose(out[0], a * base + c, atol=1e-3 * zn.scale)
    center = np.median(out[0]) if method == "robust" else out[0].mean(dtype=np.float64)
    assert abs(float(center) - zn.background) < 1e-4 * zn.scale


def test_znorm_slab_partition_invariance():
    stack, _ = _gain_offset_stack(nz=9)
    zn = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(stack)])
    whole = zn.apply(stack, 0)
    parts = np.concatenate([zn.apply(stack[a:b], a) for a, b in [(0, 3), (3, 4), (4, 9)]])
    np.testing.assert_array_equal(parts, whole)
    np.testing.assert_array_equal(zn.apply(stack[5], 5), whole[5])  # a single (y, x) slice


def test_znorm_dark_slices_are_flagged_not_amplified():
    stack, _ = _gain_offset_stack(nz=8)
    rng = np.random.default_rng(3)
    stack[3] = 5 + rng.normal(0, 0.01, stack.shape[1:])  # laser dropout: near-constant noise
    stack[6] = 7.0  # completely blank: s_z == 0
    zn = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(stack)])
    assert list(np.flatnonzero(zn.dark)) == [3, 6]
    assert zn.gain[3] == 1.0 and zn.gain[6] == 1.0
    out = zn.apply(stack, 0)
    assert np.isfinite(out).all()
    assert out[3].std() == pytest.approx(stack[3].std(), rel=1e-3)  # noise not blown up
    assert zn.describe()["dark_slices"] == [3, 6]


def test_znorm_reference_ignores_blank_slices_even_when_they_are_the_majority():
    """A padded stack (zero-filled slices): B and S come from the slices with signal, so those are not
    turned down to 1 / max_gain by an S of 0."""
    stack, _ = _gain_offset_stack(nz=4)
    padded = np.concatenate([np.zeros((6, *stack.shape[1:]), np.float32), stack])
    ref = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(stack)])
    zn = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(padded)])
    assert zn.scale == ref.scale and zn.background == ref.background
    np.testing.assert_array_equal(zn.gain[6:], ref.gain)
    assert list(np.flatnonzero(zn.dark)) == list(range(6))


def test_znorm_rejects_nonfinite_naming_z_and_bad_range():
    stack, _ = _gain_offset_stack(nz=8)
    zn = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(stack)])
    slab = stack[4:8].copy()
    slab[2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="z=6"):
        zn.apply(slab, 4)
    with pytest.raises(ValueError, match="outside"):
        zn.apply(stack[:3], 6)
    with pytest.raises(ValueError):
        zn.apply(stack[0, 0], 0)  # 1-D
    with pytest.raises(ValueError):
        ZNorm.from_stats([])
    with pytest.raises(ValueError, match="method"):
        ZNorm.from_stats([slice_stats(stack[0])], method="nope")


# -- asinh ----------------------------------------------------------------------------------------

def test_asinh_stretch():
    x = np.linspace(-50, 500, 60, dtype=np.float64).reshape(3, 4, 5)
    y = asinh_stretch(x, 20.0)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, np.arcsinh(x / 20.0), rtol=1e-6)
    for bad in (0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError):
            asinh_stretch(x, bad)


# -- robust_scale ---------------------------------------------------------------------------------

def _robust_ref(s, low, high):
    lo, hi = np.percentile(s.astype(np.float32), [low, high])
    if hi <= lo:
        return np.zeros(s.shape, np.uint8)
    return np.rint(np.clip((s - lo) / (hi - lo) * 255, 0, 255)).astype(np.uint8)


def test_robust_scale_matches_numpy_per_slice():
    rng = np.random.default_rng(4)
    slab = np.stack([rng.gamma(2.0, 10 * (i + 1), (50, 60)) for i in range(3)]).astype(np.float32)
    out = robust_scale(slab, 0.1, 99.9)
    assert out.dtype == np.uint8 and out.shape == slab.shape
    for s, o in zip(slab, out):
        ref = _robust_ref(s, 0.1, 99.9)
        assert np.abs(o.astype(int) - ref).max() <= 1  # float32 vs float64 rounding at .5
        assert (o != ref).mean() < 1e-3
        assert o.min() == 0 and o.max() == 255
    np.testing.assert_array_equal(robust_scale(slab[1], 0.1, 99.9), out[1])


def test_robust_scale_constant_and_errors():
    np.testing.assert_array_equal(robust_scale(np.full((2, 5, 5), 3.0)), np.zeros((2, 5, 5), np.uint8))
    x = np.ones((5, 5), np.float32)
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        robust_scale(x)
    with pytest.raises(ValueError):
        robust_scale(np.ones(5))
    with pytest.raises(ValueError):
        robust_scale(np.ones((4, 4)), 50, 10)


# -- CLAHE ----------------------------------------------------------------------------------------

def _sk(x, k, cl, nbins=256):
    return equalize_adapthist(x, kernel_size=k, clip_limit=cl, nbins=nbins).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("shape", [(64, 64), (100, 77), (256, 256)])
@pytest.mark.parametrize("kernel_size", [8, 32])
@pytest.mark.parametrize("clip_limit", [0.01, 0.03])
def test_clahe_matches_skimage(dtype, shape, kernel_size, clip_limit):
    x = _skewed(np.random.default_rng(hash((shape, kernel_size)) % 2**32), shape, dtype)
    ours = clahe(x, clip_limit=clip_limit, kernel_size=kernel_size)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    # equal bit for bit after casting skimage's float64 to float32; 1e-6 leaves room for nothing else
    np.testing.assert_allclose(ours, _sk(x, kernel_size, clip_limit), rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(3, 40), w=st.integers(3, 40), ky=st.integers(2, 12), kx=st.integers(2, 12),
       clip_limit=st.sampled_from([0.0, 0.005, 0.05, 0.3]), nbins=st.sampled_from([16, 100, 256, 1000]),
       seed=st.integers(0, 2**16))
def test_clahe_matches_skimage_random(h, w, ky, kx, clip_limit, nbins, seed):
    x = _skewed(np.random.default_rng(seed), (h, w), np.uint16)
    np.testing.assert_allclose(clahe(x, clip_limit, (ky, kx), nbins), _sk(x, (ky, kx), clip_limit, nbins),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("nbins, bin_dtype", [(256, np.uint8), (100, np.uint8), (1000, np.uint16), (16384, np.uint16)])
@pytest.mark.parametrize("ends", [(0, 65535), (0, 0), (65535, 65535), (7, 7), (0, 1), (258, 21444), (1000, 1003),
                                  (65534, 65535), (12345, 54321)])
def test_a_bin_table_is_skimages_rescale_of_every_uint16_value(ends, nbins, bin_dtype, full):
    """The table is computed over the slice's span only, the rest being copies of its ends: every one of the
    65536 entries must still be skimage's rescale_intensity -> round -> bin of that value."""
    from skimage.exposure import rescale_intensity

    exposure._bin_table_cached.cache_clear()
    e0, e1 = ends
    table = exposure._bin_table_cached(e0, e1, nbins, np.dtype(bin_dtype), full, None if full else np.dtype(np.uint16))
    u16 = np.arange(65536, dtype=np.uint16)
    ref = rescale_intensity(u16, in_range=(e0, e1), out_range=(0, exposure.NR_OF_GRAY - 1))
    ref = (np.round(ref).astype(np.uint16) // (1 + exposure.NR_OF_GRAY // nbins)).astype(bin_dtype)
    assert table.dtype == bin_dtype and table.shape == (65536,) and not table.flags.writeable
    np.testing.assert_array_equal(table, ref)


def test_clahe_slab_is_per_slice_and_constant_input():
    rng = np.random.default_rng(5)
    slab = np.stack([_skewed(rng, (40, 45), np.uint16) for _ in range(3)])
    out = clahe(slab, kernel_size=16)
    for s, o in zip(slab, out):
        np.testing.assert_allclose(o, _sk(s, 16, 0.01), rtol=0, atol=1e-6)
    const = np.full((30, 30), 1234, np.uint16)
    np.testing.assert_array_equal(clahe(const, kernel_size=8), _sk(const, 8, 0.01))


@pytest.mark.parametrize("dtype", [np.int16, np.bool_, np.float64, np.int8, np.int32, np.uint32])
def test_clahe_other_dtypes_match_skimage(dtype):
    rng = np.random.default_rng(7)
    if dtype in (np.int32, np.uint32):   # beyond uint16's range
        x = rng.integers(0 if dtype == np.uint32 else -70000, 2**31 - 1, (60, 50))
    elif np.dtype(dtype).kind in "iu":
        x = rng.integers(-100 if dtype == np.int8 else -300, 100 if dtype == np.int8 else 3000, (60, 50))
    else:
        x = rng.random((60, 50)) ** 2
    x = (x > 0.3) if dtype == np.bool_ else x.astype(dtype)
    np.testing.assert_allclose(clahe(x, kernel_size=16), _sk(x, 16, 0.01), rtol=0, atol=1e-6)


def test_clahe_float16_is_equalized_as_float32():
    # documented departure: skimage scales float16 to uint16 in float16 (65535 overflows) and returns all ones
    x = (np.random.default_rng(8).random((60, 50)) ** 2).astype(np.float16)
    out = clahe(x, kernel_size=16)
    np.testing.assert_allclose(out, _sk(x.astype(np.float32), 16, 0.01), rtol=0, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0


def test_clahe_float_outside_unit_range_is_min_max_mapped():
    # documented departure: skimage rejects this; we map [min, max] to [0, 1] first
    x = (np.random.default_rng(6).normal(size=(70, 50)) * 3).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    ref = _sk(((x - lo) / (hi - lo)).astype(np.float32), 16, 0.01)
    np.testing.assert_allclose(clahe(x, kernel_size=16), ref, rtol=0, atol=1e-6)
    out = clahe(x, kernel_size=16)
    assert out.min() == 0.0 and out.max() == 1.0


def test_clahe_errors():
    x = np.ones((16, 16), np.float32)
    x[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        clahe(x)
    for bad in (np.ones(16), np.ones((2, 2, 2, 2)), np.ones((0, 5))):
        with pytest.raises(ValueError):
            clahe(bad)
    with pytest.raises(ValueError):
        clahe(np.ones((8, 8)), kernel_size=0)


def test_exposure_does_not_import_torch():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(exposure))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names} | {(n.module or "").split(".")[0] for n in ast.walk(tree)
                                  if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names


def test_robust_scale_keeps_sparse_bright_pixels_on_a_flat_background():
    """Under 0.1 % bright pixels (sparse fibres, a nearly empty slice): p_99.9 equals p_0.1, and the slice
    must not be blanked; its maximum takes p_high's place."""
    x = np.zeros((2, 100, 100), np.uint16)
    x[0, 50, 40:43] = 5000   # 5 of 10,000 pixels
    x[0, 60, 40:42] = 2500
    out = robust_scale(x)
    assert out[0, 50, 40] == 255 and out[0, 60, 40] == 128 and out[0].sum() == 3 * 255 + 2 * 128
    assert not out[1].any()   # constant: zeros


def test_big_endian_input_gives_the_native_result():
    from gpuheart.exposure import clahe, clahe_robust_scale

    x = np.random.default_rng(1).integers(0, 60000, (2, 40, 50)).astype(">u2")
    np.testing.assert_array_equal(clahe(x), clahe(x.astype(np.uint16)))
    np.testing.assert_array_equal(clahe_robust_scale(x), clahe_robust_scale(x.astype(np.uint16)))


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel_size": None}, "kernel_size must be an int or a"),   # skimage's default; ours is 32
    ({"nbins": 256.0}, "nbins must be an integer >= 1, got 256.0"),   # was a numba TypingError
])
def test_clahe_names_a_bad_argument(kwargs, message):
    x = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    for fn in (clahe, exposure.clahe_robust_scale):
        with pytest.raises(ValueError, match=message):
            fn(x, **kwargs)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 4, 4)])
def test_preprocess_volume_names_the_shape_it_expects(shape):
    # was "slice_stats expects one (y, x) slice, got shape ()" for a 1-D array
    with pytest.raises(ValueError, match=r"preprocess_volume expects a \(z, y, x\) stack .* got shape"):
        exposure.preprocess_volume(np.ones(shape, np.uint16))


# -- ZNorm and preprocess against numbers worked out by hand ----------------------------------------

def _stats(p1, p50, p99):
    """SliceStats with the given robust numbers; p25/p75 halfway, so a wrong percentile shows."""
    return SliceStats(None, 100, p50, 1.0, p1, p99, p1, (p1 + p50) / 2, p50, (p50 + p99) / 2, p99)


def test_znorm_robust_uses_the_median_and_the_p1_to_p99_spread():
    zn = ZNorm.from_stats([_stats(0, 10, 100), _stats(10, 30, 210), _stats(5, 20, 405)])
    np.testing.assert_array_equal(zn.background_z, [10, 30, 20])
    np.testing.assert_array_equal(zn.scale_z, [100, 200, 400])
    assert (zn.background, zn.scale) == (20.0, 200.0)
    np.testing.assert_array_equal(zn.gain, [2.0, 1.0, 0.5])


def test_znorm_gain_is_capped_both_ways():
    # S = 100: a slice 20x brighter gets 1 / max_gain, not 1/20; with dark_ratio 0.01 a slice 20x
    # dimmer is not dark and gets max_gain, not 20
    stats = [_stats(0, 0, 100)] * 3 + [_stats(0, 0, 2000), _stats(0, 0, 5)]
    zn = ZNorm.from_stats(stats, dark_ratio=0.01, max_gain=10.0)
    assert zn.scale == 100.0 and not zn.dark.any()
    np.testing.assert_allclose(zn.gain, [1, 1, 1, 0.1, 10], rtol=1e-15)


def test_znorm_dark_rule_includes_its_boundary():
    # documented as s_z <= dark_ratio * S: a spread of exactly a tenth of S is dark (gain 1, not 10)
    zn = ZNorm.from_stats([_stats(0, 0, 100)] * 3 + [_stats(0, 0, 10), _stats(0, 0, 10.5)])
    assert list(np.flatnonzero(zn.dark)) == [3]
    assert zn.gain[3] == 1.0 and zn.gain[4] == pytest.approx(100 / 10.5)


def test_preprocess_without_clahe_is_asinh_of_background_subtracted_over_S_then_0_1_99_9_scaling():
    """The chain by hand: per-slice median / p1-p99 normalization, asinh((x' - B) / S), then the
    paper's 0.1 / 99.9 percentiles to 0 / 255 (ExposureConfig's defaults)."""
    rng = np.random.default_rng(11)
    stack, _ = _gain_offset_stack(nz=3)
    stack[1, 5:9, :] += rng.uniform(200, 2000, (4, stack.shape[2])).astype(np.float32)  # bright vessels
    x = stack.astype(np.float64)
    p1, p50, p99 = (np.percentile(x, q, axis=(1, 2)) for q in (1, 50, 99))
    B, S = np.median(p50), np.median(p99 - p1)
    norm = (x - p50[:, None, None]) * (S / (p99 - p1))[:, None, None] + B
    a = np.arcsinh((norm - B) / S)
    lo, hi = np.percentile(a, [0.1, 99.9], axis=(1, 2))
    want = np.rint(np.clip((a - lo[:, None, None]) / (hi - lo)[:, None, None] * 255, 0, 255))
    cfg = exposure.ExposureConfig(clahe=False)
    assert (cfg.robust_low, cfg.robust_high) == (0.1, 99.9)
    got = exposure.preprocess_volume(stack, cfg)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1   # float32 arithmetic vs float64 at .5
    assert (got != want).mean() < 1e-3


def test_an_all_blank_stack_normalizes_to_finite_values_and_preprocesses_to_zeros():
    # no slice has signal: B and S come from all slices (a blank channel must not turn into NaN)
    stack = np.stack([np.full((20, 24), v, np.uint16) for v in (7, 9, 8)])
    zn = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(stack)])
    assert (zn.background, zn.scale) == (8.0, 0.0) and zn.dark.all()
    np.testing.assert_array_equal(zn.apply(stack, 0), np.full(stack.shape, 8.0, np.float32))
    for cfg in (exposure.ExposureConfig(), exposure.ExposureConfig(clahe=False)):
        np.testing.assert_array_equal(exposure.preprocess_volume(stack, cfg), np.zeros(stack.shape, np.uint8))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 300), (31, 33)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_clahe_on_slices_smaller_than_a_tile_read_only_and_strided(shape, dtype):
    """Slices narrower than the 32 x 32 tile, given as read-only strided views (a memory-mapped TIFF),
    equal skimage and are left as they were."""
    rng = np.random.default_rng(11)
    base = (rng.random((shape[0], 2 * shape[1])) ** 3 * 250).astype(dtype)
    x = base[:, ::2]
    x.flags.writeable = False
    before = x.copy()
    ref = equalize_adapthist(before, kernel_size=32, clip_limit=0.01).astype(np.float32)
    np.testing.assert_array_equal(clahe(x), ref)
    np.testing.assert_array_equal(exposure.clahe_robust_scale(x), robust_scale(ref))
    np.testing.assert_array_equal(x, before)


def _stack_with_dropout(dark=2):
    rng = np.random.default_rng(5)
    stack, _ = _gain_offset_stack(nz=5)
    stack[1:4, 5:9, :] += rng.uniform(200, 2000, (3, 4, stack.shape[2])).astype(np.float32)
    stack[dark] = 5 + rng.normal(0, 0.01, stack.shape[1:]).astype(np.float32)   # laser dropout
    return stack


def test_preprocess_writes_a_dark_slice_as_zero_and_the_others_as_the_chain_by_hand():
    """CLAHE and the per-slice 0.1/99.9 scaling would stretch a dropout slice's noise over 0..255, where
    the difference of medians then marked 98 % of it; it has no signal, so it comes out 0."""
    stack = _stack_with_dropout(dark=2)
    x = stack.astype(np.float64)
    p1, p50, p99 = (np.percentile(x, q, axis=(1, 2)) for q in (1, 50, 99))
    B, S = np.median(p50), np.median(p99 - p1)
    assert (p99 - p1)[2] <= 0.1 * S   # the documented dark rule holds for slice 2 only
    assert ((p99 - p1)[[0, 1, 3, 4]] > 0.1 * S).all()
    norm = (x - p50[:, None, None]) * (S / (p99 - p1))[:, None, None] + B
    a = np.arcsinh((norm - B) / S)
    lo, hi = np.percentile(a, [0.1, 99.9], axis=(1, 2))
    want = np.rint(np.clip((a - lo[:, None, None]) / (hi - lo)[:, None, None] * 255, 0, 255))
    for cfg in (exposure.ExposureConfig(clahe=False), exposure.ExposureConfig()):
        got = exposure.preprocess_volume(stack, cfg)
        np.testing.assert_array_equal(got[2], 0)
        assert all(got[z].max() > 0 for z in (0, 1, 3, 4))
        if not cfg.clahe:
            assert np.abs(got[[0, 1, 3, 4]].astype(int) - want[[0, 1, 3, 4]]).max() <= 1
    # both ratios 0: only blank slices are dark, so slice 2's noise is stretched like any slice; with only
    # dark_ratio 0, slice 2 still dips below its neighbours
    got = exposure.preprocess_volume(stack, exposure.ExposureConfig(clahe=False, dark_ratio=0.0,
                                                                    dark_neighbour_ratio=0.0))
    assert got[2].max() == 255
    np.testing.assert_array_equal(
        exposure.preprocess_volume(stack, exposure.ExposureConfig(clahe=False, dark_ratio=0.0))[2], 0)


def _spreads(*s):
    return [_stats(0, 10, v) for v in s]


def test_znorm_a_slice_dipping_below_both_neighbours_is_dark():
    """A dropout in a sparse channel: its spread is camera noise, about 0.2 of its neighbours' (the phantom's
    nerve channel), above dark_ratio's 0.1 of the stack's."""
    zn = ZNorm.from_stats(_spreads(100, 104, 98, 20, 101, 99, 103))
    assert list(np.flatnonzero(zn.dark)) == [3] and zn.gain[3] == 1.0
    # the rule is the median of up to 3 slices on each side: 0.35 of the lower side's median and under
    assert ZNorm.from_stats(_spreads(100, 100, 35, 100, 200)).dark.tolist() == [False, False, True, False, False]
    assert not ZNorm.from_stats(_spreads(100, 100, 35.5, 100, 200)).dark.any()
    assert ZNorm.from_stats(_spreads(100, 104, 98, 20, 101), dark_neighbour_ratio=0.0).dark.sum() == 0
    assert ZNorm.from_stats(_spreads(100, 104, 98, 20, 101)).describe()["dark_neighbour_ratio"] == 0.35


@pytest.mark.parametrize("spreads", [
    (20, 100, 100, 100, 100),                 # a dim first slice: no neighbour before it
    (100, 100, 100, 100, 20),                 # nor after the last
    (100, 80, 60, 45, 34, 26, 20),            # a gradual fall with depth, 0.75 a slice
    (100, 100, 100, 30, 30, 30, 30, 100),     # dark for longer than the neighbours looked at: the global rule's
])
def test_znorm_edges_gradual_falls_and_long_dark_runs_are_not_dips(spreads):
    assert not ZNorm.from_stats(_spreads(*spreads), dark_ratio=0.0).dark.any()


def test_znorm_many_dips_are_a_pattern_whose_dim_slices_are_evened_out_not_blanked():
    """Every other slice 3.3x dimmer (flicker, one side of a dual illumination failing): that is signal for
    the gains, not 20 dropouts; blanking them would throw away half the stack."""
    zn = ZNorm.from_stats(_spreads(*[100, 30] * 20))
    assert not zn.dark.any()
    np.testing.assert_allclose(zn.gain[1::2] / zn.gain[0::2], 100 / 30)
    # two dropouts in 40 slices are still dropouts
    two = [100.0] * 40
    two[10] = two[30] = 20.0
    assert list(np.flatnonzero(ZNorm.from_stats(_spreads(*two)).dark)) == [10, 30]


def test_preprocess_of_one_slice_zeroes_it_only_when_it_is_the_dark_one():
    stack = _stack_with_dropout(dark=2)
    zn = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(stack)])
    whole = exposure.preprocess(stack, zn, 0)
    for z in range(5):   # a (y, x) slice: the whole slice is zeroed, never its row 0
        np.testing.assert_array_equal(exposure.preprocess(stack[z], zn, z), whole[z])
    np.testing.assert_array_equal(exposure.preprocess(stack[1:4], zn, 1), whole[1:4])   # across slab cuts
    assert (whole[2] == 0).all() and whole[1, 0].any()


@pytest.mark.parametrize("dtype,power", [(np.float32, 119), (np.float64, 1015)])
def test_clahe_float_whose_span_overflows_its_type(dtype, power):
    # max - min beyond the float type: (x - min) / (max - min) was inf - inf = NaN, and the NaN bin index
    # read outside the lookup table (a segfault). Known answer: x = (y - 500) * 2**power with y whole
    # numbers in [0, 1000] is exact, and so is its map to [0, 1]: it is y / 1000, which skimage equalizes
    y = np.random.default_rng(11).integers(0, 1001, (70, 90)).astype(dtype)
    y[0, 0], y[0, 1] = 0, 1000
    x = (y - dtype(500)) * dtype(2.0 ** power)
    with np.errstate(over="ignore"):
        assert np.isfinite(x).all() and not np.isfinite(np.array(x.max(), dtype) - np.array(x.min(), dtype))
    want = _sk(y / dtype(1000), 32, 0.01)
    np.testing.assert_array_equal(clahe(x), want)
    np.testing.assert_array_equal(clahe(np.stack([x, x])), np.stack([want, want]))
    from gpuheart.exposure import clahe_robust_scale
    np.testing.assert_array_equal(clahe_robust_scale(x), robust_scale(want))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64])
def test_img_as_uint_shift_is_skimages_scaling(dtype):
    import warnings as w

    from skimage.util import img_as_uint

    from gpuheart.exposure import _img_as_uint_shift

    top = np.iinfo(dtype).max
    v = np.unique(np.concatenate([np.random.default_rng(3).integers(0, top, 5000, dtype=dtype, endpoint=True),
                                  np.array([0, 1, 65535, 65536, 2**31 - 1, top], dtype=dtype)]))
    with w.catch_warnings():
        w.simplefilter("ignore")  # img_as_uint's precision-loss note
        want = img_as_uint(v)
    np.testing.assert_array_equal(v >> _img_as_uint_shift(dtype), want)


def test_clahe_warns_where_skimages_integer_conversion_loses_data():
    # skimage's img_as_uint (which equalize_adapthist applies, and so do we, to stay equal to it) scales an
    # int64 from its full range: 200000 / 2**47 rounds to 0, one grey level, a constant output
    import warnings as w

    rng = np.random.default_rng(12)
    wide = rng.integers(0, 200001, (60, 50)).astype(np.int64)
    with pytest.warns(RuntimeWarning, match=r"int64 input .*scaled from the whole int64 range.*leaving 1 grey level"):
        out = clahe(wide, kernel_size=16)
    np.testing.assert_array_equal(out, _sk(wide, 16, 0.01))
    assert np.ptp(out) == 0
    # int32 from -5000 to 5000: skimage sets the negative half to 0
    neg = rng.integers(-5000, 5001, (60, 50)).astype(np.int32)
    n_neg = int((neg < 0).sum())
    with pytest.warns(RuntimeWarning, match=rf"int32 input .*its {n_neg} negative pixel\(s\) become 0"):
        out = clahe(neg, kernel_size=16)
    with w.catch_warnings():
        w.simplefilter("ignore")   # skimage's own 'Downcasting int32 to uint16' note
        np.testing.assert_array_equal(out, _sk(neg, 16, 0.01))
    from gpuheart.exposure import clahe_robust_scale
    with pytest.warns(RuntimeWarning, match="negative pixel"):
        clahe_robust_scale(neg, kernel_size=16)
    # lossless conversions stay quiet: uint16, non-negative int16 (scaled up), int32 within uint16's range
    for ok in (wide.astype(np.uint16), (wide // 8).astype(np.int16), (wide // 4).astype(np.int32)):
        with w.catch_warnings(record=True) as got:
            w.simplefilter("always")
            clahe(ok, kernel_size=16)
        assert not [g for g in got if issubclass(g.category, RuntimeWarning)], ok.dtype
