"""Per-slice intensity preprocessing: z-normalization, asinh stretch, CLAHE, robust 8-bit scaling.

The paper's chain for every slice is::

    x  --ZNorm.apply-->  float32 in the stack's units, slice offset/gain removed
       --asinh_stretch-->  compress the bright vessels
       --clahe-->          local contrast (clip limit 0.01, 32 x 32 tiles), float32 in [0, 1]
       --robust_scale-->   uint8, percentiles 0.1 / 99.9 to 0 / 255

Z-normalization is streaming and global: pass 1 calls :func:`slice_stats` on every slice (a few
numbers each), :meth:`ZNorm.from_stats` turns them into one offset and gain per slice, and pass 2
applies them slab by slab, so the result never depends on how the stack was cut into slabs.

:func:`clahe` reproduces ``skimage.exposure.equalize_adapthist`` bit for bit (see its docstring)
but runs the per-tile work in numba instead of one Python call per tile. This module must not
import torch.
"""
from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .backend import (MAX_GRID_YZ, array_module, device_of, is_device_array, load_module, native_byte_order,
                      reduce_rows, to_device, to_host, try_cuda)

# percentiles pass 1 keeps for every slice (the ones SliceStats names p1 ... p99)
PERCENTILES = (1.0, 25.0, 50.0, 75.0, 99.0)
NR_OF_GRAY = 2**14  # skimage's CLAHE works on 14-bit gray levels


# -- pass 1: per-slice statistics -----------------------------------------------------------------

@dataclass
class SliceStats:
    """What pass 1 keeps of one slice: ``n`` pixels (all finite), moments, extremes, percentiles.

    Percentiles use NumPy's default (linear) definition, so ``p50`` equals ``np.median``.
    """

    z: int | None
    n: int
    mean: float
    std: float
    min: float
    max: float
    p1: float
    p25: float
    p50: float
    p75: float
    p99: float


def _check_slice(x, z) -> np.ndarray:
    x = to_host(x)
    if x.ndim != 2:
        raise ValueError(f"slice_stats expects one (y, x) slice, got shape {x.shape}" + _at(z))
    if x.size == 0:
        raise ValueError("slice_stats got an empty slice" + _at(z))
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
            or x.dtype == bool):
        raise TypeError(f"slice_stats expects an integer or float slice, got {x.dtype}" + _at(z))
    return x


def _at(z) -> str:
    return "" if z is None else f" (slice z={z})"


def _raise_nonfinite(x, z):
    bad = int(np.count_nonzero(~np.isfinite(x)))
    where = "slice" if z is None else f"slice z={z}"
    raise ValueError(f"{where} has {bad} NaN/Inf pixel(s); fix or mask the input before normalizing")


def _percentiles_from_counts(counts: np.ndarray, offset: int, q) -> np.ndarray:
    """np.percentile(x, q) (linear) for integer data given as a histogram of ``x - offset``.

    The order statistics x_(k) come from the cumulative counts, then NumPy's interpolation
    x_(lo) + (x_(hi) - x_(lo)) * frac, exact because the order statistics are integers.
    """
    n = int(counts.sum())
    cum = np.cumsum(counts)
    pos = (n - 1) * np.asarray(q, dtype=np.float64) / 100.0
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    # smallest value whose cumulative count exceeds rank k is the k-th order statistic (0-based)
    v_lo = np.searchsorted(cum, lo, side="right") + offset
    v_hi = np.searchsorted(cum, hi, side="right") + offset
    frac = pos - lo
    return v_lo + (v_hi - v_lo) * frac


def slice_stats(slice2d, z: int | None = None) -> SliceStats:
    """Pass-1 statistics of one (y, x) slice; ``z`` only labels error messages and the result.

    Integer slices of at most 16 bits go through one ``np.bincount`` (exact percentiles and
    moments from the histogram, ~10 ms for 2048 x 2048); other slices use ``np.percentile``, which
    partitions rather than sorts. NaN or Inf raises ``ValueError`` naming ``z``.
    """
    x = _check_slice(slice2d, z)
    if x.dtype == bool:
        x = x.view(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize <= 2:
        return _stats_from_histogram(x, z)
    xf = x.ravel()
    total = xf.sum(dtype=np.float64)
    if not np.isfinite(total) and not np.isfinite(xf).all():  # the sum check costs no extra pass
        _raise_nonfinite(xf, z)
    mean = total / xf.size
    std = float(np.sqrt(np.mean(np.square(xf - mean, dtype=np.float64))))
    p = np.percentile(xf, PERCENTILES)
    return SliceStats(z, int(xf.size), float(mean), std, float(xf.min()), float(xf.max()),
                      *map(float, p))


def _stats_from_histogram(x: np.ndarray, z) -> SliceStats:
    # unsigned data is its own bin index (no min/max pass); signed data is shifted to start at 0
    offset = 0 if x.dtype.kind == "u" else int(np.iinfo(x.dtype).min)
    flat = x.ravel() if offset == 0 else x.ravel().astype(np.int32) - offset
    counts = np.bincount(flat)
    nonzero = np.flatnonzero(counts)
    counts = counts[nonzero[0]:]
    offset += int(nonzero[0])
    values = np.arange(counts.size, dtype=np.float64) + offset
    n = int(x.size)
    mean = float(counts @ values) / n
    var = float(counts @ np.square(values - mean)) / n
    p = _percentiles_from_counts(counts, offset, PERCENTILES)
    return SliceStats(z, n, mean, math.sqrt(var), float(offset), float(values[-1]), *map(float, p))


# -- pass 2: z-normalization ----------------------------------------------------------------------

@dataclass
class ZNorm:
    """Per-slice offset and gain for a whole stack (one channel), from pass-1 statistics.

    For slice z with background level ``b_z`` and robust scale ``s_z``::

        x' = (x - b_z) * g_z + B,      g_z = S / s_z,      B = median_z(b_z),  S = median_z(s_z)

    so every slice ends up with the stack's typical background ``B`` and spread ``S`` and the output
    keeps the stack's units. The medians are over the slices with ``s_z > 0`` (all slices if none is):
    blank slices (zero-filled ends, a padded stack) say nothing about the stack's spread, and were they
    the majority, ``S = 0`` would turn every slice with signal down to ``1 / max_gain``.
    ``method="robust"`` (default) uses ``b_z = p50`` (vessels are sparse, so
    the median is background/tissue) and ``s_z = p99 - p1``; ``method="zscore"`` uses the slice
    mean and standard deviation. A slice whose gain and offset differ from a base image by
    ``x_z = a_z * base + c_z`` (a_z > 0) maps exactly onto the same image for every z.

    Dark slices (laser dropout, an empty end of the stack): when ``s_z <= dark_ratio * S`` (``s_z == 0``
    included), or when a slice between others dips to ``dark_neighbour_ratio`` of the spread on both of its
    sides (the median of up to 3 slices each side: a dropout in a sparse channel, whose spread is mostly
    camera noise, falls only to about 0.2 of the stack's), the slice is flagged in ``dark`` and gets gain 1
    instead of ``S / s_z``: there
    is no signal to recover, and a gain of 100 would only turn its noise into fake structure. Its
    offset is still removed. Gains of other slices are capped to ``[1/max_gain, max_gain]``.
    """

    background_z: np.ndarray  # b_z, one per slice
    scale_z: np.ndarray  # s_z
    gain: np.ndarray  # g_z actually applied (after the dark-slice rule and the cap)
    dark: np.ndarray  # bool, slices treated as dark
    background: float  # B
    scale: float  # S
    method: str = "robust"
    dark_ratio: float = 0.1
    max_gain: float = 10.0
    dark_neighbour_ratio: float = 0.35

    @classmethod
    def from_stats(cls, stats: list[SliceStats], method: str = "robust", dark_ratio: float = 0.1,
                   max_gain: float = 10.0, dark_neighbour_ratio: float = 0.35) -> "ZNorm":
        """Global offsets and gains from every slice's :class:`SliceStats` (in z order)."""
        if len(stats) == 0:
            raise ValueError("ZNorm.from_stats needs the stats of at least one slice")
        if method == "robust":
            b = np.array([s.p50 for s in stats], dtype=np.float64)
            s = np.array([s.p99 - s.p1 for s in stats], dtype=np.float64)
        elif method == "zscore":
            b = np.array([s.mean for s in stats], dtype=np.float64)
            s = np.array([s.std for s in stats], dtype=np.float64)
        else:
            raise ValueError(f"unknown normalization method {method!r}: expected 'robust' or 'zscore'")
        if not (np.isfinite(b).all() and np.isfinite(s).all()):
            bad = int(np.flatnonzero(~(np.isfinite(b) & np.isfinite(s)))[0])
            raise ValueError(f"slice z={bad} has non-finite statistics")
        if not (max_gain >= 1 and 0 <= dark_ratio < 1 and 0 <= dark_neighbour_ratio < 1):
            raise ValueError(f"need max_gain >= 1, 0 <= dark_ratio < 1 and 0 <= dark_neighbour_ratio < 1, got "
                             f"{max_gain}, {dark_ratio}, {dark_neighbour_ratio}")
        ref = s > 0 if (s > 0).any() else np.ones(s.shape, bool)
        B, S = float(np.median(b[ref])), float(np.median(s[ref]))
        dark = (s <= dark_ratio * S) | (s <= 0) | _dips(s, dark_neighbour_ratio)
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.clip(S / s, 1.0 / max_gain, max_gain)
        gain = np.where(dark, 1.0, gain)
        return cls(b, s, gain, dark, B, S, method, dark_ratio, max_gain, dark_neighbour_ratio)

    @property
    def nz(self) -> int:
        return int(self.gain.size)

    def apply(self, slab, z0: int = 0):
        """Normalize slices ``z0 .. z0 + len(slab)`` of the stack (a (z, y, x) slab or one (y, x) slice).

        Returns float32 of the same kind (NumPy/CuPy) and shape. Depends only on the global
        statistics, so applying it per slab equals applying it to the whole stack.
        """
        xp = array_module(slab)
        if slab.ndim not in (2, 3):
            raise ValueError(f"ZNorm.apply expects a (z, y, x) slab or a (y, x) slice, got shape {slab.shape}")
        x = slab[None] if slab.ndim == 2 else slab
        if not 0 <= z0 or z0 + x.shape[0] > self.nz:
            raise ValueError(f"slab z{z0}..{z0 + x.shape[0]} lies outside the {self.nz} normalized slices")
        sl = slice(z0, z0 + x.shape[0])
        g = xp.asarray(self.gain[sl].astype(np.float32))[:, None, None]
        b = xp.asarray(self.background_z[sl].astype(np.float32))[:, None, None]
        out = x.astype(xp.float32)   # a fresh array, so the rest is in place: one slab of float32, not three
        out -= b
        out *= g
        out += np.float32(self.background)
        if out.dtype.kind == "f" and x.dtype.kind in "fc":
            finite = reduce_rows(xp.isfinite(out).reshape(out.shape[0], -1), "all")
            if not bool(finite.all()):
                z = z0 + int(to_host(xp.flatnonzero(~finite))[0])
                n = int(xp.count_nonzero(~xp.isfinite(x[z - z0])))
                raise ValueError(f"slice z={z} has {n} NaN/Inf pixel(s); cannot normalize it")
        return out[0] if slab.ndim == 2 else out

    def describe(self) -> dict:
        """A JSON-ready summary for run reports."""
        return {"method": self.method, "background": self.background, "scale": self.scale,
                "gain_min": float(self.gain.min()), "gain_max": float(self.gain.max()),
                "dark_ratio": self.dark_ratio, "dark_neighbour_ratio": self.dark_neighbour_ratio,
                "dark_slices": [int(i) for i in np.flatnonzero(self.dark)]}


def _dips(s: np.ndarray, ratio: float, reach: int = 3) -> np.ndarray:
    """Slices whose spread is at most ``ratio`` of the median spread of up to ``reach`` slices on each side
    (both sides, so a scan's dim first or last slices, or a gradual fall with depth, are not dips; a dark run
    longer than ``reach`` slices is the global rule's), and none when there are more than 2 or 5 % of the
    slices. The labelled real stacks here have no slice under 0.75 of its neighbours; a laser dropout in the
    phantom's sparse nerve channel is at 0.17-0.21."""
    dips = np.zeros(len(s), bool)
    if ratio <= 0:
        return dips
    for z in range(1, len(s) - 1):
        side = min(np.median(s[max(0, z - reach):z]), np.median(s[z + 1:z + 1 + reach]))
        dips[z] = side > 0 and s[z] <= ratio * side
    # dropouts are rare; many dips are a pattern (flicker, alternating illumination) whose dim slices still
    # hold signal, for the gains to even out, not to be blanked (the global rule still applies to them)
    if dips.sum() > max(2, round(0.05 * len(s))):
        dips[:] = False
    return dips


# -- asinh and robust scaling ---------------------------------------------------------------------

def asinh_stretch(x, scale: float):
    """``float32(asinh(x / scale))``, same shape and array kind; ``scale`` must be finite and > 0.

    Linear for |x| << scale and logarithmic above, so bright vessels stop dominating the range.
    """
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"asinh_stretch needs a finite scale > 0, got {scale}")
    xp = array_module(x)
    return xp.arcsinh(x.astype(xp.float32, copy=False) / np.float32(scale))


def _asinh_stretch_in_place(x, background: float, scale: float):
    """``asinh_stretch(x - background, scale)`` written into the float32 array ``x`` (same operations, same
    bits), which the caller no longer needs: two slabs of float32 fewer at the peak of pass 2."""
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"asinh_stretch needs a finite scale > 0, got {scale}")
    xp = array_module(x)
    x -= np.float32(background)
    x /= np.float32(scale)
    return xp.arcsinh(x, out=x)


def _check_image(what: str, x) -> None:
    if x.ndim not in (2, 3) or x.size == 0:
        raise ValueError(f"{what} expects a non-empty (y, x) slice or (z, y, x) slab, got shape {x.shape}")


def _check_percentiles(low: float, high: float) -> None:
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")


def _check_clip(clip_limit) -> None:
    # skimage takes any value <= 0 (and NaN, which compares false) as "no clipping": a sign error or a NaN from
    # a computed setting would silently switch the clip off
    if isinstance(clip_limit, (bool, np.bool_)) or not isinstance(clip_limit, numbers.Real) \
            or not np.isfinite(clip_limit) or clip_limit < 0:
        raise ValueError(f"clip_limit must be a finite number >= 0 (0: no clipping), got {clip_limit!r}")


def _check_nbins(nbins: int) -> None:
    # a float reached numba as a TypingError pages long (skimage refuses it too)
    if isinstance(nbins, (bool, np.bool_)) or not isinstance(nbins, numbers.Integral) or nbins < 1:
        raise ValueError(f"nbins must be an integer >= 1, got {nbins!r}")


def _robust_range(lo: float, hi: float, top) -> tuple[float, float]:
    """robust_scale's (p_low, p_high), with the slice's maximum (``top()``, asked for only then) in place of a
    p_high equal to p_low: otherwise a sparse bright structure on a flat background would be blanked."""
    return (lo, hi) if hi > lo else (lo, float(top()))


def robust_scale(x, low: float = 0.1, high: float = 99.9):
    """uint8 image: per (y, x) slice, percentile ``low`` -> 0 and ``high`` -> 255, clipped outside.

    ``y = round(clip((x - p_low) / (p_high - p_low), 0, 1) * 255)``; percentiles are NumPy's linear
    ones, computed per slice for a (z, y, x) slab (so the result is independent of slab cuts).
    Where ``p_high == p_low`` but the slice's maximum is higher (a flat background with fewer than
    ``100 - high`` % brighter pixels: sparse fibres, a nearly empty end slice) the maximum takes
    ``p_high``'s place, so those pixels are kept; a constant slice gives zeros. NaN/Inf raises ``ValueError``.
    """
    xp = array_module(x)
    _check_image("robust_scale", x)
    _check_percentiles(low, high)
    if is_device_array(x):
        out = _try_cuda("robust_scale", _robust_scale_cuda, x, low, high)
        if out is not None:
            return out
        # the host path, not cupy.percentile, which rounds differently: the answer stays exact
        return to_device(robust_scale(to_host(x), low, high), "cuda")
    x3 = x[None] if x.ndim == 2 else x
    out = xp.empty(x3.shape, dtype=xp.uint8)
    for i, s in enumerate(x3):
        s = s.astype(xp.float32, copy=False)
        if s.dtype.kind == "f" and not bool(xp.isfinite(s).all()):
            raise ValueError(f"robust_scale: slice {i} has NaN/Inf pixels")
        lo, hi = _robust_range(*(float(v) for v in xp.percentile(s, [low, high])), s.max)
        if not hi > lo:
            out[i] = 0
            continue
        y = (s - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        out[i] = xp.rint(xp.clip(y, 0, 255)).astype(xp.uint8)
    return out[0] if x.ndim == 2 else out


# -- CLAHE ----------------------------------------------------------------------------------------

def clahe(x, clip_limit: float = 0.01, kernel_size=32, nbins: int = 256):
    """Contrast Limited Adaptive Histogram Equalization of a (y, x) slice or, slice by slice, a slab.

    Returns float32 in [0, 1]. Equal to ``skimage.exposure.equalize_adapthist(slice,
    kernel_size=kernel_size, clip_limit=clip_limit, nbins=nbins)`` cast to float32, bit for bit:
    same 14-bit rescale, reflect padding, per-tile clipped histograms (skimage's redistribution
    loop reproduced step by step), integer maps, float32 bilinear sum truncated to integers, and the
    final min/max rescale. The per-tile work runs in numba.

    Departure from skimage: float input is used as is only when it lies in [0, 1]; anything else
    (which skimage either rejects, outside [-1, 1], or clips at 0, in [-1, 0)) is first mapped
    linearly from [min, max] to [0, 1], so an asinh-stretched slice with negative values keeps its
    sub-background detail. float16 is computed as float32: skimage scales it to uint16 in float16, where
    65535 overflows, and returns a constant image. A (z, y, x) slab is equalized per slice (skimage would
    use 3-D tiles). A float slice whose max - min overflows its type (float32 from -3e38 to 3e38) is
    halved first, which is exact and leaves (x - min) / (max - min) as it is.

    Integers other than uint8/uint16 go through skimage's ``img_as_uint`` as in skimage, so the result
    equals skimage's: negative values become 0 and a type wider than 16 bits is scaled from its full range
    (int32 by 2**-15, int64 by 2**-47). Where that loses data (negative pixels, values above 65535) a
    ``RuntimeWarning`` says so; pass such data as float or uint16 to equalize its own range.
    """
    _check_image("clahe", x)
    _check_nbins(nbins)
    _check_clip(clip_limit)
    ks = _kernel_size(kernel_size)
    xp_dev = device_of(x)
    if xp_dev == "cuda":
        out = _try_cuda("clahe", _clahe_cuda, x, clip_limit, ks, nbins)
        if out is not None:
            return out
    h = to_host(x)  # the host path: CPU input, or a CuPy input the kernels do not cover
    _warn_lossy_int_conversion(h)
    if h.ndim == 2:
        out = _clahe_slice(h, clip_limit, ks, nbins)
    else:
        out = np.stack([_clahe_slice(s, clip_limit, ks, nbins) for s in h]) if len(h) else \
            np.empty(h.shape, np.float32)
    return to_device(out, xp_dev) if xp_dev == "cuda" else out


def _kernel_size(kernel_size) -> tuple[int, int]:
    if isinstance(kernel_size, numbers.Number):
        kernel_size = (kernel_size, kernel_size)
    if not hasattr(kernel_size, "__len__") or len(kernel_size) != 2:   # None: skimage's default, not ours
        raise ValueError(f"kernel_size must be an int or a (ky, kx) pair, got {kernel_size!r}")
    ks = tuple(int(k) for k in kernel_size)
    if min(ks) < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size!r}")
    return ks


def _clahe_levels(x: np.ndarray, clip_limit: float, ks: tuple[int, int], nbins: int):
    """CLAHE's 14-bit uint16 levels of one slice (before the final min/max rescale) and the float dtype
    that rescale uses."""
    bins, float_dtype = _to_bins(x, nbins)
    ky, kx = ks
    nty, ntx = -(-x.shape[0] // ky), -(-x.shape[1] // kx)
    # skimage's padding: half a kernel before, up to a multiple of the kernel plus half a kernel after
    pad = [(k // 2, (k - s % k) % k + int(np.ceil(k / 2.0))) for k, s in zip(ks, x.shape)]
    padded = np.pad(bins, pad, mode="reflect")
    hist = _tile_histograms(padded, ky, kx, nty, ntx, nbins)
    n_pix = ky * kx
    clim = int(np.clip(clip_limit * n_pix, 1, None)) if clip_limit > 0.0 else n_pix
    maps = np.empty(hist.shape, np.int32)
    _clip_and_map(hist, clim, (NR_OF_GRAY - 1 - 0) / n_pix, maps)
    levels = np.empty(x.shape, np.uint16)
    _interpolate(bins, maps.reshape(nty, ntx, nbins), ky, kx, levels)
    return levels, float_dtype


def _clahe_slice(x: np.ndarray, clip_limit: float, ks: tuple[int, int], nbins: int) -> np.ndarray:
    return _final_rescale(*_clahe_levels(x, clip_limit, ks, nbins))


def _robust_level_table(counts: np.ndarray, float_dtype, low: float, high: float,
                        final_tables: dict | None = None) -> np.ndarray:
    """uint8 table over the 14-bit levels of one slice with level histogram ``counts`` such that
    ``table[levels] == robust_scale(_final_rescale(levels, float_dtype), low, high)``, bit for bit.

    The final rescale is monotone in the level, so the k-th smallest output is the rescaled k-th
    smallest level: the percentiles come from the cumulative histogram instead of a sort of the
    float32 image, interpolated as NumPy does (_lerp_like_numpy), and the scaling is robust_scale's
    own float32 arithmetic applied to the 16384 possible outputs instead of every pixel.
    """
    present = np.flatnonzero(counts)
    key = (float(present[0]), float(present[-1]))
    final_tables = {} if final_tables is None else final_tables
    if key not in final_tables:
        final_tables[key] = _final_table(*key, float_dtype)
    ftab = final_tables[key]
    lo_i, hi_i, gamma = _linear_percentile_plan(int(counts.sum()), [low, high])
    cum = np.cumsum(counts, dtype=np.int64)
    # the k-th order statistic (0-based) is the first level whose cumulative count exceeds k
    a = ftab[np.searchsorted(cum, lo_i, side="right")]
    b = ftab[np.searchsorted(cum, hi_i, side="right")]
    p = _lerp_like_numpy(a[None], b[None], gamma[None, :])[0]
    lo, hi = _robust_range(float(p[0]), float(p[1]), ftab[present[-1]].item)
    if not hi > lo:
        return np.zeros(NR_OF_GRAY, np.uint8)
    y = (ftab - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.clip(y, 0, 255)).astype(np.uint8)


def clahe_robust_scale(x, clip_limit: float = 0.01, kernel_size=32, nbins: int = 256,
                       low: float = 0.1, high: float = 99.9):
    """``robust_scale(clahe(x, clip_limit, kernel_size, nbins), low, high)``, bit for bit, without the
    float32 image in between: per slice, the histogram of CLAHE's 14-bit levels gives the
    percentiles and a 16384-entry uint8 table maps levels to the output. This is the preprocessing
    chain's last two steps; on a GPU it replaces a per-slice sort with a histogram.
    """
    _check_image("clahe", x)
    _check_nbins(nbins)
    _check_clip(clip_limit)
    _check_percentiles(low, high)
    ks = _kernel_size(kernel_size)
    if is_device_array(x):
        out = _try_cuda("clahe", _clahe_cuda, x, clip_limit, ks, nbins, (low, high))
        if out is not None:
            return out
        return robust_scale(clahe(x, clip_limit, kernel_size, nbins), low, high)
    _warn_lossy_int_conversion(x)
    x3 = x[None] if x.ndim == 2 else x
    out = np.empty(x3.shape, np.uint8)
    final_tables: dict = {}
    for i, s in enumerate(x3):
        levels, float_dtype = _clahe_levels(s, clip_limit, ks, nbins)
        counts = np.bincount(levels.ravel(), minlength=NR_OF_GRAY)
        table = _robust_level_table(counts, float_dtype, low, high, final_tables)
        _gather(table, levels, out[i])
    return out[0] if x.ndim == 2 else out


def _img_as_uint_shift(dtype) -> int:
    """The right shift by which skimage's img_as_uint maps a non-negative integer wider than 16 bits onto
    uint16 (tested equal to it). Computed rather than by calling img_as_uint under catch_warnings, which
    changes the process-wide warning filters and so is not safe where other threads run."""
    dtype = np.dtype(dtype)
    return 8 * dtype.itemsize - 16 - (dtype.kind == "i")


def _warn_lossy_int_conversion(x: np.ndarray) -> None:
    """Warn where skimage's img_as_uint, which CLAHE applies to integers other than uint8/uint16 as
    ``equalize_adapthist`` does, throws information away: negative values become 0, and a type wider than
    16 bits with values above 65535 is scaled from its full range (int32: divided by 2**15, int64: 2**47),
    which can leave a handful of grey levels or one. The result still equals skimage's; the warning says so."""
    if x.dtype.kind not in "iu" or x.dtype in (np.uint8, np.uint16) or x.size == 0:
        return
    lo, hi = int(x.min()), int(x.max())
    lossy = []
    if lo < 0:
        lossy.append(f"its {int(np.count_nonzero(x < 0))} negative pixel(s) become 0")
    if x.dtype.itemsize > 2 and hi > np.iinfo(np.uint16).max:
        shift = _img_as_uint_shift(x.dtype)
        lossy.append(f"its values {max(lo, 0)}..{hi} are scaled from the whole {x.dtype} range onto uint16, "
                     f"leaving {(hi >> shift) - (max(lo, 0) >> shift) + 1} grey level(s)")
    if lossy:
        warnings.warn(f"clahe: {x.dtype} input is converted to uint16 as skimage's equalize_adapthist does: "
                      f"{' and '.join(lossy)}; to equalize the data's own range, pass it as float (mapped "
                      f"from [min, max] to [0, 1]) or as uint16", RuntimeWarning, stacklevel=3)


def _to_bins(x: np.ndarray, nbins: int):
    """skimage's img_as_uint -> 14-bit rescale -> bin index, fused into one table lookup per pixel.

    Returns the bin image and the float dtype skimage would compute its final rescale in.
    """
    from skimage.util import img_as_uint

    x = native_byte_order(x)   # '>u2' is not np.uint16: it would recurse through img_as_uint for ever
    bin_dtype = np.uint8 if nbins <= 256 else np.uint16
    if x.dtype.kind == "f":
        float_dtype = np.float32 if x.dtype.itemsize <= 4 else np.float64
        x = x.astype(float_dtype, copy=False)
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"clahe: input has {int(np.count_nonzero(~np.isfinite(x)))} NaN/Inf pixels")
        if _span_overflows(lo, hi, float_dtype):
            # max - min beyond the float type (x - min) / (max - min) is computed in: it gave inf - inf = NaN,
            # and a NaN bin index read outside the table (a segfault). Halving is exact, and the ratio of
            # the halves is the ratio of the wholes
            x, lo, hi = x * float_dtype(0.5), lo * 0.5, hi * 0.5
        shift, div, table = _float_bin_params(lo, hi, float_dtype, nbins, bin_dtype)
        out = np.empty(x.shape, bin_dtype)
        _float_to_bins(x, shift, div, float_dtype(np.iinfo(np.uint16).max), table, out)
        return out, float_dtype
    if x.dtype not in (np.uint8, np.uint16):  # other integers / bool: skimage's conversion first
        return _to_bins(img_as_uint(x), nbins)[0], np.float64
    table = _int_bin_table(x.min(), x.max(), x.dtype, nbins, bin_dtype)
    out = np.empty(x.shape, bin_dtype)
    _gather(table, x, out)
    return out, np.float64


def _span_overflows(lo: float, hi: float, float_dtype) -> bool:
    """Whether max - min of a slice with extremes lo, hi overflows float_dtype (e.g. float32 from -3e38 to 3e38)."""
    with np.errstate(over="ignore"):
        return not np.isfinite(float_dtype(hi) - float_dtype(lo))


def _float_bin_params(lo: float, hi: float, float_dtype, nbins: int, bin_dtype):
    """(shift, div, table) for a float slice with extremes lo, hi (CPU and CUDA paths share it)."""
    from skimage.util import img_as_uint

    t = float_dtype
    if lo < 0 or hi > 1:  # documented departure: (x - min) / (max - min), in the input's float type
        shift, div = (t(lo), t(hi - lo)) if hi > lo else (t(lo), t(np.inf))
    else:
        shift, div = t(0), t(1)
    # img_as_uint is monotone, so the converted image's extremes are those of the converted extremes
    ends = img_as_uint(_rescale01(np.array([lo, hi], float_dtype), shift, div))
    return shift, div, _bin_table(ends, nbins, bin_dtype, full=True)


def _int_bin_table(lo, hi, dtype, nbins: int, bin_dtype):
    """Bin of every uint8/uint16 value for a slice with extremes lo, hi (CPU and CUDA paths)."""
    from skimage.util import img_as_uint

    ends = img_as_uint(np.array([lo, hi], dtype))
    return _bin_table(ends, nbins, bin_dtype, full=False, src_dtype=dtype)


def _rescale01(v, shift, div):
    return v if div == 1 and shift == 0 else (v - shift) / div


def _bin_table(ends, nbins, bin_dtype, full, src_dtype=None):
    """Bin index for every possible input value (uint16 after img_as_uint if ``full``, else src_dtype).

    skimage: ``np.round(rescale_intensity(u16, out_range=(0, 16383)))`` with the image's min/max as
    ``in_range``, then ``// (1 + 16384 // nbins)``; the same float64 operations, on the table.
    Read-only and cached: every float slice mapped from [min, max] has ends (0, 65535), so the 1 ms
    of building it is paid once per run instead of once per slice.
    """
    return _bin_table_cached(int(ends[0]), int(ends[1]), int(nbins), np.dtype(bin_dtype), bool(full),
                             None if src_dtype is None else np.dtype(src_dtype))


@functools.lru_cache(maxsize=256)
def _bin_table_cached(e0: int, e1: int, nbins: int, bin_dtype, full: bool, src_dtype) -> np.ndarray:
    from skimage.util import img_as_uint

    imin, imax = float(e0), float(e1)
    if full or src_dtype == np.uint16:
        # the values are their own uint16: those outside [e0, e1] clip to an end and share its bin, so only
        # the span is computed (a 12-bit camera's slice spans a few thousand of the 65536 values; the same
        # per-element float64 operations, so the same bins; 0.48 -> ~0.05 ms a table, paid for every slice
        # whose extremes differ: a camera's all do. The device path builds its tables in clahe_bin_tables)
        table = np.empty(65536, bin_dtype)
        table[e0:e1 + 1] = _bins_of(np.arange(e0, e1 + 1, dtype=np.uint16), imin, imax, nbins, bin_dtype)
        table[:e0], table[e1 + 1:] = table[e0], table[e1]
    else:
        src = np.arange(np.iinfo(src_dtype).max + 1, dtype=src_dtype)
        table = _bins_of(img_as_uint(src), imin, imax, nbins, bin_dtype)
    table.flags.writeable = False
    return table


def _bins_of(u16: np.ndarray, imin: float, imax: float, nbins: int, bin_dtype) -> np.ndarray:
    """skimage's rescale to [0, 16383], rounding and binning of uint16 values, in its float64 operations."""
    v = np.clip(u16, imin, imax)
    if imin != imax:
        v = (v - imin) / (imax - imin)
        v = (v * (NR_OF_GRAY - 1.0 - 0.0) + 0.0).astype(np.float64)
    else:
        v = np.clip(v, 0.0, NR_OF_GRAY - 1.0).astype(np.float64)
    return (np.round(v).astype(np.uint16) // (1 + NR_OF_GRAY // nbins)).astype(bin_dtype)


def _final_rescale(levels: np.ndarray, float_dtype) -> np.ndarray:
    """skimage's last rescale_intensity (image min/max -> [0, 1]) via a table over the 14-bit levels."""
    table = _final_table(float(levels.min()), float(levels.max()), float_dtype)
    out = np.empty(levels.shape, np.float32)
    _gather(table, levels, out)
    return out


def _final_table(imin: float, imax: float, float_dtype) -> np.ndarray:
    """float32 value of every 14-bit level for a slice whose levels span [imin, imax]."""
    v = np.clip(np.arange(NR_OF_GRAY).astype(float_dtype), imin, imax)
    if imin != imax:
        v = ((v - imin) / (imax - imin) * (1.0 - 0.0) + 0.0).astype(float_dtype)
    else:
        v = np.clip(v, 0.0, 1.0).astype(float_dtype)
    return v.astype(np.float32)


def _reflect_index(n: int, k: int, ntiles: int) -> np.ndarray:
    """Source index of each of the ``ntiles * k`` rows (or columns) the CLAHE tiles cover.

    The CPU path pads with ``np.pad(..., mode="reflect")`` and tiles start ``k // 2`` into the
    padded image; padding an index ramp the same way gives the gather map (exact by construction).
    """
    pad = (k // 2, (k - n % k) % k + int(np.ceil(k / 2.0)))
    return np.pad(np.arange(n, dtype=np.int32), pad, mode="reflect")[k // 2:k // 2 + ntiles * k]


def _reflect_maps(x3, ky: int, kx: int, nty: int, ntx: int):
    """:func:`_reflect_index` of the rows and columns of ``x3``'s slices, on its device (cached there)."""
    import cupy as cp

    h, w = x3.shape[-2:]
    dev = getattr(x3, "device", None)
    if not hasattr(dev, "id"):  # NumPy standing in for CuPy (the emulator's tests)
        return cp.asarray(_reflect_index(h, ky, nty)), cp.asarray(_reflect_index(w, kx, ntx))
    return _device_reflect_maps(h, w, ky, kx, nty, ntx, dev.id)


@functools.lru_cache(maxsize=64)
def _device_reflect_maps(h: int, w: int, ky: int, kx: int, nty: int, ntx: int, device_id: int):
    # two host->device copies and np.pad per call cost more than a tile-map kernel; as in
    # filters._device_border_maps, synchronize once so a cached map is never read mid-copy
    import cupy as cp

    maps = cp.asarray(_reflect_index(h, ky, nty)), cp.asarray(_reflect_index(w, kx, ntx))
    cp.cuda.get_current_stream().synchronize()
    return maps


@njit(parallel=True, cache=True)
def _gather(table, src, out):
    for y in prange(src.shape[0]):
        for x in range(src.shape[1]):
            out[y, x] = table[src[y, x]]


@njit(parallel=True, cache=True)
def _float_to_bins(x, shift, div, umax, table, out):
    # img_as_uint on float: rint(v * 65535) in the input's float type, clipped to [0, 65535]
    for y in prange(x.shape[0]):
        for i in range(x.shape[1]):
            v = x[y, i]
            if div != 1 or shift != 0:
                v = (v - shift) / div
            u = np.rint(v * umax)
            u = min(max(u, 0), umax)
            out[y, i] = table[np.uint16(u)]


@njit(parallel=True, cache=True)
def _tile_histograms(padded, ky, kx, nty, ntx, nbins):
    # tiles start half a kernel into the padded image, i.e. at the original image's origin
    hist = np.zeros((nty * ntx, nbins), np.int64)
    y0, x0 = ky // 2, kx // 2
    for t in prange(nty * ntx):
        ty, tx = t // ntx, t % ntx
        for yy in range(y0 + ty * ky, y0 + (ty + 1) * ky):
            for xx in range(x0 + tx * kx, x0 + (tx + 1) * kx):
                hist[t, padded[yy, xx]] += 1
    return hist


@njit(parallel=True, cache=True)
def _clip_and_map(hist, clim, scale, maps):
    # per tile: skimage's clip_histogram, then map_histogram (cumsum * 16383 / n_pixels, float64,
    # clipped at 16383, truncated to int)
    for t in prange(hist.shape[0]):
        h = hist[t]
        _clip_histogram(h, clim)
        cum = 0
        for b in range(h.size):
            cum += h[b]
            m = min(float(cum) * scale, 16383.0)
            maps[t, b] = np.int32(m)


@njit(cache=True)
def _clip_histogram(h, clim):
    """skimage.exposure._adapthist.clip_histogram, step for step, on one tile (in place)."""
    nb = h.size
    n_excess = 0
    for i in range(nb):
        if h[i] > clim:
            n_excess += h[i] - clim
            h[i] = clim
    bin_incr = n_excess // nb
    upper = clim - bin_incr
    for i in range(nb):
        if h[i] < upper:
            h[i] += bin_incr
            n_excess -= bin_incr
    # skimage builds this mask after the increments above, so raised bins can land in it
    for i in range(nb):
        if h[i] >= upper and h[i] < clim:
            n_excess += h[i] - clim
            h[i] = clim
    n_under = 0
    for i in range(nb):
        if h[i] < clim:
            n_under += 1
    while n_excess > 0:
        prev = n_excess
        for index in range(nb):
            step = max(1, n_under // n_excess)
            for i in range(index, nb, step):
                if h[i] < clim:
                    h[i] += 1
                    n_excess -= 1
                    if h[i] == clim:
                        n_under -= 1  # skimage recounts; keeping the count is the same number
            if n_excess <= 0:
                break
        if prev == n_excess:
            break


@njit(parallel=True, cache=True)
def _interpolate(bins, maps, ky, kx, out):
    # skimage's bilinear blend of the four neighbouring tile maps: each term float64 -> float32,
    # summed in float32 in skimage's order, then truncated like its astype(uint16)
    nty, ntx = maps.shape[0], maps.shape[1]
    h, w = bins.shape
    # per-column tile indices and weights, hoisted out of the pixel loop (integer division is slow)
    s0 = np.empty(w, np.int64)
    s1 = np.empty(w, np.int64)
    fx = np.empty(w, np.float64)
    for x in range(w):
        px = x + kx // 2
        bx = px // kx
        fx[x] = (px % kx) / kx
        s0[x] = min(max(bx - 1, 0), ntx - 1)
        s1[x] = min(bx, ntx - 1)
    for y in prange(h):
        py = y + ky // 2
        by = py // ky
        fy = (py % ky) / ky
        iy = 1.0 - fy
        t0 = min(max(by - 1, 0), nty - 1)
        t1 = min(by, nty - 1)
        for x in range(w):
            v = bins[y, x]
            f = fx[x]
            i = 1.0 - f
            r = np.float32(maps[t0, s0[x], v] * (i * iy))
            r += np.float32(maps[t0, s1[x], v] * (f * iy))
            r += np.float32(maps[t1, s0[x], v] * (i * fy))
            r += np.float32(maps[t1, s1[x], v] * (f * fy))
            out[y, x] = np.uint16(r)


# -- CUDA paths (CuPy input) ------------------------------------------------------------------------
#
# Each returns a CuPy array equal to the CPU result (CLAHE, robust scaling: bit for bit; the fused
# z-normalize + asinh: bit for bit up to asinh, then within ASINH_MAX_ULP), or None when its kernels
# do not cover the input (odd dtypes, huge bin counts), in which case the caller takes the host
# path. Launch configuration lives here, next to the dispatch (shared/DESIGN.md, Kernels).

ASINH_MAX_ULP = 2  # GPU asinh (double, rounded once) vs NumPy's float32 arcsinh (not correctly rounded)
_CLAHE_MAX_BINS = 4096  # tile histogram in shared memory: 16 KB of int32 under the 48 KB default
_CLAHE_CHUNK_BYTES = 256 << 20  # bins + levels + maps of the slices processed per launch
_CLAHE_ENTRIES = ("int_to_bins_u8_b8", "int_to_bins_u8_b16", "int_to_bins_u16_b8", "int_to_bins_u16_b16",
                  "float_to_bins_f32_b8", "float_to_bins_f32_b16", "float_to_bins_f64_b8",
                  "float_to_bins_f64_b16", "clahe_tile_maps_b8", "clahe_tile_maps_b16",
                  "clahe_interp_b8", "clahe_interp_b16", "clahe_final", "clahe_level_counts",
                  "clahe_final_u8") \
    + tuple(f"clahe_bin_tables_{t}_{b}" for t in ("u8", "u16", "f32", "f64") for b in ("b8", "b16")) \
    + tuple(f"clahe_{k}_tables_{t}" for k in ("final", "robust") for t in ("f32", "f64"))
_ELEMENTWISE_ENTRIES = ("znorm_asinh_u8", "znorm_asinh_u16", "znorm_asinh_i16", "znorm_asinh_i32",
                        "znorm_asinh_f32", "znorm_asinh_f64", "robust_scale_f32") \
    + tuple(f"slice_extremes_{k}_{t}" for k in ("partial", "final") for t in ("u8", "i8", "u16", "i16", "i32", "f32", "f64"))
KERNEL_ENTRIES = {"clahe.cu": _CLAHE_ENTRIES, "elementwise.cu": _ELEMENTWISE_ENTRIES}
_ZNORM_SUFFIX = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16", np.dtype(np.int16): "i16",
                 np.dtype(np.int32): "i32", np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_warned: set[str] = set()
_LEVEL_COUNT_CHUNK = 32768   # pixels per block and pass of clahe_level_counts (GH_COUNT_CHUNK in clahe.cu)
_ROBUST_TABLE_THREADS = 256  # the block of clahe_robust_tables_* (GH_RT_THREADS in clahe.cu)


def _try_cuda(what: str, fn, *args):
    return try_cuda(what, _warned, fn, *args)


def _grid_stride(plane: int, nslices: int, threads: int = 256) -> tuple[tuple[int, int], tuple[int]]:
    """Grid for the (slice = blockIdx.y, grid-stride over the slice) kernels."""
    return (max(1, min(-(-plane // threads), 2048)), nslices), (threads,)


_EXTREMES_SUFFIX = {np.dtype(np.uint8): "u8", np.dtype(np.int8): "i8", np.dtype(np.uint16): "u16",
                    np.dtype(np.int16): "i16", np.dtype(np.int32): "i32", np.dtype(np.float32): "f32",
                    np.dtype(np.float64): "f64"}
_EXTREMES_THREADS = 256   # GH_EXT_THREADS in elementwise.cu


def slice_extremes(flat):
    """(2, rows) array on ``flat``'s device: each row's minimum, then each row's maximum (a NaN in a row
    makes both NaN), for a C-contiguous (rows, n) CuPy array. Two launches of kernels/elementwise.cu
    where CuPy's reductions cost ~270 us of host time per slice on an H200; ``reduce_rows`` for what they
    do not cover."""
    import cupy as cp

    rows, n = flat.shape
    suffix = _EXTREMES_SUFFIX.get(np.dtype(flat.dtype))
    if suffix is None or rows > MAX_GRID_YZ or n == 0 or not flat.flags.c_contiguous:
        return cp.stack([reduce_rows(flat, "min"), reduce_rows(flat, "max")])
    nb = int(max(1, min(256, -(-n // (_EXTREMES_THREADS * 16)))))
    mod = load_module("elementwise.cu")
    part = cp.empty((2, rows, nb), flat.dtype)
    ext = cp.empty((2, rows), flat.dtype)
    mod.get_function(f"slice_extremes_partial_{suffix}")((nb, rows), (_EXTREMES_THREADS,), (flat, np.int64(n), part))
    mod.get_function(f"slice_extremes_final_{suffix}")((rows,), (_EXTREMES_THREADS,), (part, np.int32(nb), ext))
    return ext


def _clahe_cuda(x, clip_limit: float, ks: tuple[int, int], nbins: int, robust: tuple[float, float] | None = None,
                finite: bool = False):
    """CLAHE on the device: float32 like ``clahe``, or with ``robust = (low, high)`` uint8 like
    ``clahe_robust_scale``. ``finite``: the caller guarantees finite float input whose span fits its type
    (the preprocessing chain's own asinh output), so the one device->host copy, the check, is skipped."""
    import cupy as cp

    dt = x.dtype
    if dt.kind == "f":
        float_dtype = np.float32 if dt.itemsize <= 4 else np.float64
        suffix = "f32" if float_dtype is np.float32 else "f64"
    elif dt in (np.uint8, np.uint16):
        float_dtype, suffix = np.float64, "u8" if dt == np.uint8 else "u16"
    else:
        return None  # bool / other integers: skimage's img_as_uint first, on the host
    ky, kx = ks
    x3 = x[None] if x.ndim == 2 else x
    nz, h, w = x3.shape
    nty, ntx = -(-h // ky), -(-w // kx)
    # grid limits: tile_maps is (ntx, nty, slices), interp (w / 32, h / 8, slices); y and z <= 65535
    if nbins > _CLAHE_MAX_BINS or ky * kx >= 2**31 or nty > MAX_GRID_YZ or ntx >= 2**31 or -(-h // 8) > MAX_GRID_YZ:
        return None
    bin_dtype = np.uint8 if nbins <= 256 else np.uint16
    bsuf = "b8" if bin_dtype is np.uint8 else "b16"
    x3 = cp.ascontiguousarray(x3.astype(float_dtype, copy=False) if dt.kind == "f" else x3)
    flat = x3.reshape(nz, -1)
    # every slice's extremes stay on the device: the tables below are built there from them
    ext = slice_extremes(flat)

    mod = load_module("clahe.cu")
    kind = "float" if dt.kind == "f" else "int"
    to_bins = mod.get_function(f"{kind}_to_bins_{suffix}_{bsuf}")
    bin_tables = mod.get_function(f"clahe_bin_tables_{suffix}_{bsuf}")
    tile_maps = mod.get_function(f"clahe_tile_maps_{bsuf}")
    interp = mod.get_function(f"clahe_interp_{bsuf}")
    fsuf = "f32" if float_dtype is np.float32 else "f64"
    rowmap, colmap = _reflect_maps(x3, ky, kx, nty, ntx)
    n_pix = ky * kx
    clim = int(np.clip(clip_limit * n_pix, 1, None)) if clip_limit > 0.0 else n_pix
    scale = np.float64((NR_OF_GRAY - 1 - 0) / n_pix)
    plane = h * w
    tsize = 256 if dt == np.uint8 else 65536
    per_slice = nty * ntx * nbins * 2 + plane * (np.dtype(bin_dtype).itemsize + 2) + tsize * 2
    chunk = int(max(1, min(nz, MAX_GRID_YZ, _CLAHE_CHUNK_BYTES // per_slice)))
    out = cp.empty((nz, h, w), cp.float32 if robust is None else cp.uint8)
    # float_to_bins' per-slice (x - shift) / div, written by clahe_bin_tables (integer input leaves them unused)
    pdt = float_dtype if dt.kind == "f" else dt
    shift, div, rescale = cp.empty(nz, pdt), cp.empty(nz, pdt), cp.empty(nz, cp.int32)
    bin_div = np.uint32(1 + NR_OF_GRAY // nbins)
    if robust is not None:
        lo_i, hi_i, gamma = _linear_percentile_plan(plane, list(robust))
        plan = (np.int64(lo_i[0]), np.int64(lo_i[1]), np.int64(hi_i[0]), np.int64(hi_i[1]),
                np.float64(gamma[0]), np.float64(gamma[1]))
    for c0 in range(0, nz, chunk):
        c1 = min(nz, c0 + chunk)
        nc = c1 - c0
        src = x3[c0:c1]
        bins = cp.empty((nc, h, w), bin_dtype)
        grid, block = _grid_stride(plane, nc)
        tables = cp.empty((nc, tsize), bin_dtype)
        bin_tables(*_grid_stride(tsize, nc), (ext, np.int32(nz), np.int32(c0), np.int32(tsize), bin_div, tables,
                                              shift[c0:c1], div[c0:c1], rescale[c0:c1]))
        if dt.kind == "f":
            to_bins(grid, block, (src, bins, np.int64(plane), shift[c0:c1], div[c0:c1], rescale[c0:c1], tables))
        else:
            to_bins(grid, block, (src, bins, np.int64(plane), tables, np.int32(tsize)))
        maps = cp.empty((nc, nty, ntx, nbins), cp.uint16)
        tile_maps((ntx, nty, nc), (256,), (bins, np.int32(h), np.int32(w), rowmap, colmap, np.int32(ky),
                                           np.int32(kx), np.int32(nbins), np.int32(clim), scale, maps),
                  shared_mem=4 * nbins)
        levels = cp.empty((nc, h, w), cp.uint16)
        interp((-(-w // 32), -(-h // 8), nc), (32, 8),
               (bins, maps, np.int32(h), np.int32(w), np.int32(ky), np.int32(kx), np.int32(nty),
                np.int32(ntx), np.int32(nbins), levels))
        del maps, bins, tables
        if robust is not None:
            counts = cp.zeros((nc, NR_OF_GRAY), cp.uint32)
            count_grid = (min(-(-plane // _LEVEL_COUNT_CHUNK), 2048), nc)
            mod.get_function("clahe_level_counts")(count_grid, (256,), (levels, np.int64(plane), counts))
            u8_tables = cp.empty((nc, NR_OF_GRAY), cp.uint8)
            mod.get_function(f"clahe_robust_tables_{fsuf}")((nc,), (_ROBUST_TABLE_THREADS,),
                                                             (counts,) + plan + (u8_tables,))
            mod.get_function("clahe_final_u8")(grid, block, (levels, u8_tables, np.int64(plane), out[c0:c1]))
            continue
        lflat = levels.reshape(nc, -1)
        lext = slice_extremes(lflat)
        ftables = cp.empty((nc, NR_OF_GRAY), cp.float32)
        mod.get_function(f"clahe_final_tables_{fsuf}")(*_grid_stride(NR_OF_GRAY, nc), (lext, np.int32(nc), ftables))
        mod.get_function("clahe_final")(grid, block, (levels, ftables, np.int64(plane), out[c0:c1]))
    if dt.kind == "f" and not finite:
        # the one device->host copy of a call, after every launch: both ends of every slice. A NaN or an
        # infinity shows in them (its slices' bins are garbage, never returned)
        lo_all, hi_all = cp.asnumpy(ext)
        bad = ~(np.isfinite(lo_all) & np.isfinite(hi_all))
        if bad.any():  # the CPU raises on the first such slice, with its count
            i = int(np.flatnonzero(bad)[0])
            n = int(cp.count_nonzero(~cp.isfinite(flat[i])))
            raise ValueError(f"clahe: input has {n} NaN/Inf pixels")
        if any(_span_overflows(a, b, float_dtype) for a, b in zip(lo_all.tolist(), hi_all.tolist())):
            return None  # a slice's max - min overflows the float type: the host path halves it first
    return out[0] if x.ndim == 2 else out


def _linear_percentile_plan(n: int, q):
    """NumPy's ``percentile(..., method="linear")`` on n values: (lower index, upper index, gamma).

    Mirrors numpy's _quantile: virtual index ``(n - 1) * (q / 100)`` in float64, its floor and the
    next index clipped to the array, gamma the fractional part.
    """
    qs = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    v = (n - 1) * qs
    prev = np.floor(v)
    gamma = v - prev
    lo = np.clip(prev, 0, n - 1).astype(np.int64)
    hi = np.clip(prev + 1, 0, n - 1).astype(np.int64)
    return lo, hi, gamma


def _lerp_like_numpy(a: np.ndarray, b: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """numpy's _lerp: ``b - a`` in the data's dtype, the interpolation in float64 (gamma's dtype),
    from the upper neighbour when gamma >= 0.5."""
    diff = b - a
    out = a + diff * gamma
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), out)


def _robust_scale_cuda(x, low: float, high: float):
    import cupy as cp

    x3 = x[None] if x.ndim == 2 else x
    nz = x3.shape[0]
    s = cp.ascontiguousarray(x3.astype(cp.float32, copy=False))  # as the CPU: float32 first
    flat = s.reshape(nz, -1)
    bad = cp.asnumpy(~reduce_rows(cp.isfinite(flat), "all"))
    if bad.any():
        raise ValueError(f"robust_scale: slice {int(np.flatnonzero(bad)[0])} has NaN/Inf pixels")
    n = flat.shape[1]
    lo_i, hi_i, gamma = _linear_percentile_plan(n, [low, high])
    # NumPy's percentile, exactly: the two order statistics per quantile from a device sort, the
    # interpolation on the host in NumPy's own dtypes and order (cupy.percentile rounds differently)
    srt = cp.sort(flat, axis=1)
    a = cp.asnumpy(srt[:, cp.asarray(lo_i)])
    b = cp.asnumpy(srt[:, cp.asarray(hi_i)])
    top = cp.asnumpy(srt[:, -1])
    del srt
    p = _lerp_like_numpy(a, b, gamma[None, :])
    los = np.zeros(nz, np.float32)
    ks = np.zeros(nz, np.float32)
    valid = np.zeros(nz, np.int32)
    for i in range(nz):
        lo, hi = _robust_range(float(p[i, 0]), float(p[i, 1]), top[i].item)
        if hi > lo:
            los[i], ks[i], valid[i] = np.float32(lo), np.float32(255.0 / (hi - lo)), 1
    out = cp.empty(s.shape, cp.uint8)
    kern = load_module("elementwise.cu").get_function("robust_scale_f32")
    los, ks, valid = cp.asarray(los), cp.asarray(ks), cp.asarray(valid)
    for c0 in range(0, nz, MAX_GRID_YZ):  # slices are blockIdx.y: at most 65535 per launch
        c1 = min(nz, c0 + MAX_GRID_YZ)
        grid, block = _grid_stride(n, c1 - c0)
        kern(grid, block, (s[c0:c1], out[c0:c1], np.int64(n), los[c0:c1], ks[c0:c1], valid[c0:c1]))
    return out[0] if x.ndim == 2 else out


def _znorm_asinh_cuda(slab, znorm: "ZNorm", z0: int, normalize: bool, scale: float, do_asinh: bool = True):
    """Fused ``asinh_stretch(ZNorm.apply(slab, z0) - B, scale)`` (or ``slab.astype(float32) - B``
    without ``normalize``); None for what the CPU chain would reject or the kernels do not cover."""
    import cupy as cp

    suffix = _ZNORM_SUFFIX.get(np.dtype(slab.dtype))
    if suffix is None or slab.ndim not in (2, 3) or slab.size == 0:
        return None
    if not (np.isfinite(scale) and scale > 0):
        return None
    x3 = slab[None] if slab.ndim == 2 else slab
    nz = x3.shape[0]
    if nz > MAX_GRID_YZ or (normalize and not (0 <= z0 and z0 + nz <= znorm.nz)):
        return None
    sl = slice(z0, z0 + nz)
    if normalize:
        b = cp.asarray(znorm.background_z[sl].astype(np.float32))
        g = cp.asarray(znorm.gain[sl].astype(np.float32))
    else:
        b = g = cp.zeros(nz, cp.float32)
    x3 = cp.ascontiguousarray(x3)
    plane = x3[0].size
    out = cp.empty(x3.shape, cp.float32)
    grid, block = _grid_stride(plane, nz)
    load_module("elementwise.cu").get_function(f"znorm_asinh_{suffix}")(
        grid, block, (x3, out, np.int64(plane), b, g, np.float32(znorm.background), np.float32(scale),
                      np.int32(normalize), np.int32(do_asinh)))
    if normalize and slab.dtype.kind == "f" and not bool(cp.isfinite(out).all()):
        return None  # the plain chain raises (NaN/Inf input) or handles the overflow exactly
    return out[0] if slab.ndim == 2 else out


# -- the whole chain ------------------------------------------------------------------------------

@dataclass(slots=True)
class ExposureConfig:
    """Paper steps 1-2: z-normalization, asinh stretch, CLAHE, robust scaling (defaults: the paper's)."""

    normalize: bool = True
    asinh_scale: float = 0.0  # 0: the stack's own robust scale S from pass 1
    clahe: bool = True
    clip_limit: float = 0.01
    kernel_size: int = 32
    robust_low: float = 0.1
    robust_high: float = 99.9
    # a slice whose robust spread is at most this share of the stack's is dark (laser dropout, an empty
    # end): no signal, so it is written as 0 and no method may find vessels in it (see ZNorm)
    dark_ratio: float = 0.1
    # ... or at most this share of its neighbours' on both sides (a dropout in a sparse channel); 0: off
    dark_neighbour_ratio: float = 0.35


def _no_timer(stage):
    from contextlib import nullcontext

    return nullcontext()


def preprocess(slab, znorm: "ZNorm", z0: int = 0, cfg: ExposureConfig | None = None, timer=_no_timer,
               keep_normalized=None):
    """The per-slab chain, z-normalize -> asinh -> CLAHE -> robust scale, returning uint8.

    ``asinh`` acts on the background-subtracted intensity ``x' - B`` with scale ``S`` (the stack's
    robust spread) unless ``cfg.asinh_scale`` is set, so background sits at 0 and vessels are
    compressed logarithmically. ``timer(stage)`` is a context manager for per-stage timing;
    ``keep_normalized(norm)`` lets a caller look at the normalized slab (measurements) without a copy.
    The pipeline, training and ``gpuheart segment`` all use this one function, so a model is trained
    on exactly what it sees at inference. Slices ``znorm`` flags as dark come out as 0.
    """
    cfg = cfg or ExposureConfig()
    out = _preprocess(slab, znorm, z0, cfg, timer, keep_normalized)
    # Per-slice CLAHE and robust scaling stretch a dark slice's noise over 0..255, where every method then
    # finds "vessels" (the difference of medians marked 98 % of such a slice); it holds no signal, so 0.
    for i in np.flatnonzero(znorm.dark[z0:z0 + (slab.shape[0] if slab.ndim == 3 else 1)]):
        out[int(i) if slab.ndim == 3 else ...] = 0
    return out


def _preprocess(slab, znorm: "ZNorm", z0: int, cfg: ExposureConfig, timer, keep_normalized):
    stretched = None
    scale = cfg.asinh_scale or znorm.scale or 1.0
    if is_device_array(slab):
        if keep_normalized is not None:
            keep_normalized(znorm.apply(slab, z0) if cfg.normalize else slab.astype(np.float32))
            keep_normalized = None
        with timer("z-normalize + asinh"):  # one fused kernel
            stretched = _try_cuda("z-normalize + asinh", _znorm_asinh_cuda, slab, znorm, z0,
                                  cfg.normalize, scale)
    if stretched is None:
        with timer("z-normalize"):
            norm = znorm.apply(slab, z0) if cfg.normalize else slab.astype(np.float32)
        if keep_normalized is not None:
            keep_normalized(norm)
        with timer("asinh"):   # norm is this call's own array (apply and astype make fresh ones)
            stretched = _asinh_stretch_in_place(norm, znorm.background, scale)
    if cfg.clahe:
        with timer("clahe + robust scale"):  # fused: CLAHE levels -> histogram -> uint8 table
            if is_device_array(stretched) and _finite_by_construction(slab, znorm, scale):
                _check_percentiles(cfg.robust_low, cfg.robust_high)
                out = _try_cuda("clahe", _clahe_cuda, stretched, cfg.clip_limit, _kernel_size(cfg.kernel_size),
                                256, (cfg.robust_low, cfg.robust_high), True)
                if out is not None:
                    return out
            return clahe_robust_scale(stretched, cfg.clip_limit, cfg.kernel_size,
                                      low=cfg.robust_low, high=cfg.robust_high)
    with timer("robust scale"):
        return robust_scale(stretched, cfg.robust_low, cfg.robust_high)


def _finite_by_construction(slab, znorm: "ZNorm", scale: float) -> bool:
    """Whether the asinh stretch of this integer slab is finite without looking: |x - b_z| <= 2**32, gains
    <= 10 and B an int32-range median bound the argument by ~1e11 / S, finite for a float32 S >= 1e-20; asinh
    of a finite float32 is finite (and at most ~89, so no span overflows). Then CLAHE needs no check, nor
    the wait for it. ``scale`` is the asinh scale S the chain used."""
    return (slab.dtype.kind in "iu" and slab.dtype.itemsize <= 4 and znorm.max_gain <= 10
            and np.float32(scale) >= np.float32(1e-20) and abs(znorm.background) < 2.0**32)


def preprocess_volume(volume, cfg: ExposureConfig | None = None):
    """:func:`preprocess` for an in-memory (z, y, x) stack (or one (y, x) slice, returned as a (1, y, x)
    stack): pass 1 over its slices, then the chain; uint8 of the stack's shape."""
    if volume.ndim not in (2, 3):
        raise ValueError(f"preprocess_volume expects a (z, y, x) stack or a (y, x) slice, got shape {volume.shape}")
    if volume.ndim == 2:
        volume = volume[None]
    cfg = cfg or ExposureConfig()
    znorm = ZNorm.from_stats([slice_stats(s, z=z) for z, s in enumerate(to_host(volume))],
                             dark_ratio=cfg.dark_ratio, dark_neighbour_ratio=cfg.dark_neighbour_ratio)
    return preprocess(volume, znorm, 0, cfg)
