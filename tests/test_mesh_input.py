"""gpuheart mesh takes one binary mask: several channels need --channel, intensities and labels are refused."""
import numpy as np
import pytest

from gpuheart import mesh as M
from gpuheart.cli import main

tifffile = pytest.importorskip("tifffile")


def _box(value=255, dtype=np.uint8):
    m = np.zeros((8, 20, 20), dtype)
    m[2:6, 4:14, 5:12] = value
    return m


def _mesh(tmp_path, src, *flags):
    return main(["mesh", str(src), "-o", str(tmp_path / "m.glb"), *flags])


def _hyperstack(path, *channels):
    tifffile.imwrite(path, np.stack(channels, axis=1), imagej=True, metadata={"axes": "ZCYX"})


def test_a_multi_channel_input_needs_channel_and_meshes_the_one_named(tmp_path, capsys):
    """The audit: a phantom scan folder was meshed from its first channel's intensities (a box of 24 k faces)."""
    rng = np.random.default_rng(0)
    _hyperstack(tmp_path / "two.tif", rng.integers(0, 4000, (8, 20, 20)).astype(np.uint16), _box(1, np.uint16))
    assert _mesh(tmp_path, tmp_path / "two.tif") == 1
    err = capsys.readouterr().err
    assert "two.tif: holds 2 channels (C00, C01)" in err and "--channel NAME" in err, err
    assert not (tmp_path / "m.glb").exists()
    assert _mesh(tmp_path, tmp_path / "two.tif", "--channel", "C01") == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "m.glb").is_file()
    assert _mesh(tmp_path, tmp_path / "two.tif", "--channel", "C00") == 1   # that one is intensities
    assert "two.tif (channel C00): holds more than two values" in capsys.readouterr().err
    assert _mesh(tmp_path, tmp_path / "two.tif", "--channel", "C05") == 1
    assert "unknown channel(s) 'C05'; available: C00, C01" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["intensities", "labels"])
def test_an_input_with_more_than_two_values_is_refused_naming_the_file(tmp_path, capsys, what):
    m = _box()
    if what == "intensities":
        m = np.random.default_rng(1).integers(0, 4000, m.shape).astype(np.uint16)
    else:
        m[6:8, 15:19, 15:19] = 2   # a second label after the first slab's
    tifffile.imwrite(tmp_path / "in.tif", m)
    assert _mesh(tmp_path, tmp_path / "in.tif", "--slab-size", "4") == 1
    err = capsys.readouterr().err
    assert "in.tif: holds more than two values" in err and "expected a binary mask (0 and one nonzero value)" in err
    assert "mask.ome.zarr" in err
    assert not (tmp_path / "m.glb").exists()


@pytest.mark.parametrize("value,dtype", [(255, np.uint8), (1, np.uint8), (1, np.uint16), (True, bool),
                                         (1.0, np.float32)])
def test_a_binary_mask_of_any_inside_value_is_meshed_alike(tmp_path, capsys, value, dtype):
    tifffile.imwrite(tmp_path / "in.tif", _box(value, dtype))
    assert _mesh(tmp_path, tmp_path / "in.tif") == 0
    assert "wrote" in capsys.readouterr().out
    v, f = M.marching_cubes_volume(_box(1, bool))
    import trimesh
    assert len(trimesh.load(tmp_path / "m.glb", force="mesh").faces) == len(f)


def test_the_binary_reader_leaves_the_callers_arrays_alone_unless_they_are_fresh():
    m = _box()
    read = M.binary_mask_reader(lambda z0, z1: m[z0:z1], "m")
    np.testing.assert_array_equal(read(0, 8), m > 0)
    assert m.max() == 255                       # a view of the caller's array: not overwritten
    fresh = M.binary_mask_reader(lambda z0, z1: m[z0:z1].copy(), "m", fresh=True)
    np.testing.assert_array_equal(fresh(0, 8), m > 0)
    with pytest.raises(ValueError, match=r"m: holds more than two values \(0, 255 and 7 at z = 3, y = 5, x = 6\)"):
        m2 = m.copy()
        m2[3, 5, 6] = 7
        M.binary_mask_reader(lambda z0, z1: m2[z0:z1], "m")(0, 8)


@pytest.mark.filterwarnings("ignore:.*voxel blocks:RuntimeWarning")   # the budget is there to make a second pass
def test_the_progress_bar_follows_each_pass_and_changes_nothing(tmp_path, capsys):
    m = _box(1, bool)
    quiet = M.mesh_from_mask(m, m.shape, tmp_path / "a.ply", (1, 1, 1), slab_size=2, max_memory_faces=100)
    assert "mesh" not in capsys.readouterr().err
    shown = M.mesh_from_mask(m, m.shape, tmp_path / "b.ply", (1, 1, 1), slab_size=2, max_memory_faces=100,
                             progress=True)
    err = capsys.readouterr().err
    assert "mesh" in err and "mesh, pass 2" in err, err   # the full-resolution pass, then a coarser grid's
    assert (shown.faces, shown.block_factor) == (quiet.faces, quiet.block_factor) and quiet.block_factor > 1
    assert (tmp_path / "a.ply").read_bytes() == (tmp_path / "b.ply").read_bytes()
    assert main(["mesh", str(tmp_path / "x.tif"), "-o", str(tmp_path / "m.glb"), "--no-progress"]) == 1   # parsed
