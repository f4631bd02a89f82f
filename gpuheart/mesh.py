"""Surface meshes of vessel masks: slab-wise marching cubes, welding, filtering, decimation, export.

Coordinates: masks are (z, y, x) with ``voxel_size`` (z, y, x) in µm; meshes come out as
``vertices`` (N, 3) float64 in **(x, y, z) µm** (voxel centres at ``index * voxel_size``) and
``faces`` (M, 3) int64, wound so that normals point out of the object (positive volume).

Streamed marching cubes (:func:`marching_cubes_slabs`): the volume is treated as if zero-padded
by one voxel on every face, so every component is a closed surface. Masks (bool or integer slabs) are
meshed plane by plane from a table of skimage's triangles for the 256 binary cubes (:func:`_binary_cases`,
learnt from skimage itself): with corner values 0 and 1 every vertex is an edge's midpoint, so a cube's
triangles depend on its 8 corners only, and the vertices of an edge are numbered once as the planes stream
past (no seams to weld). Float slabs (the block means below) go to ``skimage.measure.marching_cubes`` in
z blocks that share one plane, so every cube cell belongs to exactly one block (no duplicate faces);
vertices on the shared plane are interpolated from the same two voxel values by both blocks and come out
bit-identical, so they are welded by an exact key (the float32 (y, x) pair read as one uint64). Either
way the result is the whole-volume mesh (:func:`marching_cubes_volume`): the same vertices (exact
midpoints for masks, where skimage's float32 arithmetic is off by up to about 1e-6 voxel) and the same
triangles, wound the same way; masks' vertices are numbered in their own order.

Bounded memory: the mesh is held whole (about 200 bytes per face at the peak), so :func:`mesh_from_mask`
counts the faces the mask gives while meshing it, and past ``max_memory_faces`` drops the mesh, counts the
rest (what :func:`estimate_faces` gives, exact for masks) and meshes the mask averaged over k x k x k voxel
blocks instead (:func:`block_factor`), which has about k**2 times fewer faces (k raised while that mesh
exceeds the budget too): peak memory is then bounded by the budget, not by the slice count.

Components (:func:`solid_components`): pieces of the solid, each its outer surface plus the inner
surfaces of the cavities it encloses. They follow marching-cubes connectivity, which is that of 18-connected
voxels: voxels sharing a face or an edge give one surface, voxels that touch only at a corner give separate
surfaces, so separate components, while the voxel labelling of the tree graph (``morphology.label_slabs``)
joins them (26-connected); ``largest_tree.<fmt>`` and the graph's tree can therefore differ by such
corner-touching pieces.

Unity and GLB: Unity's default 16-bit index buffers address at most 65,535 vertices per mesh.
:func:`export_mesh` therefore splits a GLB into nodes (one mesh each) of at most 65,535 vertices
(``max_vertices_per_node``), compact pieces of space cut along a Z-order curve (:func:`split_for_unity`),
so that few vertices are written twice (on the cuts); index accessors are written as uint32 (componentType 5125, how
trimesh writes them, valid glTF 2.0), which glTFast and UnityGLTF read into any index format.
Pass ``max_vertices_per_node=None`` for a single node (importers then need 32-bit index support,
``Mesh.indexFormat = UInt32``, Unity >= 2017.3).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage import measure

from . import backend

ReadSlab = Callable[[int, int], np.ndarray]
FORMATS = ("glb", "ply", "obj", "stl")
UNITY_MAX_VERTICES = 65_535


class MeshTooLargeError(ValueError):
    """The exported file would exceed its byte budget: about ``estimate`` bytes; ``fit_faces`` faces
    (10% under the proportional count) would fit."""

    def __init__(self, message: str, estimate: int = 0, fit_faces: int = 0):
        super().__init__(message)
        self.estimate, self.fit_faces = estimate, fit_faces


# -- marching cubes ----------------------------------------------------------------------------

def _mc_block(block: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray] | None:
    """marching_cubes on one padded block in index units, or None when it holds no surface."""
    lo, hi = float(block.min()), float(block.max())
    if lo == hi or not lo <= level <= hi:
        return None
    v, f, _, _ = measure.marching_cubes(block, level)
    return v, f


def _voxel_size(voxel_size) -> np.ndarray:
    """``voxel_size`` as three positive (z, y, x) µm; a scan of unknown voxel size (``Scan.voxel_size``
    is None) would otherwise give a mesh of NaN coordinates."""
    try:
        vs = np.broadcast_to(np.asarray(voxel_size, np.float64), (3,))
    except (TypeError, ValueError):
        vs = np.full(3, np.nan)
    if not (np.isfinite(vs).all() and (vs > 0).all()):
        raise ValueError(f"voxel_size={voxel_size!r}; expected (z, y, x) in µm, three positive numbers "
                         "(pass (1, 1, 1) for voxel units)")
    return vs


def _to_physical(v_index: np.ndarray, voxel_size) -> np.ndarray:
    """Padded (z, y, x) index coordinates -> (x, y, z) µm of the unpadded volume."""
    v = (np.asarray(v_index, np.float64) - 1.0) * _voxel_size(voxel_size)
    return np.ascontiguousarray(v[:, ::-1])


def _outward(faces: np.ndarray) -> np.ndarray:
    # skimage ('descent', object above level) winds faces inward in (z, y, x); reversing the axes
    # to (x, y, z) is a reflection, which turns them outward: keep the order as it is
    return np.asarray(faces, np.int64)


def _cut_integers(a, level: float) -> np.ndarray:
    """Integer values as the mask ``a > level``: a 0/255 mask (what gpuheart writes) taken as values would put
    its surface 0.5/255 of a voxel from the background, half a voxel out, instead of midway between voxels."""
    a = np.asarray(a)
    return a > level if a.dtype.kind in "iu" else a


def marching_cubes_volume(mask: np.ndarray, voxel_size=(1.0, 1.0, 1.0), level: float = 0.5,
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-volume reference: ``skimage.measure.marching_cubes`` of the zero-padded volume (integer
    values cut at ``level`` first, as in :func:`marching_cubes_slabs`)."""
    _voxel_size(voxel_size)
    padded = np.pad(_cut_integers(mask, level).astype(np.float32), 1)
    out = _mc_block(padded, level)
    if out is None:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    return _to_physical(out[0], voxel_size), _outward(out[1])


def _as_reader(read_slab, shape) -> ReadSlab:
    """``read_slab`` itself, or for an in-memory (z, y, x) mask (what the stage functions take elsewhere)
    a reader of its slabs."""
    if len(shape) != 3:
        raise ValueError(f"shape must be the mask's (z, y, x), got {tuple(shape)}")
    if callable(read_slab):
        return read_slab
    if getattr(read_slab, "shape", None) is None:
        raise TypeError(f"expected a (z, y, x) mask array or a read_slab(z0, z1) callable, got "
                        f"{type(read_slab).__name__}")
    if tuple(read_slab.shape) != tuple(shape):
        raise ValueError(f"the mask has shape {tuple(read_slab.shape)}, but shape={tuple(shape)} was given")
    return lambda z0, z1: read_slab[z0:z1]


def binary_mask_reader(read_slab: ReadSlab, where: str, fresh: bool = False) -> ReadSlab:
    """``read_slab``'s slabs as bool (nonzero = inside), refusing slabs that hold a second nonzero value: a scan's
    intensities or a label image meshed as ``> 0`` would give a box or a blob, not the vessels, and no error.
    ``where`` names the input in the message. The first nonzero value read is the inside one. ``fresh``: each
    slab is a new array (``Scan.read_slab``'s are), so a uint8 one is turned into the bool slab in place."""
    inside = []

    def read(z0: int, z1: int) -> np.ndarray:
        a = np.asarray(read_slab(z0, z1))
        if a.dtype == bool:
            return a
        for i, plane in enumerate(a):   # plane by plane: temporaries of a plane, not of the slab
            nonzero = plane != 0
            if not inside:
                if not nonzero.any():
                    continue
                inside.append(plane.flat[int(np.argmax(nonzero))])
            other = np.not_equal(plane, inside[0])
            other &= nonzero
            if other.any():
                y, x = np.unravel_index(int(np.argmax(other)), plane.shape)
                raise ValueError(f"{where}: holds more than two values (0, {inside[0]} and {plane[y, x]} at z = "
                                 f"{z0 + i}, y = {y}, x = {x}); expected a binary mask (0 and one nonzero value) "
                                 f"such as OUT/C00/mask.ome.zarr from gpuheart run, not a scan's intensities or "
                                 f"labels")
        if fresh and a.dtype == np.uint8 and a.flags.c_contiguous and a.flags.writeable:
            return np.not_equal(a, 0, out=a.view(bool))   # in place, as pipeline.mask_reader: one slab, not two
        return a != 0

    return read


def _read_checked(read_slab: ReadSlab, shape, z0: int, z1: int):
    """``read_slab(z0, z1)``, refused unless it has the shape asked for."""
    slab = read_slab(z0, z1)
    if np.shape(slab) != (z1 - z0, *shape[1:]):
        raise ValueError(f"read_slab({z0}, {z1}) returned shape {np.shape(slab)}; expected "
                         f"{(z1 - z0, *shape[1:])} for a mask of shape {tuple(shape)}")
    return slab


def _read_padded(read_slab: ReadSlab, shape, p0: int, p1: int, level: float) -> np.ndarray:
    """Padded planes [p0, p1) of the zero-padded volume (plane p is volume slice p - 1), integer values
    cut at ``level`` (:func:`_cut_integers`)."""
    nz, ny, nx = shape
    z0, z1 = max(p0 - 1, 0), min(p1 - 1, nz)
    block = np.zeros((p1 - p0, ny + 2, nx + 2), np.float32)
    if z1 > z0:
        block[z0 + 1 - p0:z1 + 1 - p0, 1:-1, 1:-1] = _cut_integers(_read_checked(read_slab, shape, z0, z1), level)
    return block


def _probe(read_slab: ReadSlab, shape, slab_size: int) -> tuple[ReadSlab, bool]:
    """(``read_slab`` answering the call for slab 0 without reading it again, whether the slabs are a mask:
    bool or integer, meshed by :func:`_marching_cubes_mask`; float slabs go to skimage)."""
    if not shape[0]:
        return read_slab, True
    first = _read_checked(read_slab, shape, 0, min(slab_size, shape[0]))

    def read(z0: int, z1: int):
        return first if (z0, z1) == (0, len(first)) else read_slab(z0, z1)

    return read, np.asarray(first).dtype.kind in "biu"


def _plane_keys(v: np.ndarray) -> np.ndarray:
    """Exact key of a vertex's (y, x) pair: its two float32 bit patterns as one uint64."""
    yx = np.ascontiguousarray(v[:, 1:3], dtype=np.float32)
    return yx.view(np.uint64).ravel()


def marching_cubes_slabs(read_slab: ReadSlab, shape: tuple[int, int, int], slab_size: int = 64,
                         voxel_size=(1.0, 1.0, 1.0), level: float = 0.5, device: str = "cpu",
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of a volume streamed in z slabs, equal to :func:`marching_cubes_volume` (module docstring).

    Holds one slab as read (and a float32 copy for float slabs; a few bool planes for masks) plus the growing
    mesh in memory.
    ``read_slab(z0, z1)`` returns slices z0..z1 of the mask (or pass the (z, y, x) mask array itself);
    it may return bool, integer or float slices. Integer slices are masks, cut at ``level`` first (a 0/255
    mask gives the surface of its bool mask, midway between voxels); float slices are interpolated at
    ``level``, which should lie strictly between voxel values (0.5 for masks) so no vertex falls on a
    grid point. ``voxel_size``: (z, y, x) µm. ``device``: where a mask is meshed ("cpu", "cuda" or "auto"; the
    mesh comes back to the host either way; float slabs are meshed on the host).
    """
    if slab_size < 1:
        raise ValueError(f"slab_size must be >= 1, got {slab_size}")
    vs = _voxel_size(voxel_size)   # before the work, not after it
    read_slab = _as_reader(read_slab, shape)
    read_slab, is_mask = _probe(read_slab, shape, slab_size)
    if is_mask:
        return _mesh_mask(read_slab, shape, slab_size, vs, level, None, backend.resolve_device(device))[:2]
    return _marching_cubes_float(read_slab, shape, slab_size, voxel_size, level)


def _marching_cubes_float(read_slab: ReadSlab, shape, slab_size: int, voxel_size, level: float,
                          max_faces: int | None = None):
    """:func:`marching_cubes_slabs` of float slabs: skimage in z blocks that share a plane, seams welded. None
    as soon as the mesh has more than ``max_faces`` faces (None: no limit)."""
    n_planes = shape[0] + 2
    verts, faces = [], []
    n = total = 0
    prev_keys = np.zeros(0, np.uint64)   # sorted keys of the previous block's top-plane vertices
    prev_ids = np.zeros(0, np.int64)
    for p0 in range(0, n_planes - 1, slab_size):
        p1 = min(p0 + slab_size + 1, n_planes)
        out = _mc_block(_read_padded(read_slab, shape, p0, p1, level), level)
        if out is None:
            prev_keys, prev_ids = np.zeros(0, np.uint64), np.zeros(0, np.int64)
            continue
        v, f = out
        ids = np.full(len(v), -1, np.int64)
        bottom = np.flatnonzero(v[:, 0] == 0)
        if len(bottom) and len(prev_keys):
            keys = _plane_keys(v[bottom])
            pos = np.minimum(np.searchsorted(prev_keys, keys), len(prev_keys) - 1)
            hit = prev_keys[pos] == keys
            ids[bottom[hit]] = prev_ids[pos[hit]]
            if not hit.all():  # only when level equals a voxel value (vertices on grid points)
                warnings.warn(f"{int((~hit).sum())} seam vertices at padded plane {p0} found no twin; "
                              "the mesh may not be watertight (use a level between voxel values)",
                              RuntimeWarning, stacklevel=3)
        new = np.flatnonzero(ids < 0)
        ids[new] = np.arange(n, n + len(new))
        n += len(new)
        vnew = v[new].astype(np.float64)
        vnew[:, 0] += p0
        verts.append(vnew)
        faces.append(ids[f])
        total += len(f)
        if max_faces is not None and total > max_faces:
            return None
        top = np.flatnonzero(v[:, 0] == p1 - p0 - 1)
        keys = _plane_keys(v[top])
        order = np.argsort(keys)
        prev_keys, prev_ids = keys[order], ids[top][order]
        if p1 < n_planes and np.any(prev_keys[1:] == prev_keys[:-1]):
            # float input with a value within float32 rounding of the level: two seam vertices on
            # different grid edges round to one (y, x), and the next slab cannot tell them apart
            warnings.warn(f"seam vertices at padded plane {p1 - 1} coincide in float32; the mesh may be "
                          "non-manifold there (use a level farther from the voxel values, or a bool mask)",
                          RuntimeWarning, stacklevel=3)
    if not faces:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    return _to_physical(np.concatenate(verts), voxel_size), _outward(np.concatenate(faces))


# -- marching cubes of a mask, plane by plane ---------------------------------------------------
# A binary cube cut at a level between 0 and 1 gets its triangles from its own 8 corners only, with every
# vertex at an edge's midpoint (or, in a few ambiguous cases, the cube's centre). So skimage's triangulation
# is a table of 256 cases, learnt from skimage itself, and a mask can be meshed with table lookups over the
# cubes that hold surface: no float copy of the slab, no interpolation, no seams to weld (the planes stream).
# Local edges of a cube: 0-3 along z at (y, x) offsets 2 dy + dx, 4-7 along y at 2 dz + dx, 8-11 along x at
# 2 dz + dy; 12 the centre.

def _local_edge(p: np.ndarray) -> int:
    half = np.flatnonzero(p == 0.5)
    if len(half) == 3:
        return 12
    axis = int(half[0])
    o = [int(p[i]) for i in range(3) if i != axis]
    return 4 * axis + 2 * o[0] + o[1]


@lru_cache(maxsize=None)
def _binary_cases() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """skimage's triangles for each binary cube (bit ``4 z + 2 y + x`` set for an inside corner), as
    (local edges of all cases one after another, where each case starts there, 3 x its triangle count).
    Triangles keep skimage's winding (inward in (z, y, x); see :func:`_outward`)."""
    edges, start, count = [], np.zeros(256, np.int64), np.zeros(256, np.int64)
    for c in range(256):
        start[c] = len(edges)
        if 0 < c < 255:
            cube = np.array([(c >> i) & 1 for i in range(8)], np.float32).reshape(2, 2, 2)
            v, f, _, _ = measure.marching_cubes(cube, 0.5)
            local = np.array([_local_edge(p) for p in v])
            edges.extend(local[f].ravel().tolist())
            count[c] = 3 * len(f)
    return np.asarray(edges, np.int64), start, count


@lru_cache(maxsize=None)
def _faces_per_cube() -> np.ndarray:
    """Triangles ``skimage.measure.marching_cubes`` makes in one cube, by the cube's inside corners
    (bit ``4 z + 2 y + x``), from :func:`_binary_cases`: on a binary volume cut at a level between 0 and 1 a
    cube's triangles depend on its own 8 corners only, so the sum over the cubes is the mesh's exact face count
    (tests/test_mesh.py checks it on random volumes)."""
    return _binary_cases()[2] // 3


def _mask_planes(read_slab: ReadSlab, shape, slab_size: int, level: float, device: str = "cpu"):
    """The zero-padded volume's bool planes, streamed: the padding plane, each slice cut at ``level`` and padded
    by one voxel in y and x, the padding plane; on ``device`` (a slab goes over as read, then is cut there)."""
    nz, ny, nx = shape
    xp = np if device == "cpu" else backend._cupy()
    yield xp.zeros((ny + 2, nx + 2), bool)
    for z0 in range(0, nz, slab_size):
        z1 = min(z0 + slab_size, nz)
        slab = backend.to_device(np.asarray(_read_checked(read_slab, shape, z0, z1)), device)
        for s in slab:
            plane = xp.zeros((ny + 2, nx + 2), bool)
            xp.greater(s, level, out=plane[1:-1, 1:-1])
            yield plane
    yield xp.zeros((ny + 2, nx + 2), bool)


def _squares_of(plane):
    """The 4 inside-bits (``2 y + x``) of each square of a padded uint8 0/1 plane (pairs along x first: four
    operations on the plane instead of seven)."""
    pairs = plane[:, :-1] | (plane[:, 1:] << 1)
    return pairs[:-1] | (pairs[1:] << 2)


@lru_cache(maxsize=None)
def _case_tables(device: str = "cpu") -> tuple:
    """(edges, start, count) of :func:`_binary_cases`, per case whether it has a centre vertex, its face count,
    and where an x, y or z edge's vertex lies from the edge's first corner, on ``device``."""
    edges, start, count = _binary_cases()
    centre = np.array([(edges[start[c]:start[c] + count[c]] == 12).any() for c in range(256)])
    step = np.array([[0.0, 0.0, 0.5], [0.0, 0.5, 0.0], [-0.5, 0.0, 0.0]])   # (z, y, x) of an x, y, z edge's vertex
    return tuple(backend.to_device(a, device) for a in (edges, start, count, centre, count // 3, step))


def _marching_cubes_mask(planes, shape_yx, voxel_size, max_faces: int | None = None, device: str = "cpu"):
    """Marching cubes of the padded bool planes of a mask (:func:`_mask_planes`, on ``device``) at a level
    between 0 and 1: skimage's surface (:func:`_binary_cases`), vertices at exact edge midpoints, in (x, y, z)
    µm: (vertices, faces, face count), on ``device``. Past ``max_faces`` faces the mesh is dropped and the rest
    of the planes only counted (:func:`_faces_per_cube`): (None, None, the whole mask's face count), what
    :func:`estimate_faces` gives, without a pass of its own where the mesh fits.

    Each step takes the layer of cubes between two planes. Its new vertices (the upper plane's x and y edges, the
    layer's z edges) are numbered together in (y, x) order, three edges per grid point, so a face's vertices get
    near ids (the later passes over the mesh gather by them). The same array operations run on NumPy or CuPy."""
    edges, start, count, has_centre, per_cube, step = _case_tables(device)
    xp = backend.array_module(edges)
    ny, nx = shape_yx[0] + 2, shape_yx[1] + 2
    s = ny * nx
    scale = xp.asarray(np.asarray(voxel_size, np.float64)[::-1].copy())
    crossing = xp.zeros((ny, nx, 3), bool)
    lower, upper = xp.empty(3 * s, xp.int64), xp.empty(3 * s, xp.int64)   # ids per grid point and edge
    verts, faces, n, total = [], [], 0, 0

    def place(zyx):
        """Padded (z, y, x) index positions -> (x, y, z) µm of the volume."""
        zyx -= 1.0
        verts.append(zyx[:, ::-1] * scale)

    planes = iter(planes)
    below = next(planes).view(xp.uint8)      # the padding plane: no surface crosses its edges
    below_sq = _squares_of(below)
    for z, above in enumerate(planes):
        above = above.view(xp.uint8)
        if faces is None:   # over max_faces: counting only
            above_sq = _squares_of(above)
            total += _faces_of_codes(below_sq | (above_sq << 4), per_cube)
            below_sq = above_sq
            continue
        xp.not_equal(above[:, :-1], above[:, 1:], out=crossing[:, :-1, 0])
        xp.not_equal(above[:-1], above[1:], out=crossing[:-1, :, 1])
        xp.not_equal(below, above, out=crossing[..., 2])
        idx = xp.flatnonzero(crossing)
        upper[idx] = xp.arange(n, n + len(idx))   # stale elsewhere: only crossing edges are looked up
        n += len(idx)
        g, axis = xp.divmod(idx, 3)
        pos = step[axis]
        pos[:, 0] += z + 1
        y, x = xp.divmod(g, nx)
        pos[:, 1] += y
        pos[:, 2] += x
        place(pos)
        above_sq = _squares_of(above)
        code = below_sq | (above_sq << 4)
        cube = xp.flatnonzero(code - np.uint8(1) < 254)   # cubes with surface: all but codes 0 and 255 (wrapping)
        if len(cube):
            cc = code.ravel()[cube]
            y, x = xp.divmod(cube, nx - 1)
            g = y * nx + x                      # the cube's first corner in the flat plane grid
            ids = _cube_vertex_ids(g, nx, lower, upper)
            centre = xp.flatnonzero(has_centre[cc])
            if len(centre):
                ids[12, centre] = xp.arange(n, n + len(centre))
                n += len(centre)
                place(xp.stack([xp.full(len(centre), z + 0.5), y[centre] + 0.5, x[centre] + 0.5], 1))
            k = count[cc]                       # 3 x the cube's triangles
            owner = backend.repeat(xp.arange(len(cube)), k)
            local = edges[(start[cc] - (xp.cumsum(k) - k))[owner] + xp.arange(len(owner))]
            faces.append(ids.ravel()[local * len(cube) + owner].reshape(-1, 3))
            total += len(owner) // 3
            if max_faces is not None and total > max_faces:
                verts = faces = None
        below, below_sq = above, above_sq
        lower, upper = upper, lower
    if faces is None:
        return None, None, total
    v = xp.concatenate(verts) if verts else xp.zeros((0, 3))
    return v, xp.concatenate(faces) if faces else xp.zeros((0, 3), xp.int64), total


_warned: set = set()   # device failures warned about once per process


def _mesh_mask(read_slab: ReadSlab, shape, slab_size: int, vs, level: float, max_faces: int | None, device: str):
    """:func:`_marching_cubes_mask` of the mask's slabs on ``device`` ("cpu" or "cuda"), faces wound outward,
    as host arrays; a device that fails (other than on bad input) warns once and the host meshes instead."""
    def run(dev):
        v, f, n = _marching_cubes_mask(_mask_planes(read_slab, shape, slab_size, level, dev), shape[1:], vs,
                                       max_faces, dev)
        return (None, None, n) if v is None else (backend.to_host(v), _outward(backend.to_host(f)), n)

    if device == "cuda":
        out = backend.try_cuda("marching cubes", _warned, run, "cuda")
        if out is not None:
            return out
    return run("cpu")


def _faces_of_codes(code, per_cube) -> int:
    """Faces of the cubes with these codes: the codes with surface (all but 0 and 255, which wrap past 253)
    counted, then weighed by ``per_cube``; bincount of every code would first copy them all to int64."""
    xp = backend.array_module(code)
    return int(xp.bincount(code[code - np.uint8(1) < 254], minlength=256) @ per_cube)


def _cube_vertex_ids(g: np.ndarray, nx: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """(13, cubes) ids of the vertices on each local edge of the cubes whose first corner is at flat grid index
    ``g`` (garbage where the surface does not cross an edge; row 12, the centre, is the caller's): z edges from
    the layer's ids (``upper``, edge 2), y and x edges from the lower plane's (``lower``) and the upper's."""
    ids = backend.array_module(g).empty((13, len(g)), np.int64)
    g3 = 3 * g
    for dy in (0, 1):
        for dx in (0, 1):
            ids[2 * dy + dx] = upper[g3 + 3 * (dy * nx + dx) + 2]
    for dz, plane in enumerate((lower, upper)):
        for dx in (0, 1):
            ids[4 + 2 * dz + dx] = plane[g3 + 3 * dx + 1]
        for dy in (0, 1):
            ids[8 + 2 * dz + dy] = plane[g3 + 3 * dy * nx]
    return ids


# -- face-count estimate, coarser grids (bounded memory) ----------------------------------------

def _squares(plane: np.ndarray) -> np.ndarray:
    """The 4 inside-bits (``2 y + x``) of each square of the zero-padded plane (a bool (y, x) plane)."""
    return _squares_of(np.pad(plane, 1).view(np.uint8))


def estimate_faces(read_slab: ReadSlab, shape: tuple[int, int, int], slab_size: int = 64,
                   level: float = 0.5) -> int:
    """Faces :func:`marching_cubes_slabs` would give for this mask, from one streamed pass that keeps a
    slab and two planes of cube codes (no mesh): exact for masks (bool or integer, or floats 0/1),
    :func:`_faces_per_cube`. For float volumes it counts the mask ``value > level``, off by a few faces
    per ambiguous cube. Thin or noisy masks give up to ~2.5 faces per inside/outside voxel-face transition,
    smooth ones ~2, which is why the cubes are counted rather than the transitions scaled."""
    read_slab = _as_reader(read_slab, shape)
    table = _faces_per_cube()
    nz, ny, nx = shape
    below = np.zeros((ny + 1, nx + 1), np.uint8)   # the squares of the padding plane under slice 0
    total = 0
    for z0 in range(0, nz, max(1, slab_size)):
        z1 = min(z0 + slab_size, nz)
        for plane in _read_checked(read_slab, shape, z0, z1):
            sq = _squares(np.asarray(plane) > level)
            total += _faces_of_codes(below | (sq << 4), table)
            below = sq
    return total + int(np.bincount(below.ravel(), minlength=256) @ table)   # the padding plane above


def block_factor(estimate: int, max_memory_faces: int | None) -> int:
    """The smallest k >= 1 with ``estimate / k**2 <= max_memory_faces``: surfaces scale with area, so a
    grid k times coarser on every axis has about k**2 times fewer faces (fewer still where thin
    structures vanish in the averaging)."""
    if not max_memory_faces or estimate <= max_memory_faces:
        return 1
    k = max(1, int(np.sqrt(estimate / max_memory_faces)))
    while estimate > max_memory_faces * k * k:
        k += 1
    return k


# a block exactly half inside counts as inside; a level equal to a voxel value would put vertices on grid points,
# which the seams cannot weld (marching_cubes_slabs). Averages of up to 2048 voxels never equal it.
COARSE_LEVEL = 0.5 - 2.0 ** -12


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean of each k x k x k block of a (z, y, x) bool array as float32; a partial block at the far edges is the
    mean of the voxels it has (a vessel leaving the scan keeps its cross-section there instead of thinning).

    The inside voxels are counted in integers, one axis at a time by adding the k strided views of it (z first,
    whole planes, so each pass reads less), and divided once: the same float32 means as summing the blocks in
    float32, whose integer sums are exact."""
    n = np.array(a.shape)
    m = -(-n // k)
    if (m * k != n).any():
        padded = np.zeros(tuple(m * k), bool)
        padded[:n[0], :n[1], :n[2]] = a
        a = padded
    counts = np.uint16 if k ** 3 < 2 ** 16 else np.uint32
    for axis in range(3):
        views = [a[(slice(None),) * axis + (slice(j, None, k),)] for j in range(k)]
        a = views[0].astype(counts)
        for v in views[1:]:
            a += v
    cz, cy, cx = (np.minimum(k, n[i] - k * np.arange(m[i])).astype(np.float32) for i in range(3))
    return a.astype(np.float32) / (cz[:, None, None] * cy[:, None] * cx)


def _block_reader(read_slab: ReadSlab, shape, k: int, level: float, slab_size: int,
                  ) -> tuple[ReadSlab, tuple[int, int, int]]:
    """A reader of the block-averaged mask (voxels cut at ``level``, then :func:`_block_mean`) and its shape.
    The mask is read about ``slab_size`` slices at a time (a multiple of k), so the memory is that of k = 1."""
    nz = shape[0]
    step = k * max(1, slab_size // k)

    def read(c0: int, c1: int) -> np.ndarray:
        parts = []
        for z0 in range(c0 * k, min(c1 * k, nz), step):
            z1 = min(z0 + step, c1 * k, nz)
            parts.append(_block_mean(np.asarray(_read_checked(read_slab, shape, z0, z1)) > level, k))
        return np.concatenate(parts)

    return read, tuple(-(-int(n) // k) for n in shape)


# -- measures ----------------------------------------------------------------------------------

def _cross_columns(b0, b1, b2, c0, c1, c2) -> np.ndarray:
    """np.cross(b, c) of (n, 3) rows given as coordinate columns, with np.cross's operations in its order (the
    same bits): three times as fast as np.cross on rows."""
    cross = np.empty((len(b0), 3), np.result_type(b0, c0))
    x = b1 * c2
    x -= b2 * c1
    cross[:, 0] = x
    np.multiply(b2, c0, out=x)
    x -= b0 * c2
    cross[:, 1] = x
    np.multiply(b0, c1, out=x)
    x -= b1 * c0
    cross[:, 2] = x
    return cross


# faces per block of the per-face measures: a block's dozen temporaries stay in the CPU's cache, where arrays of the
# whole mesh's size went through memory a dozen times; the same bits, since each face is computed alone (the face
# norms of a 19 M-face mesh: 0.35 s against 0.9-4.3 s on 2 shared cores, whose memory bandwidth varies)
FACE_BLOCK = 1 << 16


def _by_face_blocks(measure_block, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``measure_block(vertices, coordinate columns, faces)`` over blocks of :data:`FACE_BLOCK` faces, as one
    array (of the first block's dtype)."""
    vt = np.ascontiguousarray(vertices.T)
    out = measure_block(vertices, vt, faces[:FACE_BLOCK])
    if len(faces) <= FACE_BLOCK:
        return out
    out = np.concatenate([out, np.empty(len(faces) - len(out), out.dtype)])
    for i in range(FACE_BLOCK, len(faces), FACE_BLOCK):
        out[i:i + FACE_BLOCK] = measure_block(vertices, vt, faces[i:i + FACE_BLOCK])
    return out


def _face_volumes(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Signed volume of the tetrahedron each face spans with the origin; their sum is the enclosed volume."""
    return _by_face_blocks(_face_volumes_block, vertices, faces)


def _face_volumes_block(vertices, vt, faces):
    # float64 even for float32 vertices: each term is a product of three coordinates, and the terms
    # cancel to the volume, so float32's 7 digits lose a small piece far from the origin (its sign too)
    b, c = ([vt[k][faces[:, i]].astype(np.float64, copy=False) for k in range(3)] for i in (1, 2))
    a = vertices[faces[:, 0]].astype(np.float64, copy=False)
    return np.einsum("ij,ij->i", a, _cross_columns(*b, *c)) / 6.0


def _face_norms(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """|(b - a) x (c - a)| of each face (twice its area): ``np.linalg.norm(np.cross(b - a, c - a), axis=1)``,
    bit for bit, from coordinate columns: the cross product's components as np.cross computes them, each
    squared and summed left to right as norm's reduction over a row of three does (integers as float64,
    as norm converts them), without the (n, 3) array between."""
    return _by_face_blocks(_face_norms_block, vertices, faces)


def _face_norms_block(vertices, vt, faces):
    a, b, c = ([vt[k][faces[:, i]] for k in range(3)] for i in range(3))
    u = [b[k] - a[k] for k in range(3)]
    w = [c[k] - a[k] for k in range(3)]
    del a, b, c

    def square(x):
        return np.square(x if x.dtype.kind == "f" else x.astype(np.float64))

    x = u[1] * w[2]
    x -= u[2] * w[1]
    total = square(x)
    np.multiply(u[2], w[0], out=x)
    x -= u[0] * w[2]
    total += square(x)
    np.multiply(u[0], w[1], out=x)
    x -= u[1] * w[0]
    total += square(x)
    return np.sqrt(total, out=total)


def mesh_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Enclosed (signed) volume by the divergence theorem; positive for outward normals."""
    return float(_face_volumes(vertices, faces).sum())


def mesh_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    return float(_face_norms(vertices, faces).sum() / 2.0)


def edge_face_counts(faces: np.ndarray) -> np.ndarray:
    """How many faces share each undirected edge (2 everywhere for a closed manifold mesh)."""
    e = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1).astype(np.int64)
    # one int64 key per edge: a 1-D sort, several times faster than unique rows on a decimated heart's mesh
    _, counts = np.unique(e[:, 0] * (int(e.max(initial=0)) + 1) + e[:, 1], return_counts=True)
    return counts


# -- components, decimation --------------------------------------------------------------------

def mesh_components(faces: np.ndarray, n_vertices: int) -> tuple[int, np.ndarray]:
    """Connected components of a mesh (faces joined through shared vertices): (count, label per face)."""
    if len(faces) == 0:
        return 0, np.zeros(0, np.int64)
    e = faces[:, [0, 1, 1, 2]].reshape(-1, 2)
    g = coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices))
    _, vlab = connected_components(g, directed=False)
    # renumber 0..k-1 over components that have faces (isolated vertices have none)
    return _dense(vlab[faces[:, 0]])


def _dense(labels: np.ndarray) -> tuple[int, np.ndarray]:
    """Any integer labels renumbered 0..k-1 in the order of their values: (k, labels)."""
    labels = np.asarray(labels).ravel()
    if labels.size and labels.dtype.kind in "iu" and labels.min() >= 0 and labels.max() <= 2 * labels.size + 1024:
        # component numbers, bounded by the mesh's size: a table lookup, not np.unique's sort (which was
        # most of the mesh stage on a 7 M-face mesh); the same numbering
        present = np.zeros(int(labels.max()) + 1, bool)
        present[labels] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return int(rank[-1]) + 1, rank[labels]
    used, lab = np.unique(labels, return_inverse=True)
    return len(used), lab.astype(np.int64).ravel()


def _vertex_labels(n_vertices: int, faces: np.ndarray, flab: np.ndarray) -> np.ndarray:
    """Per-face labels as per-vertex labels (-1 for vertices no face uses)."""
    vlab = np.full(n_vertices, -1, np.int64)
    vlab[faces] = flab[:, None]
    return vlab


def solid_components(vertices: np.ndarray, faces: np.ndarray, voxel_size,
                     face_volumes: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """Components of the solid: :func:`mesh_components`, except that the inner surface of each
    enclosed cavity (a closed surface of negative volume) joins the component around it.

    For meshes of :func:`marching_cubes_slabs` / :func:`marching_cubes_volume` made with this
    ``voxel_size``: the enclosing component is found along the voxel grid lines (:func:`_cavity_owners`).
    ``face_volumes``: :func:`_face_volumes` of this mesh, if the caller has it.
    """
    n, flab = mesh_components(faces, len(vertices))
    vol = np.bincount(flab, _face_volumes(vertices, faces) if face_volumes is None else face_volumes, n)
    cav = np.flatnonzero(vol < 0)
    if len(cav) == 0:
        return n, flab
    owner = _cavity_owners(vertices, _vertex_labels(len(vertices), faces, flab), vol, cav, voxel_size)
    root = np.arange(n)
    root[cav[owner >= 0]] = owner[owner >= 0]   # a cavity without an owner (none expected) stays apart
    return _dense(root[flab])


def _x_lines(vertices: np.ndarray, vlab: np.ndarray, voxel_size) -> tuple[np.ndarray, np.ndarray]:
    """The vertices on x grid lines (y and z on the voxel grid), ordered by line and then x, and for
    each the position in that order where its line ends."""
    g = vertices[:, 1:] / np.asarray(voxel_size, np.float64)[1::-1]
    r = np.rint(g)
    # grid values are integers times the voxel size exactly; interpolated ones differ by far more
    on = (vlab >= 0) & (np.abs(g - r) <= 1e-9 * (1.0 + np.abs(g))).all(1)
    idx = np.flatnonzero(on)
    idx = idx[np.lexsort((vertices[idx, 0], r[idx, 1], r[idx, 0]))]
    line = r[idx]
    new = np.ones(len(idx), bool)
    new[1:] = (line[1:] != line[:-1]).any(1)
    bounds = np.r_[np.flatnonzero(new), len(idx)]
    return idx, bounds[np.cumsum(new)]


def _cavity_owners(vertices: np.ndarray, vlab: np.ndarray, vol: np.ndarray, cav: np.ndarray,
                   voxel_size) -> np.ndarray:
    """For each cavity component, the component whose surface immediately encloses it (-1: none found).

    A ray from a cavity vertex along its x grid line meets a marching-cubes surface only at the
    vertices on that line (faces cross grid lines only at their vertices), so crossings are counted
    exactly, without ray-triangle tests: the positive components crossed an odd number of times
    enclose the cavity, and the innermost of them has the smallest volume (nested closed surfaces).
    Cost: one sort of the grid-line vertices, plus the crossings along one line per cavity.
    """
    idx, end = _x_lines(vertices, vlab, voxel_size)
    lab = vlab[idx]
    owner = np.full(len(cav), -1, np.int64)
    u, rfirst = np.unique(lab[::-1], return_index=True)
    if len(u) == 0:
        return owner
    k = np.minimum(np.searchsorted(u, cav), len(u) - 1)
    start = len(lab) - 1 - rfirst[k]            # each cavity's last vertex in line order: fewest crossings
    cnt = np.where(u[k] == cav, end[start] - start - 1, 0)
    ray = np.repeat(np.arange(len(cav)), cnt)
    pos = np.arange(cnt.sum()) + np.repeat(start + 1 - (np.cumsum(cnt) - cnt), cnt)
    pair, times = np.unique(ray * len(vol) + lab[pos], return_counts=True)
    ray, hit = np.divmod(pair[times % 2 == 1], len(vol))
    ray, hit = ray[vol[hit] > 0], hit[vol[hit] > 0]
    order = np.lexsort((vol[hit], ray))         # per cavity, smallest enclosing volume first
    ray, hit = ray[order], hit[order]
    first = np.ones(len(ray), bool)
    first[1:] = ray[1:] != ray[:-1]
    owner[ray[first]] = hit[first]
    return owner


def compact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop vertices no face uses and renumber faces."""
    present = np.zeros(len(vertices), bool)   # not np.unique(faces): a sort of three indices per face
    present[faces] = True
    used = np.flatnonzero(present)
    remap = np.full(len(vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    return vertices[used], remap[faces]


def _drop_small(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, min_faces: int,
                dropped: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove the components (per-face ``labels``) with fewer than ``min_faces`` faces (their count in
    ``dropped["small"]`` if given)."""
    v, f, labels, _ = _drop_small_keeping(vertices, faces, labels, min_faces, dropped)
    return v, f, labels


def _drop_small_keeping(vertices, faces, labels, min_faces: int, dropped: dict | None = None, per_face=None):
    """:func:`_drop_small`, also filtering an array of per-face values (None stays None)."""
    if len(faces) == 0:
        return vertices, faces, labels, per_face
    n, lab = _dense(labels)
    big = np.bincount(lab, minlength=n) >= min_faces
    if dropped is not None:
        dropped["small"] = int(np.count_nonzero(~big))
    keep = big[lab]
    v, f = compact(vertices, faces[keep])
    return v, f, labels[keep], None if per_face is None else per_face[keep]


def remove_small_components(vertices: np.ndarray, faces: np.ndarray, min_faces: int = 20,
                            labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove floating pieces with fewer than ``min_faces`` faces: components by shared vertices, or
    by the per-face ``labels`` given (e.g. :func:`solid_components`, which keeps small cavities)."""
    if labels is None:
        labels = mesh_components(faces, len(vertices))[1]
    v, f, _ = _drop_small(vertices, faces, labels, min_faces)
    return v, f


def decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (fast-simplification, what trimesh's ``simplify_quadric_decimation`` runs)
    to at most about ``max_faces`` faces, calling it again on its own output while that stays above the target
    and shrinks; it can stop above that, where it finds no edge left it may collapse under its largest error
    threshold (spongy or many small pieces, or pieces large in µm). Back-to-back face pairs it leaves
    (zero-volume fins) are removed; strong decimation can still pinch surfaces together along edges
    (:func:`non_manifold_edges`).

    Returns the input unchanged when it is already small enough. Without ``fast-simplification``
    it warns and returns the input (the caller then sees the face count it did not ask for).
    """
    v, f, _ = _decimate(vertices, faces, max_faces)
    return v, f


# calls of fast-simplification at most per decimation (:func:`_decimate`): the default phantom's 273 k-face mask
# (4 x 1 x 1 µm voxels) reached 10 faces in 3 where one call stopped at 578; each call works on the previous one's
# output, so the later ones cost little
DECIMATION_PASSES = 20


def _decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`decimate`, plus where each input vertex went (its output index, -1 where dropped; None where
    that cannot be told)."""
    same = np.arange(len(vertices))
    if len(faces) <= max_faces:
        return vertices, faces, same
    try:
        import fast_simplification as fs
    except ImportError:
        warnings.warn("decimation skipped: install 'fast-simplification' for quadric decimation",
                      RuntimeWarning, stacklevel=3)
        return vertices, faces, same
    v, f, vmap = vertices, faces, same
    for _ in range(DECIMATION_PASSES):
        n = len(f)
        out_v, out_f, collapses = fs.simplify(v, f, target_count=int(max_faces), return_collapses=True)
        out_f = np.asarray(out_f, np.int64)
        if vmap is not None:
            step = _collapse_map(len(v), f, np.asarray(collapses, np.int64))
            if np.array_equal(step[f][_kept_faces(step[f])], out_f):
                vmap = np.where(vmap >= 0, step[vmap], -1)
            else:
                # an undocumented numbering changed: the mesh is fine, only the component labels cannot be carried
                warnings.warn(f"fast-simplification {getattr(fs, '__version__', '?')} numbers its output vertices "
                              "in an order gpuheart does not know: components after decimation are taken from the "
                              "decimated surface (a cavity's wall counts as its own piece)", RuntimeWarning,
                              stacklevel=3)
                vmap = None
        v, f = np.asarray(out_v, np.float64), _without_fins(out_f)
        # fast-simplification sweeps a fixed schedule of 100 error thresholds (in the mesh's units squared) over
        # quadrics it accumulates as it collapses, so on a mesh of many faces or large µm coordinates it can run
        # out of thresholds far above the target; a fresh call starts from the quadrics of the coarser surface
        # and goes on. Without this a max_bytes refit (a second call) reached what max_faces alone could not.
        if len(f) <= max_faces or len(f) >= n:
            break
    return v, f, vmap


def _without_fins(faces: np.ndarray) -> np.ndarray:
    """``faces`` without the back-to-back pairs (one vertex triple, opposite windings) that quadric
    decimation leaves where it flattens a thin piece: a fin of zero volume whose edges are shared by four
    faces. Dropping both keeps every directed edge matched by its reverse, so the volume is unchanged."""
    if not len(faces):
        return faces
    key = np.sort(faces, axis=1)
    _, inv, cnt = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    pair = np.flatnonzero(cnt[inv] == 2)
    if not len(pair):
        return faces
    # a face's winding: whether its sorted triple is an even rotation of it
    lo = np.argmin(faces[pair], axis=1)
    even = faces[pair, (lo + 1) % 3] < faces[pair, (lo + 2) % 3]
    windings = np.zeros((len(cnt), 2), np.int64)
    np.add.at(windings, (inv[pair], even.astype(np.int64)), 1)
    fin = (windings[:, 0] == 1) & (windings[:, 1] == 1)
    return faces[~fin[inv]]


def non_manifold_edges(faces: np.ndarray) -> int:
    """Edges not shared by exactly two faces (0 for a closed surface, as marching cubes of a mask gives)."""
    return int((edge_face_counts(faces) != 2).sum()) if len(faces) else 0


def _kept_faces(mapped: np.ndarray) -> np.ndarray:
    """Faces whose three vertices are still distinct after a collapse map (the others are gone)."""
    return (mapped[:, 0] != mapped[:, 1]) & (mapped[:, 1] != mapped[:, 2]) & (mapped[:, 2] != mapped[:, 0])


def _collapse_map(n_vertices: int, faces: np.ndarray, collapses: np.ndarray) -> np.ndarray:
    """Input vertex -> output vertex (-1: gone) of a decimation, from its collapse history
    (``[kept, removed]`` pairs): a vertex goes where the survivor of its collapse group went, and the
    survivors still in a face are numbered in input order (how fast-simplification compacts; checked
    by the caller). For carrying component labels over: a collapse joins the two ends of an edge,
    never two components. (``fast_simplification.replay_simplification`` maps the vertices of
    vanished pieces to unrelated ones, and deletes points one at a time: quadratic.)
    """
    g = coo_matrix((np.ones(len(collapses), np.int8), (collapses[:, 0], collapses[:, 1])),
                   shape=(n_vertices, n_vertices))
    _, group = connected_components(g, directed=False)
    gone = np.zeros(n_vertices, bool)
    gone[collapses[:, 1]] = True
    survivor = np.zeros(group.max() + 1, np.int64)
    survivor[group[~gone]] = np.flatnonzero(~gone)
    to = survivor[group]
    mapped = to[faces]
    used = np.unique(mapped[_kept_faces(mapped)])
    out = np.full(n_vertices, -1, np.int64)
    out[used] = np.arange(len(used))
    return out[to]


def _decimate_labelled(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, max_faces: int,
                       min_faces: int, dropped: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decimate a mesh with per-face component ``labels``, carrying them over, then drop the pieces
    it left under ``min_faces`` (:func:`_drop_fragments`). ``dropped``, if given, gets the faces the
    decimation left and the pieces dropped then, as ``small`` (under ``min_faces``) and ``flat`` (no
    outer surface: a cavity wall whose component lost its outside, or a piece decimated flat)."""
    if len(faces) <= max_faces:
        return vertices, faces, labels
    vlab = _vertex_labels(len(vertices), faces, labels)
    v, f, vmap = _decimate(vertices, faces, max_faces)
    if dropped is not None:
        dropped["faces"] = len(f)
    if vmap is None:
        return _drop_small(v, f, mesh_components(f, len(v))[1], min_faces, dropped)
    carried = np.full(len(v), -1, np.int64)
    carried[vmap[vmap >= 0]] = vlab[vmap >= 0]
    return _drop_fragments(v, f, carried[f[:, 0]], min_faces, dropped)


def _drop_fragments(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray, min_faces: int,
                    dropped: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """After decimation, which shrinks small components and can pinch pieces off big ones: drop the
    surface pieces under ``min_faces``, but keep a cavity wall (negative volume, any size) while an
    outer piece of its component (``labels``) stays. A piece pinched off stays in its component.

    The vertices are off the voxel grid now, so a wall's component comes from the labels, not from
    :func:`_cavity_owners`.
    """
    n, piece = mesh_components(faces, len(vertices))
    if n == 0:
        return vertices, faces, labels
    k, lab = _dense(labels)
    src = np.zeros(n, np.int64)
    src[piece] = lab                                # a piece lies in one component: one label
    wall = np.bincount(piece, _face_volumes(vertices, faces), n) < 0
    outer = ~wall & (np.bincount(piece, minlength=n) >= min_faces)
    alive = np.zeros(k, bool)
    alive[src[outer]] = True
    keep = (outer | (wall & alive[src]))[piece]
    if dropped is not None:
        dropped["small"] = int(np.count_nonzero(~wall & ~outer))
        dropped["flat"] = int(np.count_nonzero(wall & ~alive[src]))
    v, f = compact(vertices, faces[keep])
    return v, f, labels[keep]


# -- per-component table, largest component ---------------------------------------------------

COMPONENT_COLUMNS = ("component", "faces", "vertices", "surface_area", "volume",
                     "x_min", "y_min", "z_min", "x_max", "y_max", "z_max")
# the CSV's header carries the units (µm, x y z order) so it is not mixed up with voxel_components.csv
# (voxel indices, z y x order)
COMPONENT_CSV_HEADER = ("component", "faces", "vertices", "surface_area_um2", "volume_um3",
                        "x_min_um", "y_min_um", "z_min_um", "x_max_um", "y_max_um", "z_max_um")


def component_table(vertices: np.ndarray, faces: np.ndarray, labels: np.ndarray | None = None,
                    face_norms: np.ndarray | None = None, face_volumes: np.ndarray | None = None,
                    ) -> dict[str, np.ndarray]:
    """Per mesh component (largest face count first, numbered from 1): faces, vertices, surface
    area (µm²), enclosed volume (µm³) and bounding box (µm), as columns of equal length.

    Components by shared vertices, or by the per-face ``labels`` given (:func:`solid_components`:
    a cavity's inner surface counts with the component around it, its volume subtracted).
    Voxel counts are not here on purpose: surface components and voxel components (see
    ``morphology.label_slabs``) can differ where voxels touch only at a corner. ``face_norms`` and
    ``face_volumes``: :func:`_face_norms` and :func:`_face_volumes` of this mesh, if the caller has them.
    """
    n, flab = mesh_components(faces, len(vertices)) if labels is None else _dense(labels)
    cols = {c: np.zeros(n) for c in COMPONENT_COLUMNS}
    if n == 0:
        return cols
    norms = _face_norms(vertices, faces) if face_norms is None else face_norms
    area = np.bincount(flab, norms / 2.0, n)
    vol = np.bincount(flab, _face_volumes(vertices, faces) if face_volumes is None else face_volumes, n)
    nf = np.bincount(flab, minlength=n)
    vlab = _vertex_labels(len(vertices), faces, flab)
    used = np.flatnonzero(vlab >= 0)
    # unbuffered min/max per component: no sort of the vertices by component
    big = np.finfo(vertices.dtype).max if vertices.dtype.kind == "f" else np.iinfo(vertices.dtype).max
    lo = np.full((n, 3), big, vertices.dtype)
    hi = np.full((n, 3), -big if vertices.dtype.kind in "fi" else 0, vertices.dtype)
    np.minimum.at(lo, vlab[used], vertices[used])
    np.maximum.at(hi, vlab[used], vertices[used])
    nv = np.bincount(vlab[used], minlength=n)
    rank = np.argsort(-nf, kind="stable")
    cols.update(component=np.arange(1, n + 1), faces=nf[rank], vertices=nv[rank],
                surface_area=area[rank], volume=vol[rank])
    for i, ax in enumerate("xyz"):
        cols[f"{ax}_min"], cols[f"{ax}_max"] = lo[rank, i], hi[rank, i]
    return cols


def write_component_table(table: dict[str, np.ndarray], path) -> None:
    """Write :func:`component_table` as CSV (header line, one row per component), atomically."""
    path = Path(path)
    n = len(table["component"])
    lines = [",".join(COMPONENT_CSV_HEADER)]
    for i in range(n):
        lines.append(",".join(str(int(table[c][i])) if c in ("component", "faces", "vertices")
                              else f"{float(table[c][i]):.10g}" for c in COMPONENT_COLUMNS))  # .6g: 1.43092e+06
    _write_atomic(path, ("\n".join(lines) + "\n").encode())


def largest_component(vertices: np.ndarray, faces: np.ndarray, by: str = "volume",
                      labels: np.ndarray | None = None, face_volumes: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The single component with the largest enclosed volume (``by="volume"``) or face count;
    components by shared vertices or by the per-face ``labels`` given (:func:`solid_components`);
    ``face_volumes``: :func:`_face_volumes` of this mesh, if the caller has it."""
    if by not in ("volume", "faces"):
        raise ValueError(f"by must be 'volume' or 'faces', got {by!r}")
    n, flab = mesh_components(faces, len(vertices)) if labels is None else _dense(labels)
    if n == 0:
        return vertices[:0], faces
    if by == "faces":
        score = np.bincount(flab, minlength=n).astype(float)
    else:
        score = np.bincount(flab, _face_volumes(vertices, faces) if face_volumes is None else face_volumes, n)
    return compact(vertices, faces[flab == int(np.argmax(score))])


def _write_atomic(path: Path, data: bytes) -> None:
    from .io import refuse_folder

    refuse_folder(path, "gpuheart")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- export ------------------------------------------------------------------------------------

def split_for_unity(vertices: np.ndarray, faces: np.ndarray, max_vertices: int = UNITY_MAX_VERTICES,
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a mesh into parts whose vertex sets hold at most ``max_vertices`` each: the faces in
    :func:`_spatial_order`, cut greedily into runs (each as long as the limit allows).

    Each part is a compact piece of space, so few vertices lie on the cuts, where they are duplicated (same
    position, so no visible seam): on a 48 x 768 x 768 vessel mask's 1.84 M-vertex mesh the parts hold 4 %
    more vertices than the mesh, where runs in marching-cubes order (long thin strips through the volume) held
    54 % more. The parts together hold the mesh's triangles, each once, wound as given.
    """
    order = _spatial_order(vertices, faces)
    parts, s, m = [], 0, len(faces)
    # per-vertex scratch, reset after each run: O(faces) per run, where np.unique sorted the run twice
    # (most of the export of a 7 M-face mesh); np.take, not fancy indexing: several times faster on rows.
    # Positions in a window (at most 12 * max_vertices) as int32 where they fit: half the memory traffic
    pos = np.int32 if 12 * max_vertices < np.iinfo(np.int32).max else np.int64
    never = np.iinfo(pos).max
    first, local = np.full(len(vertices), never, pos), np.full(len(vertices), -1, np.int64)
    guess = 5 * max_vertices // 2   # faces tried first: a closed surface's pieces have about 2 a vertex
    while s < m:
        # runs longer than 4 * max_vertices faces are not tried, which bounds the work per part; tried first are
        # a little more faces than the last part took, and all of them only where those all fit. The number of
        # distinct vertices after face i is the count of first occurrences up to it
        last = min(s + 4 * max_vertices, m)
        end = min(s + guess, last)
        while True:
            window = np.take(faces, order[s:end], axis=0)
            flat = window.ravel()
            at = np.arange(flat.size, dtype=pos)
            np.minimum.at(first, flat, at)
            is_first = np.take(first, flat) == at
            first[flat] = never
            distinct = np.cumsum(is_first, dtype=pos)[2::3]
            n = max(1, int(np.searchsorted(distinct, max_vertices, side="right")))
            if n < len(window) or end == last:
                break
            end = last
        used = np.sort(flat[:3 * n][is_first[:3 * n]])
        local[used] = np.arange(len(used))
        parts.append((np.take(vertices, used, axis=0), np.take(local, window[:n])))
        local[used] = -1
        guess = n + n // 8 + 1
        s += n
    return parts


# cells of the Z-order curve along the mesh's longest side (:func:`_spatial_order`): 10 bits per axis, a
# 30-bit code; a cell is then a few voxels wide on scans up to several thousand voxels, and holds far fewer
# faces than a part (about 130 k) on any scan
_ORDER_BITS = 10


def _spread_bits(q: np.ndarray) -> np.ndarray:
    """The low 10 bits of each uint32 spread to every third bit (bit i to bit 3 i)."""
    q = q & np.uint32(0x3FF)
    q = (q | (q << np.uint32(16))) & np.uint32(0x030000FF)
    q = (q | (q << np.uint32(8))) & np.uint32(0x0300F00F)
    q = (q | (q << np.uint32(4))) & np.uint32(0x030C30C3)
    q = (q | (q << np.uint32(2))) & np.uint32(0x09249249)
    return q


def _spatial_order(vertices: np.ndarray, faces: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """The faces (their indices) along a Z-order (Morton) curve through the cells of a grid of cubes,
    2**:data:`_ORDER_BITS` along the mesh's longest side, each face in the cell of its first vertex; faces of
    one cell keep their order. Consecutive faces then stay in compact pieces of space, apart from the curve's
    jumps between blocks.

    Cost: a pass over the vertices and one O(n log n) sort of a uint64 per face, the cell's code above the face's
    index: the keys are distinct, so the order is the same whatever algorithm numpy picks (several times faster
    than an argsort, and that one array of n is all the memory it takes, besides a uint32 per vertex)."""
    m = len(faces)
    shift = max(1, (m - 1).bit_length())
    if not m or 3 * _ORDER_BITS + shift > 64:   # over 2**34 faces: never held, but still an order
        return np.arange(m)
    v = np.asarray(vertices)
    # per column: several times faster than v.min(0) on an (n, 3) array
    lo = np.array([v[:, i].min() for i in range(3)], np.float64)
    hi = np.array([v[:, i].max() for i in range(3)], np.float64)
    ext = float((hi - lo).max())
    top = (1 << _ORDER_BITS) - 1
    scale = top / ext if ext > 0 else 0.0
    code = np.empty(len(v), np.uint32)
    for s in range(0, len(v), chunk):   # in chunks: no float64 copy of all vertices
        q = np.minimum((v[s:s + chunk] - lo) * scale, top).astype(np.uint32)
        code[s:s + chunk] = (_spread_bits(q[:, 0]) | (_spread_bits(q[:, 1]) << np.uint32(1))
                             | (_spread_bits(q[:, 2]) << np.uint32(2)))
    key = np.empty(m, np.uint64)
    for s in range(0, m, chunk):
        key[s:s + chunk] = ((np.take(code, faces[s:s + chunk, 0]).astype(np.uint64) << np.uint64(shift))
                            | np.arange(s, min(s + chunk, m), dtype=np.uint64))
    del code
    key.sort()
    key &= np.uint64((1 << shift) - 1)
    return key.view(np.int64)


def _fixed_bytes(fmt: str, n_parts: int = 1) -> int:
    """What :func:`_estimate_bytes` counts for a file besides its vertices and faces (headers, a GLB's JSON)."""
    # GLB: 28 bytes of headers and about 250 of JSON, plus about 450 a node (trimesh 5.2, measured); 1024 each
    # leaves room for long float bounds. The budget's face count is worked out from what is left after these.
    return {"glb": 1024 + 1024 * n_parts, "ply": 1024, "stl": 84}.get(fmt, 1024)


def _estimate_bytes(fmt: str, parts: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """An upper estimate of the file size, computed before anything is written."""
    nv = sum(len(v) for v, _ in parts)
    nf = sum(len(f) for _, f in parts)
    fixed = _fixed_bytes(fmt, len(parts))
    if fmt == "glb":    # float32 positions + uint32 indices (+ JSON per node)
        return 12 * nv + 12 * nf + fixed
    if fmt == "ply":    # binary: float32 xyz (trimesh), uchar count + 3 int32 per face
        return 12 * nv + 13 * nf + fixed
    if fmt == "stl":    # binary: 80-byte header, count, 50 bytes per triangle
        return fixed + 50 * nf
    # obj text: 'v' + 3 numbers with 8 decimals, 'f' + 3 indices
    big = max((float(np.abs(v).max()) for v, _ in parts if len(v)), default=0.0)
    num = len(str(int(big))) + 11
    return nv * (3 + 3 * num) + nf * (4 + 3 * (len(str(nv)) + 1)) + fixed


def _fitting_faces(fmt: str, parts, estimate: int, max_bytes: int) -> int:
    """Faces a decimation of this mesh may keep for its file to fit ``max_bytes``: the budget less the format's
    fixed bytes (one GLB node), over this mesh's bytes a face (its vertices included), 10% under that, since a
    decimated mesh has a few more vertices a face; 0 when the fixed bytes alone leave no room."""
    nf = sum(len(f) for _, f in parts)
    if not nf:
        return 0
    per_face = (estimate - _fixed_bytes(fmt, len(parts))) / nf
    return max(0, int((max_bytes - _fixed_bytes(fmt)) / per_face * 0.9))


def export_mesh(vertices: np.ndarray, faces: np.ndarray, path, max_bytes: int = 1 << 30,
                max_vertices_per_node: int | None = UNITY_MAX_VERTICES) -> int:
    """Write ``.glb``, ``.ply``, ``.obj`` or ``.stl`` atomically (temp file, then rename); returns bytes.

    Raises :class:`MeshTooLargeError` *before writing* when the estimated size exceeds
    ``max_bytes``. GLB files are split into nodes of at most ``max_vertices_per_node`` vertices
    (module docstring on Unity); other formats hold one mesh.
    """
    import trimesh

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unsupported mesh format {path.suffix!r} for {path}: use one of "
                         + ", ".join("." + f for f in FORMATS))
    if fmt == "glb" and max_vertices_per_node and len(vertices) > max_vertices_per_node:
        parts = split_for_unity(vertices, faces, max_vertices_per_node)
    else:
        parts = [(vertices, faces)]
    est = _estimate_bytes(fmt, parts)
    if est > max_bytes:
        fit = _fitting_faces(fmt, parts, est, max_bytes)
        advice = (f"decimate to about {fit:,} faces (max_faces) or raise max_bytes" if fit else
                  f"a {fmt.upper()} takes about {_fixed_bytes(fmt):,} bytes besides its faces, which leaves no room "
                  f"for even one: raise max_bytes")
        raise MeshTooLargeError(
            f"{path}: a {fmt.upper()} of {len(vertices):,} vertices / {len(faces):,} faces would take "
            f"about {est:,} bytes, over the budget of {max_bytes:,}; {advice}", est, fit)
    meshes = [trimesh.Trimesh(v, f, process=False) for v, f in parts]
    if fmt == "glb":
        scene = trimesh.Scene()
        for i, m in enumerate(meshes):
            scene.add_geometry(m, node_name=f"part{i:04d}", geom_name=f"part{i:04d}")
        data = scene.export(file_type="glb")
    else:
        data = meshes[0].export(file_type=fmt)
    if isinstance(data, str):
        data = data.encode()
    _write_atomic(path, data)
    return len(data)


# -- the entry point ---------------------------------------------------------------------------

@dataclass
class MeshStats:
    """What :func:`mesh_from_mask` wrote, all of it counted on the mesh written to ``path`` (after
    filtering and decimation); areas in µm², volumes in µm³.

    ``components`` are the :func:`solid_components` of the marching-cubes mesh that are in the file
    (a cavity's inner surface, and any piece decimation pinched off, counts with its component);
    ``components_removed`` are those not in the file: under ``min_faces`` in the marching-cubes mesh, plus
    ``components_lost_in_decimation``, those a decimation (to ``max_faces``, or to fit ``max_bytes``) shrank
    under ``min_faces``, flattened or collapsed entirely (0 where no decimation ran).
    """
    path: str
    vertices: int
    faces: int
    components: int
    components_removed: int
    surface_area: float
    volume: float
    bytes: int
    block_factor: int = 1               # k > 1: meshed from the mask averaged over k x k x k voxel blocks
    estimated_faces: int | None = None  # full-resolution marching-cubes faces (None: not estimated)
    components_lost_in_decimation: int = 0   # of components_removed; the rest were under min_faces


def _left_nothing(dropped: dict, min_faces: int) -> str:
    """What a decimation that left no face to write did (``dropped`` from :func:`_decimate_labelled`)."""
    left = dropped.get("faces", 0)
    if not left:
        return "leaves no face"
    small, flat = dropped.get("small", 0), dropped.get("flat", 0)
    flat_why = ("flat or inside-out (no enclosed volume: a closed surface needs at least 4 faces), dropped as "
                "cavity walls without an outer surface")
    if small and flat:
        return (f"leaves every piece under min_faces = {min_faces} ({small:,}) or {flat_why} ({flat:,}); "
                f"{left:,} faces in all")
    if flat:
        return f"leaves {left:,} faces, all in {flat:,} piece(s) {flat_why}"
    return f"leaves every piece under min_faces = {min_faces} ({small:,} piece(s), {left:,} faces)"


def _reduce_and_export(vertices, faces, labels, path, max_faces, min_faces, max_bytes):
    """Decimate to ``max_faces`` (if given) and export; a file that would exceed ``max_bytes`` is
    decimated further to the face count that fits, with a warning, and only raises
    :class:`MeshTooLargeError` (writing nothing) when it still does not fit. Returns the mesh written
    (vertices, faces, labels) and its size in bytes."""
    if max_faces is not None:
        n = len(faces)
        dropped: dict = {}
        vertices, faces, labels = _decimate_labelled(vertices, faces, labels, max_faces, min_faces, dropped)
        if n and not len(faces):   # an empty file would look like an empty mask
            raise ValueError(f"{path}: decimating {n:,} faces to max_faces = {max_faces:,} "
                             f"{_left_nothing(dropped, min_faces)}: nothing would be written; raise max_faces")
        if len(faces) > max_faces:   # quadric decimation stops where it finds no edge it may collapse
            warnings.warn(f"{path}: decimation stopped at {len(faces):,} faces, above max_faces = {max_faces:,} "
                          f"(no edge left that it may collapse, as in spongy or many small pieces); a higher "
                          f"min_faces drops small pieces", RuntimeWarning, stacklevel=3)
        _warn_lost(path, dropped, max_faces, min_faces)
        _warn_non_manifold(path, vertices, faces, n)
    n = len(faces)
    target, lost = None, {"small": 0, "flat": 0}
    # a decimated mesh can have a few more vertices a face than the one its fit was worked out on, so a file that
    # still misses the budget is fitted again from its own size (a round or two; the limit only bounds a loop)
    for fits in range(FIT_ROUNDS + 1):
        try:
            nbytes = export_mesh(vertices, faces, path, max_bytes=max_bytes)
            break
        except MeshTooLargeError as err:
            if not 0 < err.fit_faces < len(faces):
                raise
            if target is not None and len(faces) > target:
                raise MeshTooLargeError(
                    f"{path}: decimation stopped at {len(faces):,} faces, above the {target:,} that fit max_bytes = "
                    f"{max_bytes:,} (no edge left that it may collapse, as in spongy or many small pieces); that mesh "
                    f"would take about {err.estimate:,} bytes: raise max_bytes to that", err.estimate,
                    err.fit_faces) from None
            if fits == FIT_ROUNDS:
                raise MeshTooLargeError(f"{path}: {FIT_ROUNDS} decimations did not fit max_bytes = {max_bytes:,}: "
                                        f"{err}", err.estimate, err.fit_faces) from None
            if target is None:
                warnings.warn(f"{path}: {len(faces):,} faces would take about {err.estimate:,} bytes, over "
                              f"max_bytes = {max_bytes:,}: decimating to about {err.fit_faces:,} faces to fit",
                              RuntimeWarning, stacklevel=3)
            target, before = err.fit_faces, len(faces)
            dropped: dict = {}
            vertices, faces, labels = _decimate_labelled(vertices, faces, labels, target, min_faces, dropped)
            if not len(faces):   # an empty file would look like an empty mask
                raise MeshTooLargeError(f"{path}: fitting {before:,} faces into max_bytes = {max_bytes:,} "
                                        f"{_left_nothing(dropped, min_faces)}: nothing would be written; raise "
                                        f"max_bytes", err.estimate, target) from None
            for key in lost:
                lost[key] += dropped.get(key, 0)
    if target is not None:
        _warn_lost(path, lost, target, min_faces)
        _warn_non_manifold(path, vertices, faces, n)
    return vertices, faces, labels, nbytes


# decimations at most to fit a file into max_bytes (:func:`_reduce_and_export`); one is the rule
FIT_ROUNDS = 5


def _warn_lost(path, dropped: dict, target: int, min_faces: int) -> None:
    """Whole pieces a decimation removed (shrunk under ``min_faces``, or flattened) are worth a word: the
    face count asked for, not the mask, made them vanish."""
    lost = dropped.get("small", 0) + dropped.get("flat", 0)
    if lost:
        warnings.warn(f"{path}: decimating to about {target:,} faces removed whole pieces: {lost:,} left under "
                      f"min_faces = {min_faces} or flat, besides any it collapsed entirely (the summary's count of "
                      f"components removed has them all); a higher face budget keeps them", RuntimeWarning,
                      stacklevel=4)


def _warn_non_manifold(path, vertices: np.ndarray, faces: np.ndarray, before: int) -> None:
    """Quadric decimation can pinch surfaces together along an edge; say so when it did, with what it means.
    Edges are counted between vertex positions, not indices: decimation can leave two vertices at one point,
    which look apart by index but are one to every tool that merges vertices (trimesh on loading, Unity), so a
    count by index missed pinches (149 edges of 4 faces on a 30 k-face mesh, unwarned)."""
    if len(faces) == before:
        return
    _, at = np.unique(np.asarray(vertices), axis=0, return_inverse=True)
    bad = non_manifold_edges(at.ravel()[faces])
    if bad:
        warnings.warn(f"{path}: after decimation to {len(faces):,} faces, {bad:,} edges are shared by more or fewer "
                      f"than two faces (pieces pinched together; a closed surface has two per edge): the mesh "
                      f"displays, but tools that need a watertight surface may refuse it, and its volume and "
                      f"area are approximate; a higher max_faces keeps more of the surface intact",
                      RuntimeWarning, stacklevel=4)


# Peak memory of mesh_from_mask per marching-cubes face (tracemalloc, GLB with largest_path and table_path, no
# decimation), on the phantom's vessel truth repeated to 256 x 256 x 256 (827 k faces): 178 bytes, 193 at 64 slices
# (199 k faces, where the slab weighs more); measured 2026-11-27, when the commit before the marching cubes of
# masks gave 186-222 (an earlier 434 B was stale). The default budget, 20 M faces, keeps the stage near 4 GiB
# (20 M x 200 B); a slab of the mask comes on top.
MAX_MEMORY_FACES = 20_000_000


def mesh_from_mask(read_slab: ReadSlab, shape: tuple[int, int, int], out_path, voxel_size,
                   slab_size: int = 64, min_faces: int = 20, max_faces: int | None = None,
                   level: float = 0.5, max_bytes: int = 1 << 30, table_path=None,
                   largest_path=None, max_memory_faces: int | None = MAX_MEMORY_FACES,
                   device: str = "cpu", progress: bool = False) -> MeshStats:
    """Mask (streamed by ``read_slab(z0, z1)``) -> marching cubes -> :func:`solid_components` ->
    drop components < ``min_faces`` -> decimate to ``max_faces`` (if given; components it leaves
    under ``min_faces`` dropped too) -> file at ``out_path`` (format from its suffix), decimated
    further with a warning where it would exceed ``max_bytes``.

    Optionally writes the largest component by volume as its own mesh (``largest_path``, taken
    before decimation and then decimated and fitted to ``max_bytes`` like the whole) and the
    :func:`component_table` CSV of the mesh written (``table_path``). The main mesh is written
    first, so a mesh that cannot fit raises before any file is written. ``read_slab`` may also be the
    (z, y, x) mask array itself (bool, or integer such as gpuheart's 0/255: voxels above ``level`` are
    inside); ``voxel_size`` is (z, y, x) µm (``(1, 1, 1)`` for voxel units).

    Memory: the whole mesh is held (about 200 bytes per face, :data:`MAX_MEMORY_FACES`), so the faces are
    counted while the mask is meshed (float slabs: by a first streamed pass, :func:`estimate_faces`). Where
    they exceed ``max_memory_faces`` (None or 0: no limit) the mesh is dropped, the rest of the mask only
    counted, and the mask meshed on a grid k times coarser (:func:`block_factor`, raised while the coarse
    mesh exceeds the budget: :func:`_fitting_block_factor`) with a RuntimeWarning: each k x k x k block becomes
    its fraction of inside voxels,
    meshed at about 0.5 (:data:`COARSE_LEVEL`) with voxels k times larger, vertices placed at the block
    centres' physical positions. Structures thinner than about half a block vanish; a budget so small that the
    block mesh keeps no piece of ``min_faces`` faces raises ValueError naming the smallest one that does, rather
    than write an empty file that reads as an empty mask.

    ``device`` ("cpu", "cuda" or "auto"): where the marching cubes of a mask at full resolution runs; the rest
    of the stage (components, measures, decimation, files) runs on the host. ``progress``: a progress bar of
    the slices read (tqdm), started again for each further streamed pass (coarser grids).
    """
    from .io import refuse_folder

    voxel_size = tuple(_voxel_size(voxel_size))
    if max_memory_faces is not None and max_memory_faces < 0:
        raise ValueError(f"max_memory_faces must be >= 0 (0 or None: no limit), got {max_memory_faces}")
    for path, what in ((out_path, "the mesh"), (table_path, "the component table"), (largest_path, "the largest tree")):
        if path is not None:   # refused before the meshing, not after it
            refuse_folder(path, what)
    read_slab, bar = _as_reader(read_slab, shape), None
    if progress:
        read_slab, bar = _progress_reader(read_slab, shape[0])
    try:   # the passes over the mask
        full, est = _full_resolution(read_slab, shape, slab_size, voxel_size, level, max_memory_faces or None,
                                     backend.resolve_device(device))
        k = 1
        if full is None:
            k, full = _fitting_block_factor(read_slab, shape, slab_size, voxel_size, level, est, max_memory_faces)
        est = est if max_memory_faces else None
        v, f, n_mc, lab, fv = _marching_cubes_labelled(voxel_size, k, full)
        small: dict = {}
        v, f, lab, fv = _drop_small_keeping(v, f, lab, min_faces, small, per_face=fv)
        if k > 1 and not len(f):   # an empty file would read as an empty mask
            _refuse_empty_blocks(out_path, read_slab, shape, slab_size, voxel_size, level, est, max_memory_faces, k,
                                 n_mc, min_faces)
    finally:
        if bar is not None:
            bar.close()
    if k > 1:
        half = f"{k / 2:g} voxel" + ("" if k == 2 else "s")
        warnings.warn(f"{out_path}: the mask would give about {est:,} marching-cubes faces, over max_memory_faces = "
                      f"{max_memory_faces:,}: meshed from {k} x {k} x {k} voxel blocks (block factor {k}, "
                      f"{len(full[1]):,} faces) to bound the memory; structures thinner than about {half} "
                      f"are lost and the surface lies inside the mask's (a tube 24 voxels across lost 14 % of its "
                      f"volume at factor 3, 26 % at factor 5)", RuntimeWarning, stacklevel=2)
    mv, mf, mlab, nbytes = _reduce_and_export(v, f, lab, out_path, max_faces, min_faces, max_bytes)
    n = _dense(mlab)[0]
    if largest_path is not None:
        if n == 1 and mv is v and mf is f and Path(largest_path).suffix.lower() == Path(out_path).suffix.lower():
            # one component, written undecimated: the largest is the whole mesh (compact already), and its file
            # would be the same bytes
            _write_atomic(Path(largest_path), Path(out_path).read_bytes())
        else:
            lv, lf = largest_component(v, f, labels=lab, face_volumes=fv)
            _reduce_and_export(lv, lf, np.zeros(len(lf), np.int64), largest_path, max_faces, min_faces,
                               max_bytes)
    # per-face measures of the mesh written, once for the table and the totals (each is a pass over its faces);
    # undecimated, its faces are the ones measured above, in order, at the same positions
    norms, vols = (_face_norms(mv, mf), fv if mf is f and fv is not None else _face_volumes(mv, mf)) \
        if len(mf) else (None, None)
    if table_path is not None:
        write_component_table(component_table(mv, mf, mlab, norms, vols), table_path)
    return MeshStats(str(out_path), len(mv), len(mf), n, n_mc - n,
                     float(norms.sum() / 2.0) if len(mf) else 0.0, float(vols.sum()) if len(mf) else 0.0, nbytes,
                     k, est, n_mc - small.get("small", 0) - n)


def _progress_reader(read_slab: ReadSlab, nz: int):
    """(``read_slab`` that moves a tqdm bar to the deepest slice read, the bar): a read from slice 0 once the bar
    has moved is a further pass over the mask (a coarser grid, a count), which starts the bar again."""
    from tqdm.auto import tqdm

    bar = tqdm(total=nz, desc="mesh", unit="slice", leave=False)
    passes = [1]

    def read(z0: int, z1: int):
        if z0 == 0 and bar.n:
            passes[0] += 1
            bar.reset()
            bar.set_description(f"mesh, pass {passes[0]}")
        slab = read_slab(z0, z1)
        bar.update(max(0, z1 - bar.n))
        return slab

    return read, bar


def _refuse_empty_blocks(out_path, read_slab: ReadSlab, shape, slab_size: int, voxel_size, level: float, estimate: int,
                         max_memory_faces: int, k: int, pieces: int, min_faces: int):
    """Raise the error of a ``max_memory_faces`` so small that the block mesh that fits it keeps nothing (every
    structure thinner than the blocks, or every piece under ``min_faces``), naming the smallest budget that keeps
    a piece: :func:`_workable_memory_faces`."""
    lost = (f"leaves {pieces:,} piece(s), all under min_faces = {min_faces}" if pieces
            else "holds no surface: every structure is thinner than about half a block")
    least, j = _workable_memory_faces(read_slab, shape, slab_size, voxel_size, level, estimate, k, min_faces)
    at = f" (meshed from {j} x {j} x {j} voxel blocks)" if j > 1 else " (full resolution)"
    raise ValueError(f"{out_path}: max_memory_faces = {max_memory_faces:,} is too small for this mask, which would "
                     f"give about {estimate:,} marching-cubes faces: to fit it the mask is meshed from {k} x {k} x {k} "
                     f"voxel blocks, and that mesh {lost}; nothing would be written. Set max_memory_faces ([mesh] "
                     f"max_memory_faces, gpuheart mesh --max-memory-faces) to at least {least:,}{at}, or 0 for no "
                     f"limit")


def _workable_memory_faces(read_slab: ReadSlab, shape, slab_size: int, voxel_size, level: float, estimate: int,
                           k: int, min_faces: int, tries: int = 3) -> tuple[int, int]:
    """(budget, block factor): about the smallest ``max_memory_faces`` under which :func:`mesh_from_mask` keeps a
    piece of ``min_faces`` faces, where block factor ``k`` kept none (``estimate``: the full-resolution faces).

    The coarsest factor j whose block mesh keeps such a piece is found by bisection (a streamed counting pass per
    factor tried, and a meshing pass where the count allows a piece; coarser grids lose pieces, so finer ones
    keep them). Its budget is its face count, and at least ``estimate / j**2`` so that :func:`block_factor` starts
    at or below j; that budget is then run as the stage would run it, and a finer factor tried if it keeps nothing.
    Block meshes of more than :data:`MAX_MEMORY_FACES` faces are taken to keep a piece without meshing them."""
    vs = np.asarray(voxel_size, np.float64)

    def faces_kept(j) -> tuple[int, bool]:
        if j == 1:
            return estimate, True
        read, cshape = _block_reader(read_slab, shape, j, level, slab_size)
        n = estimate_faces(read, cshape, slab_size, COARSE_LEVEL)
        if n < max(min_faces, 1) or n > MAX_MEMORY_FACES:
            return n, n >= max(min_faces, 1)
        mesh = _marching_cubes_float(read, cshape, slab_size, tuple(j * vs), COARSE_LEVEL)
        v, f, _, lab, _ = _marching_cubes_labelled(voxel_size, j, mesh)
        return len(mesh[1]), len(_drop_small_keeping(v, f, lab, min_faces)[1]) > 0

    lo, hi = 1, k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if faces_kept(mid)[1]:
            lo = mid
        else:
            hi = mid
    for j in range(lo, max(1, lo - tries), -1):
        budget = max(faces_kept(j)[0], -(-estimate // (j * j)))
        if budget >= estimate:
            break
        if budget > MAX_MEMORY_FACES:
            return budget, j
        kj, mesh = _fitting_block_factor(read_slab, shape, slab_size, voxel_size, level, estimate, budget)
        v, f, _, lab, _ = _marching_cubes_labelled(voxel_size, kj, mesh)
        if len(_drop_small_keeping(v, f, lab, min_faces)[1]):
            return budget, kj
    return estimate, 1


def _fitting_block_factor(read_slab: ReadSlab, shape, slab_size: int, voxel_size, level: float, estimate: int,
                          max_memory_faces: int | None):
    """(k, the k-block mesh): :func:`block_factor`'s k, raised until the coarse grid's mesh fits, each try a
    streamed pass that meshes the block means and gives up past the budget (the mesh of the k that fits is
    the one kept; vertices on the coarse grid, in its voxels' µm). The k**2 scaling is a heuristic: a lattice of
    tubes a few blocks wide keeps more than 1/k**2 of its faces, and the budget is what bounds the memory."""
    k = max(2, block_factor(estimate, max_memory_faces))
    while True:
        read, cshape = _block_reader(read_slab, shape, k, level, slab_size)
        last = max(cshape) == 1
        mesh = _marching_cubes_float(read, cshape, slab_size, tuple(k * np.asarray(voxel_size)), COARSE_LEVEL,
                                     None if last else max_memory_faces)
        if mesh is not None:
            return k, mesh
        k += 1


def _full_resolution(read_slab: ReadSlab, shape, slab_size: int, voxel_size, level: float, max_faces: int | None,
                     device: str = "cpu"):
    """(the marching-cubes mesh, face count), or (None, face count) where it has more than ``max_faces`` faces
    (None: no limit). A mask is meshed and counted in one pass (on ``device``), given up past ``max_faces``;
    float slabs are counted first (:func:`estimate_faces`)."""
    vs = _voxel_size(voxel_size)
    read, is_mask = _probe(read_slab, shape, slab_size)
    if is_mask:
        v, f, n = _mesh_mask(read, shape, slab_size, vs, level, max_faces, device)
        return (None if v is None else (v, f)), n
    n = estimate_faces(read, shape, slab_size, level) if max_faces else None
    if max_faces and n > max_faces:
        return None, n
    v, f = _marching_cubes_float(read, shape, slab_size, voxel_size, level)
    return (v, f), len(f) if n is None else n


def _marching_cubes_labelled(voxel_size, k: int, mesh):
    """The marching-cubes mesh of the mask, or for k > 1 of its k-block means (:func:`_fitting_block_factor`),
    with its :func:`solid_components`: (vertices, faces, component count, per-face labels, per-face volumes or
    None where they are not at hand)."""
    v, f = mesh
    if k == 1:
        fv = _face_volumes(v, f)   # kept for the largest component's volumes
        return (v, f, *solid_components(v, f, voxel_size, fv), fv)
    n, lab = solid_components(v, f, tuple(k * np.asarray(voxel_size)))   # on the coarse grid, before the shift
    # block i's centre is voxel i k + (k - 1) / 2, where the coarse grid puts it at i k
    v += (k - 1) / 2 * np.asarray(voxel_size)[::-1]
    return v, f, n, lab, None   # the shift changes each face's origin tetrahedron
