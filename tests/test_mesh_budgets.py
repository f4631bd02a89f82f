"""mesh: the face, byte and memory budgets give what they promise (or say why they cannot)."""
import warnings

import numpy as np
import pytest

from gpuheart import mesh as M

fast_simplification = pytest.importorskip("fast_simplification")
trimesh = pytest.importorskip("trimesh")


def _ball(shape=(21, 23, 25), r=8.0):
    c = np.array(shape) / 2 - 0.5
    g = np.indices(shape)
    return ((g - c[:, None, None, None]) ** 2).sum(0) <= r * r


def test_decimation_reaches_a_target_one_fast_simplification_call_stops_above():
    """A 1.6 mm ball (100 µm voxels): one fast-simplification call runs out of error thresholds at 174 faces
    (they are absolute, in µm²), where a second call on its output went on; decimate calls it again."""
    v, f = M.marching_cubes_volume(_ball(), (100, 100, 100))
    assert len(fast_simplification.simplify(v, f, target_count=40)[1]) > 100   # the premise
    v2, f2 = M.decimate(v, f, 40)
    assert 20 <= len(f2) <= 40
    assert M.non_manifold_edges(f2) == 0 and M.mesh_volume(v2, f2) > 0


def test_max_faces_alone_and_a_max_bytes_refit_decimate_alike(tmp_path):
    """The audit: --max-faces N stopped at 520 faces for any N under 400 ('no edge left that it may collapse')
    while --max-faces 162 --max-bytes 5000 got to 140, the refit being a second decimation. Both ways now
    reach the target: max_faces = 40 directly, and an STL budget of 40 faces (84 + 50 bytes a face)."""
    m = _ball()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no 'decimation stopped' warning
        st = M.mesh_from_mask(m, m.shape, tmp_path / "m.ply", (100, 100, 100), max_faces=40)
    assert 20 <= st.faces <= 40 and len(trimesh.load(tmp_path / "m.ply").faces) == st.faces
    with pytest.warns(RuntimeWarning, match="to fit"):
        fit = M.mesh_from_mask(m, m.shape, tmp_path / "m.stl", (100, 100, 100), max_bytes=84 + 50 * 40)
    assert 20 <= fit.faces <= 40 and fit.bytes == (tmp_path / "m.stl").stat().st_size <= 84 + 50 * 40


def _shells(shape=(30, 30, 30)):
    """Two concentric shells and a ball: three pieces, a cavity, ~10 k faces."""
    g = np.indices(shape) - 14.5
    r = np.sqrt((g ** 2).sum(0))
    return (r <= 5) | ((r >= 8) & (r <= 10)) | (r >= 12) & (r <= 14)


@pytest.mark.parametrize("fmt", M.FORMATS)
@pytest.mark.parametrize("budget", [3000, 5000, 8000])
def test_the_face_count_an_over_budget_error_suggests_fits(tmp_path, fmt, budget):
    """The audit: with max_bytes 5000 (or 8000) the error said 'decimate to about 162 faces' (or 184), and a
    mesh of that many faces missed the budget again: the suggestion scaled the face count by the budget,
    the file's fixed bytes (a GLB's headers and JSON) included, as if they shrank with it."""
    v, f = M.marching_cubes_volume(_shells(), (4, 1, 1))
    path = tmp_path / f"m.{fmt}"
    with pytest.raises(M.MeshTooLargeError, match="over the budget") as err:
        M.export_mesh(v, f, path, max_bytes=budget)
    fit = err.value.fit_faces
    assert fit > 20 and f"decimate to about {fit:,} faces" in str(err.value)
    v2, f2 = M.decimate(v, f, fit)
    assert len(f2) <= fit
    assert M.export_mesh(v2, f2, path, max_bytes=budget) == path.stat().st_size <= budget


def test_a_budget_the_fixed_bytes_fill_says_so_and_writes_nothing(tmp_path):
    v, f = M.marching_cubes_volume(_ball())
    with pytest.raises(M.MeshTooLargeError, match="takes about 2,048 bytes besides its faces") as err:
        M.export_mesh(v, f, tmp_path / "m.glb", max_bytes=2000)
    assert err.value.fit_faces == 0 and "raise max_bytes" in str(err.value)
    with pytest.raises(M.MeshTooLargeError, match="besides its faces"):
        M.mesh_from_mask(_ball(), _ball().shape, tmp_path / "m.glb", (1, 1, 1), max_bytes=2000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_fit_that_decimation_cannot_reach_names_a_budget_that_works(tmp_path):
    """Decimation of a sponge with 100 µm voxels stops above what fits 5,084 bytes of STL (100 faces): the error
    says where it stopped and what that mesh takes, and that budget then writes it."""
    m = np.random.default_rng(5).random((14, 16, 18)) < 0.5
    with pytest.raises(M.MeshTooLargeError, match=r"decimation stopped at [\d,]+ faces, above the 90 that fit "
                                                  r"max_bytes = 5,084") as err:
        M.mesh_from_mask(m, m.shape, tmp_path / "m.stl", (100, 100, 100), max_bytes=84 + 50 * 100)
    assert list(tmp_path.iterdir()) == []
    said = int(str(err.value).split("would take about ")[1].split(" bytes")[0].replace(",", ""))
    assert said == err.value.estimate
    st = M.mesh_from_mask(m, m.shape, tmp_path / "m.stl", (100, 100, 100), max_bytes=said)
    assert st.faces > 100 and st.bytes == (tmp_path / "m.stl").stat().st_size <= said


def _two_balls(shape=(24, 40, 40)):
    g = np.indices(shape)
    return (((g - np.array([12, 12, 12])[:, None, None, None]) ** 2).sum(0) <= 81) | \
        (((g - np.array([12, 28, 28])[:, None, None, None]) ** 2).sum(0) <= 16)


def test_a_max_memory_faces_too_small_for_any_piece_is_an_error_naming_one_that_works(tmp_path):
    """The audit: max_memory_faces = 10 wrote an empty mesh and exit 0 ('meshed from 127 x 127 x 127 voxel
    blocks', in which every structure vanishes); README: a budget that leaves nothing is an error."""
    m = _two_balls()
    est = M.estimate_faces(m, m.shape)
    with pytest.raises(ValueError, match=r"m\.glb: max_memory_faces = 10 is too small .*nothing would be written. "
                                         r"Set max_memory_faces .* to at least [\d,]+ ") as err:
        M.mesh_from_mask(m, m.shape, tmp_path / "m.glb", (1, 1, 1), max_memory_faces=10)
    assert list(tmp_path.iterdir()) == []
    least = int(str(err.value).split("to at least ")[1].split(" ")[0].replace(",", ""))
    assert 10 < least < est // 4
    with pytest.warns(RuntimeWarning, match="voxel blocks"):
        st = M.mesh_from_mask(m, m.shape, tmp_path / "m.glb", (1, 1, 1), max_memory_faces=least)
    assert st.faces >= 20 and st.block_factor > 1
    with pytest.raises(ValueError, match="is too small"):   # the smallest: one face less keeps nothing
        M.mesh_from_mask(m, m.shape, tmp_path / "n.glb", (1, 1, 1), max_memory_faces=least - 1)


def test_gpuheart_mesh_with_a_tiny_memory_budget_fails_without_claiming_an_empty_mask(tmp_path, capsys):
    tifffile = pytest.importorskip("tifffile")
    from gpuheart.cli import main

    tifffile.imwrite(tmp_path / "mask.tif", _two_balls().astype(np.uint8) * 255)
    assert main(["mesh", str(tmp_path / "mask.tif"), "-o", str(tmp_path / "m.glb"), "--max-memory-faces", "10"]) == 1
    out, err = capsys.readouterr()
    assert "max_memory_faces = 10 is too small" in err and "--max-memory-faces" in err, err
    assert "no voxel inside" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif"]
