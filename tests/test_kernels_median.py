"""kernels/median.cu: compiles for sm_80/sm_90, equals the CPU median, and the CuPy dispatch.

Three layers, so the kernel logic is checked even on machines without a GPU:

* nvcc (here when nvcc is on PATH): every kernels/*.cu builds as CI builds it, and the
  instantiations the dispatch asks NVRTC for are the ones nvcc compiles.
* host emulator (here when g++ is on PATH; tests/cuda_emulator.py): the ``median.cu`` source
  compiled as C++, each block's threads run as OS threads meeting at a real barrier
  (``__syncthreads``) and sharing the ``__shared__`` arrays; it is launched by
  ``filters._median_cuda`` itself with the exact grid, block, border maps and cval bits of
  ``filters._cuda_plan``, every argument checked against the kernel's parameter types, and must
  equal the CPU ``median`` bit for bit. A barrier that not every thread reaches times out, a race
  on the shared tile shows up as wrong values.
* ``@pytest.mark.gpu``: the real dispatch on a CUDA device against the CPU ``median``.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

import cuda_emulator
from gpuheart import filters
from gpuheart.backend import kernel_dir
from gpuheart.filters import difference_of_medians, median

KERNEL = kernel_dir() / "median.cu"
DTYPES = (np.uint8, np.uint16, np.float32)
SIZES = (3, 5, 7, 15, 31)
MODES = tuple(filters.MODES)


def _image(shape, dtype, seed=0, nan=False):
    """Random data with many ties (medians must pick among equal values), full-range extremes
    and, for float32, +-0, infinities and optionally NaN."""
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        x = rng.integers(0, 256, shape).astype(np.uint8)
        x[rng.random(shape) < 0.3] = 17
    elif dtype == np.uint16:
        x = (rng.normal(3000, 800, shape).clip(0, 65535)).astype(np.uint16)
        x[rng.random(shape) < 0.05] = 65535
        x[rng.random(shape) < 0.05] = 0
    else:
        x = rng.normal(0, 100, shape).astype(np.float32)
        x[rng.random(shape) < 0.1] = 0.0
        x[rng.random(shape) < 0.1] = -0.0
        x[rng.random(shape) < 0.02] = np.inf
        x[rng.random(shape) < 0.02] = -np.inf
        x[rng.random(shape) < 0.2] = 1.5
        if nan:
            x[rng.random(shape) < 0.3] = np.nan
            x.flat[::7] = -np.float32(np.nan)  # a negative NaN is still "largest"
    return x


def _cval(dtype):
    return {np.uint8: 200, np.uint16: 40000, np.float32: -2.5}[dtype]


def _assert_same(got, ref, dtype, size, has_nan):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)  # values (NaN == NaN, -0.0 == 0.0)
    if dtype == np.float32 and (size > 5 or has_nan):
        # The CPU goes through the same uint32 keys here, so even the bits agree (zero signs,
        # canonical NaN). Sizes 3/5 without NaN use OpenCV on the CPU: value-equal only.
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


# -- nvcc: the kernels compile as CI compiles them ---------------------------------------------

def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: cannot check that kernels/*.cu compile")
    return nvcc


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles(arch, tmp_path):
    cu = "median.cu"  # the other kernels/*.cu have their own tests
    nvcc = _nvcc()
    cubin = tmp_path / "k.cubin"
    res = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "--cubin", "-o", str(cubin),
                          str(kernel_dir() / cu)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cu} fails for {arch}:\n{res.stderr}"
    blob = cubin.read_bytes()
    # Mangled names of real device code, not an empty cubin of uninstantiated templates.
    for ctype in ("h", "t", "f"):  # unsigned char, unsigned short, float
        for size in filters._CUDA_NET_SIZES:
            assert f"_Z10median_netI{ctype}Li{size}EE".encode() in blob
        assert f"_Z12median_radixI{ctype}E".encode() in blob
    for ctype in ("h", "t"):
        for narrow in (0, 1):
            assert f"_Z11median_histI{ctype}Li{narrow}EE".encode() in blob
    assert b"_Z13median_hist16PKtPtPKiS3_iiji" in blob


def test_source_has_every_entry_point_the_dispatch_loads():
    src = KERNEL.read_text()
    # NVRTC compiles the file without headers; the explicit list is for nvcc only.
    assert "#include" not in src
    assert "#ifndef __CUDACC_RTC__" in src
    for dtype in DTYPES:
        for size in range(3, 32, 2):
            name, grid, block, extra = filters._cuda_plan((3, 64, 128), dtype, size)
            entry = f"{name}(" if "<" not in name else f"template __global__ void {name}("  # templates: instantiated
            assert entry in src, name
            assert len(extra) == (0 if size <= 5 else 1)
            if size == 3:  # median3: one thread per column, 16 rows each
                assert block == (128, 1, 1) and grid == (1, 4, 3)
            elif size <= 5 or dtype == np.float32:
                assert block == (32, 8, 1) and grid == (4, 2, 3)
            elif dtype == np.uint16 and size <= 15:  # median_hist16: 16 lanes a column, 8 columns, 64 rows
                assert name == "median_hist16"
                assert block == (128, 1, 1) and grid == (128 // 8, 1, 3)
            else:  # the sliding histogram: one thread per column, 32 rows each
                cols = {np.uint8: 64, np.uint16: 32}[dtype]
                assert name == f"median_hist<{filters._CUDA_CTYPES[np.dtype(dtype)]}, {int(size <= 15)}>"
                assert block == (cols, 1, 1)
                assert grid == (128 // cols, 2, 3)
    for define, value in (("GH_TILE_X", filters._CUDA_TILE[0]), ("GH_BLOCK_Y", filters._CUDA_BLOCK[1]),
                          ("GH_ROWS", filters._CUDA_TILE[1] // filters._CUDA_BLOCK[1]),
                          ("GH_HIST_ROWS", filters._CUDA_HIST_ROWS), ("GH_H16_ROWS", filters._CUDA_H16_ROWS),
                          ("GH_H16_WARPS", filters._CUDA_H16_BLOCK // 32), ("GH_H16_LANES", 16)):
        assert f"#define {define} {value} " in src, define
    for dtype, cols in filters._CUDA_HIST_COLS.items():
        ctype = filters._CUDA_CTYPES[dtype]
        assert f"struct HistTraits<{ctype}> {{ enum {{ COLS = {cols}," in src, ctype


# -- host emulator: the kernel source run on CPU threads (tests/cuda_emulator.py) ----------------

class _Launches:
    """What the emulated kernels were launched with, for the dispatch tests: (name, grid)."""
    launches: list = []


@pytest.fixture(scope="module")
def emulated_module(tmp_path_factory):
    if not cuda_emulator.available():
        pytest.skip("g++ is not on PATH: cannot run the kernel source on the host emulator")
    names = sorted({filters._cuda_plan((1, 64, 64), dt, size, hist)[0]
                    for dt in DTYPES for size in range(3, 32, 2) for hist in (True, False)}
                   | {"median_hist16", "median_hist<unsigned short, 1>"})
    return cuda_emulator.build("median.cu", names, tmp_path_factory.mktemp("emu"))


@pytest.fixture
def emulator(emulated_module, monkeypatch):
    """``filters._median_cuda`` itself (plan, border maps, cval bits, z chunks, ``out``) with
    NumPy standing in for CuPy and the emulator for the compiled kernel; the emulator checks every
    argument against the kernel's parameter types."""
    loaded = []
    monkeypatch.setattr(filters, "array_module", lambda x: np)
    monkeypatch.setattr(filters, "load_module",
                        lambda name, exprs: loaded.append((name, exprs)) or emulated_module)
    monkeypatch.setattr(filters, "_overlaps", np.shares_memory)

    def run(x, size, mode="reflect", cval=0, out=None):
        cval = filters._cval_as(cval, x.dtype) if mode == "constant" else 0
        n0 = len(emulated_module.launches)
        res = filters._median_cuda(x, size, mode, cval, out)
        assert loaded[-1] == ("median.cu", (filters._cuda_plan((1, 1, 1), x.dtype, size)[0],))
        for name, grid, block, shared in emulated_module.launches[n0:]:
            assert shared == 0 and grid[2] <= max(1, x.reshape((-1,) + x.shape[-2:]).shape[0])
            _Launches.launches.append((name, grid))
        return res

    return run


EMU_SHAPES = [(1, 1), (2, 7), (37, 53), (70, 33), (3, 20, 41)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernel_equals_cpu(emulator, dtype, size):
    for i, shape in enumerate(EMU_SHAPES):
        x = _image(shape, dtype, seed=i)
        _assert_same(emulator(x, size), median(x, size), dtype, size, False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernel_border_modes(emulator, dtype, mode):
    for size, shape in ((3, (2, 7)), (5, (37, 53)), (7, (5, 3)), (15, (40, 35)), (31, (9, 40))):
        x = _image(shape, dtype, seed=size)
        got = emulator(x, size, mode, _cval(dtype))
        _assert_same(got, median(x, size, mode, _cval(dtype)), dtype, size, False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_median3_with_ties_and_row_blocks(emulator, dtype):
    """median3 (3 x 3 from sorted row triples): values from {0, 1, 2, 3} make ties in almost every window,
    and heights around its 16-row blocks (15, 16, 17, 33) and widths around its 128-column blocks
    (127, 129) end blocks part-way; against the CPU median for every border mode."""
    rng = np.random.default_rng(3)
    for shape in ((15, 129), (16, 127), (17, 5), (2, 33, 130), (1, 1), (3, 2)):
        x = rng.integers(0, 4, shape).astype(dtype)
        if dtype == np.float32:
            x[..., ::5] *= -1  # -0.0 among the ties
        for mode in MODES:
            _assert_same(emulator(x, 3, mode, _cval(dtype)), median(x, 3, mode, _cval(dtype)), dtype, 3, False)
    assert filters._cuda_plan((1, 64, 64), dtype, 3)[0] == f"median3<{filters._CUDA_CTYPES[np.dtype(dtype)]}>"


@pytest.mark.parametrize("size", SIZES)
def test_emulated_kernel_nan(emulator, size):
    x = _image((2, 37, 40), np.float32, seed=5, nan=True)
    _assert_same(emulator(x, size), median(x, size), np.float32, size, True)
    got = emulator(x, size, "constant", np.nan)
    _assert_same(got, median(x, size, "constant", np.nan), np.float32, size, True)


@pytest.mark.parametrize("dtype", (np.uint8, np.uint16))
def test_emulated_sliding_histogram_follows_the_median(emulator, monkeypatch, dtype):
    """median_hist keeps its median by steps from the previous row: data where it jumps (full-range
    noise: for uint16 a new coarse bin, so a fine rebuild, almost every row), creeps (ramps) or
    never moves (constant), over several 32-row strips and a partial last one."""
    monkeypatch.setattr(filters, "_CUDA_H16", False)  # median_hist; median_hist16: its own test
    rng = np.random.default_rng(11)
    top = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:100, 0:45]
    cases = [rng.integers(0, top + 1, (100, 45)).astype(dtype),
             ((yy * 997 + xx * 13) % (top + 1)).astype(dtype),
             (top - (yy * 3 + xx) % 64).astype(dtype),
             np.full((100, 45), top // 3, dtype)]
    _Launches.launches.clear()
    for size in (7, 15):
        for x in cases:
            _assert_same(emulator(x, size, "wrap"), median(x, size, "wrap"), dtype, size, False)
    ctype = filters._CUDA_CTYPES[np.dtype(dtype)]
    assert {n for n, _ in _Launches.launches} == {f"median_hist<{ctype}, 1>"}


def test_emulated_median_hist16(emulator):
    """median_hist16 (16 lanes a column), on one slice whose row bands keep the median inside
    the fine histogram's band of coarse bins, make it leave the band every row (full-range noise),
    creep through bands, pin it at either end of the key range (where the band is clamped), or fill
    a window with one key (a counter of 225); 70 rows (two blocks of 64), 20 columns (a partial
    block), two slices. The emulator runs each warp's lanes as threads meeting at every shuffle, so
    the case is packed into few launches."""
    rng = np.random.default_rng(16)
    yy, xx = np.mgrid[0:70, 0:20]
    x = np.empty((2, 70, 20), np.int64)
    x[0] = rng.integers(0, 65536, (70, 20))
    x[0, 20:40] = 32768 + rng.integers(-300, 300, (20, 20))                              # one band
    x[0, 40:55] = np.where(rng.random((15, 20)) < 0.5, rng.integers(0, 3, (15, 20)),
                           65535 - rng.integers(0, 3, (15, 20)))                          # the ends
    x[0, 55:] = 4660                                                                     # one key
    x[1] = (yy * 300 + xx * 7 + rng.integers(0, 600, (70, 20))) % 65536                 # creeping
    x = x.astype(np.uint16)
    _Launches.launches.clear()
    for size, mode in ((7, "mirror"), (15, "constant")):
        _assert_same(emulator(x, size, mode, 65535), median(x, size, mode, 65535), np.uint16, size, False)
    assert {n for n, _ in _Launches.launches} == {"median_hist16"}


def _extreme_cases(dtype, shape, rng):
    top = np.iinfo(dtype).max
    yield rng.integers(0, top + 1, shape).astype(dtype)
    yield np.full(shape, top, dtype)
    yield np.where(rng.random(shape) < 0.5, 0, top).astype(dtype)
    yield (top - rng.integers(0, 3, shape)).astype(dtype)  # top coarse bin, top fine bins
    if dtype == np.uint16:  # the median hopping between coarse bins, keys at fine extremes 0 / 255
        hop = rng.integers(0, 4, shape) * 256 + np.where(rng.random(shape) < 0.5, 0, 255) + 255 * 256
        yield hop.clip(0, top).astype(dtype)


@pytest.mark.parametrize("size", (15, 17))  # the last 8-bit-counter size and the first 16-bit one
@pytest.mark.parametrize("dtype", (np.uint8, np.uint16))
def test_emulated_sliding_histogram_extremes(emulator, monkeypatch, dtype, size):
    """Counters at their limits (one value filling the window), keys at the ends of the range, and
    slices narrower or shorter than a block, in every border mode (median_hist; median_hist16 has its
    own test)."""
    monkeypatch.setattr(filters, "_CUDA_H16", False)
    rng = np.random.default_rng(size)
    for shape in [(1, 65), (33, 1), (5, 33), (40, 65), (2, 34, 31)]:
        for x in _extreme_cases(dtype, shape, rng):
            for mode in MODES:
                cval = np.iinfo(dtype).max if mode == "constant" else 0
                _assert_same(emulator(x, size, mode, cval), median(x, size, mode, cval), dtype, size, False)


def test_emulated_failing_histogram_kernel_falls_back_to_radix_then_host(emulated_module, monkeypatch):
    """A median_hist that fails to compile or launch costs one warning; the radix kernel takes over
    (and a failing radix kernel leaves the host)."""
    class Broken:
        def __init__(self, bad):
            self.bad = bad

        def get_function(self, name):
            if name.startswith(self.bad):
                raise RuntimeError(f"simulated NVRTC failure of {name}")
            return emulated_module.get_function(name)

    monkeypatch.setattr(filters, "array_module", lambda x: np)
    monkeypatch.setattr(filters, "_overlaps", np.shares_memory)
    monkeypatch.setattr(filters, "_CUDA_FAILED", {})
    monkeypatch.setattr(filters, "load_module", lambda name, exprs: Broken("median_hist"))
    x = _image((3, 37, 41), np.uint16, seed=4)
    n0 = len(emulated_module.launches)
    with pytest.warns(RuntimeWarning, match=r"median_hist16 failed .*simulated"):
        got = filters._median_kernels(x, 9, "reflect", 0, None)
    np.testing.assert_array_equal(got, median(x, 9))
    assert [n for n, *_ in emulated_module.launches[n0:]] == ["median_radix<unsigned short>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: straight to the radix kernel
        np.testing.assert_array_equal(filters._median_kernels(x, 9, "reflect", 0, None), median(x, 9))
    monkeypatch.setattr(filters, "load_module", lambda name, exprs: Broken("median_"))
    with pytest.warns(RuntimeWarning, match="median_radix<unsigned short> failed"):
        assert filters._median_kernels(x, 9, "reflect", 0, None) is None  # the caller filters on the host


def test_emulated_dispatch_chunks_deep_slabs_and_writes_out(emulator, monkeypatch):
    monkeypatch.setattr(filters, "MAX_GRID_YZ", 2)  # 5 slices -> launches of 2, 2, 1
    monkeypatch.setattr(filters, "_CUDA_H16", False)      # the dispatch, not a kernel, is tested here
    _Launches.launches.clear()
    x = _image((5, 40, 37), np.uint16, seed=8)
    ref = median(x, 9, "mirror")
    np.testing.assert_array_equal(emulator(x, 9, "mirror"), ref)
    gx, gy = filters._cuda_plan((1, 40, 37), np.uint16, 9)[1][:2]
    assert [g for _, g in _Launches.launches] == [(gx, gy, 2), (gx, gy, 2), (gx, gy, 1)]
    out = np.empty_like(x)
    assert emulator(x, 9, "mirror", out=out) is out
    np.testing.assert_array_equal(out, ref)
    same = x.copy()  # in place: computed aside, then copied over
    assert emulator(same, 9, "mirror", out=same) is same
    np.testing.assert_array_equal(same, ref)
    strided = np.repeat(x, 2, axis=2)[:, :, ::2]
    np.testing.assert_array_equal(emulator(strided, 9, "mirror"), ref)
    two_d = emulator(x[1, :32], 3, "constant", 7)  # 32 rows: 2 blocks of median3's 16, within the grid of 2
    assert two_d.shape == x[1, :32].shape
    np.testing.assert_array_equal(two_d, median(x[1, :32], 3, "constant", 7))


# -- GPU: the real dispatch on a CUDA device ---------------------------------------------------

def _gpu_median_no_fallback(xd, *args, **kw):
    """The CuPy median, failing (instead of silently passing) if it fell back to the host."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = median(xd, *args, **kw)
    assert not filters._CUDA_FAILED, filters._CUDA_FAILED
    return res


GPU_SHAPES = [(1, 1), (2, 7), (37, 53), (300, 257), (4, 37, 53), (3, 300, 257)]


@pytest.mark.gpu
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_gpu_median_equals_cpu(request, dtype, size, mode):
    import cupy as cp

    shapes = GPU_SHAPES
    if request.config.getoption("--fake-gpu") and filters._cuda_plan((1, 64, 64), dtype, size)[0] == "median_hist16":
        # On the host emulator a warp's lanes are threads meeting at every shuffle: the 300 x 257 slices
        # would take minutes a call. test_emulated_median_hist16 covers the kernel; a real GPU runs them all.
        shapes = [s for s in GPU_SHAPES if max(s) < 300]
    for i, shape in enumerate(shapes):
        x = _image(shape, dtype, seed=i)
        xd = cp.asarray(x)
        got = _gpu_median_no_fallback(xd, size, mode, _cval(dtype))
        assert isinstance(got, cp.ndarray) and got.device == xd.device
        _assert_same(got.get(), median(x, size, mode, _cval(dtype)), dtype, size, False)


@pytest.mark.gpu
@pytest.mark.parametrize("size", SIZES)
def test_gpu_median_nan(size):
    import cupy as cp

    x = _image((3, 61, 47), np.float32, seed=3, nan=True)
    for mode, cval in (("reflect", 0), ("constant", np.nan), ("wrap", 0)):
        got = _gpu_median_no_fallback(cp.asarray(x), size, mode, cval).get()
        _assert_same(got, median(x, size, mode, cval), np.float32, size, True)


@pytest.mark.gpu
def test_gpu_median_out_noncontiguous_and_inplace():
    import cupy as cp

    x = _image((2, 80, 90), np.uint16, seed=9)
    ref = median(x, 7)
    xd = cp.asarray(x)
    out = cp.empty_like(xd)
    assert _gpu_median_no_fallback(xd, 7, out=out) is out
    np.testing.assert_array_equal(out.get(), ref)
    # A strided view as input, and filtering in place (the kernel must not read what it writes).
    big = cp.asarray(np.ascontiguousarray(np.repeat(x, 2, axis=2)))
    np.testing.assert_array_equal(_gpu_median_no_fallback(big[:, :, ::2], 7).get(), ref)
    same = cp.asarray(x)
    assert _gpu_median_no_fallback(same, 7, out=same) is same
    np.testing.assert_array_equal(same.get(), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_difference_of_medians(dtype):
    import cupy as cp

    x = _image((3, 130, 97), dtype, seed=4)
    ref = difference_of_medians(x, 3, 15, "reflect")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = difference_of_medians(cp.asarray(x), 3, 15, "reflect")
    assert isinstance(got, cp.ndarray) and got.dtype == ref.dtype
    np.testing.assert_array_equal(got.get(), ref)


@pytest.mark.gpu
def test_gpu_large_slab_index_math():
    """2048 x 2048 slices: many blocks per slice, and (at 4 slices) offsets past 2**24."""
    import cupy as cp

    x = _image((4, 2048, 2048), np.uint8, seed=11)
    got = _gpu_median_no_fallback(cp.asarray(x), 15).get()
    for z in (0, 3):
        np.testing.assert_array_equal(got[z], median(x[z], 15))


@pytest.mark.gpu
@pytest.mark.real_gpu(reason="2.2 GB through a 3x3 median on the host emulator would take hours")
def test_gpu_offsets_past_2_to_the_31():
    """A slab of more than 2**31 voxels (520 x 2048 x 2048 uint8, 2.2 GB): the last slices, whose
    offsets only 64-bit index math reaches, are filtered and closed like the CPU does."""
    import cupy as cp

    from gpuheart import morphology as morph

    nz, tail = 520, 12
    x = cp.zeros((nz, 2048, 2048), cp.uint8)
    host_tail = _image((tail, 2048, 2048), np.uint8, seed=12)
    x[-tail:] = cp.asarray(host_tail)
    got = _gpu_median_no_fallback(x, 3)[-2:].get()
    np.testing.assert_array_equal(got, median(host_tail[-2:], 3))
    del got
    m = x > 128
    del x
    closed = morph.close_z(m, 5, 1)[-4:].get()   # reach 2 < tail: the last slices see only host_tail
    want = morph.close_z(host_tail > 128, 5, 1, z_edges=(False, True))[-4:]
    np.testing.assert_array_equal(closed, want)


@pytest.mark.gpu
@pytest.mark.real_gpu(reason="2048 x 2048 slices through the warp-level emulation would take an hour")
@pytest.mark.parametrize("h16", (True, False))
def test_gpu_uint16_histogram_kernels(monkeypatch, h16):
    """Each uint16 sliding-histogram kernel the dispatch can pick, on a device: the benchmark's slice
    (smooth structure, lines, noise), full-range noise and a creeping ramp, sizes 7 to 15, every border
    mode, equal to the CPU."""
    import cupy as cp

    spec = importlib.util.spec_from_file_location(
        "bench_filters", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_filters.py")
    bench_filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_filters)  # the benchmark's slice, without putting benchmarks/ on sys.path
    make_slice = bench_filters.make_slice

    monkeypatch.setattr(filters, "_CUDA_H16", h16)
    rng = np.random.default_rng(int(h16))
    yy, xx = np.mgrid[0:300, 0:257]
    cases = [make_slice("uint16", (2048, 2048)), rng.integers(0, 65536, (2, 300, 257)).astype(np.uint16),
             ((yy * 300 + xx * 7 + rng.integers(0, 600, (300, 257))) % 65536).astype(np.uint16)]
    want = "median_hist16" if h16 else "median_hist<unsigned short, 1>"
    assert filters._cuda_plan((1, 64, 64), np.uint16, 15)[0] == want
    for size in (7, 11, 15):
        for i, x in enumerate(cases):
            for mode in (MODES if i else ("reflect",)):
                got = _gpu_median_no_fallback(cp.asarray(x), size, mode, 65535).get()
                _assert_same(got, median(x, size, mode, 65535), np.uint16, size, False)


@pytest.mark.gpu
def test_gpu_failure_falls_back_to_host_once(monkeypatch):
    import cupy as cp

    def broken(*a, **k):
        raise RuntimeError("simulated NVRTC failure")

    monkeypatch.setattr(filters, "_median_cuda", broken)
    monkeypatch.setattr(filters, "_CUDA_FAILED", {})
    x = _image((20, 30), np.uint8)
    with pytest.warns(RuntimeWarning, match="simulated NVRTC failure"):
        got = median(cp.asarray(x), 5)
    np.testing.assert_array_equal(got.get(), median(x, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = median(cp.asarray(x), 5)  # no second warning: the host path directly
    assert isinstance(got, cp.ndarray)
