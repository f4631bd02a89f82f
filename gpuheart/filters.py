"""Median filters and the difference of medians (DoM) that highlights vessels.

:func:`median` is the reference definition that the CUDA kernels must reproduce: a 2D
``size x size`` median on every (y, x) slice, bit-exact against
``scipy.ndimage.median_filter(slice, size=size, mode=mode, cval=cval)``. Borders are realized
by padding (scipy's ``reflect`` is NumPy's ``symmetric``, ``mirror`` is ``reflect``, ``nearest``
is ``edge``; NumPy's repeated padding agrees with scipy even for pads wider than the image),
then a filter that only computes the valid region.

Implementations, picked by dtype and size (all exact, since a median only selects a value):

* uint8, any size, and uint16/float32 sizes 3 and 5: OpenCV ``medianBlur`` (exact, checked
  against scipy in the tests); its replicate border is wrong only in a ``size // 2``-wide frame,
  which is recomputed from thin strips padded our way.
* uint16, sizes >= 7: a numba Huang sliding-histogram median (zig-zag over row bands, one
  band per task) with a two-level histogram: 65536 fine bins and 2048 coarse bins of 32 values.
  Per pixel: 2*size histogram updates, a few coarse steps following the median, and a scan of
  the fine bins of one coarse bin from its nearer end (in rank). 32-value coarse bins measured faster than the classic 256 x 256 split
  on noisy 16-bit data, where the median moves by ~100 levels from one pixel to the next.
* float32, sizes >= 7: values are replaced by their rank among the slice's distinct values; up
  to 65536 distinct values go through the uint16 path, otherwise a per-pixel selection on
  order-preserving uint32 keys.

CuPy input runs ``kernels/median.cu`` on its device (see "CUDA dispatch" below): forgetful
selection in registers for sizes 3 and 5; for 7..31 a sliding histogram per output column
(uint8; uint16 with coarse and fine byte histograms) or per-pixel bitwise radix selection
(float32); the border gathered through the same ``_index_map`` as here, floats ordered by the
same uint32 keys.

scipy's own ``reflect`` mode reads memory outside the image when the window is much larger
than the image (e.g. a 2 x 7 slice with size >= 17; scipy 1.17), so its answer there is
garbage; ours follows scipy's documented extension (NumPy ``symmetric``) in every case.

NaN (float32): every NaN sorts above +inf, as in ``np.sort``, so a window whose upper half is
NaN gives NaN. scipy has no defined order for NaN, so compare to it only on NaN-free input.
``-0.0`` sorts just below ``+0.0``; both compare equal, so only the sign of a zero may differ
from scipy, never the value.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
from numba import njit, prange

from .backend import MAX_GRID_YZ, array_module, is_device_array, is_device_oom, load_module, native_byte_order, to_host

MODES = {"reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap",
         "constant": "constant"}
DTYPES = (np.uint8, np.uint16, np.float32)
MIN_SIZE, MAX_SIZE = 3, 31


# -- argument checks --------------------------------------------------------------------------

def _check_size(size, name: str = "size") -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{name} must be an odd integer in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    size = int(size)
    if size % 2 == 0 or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"{name} must be an odd integer in {MIN_SIZE}..{MAX_SIZE}, got {size}")
    return size


def _check_image(x) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"median supports uint8, uint16 and float32 images, got {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"expected a (y, x) slice or a (z, y, x) slab, got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"cannot filter an empty image of shape {x.shape}")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    return MODES[mode]


def _cval_as(cval, dtype):
    """``cval`` in the image dtype; refuse values the dtype cannot hold (scipy's C cast is UB)."""
    v = np.asarray(cval, dtype=np.float64)
    if v.ndim != 0 or not np.isfinite(v) and dtype != np.float32:
        raise ValueError(f"cval must be a finite scalar for {np.dtype(dtype)}, got {cval!r}")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if v != np.floor(v) or not info.min <= v <= info.max:
            raise ValueError(f"cval {cval!r} is not representable in {np.dtype(dtype)}")
    return np.asarray(v, dtype=dtype)[()]


def _check_out(out, shape, dtype):
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != dtype:
        got = (getattr(out, "shape", None), getattr(out, "dtype", None))
        raise ValueError(f"out must be a NumPy array of shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                         f"got shape/dtype {got}")
    if not out.flags.writeable:  # else OpenCV (sizes 3, 5) fails with its own overload-resolution error
        raise ValueError("out must be writeable, got a read-only array")
    return out


def pad(x2d: np.ndarray, radius: int, mode: str = "reflect", cval=0) -> np.ndarray:
    """``x2d`` padded by ``radius`` on every side the way scipy.ndimage extends it for ``mode``."""
    npmode = _check_mode(mode)
    if npmode == "constant":
        return np.pad(x2d, radius, mode="constant", constant_values=_cval_as(cval, x2d.dtype))
    return np.pad(x2d, radius, mode=npmode)


# -- public API -------------------------------------------------------------------------------

def median(x, size: int, mode: str = "reflect", cval=0, out=None):
    """Median of every ``size x size`` window of each (y, x) slice (never across z).

    Parameters
    ----------
    x : (y, x) or (z, y, x) array of uint8, uint16 or float32, NumPy or CuPy. CuPy arrays are
        filtered on their device by ``kernels/median.cu`` (same answer); should that kernel fail
        to compile or launch, a warning is given once and they are filtered on the host.
    size : odd window side, 3..31.
    mode : ``"reflect" | "nearest" | "mirror" | "wrap" | "constant"``, scipy.ndimage's meaning.
    cval : border value for ``mode="constant"``; must be representable in ``x.dtype``.
    out : optional array of ``x``'s shape and dtype to write into.

    Returns
    -------
    Array of ``x``'s shape and dtype, equal to ``scipy.ndimage.median_filter`` applied slice by
    slice with the same ``size``, ``mode`` and ``cval``.
    """
    if is_device_array(x):
        return _median_device(x, size, mode, cval, out)
    x = native_byte_order(np.asarray(x))
    _check_image(x)
    size = _check_size(size)
    _check_mode(mode)
    cval = _cval_as(cval, x.dtype) if mode == "constant" else cval
    out = _check_out(out, x.shape, x.dtype)
    if np.shares_memory(out, x):  # in place: the border pass still reads the input
        x = x.copy()
    if x.ndim == 2:
        _median2d(x, size, mode, cval, out)
    else:
        for z in range(x.shape[0]):
            _median2d(x[z], size, mode, cval, out[z])
    return out


def difference_of_medians(x, small: int = 3, large: int = 15, mode: str = "reflect", cval=0):
    """``median(x, small) - median(x, large)`` as a signed array.

    uint8 gives int16, uint16 gives int32, float32 gives float32, so no difference wraps.
    Bright thin structures (vessels) are positive; broad background is near 0.
    """
    xp = array_module(x)
    if xp is np:
        x = native_byte_order(np.asarray(x))
    _check_image(x)
    small, large = _check_size(small, "small"), _check_size(large, "large")
    if small >= large:   # swapped, vessels would come out negative and a threshold would pick the background
        raise ValueError(f"the small median ({small}) must be smaller than the large one ({large})")
    signed = {np.dtype(np.uint8): np.int16, np.dtype(np.uint16): np.int32,
              np.dtype(np.float32): np.float32}[np.dtype(x.dtype)]
    # One subtraction in the signed type (both medians cast on the fly, exactly: uint8 fits int16, uint16
    # int32): on a device one elementwise kernel and no signed copy of the small median in between.
    return xp.subtract(median(x, small, mode, cval), median(x, large, mode, cval), dtype=signed)


# -- CUDA dispatch (kernels/median.cu) --------------------------------------------------------
# Launch configuration lives here, next to the dispatch; the tile constants must match the
# GH_* defines at the top of kernels/median.cu.

_CUDA_BLOCK = (32, 8, 1)          # GH_TILE_X x GH_BLOCK_Y threads
_CUDA_TILE = (32, 32)             # outputs per block (x, y): each thread does GH_ROWS = 4 rows
_CUDA_NET_SIZES = (3, 5)          # register forgetful selection; larger sizes: see below
# 3 x 3 through median3 (sorted row triples, one thread per column sliding down _CUDA_M3_ROWS rows)
# instead of median_net<T, 3>; False keeps the latter (benchmarks/bench_gpu_baselines.py times both)
_CUDA_ROWS3 = True
_CUDA_M3 = (128, 16)              # GH_M3_COLS threads per block, GH_M3_ROWS rows per thread
# Sliding-histogram kernel (median_hist) for integer sizes >= 7: one thread per output column,
# HistTraits<T>::COLS threads per block, each sliding down GH_HIST_ROWS rows. float32 keeps the
# radix selection (2**32 keys have no histogram that fits shared memory).
_CUDA_HIST_COLS = {np.dtype(np.uint8): 64, np.dtype(np.uint16): 32}
_CUDA_HIST_ROWS = 32
_CUDA_HIST_NARROW_MAX = 15        # up to 15x15 = 225 keys: 8-bit counters (median_hist<T, 1>)
# uint16 sizes 7..15 through median_hist16: 16 lanes per column instead of one thread (two columns a
# warp, GH_H16_WARPS warps a block, GH_H16_ROWS rows); False keeps median_hist (the benchmarks time both)
_CUDA_H16 = True
_CUDA_H16_BLOCK = 128             # GH_H16_WARPS * 32 threads
_CUDA_H16_COLS = 8                # columns per block: GH_H16_WARPS * 32 / GH_H16_LANES
_CUDA_H16_ROWS = 64
_CUDA_CTYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
                np.dtype(np.float32): "float"}
_CUDA_FAILED: dict[str, str] = {}  # kernel name -> why it failed (warned once, host path after)


def _cuda_plan(shape, dtype, size: int, hist: bool = True):
    """``(kernel name expression, grid, block, extra args)`` for a (z, y, x) slab.

    ``grid[2]`` is the slice count; slabs deeper than the 65535 grid limit are launched in
    chunks of slices by the caller (see :func:`_median_cuda`). ``hist=False`` plans the radix
    kernel where the sliding histogram would be used (the fallback when that one fails).
    """
    z, h, w = (int(s) for s in shape)
    ctype = _CUDA_CTYPES[np.dtype(dtype)]
    if size == 3 and _CUDA_ROWS3:
        grid = (-(-w // _CUDA_M3[0]), -(-h // _CUDA_M3[1]), min(z, MAX_GRID_YZ))
        return f"median3<{ctype}>", grid, (_CUDA_M3[0], 1, 1), ()
    if size in _CUDA_NET_SIZES:
        name, extra = f"median_net<{ctype}, {size}>", ()
    elif hist and _CUDA_H16 and np.dtype(dtype) == np.uint16 and size <= _CUDA_HIST_NARROW_MAX:
        grid = (-(-w // _CUDA_H16_COLS), -(-h // _CUDA_H16_ROWS), min(z, MAX_GRID_YZ))
        return "median_hist16", grid, (_CUDA_H16_BLOCK, 1, 1), (np.int32(size),)
    elif hist and np.dtype(dtype) in _CUDA_HIST_COLS:
        cols = _CUDA_HIST_COLS[np.dtype(dtype)]
        grid = (-(-w // cols), -(-h // _CUDA_HIST_ROWS), min(z, MAX_GRID_YZ))
        narrow = int(size <= _CUDA_HIST_NARROW_MAX)
        return f"median_hist<{ctype}, {narrow}>", grid, (cols, 1, 1), (np.int32(size),)
    else:
        name, extra = f"median_radix<{ctype}>", (np.int32(size),)
    grid = (-(-w // _CUDA_TILE[0]), -(-h // _CUDA_TILE[1]), min(z, MAX_GRID_YZ))
    return name, grid, _CUDA_BLOCK, extra


def _cval_bits(cval, dtype) -> np.uint32:
    """The border value's raw bits as the kernel's ``unsigned int cval_bits``."""
    if np.dtype(dtype) == np.float32:
        return np.array(cval, dtype=np.float32).view(np.uint32)[()]
    return np.uint32(int(cval))


def _border_maps(h: int, w: int, r: int, mode: str):
    """Host int32 row/column source indices of the padded slice (the CPU's ``_index_map``)."""
    return (_index_map(h, r, mode).astype(np.int32), _index_map(w, r, mode).astype(np.int32))


@functools.lru_cache(maxsize=64)
def _device_border_maps(h: int, w: int, r: int, mode: str, device_id: int):
    """:func:`_border_maps` on the current device, cached: two small host->device copies per
    call would cost more than a whole 3x3 filter of a 2048 x 2048 slice."""
    import cupy as cp

    maps = tuple(cp.asarray(m) for m in _border_maps(h, w, r, mode))
    # Once per entry: a copy from pageable memory may still be in flight when asarray returns, and a
    # cached map is later read by kernels on whatever stream the caller uses then.
    cp.cuda.get_current_stream().synchronize()
    return maps


def _median_device(x, size, mode, cval, out):
    cp = array_module(x)
    _check_image(x)
    size = _check_size(size)
    _check_mode(mode)
    cval = _cval_as(cval, x.dtype) if mode == "constant" else 0
    if out is not None and (not is_device_array(out) or out.shape != x.shape or out.dtype != x.dtype):
        got = (getattr(out, "shape", None), getattr(out, "dtype", None))
        raise ValueError(f"out must be a CuPy array of shape {x.shape} and dtype {x.dtype}, got {got}")
    with x.device:
        res = _median_kernels(x, size, mode, cval, out)
        if res is not None:
            return res
        res = cp.asarray(median(to_host(x), size, mode, cval))
    if out is not None:
        out[...] = res
        return out
    return res


def _median_kernels(x, size, mode, cval, out):
    """The kernel the plan picks; should it fail (NVRTC, launch), the radix kernel where that is a
    different one, then None (the host). Each failing kernel is warned about once and not tried again."""
    for hist in (True, False):
        name = _cuda_plan((1,) + x.shape[-2:], x.dtype, size, hist)[0]
        if name in _CUDA_FAILED:
            continue
        try:
            return _median_cuda(x, size, mode, cval, out, hist)
        except Exception as exc:  # compile error (NVRTC), launch failure, CUDA error
            if is_device_oom(exc):
                raise  # not the kernel's fault: the pipeline shrinks its slabs and retries
            _CUDA_FAILED[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"CUDA median kernel {name} failed ({_CUDA_FAILED[name]}); using the next kernel "
                          "or the host instead", RuntimeWarning, stacklevel=4)
    return None


def _overlaps(a, b) -> bool:
    a0, b0 = a.data.ptr, b.data.ptr
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def _median_cuda(x, size, mode, cval, out, hist: bool = True):
    cp = array_module(x)
    name, grid, block, extra = _cuda_plan((1,) + x.shape[-2:], x.dtype, size, hist)
    mod = load_module("median.cu", (name,))
    kern = mod.get_function(name)
    src = cp.ascontiguousarray(x)
    slab = src.reshape((-1,) + src.shape[-2:])
    z, h, w = slab.shape
    # Write straight into ``out`` when the kernel can (C-contiguous, not aliasing the input it
    # still reads); otherwise into a fresh array, copied over at the end.
    direct = out is not None and out.flags.c_contiguous and not _overlaps(out, src)
    dst = out if direct else cp.empty(x.shape, dtype=x.dtype)
    dslab = dst.reshape(slab.shape)
    if cp is np:  # tests run this function with NumPy standing in for CuPy
        rows, cols = _border_maps(h, w, size // 2, mode)
    else:
        rows, cols = _device_border_maps(h, w, size // 2, mode, x.device.id)
    cbits = _cval_bits(cval, x.dtype)
    for z0 in range(0, z, MAX_GRID_YZ):
        z1 = min(z, z0 + MAX_GRID_YZ)
        grid = grid[:2] + (z1 - z0,)   # the plan for one slice, over this chunk's slices
        if grid[1] > MAX_GRID_YZ:
            raise ValueError(f"slice of {h} rows exceeds the CUDA grid ({MAX_GRID_YZ} tiles)")
        kern(grid, block, (slab[z0:z1], dslab[z0:z1], rows, cols, np.int32(h), np.int32(w), cbits) + extra)
    if out is not None and not direct:
        out[...] = dst
        return out
    return dst


# -- 2D dispatch ------------------------------------------------------------------------------

def _median2d(x2d: np.ndarray, size: int, mode: str, cval, out2d: np.ndarray) -> None:
    r = size // 2
    if x2d.dtype == np.uint8 or (size <= 5 and not _has_nan(x2d, cval, mode)):
        _cv2_median(np.ascontiguousarray(x2d), size, mode, cval, out2d)
        return
    p = np.ascontiguousarray(pad(x2d, r, mode, cval))
    out2d[...] = _huang_u16(p, size) if x2d.dtype == np.uint16 else _median_f32(p, size)


def _has_nan(x2d, cval, mode) -> bool:
    if x2d.dtype != np.float32:
        return False
    return bool(np.isnan(x2d).any()) or (mode == "constant" and bool(np.isnan(cval)))


def _cv2_median(x: np.ndarray, size: int, mode: str, cval, out: np.ndarray) -> None:
    """OpenCV's median with scipy's border: the whole image once, then the border frame again.

    ``medianBlur`` replicates edges, which is exact wherever the window stays inside the image;
    only the ``size // 2``-wide frame needs our border, so it is redone from thin padded strips
    instead of padding and copying the whole slice (that copy alone would double the 3x3 time).
    """
    import cv2

    r = size // 2
    h, w = x.shape
    if h <= 2 * r or w <= 2 * r:
        out[...] = _cv2_valid(pad(x, r, mode, cval), size, r)
        return
    res = cv2.medianBlur(x, size, dst=out if out.flags.c_contiguous else None)
    if res is not out:
        out[...] = res
    if mode == "nearest":
        return
    rows, cols = _index_map(h, r, mode), _index_map(w, r, mode)
    out[:r] = _cv2_valid(_gather(x, rows[:3 * r], cols, cval), size, r)
    out[h - r:] = _cv2_valid(_gather(x, rows[h - r:], cols, cval), size, r)
    # Left and right strips are gathered transposed (the window is square): OpenCV is several
    # times slower per pixel on a tall 3-pixel-wide image than on a wide 3-row one.
    out[:, :r] = _cv2_valid(_gather(x.T, cols[:3 * r], rows, cval), size, r).T
    out[:, w - r:] = _cv2_valid(_gather(x.T, cols[w - r:], rows, cval), size, r).T


def _index_map(n: int, r: int, mode: str) -> np.ndarray:
    """Source index of each of the ``n + 2r`` padded positions; -1 means ``cval``."""
    npmode = MODES[mode]
    if npmode == "constant":
        return np.pad(np.arange(n), r, mode="constant", constant_values=-1)
    return np.pad(np.arange(n), r, mode=npmode)


def _gather(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, cval) -> np.ndarray:
    strip = x[np.ix_(np.maximum(rows, 0), np.maximum(cols, 0))]
    if (rows < 0).any() or (cols < 0).any():
        strip[(rows < 0)[:, None] | (cols < 0)[None, :]] = cval
    return strip


def _cv2_valid(p: np.ndarray, size: int, r: int) -> np.ndarray:
    import cv2

    res = cv2.medianBlur(np.ascontiguousarray(p), size)
    return res[r:res.shape[0] - r, r:res.shape[1] - r]


def _median_f32(p: np.ndarray, size: int) -> np.ndarray:
    """float32 median through ranks: exact, and fast when few distinct values exist."""
    keys = _f32_keys(p)
    uniq, inv = np.unique(keys, return_inverse=True)
    if uniq.size <= 65536:
        ranks = inv.reshape(p.shape).astype(np.uint16)
        med = uniq[_huang_u16(ranks, size)]
    else:
        med = _select_u32(keys, size)
    return _f32_from_keys(med)


def _f32_keys(a: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is float order (every NaN made the largest)."""
    a = np.where(np.isnan(a), np.float32(np.nan), a)  # one canonical, positive quiet NaN
    b = a.view(np.uint32)
    neg = (b >> 31).astype(bool)
    return np.where(neg, ~b, b | np.uint32(0x80000000))


def _f32_from_keys(k: np.ndarray) -> np.ndarray:
    pos = (k >> 31).astype(bool)
    return np.where(pos, k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32).view(np.float32)


# -- numba kernels ----------------------------------------------------------------------------
# Compiled lazily on first call and cached on disk (cache=True), so only the kernels a run needs
# are compiled, once per installation rather than once per process.

def _huang_u16(p: np.ndarray, size: int) -> np.ndarray:
    """Valid-region median of the padded uint16 image ``p``."""
    h, w = p.shape[0] - size + 1, p.shape[1] - size + 1
    out = np.empty((h, w), np.uint16)
    _huang_u16_kernel(p, size, _band_rows(h), out)
    return out


def _select_u32(p: np.ndarray, size: int) -> np.ndarray:
    """Valid-region median of the padded uint32 key image ``p`` by per-pixel selection."""
    h, w = p.shape[0] - size + 1, p.shape[1] - size + 1
    out = np.empty((h, w), np.uint32)
    _select_u32_kernel(p, size, out)
    return out


def _band_rows(h: int) -> int:
    # Each band pays one window fill and one histogram clear; ~64 rows amortizes that and still
    # leaves every thread several bands to balance.
    return max(1, min(64, -(-h // 8)))


_BITS = 5  # a coarse bin holds 2**_BITS fine bins (values); see the module docstring
_LOW = (1 << _BITS) - 1


@njit(cache=True, nogil=True)
def _seek(fine, coarse, c, lb, k):
    """The value of rank ``k`` in the window; ``c`` is the coarse bin it was in last time and
    ``lb`` the number of values below that bin. Returns ``(median, c, lb)`` for the next pixel.

    Coarse steps follow the median (it moves little between neighbours), then the fine bins of
    its coarse bin are scanned from whichever end is nearer in rank.
    """
    while lb > k:
        c -= 1
        lb -= coarse[c]
    while lb + coarse[c] <= k:
        lb += coarse[c]
        c += 1
    r = k - lb
    cc = coarse[c]
    if 2 * r < cc:
        v = c << _BITS
        acc = fine[v]
        while acc <= r:
            v += 1
            acc += fine[v]
    else:
        v = (c << _BITS) + _LOW
        acc = cc - fine[v]  # values of this coarse bin below v
        while acc > r:
            v -= 1
            acc -= fine[v]
    return v, c, lb


@njit(cache=True, nogil=True)
def _hist_run(p, fine, coarse, y, x, dy, dx, count, sign, c, lb):
    """Add (sign=+1) or remove (-1) ``count`` pixels of ``p`` from (y, x) stepping (dy, dx);
    returns the updated count of values below coarse bin ``c``."""
    for i in range(count):
        v = np.int64(p[y + i * dy, x + i * dx])
        fine[v] += sign
        cv = v >> _BITS
        coarse[cv] += sign
        lb += sign * (cv < c)  # branch-free: the comparison is a coin flip near the median
    return lb


@njit(parallel=True, cache=True, nogil=True)
def _huang_u16_kernel(p, size, band, out):
    """Huang's sliding-histogram median over row bands, zig-zagging so no window is refilled."""
    h, w = out.shape
    k = (size * size) // 2
    nbands = (h + band - 1) // band
    for b in prange(nbands):
        y0 = b * band
        y1 = min(h, y0 + band)
        fine = np.zeros(65536, np.int32)
        coarse = np.zeros(65536 >> _BITS, np.int32)
        c = np.int64(0)
        lb = np.int64(0)
        for dy in range(size):
            lb = _hist_run(p, fine, coarse, y0 + dy, 0, 0, 1, size, 1, c, lb)
        for y in range(y0, y1):
            right = (y - y0) % 2 == 0
            xs = 0 if right else w - 1
            if y > y0:  # step down at the column where the previous row ended
                lb = _hist_run(p, fine, coarse, y - 1, xs, 0, 1, size, -1, c, lb)
                lb = _hist_run(p, fine, coarse, y - 1 + size, xs, 0, 1, size, 1, c, lb)
            m, c, lb = _seek(fine, coarse, c, lb, k)
            out[y, xs] = m
            for i in range(1, w):
                if right:
                    x = i
                    lb = _hist_run(p, fine, coarse, y, x - 1, 1, 0, size, -1, c, lb)
                    lb = _hist_run(p, fine, coarse, y, x + size - 1, 1, 0, size, 1, c, lb)
                else:
                    x = w - 1 - i
                    lb = _hist_run(p, fine, coarse, y, x + size, 1, 0, size, -1, c, lb)
                    lb = _hist_run(p, fine, coarse, y, x, 1, 0, size, 1, c, lb)
                m, c, lb = _seek(fine, coarse, c, lb, k)
                out[y, x] = m


@njit(cache=True, nogil=True)
def _quickselect(a, k):
    """The k-th smallest of ``a`` (Hoare partitioning, in place)."""
    lo, hi = 0, a.size - 1
    while hi > lo:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@njit(parallel=True, cache=True, nogil=True)
def _select_u32_kernel(p, size, out):
    h, w = out.shape
    n = size * size
    for y in prange(h):
        buf = np.empty(n, np.uint32)
        for x in range(w):
            for dy in range(size):
                for dx in range(size):
                    buf[dy * size + dx] = p[y + dy, x + dx]
            out[y, x] = _quickselect(buf, n // 2)
