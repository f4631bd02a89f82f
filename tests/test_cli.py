import json
import subprocess
import sys

import numpy as np
import pytest

from gpuheart.cli import main


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in (
    "run", "phantom", "info", "report", "mesh", "segment", "train")])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: gpuheart" in capsys.readouterr().out


def test_run_help_says_which_channels_the_built_in_scan_runs(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # a run without INPUT processes the channels with truth (pipeline: channels or list(truth)), not all three
    assert "(default: all; of the built-in synthetic scan, the stained C00 and C01, not the autofluorescence C02)" in text


def test_mesh_command_decimates_at_the_runs_size_limit():
    from gpuheart.cli import _parser
    from gpuheart.pipeline import MeshConfig

    # gpuheart mesh on a run's mask must give the run's mesh: it used 1e9 against the config's 2**30
    assert _parser().parse_args(["mesh", "m.tif", "-o", "m.glb"]).max_bytes == MeshConfig().max_bytes


def test_phantom_then_info_then_run(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    scan = tmp_path / "ph" / "scan"
    assert str(scan) in capsys.readouterr().out
    assert main(["info", str(scan), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["channels"] == ["C00", "C01", "C02"]
    assert info["voxel_size"] == [4.0, 1.0, 1.0] and info["nbytes"] == 3 * 16 * 64 * 64 * 2
    assert main(["info", str(scan)]) == 0   # for a person: with units
    text = capsys.readouterr().out
    assert "voxel_size: 4 x 1 x 1 µm (z, y, x)" in text and "nbytes: 393,216 bytes (384.0 KiB)" in text
    cfg = tmp_path / "dom.toml"
    cfg.write_text('[segment]\nmethod = "dom"\n')
    assert main(["run", str(scan), "-o", str(tmp_path / "out"), "--channels", "C00", "--no-progress",
                 "-c", str(cfg), "--truth", "C00", str(tmp_path / "ph" / "truth" / "C00.tif")]) == 0
    out = capsys.readouterr().out
    assert "Dice vs truth" in out and (tmp_path / "out" / "C00" / "dom_mask.ome.zarr").is_dir()
    # the phantom's laser-dropout slice is blanked, and the user is told which and how to keep it
    dark = json.loads((tmp_path / "ph" / "phantom.json").read_text())["dark_slice"]
    assert (f"dark slices (spread <= 0.1 of the stack's, or <= 0.35 of the slices' on both sides, e.g. laser "
            f"dropout): 1 at z = {dark}; written as 0") in out
    assert "dark_ratio = 0" in out


def test_z_ranges_are_written_compactly():
    from gpuheart.cli import _z_ranges

    assert _z_ranges([0, 1, 2, 3, 9, 11, 12]) == "0-3, 9, 11-12"
    assert _z_ranges([5]) == "5" and _z_ranges([]) == ""


def test_run_with_a_channel_preset(tmp_path, capsys):
    from gpuheart import PipelineConfig

    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    scan = tmp_path / "ph" / "scan"
    assert main(["run", str(scan), "-o", str(tmp_path / "out"), "--channels", "C01", "--no-progress",
                 "--preset", "C01=nerves", "--truth", "C01", str(tmp_path / "ph" / "truth" / "C01.tif")]) == 0
    assert PipelineConfig.load(tmp_path / "out" / "config.toml").for_channel("C01").dom.threshold == "noise"
    assert not (tmp_path / "out" / "C01" / "unet_mask.ome.zarr").exists()   # nerves: no vessel U-Net
    capsys.readouterr()
    for bad in ("C01", "C01=axons"):
        assert main(["run", str(scan), "-o", str(tmp_path / "bad"), "--preset", bad, "--no-progress"]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("CHANNEL=NAME" in err or "unknown preset" in err)


def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-scan"
    assert main(["run", str(missing), "-o", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpuheart: error:") and str(missing) in err and "\n" not in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_cuda_request_without_gpu_fails_cleanly(tmp_path, capsys):
    from gpuheart.backend import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", "-o", str(tmp_path), "--device", "cuda", "--no-progress"]) == 1
    assert "cuda" in capsys.readouterr().err


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "gpuheart", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "gpuheart" in r.stdout


def test_segment_then_mesh(tmp_path, capsys):
    import numpy as np
    import tifffile
    import trimesh

    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    scan = tmp_path / "ph" / "scan"
    out = tmp_path / "seg" / "mask.tif"
    assert main(["segment", str(scan), "-o", str(out), "--method", "dom", "--no-progress"]) == 0
    mask = tifffile.imread(out)
    assert mask.shape == (16, 64, 64) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert [p.name for p in out.parent.iterdir()] == ["mask.tif"]  # no work files left behind
    glb = tmp_path / "m.glb"
    assert main(["mesh", str(out), "-o", str(glb), "--voxel-size", "4", "1", "1", "--min-faces", "20"]) == 0
    assert "faces" in capsys.readouterr().out
    assert trimesh.load(glb, force="mesh").is_watertight


def test_segment_with_global_otsu(tmp_path):
    """--method otsu needs the preprocessed volume, which segment keeps only in its temporary run folder."""
    import numpy as np
    import tifffile
    from skimage.filters import threshold_otsu

    from gpuheart.exposure import preprocess_volume

    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    out = tmp_path / "seg" / "otsu.tif"
    assert main(["segment", str(tmp_path / "ph" / "scan"), "-o", str(out), "--method", "otsu", "--no-progress"]) == 0
    mask = tifffile.imread(out)
    assert mask.shape == (16, 64, 64) and mask.dtype == np.uint8 and mask.any()
    assert [p.name for p in out.parent.iterdir()] == ["otsu.tif"]
    from gpuheart.io import open_scan

    with open_scan(tmp_path / "ph" / "scan") as s:
        pre = preprocess_volume(s.read_slab("C00", 0, s.shape[0]))
    dark = json.loads((tmp_path / "ph" / "phantom.json").read_text())["dark_slice"]   # blank: not in the histogram
    np.testing.assert_array_equal(mask > 0, pre > threshold_otsu(np.delete(pre, dark, 0)))
    cfg = tmp_path / "c.toml"   # the same when only the channel's own settings ask for it
    cfg.write_text('[channel.C00.segment]\nmethod = "otsu"\n')
    out2 = tmp_path / "seg" / "otsu2.tif"
    assert main(["segment", str(tmp_path / "ph" / "scan"), "-o", str(out2), "--config", str(cfg),
                 "--no-progress"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out2), mask)


def test_mesh_of_missing_mask_fails_cleanly(tmp_path, capsys):
    assert main(["mesh", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "m.glb")]) == 1
    assert "nope.tif" in capsys.readouterr().err
    assert not (tmp_path / "m.glb").exists()


def test_train_smoke(tmp_path, capsys):
    """Two tiny epochs on two synthetic scans: the command runs end to end and writes its files."""
    assert main(["train", "-o", str(tmp_path / "run"), "--phantom", "1", "--epochs", "2", "--steps", "2",
                 "--batch-size", "2", "--tile", "64", "--width", "4", "--no-progress", "--workers", "2"]) == 0
    assert "best validation Dice" in capsys.readouterr().out
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "log.csv").is_file()
    from gpuheart import unet
    assert unet.load_weights(tmp_path / "run" / "best.pt").meta["config"]["workers"] == 2
    # the same command with --resume: nothing left to train, and it says so
    assert main(["train", "-o", str(tmp_path / "run"), "--phantom", "1", "--epochs", "2", "--steps", "2",
                 "--batch-size", "2", "--tile", "64", "--width", "4", "--no-progress", "--workers", "2",
                 "--resume"]) == 0
    assert "--resume found nothing left to train: it had run its 2 epochs" in capsys.readouterr().out


def test_train_fine_tunes_with_init_context_and_lr(tmp_path, capsys):
    """--init starts from saved weights (here a 2.5-D model, --context 1), at the given --lr."""
    from gpuheart import unet

    common = ["--phantom", "1", "--epochs", "1", "--steps", "1", "--batch-size", "2", "--tile", "64", "--width", "4",
              "--context", "1", "--no-progress"]
    assert main(["train", "-o", str(tmp_path / "a"), *common]) == 0
    assert main(["train", "-o", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "best.pt"), "--lr", "3e-4",
                 *common]) == 0
    meta = unet.load_weights(tmp_path / "b" / "best.pt").meta["config"]
    assert meta["init"] == str(tmp_path / "a" / "best.pt") and meta["lr"] == 3e-4 and meta["context"] == 1
    assert main(["train", "-o", str(tmp_path / "c"), "--init", str(tmp_path / "a" / "best.pt"), "--phantom", "1",
                 "--epochs", "1", "--steps", "1", "--tile", "64", "--width", "8", "--no-progress"]) == 1
    assert "differs" in capsys.readouterr().err


def test_finetune_takes_the_models_architecture_and_the_measured_recipe(tmp_path, capsys):
    """--finetune W: W's width/tile/loss/context, lr 3e-4, threshold 0.5 stored, 6x25 steps unless overridden."""
    from gpuheart import cli, unet

    assert main(["train", "-o", str(tmp_path / "a"), "--phantom", "1", "--epochs", "1", "--steps", "1",
                 "--batch-size", "2", "--tile", "64", "--width", "4", "--context", "1", "--loss", "dice_bce",
                 "--no-progress"]) == 0
    w = str(tmp_path / "a" / "best.pt")
    assert main(["train", "-o", str(tmp_path / "b"), "--finetune", w, "--phantom", "1", "--steps", "1",
                 "--epochs", "1", "--batch-size", "2", "--no-progress"]) == 0
    meta = unet.load_weights(tmp_path / "b" / "best.pt").meta
    c = meta["config"]
    assert (c["init"], c["width"], c["tile"], c["context"], c["loss"], c["lr"]) == (w, 4, 64, 1, "dice_bce", 3e-4)
    assert c["threshold"] == 0.5 == meta["threshold"] and (c["epochs"], c["steps_per_epoch"]) == (1, 1)
    a = cli._parser().parse_args(["train", "x", "-o", "y", "--finetune"])
    s = cli._train_settings(a)   # the shipped model, with the measured recipe
    assert s["init"] == str(unet.default_weights_path()) and s["loss"] == "dice_bce"
    assert (s["epochs"], s["steps_per_epoch"], s["lr"], s["threshold"]) == (6, 25, 3e-4, 0.5)
    assert main(["train", "-o", str(tmp_path / "c"), "--finetune", w, "--init", w, "--phantom", "1"]) == 1
    assert "not both" in capsys.readouterr().err


def test_train_without_data_fails_cleanly(tmp_path, capsys):
    assert main(["train", "-o", str(tmp_path / "run"), "--no-progress"]) == 1
    assert "no training data" in capsys.readouterr().err


def test_batch_continues_past_a_failing_scan(tmp_path, capsys):
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    good = tmp_path / "scans" / "a_image.tif"
    good.parent.mkdir()
    tifffile.imwrite(good, rng.integers(0, 4000, (5, 48, 48), dtype=np.uint16))
    bad = tmp_path / "scans" / "b_image.tif"
    bad.write_bytes(b"not a tiff at all")
    cfg = tmp_path / "dom.toml"
    cfg.write_text('[segment]\nmethod = "dom"\n[mesh]\nenabled = false\n[output]\nreport = false\n')
    code = main(["run", str(tmp_path / "scans" / "*_image.tif"), "-o", str(tmp_path / "out"), "-c", str(cfg),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 succeeded, 1 failed" in captured.out and "b_image.tif" in captured.out
    assert (tmp_path / "out" / "a_image" / "summary.json").is_file()
    assert not (tmp_path / "out" / "b_image").exists()   # no empty folder that looks like a run's


def test_truth_given_twice_for_a_channel_is_an_error(tmp_path, capsys):
    argv = ["run", str(tmp_path / "scan.tif"), "-o", str(tmp_path / "o"), "--no-progress",
            "--truth", "C00", "a.tif", "--truth", "C00", "b.tif"]
    assert main(argv) == 1
    assert "--truth C00 given twice (a.tif and b.tif)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_glob_matching_nothing_is_an_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "*.tif"), "-o", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "matches no file" in capsys.readouterr().err


def test_segment_refuses_an_output_that_is_not_a_tiff(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "mask.zarr"
    assert main(["segment", str(tmp_path / "ph" / "scan"), "-o", str(out), "--method", "dom", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mask.zarr" in err and ".tif" in err and not out.exists()


def test_rerun_says_what_it_reused_and_unknown_voxel_sizes_are_noted(tmp_path, capsys):
    import numpy as np
    import tifffile

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 4000, (5, 48, 48), dtype=np.uint16),
                     photometric="minisblack")
    cfg = tmp_path / "dom.toml"
    cfg.write_text('[segment]\nmethod = "dom"\n[output]\nreport = false\n')
    argv = ["run", str(stack), "-o", str(tmp_path / "out"), "-c", str(cfg), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "assume 1 x 1 x 1 µm" in out and "C00: reused" not in out
    assert main(argv) == 0
    assert "C00: reused the finished results of an earlier run" in capsys.readouterr().out
    assert main(argv + ["--voxel-size", "2", "1", "1"]) == 0
    out = capsys.readouterr().out
    assert "C00: reused" not in out and "C00: resumed" not in out and "assume 1 x 1 x 1" not in out
    assert main(argv + ["--truth", "C01", str(stack)]) == 1
    assert "truth given for channel(s) C01" in capsys.readouterr().err


def test_segment_applies_the_closings_only_when_asked(tmp_path):
    """`segment` is steps 1-5 whatever a config file says ([postprocess] enabled defaults to true there);
    --postprocess adds step 6."""
    from gpuheart.cli import _parser, _segment_config
    from gpuheart.pipeline import PipelineConfig

    cfg = PipelineConfig()
    cfg.postprocess.enabled = True
    cfg.save(tmp_path / "run.toml")
    base = ["segment", "in.tif", "-o", "m.tif"]
    parse = _parser().parse_args
    assert _segment_config(parse(base)).postprocess.enabled is False
    assert _segment_config(parse(base + ["-c", str(tmp_path / "run.toml")])).postprocess.enabled is False
    assert _segment_config(parse(base + ["-c", str(tmp_path / "run.toml"), "--postprocess"])).postprocess.enabled is True


def test_segment_never_writes_over_its_input_or_into_its_slice_folder(tmp_path, capsys):
    import hashlib

    import numpy as np
    import tifffile

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 255, (5, 40, 40), dtype=np.uint8))
    before = hashlib.md5(stack.read_bytes()).hexdigest()
    assert main(["segment", str(stack), "-o", str(stack), "--method", "dom", "--no-progress"]) == 1
    assert "input scan" in capsys.readouterr().err and hashlib.md5(stack.read_bytes()).hexdigest() == before
    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    scan = tmp_path / "ph" / "scan"
    assert main(["segment", str(scan), "-o", str(scan / "mask.tif"), "--method", "dom", "--no-progress"]) == 1
    assert not (scan / "mask.tif").exists()
    # a sub-folder of a slice folder is not read as slices: fine
    assert main(["segment", str(scan), "-o", str(scan / "masks" / "m.tif"), "--method", "dom", "--no-progress"]) == 0


def test_segment_keeps_an_unknown_voxel_size_unknown(tmp_path):
    import numpy as np
    import tifffile

    from gpuheart.io import open_scan

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 255, (5, 40, 40), dtype=np.uint8))
    assert main(["segment", str(stack), "-o", str(tmp_path / "m.tif"), "--method", "dom", "--no-progress"]) == 0
    with open_scan(tmp_path / "m.tif") as m:
        assert m.voxel_size is None
    assert main(["segment", str(stack), "-o", str(tmp_path / "v.tif"), "--method", "dom", "--no-progress",
                 "--voxel-size", "5", "1", "1"]) == 0
    with open_scan(tmp_path / "v.tif") as m:
        assert m.voxel_size == pytest.approx((5, 1, 1))


@pytest.mark.parametrize("args", [["mesh", "m.tif", "-o", "m.glb", "--voxel-size", "-2", "1", "1"],
                                  ["mesh", "m.tif", "-o", "m.glb", "--voxel-size", "nan", "1", "1"],
                                  ["mesh", "m.tif", "-o", "m.glb", "--max-faces", "-10"],
                                  ["train", "lab", "-o", "r", "--epochs", "0"],
                                  ["train", "lab", "-o", "r", "--steps", "0"],
                                  ["train", "lab", "-o", "r", "--batch-size", "0"],
                                  ["train", "lab", "-o", "r", "--tile", "0"],
                                  ["run", "-o", "o", "--voxel-size", "0", "1", "1"]])
def test_bad_numbers_on_the_command_line_are_refused_before_any_work(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "positive" in capsys.readouterr().err


def test_a_channel_named_twice_runs_once(tmp_path, capsys):
    assert main(["run", "-o", str(tmp_path / "o"), "--phantom-preset", "tiny", "--channels", "C00", "C00",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("  C00:") == 1 and "reused" not in out


def test_an_output_folder_that_cannot_be_one_is_named_in_one_line(tmp_path, capsys):
    import os

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "-o", str(afile), "--phantom-preset", "tiny", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile: exists and is not a folder" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert main(["run", "-o", str(ro), "--phantom-preset", "tiny", "--no-progress"]) == 1
        assert "ro: cannot write there" in capsys.readouterr().err
    finally:
        os.chmod(ro, 0o700)


def test_a_rerun_with_fewer_channels_says_which_folders_it_did_not_redo(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "-o", str(out), "--phantom-preset", "tiny", "--no-progress"]) == 0
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=r"C01 hold\(s\) outputs of an earlier run"):
        assert main(["run", "-o", str(out), "--phantom-preset", "tiny", "--channels", "C00", "--no-progress"]) == 0
    assert (out / "C01").is_dir()


def test_run_flags_override_the_config_file_and_a_preset_keeps_its_channel_table(tmp_path, monkeypatch):
    """What each `run` flag sets (recorded, not run): --slab-size, --device, --channels, --voxel-size and
    --no-progress win over the config file; --preset C01=NAME adds to the file's [channel.C01] table (README:
    it does the same as that table's preset key); --restart means resume=False."""
    from gpuheart import pipeline

    seen = {}

    class Recorded(Exception):
        pass

    class Recorder:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def run(self, source, out, **kw):
            seen.update(source=source, **kw)
            raise Recorded

    monkeypatch.setattr(pipeline, "Pipeline", Recorder)
    cfg = tmp_path / "c.toml"
    cfg.write_text('slab_size = 8\nchannels = ["C02"]\n[channel.C01.postprocess]\nz_iterations = 2\n')
    argv = ["run", "scan.tif", "-o", str(tmp_path / "o"), "-c", str(cfg)]
    with pytest.raises(Recorded):
        main(argv)
    c = seen["cfg"]
    assert (c.slab_size, c.channels, c.device, c.voxel_size, c.progress, seen["resume"]) == (8, ["C02"], "auto", [],
                                                                                              True, True)
    with pytest.raises(Recorded):
        main(argv + ["--slab-size", "3", "--device", "cpu", "--channels", "C00", "C01", "--voxel-size", "4", "1", "1",
                     "--preset", "C01=nerves", "--no-progress", "--restart"])
    c = seen["cfg"]
    assert (c.slab_size, c.channels, c.device, c.voxel_size, c.progress) == (3, ["C00", "C01"], "cpu", [4, 1, 1], False)
    assert seen["resume"] is False and seen["source"] == "scan.tif"
    c01 = c.for_channel("C01")
    assert (c01.segment.method, c01.dom.threshold, c01.postprocess.z_iterations) == ("dom", "noise", 2)


def test_batch_folders_are_the_scan_names_without_extensions_and_never_shared():
    from gpuheart.cli import _unique_names

    # two scans of one name would otherwise run into one folder, the second replacing the first's outputs
    assert _unique_names(["a/heart.ome.tif", "b/heart.tif", "c/heart.ome.zarr/", "d/lung.tiff", "e/lung.zarr",
                          "kidney.tif"]) == ["a-heart", "b-heart", "c-heart", "d-lung", "e-lung", "kidney"]
    # told apart by their folders, not their order: a rerun with the inputs swapped keeps each scan's folder
    assert _unique_names(["p/scan", "q/scan"]) == ["p-scan", "q-scan"]
    assert _unique_names(["q/scan", "p/scan"]) == ["q-scan", "p-scan"]
    assert _unique_names(["x/a/scan", "y/a/scan", "z/b/scan"]) == ["x-a-scan", "y-a-scan", "b-scan"]


def test_the_resume_message_says_where_the_run_continued(capsys):
    from types import SimpleNamespace

    from gpuheart.cli import _print_run

    def result(z):
        return SimpleNamespace(out_dir="o", timings={"read": 1.0}, outputs={}, report=None, reused=[],
                               resumed={"C00": z}, summary={"device": "cpu", "C00": {"slices": 40}})

    _print_run(result(40))   # killed after pass 2 (in the closings or the mesh)
    assert "C00: resumed an interrupted run at slice 40 of 40: only the closings, mesh and measurements were " \
           "redone" in capsys.readouterr().out
    _print_run(result(12))
    assert "C00: resumed an interrupted run at slice 12 of 40\n" in capsys.readouterr().out


def test_an_interrupted_command_exits_130_with_one_line(monkeypatch, capsys, tmp_path):
    from gpuheart import cli, training

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert main(["info", "scan.tif"]) == 130   # the shell's code for Ctrl-C, not a failure of the input
    assert capsys.readouterr().err == "gpuheart: interrupted\n"
    # the long commands say how to continue
    monkeypatch.setattr(training, "train_from_files", lambda *a, **k: interrupted(a))
    assert main(["train", "d", "-o", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was saved" in err


def test_finetune_given_the_data_folder_says_to_put_the_data_first(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["train", "--finetune", str(tmp_path / "d"), "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "expected a weights file" in err and f"gpuheart train {tmp_path / 'd'} -o RUN --finetune" in err


def test_segment_flags_override_the_config_file(tmp_path):
    from gpuheart.cli import _parser, _segment_config
    from gpuheart.pipeline import PipelineConfig

    cfg = PipelineConfig(device="cpu", voxel_size=[2.0, 1.0, 1.0])
    cfg.segment.method = "unet"
    cfg.save(tmp_path / "run.toml")
    base = ["segment", "in.tif", "-o", "m.tif", "-c", str(tmp_path / "run.toml")]
    parse = _parser().parse_args
    c = _segment_config(parse(base))
    assert (c.segment.method, c.segment.weights, c.voxel_size, c.device, c.progress) == ("unet", "", [2, 1, 1], "cpu",
                                                                                         True)
    c = _segment_config(parse(base + ["--method", "dom", "--weights", "w.pt", "--voxel-size", "4", "1", "1",
                                      "--device", "auto", "--no-progress"]))
    assert (c.segment.method, c.segment.weights, c.voxel_size, c.device, c.progress) == ("dom", "w.pt", [4, 1, 1],
                                                                                         "auto", False)


def test_mesh_zero_face_limits_keep_everything_and_voxel_size_wins_over_metadata(tmp_path):
    """--max-faces 0 keeps every face and --min-faces 0 every piece (as 0 does in the config); a --voxel-size
    given replaces the one in the mask's metadata."""
    import numpy as np
    import trimesh

    from gpuheart.io import write_tiff

    mask = np.zeros((8, 24, 24), np.uint8)
    mask[2:6, 4:16, 6:12] = 255   # a box 4 x 12 x 6 voxels (z, y, x)
    mask[3, 20, 20] = 255         # one voxel: a piece of 8 faces
    write_tiff(tmp_path / "m.tif", mask, voxel_size=(2.0, 1.0, 1.0))

    def mesh(name, *flags):
        assert main(["mesh", str(tmp_path / "m.tif"), "-o", str(tmp_path / name), *flags]) == 0
        return trimesh.load(tmp_path / name, force="mesh")

    default, every = mesh("a.ply"), mesh("b.ply", "--min-faces", "0", "--max-faces", "0")
    assert len(every.split(only_watertight=False)) == 2 and len(every.faces) == len(default.faces) + 8
    ext = default.bounds[1] - default.bounds[0]               # (x, y, z) µm with the metadata's 2 µm slices
    ext4 = mesh("c.ply", "--voxel-size", "4", "1", "1").bounds
    np.testing.assert_allclose(ext4[1] - ext4[0], ext * [1, 1, 2])


def test_train_flags_given_as_zero_still_override_the_finetune_recipe(monkeypatch):
    from types import SimpleNamespace

    from gpuheart import cli, unet

    monkeypatch.setattr(unet, "load_weights", lambda p: SimpleNamespace(meta={"config": {"context": 1, "tile": 64}}))
    s = cli._train_settings(cli._parser().parse_args(["train", "x", "-o", "y", "--finetune", "w.pt", "--context", "0",
                                                      "--threshold", "0"]))
    assert (s["context"], s["threshold"], s["tile"], s["init"]) == (0, 0.0, 64, "w.pt")


def test_mesh_over_max_memory_faces_meshes_voxel_blocks_in_the_same_place(tmp_path, capsys):
    """--max-memory-faces (default: the run's [mesh] max_memory_faces): a box of whole 2 x 2 x 2 blocks meshed
    from block means has the box's own bounds; the lone voxel (1/8 of a block) is gone."""
    import numpy as np
    import trimesh
    from skimage import measure

    from gpuheart.cli import _parser
    from gpuheart.io import write_tiff
    from gpuheart.pipeline import MeshConfig

    assert _parser().parse_args(["mesh", "m.tif", "-o", "m.glb"]).max_memory_faces == MeshConfig().max_memory_faces
    mask = np.zeros((8, 24, 24), np.uint8)
    mask[2:6, 4:16, 6:12] = 255
    mask[3, 20, 20] = 255
    write_tiff(tmp_path / "m.tif", mask, voxel_size=(2.0, 1.0, 1.0))
    faces = len(measure.marching_cubes(np.pad(mask > 0, 1).astype(np.float32), 0.5)[1])
    with pytest.warns(RuntimeWarning, match="block factor 2"):   # faces / 4 fits faces // 2, faces / 1 does not
        assert main(["mesh", str(tmp_path / "m.tif"), "-o", str(tmp_path / "m.ply"), "--min-faces", "0",
                     "--max-memory-faces", str(faces // 2)]) == 0
    assert "meshed from 2 x 2 x 2 voxel blocks" in capsys.readouterr().out
    m = trimesh.load(tmp_path / "m.ply", force="mesh")
    assert m.is_watertight and len(m.split()) == 1
    np.testing.assert_allclose(m.bounds, [[5.5, 3.5, 3.0], [11.5, 15.5, 11.0]], atol=0.01)   # (x, y, z) µm


def test_truth_without_a_channel_is_the_one_channel_scans(tmp_path, capsys):
    import numpy as np
    import tifffile

    from gpuheart import Pipeline
    from gpuheart.pipeline import PipelineConfig

    rng = np.random.default_rng(1)
    stack, mask = tmp_path / "stack.tif", tmp_path / "mask.tif"
    img = rng.integers(0, 4000, (5, 48, 48), dtype=np.uint16)
    tifffile.imwrite(stack, img, photometric="minisblack")
    tifffile.imwrite(mask, (img > 3000).astype(np.uint8) * 255, photometric="minisblack")
    cfg = tmp_path / "dom.toml"
    cfg.write_text('[segment]\nmethod = "dom"\n[output]\nreport = false\n[mesh]\nenabled = false\n')
    argv = ["run", str(stack), "-o", str(tmp_path / "out"), "-c", str(cfg), "--no-progress"]
    assert main(argv + ["--truth", str(mask)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # Dice written out against the file's own masks, not our metrics
    import zarr

    got = np.asarray(zarr.open_group(str(tmp_path / "out" / "C00" / "dom_mask.ome.zarr"), mode="r")["0"]) > 0
    truth = img > 3000
    want = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    assert summary["summary"]["C00"]["dom_vs_truth"]["dice"] == pytest.approx(want, abs=1e-6)
    # the same from Python, with a bare path
    r = Pipeline(PipelineConfig.load(cfg)).run(stack, tmp_path / "py", truth=str(mask), resume=False)
    assert r.summary["C00"]["dom_vs_truth"]["dice"] == pytest.approx(want, abs=1e-6)


def test_truth_without_a_channel_is_refused_for_several_channels_and_a_scan_after_it(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--preset", "tiny", "--no-progress"]) == 0
    capsys.readouterr()
    truth = str(tmp_path / "ph" / "truth" / "C00.tif")
    assert main(["run", str(tmp_path / "ph" / "scan"), "-o", str(tmp_path / "o"), "--no-progress",
                 "--truth", truth]) == 1
    err = capsys.readouterr().err
    assert "without a channel" in err and "C00, C01, C02" in err and "--truth CHANNEL MASK" in err
    # the scan after --truth would be read as "channel MASK, mask SCAN"
    assert main(["run", "-o", str(tmp_path / "o2"), "--no-progress", "--truth", truth,
                 str(tmp_path / "ph" / "scan")]) == 1
    assert "give the scan before --truth" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """`gpuheart run ... | head` printed 'gpuheart: error: [Errno 32] Broken pipe', twice, after a complete run."""
    import numpy as np
    import tifffile

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 4000, (4, 32, 32), dtype=np.uint16),
                     photometric="minisblack")
    cfg = tmp_path / "dom.toml"
    cfg.write_text('[segment]\nmethod = "dom"\n[mesh]\nenabled = false\n[output]\nreport = false\n')
    cmd = (f"{sys.executable} -m gpuheart run {stack} -o {tmp_path / 'out'} -c {cfg} --no-progress | true; "
           f"echo rc=${{PIPESTATUS[0]}}")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "Broken pipe" not in p.stderr and "Error" not in p.stderr, p.stderr
    assert "rc=141" in p.stdout
    assert (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("spec", ["local:0", "local:-2", "local:x", "local:", "local:2.5"])
def test_dask_local_without_a_positive_worker_count_is_refused_before_anything_runs(spec, tmp_path, capsys):
    """--dask local:0 started a cluster with no workers and waited for them forever; local:x stopped with
    "invalid literal for int() with base 10: 'x'", which names neither the option nor what it takes."""
    with pytest.raises(SystemExit) as e:
        main(["run", "-o", str(tmp_path / "out"), "--dask", spec, "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dask" in err and "local:N" in err and repr(spec) in err
    assert not (tmp_path / "out").exists()  # refused before the synthetic scan was written


def test_dask_addresses_and_positive_local_counts_pass_the_parser():
    from gpuheart.cli import _parser

    for spec in ("local:1", "local:16", "local-cuda", "tcp://scheduler:8786", "scheduler:8786"):
        assert _parser().parse_args(["run", "--dask", spec]).dask == spec


def test_segment_says_the_closings_were_applied_and_mesh_counts_in_words(tmp_path, capsys):
    import numpy as np
    import tifffile

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 4000, (4, 32, 32), dtype=np.uint16),
                     photometric="minisblack")
    for extra, said in (([], "(dom mask, uint8"), (["--postprocess"], "(dom mask after the paper's closings, uint8")):
        assert main(["segment", str(stack), "-o", str(tmp_path / "m.tif"), "--method", "dom", "--no-progress",
                     *extra]) == 0
        assert said in capsys.readouterr().out
    zz, yy, xx = np.mgrid[:20, :20, :20]
    tifffile.imwrite(tmp_path / "ball.tif", (((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2) < 36).astype(np.uint8) * 255)
    assert main(["mesh", str(tmp_path / "ball.tif"), "-o", str(tmp_path / "ball.ply")]) == 0
    out = capsys.readouterr().out
    assert " 1 component (" in out and "1 components" not in out


def test_segment_refuses_a_folder_in_the_outputs_place_and_leaves_it_alone(tmp_path, capsys):
    """An audit found `segment -o full.tif` deleting a folder named full.tif, files and all, and saying
    'wrote'. A folder is the user's, never an earlier output to replace; write_tiff refuses too."""
    import numpy as np

    from gpuheart.io import write_tiff

    stack = tmp_path / "stack.tif"
    _small_stack(stack, (4, 40, 40))
    out = tmp_path / "full.tif"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["segment", str(stack), "-o", str(out), "--method", "dom", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "full.tif: is a folder" in err
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(Exception, match="is a folder"):
        write_tiff(out, np.zeros((2, 8, 8), np.uint8))
    assert (out / "keep.txt").read_text() == "precious"


def test_an_existing_input_whose_name_has_glob_characters_is_taken_as_it_is(tmp_path, capsys):
    stack = tmp_path / "scan[1].tif"
    _small_stack(stack, (4, 40, 40))
    cfg = tmp_path / "dom.toml"
    cfg.write_text('[segment]\nmethod = "dom"\n[output]\nreport = false\n[mesh]\nenabled = false\n'
                   '[graph]\nenabled = false\n')
    assert main(["run", str(stack), "-o", str(tmp_path / "out"), "-c", str(cfg), "--no-progress"]) == 0
    assert main(["run", str(tmp_path / "scan[9].tif"), "-o", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "matches no file" in capsys.readouterr().err


def test_small_cli_messages_say_what_happened(tmp_path, capsys):
    """From a CLI audit: an empty mask's mesh, unused --weights, a 0-byte input, report on a missing folder."""
    import numpy as np
    import tifffile

    mask = tmp_path / "empty.tif"
    tifffile.imwrite(mask, np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    assert main(["mesh", str(mask), "-o", str(tmp_path / "e.glb")]) == 0
    assert "the mesh file holds no surface: the mask has no voxel inside" in capsys.readouterr().out
    stack = tmp_path / "s.tif"
    _small_stack(stack, (3, 32, 32))
    with pytest.warns(RuntimeWarning, match="--weights nothere.pt is not used: method 'dom' has no U-Net"):
        assert main(["segment", str(stack), "-o", str(tmp_path / "m.tif"), "--method", "dom",
                     "--weights", "nothere.pt", "--no-progress"]) == 0
    (tmp_path / "zero.tif").write_bytes(b"")
    assert main(["info", str(tmp_path / "zero.tif")]) == 1
    assert "the file is empty: 0 bytes" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothere")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_a_normalization_that_made_slice_means_less_even_gets_a_note(capsys):
    from types import SimpleNamespace

    from gpuheart.cli import _print_run

    def result(raw, normed):
        summary = {"slices": 20, "detrended_cv_raw": raw, "detrended_cv_normalized": normed}
        return SimpleNamespace(out_dir="o", timings={"read": 1.0}, outputs={"C00": {}}, report=None, reused=[],
                               resumed={}, summary={"device": "cpu", "C00": summary})

    _print_run(result(0.020, 0.058))   # what an audit saw on a uint8 stack with a background of 3-4 counts
    assert "note: z-normalization left the slice means less even than recorded" in capsys.readouterr().out
    _print_run(result(0.080, 0.020))
    assert "less even" not in capsys.readouterr().out


def test_segment_does_not_call_other_channels_tables_of_a_shared_config_unused(tmp_path):
    import warnings

    stack = tmp_path / "s.tif"
    _small_stack(stack, (3, 32, 32))
    cfg = tmp_path / "shared.toml"
    cfg.write_text('[segment]\nmethod = "dom"\n[channel.C01]\npreset = "nerves"\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["segment", str(stack), "-o", str(tmp_path / "m.tif"), "-c", str(cfg), "--no-progress"]) == 0


def _small_stack(path, shape):
    """A random uint8 (z, y, x) stack written as a grayscale multi-page TIFF (not read as colour planes)."""
    import numpy as np
    import tifffile

    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8),
                     photometric="minisblack")


def test_phantom_preset_with_an_input_is_refused_not_ignored(tmp_path, capsys):
    import tifffile

    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, np.zeros((3, 16, 16), np.uint16), photometric="minisblack")
    assert main(["run", str(stack), "-o", str(tmp_path / "o"), "--phantom-preset", "large", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--phantom-preset large: it sizes the built-in synthetic scan" in err and not (tmp_path / "o").exists()


def test_segment_checks_a_config_file_with_its_flags_applied(tmp_path, capsys):
    """`--method dom` with a file that turns the U-Net's partner off is valid; the file's own method is not
    what runs, so it must not be what is checked."""
    import tifffile

    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(100, 3000, (4, 32, 32), dtype=np.uint16),
                     photometric="minisblack")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[segment]\nmethod = "unet"\n[dom]\nenabled = false\n')
    assert main(["segment", str(stack), "-o", str(tmp_path / "m.tif"), "-c", str(cfg), "--method", "union",
                 "--no-progress"]) == 1
    assert f"{cfg}: segment.method 'union' needs dom.enabled = true" in capsys.readouterr().err
    cfg.write_text('[dom]\nenabled = false\nthreshold = "noise"\n')   # the file alone: 'union' is refused
    assert main(["segment", str(stack), "-o", str(tmp_path / "m.tif"), "-c", str(cfg), "--method", "unet",
                 "--no-progress"]) == 0


def test_python_segment_refuses_a_non_tiff_name_and_a_2d_image_gives_no_stack_warning(tmp_path):
    import tifffile
    import warnings

    from gpuheart import Pipeline, PipelineConfig

    img = tmp_path / "one.tif"
    tifffile.imwrite(img, np.random.default_rng(0).integers(100, 3000, (48, 48), dtype=np.uint16))
    p = Pipeline(PipelineConfig.from_dict({"progress": False, "segment": {"method": "dom"},
                                           "postprocess": {"enabled": False}}))
    with pytest.raises(ValueError, match="mask.png: segment writes a multi-page TIFF"):
        p.segment(img, tmp_path / "mask.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # no closings, mesh or tree: a plain 2-D segmentation
        out = p.segment(img, tmp_path / "mask.tif")
    assert tifffile.imread(out).shape == (48, 48)


def test_mesh_says_which_components_were_too_small_and_which_a_decimation_lost(tmp_path, capsys):
    """"(N under 20 faces or lost in decimation removed)" was printed when no decimation ran."""
    import numpy as np
    import tifffile

    m = np.zeros((20, 40, 40), np.uint8)
    zz, yy, xx = np.mgrid[:20, :40, :40]
    m[((zz - 10) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2) < 49] = 255    # a ball
    m[2, 2, 2] = m[2, 37, 37] = 255                                       # two specks of 8 faces each
    tifffile.imwrite(tmp_path / "m.tif", m)
    assert main(["mesh", str(tmp_path / "m.tif"), "-o", str(tmp_path / "m.ply"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(2 under 20 faces removed)" in out and "decimation" not in out, out


def test_a_tree_graph_on_a_coarser_grid_is_said_on_the_console_and_in_the_report(tmp_path, capsys):
    """Over [graph] max_voxels the skeleton is taken on a pooled grid, which changes lengths and radii
    several-fold; only summary.json's downsample_yx said so."""
    (tmp_path / "g.toml").write_text("progress = false\n[graph]\nmax_voxels = 2000\n[segment]\nmethod = 'dom'\n"
                                     "[mesh]\nenabled = false\n")
    assert main(["run", "-o", str(tmp_path / "out"), "--phantom-preset", "tiny", "-c", str(tmp_path / "g.toml"),
                 "--channels", "C00"]) == 0
    out = capsys.readouterr().out
    k = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]["C00"]["tree"]["downsample_yx"]
    assert k > 1 and f"a grid {k} times coarser in y and x" in out
    assert f"{k} x coarser in y and x" in (tmp_path / "out" / "report.html").read_text()


def test_report_on_a_batch_folder_names_its_runs(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "bout" / name).mkdir(parents=True)
        (tmp_path / "bout" / name / "summary.json").write_text("{}")
    assert main(["report", str(tmp_path / "bout")]) == 1
    err = capsys.readouterr().err
    assert f"gpuheart report {tmp_path / 'bout' / 'a'} (and 1 more: {tmp_path / 'bout' / 'b'})" in err
