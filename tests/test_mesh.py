"""mesh: slab-wise marching cubes == whole-volume skimage, watertight, filtering, export."""
import json
import struct
import warnings
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import measure

from gpuheart import mesh as M
from gpuheart.morphology import remove_small

trimesh = pytest.importorskip("trimesh")


def _reader(vol):
    return lambda z0, z1: vol[z0:z1]


def _ball(shape=(21, 23, 25), r=8.0, c=None):
    c = np.array(shape) / 2 - 0.5 if c is None else np.asarray(c)
    g = np.indices(shape)
    return ((g - c[:, None, None, None]) ** 2).sum(0) <= r * r


def _two_tubes():
    m = np.zeros((30, 20, 24), bool)
    y, x = np.indices(m.shape[1:])
    m[:, ((y - 6) ** 2 + (x - 6) ** 2) <= 9] = True          # runs through both z faces
    m[5:25, ((y - 13) ** 2 + (x - 16) ** 2) <= 12] = True
    return m


def _blob(seed=0):
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random((26, 18, 20)), 1.5) > 0.52


SHAPES = {"ball": _ball, "tubes": _two_tubes, "blob": _blob}


def _skimage_reference(mask, spacing):
    """Independent reference: skimage on the zero-padded volume, axes reversed to (x, y, z)."""
    v, f, _, _ = measure.marching_cubes(np.pad(mask.astype(np.float32), 1), 0.5, spacing=spacing)
    return (v - np.asarray(spacing))[:, ::-1], f


def _rows(a):
    return np.unique(np.round(a, 9), axis=0)


def _triangles(v, f):
    """Faces as sorted triples of positions in the sorted vertex list: comparable across meshes."""
    _, inv = np.unique(np.round(v, 9), axis=0, return_inverse=True)
    return np.unique(np.sort(inv.ravel()[f], axis=1), axis=0)


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("slab_size", [1, 4, 11, 200])
def test_slabs_equal_whole_volume(name, slab_size):
    mask = SHAPES[name]()
    spacing = (2.0, 0.5, 0.75)
    v_ref, f_ref = _skimage_reference(mask, spacing)
    v, f = M.marching_cubes_slabs(_reader(mask), mask.shape, slab_size, spacing)
    assert len(v) == len(v_ref) and len(f) == len(f_ref)
    np.testing.assert_array_equal(_rows(v), _rows(v_ref))
    vol_ref = abs(M.mesh_volume(v_ref, f_ref))
    assert M.mesh_volume(v, f) == pytest.approx(vol_ref, rel=1e-6)  # positive: outward normals
    np.testing.assert_array_equal(_triangles(v, f), _triangles(v_ref, f_ref))
    counts = M.edge_face_counts(f)
    assert (counts == 2).all()  # watertight, also where tubes cross the volume faces
    assert trimesh.Trimesh(v, f, process=False).is_watertight


def test_whole_volume_helper_matches_slabs():
    m = _blob(3)
    v1, f1 = M.marching_cubes_volume(m, (1, 2, 3))
    v2, f2 = M.marching_cubes_slabs(_reader(m), m.shape, 5, (1, 2, 3))
    np.testing.assert_array_equal(_rows(v1), _rows(v2))
    assert len(f1) == len(f2)


def test_anisotropic_volume_and_axes():
    m = _ball((31, 31, 31), 12.0)
    v1, f1 = M.marching_cubes_slabs(_reader(m), m.shape, 8)
    vs = (3.0, 0.5, 0.25)
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 8, vs)
    # a linear map scales volume exactly by the voxel volume
    assert M.mesh_volume(v, f) == pytest.approx(M.mesh_volume(v1, f1) * np.prod(vs), rel=1e-9)
    # and the mesh volume approximates the voxel count
    assert M.mesh_volume(v, f) == pytest.approx(m.sum() * np.prod(vs), rel=0.03)
    # vertices come out as (x, y, z) µm: extents follow the reversed voxel size
    ext = v.max(0) - v.min(0)
    np.testing.assert_allclose(ext / ext[0], np.array(vs[::-1]) / vs[2], rtol=0.05)


def test_empty_and_full():
    z = np.zeros((4, 5, 6), bool)
    v, f = M.marching_cubes_slabs(_reader(z), z.shape, 2)
    assert v.shape == (0, 3) and f.shape == (0, 3)
    full = np.ones((4, 5, 6), bool)
    v, f = M.marching_cubes_slabs(_reader(full), full.shape, 1)
    assert (M.edge_face_counts(f) == 2).all()
    assert M.mesh_volume(v, f) == pytest.approx(M.mesh_volume(*M.marching_cubes_volume(full)))


def _balls_and_specks():
    m = np.zeros((30, 30, 40), bool)
    m |= _ball(m.shape, 6, (8, 8, 8)) | _ball(m.shape, 5, (20, 20, 28))
    m[25, 3, 35] = m[3, 25, 35] = True                     # single voxels: 8 faces each
    return m


def test_remove_small_components():
    m = _balls_and_specks()
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 7)
    n, flab = M.mesh_components(f, len(v))
    assert n == ndi.label(m)[1] == 4
    assert sorted(np.bincount(flab))[:2] == [8, 8]
    v2, f2 = M.remove_small_components(v, f, 20)
    assert M.mesh_components(f2, len(v2))[0] == 2
    assert len(f2) == len(f) - 16 and len(v2) == len(v) - 12  # octahedra: 8 faces, 6 vertices
    assert (M.edge_face_counts(f2) == 2).all()
    assert f2.max() == len(v2) - 1


def test_decimate():
    pytest.importorskip("fast_simplification")
    m = _ball((41, 41, 41), 17.0)
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 16)
    v2, f2 = M.decimate(v, f, len(f) // 4)
    assert len(f2) <= len(f) // 4 * 1.05
    assert M.mesh_volume(v2, f2) == pytest.approx(M.mesh_volume(v, f), rel=0.03)
    assert M.decimate(v, f, len(f))[1] is f


def _glb_json(path):
    data = open(path, "rb").read()
    magic, _, _ = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF"
    n, kind = struct.unpack("<I4s", data[12:20])
    assert kind == b"JSON"
    return json.loads(data[20:20 + n])


@pytest.mark.parametrize("fmt", M.FORMATS)
def test_export_roundtrip(tmp_path, fmt):
    m = _balls_and_specks()
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 7, (2.0, 1.0, 1.0))
    path = tmp_path / f"heart.{fmt}"
    n = M.export_mesh(v, f, path)
    assert path.stat().st_size == n <= M._estimate_bytes(fmt, [(v, f)])
    assert list(tmp_path.iterdir()) == [path]  # no temp file left
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.faces) == len(f)
    assert abs(loaded.volume) == pytest.approx(M.mesh_volume(v, f), rel=1e-4)


def test_glb_split_for_unity(tmp_path):
    m = _ball((21, 23, 25), 9.0)
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 7)
    path = tmp_path / "ball.glb"
    M.export_mesh(v, f, path, max_vertices_per_node=300)
    tree = _glb_json(path)
    prims = [p for mesh in tree["meshes"] for p in mesh["primitives"]]
    assert len(prims) >= -(-len(v) // 300)
    acc = tree["accessors"]
    assert all(acc[p["attributes"]["POSITION"]]["count"] <= 300 for p in prims)
    assert sum(acc[p["indices"]]["count"] for p in prims) == 3 * len(f)
    assert {acc[p["indices"]]["componentType"] for p in prims} == {5125}  # uint32 indices
    scene = trimesh.load(path, process=False)
    assert sum(len(g.faces) for g in scene.geometry.values()) == len(f)
    # the parts together are the same closed surface
    vol = sum(g.volume for g in scene.geometry.values())
    assert vol == pytest.approx(M.mesh_volume(v, f), rel=1e-4)


def test_split_for_unity_bounds():
    m = _blob(1)
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 9)
    for limit in (3, 50, 1000):
        parts = M.split_for_unity(v, f, limit)
        assert all(len(pv) <= limit for pv, _ in parts)
        assert sum(len(pf) for _, pf in parts) == len(f)
        tris = np.concatenate([pv[pf] for pv, pf in parts])
        # the same triangles, each once and wound as given (corners in their order), in another order
        np.testing.assert_array_equal(_corner_rows(tris), _corner_rows(v[f]))


def _corner_rows(tris):
    """Triangles (n, 3, 3) as rows of their nine corner coordinates, sorted: equal for the same triangles
    in any order, wound the same way."""
    rows = np.asarray(tris, np.float64).reshape(len(tris), 9)
    return rows[np.lexsort(rows.T[::-1])]


def _slab_vessels(seed=0, shape=(16, 96, 96)):
    """A thin, wide slab of vessel-like blobs, as a scan's mask: marching-cubes order runs across all of it."""
    m = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5) > 0.53
    return M.marching_cubes_slabs(_reader(m), m.shape, 64, (4.0, 1.0, 1.0))


def test_glb_parts_are_compact_pieces_holding_the_same_triangles(tmp_path, monkeypatch):
    """Parts cut from marching-cubes order were thin slabs across the whole volume, their cut vertices written
    twice: 1.65 x the mesh's vertices here (1.54 x on a 48 x 768 x 768 mask's 1.84 M-vertex mesh). Cut along a
    Z-order curve, they are compact pieces: 1.2 x here, with parts of 2,000 vertices (1.04 x at 65,535)."""
    v, f = _slab_vessels()
    limit = 2000
    parts = M.split_for_unity(v, f, limit)
    written = sum(len(pv) for pv, _ in parts)
    assert written / len(v) < 1.3
    assert len(parts) <= 1.3 * len(v) / limit + 1
    with monkeypatch.context() as mp:   # marching-cubes order, cut the same way: the strips this replaced
        mp.setattr(M, "_spatial_order", lambda v, f: np.arange(len(f)))
        strips = M.split_for_unity(v, f, limit)
    assert sum(len(pv) for pv, _ in strips) / len(v) > 1.6 and len(strips) > len(parts)
    path = tmp_path / "m.glb"
    M.export_mesh(v, f, path, max_vertices_per_node=limit)
    tree = _glb_json(path)
    acc = tree["accessors"]
    prims = [q for mesh in tree["meshes"] for q in mesh["primitives"]]
    assert len(prims) == len(parts) and all(acc[q["attributes"]["POSITION"]]["count"] <= limit for q in prims)
    assert sum(acc[q["attributes"]["POSITION"]]["count"] for q in prims) == written
    scene = trimesh.load(path, process=False)
    tris = np.concatenate([g.vertices[g.faces] for g in scene.geometry.values()])
    np.testing.assert_array_equal(_corner_rows(tris), _corner_rows(v.astype(np.float32)[f]))
    # README: merged, the nodes are the closed surface again, of the mesh's volume
    whole = trimesh.load(path, force="mesh", process=False)
    whole.merge_vertices()
    assert len(whole.vertices) == len(v) and (M.edge_face_counts(np.asarray(whole.faces)) == 2).all()
    assert whole.volume == pytest.approx(M.mesh_volume(v, f), rel=1e-5)


def test_spatial_order_is_the_z_order_of_each_faces_first_vertex_cell():
    v, f = _slab_vessels(1, (10, 40, 50))
    order = M._spatial_order(v, f)
    lo, ext = v.min(0), (v.max(0) - v.min(0)).max()
    top = 2 ** M._ORDER_BITS - 1
    cell = np.minimum((v[f[:, 0]] - lo) * (top / ext), top).astype(np.int64)
    code = np.zeros(len(f), np.int64)
    for bit in range(M._ORDER_BITS):   # interleaved bit by bit: x in bit 3 i, y in 3 i + 1, z in 3 i + 2
        for axis in range(3):
            code |= ((cell[:, axis] >> bit) & 1) << (3 * bit + axis)
    np.testing.assert_array_equal(order, np.argsort(code, kind="stable"))
    assert len(np.unique(code)) > len(f) // 4   # cells finer than the faces, mostly
    for n in (0, 1, 2):   # no faces, one, and a point mesh (no extent)
        np.testing.assert_array_equal(M._spatial_order(np.zeros((3, 3)), np.zeros((n, 3), np.int64)), np.arange(n))


def test_export_budget_and_format_errors(tmp_path):
    v, f = M.marching_cubes_volume(_ball())
    with pytest.raises(M.MeshTooLargeError, match="budget"):
        M.export_mesh(v, f, tmp_path / "x.stl", max_bytes=1000)
    with pytest.raises(ValueError, match="unsupported"):
        M.export_mesh(v, f, tmp_path / "x.fbx")
    assert list(tmp_path.iterdir()) == []


def test_mesh_from_mask(tmp_path):
    m = _balls_and_specks()
    out = tmp_path / "sub" / "mesh.glb"
    st = M.mesh_from_mask(_reader(m), m.shape, out, (2.0, 1.0, 1.0), slab_size=8, min_faces=20)
    assert out.stat().st_size == st.bytes
    assert (st.components, st.components_removed, st.components_lost_in_decimation) == (2, 2, 0)
    big = remove_small(m, 2)  # the voxel-level equivalent of dropping the 8-face specks
    assert st.volume == pytest.approx(M.mesh_volume(*M.marching_cubes_volume(big, (2.0, 1.0, 1.0))), rel=1e-6)
    assert st.faces > 0 and st.surface_area > 0


def test_component_table_matches_separate_meshes(tmp_path):
    m = _balls_and_specks()
    vs = (2.0, 1.0, 0.5)
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 6, vs)
    t = M.component_table(v, f)
    lab, n = ndi.label(m)
    # components are far apart, so each one's own mesh is exactly its part of the whole mesh
    ref = [M.marching_cubes_volume(lab == k, vs) for k in range(1, n + 1)]
    ref.sort(key=lambda vf: -len(vf[1]))
    assert list(t["component"]) == [1, 2, 3, 4]
    assert list(t["faces"]) == [len(rf) for _, rf in ref]
    assert list(t["vertices"]) == [len(rv) for rv, _ in ref]
    np.testing.assert_allclose(t["volume"], [M.mesh_volume(*r) for r in ref], rtol=1e-9)
    np.testing.assert_allclose(t["surface_area"], [M.mesh_area(*r) for r in ref], rtol=1e-9)
    np.testing.assert_allclose(np.stack([t[c] for c in ("x_min", "y_min", "z_min")], 1),
                               [rv.min(0) for rv, _ in ref])
    np.testing.assert_allclose(np.stack([t[c] for c in ("x_max", "y_max", "z_max")], 1),
                               [rv.max(0) for rv, _ in ref])
    path = tmp_path / "components.csv"
    M.write_component_table(t, path)
    rows = np.genfromtxt(path, delimiter=",", names=True)
    assert rows.dtype.names == M.COMPONENT_CSV_HEADER and len(rows) == 4
    assert M.COMPONENT_CSV_HEADER[3:6] == ("surface_area_um2", "volume_um3", "x_min_um")
    np.testing.assert_allclose(rows["volume_um3"], t["volume"], rtol=1e-5)


def test_largest_component(tmp_path):
    m = _balls_and_specks()
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 6)
    lv, lf = M.largest_component(v, f)
    rv, rf = M.marching_cubes_volume(_ball(m.shape, 6, (8, 8, 8)))
    assert len(lf) == len(rf) and M.mesh_volume(lv, lf) == pytest.approx(M.mesh_volume(rv, rf))
    st = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "all.ply", (1, 1, 1), slab_size=5,
                          table_path=tmp_path / "c.csv", largest_path=tmp_path / "largest.stl")
    assert trimesh.load(tmp_path / "largest.stl").faces.shape[0] == len(rf)
    assert len(np.genfromtxt(tmp_path / "c.csv", delimiter=",", names=True)) == st.components == 2


@pytest.mark.parametrize("slab_size", [1, 6])
def test_float_volume_any_level(slab_size):
    # a smooth probability map instead of a mask: counts and volume still equal skimage's
    vol = ndi.gaussian_filter(np.random.default_rng(7).random((19, 15, 17)), 1.2).astype(np.float32)
    level = float(np.quantile(vol, 0.7))
    v, f, _, _ = measure.marching_cubes(np.pad(vol, 1), level)
    vs, fs = M.marching_cubes_slabs(_reader(vol), vol.shape, slab_size, level=level)
    assert (len(vs), len(fs)) == (len(v), len(f))
    assert M.mesh_volume(vs, fs) == pytest.approx(abs(M.mesh_volume(v, f)), rel=1e-6)
    assert (M.edge_face_counts(fs) == 2).all()


def test_volume_of_float32_vertices_far_from_the_origin_is_exact():
    """A mesh from skimage's marching cubes has float32 vertices; each face's volume term is a product of
    three coordinates that cancel in the sum, so in float32 a 2x2x2 block 10 mm from the origin measured
    32,494 instead of 5.67."""
    m = np.zeros((6, 6, 6), bool)
    m[2:4, 2:4, 2:4] = True
    v, f = M.marching_cubes_volume(m)
    far = (v + 1e4).astype(np.float32)
    assert far.astype(np.float64).tolist() == (v + 1e4).tolist()   # the premise: the coordinates are exact
    assert M.mesh_volume(far, f) == pytest.approx(M.mesh_volume(v, f), rel=1e-9)
    assert M.mesh_volume(v, f) == pytest.approx(17 / 3)


def _file_mesh(path):
    m = trimesh.load(path, force="mesh", process=False)
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64)


def test_decimation_is_counted_on_the_mesh_written(tmp_path):
    # decimation shrinks small pieces under min_faces and removes some outright: they are dropped
    # after it, and the stats and the table describe the file, not the mesh before decimation
    pytest.importorskip("fast_simplification")
    m = ndi.gaussian_filter(np.random.default_rng(1).random((24, 40, 40)), 1.2) > 0.53
    vs = (2.0, 0.65, 0.65)
    v0, f0 = M.marching_cubes_volume(m, vs)
    n_mc = M.solid_components(v0, f0, vs)[0]
    st = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "m.ply", vs, slab_size=9, min_faces=20,
                          max_faces=len(f0) // 12, table_path=tmp_path / "c.csv")
    v, f = _file_mesh(tmp_path / "m.ply")
    n, flab = M.mesh_components(f, len(v))
    assert (st.faces, st.vertices) == (len(f), len(v))
    # a piece decimation pinched off counts with its component: at most as many as surface pieces
    assert st.components <= n and st.components + st.components_removed == n_mc
    assert np.bincount(flab).min() >= 20
    rows = np.genfromtxt(tmp_path / "c.csv", delimiter=",", names=True)
    assert len(rows) == st.components and rows["faces"].sum() == len(f)
    assert rows["volume_um3"].sum() == pytest.approx(st.volume, rel=1e-4)
    assert st.volume == pytest.approx(M.mesh_volume(v, f), rel=1e-4)


def test_a_mesh_over_max_bytes_is_decimated_to_fit(tmp_path):
    pytest.importorskip("fast_simplification")
    m = _blob(2)
    full = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "full.glb", (1, 1, 1), slab_size=7)
    budget = int(full.bytes * 0.6)
    with pytest.warns(RuntimeWarning, match="to fit"):
        st = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "out" / "mesh.glb", (1, 1, 1), slab_size=7,
                              max_bytes=budget, largest_path=tmp_path / "out" / "largest_tree.glb")
    assert st.bytes == (tmp_path / "out" / "mesh.glb").stat().st_size <= budget
    assert 0 < (tmp_path / "out" / "largest_tree.glb").stat().st_size <= budget
    assert st.faces < full.faces


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_mesh_that_cannot_fit_leaves_no_output(tmp_path):
    m = _blob(2)
    out = tmp_path / "out"
    # 47 faces would fit, which leaves every piece under min_faces
    with pytest.raises(M.MeshTooLargeError, match="into max_bytes = 3,000 leaves every piece under min_faces"):
        M.mesh_from_mask(_reader(m), m.shape, out / "mesh.glb", (1, 1, 1), slab_size=7, max_bytes=3000,
                         table_path=out / "components.csv", largest_path=out / "largest_tree.glb")
    assert not out.exists() or list(out.iterdir()) == []


def _hollows(shape=(26, 26, 44)):
    """A shell whose cavity holds a ball with a one-voxel cavity, and a box with a one-voxel cavity:
    3 solids, 3 cavities (the one-voxel ones are 8-face surfaces, under min_faces=20)."""
    m = _ball(shape, 11.0, (12.5, 12.5, 12.5)) & ~_ball(shape, 8.0, (12.5, 12.5, 12.5))
    m |= _ball(shape, 4.5, (12.5, 12.5, 12.5))
    m[12, 12, 12] = False
    m[6:20, 6:20, 30:40] = True
    m[12, 12, 35] = False
    return m


def test_a_cavity_belongs_to_the_component_around_it(tmp_path):
    m = _hollows()
    vs = (2.0, 0.65, 0.3)
    lab, n = ndi.label(m)
    assert n == 3 and ndi.label(~m)[1] == 4           # 3 solids; outside + 3 cavities
    own = [M.marching_cubes_volume(lab == k, vs) for k in range(1, n + 1)]  # each with its cavities
    own.sort(key=lambda vf: -len(vf[1]))
    st = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "m.ply", vs, slab_size=6, min_faces=20,
                          table_path=tmp_path / "c.csv", largest_path=tmp_path / "largest.ply")
    assert (st.components, st.components_removed) == (3, 0)
    assert st.faces == sum(len(f) for _, f in own)     # the 8-face cavities are not removed
    rows = np.genfromtxt(tmp_path / "c.csv", delimiter=",", names=True)
    assert list(rows["faces"]) == [len(f) for _, f in own]
    np.testing.assert_allclose(rows["volume_um3"], [M.mesh_volume(*vf) for vf in own], rtol=1e-5)
    assert (rows["volume_um3"] > 0).all()
    shell = max(own, key=lambda vf: M.mesh_volume(*vf))
    lv, lf = _file_mesh(tmp_path / "largest.ply")
    assert len(lf) == len(shell[1]) and M.mesh_components(lf, len(lv))[0] == 2  # outer + inner wall
    assert M.mesh_volume(lv, lf) == pytest.approx(M.mesh_volume(*shell), rel=1e-5)


def test_solid_components_on_random_shells():
    # nested shells and balls at random places, voxel sizes random: components as the voxels count them
    for seed in range(4):
        rng = np.random.default_rng(seed)
        shape = (30, 34, 38)
        m = np.zeros(shape, bool)
        for _ in range(4):
            c, r = rng.uniform(7, np.array(shape) - 7), rng.uniform(4, 10)
            m = (m | _ball(shape, r, c)) & ~_ball(shape, r - 2.5, c)
            m |= _ball(shape, r - 5, c)
        vs = tuple(rng.uniform(0.3, 3.0, 3))
        v, f = M.marching_cubes_volume(m, vs)
        n, lab = M.solid_components(v, f, vs)
        assert M.mesh_components(f, len(v))[0] > n       # there are cavities
        assert n == ndi.label(m)[1] == ndi.label(m, np.ones((3, 3, 3)))[1]
        assert (np.bincount(lab, M._face_volumes(v, f)) > 0).all()


def test_cavities_stay_with_their_component_through_decimation(tmp_path):
    pytest.importorskip("fast_simplification")
    m = _hollows()
    st = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "m.ply", (1, 1, 1), slab_size=6, min_faces=20,
                          max_faces=3000, table_path=tmp_path / "c.csv")
    assert st.components == 3
    v, f = _file_mesh(tmp_path / "m.ply")
    n, flab = M.mesh_components(f, len(v))
    vol = np.bincount(flab, M._face_volumes(v, f), n)
    assert (vol < 0).sum() >= 1 and st.faces == len(f) <= 3000   # the shell's cavity is still there
    assert (np.genfromtxt(tmp_path / "c.csv", delimiter=",", names=True)["volume_um3"] > 0).all()


def test_decimation_carries_component_labels():
    pytest.importorskip("fast_simplification")
    m = _ball((30, 30, 40), 6, (8, 8, 8)) | _ball((30, 30, 40), 5, (22, 22, 30)) | _ball((30, 30, 40), 4, (8, 22, 30))
    v, f = M.marching_cubes_volume(m)
    lab = M.mesh_components(f, len(v))[1] * 10 + 3                 # any integers
    v2, f2, lab2 = M._decimate_labelled(v, f, lab, len(f) // 3, 20)
    n2, piece = M.mesh_components(f2, len(v2))
    assert n2 == 3 and len(f2) <= len(f) // 3
    # each piece keeps the label of the ball it came from: the same ball volumes in the same order
    before = np.bincount(M._dense(lab)[1], M._face_volumes(v, f))
    after = np.bincount(M._dense(lab2)[1], M._face_volumes(v2, f2))
    np.testing.assert_allclose(after, before, rtol=0.05)
    assert all(len(np.unique(lab2[piece == i])) == 1 for i in range(n2))


def test_an_unknown_vertex_numbering_in_decimation_warns_and_still_drops_small_pieces(monkeypatch):
    """The label carrying relies on how fast-simplification numbers its output (undocumented): if that
    changes, a long run must not fail at its mesh; pieces then come from the decimated surface."""
    pytest.importorskip("fast_simplification")
    m = ndi.gaussian_filter(np.random.default_rng(1).random((24, 40, 40)), 1.2) > 0.53
    v, f = M.marching_cubes_volume(m)
    lab = M.mesh_components(f, len(v))[1]
    monkeypatch.setattr(M, "_collapse_map", lambda n, faces, c: np.arange(n)[::-1].copy())
    with pytest.warns(RuntimeWarning, match="numbers its output vertices"):
        v2, f2, lab2 = M._decimate_labelled(v, f, lab, len(f) // 12, 20)
    assert len(f2) <= len(f) // 12 and len(lab2) == len(f2)
    assert np.bincount(M.mesh_components(f2, len(v2))[1]).min() >= 20


def test_float_seam_vertices_that_coincide_in_float32_are_reported():
    """A value within float32 rounding of the level puts two seam vertices of different grid edges on one
    (y, x): the slab seam cannot weld them right, so it says so instead of failing silently."""
    vol = np.zeros((4, 1004, 1004), np.float32)
    vol[:, 1001, 1001] = 0.50001
    with pytest.warns(RuntimeWarning, match="coincide in float32"):
        M.marching_cubes_slabs(lambda a, b: vol[a:b], vol.shape, 2, level=0.5)
    mask = vol > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.marching_cubes_slabs(lambda a, b: mask[a:b], mask.shape, 2)


@pytest.mark.parametrize("voxel_size", [None, (1.0, float("nan"), 1.0), (0, 1, 1), (1, 1)])
def test_an_unknown_or_bad_voxel_size_is_refused_before_a_file_is_written(tmp_path, voxel_size):
    # open_scan gives voxel_size None for a TIFF without calibration: that wrote a GLB of NaN coordinates
    m = _ball((9, 10, 11), r=3)
    with pytest.raises(ValueError, match=r"voxel_size=.*\(z, y, x\)"):
        M.mesh_from_mask(_reader(m), m.shape, tmp_path / "m.glb", voxel_size)
    with pytest.raises(ValueError, match="voxel_size"):
        M.marching_cubes_volume(m, voxel_size)
    assert not list(tmp_path.iterdir())


def test_mesh_from_mask_takes_the_mask_array_itself(tmp_path):
    m = _ball((9, 10, 11), r=3)
    ref = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "a.ply", (2, 1, 1))
    got = M.mesh_from_mask(m, m.shape, tmp_path / "b.ply", (2, 1, 1))
    assert (got.vertices, got.faces, got.volume) == (ref.vertices, ref.faces, ref.volume)
    assert M.mesh_from_mask(m, m.shape, tmp_path / "c.ply", 2.0).volume > 0   # isotropic: one number
    with pytest.raises(ValueError, match=r"mask has shape \(9, 10, 11\), but shape=\(9, 10, 12\)"):
        M.mesh_from_mask(m, (9, 10, 12), tmp_path / "d.ply", (1, 1, 1))
    with pytest.raises(ValueError, match=r"read_slab\(0, 9\) returned shape \(9, 10, 11\); expected \(9, 12, 11\)"):
        M.marching_cubes_slabs(_reader(m), (9, 12, 11), 64)


def test_a_piece_of_exactly_min_faces_is_kept(tmp_path):
    """'Pieces under min_faces are dropped': a single voxel (8 faces) stays at min_faces = 8 and goes at 9,
    in mesh_from_mask (its own min_faces, not the default 20) and after decimation alike."""
    m = _balls_and_specks()
    v, f = M.marching_cubes_slabs(_reader(m), m.shape, 7)
    _, flab = M.mesh_components(f, len(v))
    for min_faces, kept in ((8, 4), (9, 2)):
        v2, f2 = M.remove_small_components(v, f, min_faces)
        assert M.mesh_components(f2, len(v2))[0] == kept
        st = M.mesh_from_mask(_reader(m), m.shape, tmp_path / f"m{min_faces}.ply", (1, 1, 1), min_faces=min_faces)
        assert (st.components, st.components_removed) == (kept, 4 - kept)
        # the filter that runs after decimation (_decimate_labelled) draws the same line
        v3, f3, _ = M._drop_fragments(v, f, flab, min_faces)
        assert M.mesh_components(f3, len(v3))[0] == kept


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_a_0_255_integer_mask_gives_the_mesh_of_the_bool_mask(tmp_path, dtype):
    """gpuheart writes masks as 0/255 (mask.tif): taken as values at level 0.5, their surface sat 0.5/255 of a
    voxel from the background instead of midway between voxels, half a voxel out all round (+18% volume on
    a ball of radius 7). The reference is skimage on the bool mask."""
    m = _ball((20, 21, 22), 7.0)
    vs = (2.0, 0.5, 0.75)
    v_ref, f_ref = _skimage_reference(m, vs)
    ref_volume = abs(M.mesh_volume(v_ref, f_ref))
    m255 = m.astype(dtype) * 255
    v, f = M.marching_cubes_slabs(_reader(m255), m.shape, 6, vs)
    np.testing.assert_array_equal(_rows(v), _rows(v_ref))
    assert M.mesh_volume(v, f) == pytest.approx(ref_volume, rel=1e-9)
    v, f = M.marching_cubes_volume(m255, vs)
    assert M.mesh_volume(v, f) == pytest.approx(ref_volume, rel=1e-9)
    st = M.mesh_from_mask(m255, m.shape, tmp_path / "m.ply", vs, slab_size=6)
    assert (st.faces, st.volume) == (len(f_ref), pytest.approx(ref_volume, rel=1e-9))


def _oriented(v, f, decimals=5):
    """Faces as triples of positions in the sorted vertex list, each rotated to start at its smallest (the
    winding kept): equal for two meshes of one surface with the same orientation, whatever their numbering."""
    _, inv = np.unique(np.round(v, decimals), axis=0, return_inverse=True)
    t = inv.ravel()[f]
    r = np.argmin(t, 1)
    return np.unique(np.stack([t[np.arange(len(t)), (r + i) % 3] for i in range(3)], 1), axis=0)


def test_masks_get_skimages_surface_face_for_face_with_its_winding():
    """Masks (bool, integer) are meshed from the table of skimage's 256 binary cubes, not by skimage: the same
    vertices, triangles and winding as skimage on the padded float volume, including the ambiguous cubes whose
    triangles meet at the cube's centre (checkerboard noise has them) and every slab size."""
    rng = np.random.default_rng(11)
    centre_cases = 0
    for trial in range(40):
        shape = tuple(int(n) for n in rng.integers(2, 12, 3))
        m = rng.random(shape) < rng.uniform(0.1, 0.9)
        if trial % 4 == 0:
            m = ndi.gaussian_filter(rng.random(shape), 1.0) > 0.5
        m.flat[0] = True   # skimage refuses a volume without surface
        vs = (2.0, 0.5, 0.75)
        v_ref, f_ref = _skimage_reference(m, vs)
        mask = m if trial % 2 else (m * 255).astype(np.uint8)
        v, f = M.marching_cubes_slabs(_reader(mask), m.shape, int(rng.integers(1, 5)), vs)
        assert v.dtype == np.float64 and f.dtype == np.int64
        assert (len(v), len(f)) == (len(v_ref), len(f_ref))
        np.testing.assert_allclose(_rows(v), _rows(v_ref), atol=1e-5)
        np.testing.assert_array_equal(_oriented(v, f), _oriented(v_ref, f_ref))
        centre = (np.abs(v / np.asarray(vs)[::-1] % 1 - 0.5) < 1e-9).all(1)
        centre_cases += int(centre.sum())
    assert centre_cases > 0   # the centre vertices were exercised


def test_mesh_components_are_the_18_connected_voxel_components():
    """The docs said voxels touching only along an edge give separate surfaces: skimage's marching cubes
    joins them, and only corner-touching voxels stay apart (two 8-face octahedra)."""
    for d in np.ndindex(3, 3, 3):
        step = np.array(d) - 1
        if not step.any():
            continue
        m = np.zeros((5, 5, 5), bool)
        m[2, 2, 2] = m[tuple(2 + step)] = True
        v, f = M.marching_cubes_slabs(_reader(m), m.shape, 1)
        touching = int(np.abs(step).sum())   # 1: a face, 2: an edge, 3: a corner
        assert M.solid_components(v, f, (1, 1, 1))[0] == (2 if touching == 3 else 1)
        if touching == 3:
            assert np.bincount(M.mesh_components(f, len(v))[1]).tolist() == [8, 8]   # two single-voxel octahedra
    rng = np.random.default_rng(4)
    for _ in range(40):
        m = rng.random(tuple(rng.integers(3, 9, 3))) < rng.uniform(0.05, 0.5)
        v, f = M.marching_cubes_slabs(_reader(m), m.shape, int(rng.integers(1, 4)))
        n = M.solid_components(v, f, (1, 1, 1))[0] if len(f) else 0
        assert n == ndi.label(m, ndi.generate_binary_structure(3, 2))[1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_budget_below_min_faces_is_an_error_not_an_empty_mesh(tmp_path):
    """A ball fits no STL of 1,084 bytes (20 faces) once decimation must stay at or above min_faces."""
    m = _ball()
    out = tmp_path / "out"
    n_faces = len(M.marching_cubes_volume(m)[1])
    assert n_faces > 20 and 84 + 50 * 20 == 1084   # STL: 84-byte header, 50 bytes a face
    with pytest.raises(M.MeshTooLargeError, match="leaves every piece under min_faces = 20"):
        M.mesh_from_mask(m, m.shape, out / "mesh.stl", (1, 1, 1), max_bytes=1084)
    assert not out.exists() or list(out.iterdir()) == []


def test_max_faces_below_min_faces_is_an_error_not_an_empty_mesh(tmp_path):
    m = _ball()
    with pytest.raises(ValueError, match="max_faces = 10 leaves every piece under min_faces = 20"):
        M.mesh_from_mask(m, m.shape, tmp_path / "mesh.glb", (1, 1, 1), max_faces=10)
    assert list(tmp_path.iterdir()) == []


def test_max_faces_under_4_with_min_faces_0_says_what_left_nothing_not_min_faces(tmp_path, capsys):
    """--min-faces 0 with --max-faces 1 or 2: the error said every piece was left 'under min_faces = 0', which
    none can be. Quadric decimation takes a closed surface (at least 4 faces) down to no face at all, or to a
    flat pair of back-to-back triangles that encloses no volume, which gpuheart removes as a fin: either way
    the message must say that nothing is left, not blame min_faces."""
    import fast_simplification
    import tifffile

    from gpuheart.cli import main

    m = _ball()
    v, f = M.marching_cubes_volume(m)
    assert len(fast_simplification.simplify(v, f, target_count=1)[1]) == 0   # the premise of max_faces = 1
    with pytest.raises(ValueError, match=r"max_faces = 1 leaves no face: nothing would be written") as err:
        M.mesh_from_mask(m, m.shape, tmp_path / "mesh.glb", (1, 1, 1), min_faces=0, max_faces=1)
    assert "min_faces" not in str(err.value), err.value
    # the case reported (gpuheart mesh --min-faces 0 --max-faces 2): decimation leaves a flat pair, a fin
    m = _ball((24, 24, 24), 8.0, (12, 12, 12))
    v, f = M.marching_cubes_volume(m)
    pair = fast_simplification.simplify(v, f, target_count=2)[1]
    assert len(pair) == 2 and sorted(pair[0]) == sorted(pair[1])   # the premise: one triangle, both windings
    tifffile.imwrite(tmp_path / "m.tif", m.astype(np.uint8))
    assert main(["mesh", str(tmp_path / "m.tif"), "-o", str(tmp_path / "m.ply"), "--min-faces", "0",
                 "--max-faces", "2"]) == 1
    said = capsys.readouterr().err
    assert "m.ply" in said and "max_faces = 2 leaves no face" in said, said
    assert "min_faces" not in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]


def test_max_faces_that_decimation_cannot_reach_is_said_not_silently_exceeded(tmp_path):
    """A spongy mask (half its voxels set at random) with 100 µm voxels stops quadric decimation above a small
    max_faces (its collapses cost more than fast-simplification's largest error threshold, in µm², allows):
    the file then holds more faces than asked for, and a warning must say so with the count in the file."""
    m = np.random.default_rng(5).random((14, 16, 18)) < 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        M.mesh_from_mask(m, m.shape, tmp_path / "sponge.ply", (100, 100, 100), max_faces=100)
    n_file = len(trimesh.load(tmp_path / "sponge.ply").faces)   # trimesh's reader, not our count
    if n_file <= 100:
        pytest.skip(f"this fast-simplification reaches 100 faces here ({n_file}): nothing to warn about")
    said = [str(w.message) for w in caught if "max_faces = 100" in str(w.message)]
    assert said and f"stopped at {n_file:,} faces" in said[0]
    # a target it reaches gives no such warning, and a file within it
    ball = _ball()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        M.mesh_from_mask(ball, ball.shape, tmp_path / "ball.ply", (1, 1, 1), max_faces=200)
    assert len(trimesh.load(tmp_path / "ball.ply").faces) <= 200
    assert not [w for w in caught if "max_faces" in str(w.message)]


# -- bounded memory: face estimate, coarser grids ---------------------------------------------

def _thin_lines():
    m = np.zeros((20, 24, 24), bool)
    m[:, ::4, ::5] = True                                    # 1-voxel lines through the volume
    i = np.arange(20)
    m[i, i, 23 - i] = True                                   # a diagonal chain touching at corners
    return m


def _noise(p):
    return lambda: np.random.default_rng(5).random((14, 16, 18)) < p


ESTIMATE_SHAPES = {**SHAPES, "thin_lines": _thin_lines, "noise10": _noise(0.1), "noise50": _noise(0.5),
                   "empty": lambda: np.zeros((3, 4, 5), bool), "full": lambda: np.ones((3, 4, 5), bool)}


@pytest.mark.parametrize("name", sorted(ESTIMATE_SHAPES))
def test_the_face_estimate_is_skimage_face_count(name):
    """The bound: exact (0 faces off) on masks, streamed in any slab size; gpuheart's 0/255 masks alike."""
    m = ESTIMATE_SHAPES[name]()
    want = len(measure.marching_cubes(np.pad(m.astype(np.float32), 1), 0.5)[1]) if m.any() else 0
    for slab_size in (1, 3, 64):
        assert M.estimate_faces(_reader(m), m.shape, slab_size) == want
    assert M.estimate_faces((m * 255).astype(np.uint8), m.shape) == want


def test_the_face_estimate_of_a_float_volume_is_close():
    """Float volumes are counted as the mask value > level: ambiguous cubes may differ by a few faces."""
    rng = np.random.default_rng(2)
    vol = ndi.gaussian_filter(rng.random((20, 22, 24)), 1.2).astype(np.float32)
    level = float(np.median(vol))
    want = len(measure.marching_cubes(np.pad(vol, 1, constant_values=vol.min() - 1), level)[1])
    assert M.estimate_faces(vol, vol.shape, level=level) == pytest.approx(want, rel=0.02)


def _block_means(mask, k):
    """The mean of each k x k x k block over the voxels that exist (NaN padding, then nanmean)."""
    n = np.array(mask.shape)
    m = -(-n // k)
    a = np.full(tuple(m * k), np.nan)
    a[:n[0], :n[1], :n[2]] = mask
    return np.nanmean(a.reshape(m[0], k, m[1], k, m[2], k), axis=(1, 3, 5))


def _coarse_reference(mask, k, vs):
    """skimage on the zero-padded block means, k-times voxels, block centres at (k - 1) / 2 voxels."""
    vs = np.asarray(vs, float)
    v, f, _, _ = measure.marching_cubes(np.pad(_block_means(mask, k), 1), 0.5 - 2.0 ** -12, spacing=tuple(k * vs))
    return (v - k * vs + (k - 1) / 2 * vs)[:, ::-1], f


def _dense_blob(shape, seed=4):
    return ndi.gaussian_filter(np.random.default_rng(seed).random(shape), 1.0) > 0.5


@pytest.mark.parametrize("shape", [(24, 30, 36), (25, 31, 35)])   # whole blocks, and partial ones at the edges
def test_over_max_memory_faces_the_mask_is_meshed_from_block_means(tmp_path, shape):
    m = _dense_blob(shape)
    vs = (2.0, 0.5, 0.75)
    full = len(_skimage_reference(m, vs)[1])
    budget = full // 5
    k = next(k for k in range(1, 10) if full / k ** 2 <= budget)   # smallest k whose area scaling fits
    assert k == 3
    out = tmp_path / "mesh.ply"
    with pytest.warns(RuntimeWarning, match=rf"about {full:,} marching-cubes faces.*block factor 3"):
        st = M.mesh_from_mask(_reader(m), m.shape, out, vs, slab_size=2, min_faces=0, max_memory_faces=budget)
    v, f = _coarse_reference(m, k, vs)
    assert (st.block_factor, st.estimated_faces) == (k, full)
    assert (st.vertices, st.faces) == (len(v), len(f))
    assert st.surface_area == pytest.approx(M.mesh_area(v, f), rel=1e-6)
    assert st.volume == pytest.approx(abs(M.mesh_volume(v, f)), rel=1e-6)
    got = trimesh.load(out, process=False)
    np.testing.assert_allclose(got.bounds, [v.min(0), v.max(0)], atol=1e-4)   # same place, same scale
    assert got.is_watertight                                                  # coarse seams welded


def _tube_lattice(nz, ny=64, nx=64):
    """A reader of tubes along z (10 x 10 voxels every 16, thick enough to survive 4-voxel blocks): faces
    grow with the slice count, nothing held."""
    y, x = np.indices((ny, nx))
    plane = ((y % 16) < 10) & ((x % 16) < 10)
    return (lambda z0, z1: np.broadcast_to(plane, (z1 - z0, ny, nx)).astype(np.uint8) * 255), (nz, ny, nx)


def _traced_peak(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_mesh_stage_memory_does_not_grow_with_the_slice_count(tmp_path):
    def run(nz, budget):
        read, shape = _tube_lattice(nz)
        return _traced_peak(lambda: M.mesh_from_mask(
            read, shape, tmp_path / f"{nz}.glb", (1, 1, 1), slab_size=16, table_path=tmp_path / "c.csv",
            largest_path=tmp_path / "l.glb", max_memory_faces=budget))

    budget = 25_000
    bound = 500 * budget + 4 * (17 * 66 * 66 * 4)   # ~200 B a face (measured) with room, and a few slabs
    # 4 x the faces: blocks 2 x wider by the k**2 rule, which at 256 slices gives k = 4 and 27,000 faces:
    # 10-voxel tubes on a 16-voxel lattice keep more than 1/16 of their faces, so k = 5
    for nz, k in ((64, 2), (256, 5)):
        with pytest.warns(RuntimeWarning, match=f"block factor {k}"):
            st, peak = run(nz, budget)
        # 16 tubes with 40 voxel edges around: 2 faces a slice per edge (plus the ends)
        assert st.estimated_faces >= 16 * 40 * 2 * nz and st.block_factor == k
        assert 0.5 * budget < st.faces <= budget and peak < bound, (nz, st, peak, bound)
    st, peak = run(256, None)                        # what the budget bounds: the whole mesh
    assert st.faces >= 16 * 40 * 2 * 256 and peak > 3 * bound   # 334 k faces at ~180 B: 4.4 x the bound


def test_the_block_factor_is_raised_until_the_coarse_mesh_itself_fits():
    """estimate / k**2 is a heuristic; the coarse grid is meshed, given up past the budget, and k grows until its
    mesh fits: that mesh is the one kept (no counting pass before it)."""
    read, shape = _tube_lattice(256)
    est = M.estimate_faces(read, shape, 16)
    assert M.block_factor(est, 25_000) == 4

    def coarse_faces(k):   # skimage on the block means, as the mesh stage meshes them
        m = read(0, shape[0]) > 0
        return len(measure.marching_cubes(np.pad(_block_means(m, k), 1), 0.5 - 2.0 ** -12)[1])

    assert coarse_faces(4) > 25_000 >= coarse_faces(5)
    k, (v, f) = M._fitting_block_factor(read, shape, 16, (1, 1, 1), 0.5, est, 25_000)
    assert (k, len(f)) == (5, coarse_faces(5))
    tried = M._block_reader(read, shape, 4, 0.5, 16)
    assert M._marching_cubes_float(*tried, 16, (4, 4, 4), M.COARSE_LEVEL, 25_000) is None   # k = 4, given up
    assert len(M._marching_cubes_float(*tried, 16, (4, 4, 4), M.COARSE_LEVEL)[1]) == coarse_faces(4)


def test_under_max_memory_faces_nothing_changes(tmp_path):
    m = _dense_blob((24, 30, 36))
    vs = (2.0, 0.5, 0.75)
    full = len(_skimage_reference(m, vs)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "a.ply", vs, min_faces=0, max_memory_faces=full)
    ref = M.mesh_from_mask(_reader(m), m.shape, tmp_path / "b.ply", vs, min_faces=0, max_memory_faces=None)
    assert (st.block_factor, st.estimated_faces, ref.block_factor, ref.estimated_faces) == (1, full, 1, None)
    assert (tmp_path / "a.ply").read_bytes() == (tmp_path / "b.ply").read_bytes()
    assert st.faces == full and st.volume == ref.volume and st.surface_area == ref.surface_area
    with pytest.raises(ValueError, match="max_memory_faces must be >= 0"):
        M.mesh_from_mask(m, m.shape, tmp_path / "c.ply", vs, max_memory_faces=-1)


# -- the O(faces) bookkeeping equals the np.unique / np.cross formulations it replaced ----------------------

def _blob_mesh(seed=3, shape=(24, 40, 40)):
    rng = np.random.default_rng(seed)
    m = ndi.gaussian_filter(rng.random(shape), 1.2) > 0.55   # many pieces, some with cavities
    v, f, _, _ = measure.marching_cubes(np.pad(m, 1).astype(np.float32), 0.5, spacing=(2.0, 0.5, 0.5))
    return v, f.astype(np.int64)


def test_face_volumes_are_the_einsum_cross_triple_product_bit_for_bit():
    v, f = _blob_mesh()
    for verts in (v, v.astype(np.float64) * 1.7 - 3.0):
        a, b, c = (verts[f[:, i]] for i in range(3))
        np.testing.assert_array_equal(M._face_volumes(verts, f), np.einsum("ij,ij->i", a, np.cross(b, c)) / 6.0)


def test_face_norms_are_the_norm_of_np_cross_bit_for_bit():
    v, f = _blob_mesh()
    rng = np.random.default_rng(0)   # and magnitudes far apart, where the order of the sum shows
    wide = rng.normal(size=(5000, 3)) * rng.choice([1e-3, 1.0, 1e3], size=(5000, 1))
    for verts, faces in ((v, f), (v.astype(np.float64) * 1.7 - 3.0, f), (v.astype(np.int32), f),
                         (wide.astype(np.float32), rng.integers(0, 5000, (50000, 3))),
                         (wide, rng.integers(0, 5000, (50000, 3)))):
        a, b, c = (verts[faces[:, i]] for i in range(3))
        want = np.linalg.norm(np.cross(b - a, c - a), axis=1)
        got = M._face_norms(verts, faces)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    t = M.component_table(v, f)
    given = M.component_table(v, f, face_norms=M._face_norms(v, f), face_volumes=M._face_volumes(v, f))
    for k in t:
        np.testing.assert_array_equal(given[k], t[k])


def test_compact_and_dense_number_as_np_unique_does():
    v, f = _blob_mesh()
    keep = np.random.default_rng(0).random(len(f)) < 0.3   # leaves vertices unused
    used = np.unique(f[keep])
    cv, cf = M.compact(v, f[keep])
    np.testing.assert_array_equal(cv, v[used])
    np.testing.assert_array_equal(cf, np.searchsorted(used, f[keep]))
    rng = np.random.default_rng(1)
    for labels in (rng.integers(0, 50, 999), rng.integers(0, 10 ** 12, 999), rng.integers(-9, 9, 999),
                   np.zeros(0, np.int64)):
        want_n, want = len(np.unique(labels)), np.unique(labels, return_inverse=True)[1].ravel()
        n, got = M._dense(labels)
        assert n == want_n and got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def test_split_for_unity_parts_are_the_np_unique_renumbering_of_each_run():
    v, f = _blob_mesh()
    parts = M.split_for_unity(v, f, 500)
    f = f[M._spatial_order(v, f)]   # runs along the Z-order curve
    s = 0
    for pv, pf in parts:
        run = f[s:s + len(pf)]
        used, local = np.unique(run, return_inverse=True)
        np.testing.assert_array_equal(pv, v[used])
        np.testing.assert_array_equal(pf, local.reshape(-1, 3))
        # maximal: one more face would have taken the part over the limit
        assert len(used) <= 500 and (s + len(pf) == len(f) or len(np.unique(f[s:s + len(pf) + 1])) > 500)
        s += len(pf)
    assert s == len(f)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_component_table_boxes_are_each_components_vertex_extremes(dtype):
    v, f = _blob_mesh()
    v = (v * 2).astype(dtype)   # integer positions too (a user's grid-aligned mesh)
    t = M.component_table(v, f)
    n, flab = M.mesh_components(f, len(v))
    order = np.argsort(-np.bincount(flab, minlength=n), kind="stable")   # the table's rows, largest first
    for row, comp in enumerate(order):
        pts = v[np.unique(f[flab == comp])]
        for i, ax in enumerate("xyz"):
            assert t[f"{ax}_min"][row] == pts[:, i].min() and t[f"{ax}_max"][row] == pts[:, i].max()


@pytest.mark.gpu
def test_masks_are_meshed_on_the_device_as_on_the_host(tmp_path):
    """The device runs the same array operations: the same vertices (bits) and faces (numbering), also past the
    memory budget (counting only) and through mesh_from_mask; the mesh comes back as host arrays."""
    m = _blob()
    vs = (2.0, 0.5, 0.75)
    for slab_size in (1, 5, 64):
        host = M.marching_cubes_slabs(_reader(m), m.shape, slab_size, vs, device="cpu")
        dev = M.marching_cubes_slabs(_reader(m), m.shape, slab_size, vs, device="cuda")
        assert all(type(a) is np.ndarray for a in dev)
        np.testing.assert_array_equal(dev[0], host[0])
        np.testing.assert_array_equal(dev[1], host[1])
    full = len(host[1])
    read, is_mask = M._probe(_reader((m * 255).astype(np.uint8)), m.shape, 4)
    assert is_mask
    assert M._mesh_mask(read, m.shape, 4, vs, 0.5, full // 3, "cuda") == (None, None, full)
    sts = [M.mesh_from_mask(_reader(m), m.shape, tmp_path / f"{d}.glb", vs, table_path=tmp_path / f"{d}.csv",
                            device=d) for d in ("cpu", "cuda")]
    assert sts[0] == replace(sts[1], path=sts[0].path)
    assert (tmp_path / "cpu.glb").read_bytes() == (tmp_path / "cuda.glb").read_bytes()
    assert (tmp_path / "cpu.csv").read_bytes() == (tmp_path / "cuda.csv").read_bytes()


@pytest.mark.gpu
def test_a_device_that_fails_to_mesh_warns_and_the_host_meshes(monkeypatch):
    m = _blob()
    want = M.marching_cubes_slabs(_reader(m), m.shape, 4, device="cpu")
    real = M._marching_cubes_mask

    def broken(planes, shape_yx, vs, max_faces=None, device="cpu"):
        if device == "cuda":
            raise RuntimeError("no kernel image is available for execution on the device")
        return real(planes, shape_yx, vs, max_faces, device)

    monkeypatch.setattr(M, "_marching_cubes_mask", broken)
    monkeypatch.setattr(M, "_warned", set())
    with pytest.warns(RuntimeWarning, match="marching cubes: the CUDA kernel failed"):
        got = M.marching_cubes_slabs(_reader(m), m.shape, 4, device="cuda")
    np.testing.assert_array_equal(got[1], want[1])


def _spongy():
    return ndi.gaussian_filter(np.random.default_rng(0).random((20, 40, 40)), 1.5) > 0.52


def test_decimation_removes_back_to_back_fins_without_changing_the_volume():
    """fast-simplification leaves pairs of one triangle in both windings where it flattens a thin piece
    (an audit found 730 such faces in a --max-faces 5000 mesh): zero volume, four faces on each edge."""
    import fast_simplification

    v, f = M.marching_cubes_volume(_spongy())
    raw_v, raw = fast_simplification.simplify(v, f, target_count=len(f) // 10)
    key = np.sort(raw, axis=1)
    assert len(np.unique(key, axis=0)) < len(raw)                     # the premise: fins are there
    dv, df = M.decimate(v, f, len(f) // 10)
    assert len(np.unique(np.sort(df, axis=1), axis=0)) == len(df)     # none left
    assert M.non_manifold_edges(df) < M.non_manifold_edges(raw)
    assert M.mesh_volume(dv, df) == pytest.approx(M.mesh_volume(raw_v, raw), rel=1e-9)
    # a fin added to a closed surface goes; a face repeated in one winding is not a fin and stays
    v, f = M.marching_cubes_volume(_ball())
    fin = np.array([[0, 600, 1200], [1200, 600, 0]])   # a triple no face of the ball has
    assert not (np.sort(f, axis=1) == [0, 600, 1200]).all(axis=1).any()
    assert np.array_equal(M._without_fins(np.vstack([f, fin])), f)
    assert len(M._without_fins(np.vstack([f, f[:1]]))) == len(f) + 1


def test_a_decimated_mesh_with_pinched_edges_is_said_to_be_so(tmp_path):
    m = _spongy()
    with pytest.warns(RuntimeWarning, match="edges are shared by more or fewer than two faces"):
        st = M.mesh_from_mask(m, m.shape, tmp_path / "m.ply", (1, 1, 1), max_faces=2000)
    assert st.faces <= 2000
    with warnings.catch_warnings():   # undecimated: marching cubes of a mask is closed, nothing to say
        warnings.simplefilter("error")
        M.mesh_from_mask(m, m.shape, tmp_path / "full.ply", (1, 1, 1))


def test_a_pinch_between_two_vertices_at_one_point_is_counted(tmp_path):
    """Decimation can leave two vertices at one position: apart by index, one edge of four faces to any tool
    that merges vertices (trimesh on loading); the warning counted by index and said nothing."""
    tet = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    a = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    b = np.array([[0, 0, 0], [1, 0, 0], [0, -1, 0], [0, 0, -1]], float)   # shares a's edge (0,0,0)-(1,0,0)
    v, f = np.vstack([a, b]), np.vstack([tet, tet + 4])
    assert M.non_manifold_edges(f) == 0   # by index: two closed pieces
    with pytest.warns(RuntimeWarning, match="1 edges are shared by more or fewer than two faces"):
        M._warn_non_manifold(tmp_path / "m.ply", v, f, before=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M._warn_non_manifold(tmp_path / "m.ply", np.vstack([a, b + 5]), f, before=100)


def test_mesh_outputs_refuse_a_folder_in_their_place_before_meshing(tmp_path):
    m = _ball()
    for kw in ({"out_path": tmp_path / "d.glb"}, {"table_path": tmp_path / "d.glb"},
               {"largest_path": tmp_path / "d.glb"}):
        (tmp_path / "d.glb").mkdir(exist_ok=True)
        (tmp_path / "d.glb" / "keep.txt").write_text("mine")
        args = {"out_path": tmp_path / "m.glb", **kw}
        with pytest.raises(ValueError, match="is a folder; .* writes a file there"):
            M.mesh_from_mask(m, m.shape, voxel_size=(1, 1, 1), **args)
        assert (tmp_path / "d.glb" / "keep.txt").read_text() == "mine"
        assert not (tmp_path / "m.glb").exists()


def test_pieces_a_decimation_removes_are_said_to_be_removed(tmp_path):
    m = _spongy()
    v, f = M.marching_cubes_volume(m)
    full = M.mesh_from_mask(m, m.shape, tmp_path / "full.ply", (1, 1, 1))
    with pytest.warns(RuntimeWarning, match=r"removed whole pieces: \d+ left under min_faces = 20 or flat"):
        st = M.mesh_from_mask(m, m.shape, tmp_path / "m.ply", (1, 1, 1), max_faces=len(f) // 50)
    assert st.components_removed > full.components_removed
    # the ones under min_faces before decimation are the undecimated mesh's; the rest are the decimation's
    assert full.components_lost_in_decimation == 0
    assert st.components_lost_in_decimation == st.components_removed - full.components_removed > 0


def test_a_one_component_mesh_is_its_own_largest_tree_without_a_second_export(tmp_path, monkeypatch):
    m = _ball((21, 23, 25), 9.0)
    calls = []
    export = M.export_mesh
    monkeypatch.setattr(M, "export_mesh", lambda *a, **k: calls.append(a[2]) or export(*a, **k))
    st = M.mesh_from_mask(m, m.shape, tmp_path / "m.glb", (2, 1, 1), largest_path=tmp_path / "l.glb")
    assert st.components == 1 and calls == [tmp_path / "m.glb"]
    assert (tmp_path / "l.glb").read_bytes() == (tmp_path / "m.glb").read_bytes()
    # the largest component's triangles
    lv, lf = M.largest_component(*M.marching_cubes_volume(m, (2, 1, 1)))
    scene = trimesh.load(tmp_path / "l.glb", process=False)
    tris = np.concatenate([g.vertices[g.faces] for g in scene.geometry.values()])
    np.testing.assert_array_equal(_corner_rows(tris), _corner_rows(lv.astype(np.float32)[lf]))
    # two components, or another format: exported
    calls.clear()
    m2 = m.copy()
    m2[:2, :2, :2] = True
    M.mesh_from_mask(m2, m2.shape, tmp_path / "m2.glb", (2, 1, 1), largest_path=tmp_path / "l2.glb")
    M.mesh_from_mask(m, m.shape, tmp_path / "m3.glb", (2, 1, 1), largest_path=tmp_path / "l3.ply")
    assert calls == [tmp_path / "m2.glb", tmp_path / "l2.glb", tmp_path / "m3.glb", tmp_path / "l3.ply"]
