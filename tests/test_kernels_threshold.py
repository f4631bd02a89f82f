"""kernels/threshold.cu: per-slice Otsu thresholds of integer slabs on the device (``segment._otsu_cuda``).

They must equal the host path (``segment.threshold_slices`` of a NumPy slab, itself skimage's
``threshold_otsu`` of each slice) bit for bit, and reach the thresholds without a device->host copy.
The parity cases run three ways: on the host emulator with NumPy posing as CuPy (always, with g++), and
as ``gpu`` tests through the public API on a device or on the fake GPU (``pytest -m gpu --fake-gpu``),
where ``cupyx.allow_synchronize(False)`` turns any device->host read into an error.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import cupy_checking_fallbacks, no_device_sync
from skimage.filters import threshold_otsu

import cuda_emulator as emu
from gpuheart import segment
from gpuheart.backend import kernel_dir

needs_gxx = pytest.mark.skipif(not emu.available(), reason="g++ is not on PATH: no host emulator")


# -- the cases -----------------------------------------------------------------------------------------

def _dom_like(rng, shape, sigma=6.0, vessels=0.02):
    """A difference of medians of uint8 slices: int16 noise about 0 with sparse bright structures."""
    d = rng.normal(0, sigma, shape)
    d[rng.random(shape) < vessels] += rng.integers(40, 200)
    return np.clip(np.round(d), -255, 255).astype(np.int16)


def _from_counts(rng, lo, counts, shape):
    """One slice holding ``counts[i]`` pixels of value ``lo + i``, shuffled."""
    v = np.repeat(np.arange(lo, lo + len(counts)), counts)
    rng.shuffle(v)
    return v.reshape((1,) + shape).astype(np.int16)


def _cases():
    rng = np.random.default_rng(2026)
    c = {}
    c["dom_random"] = _dom_like(rng, (4, 37, 53))
    sparse = _dom_like(rng, (3, 64, 48), sigma=2.0, vessels=0.0)
    sparse[0, 20:22, :] = 180           # a thin bright line
    sparse[1, ::9, ::7] = 255           # scattered bright points
    sparse[2, 5:9, 5:9] = 90
    c["dom_sparse"] = sparse
    const = _dom_like(rng, (5, 20, 30))
    const[0] = 0
    const[2] = -7
    const[4] = 255
    c["constant_slices"] = const
    single = np.zeros((3, 25, 26), np.int16)
    single[0, 3, 4] = 17                # one non-zero pixel
    single[1, 10, 10] = -3
    single[2] = 4                       # all one non-zero value
    c["single_nonzero"] = single
    two = np.full((3, 16, 21), -3, np.int16)
    two[0, :, 10:] = 9                  # two values with a gap: every cut in the gap ties, the first wins
    two[1, :5] = 200
    two[2, 0, 0] = -250
    c["two_valued"] = two
    c["all_negative"] = (_dom_like(rng, (3, 30, 31)) - 300).astype(np.int16)
    ext = rng.integers(-40, 40, (4, 33, 40)).astype(np.int16)
    ext[0, 0, 0], ext[0, -1, -1] = -32768, 32767     # span 65536: global atomics
    ext[1, 1, :5] = 32767
    ext[1, 2, :3] = -32768
    ext[2, 0, 0], ext[2, 0, 1] = -40, 8151           # span 8192: the widest counted in shared memory
    ext[3, 0, 0], ext[3, 0, 1] = -4097, 4096         # span 8194: the first beyond
    c["int16_extremes"] = ext
    ranges = np.empty((6, 19, 23), np.int16)
    for i, (a, b) in enumerate([(0, 1), (-1, 0), (-255, 255), (100, 140), (-5000, 7000), (-30000, 30000)]):
        ranges[i] = rng.integers(a, b + 1, ranges.shape[1:])
    c["ranges_per_slice"] = ranges
    c["uint8"] = rng.integers(0, 256, (3, 40, 41)).astype(np.uint8)
    u8 = np.full((2, 30, 30), 12, np.uint8)
    u8[0, :3] = 255
    u8[1, 4:9, 4:9] = 0
    c["uint8_sparse"] = u8
    c["int8"] = rng.integers(-128, 128, (2, 29, 31)).astype(np.int8)
    c["uint16_full"] = rng.integers(0, 65536, (2, 35, 37)).astype(np.uint16)
    c["uint16_camera"] = (rng.normal(400, 30, (3, 40, 44)) + (rng.random((3, 40, 44)) < 0.01) * 3000).astype(np.uint16)
    c["shape_1x1"] = np.array([[[5]], [[-5]]], np.int16)
    c["shape_row"] = _dom_like(rng, (3, 1, 97))
    c["shape_column"] = _dom_like(rng, (2, 61, 1))
    c["several_blocks"] = _dom_like(rng, (2, 150, 131))   # > 16384 pixels: two histogram blocks per slice
    # histograms (found by search) whose first maximum moves if weight1 * weight2 is not rounded to float32
    # before the float64 multiply, or if the class means are taken of value - min instead of the values
    c["float32_weight_product_a"] = _from_counts(rng, 62, [7987, 1, 3522], (10, 1151))
    c["float32_weight_product_b"] = _from_counts(rng, -97, [14006, 7, 17360], (137, 229))
    c["means_of_values_a"] = _from_counts(rng, 60, [2750, 1056, 2750], (44, 149))
    c["means_of_values_b"] = _from_counts(rng, -207, [100, 13804, 100], (12, 1167))
    return c


CASES = _cases()


def _reference(slab: np.ndarray) -> np.ndarray:
    """skimage's threshold_otsu of each slice (a constant slice: its value), also the host path's answer."""
    want = np.array([float(s.min()) if s.min() == s.max() else float(threshold_otsu(s)) for s in slab])
    np.testing.assert_array_equal(segment.threshold_slices(slab, "otsu").ravel(), want)
    return want


def test_cases_cover_both_counting_paths_and_ties():
    spans = [int(s.max()) - int(s.min()) + 1 for s in CASES["int16_extremes"]]
    assert spans == [65536, 65536, 8192, 8194]
    # the two-valued slices tie on every cut in their gap: only the first maximum gives the low value
    assert [float(threshold_otsu(s)) for s in CASES["two_valued"]] == [-3.0, -3.0, -250.0]


# -- the kernel source (it compiles under nvcc and NVRTC: tests/test_kernels_nvrtc.py) --------------

def test_thread_count_matches_the_kernel():
    text = (kernel_dir() / "threshold.cu").read_text()
    assert re.search(r"#define OTSU_THREADS (\d+)", text)[1] == str(segment._OTSU_THREADS)


# -- the kernels on the host emulator (no GPU, no --fake-gpu needed) ------------------------------------

@pytest.fixture(scope="module")
def threshold_module(tmp_path_factory):
    from test_kernels_emulated import _kernel_names

    return emu.build("threshold.cu", _kernel_names("threshold.cu"), tmp_path_factory.mktemp("emu-threshold"))


@pytest.fixture(scope="module")
def extremes_module(tmp_path_factory):
    """elementwise.cu, whose slice_extremes kernels give the slices' offsets and spans."""
    from test_kernels_emulated import _kernel_names

    return emu.build("elementwise.cu", _kernel_names("elementwise.cu"), tmp_path_factory.mktemp("emu-extremes"))


@pytest.fixture
def emulated(threshold_module, extremes_module, monkeypatch):
    """``emulated(slab)``: ``segment._otsu_cuda`` with NumPy posing as cupy and the host builds as its modules."""
    from gpuheart import exposure

    threshold_module.launches.clear()

    def run(slab):
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, "cupy", emu.fake_cupy())
            mp.setattr(segment, "load_module", lambda name, *a, **k: threshold_module)
            mp.setattr(exposure, "load_module", lambda name, *a, **k: extremes_module)
            return segment._otsu_cuda(slab)

    run.launches = threshold_module.launches
    return run


@needs_gxx
@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_kernels_equal_skimage(emulated, case):
    slab = CASES[case]
    got = emulated(slab)
    assert got.dtype == np.float64 and got.shape == (slab.shape[0], 1, 1)
    np.testing.assert_array_equal(got.ravel(), _reference(slab))
    names = [n for n, *_ in emulated.launches]
    suffix = segment._OTSU_SUFFIX[slab.dtype]
    assert names == [f"otsu_hist_{suffix}", f"otsu_threshold_{suffix}"]


@needs_gxx
def test_emulated_kernels_in_slice_chunks_and_on_views(emulated, monkeypatch):
    """More slices than one counts buffer holds go in several launch pairs; a strided view is copied first."""
    slab = np.concatenate([CASES["ranges_per_slice"], CASES["int16_extremes"][:, :19, :23]])
    slab[-1, 0, 1:3] = [-32768, 32767]
    monkeypatch.setattr(segment, "_OTSU_COUNTS_BYTES", 4 * 65536 * 4)   # 4 slices of 16-bit counts
    got = emulated(slab[:, ::2, 1:])
    np.testing.assert_array_equal(got.ravel(), _reference(slab[:, ::2, 1:]))
    grids = [grid for n, grid, *_ in emulated.launches if n.startswith("otsu_hist")]
    assert [g[1] for g in grids] == [4, 4, 2]


@needs_gxx
def test_emulated_histogram_blocks_split_large_slices(emulated):
    slab = CASES["several_blocks"]
    np.testing.assert_array_equal(emulated(slab).ravel(), _reference(slab))
    (name, grid, block, _), _ = emulated.launches
    assert grid[:2] == (2, 2) and block[0] == segment._OTSU_THREADS


def test_out_of_scope_inputs_are_left_to_the_host(monkeypatch):
    """int32, bool, floats, empty slabs and planes beyond 2**24 pixels (float32 weights stop being exact)."""
    import types

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace())   # never reached
    for slab in (np.zeros((2, 3, 4), np.int32), np.zeros((2, 3, 4), bool), np.zeros((2, 3, 4), np.float32),
                 np.zeros((0, 3, 4), np.int16), np.zeros((2, 0, 4), np.uint8)):
        with monkeypatch.context() as mp:
            mp.setattr(segment, "load_module", lambda *a, **k: pytest.fail("a kernel was loaded"))
            assert segment._otsu_cuda(slab) is None
    monkeypatch.setattr(segment, "_OTSU_MAX_PLANE", 11)
    monkeypatch.setattr(segment, "load_module", lambda *a, **k: pytest.fail("a kernel was loaded"))
    assert segment._otsu_cuda(np.zeros((2, 3, 4), np.int16)) is None


# -- GPU (or the fake GPU): the public API, bit for bit, without a device->host read ------------------

cp = cupy_checking_fallbacks(segment)


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_thresholds_equal_skimage_without_a_host_read(cp, case):
    slab = CASES[case]
    want = _reference(slab)
    d = cp.asarray(slab)
    with no_device_sync():
        t = segment.threshold_slices(d, "otsu")
        floored = segment.dom_thresholds(d, "otsu")
        mask = d > floored
    assert isinstance(t, cp.ndarray) and t.dtype == np.float64 and t.shape == (slab.shape[0], 1, 1)
    np.testing.assert_array_equal(t.get().ravel(), want)
    np.testing.assert_array_equal(floored.get().ravel(), np.maximum(want, 0))
    np.testing.assert_array_equal(mask.get(), slab > np.maximum(want, 0)[:, None, None])


@pytest.mark.gpu
def test_gpu_host_read_detector_sees_the_host_path(cp):
    """The check above means something: the host path (int32 values) does read from the device."""
    import cupyx

    d = cp.asarray(CASES["dom_random"].astype(np.int32))
    with pytest.raises(cupyx.DeviceSynchronized):
        with no_device_sync():
            segment.threshold_slices(d, "otsu")


@pytest.mark.gpu
def test_gpu_other_inputs_keep_the_host_path(cp):
    slab = CASES["dom_random"]
    for v in (slab.astype(np.int32), slab.astype(np.float32)):
        t = segment.threshold_slices(cp.asarray(v), "otsu")
        assert isinstance(t, cp.ndarray)
        np.testing.assert_array_equal(t.get(), segment.threshold_slices(v, "otsu"))
    for method in ("sigma", "noise", 12.5):
        np.testing.assert_array_equal(segment.threshold_slices(cp.asarray(slab), method, 3.0).get(),
                                      segment.threshold_slices(slab, method, 3.0))


@pytest.mark.gpu
def test_gpu_kernel_failure_falls_back_with_one_warning(cp, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated NVRTC failure")

    monkeypatch.setattr(segment, "load_module", broken)
    monkeypatch.setattr(segment, "_warned", set())
    slab = CASES["dom_sparse"]
    with pytest.warns(RuntimeWarning, match="otsu"):
        got = segment.threshold_slices(cp.asarray(slab), "otsu")
    np.testing.assert_array_equal(got.get().ravel(), _reference(slab))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once only
        segment.threshold_slices(cp.asarray(slab), "otsu")


def test_backend_owns_the_device_question():
    """segment.py asks gpuheart.backend whether an array is on the device; it never imports cupy at the top."""
    src = Path(segment.__file__).read_text()
    assert not re.search(r"^import cupy|^from cupy", src, re.M)
