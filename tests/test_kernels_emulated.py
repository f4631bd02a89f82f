"""The CUDA paths of CLAHE, robust scaling, z-normalize + asinh and the closings, run on the host.

kernels/clahe.cu, elementwise.cu and morphology.cu are compiled as C++ by ``cuda_emulator`` and
launched by the dispatch functions themselves (``exposure._clahe_cuda``, ``_robust_scale_cuda``,
``_znorm_asinh_cuda``, ``morphology._close_z_cuda``, ``_close_cube_cuda``: their grids, blocks,
shared memory, argument types, host-built tables and chunking) with NumPy standing in for CuPy.
They must equal the CPU path exactly as the ``gpu`` tests demand of a device. This runs the kernel
logic on every machine with g++; it cannot show what only a GPU does (warp scheduling, memory
ordering beyond barriers, NVRTC's code), which the ``gpu`` tests cover when a GPU is lent.
kernels/threshold.cu (per-slice Otsu, ``segment._otsu_cuda``) is built here too; its parity tests are
in tests/test_kernels_threshold.py.
"""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import cuda_emulator as emu
from test_kernels_exposure import _image, check_znorm_asinh
from test_kernels_morphology import _rand
from gpuheart import backend
from gpuheart import exposure as ex
from gpuheart import morphology as morph
from gpuheart import segment
from gpuheart.backend import kernel_dir

pytestmark = pytest.mark.skipif(not emu.available(), reason="g++ is not on PATH: no host emulator")

_EXTERN_C = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def _kernel_names(cu: str) -> list[str]:
    """Every ``extern "C"`` kernel of a file, including those a macro stamps out per dtype."""
    text = (kernel_dir() / cu).read_text()
    names = [n for n in _EXTERN_C.findall(text) if "##" not in n]
    for m in re.finditer(r'#define\s+(\w+)\(SUFFIX[^)]*\)[^\n]*\\\n\s*extern\s+"C"\s+__global__\s+void\s+(\w+)##SUFFIX', text):
        macro, stem = m.groups()
        names += [stem + s for s in re.findall(rf"^{macro}\((\w+)", text, re.M)]
    return names


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu")
    return {cu: emu.build(cu, _kernel_names(cu), d)
            for cu in ("clahe.cu", "elementwise.cu", "morphology.cu", "threshold.cu")}


@pytest.fixture
def dev(modules, monkeypatch):
    """``dev(fn, *args)`` runs a dispatch function with NumPy posing as ``cupy`` and the host builds as
    its RawModules; only for that call, so the CPU references a test computes never see the fake (with
    it in place every NumPy array would pass for a device array)."""
    for m in modules.values():
        m.launches.clear()
    fake = emu.fake_cupy()
    load = lambda name, *a, **k: modules[name]  # noqa: E731

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, "cupy", fake)
            mp.setattr(ex, "load_module", load)
            mp.setattr(morph, "load_module", load)
            mp.setattr(segment, "load_module", load)
            out = fn(*args, **kwargs)
        assert not backend.is_device_array(out)  # the fake is gone again
        return out

    run.launches = {cu: m.launches for cu, m in modules.items()}
    return run


def test_every_kernel_the_dispatch_names_is_built(modules):
    names = set().union(*(m.names for m in modules.values()))
    for stem in ("int_to_bins_u8_b8", "int_to_bins_u16_b16", "float_to_bins_f32_b8", "float_to_bins_f64_b16",
                 "clahe_tile_maps_b8", "clahe_tile_maps_b16", "clahe_interp_b8", "clahe_interp_b16",
                 "clahe_final", "clahe_level_counts", "clahe_final_u8", "robust_scale_f32",
                 "slice_extremes_partial_u8", "slice_extremes_final_f64",
                 "close_z_line", "close_cube"):
        assert stem in names, stem
    assert {f"znorm_asinh_{s}" for s in ex._ZNORM_SUFFIX.values()} <= names
    assert set(segment.THRESHOLD_ENTRIES) <= names


# -- CLAHE, and CLAHE fused with robust scaling ------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 64), (45, 70), (2, 40, 37), (1, 5), (33, 1)])
def test_clahe_kernels_equal_cpu(dev, dtype, shape):
    x = _image(shape, dtype, 0)
    got = dev(ex._clahe_cuda, x, 0.01, (32, 32), 256)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, ex.clahe(x))
    launched = [n for n, *_ in dev.launches["clahe.cu"]]
    assert launched[-1] == "clahe_final" and any(n.startswith("clahe_tile_maps_") for n in launched)


@pytest.mark.parametrize("kw", [dict(clip_limit=0.0), dict(clip_limit=0.5), dict(kernel_size=(8, 20)),
                                dict(kernel_size=7, nbins=64), dict(nbins=512), dict(kernel_size=1)])
def test_clahe_kernels_equal_cpu_options(dev, kw):
    # kernel_size 1 makes every pixel a tile, i.e. a block: a small image keeps the emulator quick
    x = _image((2, 37, 45) if kw.get("kernel_size") != 1 else (2, 7, 9), np.float32, 1)
    ks = ex._kernel_size(kw.get("kernel_size", 32))
    got = dev(ex._clahe_cuda, x, kw.get("clip_limit", 0.01), ks, kw.get("nbins", 256))
    np.testing.assert_array_equal(got, ex.clahe(x, **kw))


def test_clahe_kernels_constant_slice_and_nan(dev):
    const = np.full((40, 40), 7, np.uint16)
    np.testing.assert_array_equal(dev(ex._clahe_cuda, const, 0.01, (32, 32), 256), ex.clahe(const))
    bad = _image((30, 30), np.float32, 2)
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        dev(ex._clahe_cuda, bad, 0.01, (32, 32), 256)
    vol = _image((3, 20, 20), np.float32, 3)
    vol[1, 2, 2:4] = [np.inf, -np.inf]  # infinities, not NaN, in the middle slice: found by its min and max
    with pytest.raises(ValueError, match="2 NaN/Inf"):
        dev(ex._clahe_cuda, vol, 0.01, (32, 32), 256, (0.1, 99.9))
    with pytest.raises(ValueError, match="2 NaN/Inf"):
        ex.clahe(vol)  # as the CPU says


def _heavily_clipped_tile(rng):
    """A 32 x 32 tile whose histogram skimage's clip_histogram really restructures: 700 pixels in one
    bin (clip limit 10, so bin_incr 2 and upper 8), 30 bins of exactly 8 (topped up to the limit),
    20 bins of 4 (raised to 6) and the maximum."""
    vals = np.concatenate([np.zeros(700), np.repeat(np.arange(30) * 4 + 40, 8),
                           np.repeat(np.arange(20) * 3 + 170, 4), np.full(4, 255)])
    return rng.permutation(vals.astype(np.uint8)).reshape(32, 32)


def test_clahe_kernels_clip_and_redistribute_like_skimage(dev):
    # random test images never clip more than nbins pixels from a tile, so the raise / top-up
    # steps of the clip (bin_incr > 0) went unchecked: a top-up of bins > upper instead of >= upper
    # passed every test
    from skimage.exposure import equalize_adapthist

    rng = np.random.default_rng(3)
    t = _heavily_clipped_tile(rng)
    x = np.block([[t, t[::-1]], [t[:, ::-1], t.T]])
    want = equalize_adapthist(x, kernel_size=32).astype(np.float32)
    np.testing.assert_array_equal(dev(ex._clahe_cuda, x, 0.01, (32, 32), 256), want)


@pytest.mark.parametrize("lo,hi", [(0.0, 4000.0), (-0.5, 0.5)])
def test_clahe_kernels_rescale_a_float_slice_with_min_0_or_span_1(dev, lo, hi):
    # a float slice outside [0, 1] is rescaled by (x - min) / (max - min) even where min is 0 (raw
    # counts with a zero) or max - min is 1: the kernel skipping the rescale unless both differ from
    # the identity passed every test
    from skimage.exposure import equalize_adapthist

    x = (lo + np.random.default_rng(4).random((2, 40, 50)) * (hi - lo)).astype(np.float32)
    x[:, 0, 0], x[:, 1, 1] = lo, hi
    got = dev(ex._clahe_cuda, x, 0.01, (32, 32), 256)
    for z in range(2):
        want = equalize_adapthist((x[z] - np.float32(lo)) / np.float32(hi - lo), kernel_size=32)
        np.testing.assert_array_equal(got[z], want)


@pytest.mark.parametrize("dtype,power", [(np.float32, 119), (np.float64, 1015)])
def test_clahe_kernels_leave_a_span_overflowing_the_float_type_to_the_host(dev, dtype, power):
    # max - min beyond the float type: the kernel's (x - min) / (max - min) would be NaN; the host path
    # halves such a slice first (exact), so the dispatch declines it
    y = np.random.default_rng(11).integers(0, 1001, (2, 30, 40)).astype(dtype)
    x = (y - dtype(500)) * dtype(2.0 ** power)
    x[1] = y[1]   # one such slice is enough
    assert dev(ex._clahe_cuda, x, 0.01, (32, 32), 256) is None
    assert dev(ex._clahe_cuda, x, 0.01, (32, 32), 256, (0.1, 99.9)) is None


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 64), (3, 45, 61), (2, 1, 5), (6, 33, 1)])
def test_clahe_robust_scale_kernels_equal_cpu(dev, dtype, shape):
    x = _image(shape, dtype, 12)
    if len(shape) == 3 and shape[1] > 1:
        x[1] = x[1, 0, 0]  # a constant slice
    got = dev(ex._clahe_cuda, x, 0.01, (32, 32), 256, (0.1, 99.9))
    assert got.dtype == np.uint8 and got.shape == x.shape
    np.testing.assert_array_equal(got, ex.clahe_robust_scale(x))
    np.testing.assert_array_equal(got, ex.robust_scale(ex.clahe(x)))
    fsuf = "f32" if dtype == np.float32 else "f64"  # the final rescale's float type
    assert [n for n, *_ in dev.launches["clahe.cu"]][-3:] == ["clahe_level_counts", f"clahe_robust_tables_{fsuf}",
                                                             "clahe_final_u8"]
    np.testing.assert_array_equal(dev(ex._clahe_cuda, x, 0.01, (32, 32), 256, (2.0, 98.0)),
                                  ex.clahe_robust_scale(x, low=2.0, high=98.0))


def test_clahe_kernels_in_chunks(dev, monkeypatch):
    monkeypatch.setattr(ex, "_CLAHE_CHUNK_BYTES", 1)  # one slice per chunk
    x = _image((3, 40, 50), np.uint16, 3)
    np.testing.assert_array_equal(dev(ex._clahe_cuda, x, 0.01, (32, 32), 256), ex.clahe(x))
    np.testing.assert_array_equal(dev(ex._clahe_cuda, x, 0.01, (32, 32), 256, (0.1, 99.9)), ex.clahe_robust_scale(x))
    assert sum(n == "clahe_final_u8" for n, *_ in dev.launches["clahe.cu"]) == 3


# -- elementwise ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_robust_scale_kernel_equals_cpu(dev, dtype):
    x = _image((4, 41, 53), dtype, 5)
    x[1] = x[1, 0, 0]  # a constant slice -> zeros
    np.testing.assert_array_equal(dev(ex._robust_scale_cuda, x, 0.1, 99.9), ex.robust_scale(x))
    np.testing.assert_array_equal(dev(ex._robust_scale_cuda, x[2], 1, 99), ex.robust_scale(x[2], 1, 99))
    if dtype != np.uint8:
        x[3, 5, 5] = np.inf
        with pytest.raises(ValueError, match="slice 3"):
            dev(ex._robust_scale_cuda, x, 0.1, 99.9)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_znorm_asinh_kernel_equals_cpu_chain(dev, dtype, normalize):
    check_znorm_asinh(lambda *a, **k: dev(ex._znorm_asinh_cuda, *a, **k), dtype, normalize)


# -- closings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edges", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("size,iterations,shape", [(5, 5, (30, 13, 17)), (3, 1, (4, 8, 9)),
                                                   (3, 3, (1, 5, 300)), (7, 4, (23, 1, 1))])
def test_close_z_kernel_equals_cpu(dev, edges, size, iterations, shape):
    m = _rand(shape, 0.15, sum(shape))
    got = dev(morph._close_z_cuda, m, (size // 2) * iterations, edges)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, morph.close_z(m, size, iterations, z_edges=edges))


@pytest.mark.parametrize("edges", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("size,shape", [(3, (9, 19, 37)), (3, (1, 1, 1)), (3, (5, 9, 33)), (5, (7, 10, 40))])
def test_close_cube_kernel_equals_cpu(dev, edges, size, shape):
    m = _rand(shape, 0.3, sum(shape) + size)
    got = dev(morph._close_cube_cuda, m, size // 2, edges)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, morph.close_3d(m, size, z_edges=edges))
    (name, grid, block, shared), = dev.launches["morphology.cu"]
    assert name == "close_cube" and shared == morph.cube_shared_bytes(size // 2)


def test_robust_scale_kernel_in_slice_chunks(dev, monkeypatch):
    """More slices than gridDim.y may hold (65535) go in several launches; here the limit is made 3."""
    monkeypatch.setattr(ex, "MAX_GRID_YZ", 3)
    x = _image((7, 9, 11), np.float32, 6)
    x[4] = 2.0  # a constant slice in the middle chunk
    np.testing.assert_array_equal(dev(ex._robust_scale_cuda, x, 0.1, 99.9), ex.robust_scale(x))
    grids = [grid for n, grid, *_ in dev.launches["elementwise.cu"] if n == "robust_scale_f32"]
    assert [g[1] for g in grids] == [3, 3, 1]


def test_level_counts_kernel_loops_over_chunks_and_keeps_16_bit_counters_from_overflowing(modules):
    """clahe_level_counts counts chunks of 32768 pixels in shared 16-bit counters: with fewer blocks than
    chunks each block loops, a level filling a whole chunk (32768 of one value) must not carry into its
    neighbour's half-word, and the partial last chunk ends at the slice's end."""
    rng = np.random.default_rng(0)
    plane = 3 * ex._LEVEL_COUNT_CHUNK + 1234
    levels = rng.integers(0, 16384, (2, plane)).astype(np.uint16)
    levels[0, :ex._LEVEL_COUNT_CHUNK] = 4097           # one chunk of a single odd level (high half-word)
    levels[0, ex._LEVEL_COUNT_CHUNK:2 * ex._LEVEL_COUNT_CHUNK] = 4096   # and of its even neighbour
    levels[1, ::7] = 16383
    counts = np.zeros((2, 16384), np.uint32)
    kern = modules["clahe.cu"].get_function("clahe_level_counts")
    kern((2, 2), (256,), (levels, np.int64(plane), counts))   # 2 blocks per slice for 4 chunks
    for z in range(2):
        np.testing.assert_array_equal(counts[z], np.bincount(levels[z], minlength=16384))


# -- the per-slice tables clahe.cu builds on the device, against the host functions they replace ----------

def _table_grid(n, slices):
    return (max(1, -(-n // 256)), slices), (256,)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("nbins", [256, 64, 4096])
def test_bin_tables_kernel_equals_host_int_tables(modules, dtype, nbins):
    top = int(np.iinfo(dtype).max)
    rng = np.random.default_rng(nbins)
    pairs = [(0, top), (0, 0), (top, top), (7, 7), (3, 4), (0, 1), (top - 1, top)]
    pairs += [tuple(sorted(rng.integers(0, top + 1, 2))) for _ in range(6)]
    los, his = (np.array(v, dtype) for v in zip(*pairs))
    bin_dtype = np.uint8 if nbins <= 256 else np.uint16
    tsize = top + 1
    tables = np.zeros((len(pairs), tsize), bin_dtype)
    dummy, resc = np.zeros(len(pairs), dtype), np.zeros(len(pairs), np.int32)
    suffix = f"{'u8' if dtype == np.uint8 else 'u16'}_{'b8' if bin_dtype == np.uint8 else 'b16'}"
    kern = modules["clahe.cu"].get_function(f"clahe_bin_tables_{suffix}")
    kern(*_table_grid(tsize, len(pairs)), (np.concatenate([los, his]), np.int32(len(pairs)), np.int32(0),
                                          np.int32(tsize), np.uint32(1 + 16384 // nbins), tables, dummy, dummy, resc))
    for z, (lo, hi) in enumerate(pairs):
        np.testing.assert_array_equal(tables[z], ex._int_bin_table(dtype(lo), dtype(hi), dtype, nbins, bin_dtype),
                                      err_msg=str((lo, hi)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nbins", [256, 4096])
def test_bin_tables_kernel_equals_host_float_params(modules, dtype, nbins):
    eps = float(np.finfo(dtype).eps)
    pairs = [(-0.5, 3.7), (0.0, 1.0), (0.2, 0.7), (0.3, 0.3), (-2.0, -2.0), (1.5, 1.5), (0.0, 0.0), (1e-30, 0.5),
             (-1e-7, 1e-7), (0.0, 1.0 + eps), (-eps, 1.0), (1.0, 1.0), (0.5, 2.0), (-3e5, 7e6), (1e-3, 2e-3),
             (0.25, 1.0 - eps / 2), (1e-40, 0.5), (-1e-40, 0.5)]  # float32: subnormal ends
    lo_hi = [(dtype(a), dtype(b)) for a, b in pairs]
    los = np.array([a for a, _ in lo_hi], dtype)
    his = np.array([b for _, b in lo_hi], dtype)
    n = len(pairs)
    bin_dtype = np.uint8 if nbins <= 256 else np.uint16
    tables = np.zeros((n, 65536), bin_dtype)
    shift, div, resc = np.zeros(n, dtype), np.zeros(n, dtype), np.full(n, -1, np.int32)
    suffix = f"{'f32' if dtype == np.float32 else 'f64'}_{'b8' if bin_dtype == np.uint8 else 'b16'}"
    kern = modules["clahe.cu"].get_function(f"clahe_bin_tables_{suffix}")
    # slices 2.. of a longer extremes array: the kernel reads slice z at ext[z0 + z] and ext[nz + z0 + z]
    pad = np.full(2, 9, dtype)
    ext = np.concatenate([pad, los, pad, his])
    kern(*_table_grid(65536, n), (ext, np.int32(n + 2), np.int32(2), np.int32(65536),
                                  np.uint32(1 + 16384 // nbins), tables, shift, div, resc))
    for z, (lo, hi) in enumerate(lo_hi):
        sh, dv, table = ex._float_bin_params(float(lo), float(hi), dtype, nbins, bin_dtype)
        what = f"slice {z}: {lo!r}..{hi!r}"
        assert shift[z].tobytes() == dtype(sh).tobytes() and div[z].tobytes() == dtype(dv).tobytes(), what
        assert resc[z] == int(dv != 1 or sh != 0), what
        np.testing.assert_array_equal(tables[z], table, err_msg=what)


@pytest.mark.parametrize("float_dtype", [np.float32, np.float64])
def test_final_tables_kernel_equals_host(modules, float_dtype):
    pairs = [(0, 16383), (0, 0), (5, 5), (16383, 16383), (1, 2), (0, 1), (100, 9000), (3, 16382)]
    lext = np.array([a for a, _ in pairs] + [b for _, b in pairs], np.uint16)
    tables = np.zeros((len(pairs), 16384), np.float32)
    kern = modules["clahe.cu"].get_function(f"clahe_final_tables_{'f32' if float_dtype == np.float32 else 'f64'}")
    kern(*_table_grid(16384, len(pairs)), (lext, np.int32(len(pairs)), tables))
    for z, (a, b) in enumerate(pairs):
        np.testing.assert_array_equal(tables[z], ex._final_table(float(a), float(b), float_dtype), err_msg=str((a, b)))


def _histograms(n, rng):
    """Level histograms of n pixels each: the shapes _robust_level_table has branches for."""
    hs = []
    def h(levels, weights):
        c = np.zeros(16384, np.int64)
        w = np.asarray(weights, np.float64)
        k = np.floor(w / w.sum() * n).astype(np.int64)
        k[0] += n - k.sum()
        np.add.at(c, levels, k)
        hs.append(c)
    h([0], [1])                                   # one level: p_low == p_high == top -> zeros
    h([16383], [1])
    h([7, 9000], [n - 1, 1])                      # sparse bright: p_high == p_low, the top takes its place
    h([0, 16383], [1, 1])                         # two ends, equal
    h([10, 11, 12], [1, 1, 1])
    h(np.arange(16384), np.ones(16384))           # every level
    h(rng.integers(0, 16384, 50), rng.random(50))
    h(np.clip(rng.normal(8000, 2000, 400), 0, 16383).astype(int), rng.random(400))
    h([0, 1, 16382, 16383], [n // 2, 1, 1, n // 2])
    return np.stack(hs)


@pytest.mark.parametrize("float_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 1000, 4_194_304])
@pytest.mark.parametrize("q", [(0.1, 99.9), (0.0, 100.0), (50.0, 50.0), (1.0, 99.0)])
def test_robust_tables_kernel_equals_host(modules, float_dtype, n, q):
    counts = _histograms(n, np.random.default_rng(n))
    keep = counts.sum(axis=1) == n  # tiny n: a histogram whose weights all round to one level still sums to n
    counts = counts[keep]
    lo_i, hi_i, gamma = ex._linear_percentile_plan(n, list(q))
    tables = np.full((len(counts), 16384), 77, np.uint8)
    kern = modules["clahe.cu"].get_function(f"clahe_robust_tables_{'f32' if float_dtype == np.float32 else 'f64'}")
    kern((len(counts),), (ex._ROBUST_TABLE_THREADS,),
         (counts.astype(np.uint32), np.int64(lo_i[0]), np.int64(lo_i[1]), np.int64(hi_i[0]), np.int64(hi_i[1]),
          np.float64(gamma[0]), np.float64(gamma[1]), tables))
    for z, c in enumerate(counts):
        np.testing.assert_array_equal(tables[z], ex._robust_level_table(c, float_dtype, *q), err_msg=f"histogram {z}")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 4096, 70_001])
def test_slice_extremes_equal_numpy(dev, dtype, n):
    """exposure.slice_extremes (two launches of elementwise.cu) against NumPy's min and max per row: rows of
    one value, extremes in the first and last element, several partial blocks (70001 elements: 18 blocks),
    and for floats subnormals next to 0 (CuPy's -ftz comparisons would see them as 0), signed zeros, NaN
    (both ends NaN, as CuPy's min/max) and infinities."""
    rng = np.random.default_rng(n)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    x = rng.integers(-100, 100, (7, n)).astype(dtype) if np.dtype(dtype).kind in "iu" else \
        rng.standard_normal((7, n)).astype(dtype)
    x[1] = x[1, 0]                               # constant row
    x[2, 0], x[2, -1] = info.min, info.max       # extremes at both ends
    if np.dtype(dtype).kind == "f":
        tiny = np.finfo(dtype).smallest_subnormal
        x[3] = 0
        x[3, n // 2] = tiny                      # max is a subnormal, min 0
        x[4] = tiny * 3
        x[4, -1] = tiny                          # min is the smaller subnormal
        x[5, n // 3] = np.nan
        x[0, n // 2] = np.copysign(np.nan, -1)   # a NaN with the sign bit: its order key is the smallest
        x[6, 0], x[6, -1] = -np.inf, np.inf
    got = dev(ex.slice_extremes, x)
    assert got.shape == (2, 7) and got.dtype == x.dtype
    suffix = ex._EXTREMES_SUFFIX[np.dtype(dtype)]
    assert [k for k, *_ in dev.launches["elementwise.cu"]][-2:] == [f"slice_extremes_partial_{suffix}",
                                                                   f"slice_extremes_final_{suffix}"]
    with np.errstate(invalid="ignore"):
        want = np.stack([x.min(axis=1), x.max(axis=1)])
    np.testing.assert_array_equal(got, want)
    if np.dtype(dtype).kind == "f":  # the zeros' signs aside, the same bits
        assert np.isnan(got[:, 5]).all() and np.isnan(got[:, 0]).all() and got[1, 3] == np.finfo(dtype).smallest_subnormal
        assert got[0, 4] == np.finfo(dtype).smallest_subnormal
