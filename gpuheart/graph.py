"""The vascular tree as a graph: skeleton -> branch points, end points and branches.

:func:`skeleton_graph` thins a (z, y, x) bool mask to a one-voxel curve skeleton
(Lee's 3-D method, our own :func:`thin`: scikit-image's erases tubes of even width) and turns it into a
:class:`VesselGraph`: nodes are end points and branch points, edges are branches with their
voxel path, length, radius and tortuosity. :func:`largest_tree` keeps the largest
26-connected component of a mask, the paper's "connected vascular tree".

Skeleton -> graph (our own, on ``scipy.sparse``; no extra dependency). Two skeleton voxels
are adjacent when they are 26-neighbours. A voxel with one neighbour is an end point, with
none an isolated point; voxels with three or more neighbours are junction voxels, and
26-connected junction voxels form one branch point (Lee's skeleton often leaves a few of
them side by side where vessels meet). Every other voxel has exactly two neighbours, so a
branch is traced voxel by voxel from a node until the next node. A closed ring without any
node gets one node of degree 2 so that it still appears (as a self-loop). Rarely, a cluster of
junction voxels has only two exits (Lee leaves a 3-voxel triangle); it stays a node of degree
2. Spurs of one or two voxels are removed by the thinning (:func:`thin`); longer short spurs from surface
bumps are kept as branches: filter the branch table by length or length / radius downstream.

Measures, all in µm with anisotropic ``voxel_size`` (z, y, x) respected:

- ``length_um``: length of the voxel path, measured after a 7-point moving average
  (:func:`path_length`; raw 26-neighbour steps overestimate oblique vessels by ~9-15%).
  A branch starts and ends on a voxel of its nodes, so lengths add up along the tree (the
  one or two voxels inside a multi-voxel branch point are not counted). At a blunt (flat) vessel end the
  curve skeleton stops up to about one radius short of the tip; at a rounded end it reaches the centre of
  the rounding, within about a voxel, along every axis (:func:`thin` paces its passes by the voxel size).
- ``mean_radius_um`` / ``max_radius_um``: the Euclidean distance transform of the mask
  (``sampling=voxel_size``, outside the array counts as background) sampled on the path:
  distance from the skeleton voxel to the nearest *background voxel centre*. For a vessel
  thresholded at voxel centres this is the radius plus less than one voxel (measured on
  discs: +0.4 voxel at r = 1, +0.16 at r = 3, +0.05 at r = 10); no half-voxel correction is
  applied because along oblique directions background voxels lie much closer to the wall
  than half a voxel. Radii of vessels only a few voxels across (especially across coarse z
  voxels) are correspondingly rough: a vessel of r = 4 µm running obliquely through 5 x 1 x 1 µm
  voxels measured 3.3 µm, where its skeleton steps off the axis by a z voxel.
- ``tortuosity``: path length / straight distance between the path's end voxels (NaN for a
  loop, whose ends coincide).

The thinning peels every axis at the same pace in µm (:func:`thin`), so a vessel's skeleton ends about as
far from its tips along z as along x; the skeleton's voxels are still those of the grid.

Memory and the whole heart (honest limits): this works on one in-memory array. Peak use is
about 17 bytes per voxel of the array passed where the mask is dense (SciPy's int32 feature
transform, 12 bytes, for the radii, computed in a second thread while the skeleton is thinned; padded
copies; Lee's thinning about 1 byte, plus 17 per object voxel), about 4 where
it is sparse enough for the radii's k-d tree (:func:`radii_at`), and time about 0.2 s per million
voxels on one CPU core (measured on the phantom, 25 M voxels in 5 s). A whole-heart mask at
full resolution (~10^10-10^11 voxels) cannot be done this way. What works:

1. :func:`largest_tree` with ``crop=True`` (the tree cropped to its bounding box), and
2. ``downsample=k`` in :func:`skeleton_graph`: ``k x k`` max-pooling in (y, x) (z is usually
   already the coarse axis of a light-sheet scan), ``voxel_size`` scaled to match. Max-pooling
   keeps thin vessels connected; radii below ``k`` voxels become unreliable.

For masks too large for even that, run :func:`gpuheart.morphology.label_slabs` to find the
largest component, read only its bounding box, and downsample before calling this.
"""
from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components
from numba import njit
from skimage.morphology import skeletonize

CSV_COLUMNS = ("id", "node_u", "node_v", "length_um", "mean_radius_um", "max_radius_um",
               "tortuosity", "u_z_um", "u_y_um", "u_x_um", "v_z_um", "v_y_um", "v_x_um",
               "n_voxels")


@dataclass
class Branch:
    """One edge of the vessel graph: the skeleton path between nodes ``u`` and ``v``.

    ``path`` is (n, 3) int64 voxel indices (z, y, x) in the grid that was skeletonized (after
    ``downsample``), from node ``u`` to node ``v``, both node voxels included.
    """
    id: int
    u: int
    v: int
    path: np.ndarray = field(repr=False)
    length_um: float
    mean_radius_um: float
    max_radius_um: float
    tortuosity: float


@dataclass
class VesselGraph:
    """Nodes (end points, branch points) and branches (edges) of a vessel skeleton.

    ``node_pos_um`` is (n_nodes, 3) positions (z, y, x) in µm (``origin_um`` added; a branch
    point sits at the mean of its junction voxels). ``node_degree[i]`` counts branch ends at
    node ``i`` (a self-loop counts twice), so end points have degree 1 and branch points >= 3.
    ``voxel_size`` is that of the skeletonized grid (after ``downsample``).
    """
    node_pos_um: np.ndarray
    node_degree: np.ndarray
    branches: list[Branch]
    voxel_size: tuple[float, float, float]
    origin_um: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def n_nodes(self) -> int:
        return len(self.node_degree)

    @property
    def end_points(self) -> np.ndarray:
        return np.flatnonzero(self.node_degree == 1)

    @property
    def branch_points(self) -> np.ndarray:
        return np.flatnonzero(self.node_degree >= 3)

    def to_networkx(self):
        """A ``networkx.MultiGraph`` (parallel branches and loops kept), plain-number attributes.

        Nodes carry ``z_um, y_um, x_um`` (float) and ``degree`` (int); edges carry the branch
        ``id`` (int, also the edge key), the measures (float) and ``n_voxels`` (int). Voxel
        paths are left out (GraphML holds scalars only); they stay in :attr:`branches`.
        """
        import networkx as nx  # only needed for export
        g = nx.MultiGraph()
        for i, (pos, deg) in enumerate(zip(self.node_pos_um, self.node_degree)):
            g.add_node(i, z_um=float(pos[0]), y_um=float(pos[1]), x_um=float(pos[2]),
                       degree=int(deg))
        for b in self.branches:
            g.add_edge(b.u, b.v, key=b.id, id=b.id, length_um=float(b.length_um),
                       mean_radius_um=float(b.mean_radius_um),
                       max_radius_um=float(b.max_radius_um),
                       tortuosity=float(b.tortuosity), n_voxels=len(b.path))
        return g


# -- masks -------------------------------------------------------------------------------------

def largest_tree(mask: np.ndarray, crop: bool = False):
    """The largest 26-connected component of ``mask`` (by voxels): the connected vascular tree.

    Returns a bool mask of the same shape, or with ``crop=True`` a tuple ``(tree, origin)``:
    the tree cut to its bounding box and the box's first voxel (z, y, x) in ``mask``
    (pass ``origin_um=origin * voxel_size`` to :func:`skeleton_graph` to keep positions in
    the frame of ``mask``). An empty mask gives an empty result (origin 0). In memory: an
    int32 label array the size of ``mask``; for streamed volumes see
    :func:`gpuheart.morphology.label_slabs`.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:   # scipy said only "structure and input must have equal rank"
        raise ValueError(f"mask must be 3-D (z, y, x), got shape {mask.shape}")
    labels, n = ndi.label(mask, np.ones((3, 3, 3), bool))
    if n == 0:
        tree = np.zeros_like(mask)
        return (tree, np.zeros(3, np.int64)) if crop else tree
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = int(np.argmax(sizes))  # ties: the first in raster order, as ndi.label numbers them
    if not crop:
        return labels == keep
    box = ndi.find_objects(labels, max_label=keep)[keep - 1]
    origin = np.array([s.start for s in box], np.int64)
    return labels[box] == keep, origin


def skeleton(mask: np.ndarray, voxel_size=None) -> np.ndarray:
    """The curve skeleton of a bool mask: Lee's directional thinning in 3-D (:func:`thin`, aware of a
    (z, y, x) ``voxel_size``), scikit-image's ``skeletonize`` for a 2-D slice. Every connected component
    keeps at least one voxel."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    if mask.ndim != 3:
        return skeletonize(mask)
    return thin(mask, (1.0, 1.0, 1.0) if voxel_size is None else voxel_size)


def thin(mask: np.ndarray, voxel_size=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Lee, Kashyap & Chu (1994) 3-D curve thinning of a (z, y, x) bool mask, outside the array background.

    Our own because scikit-image's (<= 0.26, issue #3757) checks only part of the topology in its
    sequential pass: it erases straight tubes of even width (a 4x4 or r = 4 tube of 90 voxels left nothing)
    and a fifth of the small blobs of a random mask. Here both passes delete only simple points
    (one 26-component of object and one 6-component of background in the 3x3x3 neighbourhood, which keeps
    components, holes and tunnels) that are not the end of a curve (at least two object neighbours); then
    spurs of up to two voxels are removed (:func:`_prune_spurs`). With anisotropic ``voxel_size`` (z, y, x)
    the passes along a coarse axis run less often (in proportion to the voxel sizes), so that every pass
    peels about the same µm: thinned on the grid alone, a vessel along z with 5 µm z steps and 1 µm pixels
    lost about three radii at each end (a 90 µm capsule measured 60 µm). The result is not voxel-for-voxel
    scikit-image's. A pass looks only at border voxels not known to be undeletable (:func:`_thin`), with the
    same result as testing every voxel (tested), 1.6x, 3.0x and 6.5x faster on the largest trees of a
    48 x 768 x 768 phantom run's three masks (3.6, 9.8 and 24 M voxels), 1.1-1.7x on synthetic ones
    (benchmarks/results/cpu-thin.json).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"thin needs a (z, y, x) mask, got shape {mask.shape} (graph.skeleton takes 2-D too)")
    padded = np.pad(mask, 1).astype(np.uint8)
    _, sy, sx = padded.shape
    strides = np.array([sy * sx, sx, 1], np.int64)
    offsets = (np.array(list(np.ndindex(3, 3, 3))) - 1) @ strides
    # opposite directions in turn (W E S N U B), so an odd-width tube keeps its centre voxel
    borders = np.array([-strides[1], strides[1], strides[2], -strides[2], strides[0], -strides[0]], np.int64)
    vs = np.asarray(voxel_size, np.float64)
    if vs.shape != (3,) or not np.all((vs > 0) & np.isfinite(vs)):
        raise ValueError(f"voxel_size must be three positive finite numbers (z, y, x), got {voxel_size}")
    rate = vs.min() / vs[[1, 1, 2, 2, 0, 0]]   # passes per sweep, per direction
    _thin(padded.ravel(), np.count_nonzero(padded), offsets, borders, rate, strides[0], strides[1])
    return padded[1:-1, 1:-1, 1:-1].astype(bool)


def _bits(keep) -> int:
    """The 27-bit mask of the 3x3x3 positions (bit dz * 9 + dy * 3 + dx) where ``keep(dz, dy, dx)``."""
    return sum(1 << (z * 9 + y * 3 + x) for z, y, x in np.ndindex(3, 3, 3) if keep(z, y, x))


_CENTRE = 1 << 13
_FG = _bits(lambda z, y, x: True) & ~_CENTRE                                 # the 26-neighbourhood
_N18 = _bits(lambda z, y, x: 0 < abs(z - 1) + abs(y - 1) + abs(x - 1) <= 2)
_FACES = _bits(lambda z, y, x: abs(z - 1) + abs(y - 1) + abs(x - 1) == 1)
# where a shift by one position along an axis lands inside the cube (no wrap into the next row or plane)
_X_UP, _X_DOWN = _bits(lambda z, y, x: x > 0), _bits(lambda z, y, x: x < 2)
_Y_UP, _Y_DOWN = _bits(lambda z, y, x: y > 0), _bits(lambda z, y, x: y < 2)
_Z_UP, _Z_DOWN = _bits(lambda z, y, x: z > 0), _bits(lambda z, y, x: z < 2)


@njit(cache=True, nogil=True)   # the tree graph thins in a worker thread beside the mesh
def _grow26(b):
    b |= ((b << 1) & _X_UP) | ((b >> 1) & _X_DOWN)
    b |= ((b << 3) & _Y_UP) | ((b >> 3) & _Y_DOWN)
    return b | ((b << 9) & _Z_UP) | ((b >> 9) & _Z_DOWN)


@njit(cache=True, nogil=True)
def _grow6(b):
    return (b | ((b << 1) & _X_UP) | ((b >> 1) & _X_DOWN) | ((b << 3) & _Y_UP) | ((b >> 3) & _Y_DOWN)
            | ((b << 9) & _Z_UP) | ((b >> 9) & _Z_DOWN))


@njit(cache=True, nogil=True)
def _one_component(within, starts, six):
    """Whether exactly one component of the positions ``within`` (26- or, with ``six``, 6-connected inside
    the cube) holds positions of ``starts``."""
    left = within & starts
    if left == 0:
        return False
    seed = left & -left
    while True:
        grown = (_grow6(seed) if six else _grow26(seed)) & within
        if grown == seed:
            return (left & ~seed) == 0
        seed = grown


@njit(cache=True, nogil=True)
def _deletable(img, i, offsets):
    """A simple point (one 26-component of object, one 6-component of background in its 18-neighbourhood
    that touches it) that is not the end of a curve (at least two object neighbours)."""
    fg = 0
    n = 0
    for k in range(27):
        if k != 13 and img[i + offsets[k]] != 0:
            fg |= 1 << k
            n += 1
    if n < 2:   # the end of a curve (or an isolated voxel) stays
        return False
    return _one_component(fg, _FG, False) and _one_component(_N18 & ~fg, _FACES, True)


# Bits of thin's uint8 image: an object voxel has _OBJECT set and may carry the others; background is 0, so
# _deletable and the spur pruning, which only ask "!= 0", see the same image.
_OBJECT = 1
_KNOWN = 2     # _deletable of this voxel is known for its current 26-neighbourhood ...
_YES = 4       # ... and is True
_BORDER = 8    # a face neighbour is background
_LISTED = 16   # in thin's list of voxels to look at


@njit(cache=True, nogil=True)
def _deletable_cached(img, i, offsets):
    """:func:`_deletable`, remembered in ``img[i]`` until a neighbour is deleted (:func:`_delete`): it depends
    on the 26-neighbourhood alone."""
    v = img[i]
    if v & _KNOWN:
        return (v & _YES) != 0
    d = _deletable(img, i, offsets)
    img[i] = v | _KNOWN | (_YES if d else 0)
    return d


@njit(cache=True, nogil=True)
def _delete(img, i, offsets, todo, nt):
    """Delete object voxel ``i``: forget what is known of its neighbours (their neighbourhood changed), and add
    those on the border that are not yet listed to ``todo[:nt]``; returns the list's new length."""
    img[i] = 0
    for k in range(27):
        j = i + offsets[k]
        v = np.int64(img[j])   # (uint8 | int64 types as a float in Numba)
        if v != 0:
            v &= ~(_KNOWN | _YES)
            if k == 4 or k == 10 or k == 12 or k == 14 or k == 16 or k == 22:
                v |= _BORDER
            if (v & _BORDER) and not (v & _LISTED):
                v |= _LISTED
                todo[nt] = j
                nt += 1
            img[j] = v
    return nt


@njit(cache=True, nogil=True)
def _thin(img, n_object, offsets, borders, rate, zstride, ystride):
    """Thin the flat, padded ``img`` (0 / 1, ``n_object`` ones) in place; direction d gets ``rate[d]`` passes
    per sweep (at most 1).

    Each pass deletes what testing every object voxel would, but looks only at a list of border voxels (object
    voxels with a background face neighbour: only they can go) that may be deletable: :func:`_deletable`
    depends only on the 26-neighbourhood, so it is computed once and kept until a neighbour is deleted, and a
    voxel found not deletable leaves the list until then (on a 24 M-voxel vessel mask the old sweeps over all
    object voxels made 25 tests a deletion and looked at voxels 10^10 times; tested to give the same bits)."""
    todo = np.empty(max(n_object, 1), np.int64)   # a voxel is listed at most once at a time (_LISTED)
    nt = 0
    for i in range(img.size):
        if img[i] != 0:
            for k in (4, 10, 12, 14, 16, 22):
                if img[i + offsets[k]] == 0:
                    img[i] |= _BORDER | _LISTED
                    todo[nt] = i
                    nt += 1
                    break
    cand = np.empty(max(n_object, 1), np.int64)   # a pass's candidates and their parity class
    par = np.empty(max(n_object, 1), np.uint8)
    due = np.zeros(borders.size)
    clean = np.zeros(borders.size, np.bool_)   # passes that found nothing since the last deletion
    while True:
        clean[:] = False
        while not clean.all():
            deleted = 0
            for d in range(borders.size):
                due[d] += rate[d]
                if due[d] < 1.0 - 1e-9:
                    continue
                due[d] -= 1.0
                n, nt = _thin_direction(img, todo, nt, borders[d], cand, par, offsets, zstride, ystride)
                deleted += n
                if n == 0:
                    clean[d] = True
                else:
                    clean[:] = False
            if deleted == 0:
                # the paced directions keep step with the others while those delete; once nothing else
                # does, a slow axis (z steps 1000x the pixels) goes next instead of after idle sweeps
                for d in range(borders.size):
                    if not clean[d]:
                        due[d] = max(due[d], 1.0)
        # a spur's removal can leave the voxel it hung on deletable: thin again until no spur is left
        n, nt = _prune_spurs(img, todo, nt, cand, offsets)
        if n == 0:
            return img


@njit(cache=True, nogil=True)
def _thin_direction(img, todo, nt, ob, cand, par, offsets, zstride, ystride):
    """One of Lee's six passes: delete the deletable voxels whose neighbour at offset ``ob`` is background.
    ``todo[:nt]`` lists every border voxel not known to be undeletable (and maybe deleted ones): those are
    dropped from it here. Returns how many voxels were deleted and the list's new length. ``cand``, ``par``:
    room for the candidates."""
    nc = 0
    keep = 0
    for q in range(nt):
        i = todo[q]
        v = np.int64(img[i])
        if v == 0:
            continue
        if (v & _KNOWN) == 0 or (v & _YES):
            if img[i + ob] == 0 and _deletable_cached(img, i, offsets):
                cand[nc] = i
                z, rest = divmod(i, zstride)
                y, x = divmod(rest, ystride)
                par[nc] = (z % 2) * 4 + (y % 2) * 2 + x % 2
                nc += 1
            v = np.int64(img[i])
        if (v & _KNOWN) and not (v & _YES):   # not deletable until a neighbour goes (_delete lists it again)
            img[i] = v & ~_LISTED
        else:
            todo[keep] = i
            keep += 1
    nt = keep
    deleted = 0
    # Checked again against what is left, but one parity class of (z, y, x) at a time: two voxels of a
    # class are never neighbours, so a class is deleted as if at once (in any order). Checking them one by one
    # in raster order instead let a thin tube be eaten from one end along its whole length (each cut leaves a
    # new end with two neighbours): that is how scikit-image's thinning loses even-width tubes.
    for parity in range(8):
        for j in range(nc):
            if par[j] == parity and _deletable_cached(img, cand[j], offsets):
                nt = _delete(img, cand[j], offsets, todo, nt)
                deleted += 1
    return deleted, nt


@njit(cache=True, nogil=True)
def _neighbours(img, i, offsets):
    n = 0
    for k in range(27):
        n += k != 13 and img[i + offsets[k]] != 0
    return n


SPUR_VOXELS = 2   # the longest spur (voxels from its end to the junction) that thinning removes


@njit(cache=True, nogil=True)
def _prune_spurs(img, todo, nt, doomed, offsets):
    """Delete spurs: curve ends at most SPUR_VOXELS voxels from a junction voxel (3+ neighbours). The end
    condition keeps them where the thinning of a curved surface or a flat rounded vessel end leaves a voxel
    standing out (a torus got 16, a flat tube's ends forks of two); a branch that short is below what the
    skeleton resolves. Spurs are all found first (in the whole image), then deleted, their neighbours listed in
    ``todo[:nt]``. Returns how many voxels were deleted and the list's new length."""
    nd = 0
    path = np.empty(SPUR_VOXELS, np.int64)
    for tip in range(img.size):
        if img[tip] == 0 or _neighbours(img, tip, offsets) != 1:
            continue
        prev, cur, n = -1, tip, 0
        while True:
            path[n] = cur
            n += 1
            nxt = -1
            for k in range(27):
                j = cur + offsets[k]
                if k != 13 and j != prev and img[j] != 0:
                    nxt = j
                    break
            m = _neighbours(img, nxt, offsets)
            if m >= 3:
                for r in range(n):
                    doomed[nd] = path[r]
                    nd += 1
                break
            if m != 2 or n == SPUR_VOXELS:
                break
            prev, cur = cur, nxt
    for r in range(nd):   # spurs share no voxel (their inner voxels have two neighbours)
        if img[doomed[r]] != 0:
            nt = _delete(img, doomed[r], offsets, todo, nt)
    return nd, nt


def pooled_offset_um(voxel_size, k: int) -> np.ndarray:
    """(z, y, x) µm from a ``downsample_yx(.., k)`` voxel's index times its size to the centre of the
    ``k x k`` voxels it pools."""
    vs = np.asarray(voxel_size, np.float64)
    return np.array([0.0, (k - 1) / 2 * vs[1], (k - 1) / 2 * vs[2]])


def downsample_yx(mask: np.ndarray, k: int) -> np.ndarray:
    """``k x k`` max-pooling in (y, x) (any voxel set in a block sets the output voxel).

    The (y, x) extent is padded with background up to a multiple of ``k``; z is untouched.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"downsample must be a positive integer, got {k}")
    mask = np.asarray(mask, dtype=bool)
    if k == 1:
        return mask
    nz, ny, nx = mask.shape
    py, px = -ny % k, -nx % k
    if py or px:
        mask = np.pad(mask, ((0, 0), (0, py), (0, px)))
    return mask.reshape(nz, (ny + py) // k, k, (nx + px) // k, k).any(axis=(2, 4))


# -- skeleton -> graph -------------------------------------------------------------------------

def _adjacency(coords: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, indices) of 26-adjacency between skeleton voxels ``coords`` (raster order).

    Works on sorted linear keys in the grid padded by one voxel, so a neighbour key never wraps
    to another row; memory is O(number of skeleton voxels), not of the volume.
    """
    n = len(coords)
    dims = np.asarray(shape, np.int64) + 2
    keys = np.ravel_multi_index(tuple((coords + 1).T), tuple(dims))  # sorted: coords are raster
    rows, cols = [], []
    for dz, dy, dx in np.ndindex(3, 3, 3):
        d = (dz - 1) * dims[1] * dims[2] + (dy - 1) * dims[2] + (dx - 1)
        if d <= 0:  # each unordered pair once: the 13 "forward" offsets
            continue
        pos = np.searchsorted(keys, keys + d)
        hit = pos < n
        hit[hit] = keys[pos[hit]] == keys[hit] + d
        rows.append(np.flatnonzero(hit))
        cols.append(pos[hit])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    adj = coo_matrix((np.ones(2 * len(r), np.int8), (np.r_[r, c], np.r_[c, r])), shape=(n, n))
    adj = adj.tocsr()
    adj.sort_indices()
    return adj.indptr, adj.indices


def _trace(ptr: list[int], ind: list[int], is_node: bytearray, start: int, first: int,
           visited: bytearray) -> list[int]:
    """Voxel path from node voxel ``start`` through ``first`` to the next node voxel. ``ptr``, ``ind`` (the
    CSR adjacency) are lists and the flags bytearrays: one voxel at a time, their items are read faster
    than an array's (a dense tree's skeleton has about a million voxels)."""
    path = [start, first]
    prev, cur = start, first
    while not is_node[cur]:
        visited[cur] = 1
        k = ptr[cur]
        a, b = ind[k], ind[k + 1]  # a path voxel has exactly two neighbours
        prev, cur = cur, (b if a == prev else a)
        path.append(cur)
    return path


def _trace_skeleton(indptr: np.ndarray, indices: np.ndarray):
    """Trace a skeleton given as CSR adjacency: ``(node_of, n_nodes, paths)``.

    ``node_of[i]`` is the node id of skeleton voxel ``i`` (-1 for path voxels); ``paths`` are
    ``(u, v, voxel_ids)`` with node ids ``u``, ``v`` and the voxel indices from ``u`` to ``v``.
    """
    n = len(indptr) - 1
    deg = np.diff(indptr)
    is_node = deg != 2
    node_of = np.full(n, -1, np.int64)
    # junction voxels that touch are one branch point; end/isolated voxels are their own node
    junction = np.flatnonzero(deg >= 3)
    if len(junction):
        adj = csr_matrix((np.ones(len(indices), np.int8), indices, indptr), shape=(n, n))
        sub = adj[junction][:, junction]
        _, jlab = connected_components(sub, directed=False)
        node_of[junction] = jlab
    n_nodes = int(node_of.max()) + 1 if len(junction) else 0
    single = np.flatnonzero(deg < 2)
    node_of[single] = np.arange(n_nodes, n_nodes + len(single))
    n_nodes += len(single)

    ptr, ind = indptr.tolist(), indices.tolist()
    node, seen = bytearray(is_node.tobytes()), bytearray(n)
    visited = np.frombuffer(seen, bool)  # a view: the rings below see the traces' marks
    paths = []
    for s in np.flatnonzero(is_node):
        for t in ind[ptr[s]:ptr[s + 1]]:
            if node[t]:
                # two node voxels side by side: a one-step branch, unless inside one branch point
                if s < t and node_of[s] != node_of[t]:
                    paths.append((node_of[s], node_of[t], [s, t]))
            elif not seen[t]:
                p = _trace(ptr, ind, node, s, t, seen)
                paths.append((node_of[s], node_of[p[-1]], p))
    # rings with no node at all: promote one voxel to a node (degree 2, one self-loop)
    for s in np.flatnonzero(~is_node & ~visited):
        if seen[s]:
            continue
        node[s], node_of[s] = 1, n_nodes
        n_nodes += 1
        p = _trace(ptr, ind, node, s, ind[ptr[s]], seen)
        seen[s] = 1
        paths.append((node_of[s], node_of[s], p))
    return node_of, n_nodes, paths


def path_length(um: np.ndarray, smooth: int = 7) -> float:
    """Length of a (n, 3) point path, after a ``smooth``-point moving average (1 = raw steps).

    Raw 26-neighbour steps overestimate a straight oblique vessel by 9% on average (up to 15%
    isotropic, up to 33% with 4:1 voxels): a staircase is longer than the line it follows.
    Measured on 300 random digital lines of 60 µm, a 7-point average leaves at most 0.5%
    (isotropic), 1.2% (2:1 z) and 3.7% (4:1 z). The price: a bend of radius R voxels comes
    out shorter by about ((smooth - 1) / 2 / R)^2 / 6 (1.5% at R = 10); so that small loops
    and short branches are not collapsed, the window is capped at a quarter of the path's
    points. The two ends stay in place; a closed path (first point == last) is smoothed
    around the ring.
    """
    um = np.asarray(um, np.float64)
    smooth = min(int(smooth), (len(um) // 4) | 1)
    if smooth > 1 and len(um) > 2:
        if np.array_equal(um[0], um[-1]):
            ring = ndi.uniform_filter1d(um[:-1], smooth, axis=0, mode="wrap")
            um = np.vstack([ring, ring[:1]])
        else:
            s = ndi.uniform_filter1d(um, smooth, axis=0, mode="nearest")
            s[0], s[-1] = um[0], um[-1]
            um = s
    return float(np.linalg.norm(np.diff(um, axis=0), axis=1).sum())


# radii_at searches a k-d tree when the background voxels beside the foreground, plus the points, are under
# this fraction of the box: in a profile, building and querying one cost about 0.5 us a point and SciPy's
# feature transform about 0.1 us a voxel of the box. On the built-in scan's pipeline masks those voxels are
# 6 % of the vessel tree's box (the k-d tree ahead) and 17-24 % of the nerve and autofluorescence boxes (behind);
# benchmarks/bench_label.py measures the vessel case
RADII_KDTREE_BELOW = 1 / 8


def _near_background(padded: np.ndarray) -> np.ndarray:
    """Background voxels with a foreground face neighbour."""
    near = np.zeros_like(padded)
    for axis in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        near[tuple(lo)] |= padded[tuple(hi)]
        near[tuple(hi)] |= padded[tuple(lo)]
    near &= ~padded
    return near


def _feature_transform(padded: np.ndarray, vs: np.ndarray) -> np.ndarray:
    return ndi.distance_transform_edt(padded, sampling=vs, return_distances=False, return_indices=True)


def dense_feature_transform(mask: np.ndarray, voxel_size) -> np.ndarray | None:
    """The feature transform :func:`radii_at` will use on ``mask`` whatever the points, or None where its
    choice depends on the points: computed while the skeleton is thinned (both release the GIL), since a
    dense mask's radii need it and it does not need the skeleton."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    if np.count_nonzero(_near_background(padded)) < RADII_KDTREE_BELOW * padded.size:
        return None
    return _feature_transform(padded, np.asarray(voxel_size, np.float64))


def radii_at(mask: np.ndarray, points: np.ndarray, voxel_size, feature_transform=None) -> np.ndarray:
    """Distance (µm) from each (k, 3) voxel index in ``points`` to the nearest background voxel.

    Equals ``ndi.distance_transform_edt(mask, sampling=voxel_size)[points]`` except that the
    volume is surrounded by background (as :func:`thin` sees it), so
    an all-foreground mask still has finite radii. The nearest background voxel of a foreground
    voxel always touches the foreground by a face (a step from it towards the point would be closer
    and still background otherwise), so where those are few (a sparse vessel tree in its box) only
    they are searched, in a k-d tree (2 bytes a voxel of the box); otherwise SciPy's int32 feature
    transform of the box is kept (12 bytes a voxel), and distances are computed at ``points`` alone.
    ``feature_transform``: that of :func:`dense_feature_transform` (same mask and voxel size), if at hand.
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    vs = np.asarray(voxel_size, np.float64)
    p = np.asarray(points, np.int64).reshape(-1, 3) + 1
    out = np.zeros(len(p))
    inside = padded[tuple(p.T)] if len(p) else np.zeros(0, bool)
    if not inside.any():
        return out
    if feature_transform is None:
        near = _near_background(padded)
        if np.count_nonzero(near) + np.count_nonzero(inside) < RADII_KDTREE_BELOW * padded.size:
            del padded
            border = np.argwhere(near)
            del near
            _, nearest = cKDTree(border * vs).query(p[inside] * vs)
            nearest = border[nearest]
            out[inside] = np.linalg.norm((nearest - p[inside]) * vs, axis=1)
            return out
        del near
        feature_transform = _feature_transform(padded, vs)
    del padded
    nearest = feature_transform[(slice(None), *p[inside].T)].T
    out[inside] = np.linalg.norm((nearest - p[inside]) * vs, axis=1)
    return out


def _branch(i: int, u: int, v: int, path: np.ndarray, radii: np.ndarray, vs: np.ndarray,
            smooth: int) -> Branch:
    """Measures of one voxel path (see the module docstring for their definitions)."""
    um = path * vs
    if u == v and not np.array_equal(um[0], um[-1]):
        # a loop through a multi-voxel branch point leaves and re-enters it at different voxels: close
        # it through the branch point, so it is measured (and smoothed) as the ring it is
        um = np.vstack([um, um[:1]])
    length = path_length(um, smooth)
    chord = float(np.linalg.norm(um[-1] - um[0]))
    tort = length / chord if chord > 0 else math.nan
    return Branch(i, int(u), int(v), path, length, float(radii.mean()), float(radii.max()), tort)


def _measure_branches(paths, coords: np.ndarray, radii: np.ndarray, vs: np.ndarray, smooth: int) -> list[Branch]:
    """:func:`_branch` of every traced path ``(u, v, voxel ids)``, as arrays over the paths of one length at a
    time: a dense tree has some 10^5 branches, and one call each took 2 s of its 22 s skeleton stage. Per path
    the arithmetic is :func:`_branch`'s, in the same order (the same moving average along the same axis, the
    same reductions along contiguous rows), so the measures are the same bits (tested). Loops (``u == v``),
    closed through their node and few, are measured one by one."""
    out: list = [None] * len(paths)
    by_length: dict[int, list[int]] = {}
    for i, (u, v, p) in enumerate(paths):
        if u == v:
            out[i] = _branch(i, u, v, coords[p], radii[p], vs, smooth)
        else:
            by_length.setdefault(len(p), []).append(i)
    for n, idx in by_length.items():
        ids = np.array([paths[i][2] for i in idx], np.int64)  # (paths, n)
        pts = coords[ids]
        um = pts * vs
        w = min(int(smooth), (n // 4) | 1)   # path_length's window; its ends stay in place
        s = um
        if w > 1 and n > 2:
            s = ndi.uniform_filter1d(um, w, axis=1, mode="nearest")
            s[:, 0], s[:, -1] = um[:, 0], um[:, -1]
        length = np.linalg.norm(np.diff(s, axis=1), axis=2).sum(axis=1)
        chord = np.linalg.norm(um[:, -1] - um[:, 0], axis=1)
        r = radii[ids]
        mean, top = r.mean(axis=1), r.max(axis=1)
        for j, i in enumerate(idx):
            u, v, _ = paths[i]
            c, ln = float(chord[j]), float(length[j])
            out[i] = Branch(i, int(u), int(v), pts[j], ln, float(mean[j]), float(top[j]),
                            ln / c if c > 0 else math.nan)
    return out


def skeleton_graph(mask: np.ndarray, voxel_size=(1.0, 1.0, 1.0), downsample: int = 1,
                   origin_um=(0.0, 0.0, 0.0), smooth: int = 7) -> VesselGraph:
    """Graph of the curve skeleton of a (z, y, x) bool mask; see the module docstring.

    ``voxel_size`` is (z, y, x) µm of ``mask``. ``downsample=k`` first max-pools ``k x k``
    in (y, x) and multiplies the (y, x) voxel size by ``k``; branch paths are then indices in
    the pooled grid. ``origin_um`` is added to node positions (e.g. a crop's offset).
    ``smooth`` is the moving-average window (points) for branch lengths (:func:`path_length`).
    Memory: up to about 17 bytes per voxel of the (pooled) mask; crop and downsample whole hearts.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D (z, y, x), got shape {mask.shape}")
    vs = np.asarray(voxel_size, np.float64)
    if vs.shape != (3,) or not np.all((vs > 0) & np.isfinite(vs)):
        raise ValueError(f"voxel_size must be three positive finite numbers (z, y, x), got {voxel_size}")
    k = int(downsample)
    mask = downsample_yx(mask, k)
    # a pooled voxel j covers voxels kj .. kj + k - 1: its centre is (k - 1) / 2 voxels further on
    origin = np.asarray(origin_um, np.float64) + pooled_offset_um(vs, k)
    vs = vs * np.array([1.0, k, k])

    with ThreadPoolExecutor(1, thread_name_prefix="gpuheart-radii") as pool:
        dense_ft = pool.submit(dense_feature_transform, mask, vs)  # beside the thinning, on another core
        skel = skeleton(mask, vs)
        coords = np.argwhere(skel).astype(np.int64)
        del skel
        indptr, indices = _adjacency(coords, mask.shape)
        node_of, n_nodes, paths = _trace_skeleton(indptr, indices)
        ft = dense_ft.result()

    # node position: mean of its voxels (one voxel except for branch points)
    members = node_of >= 0
    counts = np.bincount(node_of[members], minlength=n_nodes).astype(np.float64)
    pos = np.stack([np.bincount(node_of[members], coords[members, a] * vs[a], minlength=n_nodes)
                    for a in range(3)], axis=1) / np.maximum(counts, 1)[:, None] + origin

    radii = radii_at(mask, coords, vs, ft) if paths else np.zeros(len(coords))
    del ft
    branches = _measure_branches(paths, coords, radii, vs, smooth)
    degree = np.zeros(n_nodes, np.int64)
    for b in branches:
        degree[b.u] += 1
        degree[b.v] += 1
    return VesselGraph(pos.reshape(n_nodes, 3), degree, branches, tuple(float(x) for x in vs),
                       tuple(float(x) for x in origin))


# -- summary and export ------------------------------------------------------------------------

def summarize(graph: VesselGraph) -> dict:
    """Counts and totals of a :class:`VesselGraph` as plain Python numbers.

    ``mean_radius_um`` is length-weighted over branches; ``n_components`` counts connected
    pieces; ``n_cycles`` (= branches - nodes + components) is 0 for a true tree. A ring that lies wholly
    inside one branch point's cluster of junction voxels (a few voxels across) is not among them: the
    cluster is one node.
    ``degree_histogram[d]`` is the number of nodes of degree ``d``.
    """
    lengths = np.array([b.length_um for b in graph.branches], np.float64)
    radii = np.array([b.mean_radius_um for b in graph.branches], np.float64)
    total = float(lengths.sum())
    n, m = graph.n_nodes, len(graph.branches)
    if m:
        u = np.array([b.u for b in graph.branches])
        v = np.array([b.v for b in graph.branches])
        adj = coo_matrix((np.ones(m, np.int8), (u, v)), shape=(n, n))
        n_comp = int(connected_components(adj, directed=False)[0])
    else:
        n_comp = n
    hist = np.bincount(graph.node_degree) if n else np.zeros(0, np.int64)
    return {
        "n_nodes": n,
        "n_branches": m,
        "n_end_points": int(len(graph.end_points)),
        "n_branch_points": int(len(graph.branch_points)),
        "n_components": n_comp,
        "n_cycles": m - n + n_comp,
        "total_length_um": total,
        "mean_radius_um": float((lengths * radii).sum() / total) if total > 0 else math.nan,
        "degree_histogram": {int(d): int(c) for d, c in enumerate(hist) if c},
    }


def _atomic_path(path) -> tuple[Path, Path]:
    path = Path(path)
    return path, path.with_name(f".{path.name}.partial")


def _replace_or_clean(tmp: Path, path: Path, write) -> None:
    """Run ``write(tmp)``, then rename over ``path``; never leave ``tmp`` behind."""
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_branches_csv(graph: VesselGraph, path) -> None:
    """One row per branch (columns :data:`CSV_COLUMNS`), written atomically (temp file + rename).

    ``u_*``/``v_*`` are the node positions (z, y, x) in µm; tortuosity of a loop is ``nan``.
    """
    path, tmp = _atomic_path(path)

    def write(p: Path) -> None:
        # rows as the csv module writes them (no field needs quoting: numbers and nan), the node positions
        # formatted once per node rather than once per branch end
        pos = [",".join(map(repr, xyz)) for xyz in np.asarray(graph.node_pos_um, np.float64).tolist()]
        with open(p, "w", newline="") as fh:
            csv.writer(fh).writerow(CSV_COLUMNS)
            fh.writelines(f"{b.id},{b.u},{b.v},{b.length_um!r},{b.mean_radius_um!r},{b.max_radius_um!r},"
                          f"{b.tortuosity!r},{pos[b.u]},{pos[b.v]},{len(b.path)}\r\n" for b in graph.branches)

    _replace_or_clean(tmp, path, write)


# GraphML attribute keys, in networkx's naming and types, so networkx.read_graphml reads our files back
# into exactly VesselGraph.to_networkx()
_NODE_KEYS = (("z_um", "double"), ("y_um", "double"), ("x_um", "double"), ("degree", "long"))
_EDGE_KEYS = (("id", "long"), ("length_um", "double"), ("mean_radius_um", "double"),
              ("max_radius_um", "double"), ("tortuosity", "double"), ("n_voxels", "long"))


def write_graphml(graph: VesselGraph, path) -> None:
    """GraphML of :meth:`VesselGraph.to_networkx`, atomically.

    Written directly, row by row: networkx's writer builds an XML tree of the whole graph first, which
    took 10 s for a 44,000-branch tree (more than the skeletonization); this one is a few percent of
    that and reads back through ``networkx.read_graphml(path, node_type=int, force_multigraph=True)``
    as the same multigraph (tested). Numbers are written with ``repr`` (shortest round-trip form).
    """
    path, tmp = _atomic_path(path)
    _replace_or_clean(tmp, path, lambda p: _write_graphml_rows(graph, p))


def _write_graphml_rows(graph: VesselGraph, p: Path) -> None:
    keys = [(f"d{i}", "node", n, t) for i, (n, t) in enumerate(_NODE_KEYS)]
    keys += [(f"d{i + len(_NODE_KEYS)}", "edge", n, t) for i, (n, t) in enumerate(_EDGE_KEYS)]
    nk, ek = [k[0] for k in keys if k[1] == "node"], [k[0] for k in keys if k[1] == "edge"]
    with open(p, "w", encoding="utf-8") as f:
        f.write("<?xml version='1.0' encoding='utf-8'?>\n"
                '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
                'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
                'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
                'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">\n')
        for kid, kind, name, typ in keys:
            f.write(f'  <key id="{kid}" for="{kind}" attr.name="{name}" attr.type="{typ}" />\n')
        f.write('  <graph edgedefault="undirected">\n')
        for i, (pos, deg) in enumerate(zip(graph.node_pos_um, graph.node_degree)):
            vals = (repr(float(pos[0])), repr(float(pos[1])), repr(float(pos[2])), str(int(deg)))
            f.write(f'    <node id="{i}">' + "".join(f'<data key="{k}">{v}</data>' for k, v in zip(nk, vals))
                    + "</node>\n")
        for b in graph.branches:
            vals = (str(int(b.id)), repr(float(b.length_um)), repr(float(b.mean_radius_um)),
                    repr(float(b.max_radius_um)), repr(float(b.tortuosity)), str(len(b.path)))
            f.write(f'    <edge source="{b.u}" target="{b.v}" id="{b.id}">'
                    + "".join(f'<data key="{k}">{v}</data>' for k, v in zip(ek, vals)) + "</edge>\n")
        f.write("  </graph>\n</graphml>\n")
