"""Binary post-processing of vessel masks: closings along z and in 3D, connected components.

Border semantics (deliberate): a closing here never shrinks an object where it touches the
volume faces. Voxels outside the volume are "unknown" and take the value of the nearest voxel
inside (replicate / ``'nearest'`` extension). Each closing is therefore *defined* as the
literal SciPy composition

    pad = np.pad(mask, reach, mode="edge")                    # reach = dilation + erosion reach
    out = binary_erosion(binary_dilation(pad, s, k), s, k)[crop]

with ``scipy.ndimage`` defaults (``border_value=0``). Padding by the full reach (not half) makes
the cropped result equal the closing of the infinitely replicated volume: SciPy's zero border
can only disturb voxels closer than the reach to the padded edge. With this choice a closing
is extensive (``out >= mask`` everywhere), which SciPy's ``binary_closing`` (erosion with a
zero border) is not.

Streaming: every closing only looks ``reach`` voxels away, so a slab read with a z halo of
:func:`reach` voxels (clipped at the volume, where the same edge padding applies) gives the
whole-volume answer exactly. Connected components across slabs are joined by a union-find over
the faces between adjacent slabs (:func:`label_slabs`).

``read_slab(z0, z1)`` is any callable returning the (z1 - z0, y, x) part of a (z, y, x) volume,
e.g. ``functools.partial(scan.read_slab, channel)`` or a zarr/NumPy slice.
"""
from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .backend import MAX_GRID_YZ, is_device_array, is_device_oom, load_module, to_device, to_host
from .metrics import has_fractions

ReadSlab = Callable[[int, int], np.ndarray]


# -- closings on whole arrays ------------------------------------------------------------------

def _check_odd(name: str, size: int) -> int:
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd positive integer, got {size}")
    return size


def _check_iterations(name: str, n: int) -> int:
    # a count (0: no z closing), not scipy's "iterations < 1 repeats until nothing changes"
    n = int(n)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _check_mask(mask) -> None:
    """A (z, y, x) binary mask; a probability map would count every value above 0 as vessel."""
    if mask.ndim != 3:
        raise ValueError(f"the closings take a (z, y, x) mask, got shape {mask.shape}; a single slice is mask[None]")
    if has_fractions(mask):
        raise ValueError("the closings take a binary mask (bool, 0/1 or 0/255), got float values between 0 "
                         "and 1 (a probability map?): threshold it first, e.g. prob >= 0.5")


def _closing_padded(mask: np.ndarray, structure: np.ndarray, iterations: int,
                    pad: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Closing of ``mask`` edge-padded by ``pad`` (per axis, before/after), cropped back."""
    padded = np.pad(np.asarray(mask, dtype=bool), pad, mode="edge")
    if structure.all() and iterations >= 1 and all(n % 2 for n in structure.shape):
        # A box (the paper's line and cube): k dilations by a box of side n are one dilation by a box of side
        # (n - 1) k + 1, with zeros outside as SciPy's border_value=0 has it, and a box is separable, so
        # running max/min filters give the same voxels faster than binary_dilation's k passes (4x on a
        # 48 x 1024 x 1024 mask, both closings: benchmarks/bench_morphology.py, results/cpu-morphology.json).
        size = tuple((n - 1) * iterations + 1 for n in structure.shape)
        out = _box(_box(padded.view(np.uint8), size, np.maximum), size, np.minimum).view(bool)
    else:
        out = ndi.binary_dilation(padded, structure, iterations=iterations)
        out = ndi.binary_erosion(out, structure, iterations=iterations)
    crop = tuple(slice(b, out.shape[i] - a) for i, (b, a) in enumerate(pad))
    return out[crop]


def _box(u8: np.ndarray, size: tuple[int, ...], op) -> np.ndarray:
    """``op`` (np.maximum: dilation, np.minimum: erosion) over a centred box of odd ``size``, zeros outside the
    array: scipy.ndimage's maximum/minimum_filter with mode="constant", cval=0."""
    out = u8
    for axis, n in enumerate(size):
        if n == 1:
            continue
        if axis == 0:   # SciPy's 1-D filters copy each strided z-line: whole planes at a time is ~5x faster
            out = _planes(out, n, op)
        else:
            f = ndi.maximum_filter1d if op is np.maximum else ndi.minimum_filter1d
            out = f(out, n, axis=axis, mode="constant", cval=0)
    return out


def _planes(x: np.ndarray, n: int, op) -> np.ndarray:
    """``op`` over the centred window of ``n`` (odd) planes along axis 0, zeros beyond the ends: windows of
    1, 2, 4, ... planes by doubling, then one window of n from the powers of two that sum to n."""
    r = n // 2
    p = np.zeros((x.shape[0] + 2 * r, *x.shape[1:]), x.dtype)
    p[r:r + x.shape[0]] = x
    powers, w, length = {1: p}, p, 1   # w[i] = op over p[i:i + length]
    while 2 * length <= n:
        w = op(w[:-length], w[length:])
        length *= 2
        powers[length] = w
    out, start = None, 0
    for length in sorted(powers, reverse=True):
        if n - start >= length:
            part = powers[length][start:start + x.shape[0]]
            out = part.copy() if out is None else op(out, part, out=out)
            start += length
    return out


def _z_pad(r: int, z_edges: tuple[bool, bool]) -> tuple[int, int]:
    return (r if z_edges[0] else 0, r if z_edges[1] else 0)


def close_z(mask: np.ndarray, size: int = 5, iterations: int = 5, *,
            z_edges: tuple[bool, bool] = (True, True)) -> np.ndarray:
    """Closing along z with a ``1 x 1 x size`` line, ``iterations`` dilations then as many erosions.

    Bridges gaps of up to ``(size - 1) * iterations`` slices in z (light-sheet stripes and
    dropouts) without touching (y, x). Out-of-volume slices replicate the nearest slice (module
    docstring). ``z_edges`` says which z ends of ``mask`` are the volume's faces; internal ends
    (slab halos) are not padded, so the caller's halo must cover :func:`reach`.
    """
    size, iterations = _check_odd("size", size), _check_iterations("iterations", iterations)
    _check_mask(mask)
    r = 2 * (size // 2) * iterations
    if is_device_array(mask):
        return _on_device("close_z", _close_z_cuda, mask, (size // 2) * iterations, z_edges,
                          lambda m: close_z(m, size, iterations, z_edges=z_edges))
    if r == 0 or mask.size == 0:
        return np.asarray(mask, dtype=bool).copy()
    structure = np.ones((size, 1, 1), dtype=bool)
    return _closing_padded(mask, structure, iterations, (_z_pad(r, z_edges), (0, 0), (0, 0)))


def close_3d(mask: np.ndarray, size: int = 3, *,
             z_edges: tuple[bool, bool] = (True, True)) -> np.ndarray:
    """One closing with a ``size``-cube; out-of-volume voxels replicate the nearest voxel."""
    size = _check_odd("size", size)
    _check_mask(mask)
    r = 2 * (size // 2)
    if is_device_array(mask):
        return _on_device("close_3d", _close_cube_cuda, mask, size // 2, z_edges,
                          lambda m: close_3d(m, size, z_edges=z_edges))
    if r == 0 or mask.size == 0:
        return np.asarray(mask, dtype=bool).copy()
    structure = np.ones((size,) * 3, dtype=bool)
    return _closing_padded(mask, structure, 1, (_z_pad(r, z_edges), (r, r), (r, r)))


def postprocess(mask: np.ndarray, z_size: int = 5, z_iterations: int = 5, size3d: int = 3, *,
                z_edges: tuple[bool, bool] = (True, True)) -> np.ndarray:
    """The paper's post-processing: :func:`close_z` then :func:`close_3d` (whole-array reference)."""
    out = close_z(mask, z_size, z_iterations, z_edges=z_edges)
    return close_3d(out, size3d, z_edges=z_edges)


# -- CUDA paths (CuPy masks): kernels/morphology.cu, equal voxel for voxel to the closings above ------

MORPHOLOGY_ENTRIES = ("close_z_line", "close_cube")
_CUBE_TILE = (4, 8, 32)  # CUBE_TZ, CUBE_TY, CUBE_TX in kernels/morphology.cu
_SHARED_LIMIT = 48 * 1024  # the default per-block limit; larger cubes run on the host
_warned: set[str] = set()


def _on_device(what: str, fn, mask, h: int, z_edges, host):
    """CuPy in, CuPy out: the kernel when it covers the call, else the host reference (a one-time
    warning when the kernel failed rather than being out of scope)."""
    out = None
    if h >= 0 and mask.ndim == 3:
        if h == 0 or mask.size == 0:
            return mask.astype(bool, copy=True)
        try:
            out = fn(mask, h, z_edges)
        except Exception as err:  # noqa: BLE001 - compile/launch failure: degrade to the host path
            if is_device_oom(err):
                raise  # the caller decides: pass 3 closes that slab on the host (postprocess_slabs)
            if what not in _warned:
                _warned.add(what)
                warnings.warn(f"{what}: the CUDA kernel failed ({type(err).__name__}: {err}); "
                              "using the host path", RuntimeWarning, stacklevel=3)
    if out is None:  # also where the CPU reference raises (bad shape)
        out = to_device(host(to_host(mask)), "cuda")
    return out


def _as_u8(mask):
    import cupy as cp

    return cp.ascontiguousarray(mask.astype(cp.bool_, copy=False)).view(cp.uint8)


def _close_z_cuda(mask, radius: int, z_edges):
    """One pass of radius ``iterations * (size // 2)``: scipy's iterated line dilations (erosions)
    with a zero border equal one longer line on an interval (tests/test_kernels_morphology.py)."""
    import cupy as cp

    m = _as_u8(mask)
    nz, ny, nx = m.shape
    if nz + 4 * radius >= 2**30:
        return None
    out = cp.empty(m.shape, cp.bool_)
    plane = ny * nx
    load_module("morphology.cu").get_function("close_z_line")(
        (-(-plane // 256),), (256,), (m, out, np.int32(nz), np.int64(plane), np.int32(radius),
                                     np.int32(bool(z_edges[0])), np.int32(bool(z_edges[1]))))
    return out


def cube_shared_bytes(h: int) -> int:
    """Shared memory of one close_cube block: input tile with a 2h halo plus dilation with an h halo."""
    tz, ty, tx = _CUBE_TILE
    return (tz + 4 * h) * (ty + 4 * h) * (tx + 4 * h) + (tz + 2 * h) * (ty + 2 * h) * (tx + 2 * h)


def _close_cube_cuda(mask, h: int, z_edges):
    import cupy as cp

    shared = cube_shared_bytes(h)
    if shared > _SHARED_LIMIT:
        return None
    m = _as_u8(mask)
    nz, ny, nx = m.shape
    tz, ty, tx = _CUBE_TILE
    grid = (-(-nx // tx), -(-ny // ty), -(-nz // tz))
    if max(grid[1], grid[2]) > MAX_GRID_YZ:
        return None
    out = cp.empty(m.shape, cp.bool_)
    load_module("morphology.cu").get_function("close_cube")(
        grid, (256,), (m, out, np.int32(nz), np.int32(ny), np.int32(nx), np.int32(h),
                       np.int32(bool(z_edges[0])), np.int32(bool(z_edges[1]))), shared_mem=shared)
    return out


def reach(z_size: int = 5, z_iterations: int = 5, size3d: int = 3) -> int:
    """Total z reach of :func:`postprocess` (all dilations + erosions): the halo a slab needs."""
    z_size, size3d = _check_odd("z_size", z_size), _check_odd("size3d", size3d)
    z_iterations = _check_iterations("z_iterations", z_iterations)
    return 2 * (z_size // 2) * z_iterations + 2 * (size3d // 2)


def _check_shape(shape) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape) < 0:
        raise ValueError(f"shape must be the mask's (z, y, x), got {tuple(shape)}")
    return tuple(int(n) for n in shape)


def _read_mask(read_slab: ReadSlab, shape, z0: int, z1: int) -> np.ndarray:
    """``read_slab(z0, z1)`` as a host bool array, refused unless it has the shape asked for and is a mask
    (a probability map taken as ``!= 0`` would be all vessel)."""
    slab = read_slab(z0, z1)
    if np.shape(slab) != (z1 - z0, *shape[1:]):
        raise ValueError(f"read_slab({z0}, {z1}) returned shape {np.shape(slab)}; expected "
                         f"{(z1 - z0, *shape[1:])} for a mask of shape {tuple(shape)}")
    slab = np.asarray(slab)
    if has_fractions(slab):
        raise ValueError(f"read_slab({z0}, {z1}) returned float values between 0 and 1 (or NaN), a probability "
                         "map, not a mask: threshold it first")
    return slab.astype(bool, copy=False)


def _slab_ranges(nz: int, slab_size: int) -> Iterator[tuple[int, int]]:
    if slab_size < 1:
        raise ValueError(f"slab_size must be >= 1, got {slab_size}")
    for z0 in range(0, nz, slab_size):
        yield z0, min(z0 + slab_size, nz)


def postprocess_slabs(read_slab: ReadSlab, shape: tuple[int, int, int], slab_size: int,
                      z_size: int = 5, z_iterations: int = 5, size3d: int = 3, device: str = "cpu",
                      ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Stream :func:`postprocess` over z: yields ``(z0, z1, mask[z0:z1])`` (NumPy) equal to the whole result.

    Each slab is read with a halo of :func:`reach` slices on both sides (clipped to the volume).
    Peak memory is one slab plus ``2 * reach`` slices, and SciPy's temporaries of one band of rows
    (:func:`_postprocess_in_bands`). With ``device="cuda"``
    each slab is closed on the GPU by the kernels (same voxels) and only the result comes back.
    """
    h = reach(z_size, z_iterations, size3d)
    shape = _check_shape(shape)
    nz = shape[0]
    warned = False
    for z0, z1 in _slab_ranges(nz, slab_size):
        a, b = max(0, z0 - h), min(nz, z1 + h)
        block = _read_mask(read_slab, shape, a, b)
        edges = (a == 0, b == nz)
        core = slice(z0 - a, z1 - a)
        if device == "cpu":
            out = _postprocess_in_bands(block, core, z_size, z_iterations, size3d, edges)
            del block   # else it lives on while the next block is read: two blocks at the peak
            yield z0, z1, out
            continue
        try:
            out = postprocess(to_device(block, device), z_size, z_iterations, size3d, z_edges=edges)
            out = to_host(out[core])   # only the slab comes back, not its halo
        except Exception as err:
            if not is_device_oom(err):
                raise
            # the host path gives the same voxels; a run hours in should not end over its cheapest pass
            if not warned:
                warnings.warn(f"out of device memory closing slices {a}..{b}: closing such slabs on the host "
                              "(same result, slower)", RuntimeWarning, stacklevel=2)
                warned = True
            out = _postprocess_in_bands(block, core, z_size, z_iterations, size3d, edges)
        del block
        yield z0, z1, out


BAND_VOXELS = 1 << 23   # host closings work on bands of rows of about this many voxels (8 MiB of bool)


def _postprocess_in_bands(block: np.ndarray, core: slice, z_size: int, z_iterations: int, size3d: int,
                          z_edges: tuple[bool, bool]) -> np.ndarray:
    """``postprocess(block)[core]`` computed a band of rows at a time. The z-closing works column by column and
    the cube closing reaches ``2 * (size3d // 2)`` rows either way, so a band read with that many extra rows
    gives exactly the whole block's rows, while SciPy's padded copies and outputs are a band's size, not the
    block's (with a z halo of :func:`reach` slices a block is several slabs deep: on 2048² slices those
    copies were over 1 GiB, the host peak of a run)."""
    nzb, ny, nx = block.shape
    hy = 2 * (size3d // 2)
    rows = max(1, BAND_VOXELS // max(1, nzb * nx))
    out = np.empty((core.stop - core.start, ny, nx), bool)
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        ya, yb = max(0, y0 - hy), min(ny, y1 + hy)
        part = postprocess(block[:, ya:yb], z_size, z_iterations, size3d, z_edges=z_edges)
        out[:, y0:y1] = part[core, y0 - ya:y1 - ya]
    return out


# -- connected components ----------------------------------------------------------------------

def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1 (faces), 2 (edges) or 3 (corners), got {connectivity}")
    return ndi.generate_binary_structure(3, connectivity)


def _check_min_voxels(min_voxels) -> None:
    if isinstance(min_voxels, (bool, np.bool_)) or not isinstance(min_voxels, (int, np.integer)) or min_voxels < 0:
        raise ValueError(f"min_voxels must be an integer >= 0, got {min_voxels!r}")


def remove_small(mask: np.ndarray, min_voxels: int, connectivity: int = 1) -> np.ndarray:
    """Whole-array reference: drop components (``scipy.ndimage.label``) with fewer than ``min_voxels``."""
    _check_min_voxels(min_voxels)
    labels, _ = ndi.label(mask, _structure(connectivity))
    sizes = np.bincount(labels.ravel(), minlength=1)  # an empty volume has no background label either
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


@dataclass
class SlabLabels:
    """Result of :func:`label_slabs`: everything needed to relabel slabs, never the labels themselves.

    ``sizes[k]`` is the voxel count of component ``k`` (``sizes[0] = 0``); components are numbered
    ``1..n`` in raster order of their first voxel, exactly as ``scipy.ndimage.label`` numbers them.
    ``offsets[i]`` is the provisional-label offset of slab ``i``; ``final[p]`` maps provisional
    label ``p`` (``final[0] = 0``) to its component. ``box_lo[k - 1]`` / ``box_hi[k - 1]`` are the
    (z, y, x) bounding box of component ``k``, ``hi`` exclusive (``ndi.find_objects``' slices).
    """
    shape: tuple[int, int, int]
    slab_size: int
    connectivity: int
    sizes: np.ndarray
    offsets: list[int] = field(repr=False)
    final: np.ndarray = field(repr=False)
    box_lo: np.ndarray = field(default=None, repr=False)
    box_hi: np.ndarray = field(default=None, repr=False)

    @property
    def n_components(self) -> int:
        return len(self.sizes) - 1

    def relabel(self, read_slab: ReadSlab, z_range: tuple[int, int] | None = None, workers: int = 1
                ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(z0, z1, labels[z0:z1])`` with global component numbers (re-labels each slab); with
        ``z_range=(a, b)`` only the slabs that overlap slices ``[a, b)`` are read. ``workers``: slabs
        relabelled at once in threads, as in :func:`label_slabs` (the order of what is yielded is the same)."""
        st = _structure(self.connectivity)
        dtype = np.int32 if self.n_components < 2**31 - 1 else np.int64
        a, b = z_range or (0, self.shape[0])
        todo = [(z0, z1, off) for (z0, z1), off in zip(_slab_ranges(self.shape[0], self.slab_size), self.offsets)
                if z1 > a and z0 < b]

        def one(job):
            z0, z1, off = job
            lab, k = ndi.label(_read_mask(read_slab, self.shape, z0, z1), st)
            # the slab's own labels 0..k straight to components: one gather, no int64 copy of the slab
            table = self.final[off:off + k + 1].astype(dtype)
            table[0] = 0
            return z0, z1, table[lab]

        yield from _in_order(one, todo, workers)


def _face_pairs(below: np.ndarray, above: np.ndarray, connectivity: int) -> np.ndarray:
    """(k, 2) pairs of labels joined across the z face between slice ``below`` and ``above``, unique, sorted."""
    ny, nx = below.shape
    # from the labelled pixels of ``below`` only (a vessel mask has a few per cent): whole-plane
    # comparisons for each of the nine offsets cost more than the labelling of the slab's last plane
    ys, xs = np.nonzero(below)
    lb = below[ys, xs]
    pairs = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if abs(dy) + abs(dx) + 1 > connectivity:
                continue
            # below[y, x] touches above[y + dy, x + dx]
            yy, xx = ys + dy, xs + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            la = np.zeros(len(ys), above.dtype)
            la[inside] = above[yy[inside], xx[inside]]
            both = la > 0
            pairs.append(np.stack([lb[both], la[both]], axis=1))
    pairs = np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
    if not len(pairs):
        return pairs
    # unique rows through one int64 key per row: np.unique(axis=0) sorts rows as structured items, several
    # times slower, and was a sixth of the labelling of a 2048x2048 mask; the same rows in the same order
    m = int(pairs[:, 1].max()) + 1
    if int(pairs[:, 0].max()) >= (2**63 - 1) // m:   # the key would overflow (over 3e9 labels)
        return np.unique(pairs, axis=0)
    keys = np.unique(pairs[:, 0] * m + pairs[:, 1])
    return np.stack([keys // m, keys % m], axis=1)


def label_slabs(read_slab: ReadSlab, shape: tuple[int, int, int], slab_size: int,
                connectivity: int = 1, workers: int = 1) -> SlabLabels:
    """Connected components of a mask streamed in z slabs (one pass).

    Each slab is labelled with ``scipy.ndimage.label``; labels of adjacent slabs that touch
    across their shared face (with the given connectivity: 1 = 6-, 2 = 18-, 3 = 26-neighbours)
    are joined by ``scipy.sparse.csgraph.connected_components``. The partition and numbering
    equal ``scipy.ndimage.label`` on the whole volume.

    ``workers`` slabs are read and labelled at once in threads (SciPy's labelling releases the GIL), so
    ``read_slab`` must be safe to call from several threads; that many slabs, each with its int64 labels,
    are in memory at a time. The result does not depend on ``workers``.
    """
    st = _structure(connectivity)
    shape = _check_shape(shape)
    offsets, sizes, edges, boxes = [], [np.zeros(1, np.int64)], [], [np.zeros((0, 6), np.int64)]
    n = 0
    prev_last = None
    ranges = list(_slab_ranges(shape[0], slab_size))
    for k, slab_sizes, slab_boxes, first, last in _in_order(lambda r: _label_slab(read_slab, shape, *r, st), ranges,
                                                            workers):
        boxes.append(slab_boxes)
        offsets.append(n)
        sizes.append(slab_sizes)
        if prev_last is not None:   # pairs of the slabs' own labels, shifted as the labels would be
            edges.append(_face_pairs(prev_last, first, connectivity) + [offsets[-2], n])
        prev_last = last
        n += k
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n + 1, n + 1))
    _, cc = connected_components(graph, directed=False)
    # number components by their smallest provisional label = raster order of first voxel
    _, first = np.unique(cc[1:], return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(1, len(first) + 1)
    final = np.zeros(n + 1, np.int64)
    final[1:] = rank[np.unique(cc[1:], return_inverse=True)[1]]
    prov_sizes = np.concatenate(sizes)
    comp_sizes = np.bincount(final, weights=prov_sizes, minlength=len(first) + 1).astype(np.int64)
    comp_sizes[0] = 0
    prov_boxes = np.concatenate(boxes)
    lo = np.full((len(first) + 1, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((len(first) + 1, 3), np.int64)
    np.minimum.at(lo, final[1:], prov_boxes[:, :3])
    np.maximum.at(hi, final[1:], prov_boxes[:, 3:])
    return SlabLabels(tuple(shape), slab_size, connectivity, comp_sizes, offsets, final, lo[1:], hi[1:])


def _label_slab(read_slab: ReadSlab, shape, z0: int, z1: int, st: np.ndarray):
    """What :func:`label_slabs` keeps of one slab's own labelling: (label count k, voxels of labels 1..k,
    their (k, 6) boxes with z in the volume, the labels of the slab's first and last slices)."""
    # int64 labels: np.bincount would otherwise make an int64 copy of the slab
    lab, k = ndi.label(_read_mask(read_slab, shape, z0, z1), st, output=np.int64)
    boxes = np.array([(b[0].start + z0, b[1].start, b[2].start, b[0].stop + z0, b[1].stop, b[2].stop)
                      for b in ndi.find_objects(lab)], np.int64).reshape(-1, 6)
    sizes = np.bincount(lab.ravel(), minlength=k + 1)[1:]
    return k, sizes, boxes, lab[0].copy(), lab[-1].copy()


def _in_order(fn, items: list, workers: int) -> Iterator:
    """``map(fn, items)``, with up to ``workers`` calls running at once in threads; results in order."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="gpuheart-label") as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:   # an error or an early stop: what has not started need not run
            for fut in pending:
                fut.cancel()


def remove_small_slabs(read_slab: ReadSlab, shape: tuple[int, int, int], slab_size: int,
                       min_voxels: int, connectivity: int = 1,
                       ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(z0, z1, mask[z0:z1])`` without components under ``min_voxels`` (two passes).

    Equals :func:`remove_small` on the whole volume.
    """
    _check_min_voxels(min_voxels)
    labels = label_slabs(read_slab, shape, slab_size, connectivity)
    keep = labels.sizes >= min_voxels
    keep[0] = False
    for z0, z1, lab in labels.relabel(read_slab):
        yield z0, z1, keep[lab]
