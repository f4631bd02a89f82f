"""Awkward and broken inputs through the whole pipeline: a correct result or one clear line, never a traceback."""
import json
import math

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuheart import Pipeline, PipelineConfig
from gpuheart.cli import main
from gpuheart.io import open_scan

FAST = {"progress": False, "segment": {"method": "dom"}, "output": {"report": False}, "graph": {"enabled": False}}


def _run(tmp_path, volume, name="scan.tif", **over):
    path = tmp_path / name
    tifffile.imwrite(path, volume, photometric="minisblack", metadata={"axes": "ZYX"})
    cfg = PipelineConfig.from_dict({**FAST, **over})
    return Pipeline(cfg).run(path, tmp_path / "out", resume=False)


def _mask(result):
    with open_scan(result.outputs["C00"]["mask"]) as m:
        return m.read_slab(0, 0, m.shape[0])


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpuheart: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_nan_in_float_input_names_the_slice(tmp_path, capsys):
    vol = np.random.default_rng(0).random((5, 40, 40)).astype(np.float32)
    vol[3, 10, 10] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, vol, photometric="minisblack")
    err = _cli_error(capsys, ["run", str(path), "-o", str(tmp_path / "o"), "--no-progress"])
    assert "z=3" in err and "NaN" in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_a_bad_input_stops_before_the_earlier_runs_outputs_in_out_are_removed(tmp_path):
    """Pass 1 reads every slice: a NaN found there must not have cost the finished run in OUT its masks."""
    vol = np.random.default_rng(0).random((5, 40, 40)).astype(np.float32)
    first = _run(tmp_path, vol, name="good.tif")
    vol[3, 10, 10] = np.nan
    with pytest.raises(ValueError, match="z=3"):
        _run(tmp_path, vol, name="nan.tif")
    assert all(p.exists() for p in first.outputs["C00"].values())


def test_inf_in_float_input_names_the_slice(tmp_path, capsys):
    vol = np.ones((4, 32, 32), np.float32)
    vol[1, 0, 0] = np.inf
    path = tmp_path / "inf.tif"
    tifffile.imwrite(path, vol, photometric="minisblack")
    assert "z=1" in _cli_error(capsys, ["run", str(path), "-o", str(tmp_path / "o"), "--no-progress"])


def test_one_slice_stack_runs_and_says_it_is_one_slice(tmp_path):
    """A 2-D image runs, but with a warning: the wrong file of a folder must not pass as a finished scan."""
    vol = np.random.default_rng(1).integers(100, 4000, (1, 64, 64), dtype=np.uint16)
    with pytest.warns(UserWarning, match=r"scan.tif: the scan has one slice \(64 x 64\).*for the closings along z and the mesh; "
                                         r"expected a stack"):
        r = _run(tmp_path, vol)
    assert _mask(r).shape == (1, 64, 64)
    # its CV of slice means is undefined: null in summary.json, which strict JSON readers take (not NaN)

    def refuse(name):
        raise AssertionError(f"summary.json holds {name}")

    s = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)
    assert s["summary"]["C00"]["detrended_cv_raw"] is None
    assert math.isnan(r.summary["C00"]["detrended_cv_raw"])   # Python callers keep the float


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 5, 300), (2, 1, 1)])
def test_slices_smaller_than_kernels_and_tiles(tmp_path, shape):
    vol = np.random.default_rng(2).integers(100, 4000, shape, dtype=np.uint16)
    r = _run(tmp_path, vol, mesh={"enabled": False})
    assert _mask(r).shape == shape


@pytest.mark.parametrize("value", [0, 65535])
def test_constant_slices_give_an_empty_mask(tmp_path, value):
    """All-zero and saturated stacks carry no structure: the honest answer is no vessels, not noise."""
    vol = np.full((6, 48, 48), value, np.uint16)
    r = _run(tmp_path, vol)
    assert not _mask(r).any()
    assert r.summary["C00"]["mesh"]["faces"] == 0


def test_a_saturated_and_a_blank_slice_inside_a_normal_stack(tmp_path):
    vol = np.random.default_rng(3).integers(100, 4000, (8, 48, 48), dtype=np.uint16)
    vol[2] = 65535
    vol[5] = 0
    r = _run(tmp_path, vol)
    assert np.isfinite(r.summary["C00"]["detrended_cv_normalized"])
    assert _mask(r).shape == vol.shape


@pytest.mark.parametrize("vs", [["0", "1", "1"], ["-4", "1", "1"], ["nan", "1", "1"]])
def test_wrong_voxel_sizes(tmp_path, capsys, vs):
    vol = np.zeros((3, 16, 16), np.uint16)
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, photometric="minisblack")
    with pytest.raises(SystemExit) as e:   # refused by the argument parser, before any work
        main(["run", str(path), "-o", str(tmp_path / "o"), "--voxel-size", *vs, "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--voxel-size: must be a positive finite number" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(tmp_path, capsys):
    vol = np.zeros((3, 16, 16), np.uint16)
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, photometric="minisblack")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = _cli_error(capsys, ["run", str(path), "-o", str(blocker / "out"), "--no-progress"])
    assert "a-file" in err


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(z=st.integers(1, 4), y=st.integers(1, 40), x=st.integers(1, 40),
       dtype=st.sampled_from([np.uint8, np.uint16, np.float32]), seed=st.integers(0, 2**16))
def test_any_small_stack_gives_a_mask_of_its_shape(tmp_path_factory, z, y, x, dtype, seed):
    rng = np.random.default_rng(seed)
    vol = (rng.random((z, y, x)) * (200 if dtype == np.uint8 else 4000)).astype(dtype)
    r = _run(tmp_path_factory.mktemp("h"), vol, mesh={"enabled": False})
    m = _mask(r)
    assert m.shape == (z, y, x) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}


def test_nan_in_a_slice_of_a_folder_names_its_file(tmp_path, capsys):
    folder = tmp_path / "scan"
    folder.mkdir()
    vol = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    vol[2, 5, 5] = np.nan
    for z in range(4):
        tifffile.imwrite(folder / f"s_C00_xyz-Table Z{z:04d}.ome.tif", vol[z])
    err = _cli_error(capsys, ["run", str(folder), "-o", str(tmp_path / "o"), "--no-progress"])
    assert "s_C00_xyz-Table Z0002.ome.tif" in err and "NaN" in err


def test_a_slice_cut_inside_its_tags_gives_one_line(tmp_path):
    """tifffile logs a damaged tag while opening; the user sees only gpuheart's line naming the file."""
    folder = tmp_path / "scan"
    folder.mkdir()
    vol = np.random.default_rng(0).integers(0, 4000, (3, 100, 100), dtype=np.uint16)
    for z in range(3):
        tifffile.imwrite(folder / f"s_C00_xyz-Table Z{z:04d}.ome.tif", vol[z])
    bad = folder / "s_C00_xyz-Table Z0001.ome.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "gpuheart", "run", str(folder), "-o", str(tmp_path / "o"),
                          "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 1
    err = run.stderr.strip()  # outside pytest, whose log capture would hide tifffile's stray line
    assert err.startswith("gpuheart: error:") and "\n" not in err
    assert "Z0001.ome.tif" in err and "truncated" in err


@pytest.mark.parametrize("planar", [True, False])
def test_colour_tiff_is_refused_with_a_hint_for_planar_stacks(tmp_path, capsys, planar):
    # a (3, y, x) array written by tifffile without photometric= is stored as planar RGB: a user's 3-slice stack
    path = tmp_path / "rgb.tif"
    vol = np.zeros((3, 20, 30) if planar else (20, 30, 3), np.uint16)
    tifffile.imwrite(path, vol, photometric="rgb", planarconfig="separate" if planar else "contig")
    err = _cli_error(capsys, ["segment", str(path), "-o", str(tmp_path / "m.tif"), "--method", "dom"])
    assert "rgb.tif" in err and "colour samples" in err and "expected grayscale" in err
    assert ("photometric='minisblack'" in err) == planar
    assert ("convert it to grayscale" in err) != planar   # an RGB export of a stack: what to do about it
    assert not (tmp_path / "m.tif").exists()


def test_a_4d_tiff_without_axis_names_is_refused_with_how_to_name_them(tmp_path, capsys):
    """tifffile saves a 4-D array without axes as QQYX: which axis is z and which the channels is unknown."""
    path = tmp_path / "q.tif"
    tifffile.imwrite(path, np.zeros((3, 2, 16, 16), np.uint16))
    err = _cli_error(capsys, ["info", str(path)])
    assert "q.tif" in err and "axes QQYX" in err and "metadata={'axes': 'ZCYX'}" in err


def test_a_folder_of_one_stack_per_channel_runs_and_is_scored(tmp_path, capsys):
    """Fiji's Split Channels saved as C1-heart.tif, C2-heart.tif: `gpuheart run DIR` and `info DIR` read it."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "split"
    folder.mkdir()
    for c in (1, 2):
        tifffile.imwrite(folder / f"C{c}-heart.tif", rng.integers(0, 4000, (6, 40, 40), dtype=np.uint16),
                         imagej=True, resolution=(1.0, 1.0), metadata={"axes": "ZYX", "spacing": 4.0, "unit": "um"})
    truth = tmp_path / "truth.tif"
    tifffile.imwrite(truth, (rng.random((6, 40, 40)) > 0.9).astype(np.uint8) * 255)
    assert main(["info", str(folder)]) == 0
    assert "channels: ['C01', 'C02']" in capsys.readouterr().out
    result = Pipeline(PipelineConfig.from_dict({**FAST, "channels": ["C02"]})).run(
        folder, tmp_path / "out", truth={"C02": str(truth)}, resume=False)
    assert list(result.outputs) == ["C02"]
    with open_scan(result.outputs["C02"]["mask"]) as m:
        assert m.shape == (6, 40, 40) and m.voxel_size == pytest.approx((4.0, 1.0, 1.0))
    assert any(k.endswith("_vs_truth") for k in result.summary["C02"])
