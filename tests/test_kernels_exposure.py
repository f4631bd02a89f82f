"""kernels/clahe.cu and kernels/elementwise.cu (they compile: tests/test_kernels_nvrtc.py): the host-side pieces of the CUDA paths
equal the CPU's (CPU); GPU == CPU (``gpu``): CLAHE and robust scaling bit for bit, the fused
z-normalize + asinh bit for bit before asinh and within ``exposure.ASINH_MAX_ULP`` after it."""

import numpy as np
import pytest
from conftest import cupy_checking_fallbacks, no_device_sync
from skimage import exposure as skexp

from gpuheart import exposure as ex


# -- host-side pieces and the algorithms the kernels use (CPU) ---------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("k", [1, 2, 7, 32])
def test_reflect_index_gathers_the_padded_tiles(n, k):
    img = np.random.default_rng(n * k).integers(0, 255, (n, n + 3))
    nty, ntx = -(-n // k), -(-(n + 3) // k)
    pad = [(kk // 2, (kk - s % kk) % kk + int(np.ceil(kk / 2.0))) for kk, s in zip((k, k), img.shape)]
    padded = np.pad(img, pad, mode="reflect")[k // 2:k // 2 + nty * k, k // 2:k // 2 + ntx * k]
    rows, cols = ex._reflect_index(n, k, nty), ex._reflect_index(n + 3, k, ntx)
    np.testing.assert_array_equal(img[rows][:, cols], padded)


def test_percentile_plan_equals_numpy():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 10, 999, 1000, 1001, 4097, 65536 + 7]:
        for _ in range(5):
            x = (rng.standard_normal(n) * rng.choice([1e-3, 1, 1e4])).astype(np.float32)
            if rng.random() < 0.3:
                x = np.round(x)  # ties
            for q in ([0.1, 99.9], [0.0, 100.0], [1.0, 50.0], [33.3, 66.7]):
                lo, hi, gamma = ex._linear_percentile_plan(n, q)
                s = np.sort(x)
                got = ex._lerp_like_numpy(s[lo], s[hi], gamma)
                want = np.percentile(x, q)
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want)


def _clip_like_kernel(h, clim):
    """clahe_tile_maps' restructuring of skimage's clip: loops 2 and 3 fused per bin, sums taken
    after each parallel pass, then the same sequential redistribution."""
    h = h.copy()
    nb = h.size
    n_excess = int(np.maximum(h - clim, 0).sum())
    h = np.minimum(h, clim)
    bin_incr = n_excess // nb
    upper = clim - bin_incr
    for i in range(nb):  # per bin, order-free
        if h[i] < upper:
            h[i] += bin_incr
            n_excess -= bin_incr
        if upper <= h[i] < clim:
            n_excess += h[i] - clim
            h[i] = clim
    n_under = int((h < clim).sum())
    while n_excess > 0:
        prev = n_excess
        for index in range(nb):
            step = max(1, n_under // n_excess)
            for i in range(index, nb, step):
                if h[i] < clim:
                    h[i] += 1
                    n_excess -= 1
                    if h[i] == clim:
                        n_under -= 1
            if n_excess <= 0:
                break
        if prev == n_excess:
            break
    return h


def test_clip_restructuring_equals_cpu():
    rng = np.random.default_rng(1)
    for trial in range(300):
        nb = int(rng.choice([1, 2, 7, 64, 256]))
        npix = int(rng.choice([1, 16, 1024, 4096]))
        h = np.bincount(rng.integers(0, nb, npix) if rng.random() < 0.5 else
                        np.minimum(rng.geometric(0.3, npix) - 1, nb - 1), minlength=nb).astype(np.int64)
        clim = int(max(1, rng.choice([0.001, 0.01, 0.1, 0.5]) * npix))
        want = h.copy()
        ex._clip_histogram(want, clim)
        np.testing.assert_array_equal(_clip_like_kernel(h, clim), want)


def test_robust_level_table_equals_robust_scale_of_the_rescaled_levels():
    """The host half of the fused CLAHE + robust scaling (CPU path and GPU path share it): for any
    level image, table[levels] is robust_scale of the final rescale, including ties, one or two
    distinct levels, a single pixel and the extreme percentiles."""
    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.choice([1, 2, 3, 17, 1000, 4099]))
        kind = trial % 4
        if kind == 0:
            lv = rng.integers(0, ex.NR_OF_GRAY, n)
        elif kind == 1:
            lv = rng.choice(rng.integers(0, ex.NR_OF_GRAY, int(rng.integers(1, 4))), n)  # few levels
        elif kind == 2:
            lv = np.minimum(rng.geometric(0.01, n) + int(rng.integers(0, 9000)), ex.NR_OF_GRAY - 1)
        else:
            lv = np.full(n, int(rng.integers(0, ex.NR_OF_GRAY)))
        levels = lv.astype(np.uint16).reshape(1, n)
        low, high = [(0.1, 99.9), (0, 100), (1, 99), (50, 50.5), (0, 0.001)][trial % 5]
        fd = np.float32 if rng.random() < 0.5 else np.float64
        table = ex._robust_level_table(np.bincount(lv, minlength=ex.NR_OF_GRAY), fd, low, high)
        want = ex.robust_scale(ex._final_rescale(levels, fd), low, high)
        np.testing.assert_array_equal(table[levels], want)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 64), (97, 131), (3, 50, 47), (1, 5), (33, 1)])
def test_clahe_robust_scale_equals_the_two_steps(dtype, shape):
    x = _image(shape, dtype, 11)
    for low, high in [(0.1, 99.9), (2, 98)]:
        want = ex.robust_scale(ex.clahe(x), low, high)
        got = ex.clahe_robust_scale(x, low=low, high=high)
        assert got.dtype == np.uint8 and got.shape == x.shape
        np.testing.assert_array_equal(got, want)


def test_clahe_robust_scale_constant_slice_and_errors():
    x = _image((3, 40, 40), np.uint16, 2)
    x[1] = 7
    x[2] = 0
    x[2, 10, 10] = 5000   # 1 of 1600 pixels: p_99.9 is the background
    got = ex.clahe_robust_scale(x)
    np.testing.assert_array_equal(got, ex.robust_scale(ex.clahe(x)))
    assert got[2, 10, 10] == 255 and got[2].max() == 255
    f = _image((2, 20, 20), np.float32, 2)
    f[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ex.clahe_robust_scale(f)
    with pytest.raises(ValueError, match="low"):
        ex.clahe_robust_scale(x, low=60, high=40)


# -- GPU parity --------------------------------------------------------------------------------------

cp = cupy_checking_fallbacks(ex)


def _image(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:shape[-2], :shape[-1]]
    base = np.sin(x / 7.0) * np.cos(y / 11.0) + 0.3 * rng.standard_normal(shape)
    if dtype == np.uint8:
        return np.clip(base * 60 + 120, 0, 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.clip(base * 3000 + 20000, 0, 65535).astype(np.uint16)
    return (base * 3.0).astype(dtype)  # negative values: the documented min/max departure


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 64), (97, 131), (3, 50, 47), (1, 5), (33, 1)])
def test_clahe_gpu_equals_cpu(cp, dtype, shape):
    x = _image(shape, dtype, 0)
    got = ex.clahe(cp.asarray(x))
    assert isinstance(got, cp.ndarray) and got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got.get(), ex.clahe(x))


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(clip_limit=0.0), dict(clip_limit=0.5), dict(kernel_size=(8, 20)),
                                dict(kernel_size=7, nbins=64), dict(nbins=512), dict(nbins=4096),
                                dict(kernel_size=1)])
def test_clahe_gpu_equals_cpu_options(cp, kw):
    # kernel_size 1 makes every pixel a tile: 2 x 77 x 90 took 4 minutes under --fake-gpu (a block of OS
    # threads per tile) and, beside another test process, ran the emulator out of threads
    x = _image((2, 77, 90) if kw.get("kernel_size") != 1 else (2, 19, 23), np.float32, 1)
    np.testing.assert_array_equal(ex.clahe(cp.asarray(x), **kw).get(), ex.clahe(x, **kw))


@pytest.mark.gpu
def test_clahe_gpu_matches_skimage_and_edge_cases(cp):
    x = np.random.default_rng(2).random((70, 90)).astype(np.float32)  # in [0, 1]: skimage's own domain
    want = skexp.equalize_adapthist(x, kernel_size=32, clip_limit=0.01).astype(np.float32)
    np.testing.assert_array_equal(ex.clahe(cp.asarray(x)).get(), want)
    const = np.full((40, 40), 7, np.uint16)
    np.testing.assert_array_equal(ex.clahe(cp.asarray(const)).get(), ex.clahe(const))
    bad = x.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        ex.clahe(cp.asarray(bad))
    i16 = (x * 1000).astype(np.int16)  # not covered by the kernels: host path, still CuPy out
    out = ex.clahe(cp.asarray(i16))
    assert isinstance(out, cp.ndarray)
    np.testing.assert_array_equal(out.get(), ex.clahe(i16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,power", [(np.float32, 119), (np.float64, 1015)])
def test_clahe_gpu_float_whose_span_overflows_its_type(cp, dtype, power):
    # max - min beyond the float type made (x - min) / (max - min) NaN (a segfault on the host path);
    # known answer as in test_exposure: x = (y - 500) * 2**power maps exactly to y / 1000
    y = np.random.default_rng(11).integers(0, 1001, (2, 70, 90)).astype(dtype)
    y[:, 0, 0], y[:, 0, 1] = 0, 1000
    x = (y - dtype(500)) * dtype(2.0 ** power)
    got = ex.clahe(cp.asarray(x))
    assert isinstance(got, cp.ndarray)
    for z in range(2):
        want = skexp.equalize_adapthist(y[z] / dtype(1000), kernel_size=32, clip_limit=0.01).astype(np.float32)
        np.testing.assert_array_equal(got[z].get(), want)
    np.testing.assert_array_equal(ex.clahe_robust_scale(cp.asarray(x)).get(), ex.clahe_robust_scale(x))


@pytest.mark.gpu
def test_clahe_gpu_warns_where_skimages_integer_conversion_loses_data(cp):
    neg = np.random.default_rng(12).integers(-5000, 5001, (40, 50)).astype(np.int32)
    with pytest.warns(RuntimeWarning, match="int32 input .*negative pixel"):
        got = ex.clahe(cp.asarray(neg))
    with pytest.warns(RuntimeWarning, match="int32 input .*negative pixel"):
        np.testing.assert_array_equal(got.get(), ex.clahe(neg))


@pytest.mark.gpu
def test_clahe_kernel_failure_falls_back_with_one_warning(cp, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated NVRTC failure")

    monkeypatch.setattr(ex, "load_module", broken)
    monkeypatch.setattr(ex, "_warned", set())
    x = _image((40, 50), np.uint16, 3)
    with pytest.warns(RuntimeWarning, match="clahe"):
        got = ex.clahe(cp.asarray(x))
    np.testing.assert_array_equal(got.get(), ex.clahe(x))


def _znorm(vol):
    return ex.ZNorm.from_stats([ex.slice_stats(s, z=z) for z, s in enumerate(vol)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_znorm_asinh_equals_cpu_chain(cp, dtype, normalize):
    check_znorm_asinh(lambda slab, *a, **k: ex._znorm_asinh_cuda(cp.asarray(slab), *a, **k).get(), dtype, normalize)


def check_znorm_asinh(fused, dtype, normalize):
    """``fused(slab, znorm, z0, normalize, scale, do_asinh=...)`` (NumPy out) against the CPU chain:
    bit for bit before asinh, within ``ASINH_MAX_ULP`` after it. Shared with the emulator tests."""
    vol = _image((6, 45, 67), dtype, 4)
    vol = vol * (1 + np.arange(6, dtype=vol.dtype)[:, None, None] % 3) if dtype != np.uint8 else vol
    zn = _znorm(vol)
    z0, slab = 2, vol[2:5]
    norm = zn.apply(slab, z0) if normalize else slab.astype(np.float32)
    lin = (norm - np.float32(zn.background)) / np.float32(zn.scale)
    np.testing.assert_array_equal(fused(slab, zn, z0, normalize, zn.scale, do_asinh=False), lin)
    want = ex.asinh_stretch(norm - np.float32(zn.background), zn.scale)
    np.testing.assert_array_max_ulp(fused(slab, zn, z0, normalize, zn.scale), want, maxulp=ex.ASINH_MAX_ULP)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_robust_scale_gpu_equals_cpu(cp, dtype):
    x = _image((4, 61, 83), dtype, 5)
    x[1] = x[1, 0, 0]  # a constant slice -> zeros
    x[0] = 0
    x[0, 3:5, 7] = 200  # sparse: p_high == p_low, the maximum takes its place
    got = ex.robust_scale(cp.asarray(x))
    assert isinstance(got, cp.ndarray) and got.dtype == np.uint8
    np.testing.assert_array_equal(got.get(), ex.robust_scale(x))
    np.testing.assert_array_equal(ex.robust_scale(cp.asarray(x[2]), 1, 99).get(), ex.robust_scale(x[2], 1, 99))
    if dtype != np.uint8:
        x[3, 5, 5] = np.inf
        with pytest.raises(ValueError, match="slice 3"):
            ex.robust_scale(cp.asarray(x))


@pytest.mark.gpu
def test_preprocess_gpu_vs_cpu(cp):
    vol = _image((5, 96, 80), np.uint16, 6)
    zn = _znorm(vol)
    cpu = ex.preprocess(vol, zn)
    seen = []
    gpu = ex.preprocess(cp.asarray(vol), zn, keep_normalized=seen.append)
    assert isinstance(gpu, cp.ndarray) and gpu.dtype == np.uint8
    np.testing.assert_array_equal(seen[0].get(), zn.apply(vol))
    # asinh may differ by an ulp, which can move a pixel across a bin edge: allow a few pixels off by 1
    diff = np.abs(gpu.get().astype(int) - cpu.astype(int))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size
    # from the same stretched input, CLAHE + robust scaling on the GPU equal the CPU bit for bit,
    # as two steps and fused (what preprocess runs on the device)
    st = ex._znorm_asinh_cuda(cp.asarray(vol), zn, 0, True, zn.scale)
    want = ex.robust_scale(ex.clahe(st.get()))
    np.testing.assert_array_equal(ex.robust_scale(ex.clahe(st)).get(), want)
    np.testing.assert_array_equal(ex.clahe_robust_scale(st).get(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_preprocess_gpu_of_integers_reads_nothing_back(cp, dtype):
    """Integer slices stretched by asinh are finite by construction, so the preprocessing chain copies
    nothing to the host (no wait for the device); its answer is the checked path's."""
    vol = _image((3, 96, 80), np.uint16, 7).astype(dtype)
    vol[1] = 0  # a constant (dark) slice
    zn = _znorm(vol)
    d = cp.asarray(vol)
    with no_device_sync():
        got = ex.preprocess(d, zn)
    st = ex._znorm_asinh_cuda(d, zn, 0, True, zn.scale)
    want = ex.clahe_robust_scale(st)  # float input: checked after the launches
    want[np.flatnonzero(zn.dark)] = 0
    np.testing.assert_array_equal(got.get(), want.get())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slice_extremes_gpu_keep_subnormals_and_nan(cp, dtype):
    """On a device CuPy compiles with -ftz=true, under which float comparisons see subnormals as 0: the
    extremes kernel compares order keys, so a subnormal minimum or maximum next to 0 is still found."""
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.zeros((4, 5000), dtype)
    x[0, 17] = tiny
    x[1] += tiny * 3
    x[1, -1] = tiny
    x[2, 9] = -tiny
    x[3] = np.random.default_rng(0).standard_normal(5000)
    x[3, 100] = np.nan
    got = ex.slice_extremes(cp.asarray(x)).get()
    np.testing.assert_array_equal(got[:, :3], np.stack([x[:3].min(axis=1), x[:3].max(axis=1)]))
    assert got[1, 0] == tiny and got[0, 1] == tiny and got[0, 2] == -tiny and np.isnan(got[:, 3]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 64), (3, 97, 131), (2, 1, 5), (40, 33, 1)])
def test_clahe_robust_scale_gpu_equals_cpu(cp, dtype, shape):
    x = _image(shape, dtype, 12)
    if len(shape) == 3 and shape[1] > 1:
        x[1] = x[1, 0, 0]  # a constant slice
        x[0] = 0
        x[0, 1, :2] = 200  # sparse: p_high == p_low, the maximum takes its place
    got = ex.clahe_robust_scale(cp.asarray(x))
    assert isinstance(got, cp.ndarray) and got.dtype == np.uint8
    np.testing.assert_array_equal(got.get(), ex.clahe_robust_scale(x))
    np.testing.assert_array_equal(got.get(), ex.robust_scale(ex.clahe(x)))
