"""median / difference_of_medians against scipy.ndimage.median_filter and a sort-based reference."""
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from numpy.lib.stride_tricks import sliding_window_view

from gpuheart.filters import difference_of_medians, median

MODES = ["reflect", "nearest", "mirror", "wrap", "constant"]
NP_MODES = {"reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap"}
DTYPES = [np.uint8, np.uint16, np.float32]
SIZES = [3, 5, 7, 15, 31]


def random_image(rng, shape, dtype, ties=False):
    """Random values incl. the dtype's extremes; ``ties`` draws from a handful of levels."""
    if dtype == np.float32:
        x = rng.standard_normal(shape).astype(np.float32) * 1000
        extremes = [np.finfo(np.float32).min, np.finfo(np.float32).max, 0.0]
    else:
        hi = np.iinfo(dtype).max
        x = rng.integers(0, hi + 1, shape, dtype=dtype)
        extremes = [0, hi]
    if ties:
        x = np.asarray(x // (x.max() // 3 + 1) if dtype != np.float32 else np.round(x / 1000), dtype)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, size=min(flat.size, 4), replace=False)
    flat[idx] = rng.choice(extremes, size=idx.size)
    return x


def sort_reference(x2d, size, mode, cval=0):
    """Median by sorting every window of the numpy-padded slice (independent of our code)."""
    r = size // 2
    if mode == "constant":
        p = np.pad(x2d, r, mode="constant", constant_values=cval)
    else:
        p = np.pad(x2d, r, mode=NP_MODES[mode])
    win = sliding_window_view(p, (size, size)).reshape(*x2d.shape, -1)
    return np.sort(win, axis=-1)[..., size * size // 2]


def scipy_is_sound(shape, size, mode):
    # scipy's 'reflect' reads outside the image when the window is much larger than the image
    # (found while writing these tests, scipy 1.17); compare with it only where it is defined.
    return mode != "reflect" or size // 2 <= min(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_median_matches_scipy(dtype, mode, size):
    rng = np.random.default_rng(size * 7 + MODES.index(mode))
    for shape in [(37, 53), (5, 5), (2, 7), (1, 1), (40, 9)]:
        for ties in (False, True):
            x = random_image(rng, shape, dtype, ties)
            got = median(x, size, mode=mode, cval=3)
            assert got.dtype == x.dtype and got.shape == x.shape
            np.testing.assert_array_equal(got, sort_reference(x, size, mode, cval=3))
            if scipy_is_sound(shape, size, mode):
                ref = ndi.median_filter(x, size=size, mode=mode, cval=3)
                np.testing.assert_array_equal(got, ref, err_msg=f"{shape} {ties}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [3, 5, 15])
def test_median_large_image_matches_scipy(dtype, size):
    # big enough that the OpenCV frame pass and several numba row bands are exercised
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:300, :257]
    base = 100 + 80 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    scale = {np.uint8: 1, np.uint16: 250, np.float32: 0.01}[dtype]
    x = (base * scale + rng.normal(0, 20 * scale, base.shape))
    x = np.clip(x, 0, 255 * scale if dtype != np.float32 else None).astype(dtype)
    for mode in MODES:
        np.testing.assert_array_equal(median(x, size, mode=mode),
                                      ndi.median_filter(x, size=size, mode=mode))


def test_float32_many_distinct_values_uses_selection_path():
    # > 65536 distinct values: the rank trick does not fit uint16, per-pixel selection takes over
    x = np.random.default_rng(2).standard_normal((300, 301)).astype(np.float32)
    assert np.unique(x).size > 65536
    np.testing.assert_array_equal(median(x, 7, mode="wrap"), ndi.median_filter(x, 7, mode="wrap"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_image(dtype):
    x = np.full((20, 30), 200, dtype)
    for size in (3, 15):
        np.testing.assert_array_equal(median(x, size), x)
    np.testing.assert_array_equal(median(x, 31, mode="constant", cval=0),
                                  ndi.median_filter(x, 31, mode="constant", cval=0))


def test_extreme_uint16_values():
    x = np.zeros((33, 33), np.uint16)
    x[::2] = 65535
    for size in (3, 7, 15):
        np.testing.assert_array_equal(median(x, size), ndi.median_filter(x, size))


@pytest.mark.parametrize("dtype", DTYPES)
def test_slab_is_filtered_slice_by_slice(dtype):
    rng = np.random.default_rng(3)
    slab = random_image(rng, (4, 40, 33), dtype)
    for size in (3, 7):
        got = median(slab, size, mode="mirror")
        ref = np.stack([ndi.median_filter(s, size=size, mode="mirror") for s in slab])
        np.testing.assert_array_equal(got, ref)


def test_out_argument_and_in_place():
    x = np.random.default_rng(4).integers(0, 256, (50, 60), dtype=np.uint8)
    ref = ndi.median_filter(x, 5)
    out = np.empty_like(x)
    assert median(x, 5, out=out) is out
    np.testing.assert_array_equal(out, ref)
    y = x.copy()
    median(y, 5, out=y)
    np.testing.assert_array_equal(y, ref)
    with pytest.raises(ValueError, match="out must be"):
        median(x, 5, out=np.empty((50, 60), np.uint16))


@pytest.mark.parametrize("dtype, size", [(np.uint8, 3), (np.uint16, 5), (np.uint16, 7), (np.float32, 9)])
def test_read_only_out_is_refused_with_a_value_error(dtype, size):
    x = np.zeros((20, 30), dtype)
    out = np.ones_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        median(x, size, out=out)
    assert (out == 1).all()


def test_non_contiguous_input():
    x = np.random.default_rng(5).integers(0, 65536, (80, 90), dtype=np.uint16)
    v = x[::2, ::3]
    np.testing.assert_array_equal(median(v, 7), ndi.median_filter(v, 7))
    np.testing.assert_array_equal(median(x.T, 3), ndi.median_filter(x.T, 3))


def test_float32_nan_sorts_last():
    x = np.arange(25, dtype=np.float32).reshape(5, 5)
    x[0, :3] = np.nan
    got = median(x, 3, mode="nearest")
    ref = sort_reference(np.where(np.isnan(x), np.inf, x), 3, "nearest")
    ref = np.where(np.isinf(ref), np.nan, ref)
    np.testing.assert_array_equal(got, ref)  # NaN compares equal to NaN here
    x[:] = np.nan
    assert np.isnan(median(x, 7)).all()


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.uint16, st.tuples(st.integers(1, 12), st.integers(1, 12)),
                elements=st.integers(0, 65535)),
       size=st.sampled_from([3, 5, 7, 9]), mode=st.sampled_from(MODES))
def test_median_hypothesis_uint16(x, size, mode):
    got = median(x, size, mode=mode, cval=9)
    np.testing.assert_array_equal(got, sort_reference(x, size, mode, cval=9))
    if scipy_is_sound(x.shape, size, mode):
        np.testing.assert_array_equal(got, ndi.median_filter(x, size=size, mode=mode, cval=9))


@settings(max_examples=30, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 10), st.integers(1, 10)),
                elements=st.floats(-1e6, 1e6, width=32)),
       size=st.sampled_from([3, 5, 7]), mode=st.sampled_from(MODES))
def test_median_hypothesis_float32(x, size, mode):
    got = median(x, size, mode=mode)
    # == rather than bit equality: -0.0 and 0.0 are the same value to a median
    assert (got == sort_reference(x, size, mode)).all()
    if scipy_is_sound(x.shape, size, mode):
        assert (got == ndi.median_filter(x, size=size, mode=mode)).all()


@pytest.mark.parametrize("dtype,signed", [(np.uint8, np.int16), (np.uint16, np.int32),
                                          (np.float32, np.float32)])
def test_difference_of_medians(dtype, signed):
    rng = np.random.default_rng(6)
    slab = random_image(rng, (2, 40, 45), dtype)
    dom = difference_of_medians(slab, 3, 15, mode="reflect")
    assert dom.dtype == signed and dom.shape == slab.shape
    for z in range(2):
        ref = (ndi.median_filter(slab[z], 3).astype(np.float64)
               - ndi.median_filter(slab[z], 15).astype(np.float64))
        np.testing.assert_array_equal(dom[z].astype(np.float64), ref.astype(signed))
    # a 3-pixel bright line on a dark background is positive, the background 0
    x = np.zeros((31, 31), dtype)
    x[:, 14:17] = 200
    d = difference_of_medians(x)
    assert (d[:, 14:17] == 200).all() and (np.delete(d, [14, 15, 16], axis=1) == 0).all()
    # and a dark line on bright gives a negative value, not a wrapped one
    d = difference_of_medians(200 - x)
    assert (d[:, 14:17] == -200).all()


@pytest.mark.parametrize("bad,err", [
    (dict(x=np.zeros((9, 9), np.int32)), TypeError),
    (dict(x=np.zeros((9, 9), np.float64)), TypeError),
    (dict(x=np.zeros(9, np.uint8)), ValueError),
    (dict(x=np.zeros((2, 2, 9, 9), np.uint8)), ValueError),
    (dict(x=np.zeros((0, 9), np.uint8)), ValueError),
    (dict(size=4), ValueError),
    (dict(size=1), ValueError),
    (dict(size=33), ValueError),
    (dict(size=3.0), TypeError),
    (dict(mode="symmetric"), ValueError),
    (dict(mode="constant", cval=300), ValueError),
    (dict(mode="constant", cval=-1), ValueError),
    (dict(mode="constant", cval=1.5), ValueError),
])
def test_bad_input(bad, err):
    kw = dict(x=np.zeros((9, 9), np.uint8), size=3)
    kw.update(bad)
    with pytest.raises(err):
        median(**kw)


def test_dom_bad_input():
    with pytest.raises(ValueError):
        difference_of_medians(np.zeros((9, 9), np.uint8), small=4)
    with pytest.raises(TypeError):
        difference_of_medians(np.zeros((9, 9), np.int64))


def test_big_endian_input_is_filtered_like_native():
    from scipy import ndimage as ndi

    from gpuheart.filters import difference_of_medians, median

    x = np.random.default_rng(0).integers(0, 60000, (2, 30, 40)).astype(">u2")
    want = median(x.astype(np.uint16), 5)
    np.testing.assert_array_equal(median(x, 5), want)
    np.testing.assert_array_equal(want[0], ndi.median_filter(x[0], 5, mode="reflect"))
    np.testing.assert_array_equal(difference_of_medians(x), difference_of_medians(x.astype(np.uint16)))


@pytest.mark.parametrize("mode", MODES)
def test_difference_of_medians_borders_follow_mode_and_cval(mode):
    # both medians must use the caller's border: a default 'reflect' on either passed every other test
    x = random_image(np.random.default_rng(9), (30, 34), np.uint16)
    dom = difference_of_medians(x, 3, 15, mode=mode, cval=1000)
    ref = (ndi.median_filter(x, 3, mode=mode, cval=1000).astype(np.int64)
           - ndi.median_filter(x, 15, mode=mode, cval=1000).astype(np.int64))
    np.testing.assert_array_equal(dom, ref)
