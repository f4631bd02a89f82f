"""GPU baselines on one 2048 x 2048 slice already on the device: CuPy / cuCIM versus gpuheart.

    python -m pytest benchmarks/bench_gpu_baselines.py --benchmark-only

Every entry skips, with the reason, on a machine without CUDA (and the cuCIM ones without cuCIM).
Inputs are the same slices the CPU benchmarks use (``bench_filters.make_slice``,
``bench_exposure.make_slice``), copied to the device once. Each timed call ends with a stream
synchronize, and one untimed call (plus synchronize) runs first, so kernel compilation, the memory
pool's first allocation and queued work from a previous test are not in the numbers.

Baselines (the project's issues name them): ``cupyx.scipy.ndimage.median_filter`` (3x3, 15x15; uint8,
uint16), ``cucim.skimage.filters.median``, ``cucim.skimage.exposure.equalize_adapthist``. Ours:
``gpuheart.filters.median`` and ``gpuheart.exposure.clahe`` on CuPy arrays (their CUDA kernels; should
one fail to compile or launch, gpuheart warns once and filters on the host, and the number then
measures that round trip: check the warnings in the pytest output), and the per-slice
chain (z-normalize -> asinh -> CLAHE -> robust scale -> difference of medians -> threshold).
Preprocessing: the fused z-normalize + asinh kernel against the same arithmetic as CuPy expressions, and
``exposure.preprocess`` against the same steps from CuPy + cuCIM's ``equalize_adapthist`` + ``cupy.percentile``.
The closings are in bench_morphology.py (against cupyx.scipy.ndimage).

Goals on an H100 (targets, not results): median 15x15 <= 0.5 ms, median 3x3 <= 0.05 ms,
CLAHE <= 0.5 ms, per-slice chain <= 3 ms.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
SIZES = (3, 15)
DTYPES = ("uint8", "uint16")
GOALS_MS = {"median 3x3": 0.05, "median 15x15": 0.5, "clahe": 0.5, "slice chain": 3.0}

pytestmark = pytest.mark.gpu


def _sibling(name: str):
    """bench_filters / bench_exposure, loaded by path (the same input slices as the CPU benchmarks)."""
    key = f"_gpuheart_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[key] = mod
    return sys.modules[key]


def _cuda_or_skip():
    from gpuheart.backend import _cupy, cuda_available

    if _cupy() is None:
        pytest.skip("GPU baseline: CuPy is not installed (pip install 'gpuheart[cuda13]')")
    if not cuda_available():
        pytest.skip("GPU baseline: CuPy found no CUDA device (cupy.is_available() is False)")
    import cupy as cp

    return cp


def _cucim_or_skip(module: str):
    _cuda_or_skip()
    try:
        return __import__(f"cucim.skimage.{module}", fromlist=["_"])
    except Exception as err:  # ImportError, or a CUDA library mismatch
        pytest.skip(f"GPU baseline: cuCIM is not usable ({type(err).__name__}: {err})")


def _timed_on_device(benchmark, f, *args, **kwargs):
    """``benchmark`` a device function, synchronizing the stream after every call (and a warm-up)."""
    import cupy as cp

    stream = cp.cuda.get_current_stream()

    def call():
        r = f(*args, **kwargs)
        stream.synchronize()
        return r

    cp.cuda.Device().synchronize()
    call()  # compile kernels, fill the memory pool
    return benchmark(call)


@pytest.fixture(scope="module", params=DTYPES)
def device_slice(request):
    cp = _cuda_or_skip()
    x = cp.asarray(_sibling("bench_filters").make_slice(request.param))
    cp.cuda.Device().synchronize()
    return x


@pytest.fixture(scope="module")
def device_slice_clahe():
    cp = _cuda_or_skip()
    x = cp.asarray(_sibling("bench_exposure").make_slice(np.uint16))
    cp.cuda.Device().synchronize()
    return x


# -- median --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_median_cupyx(benchmark, device_slice, size):
    from cupyx.scipy.ndimage import median_filter

    benchmark.group = f"gpu median {device_slice.dtype.name} {size}x{size}"
    _timed_on_device(benchmark, median_filter, device_slice, size=size, mode="reflect")


@pytest.mark.parametrize("size", SIZES)
def test_median_cucim(benchmark, device_slice, size):
    filters = _cucim_or_skip("filters")
    import cupy as cp

    benchmark.group = f"gpu median {device_slice.dtype.name} {size}x{size}"
    footprint = cp.ones((size, size), dtype=bool)
    _timed_on_device(benchmark, filters.median, device_slice, footprint, mode="reflect")


@pytest.mark.parametrize("size", SIZES)
def test_median_gpuheart(benchmark, device_slice, size):
    from gpuheart.filters import median

    benchmark.group = f"gpu median {device_slice.dtype.name} {size}x{size}"
    benchmark.extra_info["goal_ms_h100"] = GOALS_MS[f"median {size}x{size}"]
    _timed_on_device(benchmark, median, device_slice, size)


def test_median_gpuheart_radix(benchmark, device_slice, monkeypatch):
    """The per-pixel radix kernel that integer sizes >= 7 used before the sliding histogram, kept
    for float32: the two side by side on the same device say what the histogram kernel gained."""
    from gpuheart import filters

    monkeypatch.setattr(filters, "_CUDA_HIST_COLS", {})
    monkeypatch.setattr(filters, "_CUDA_H16", False)
    benchmark.group = f"gpu median {device_slice.dtype.name} 15x15"
    assert filters._cuda_plan((1, 64, 64), device_slice.dtype, 15)[0].startswith("median_radix<")
    _timed_on_device(benchmark, filters.median, device_slice, 15)


def test_median_gpuheart_hist_thread(benchmark, device_slice, monkeypatch):
    """uint16 15 x 15 with the thread-per-column sliding histogram (median_hist) that median_hist16
    (16 lanes a column, test_median_gpuheart) replaced, side by side with it."""
    from gpuheart import filters

    if device_slice.dtype != np.uint16:
        pytest.skip("median_hist16 is the uint16 kernel")
    monkeypatch.setattr(filters, "_CUDA_H16", False)
    benchmark.group = "gpu median uint16 15x15"
    assert filters._cuda_plan((1, 64, 64), device_slice.dtype, 15)[0] == "median_hist<unsigned short, 1>"
    _timed_on_device(benchmark, filters.median, device_slice, 15)


def test_median_gpuheart_net3(benchmark, device_slice, monkeypatch):
    """The 3 x 3 forgetful-selection kernel (median_net<T, 3>) that median3 replaced, side by side with it."""
    from gpuheart import filters

    monkeypatch.setattr(filters, "_CUDA_ROWS3", False)
    benchmark.group = f"gpu median {device_slice.dtype.name} 3x3"
    assert filters._cuda_plan((1, 64, 64), device_slice.dtype, 3)[0].startswith("median_net<")
    _timed_on_device(benchmark, filters.median, device_slice, 3)


SLAB = 16  # slices per pass-2 slab in the pipeline (slab_size)


@pytest.mark.parametrize("size", SIZES)
def test_median_gpuheart_slab(benchmark, device_slice, size):
    """One call on a 16-slice slab, as pass 2 calls it: per slice, the launch and Python overhead of a
    single-slice call (tens of microseconds) is shared by 16 slices. Time per slice = time / 16."""
    import cupy as cp

    from gpuheart.filters import median

    slab = cp.ascontiguousarray(cp.broadcast_to(device_slice, (SLAB,) + device_slice.shape))
    benchmark.group = f"gpu median {device_slice.dtype.name} {size}x{size}, {SLAB}-slice slab (per call)"
    benchmark.extra_info["slices"] = SLAB
    benchmark.extra_info["goal_ms_h100_per_slice"] = GOALS_MS[f"median {size}x{size}"]
    _timed_on_device(benchmark, median, slab, size)


# -- CLAHE ----------------------------------------------------------------------------------------

def test_clahe_cucim(benchmark, device_slice_clahe):
    exposure = _cucim_or_skip("exposure")

    benchmark.group = "gpu clahe uint16 2048 (kernel 32, clip 0.01)"
    _timed_on_device(benchmark, exposure.equalize_adapthist, device_slice_clahe, kernel_size=32, clip_limit=0.01)


def test_clahe_gpuheart(benchmark, device_slice_clahe):
    from gpuheart.exposure import clahe

    benchmark.group = "gpu clahe uint16 2048 (kernel 32, clip 0.01)"
    benchmark.extra_info["goal_ms_h100"] = GOALS_MS["clahe"]
    _timed_on_device(benchmark, clahe, device_slice_clahe, clip_limit=0.01, kernel_size=32)


# -- the per-slice chain (paper steps 1, 2 and 4 on one slice) -----------------------------------

def test_slice_chain_gpuheart(benchmark, device_slice_clahe):
    from gpuheart import exposure, filters, segment

    x = device_slice_clahe[None]
    znorm = exposure.ZNorm.from_stats([exposure.slice_stats(device_slice_clahe.get(), z=0)])

    def chain():
        pre = exposure.preprocess(x, znorm, 0)
        dom = filters.difference_of_medians(pre, 3, 15)
        return dom > segment.dom_thresholds(dom, "otsu")  # as the pipeline: histograms on the device

    benchmark.group = "gpu per-slice chain uint16 2048"
    benchmark.extra_info["goal_ms_h100"] = GOALS_MS["slice chain"]
    _timed_on_device(benchmark, chain)


def test_slice_chain_gpuheart_slab(benchmark, device_slice_clahe):
    """The chain on a 16-slice slab, as pass 2 runs it (per slice = time / 16)."""
    import cupy as cp

    from gpuheart import exposure, filters, segment

    x = cp.ascontiguousarray(cp.broadcast_to(device_slice_clahe, (SLAB,) + device_slice_clahe.shape))
    znorm = exposure.ZNorm.from_stats([exposure.slice_stats(device_slice_clahe.get(), z=z) for z in range(SLAB)])

    def chain():
        pre = exposure.preprocess(x, znorm, 0)
        dom = filters.difference_of_medians(pre, 3, 15)
        return dom > segment.dom_thresholds(dom, "otsu")

    benchmark.group = f"gpu per-slice chain uint16 2048, {SLAB}-slice slab (per call)"
    benchmark.extra_info["slices"] = SLAB
    benchmark.extra_info["goal_ms_h100_per_slice"] = GOALS_MS["slice chain"]
    _timed_on_device(benchmark, chain)


# -- preprocessing (paper steps 1-2): gpuheart's fused kernels against what CuPy + cuCIM give -----------

def _znorm_for(device_slice_clahe):
    from gpuheart import exposure

    return exposure.ZNorm.from_stats([exposure.slice_stats(device_slice_clahe.get(), z=0)])


def test_znorm_asinh_gpuheart(benchmark, device_slice_clahe):
    """elementwise.cu's znorm_asinh kernel: z-normalization and asinh in one pass."""
    from gpuheart import exposure

    x, znorm = device_slice_clahe[None], _znorm_for(device_slice_clahe)
    benchmark.group = "gpu z-normalize + asinh uint16 2048"
    _timed_on_device(benchmark, exposure._znorm_asinh_cuda, x, znorm, 0, True, znorm.scale)


def test_znorm_asinh_cupy(benchmark, device_slice_clahe):
    """The same arithmetic as separate CuPy expressions (what ZNorm.apply and asinh_stretch do on CuPy)."""
    from gpuheart import exposure

    x, znorm = device_slice_clahe[None], _znorm_for(device_slice_clahe)
    benchmark.group = "gpu z-normalize + asinh uint16 2048"
    _timed_on_device(benchmark, lambda: exposure.asinh_stretch(znorm.apply(x, 0) - np.float32(znorm.background),
                                                               znorm.scale))


def test_preprocess_gpuheart(benchmark, device_slice_clahe):
    """Steps 1-2 as the pipeline runs them: fused z-norm + asinh, then CLAHE fused with robust scaling."""
    from gpuheart import exposure

    x, znorm = device_slice_clahe[None], _znorm_for(device_slice_clahe)
    benchmark.group = "gpu preprocessing uint16 2048 (z-norm, asinh, CLAHE, robust scale)"
    _timed_on_device(benchmark, exposure.preprocess, x, znorm, 0)


def test_preprocess_cupy_cucim(benchmark, device_slice_clahe):
    """The same steps from off-the-shelf parts: CuPy arithmetic, cuCIM's equalize_adapthist, cupy.percentile."""
    cu_exposure = _cucim_or_skip("exposure")
    import cupy as cp

    from gpuheart import exposure

    x, znorm = device_slice_clahe, _znorm_for(device_slice_clahe)

    def chain():
        s = exposure.asinh_stretch(znorm.apply(x, 0) - np.float32(znorm.background), znorm.scale)
        lo, hi = s.min(), s.max()
        c = cu_exposure.equalize_adapthist((s - lo) / (hi - lo), kernel_size=32, clip_limit=0.01)
        p_lo, p_hi = cp.percentile(c, [0.1, 99.9])
        return (cp.clip((c - p_lo) / (p_hi - p_lo), 0, 1) * 255).astype(cp.uint8)

    benchmark.group = "gpu preprocessing uint16 2048 (z-norm, asinh, CLAHE, robust scale)"
    _timed_on_device(benchmark, chain)


# -- marching cubes of a mask ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sparse_mask():
    _cuda_or_skip()
    return _sibling("bench_mesh_stage").sparse((16, 2048, 2048))


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_marching_cubes_mask_gpuheart(benchmark, sparse_mask, device):
    """The mesh stage's marching cubes of a vessel-like mask (0.4 % inside), host mask in, host mesh out: on
    the device (slabs uploaded, the mesh brought back) and the same array operations on the host."""
    from gpuheart import mesh

    benchmark.group = "marching cubes, 16x2048x2048 sparse mask (host in, host out)"
    mesh.marching_cubes_slabs(sparse_mask[:2], (2, *sparse_mask.shape[1:]), 16, device=device)   # tables, kernels
    benchmark.pedantic(mesh.marching_cubes_slabs, args=(sparse_mask, sparse_mask.shape, 16),
                       kwargs={"device": device}, rounds=3, iterations=1)


def test_marching_cubes_mask_skimage(benchmark, sparse_mask):
    """The baseline: skimage's marching cubes of the whole zero-padded volume as float32 (what gpuheart ran
    for masks until 2026-11-27, slab by slab)."""
    from skimage import measure

    benchmark.group = "marching cubes, 16x2048x2048 sparse mask (host in, host out)"
    benchmark.pedantic(lambda m: measure.marching_cubes(np.pad(m, 1).astype(np.float32), 0.5), args=(sparse_mask,),
                       rounds=3, iterations=1)
