"""Thresholding the difference of medians into vessel masks, and combining masks.

Every threshold here is computed from the values it is given, never from the whole scan. The pipeline
thresholds the difference of medians slice by slice (:func:`threshold_slices`), so its masks do not depend
on how the scan was cut into slabs; :func:`dom_mask` thresholds whatever it is given at once (a slab: one
threshold for the slab).
"""
from __future__ import annotations

import numbers

import numpy as np

from .backend import MAX_GRID_YZ, array_module, is_device_array, load_module, to_host, try_cuda
from .exposure import slice_extremes
from .filters import difference_of_medians
from .metrics import has_fractions

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD * this = sigma for Gaussian noise
METHODS = ("otsu", "sigma", "noise")


def robust_sigma(values) -> float:
    """Noise sigma estimated as ``1.4826 * median(|v - median(v)|)`` over the finite values.

    Unlike the standard deviation it ignores a minority of bright outliers (the vessels), so on a
    DoM image it measures the background noise alone.
    """
    v = _finite(values).astype(np.float64)
    return float(MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))))


def negative_sigma(values) -> float:
    """Noise sigma of a DoM image from its negative half: ``sqrt(mean(v**2 for v < 0))``.

    Bright structures only push the difference of medians up, and noise is symmetric about 0, so
    the negative values are noise alone however much (or little) signal the image holds; for
    Gaussian noise their RMS is sigma. Unlike Otsu and the MAD this needs no assumption about the
    share of signal, which is what sparse channels (thin nerve fibres in a mostly empty volume) break.
    0 when no value is negative.
    """
    v = _finite(values)
    neg = v[v < 0].astype(np.float64)
    return float(np.sqrt(np.mean(neg * neg))) if neg.size else 0.0


# Integer data spanning fewer values than this get skimage's one-bin-per-value Otsu (the DoM of uint16
# slices spans at most 2 * 65535 + 1); wider integer data are binned as floats are (256 bins).
_OTSU_INT_BINS = 1 << 18


def threshold_value(values, method="otsu", k: float = 3.0) -> float:
    """The threshold for ``values`` (any shape; non-finite values ignored).

    ``method``:
      * ``"otsu"``: ``skimage.filters.threshold_otsu`` of the values (a constant input gives that
        constant, so ``values > threshold`` selects nothing; integers spanning 2**18 values or more are
        binned as floats, where skimage would need a bin per value);
      * ``"sigma"``: ``k * robust_sigma(values)`` = ``k * 1.4826 * MAD``. This is measured from 0,
        not from the median: it is meant for DoM values, whose background is centred on 0;
      * ``"noise"``: ``k * negative_sigma(values)``: k noise sigmas, the noise measured on the negative
        half of the DoM; for sparse channels, where Otsu splits the noise;
      * a real number: that fixed threshold.
    """
    if isinstance(method, numbers.Real) and not isinstance(method, (bool, np.bool_)):
        if not np.isfinite(method):
            raise ValueError(f"a fixed threshold must be finite, got {method!r}")
        return float(method)
    if method == "otsu":
        from skimage.filters import threshold_otsu

        v = _finite(values)
        if v.min() == v.max():  # skimage warns/varies here; the only sensible answer is the value
            return float(v.min())
        if v.dtype.kind in "iu" and int(v.max()) - int(v.min()) >= _OTSU_INT_BINS:
            # skimage gives integers one bin per value: a full-range int32 slice would need 32 GiB
            v = v.astype(np.float64)   # 256 bins, as for float data
        return float(threshold_otsu(v))
    if method in ("sigma", "noise"):
        _check_k(k)
        return float(k) * (robust_sigma(values) if method == "sigma" else negative_sigma(values))
    raise ValueError(f"unknown threshold method {method!r}: expected 'otsu', 'sigma', 'noise' or a number")


def _check_k(k) -> None:
    if not isinstance(k, numbers.Real) or isinstance(k, bool) or not np.isfinite(k) or k < 0:
        raise ValueError(f"k must be a finite non-negative number, got {k!r}")


def threshold_slices(values, method="otsu", k: float = 3.0):
    """:func:`threshold_value` of every (y, x) slice of a (z, y, x) slab, as an array of shape (z, 1, 1) of
    the slab's kind (NumPy/CuPy), ready for ``values > t``.

    For integer values (difference of medians of uint8/uint16 images) and Otsu, the per-slice histograms are
    counted where the data lives and only they (z x value range counts) come to the host, instead of every
    slice; the thresholds equal ``skimage.filters.threshold_otsu`` of each slice, which bins integer images
    the same way. For CuPy integers of at most 16 bits (planes up to 2**24 pixels) the whole computation stays
    on the device (``kernels/threshold.cu``): no device->host copy, no wait. Other cases call
    :func:`threshold_value` per slice.
    """
    xp = array_module(values)
    if values.ndim != 3:
        raise ValueError(f"threshold_slices expects a (z, y, x) slab, got shape {values.shape}")
    if method == "otsu" and is_device_array(values):
        t = _try_cuda("otsu", _otsu_cuda, values)
        if t is not None:
            return t
    if isinstance(method, numbers.Real) and not isinstance(method, (bool, np.bool_)):
        t = np.full(values.shape[0], float(method))
        if not np.isfinite(t).all():
            raise ValueError(f"a fixed threshold must be finite, got {method!r}")
    elif method == "otsu" and values.dtype.kind in "iu" and values.size \
            and int(values.max()) - int(values.min()) < _OTSU_INT_BINS:
        t = _otsu_from_histograms(values, xp)
    elif method == "noise" and values.dtype.kind in "iu" and values.size:
        _check_k(k)  # integers are finite: per-slice sums on the device, z numbers to the host
        neg = xp.minimum(values, 0).astype(xp.float64)
        count = to_host(xp.count_nonzero(neg, axis=(1, 2)))
        sq = to_host((neg * neg).sum(axis=(1, 2)))
        t = float(k) * np.sqrt(sq / np.maximum(count, 1))
    else:
        t = np.array([threshold_value(v, method, k) for v in values])
    return xp.asarray(t.reshape(-1, 1, 1))


def _otsu_from_histograms(values, xp) -> np.ndarray:
    from skimage.filters import threshold_otsu

    lo, hi = int(values.min()), int(values.max())
    nb, z = hi - lo + 1, values.shape[0]
    # one slice at a time: an int64 index of the whole slab was the largest array of pass 2 (8 bytes a voxel)
    counts = to_host(xp.stack([xp.bincount((v.astype(xp.int64) - lo).ravel(), minlength=nb) for v in values]))
    out = np.empty(z)
    for i, c in enumerate(counts):
        used = np.flatnonzero(c)
        a, b = used[0], used[-1]
        # skimage's integer histogram spans the slice's own [min, max]; a constant slice gives its value
        out[i] = lo + a if a == b else threshold_otsu(hist=(c[a:b + 1], np.arange(lo + a, lo + b + 1)))
    return out


# -- CUDA path (CuPy integer slabs of <= 16 bits): kernels/threshold.cu, equal to the host path above -------

_OTSU_SUFFIX = {np.dtype(np.uint8): "u8", np.dtype(np.int8): "i8", np.dtype(np.uint16): "u16",
                np.dtype(np.int16): "i16"}
THRESHOLD_ENTRIES = tuple(f"otsu_{k}_{s}" for k in ("hist", "threshold") for s in _OTSU_SUFFIX.values())
_OTSU_THREADS = 256            # OTSU_THREADS in kernels/threshold.cu
_OTSU_MAX_PLANE = 1 << 24      # float32 class weights (skimage's) are exact integers up to here
_OTSU_PIXELS_PER_BLOCK = 16384
_OTSU_COUNTS_BYTES = 64 << 20  # the counts of one chunk of slices (16-bit: 256 KiB a slice)
_warned: set[str] = set()


def _try_cuda(what: str, fn, *args):
    return try_cuda(what, _warned, fn, *args)


def _otsu_cuda(values):
    """Per-slice Otsu thresholds of a CuPy (z, y, x) integer slab of at most 16 bits, (z, 1, 1) float64 on
    the device, equal to :func:`_otsu_from_histograms`; None for what it does not cover.

    No device->host copy and no synchronization: the slice extremes (``exposure.slice_extremes``) stay on the device,
    where the histogram kernel reads each slice's offset and span and the Otsu kernel (one block per slice)
    writes the thresholds. The host path costs two syncs for the slab's extremes, a copy of the counts and
    skimage per slice: ~1 ms a 2048 x 2048 slice on an H200, for ~0.12 ms of kernels.
    """
    import cupy as cp

    suffix = _OTSU_SUFFIX.get(np.dtype(values.dtype))
    nz, ny, nx = values.shape
    plane = ny * nx
    if suffix is None or values.size == 0 or plane > _OTSU_MAX_PLANE:
        return None
    nbins = 256 if values.dtype.itemsize == 1 else 65536
    x = cp.ascontiguousarray(values)
    flat = x.reshape(nz, plane)
    lo, hi = slice_extremes(flat)
    mod = load_module("threshold.cu")
    hist, otsu = mod.get_function(f"otsu_hist_{suffix}"), mod.get_function(f"otsu_threshold_{suffix}")
    out = cp.empty(nz, cp.float64)
    chunk = max(1, min(nz, MAX_GRID_YZ, _OTSU_COUNTS_BYTES // (4 * nbins)))
    counts = cp.empty((chunk, nbins), cp.uint32)
    bx = max(1, min(-(-plane // _OTSU_PIXELS_PER_BLOCK), 1024))
    for c0 in range(0, nz, chunk):
        c1 = min(nz, c0 + chunk)
        cnt = counts[:c1 - c0]
        cnt.fill(0)
        hist((bx, c1 - c0), (_OTSU_THREADS,), (flat[c0:c1], np.int64(plane), lo[c0:c1], hi[c0:c1], cnt))
        otsu((c1 - c0,), (_OTSU_THREADS,), (cnt, lo[c0:c1], hi[c0:c1], out[c0:c1]))
    return out.reshape(nz, 1, 1)


def dom_mask(x, small: int = 3, large: int = 15, threshold="otsu", k: float = 3.0,
             mode: str = "reflect"):
    """Vessel mask of a slice or slab: ``difference_of_medians(x, small, large) > threshold``.

    ``threshold`` is anything :func:`threshold_value` accepts; it is computed from each slice's DoM values
    (per slice of a (z, y, x) slab, as the pipeline does: one threshold for a whole stack let its brightest
    slices set the cut for all), an Otsu threshold floored at 0 (see :func:`dom_thresholds`). Returns a bool
    array of ``x``'s shape.
    """
    dom = difference_of_medians(x, small, large, mode=mode)
    if dom.ndim == 3:
        return dom > dom_thresholds(dom, threshold, k)
    t = threshold_value(dom, threshold, k)
    return dom > (max(t, 0.0) if threshold == "otsu" else t)


def dom_thresholds(dom, method="otsu", k: float = 3.0):
    """Per-slice thresholds of a difference-of-medians slab (:func:`threshold_slices`), an Otsu
    threshold floored at 0.

    A vessel is brighter than its surroundings, so a DoM at or below 0 is never one; yet Otsu of a
    nearly flat slice's DoM (mostly exact zeros, a few steps of one grey level either way) can cut
    below 0 and mark the whole slice. Otsu thresholds of real slices are far above 0, so the floor
    changes nothing there.
    """
    t = threshold_slices(dom, method, k)
    return array_module(t).maximum(t, 0) if method == "otsu" else t


def union(*masks):
    """Element-wise OR of one or more masks of the same shape, as a new bool array. Probability maps are
    refused: taken as ``!= 0`` every pixel of one would be vessel."""
    if not masks:
        raise ValueError("union needs at least one mask")
    shape = masks[0].shape
    for i, m in enumerate(masks):
        if m.shape != shape:
            raise ValueError(f"union needs masks of one shape, got {shape} and {m.shape}")
        if has_fractions(m):
            raise ValueError(f"union: mask {i + 1} has float values between 0 and 1 (or NaN), a probability map, "
                             "not a mask: threshold it first, e.g. prob > model.meta['threshold']")
    xp = array_module(masks[0])
    out = xp.array(masks[0], dtype=bool, copy=True)
    for m in masks[1:]:
        out |= m.astype(bool, copy=False)
    return out


def _finite(values) -> np.ndarray:
    v = np.asarray(to_host(values)).ravel()
    if v.dtype.kind == "f":
        v = v[np.isfinite(v)]
    elif v.dtype.kind == "b":
        v = v.view(np.uint8)
    elif v.dtype.kind not in "iu":
        raise TypeError(f"threshold needs numeric values, got dtype {v.dtype}")
    if v.size == 0:
        raise ValueError("cannot compute a threshold from no (finite) values")
    # keep the dtype: threshold_otsu bins integer images exactly, floats into 256 bins
    return v
