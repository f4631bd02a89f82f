"""kernels/morphology.cu (it compiles: tests/test_kernels_nvrtc.py): the algebra it relies on holds (CPU); GPU == CPU voxel for voxel.

The CPU tests replay the kernels' algorithms in NumPy (same border rules, same order of the scan),
so a failure there is a flaw in the method, not in the CUDA translation; the ``gpu`` tests check the
translation on a device.
"""

import numpy as np
import pytest
from conftest import cupy_checking_fallbacks
from scipy import ndimage as ndi

from gpuheart import morphology as morph


def _rand(shape, p, seed):
    return np.random.default_rng(seed).random(shape) < p


# -- algebra (CPU) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(3, 1), (3, 4), (5, 5), (7, 2)])
def test_iterated_line_equals_one_long_line_with_zero_border(k, n):
    # N scipy iterations of a k-line == one (N(k-1)+1)-line, for dilation and erosion, borders included
    m = _rand((40, 5, 6), 0.2, k * 10 + n)
    short, long_ = np.ones((k, 1, 1), bool), np.ones((n * (k - 1) + 1, 1, 1), bool)
    np.testing.assert_array_equal(ndi.binary_dilation(m, short, iterations=n), ndi.binary_dilation(m, long_))
    m2 = _rand((40, 5, 6), 0.8, k * 10 + n)
    np.testing.assert_array_equal(ndi.binary_erosion(m2, short, iterations=n), ndi.binary_erosion(m2, long_))


def _close_z_scan(mask, radius, pad_lo, pad_hi):
    """close_z_line replayed: one forward scan per column with 'last one' / 'last zero' indices."""
    nz = mask.shape[0]
    cols = mask.reshape(nz, -1)
    out = np.zeros_like(cols)
    never = -(1 << 30)
    last_one = np.full(cols.shape[1], never)
    last_zero = np.full(cols.shape[1], never)
    zeros = np.zeros(cols.shape[1], bool)
    for s in range(-2 * radius, nz + 2 * radius):
        xs = (cols[0] if pad_lo else zeros) if s < 0 else ((cols[-1] if pad_hi else zeros) if s >= nz else cols[s])
        last_one = np.where(xs, s, last_one)
        q = s - radius
        if q < -radius:
            continue
        d = last_one >= q - radius
        if (q < 0 and not pad_lo) or (q >= nz and not pad_hi):
            d = zeros
        last_zero = np.where(d, last_zero, q)
        p = q - radius
        if 0 <= p < nz:
            out[p] = last_zero < p - radius
    return out.reshape(mask.shape)


@pytest.mark.parametrize("edges", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("size,iterations,nz", [(5, 5, 30), (3, 1, 7), (3, 4, 3), (7, 2, 1), (5, 5, 50)])
def test_close_z_scan_equals_cpu(edges, size, iterations, nz):
    m = _rand((nz, 6, 7), 0.15, size + nz)
    m[:, 0, 0] = True  # a full column and an empty one: the border cases of the scan
    m[:, 0, 1] = False
    want = morph.close_z(m, size, iterations, z_edges=edges)
    got = _close_z_scan(m, (size // 2) * iterations, *edges)
    np.testing.assert_array_equal(got, want)


def _close_cube_direct(mask, h, pad_lo, pad_hi):
    """close_cube's rules on the whole array: clamp in y/x and at padded z faces, zeros beyond an
    unpadded z face (for the input and the dilation), direct cube OR then AND."""
    nz, ny, nx = mask.shape
    ext = np.pad(mask, ((2 * h, 2 * h), (2 * h, 2 * h), (2 * h, 2 * h)), mode="edge")
    if not pad_lo:
        ext[:2 * h] = False
    if not pad_hi:
        ext[nz + 2 * h:] = False
    w = 2 * h + 1
    win = np.lib.stride_tricks.sliding_window_view(ext, (w, w, w))
    d = win.any(axis=(3, 4, 5))  # dilation on [-h, n + h) in every axis
    if not pad_lo:
        d[:h] = False
    if not pad_hi:
        d[nz + h:] = False
    return np.lib.stride_tricks.sliding_window_view(d, (w, w, w)).all(axis=(3, 4, 5))


@pytest.mark.parametrize("edges", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("size,shape", [(3, (9, 11, 35)), (3, (1, 1, 1)), (5, (6, 4, 3)), (3, (2, 17, 5))])
def test_close_cube_rules_equal_cpu(edges, size, shape):
    m = _rand(shape, 0.3, sum(shape))
    want = morph.close_3d(m, size, z_edges=edges)
    np.testing.assert_array_equal(_close_cube_direct(m, size // 2, *edges), want)


def test_cube_shared_memory_fits_default_limit():
    assert morph.cube_shared_bytes(1) < 8 * 1024
    assert morph.cube_shared_bytes(5) <= 48 * 1024 < morph.cube_shared_bytes(6)


# -- GPU parity --------------------------------------------------------------------------------------

cp = cupy_checking_fallbacks(morph)


@pytest.mark.gpu
@pytest.mark.parametrize("edges", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("size,iterations,shape", [(5, 5, (50, 33, 47)), (3, 1, (4, 8, 9)),
                                                   (3, 3, (1, 5, 300)), (7, 4, (23, 1, 1))])
def test_close_z_gpu_equals_cpu(cp, edges, size, iterations, shape):
    m = _rand(shape, 0.15, sum(shape))
    got = morph.close_z(cp.asarray(m), size, iterations, z_edges=edges)
    assert isinstance(got, cp.ndarray) and got.dtype == bool
    np.testing.assert_array_equal(got.get(), morph.close_z(m, size, iterations, z_edges=edges))


@pytest.mark.gpu
@pytest.mark.parametrize("edges", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("size,shape", [(3, (13, 37, 71)), (3, (1, 1, 1)), (3, (5, 9, 33)),
                                        (5, (11, 20, 40)), (11, (12, 12, 40)), (13, (6, 7, 8))])
def test_close_3d_gpu_equals_cpu(cp, edges, size, shape):
    m = _rand(shape, 0.3, sum(shape) + size)
    got = morph.close_3d(cp.asarray(m), size, z_edges=edges)  # 13: beyond shared memory, host path
    assert isinstance(got, cp.ndarray) and got.dtype == bool
    np.testing.assert_array_equal(got.get(), morph.close_3d(m, size, z_edges=edges))


@pytest.mark.gpu
def test_postprocess_gpu_equals_cpu_on_slabs_and_non_bool_input(cp):
    shape = (60, 70, 90)
    m = _rand(shape, 0.08, 5)
    want = morph.postprocess(m)
    np.testing.assert_array_equal(morph.postprocess(cp.asarray(m.astype(np.uint8) * 7)).get(), want)
    h = morph.reach()
    for z0, z1 in [(0, 20), (20, 40), (40, 60)]:
        a, b = max(0, z0 - h), min(shape[0], z1 + h)
        slab = morph.postprocess(cp.asarray(m[a:b]), z_edges=(a == 0, b == shape[0]))
        np.testing.assert_array_equal(slab[z0 - a:z1 - a].get(), want[z0:z1])
    # the pipeline's streamed pass: slabs read on the host, closed on the device, NumPy back
    got = np.concatenate([o for _, _, o in morph.postprocess_slabs(lambda a, b: m[a:b], shape, 16, device="cuda")])
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_degenerate_calls_stay_on_device(cp):
    m = cp.asarray(_rand((5, 6, 7), 0.5, 1))
    for out in (morph.close_z(m, 1, 5), morph.close_z(m, 5, 0), morph.close_3d(m, 1),
                morph.close_z(cp.zeros((0, 3, 3), bool))):
        assert isinstance(out, cp.ndarray) and out.dtype == bool
    with pytest.raises(Exception):
        morph.close_z(m, 5, -1)  # the CPU reference rejects it too


@pytest.mark.gpu
def test_kernel_failure_falls_back_with_one_warning(cp, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated NVRTC failure")

    monkeypatch.setattr(morph, "load_module", broken)
    monkeypatch.setattr(morph, "_warned", set())
    m = _rand((10, 8, 9), 0.2, 2)
    with pytest.warns(RuntimeWarning, match="close_z"):
        got = morph.close_z(cp.asarray(m))
    np.testing.assert_array_equal(got.get(), morph.close_z(m))
