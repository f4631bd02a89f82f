"""A user audit of gpuheart train: settings the issue promises that the command could not set, synthetic scan
folders as training data, what an interrupted run says, progress while stacks load, run folders as weights."""
import numpy as np
import pytest
import tifffile

from gpuheart import cli, training, unet
from gpuheart.cli import main

TINY = ["--epochs", "1", "--steps", "1", "--batch-size", "2", "--tile", "32", "--width", "4", "--depth", "2",
        "--no-progress"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The folder `gpuheart phantom ph --preset tiny` writes."""
    folder = tmp_path_factory.mktemp("data") / "ph"
    assert main(["phantom", str(folder), "--preset", "tiny", "--no-progress"]) == 0
    return folder


def _pair(folder, name="a", nz=4, labelled=None):
    rng = np.random.default_rng(0)
    lab = np.zeros((nz, 48, 48), np.uint8)
    lab[:, 10:14, :] = 255
    if labelled is not None:   # only these slices labelled, the rest left empty
        lab[[z for z in range(nz) if z not in labelled]] = 0
    img = (1000 + 3000 * (lab > 0) + rng.normal(0, 200, lab.shape)).astype(np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"{name}_image.tif", img, photometric="minisblack")
    tifffile.imwrite(folder / f"{name}_label.tif", lab, photometric="minisblack")
    return folder


# -- 1, 2: depth, Tversky weights, patience and val_fraction from the command line -----------------------------

def test_depth_tversky_weights_patience_and_val_fraction_reach_the_run_and_its_weights(phantom, tmp_path, capsys):
    assert main(["train", str(phantom), "-o", str(tmp_path / "r"), *TINY, "--tversky-alpha", "0.8",
                 "--tversky-beta", "0.2", "--tversky-gamma", "2", "--patience", "3", "--val-fraction", "0.5"]) == 0
    model = unet.load_weights(tmp_path / "r" / "best.pt")
    c = model.meta["config"]
    assert model.hparams["depth"] == 2 and c["depth"] == 2 and c["loss"] == "tversky_focal"
    assert (c["tversky_alpha"], c["tversky_beta"], c["tversky_gamma"], c["patience"], c["val_fraction"]) == \
        (0.8, 0.2, 2.0, 3, 0.5)
    # the phantom's 16 slices, half of them validation
    assert model.meta["training_data"] == [dict(name="ph", slices=16, validation_slices=8)]
    assert "at epoch 1 (1 epoch); weights" in capsys.readouterr().out   # one epoch, not "1 epochs"
    # a changed weight is a changed run: --resume refuses it by name
    assert main(["train", str(phantom), "-o", str(tmp_path / "r"), *TINY, "--tversky-alpha", "0.7",
                 "--tversky-beta", "0.2", "--tversky-gamma", "2", "--patience", "3", "--val-fraction", "0.5",
                 "--epochs", "2", "--resume"]) == 1
    assert "tversky_alpha 0.8 -> 0.7" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--tversky-alpha", "-0.1"], "--tversky-alpha: must be a finite number >= 0"),
    (["--tversky-gamma", "0"], "--tversky-gamma: must be a positive finite number"),
    (["--val-fraction", "1"], "--val-fraction: is the share of each stack's slices kept to validate on"),
    (["--patience", "0"], "--patience: must be a positive integer"),
    (["--depth", "0"], "--depth: must be a positive integer"),
])
def test_out_of_range_training_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "d", "-o", "r", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_tversky_weights_need_the_tversky_loss_and_not_both_zero(phantom, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", str(phantom), "-o", str(out), *TINY, "--loss", "dice_bce", "--tversky-beta", "0.5"]) == 1
    assert "--tversky-beta: weight(s) of the tversky_focal loss, and this run's loss is dice_bce; add --loss " \
           "tversky_focal" in capsys.readouterr().err
    assert main(["train", str(phantom), "-o", str(out), *TINY, "--tversky-alpha", "0", "--tversky-beta", "0"]) == 1
    assert "both 0" in capsys.readouterr().err
    assert not out.exists()
    # --finetune's weights bring their loss: the shipped model's is dice_bce
    with pytest.raises(ValueError, match=r"loss is dice_bce \(the loss of the --finetune weights\)"):
        cli._train_settings(cli._parser().parse_args(["train", "x", "-o", "y", "--finetune", "--tversky-alpha", "1"]))
    s = cli._train_settings(cli._parser().parse_args(["train", "x", "-o", "y", "--finetune", "--loss",
                                                      "tversky_focal", "--tversky-alpha", "1"]))
    assert (s["loss"], s["tversky_alpha"], s["tversky_beta"]) == ("tversky_focal", 1.0, 0.3)


def test_a_stack_with_one_labelled_slice_names_its_file_and_the_val_fraction_flag(tmp_path, capsys):
    data = _pair(tmp_path / "data", nz=6, labelled=[2])
    assert main(["train", str(data), "-o", str(tmp_path / "r"), "--finetune", "--sparse-labels",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{data / 'a_label.tif'}: 1 labelled slice in all (--sparse-labels trains on the labelled slices only)" \
           in err and "--val-fraction" in err and "label another slice" in err
    assert not (tmp_path / "r").exists()


# -- 3: the folder gpuheart phantom writes is training data ----------------------------------------------------

def test_a_phantom_folder_trains_on_its_vessel_channel_as_phantom_n_preprocesses_it(phantom, tmp_path):
    import json

    from gpuheart.phantom import Phantom, PhantomConfig

    (stack,) = training.find_pairs(phantom)
    assert (stack.name, stack.channel, stack.label) == ("ph", "C00", phantom / "truth" / "C00.tif")
    image, label = training.load_stack(stack)
    ph = Phantom(PhantomConfig(**json.loads((phantom / "phantom.json").read_text())["config"]))
    want = training._preprocess_synthetic(ph.slab("C00", 0, 16), ph.truth("C00", 0, 16))
    np.testing.assert_array_equal(image, want[0])
    np.testing.assert_array_equal(label, want[1])
    assert not label[ph.dark_slice()].any()   # the dropout slice, preprocessed to 0, has no vessels to learn


def test_phantom_folders_inside_a_data_folder_are_found_beside_pairs_and_can_be_excluded(phantom, tmp_path):
    import shutil

    data = _pair(tmp_path / "data")
    shutil.copytree(phantom, data / "ph")
    assert [(s.name, s.channel) for s in training.find_pairs(data)] == [("a", None), ("ph", "C00")]
    seen = {}

    def fake(images, labels, cfg, out_dir, progress=True, resume=False, overwrite=False, names=None):
        seen.update(names=names)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unet, "train", fake)
        with pytest.raises(KeyboardInterrupt):
            training.train_from_files(data, tmp_path / "r", exclude=["a"], progress=False, tile=32, width=4,
                                      depth=2)
    assert seen["names"] == ["ph"]


def test_a_broken_phantom_folder_names_the_file(phantom, tmp_path):
    import shutil

    bad = tmp_path / "ph"
    shutil.copytree(phantom, bad)
    (bad / "truth" / "C00.tif").unlink()
    with pytest.raises(ValueError, match=r"C00.tif: missing; expected the truth of the synthetic scan's vessel"):
        training.find_pairs(bad)
    with pytest.raises(ValueError, match=r"is the scan of a synthetic scan's folder: give that folder"):
        training.find_pairs(phantom / "scan")
    (bad / "phantom.json").write_text("{")
    with pytest.raises(ValueError, match=r"phantom.json: unreadable"):
        training.find_pairs(bad)


# -- 4: Ctrl-C ---------------------------------------------------------------------------------------------------

def _interrupt_in_epoch(monkeypatch, n):
    real, calls = unet._train_epoch, []

    def epoch(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(unet, "_train_epoch", epoch)


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved_and_in_a_later_one_how_to_resume(
        phantom, tmp_path, monkeypatch, capsys):
    out = tmp_path / "early"
    _interrupt_in_epoch(monkeypatch, 1)
    assert main(["train", str(phantom), "-o", str(out), *TINY, "--epochs", "2"]) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err.replace("without --resume", "")
    assert not out.exists()   # so the same command starts again
    monkeypatch.undo()
    _interrupt_in_epoch(monkeypatch, 2)
    assert main(["train", str(phantom), "-o", str(out), *TINY, "--epochs", "2"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epochs 1-1 are saved" in err and "add --resume" in err \
        and "continue from epoch 2" in err
    monkeypatch.undo()
    assert main(["train", str(phantom), "-o", str(out), *TINY, "--epochs", "2", "--resume"]) == 0


def test_ctrl_c_leaving_a_folder_without_last_pt_says_there_is_nothing_to_resume(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "best.pt").write_bytes(b"")
    assert "holds no last.pt" in cli._train_interrupted(tmp_path / "r")
    (tmp_path / "e").mkdir()
    assert "nothing was saved (e" not in cli._train_interrupted(tmp_path / "e")
    assert "is empty" in cli._train_interrupted(tmp_path / "e")


# -- 5: progress while the stacks load -----------------------------------------------------------------------------

def test_loading_a_stack_shows_a_bar_per_pass_naming_the_stack(tmp_path, monkeypatch):
    import tqdm.auto

    bars = []
    real = tqdm.auto.tqdm

    def recording(**kw):
        bar = real(**{**kw, "disable": True})
        bars.append(kw)
        bar.reset = lambda total=None: bars[-1].update(total=total, passes=bars[-1].get("passes", 0) + 1)
        bar.set_description = lambda desc: bars[-1].update(desc=desc)
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    data = _pair(tmp_path / "data", nz=6, labelled=[1, 4])
    training.load_pair(training.find_pairs(data)[0], sparse=True, progress=True, where=" (1/1)")
    (bar,) = bars
    # two passes: all 6 slices read for the statistics, then the 2 labelled ones preprocessed
    assert (bar["desc"], bar["total"], bar["passes"], bar["unit"]) == ("preprocess a (1/1)", 2, 2, "slice")


# -- 6: small ones ----------------------------------------------------------------------------------------------------

def test_a_run_folder_is_taken_as_its_best_pt_by_segment_and_init(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantom), "-o", str(run), *TINY]) == 0
    mask = tmp_path / "m.tif"
    assert main(["segment", str(phantom / "scan"), "-o", str(mask), "--method", "unet", "--weights", str(run),
                 "--channel", "C00", "--no-progress"]) == 0
    assert tifffile.imread(mask).shape == (16, 64, 64)
    assert main(["train", str(phantom), "-o", str(tmp_path / "b"), *TINY, "--init", str(run)]) == 0
    assert unet.load_weights(tmp_path / "b" / "best.pt").meta["config"]["init"] == str(run / "best.pt")
    assert main(["train", str(phantom), "-o", str(tmp_path / "c"), *TINY, "--finetune", str(run)]) == 0
    assert unet.load_weights(tmp_path / "c" / "best.pt").meta["config"]["init"] == str(run / "best.pt")
    capsys.readouterr()
    assert main(["segment", str(phantom / "scan"), "-o", str(mask), "--method", "unet", "--weights",
                 str(tmp_path), "--no-progress"]) == 1
    assert "a folder without best.pt; expected a weights file (.pt) or the run folder" in capsys.readouterr().err


def test_training_on_cuda_without_it_says_torch_and_how_to_train_on_the_cpu(phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(unet, "_torch_cuda", lambda: False)
    assert main(["train", str(phantom), "-o", str(tmp_path / "r"), *TINY, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "PyTorch" in err and "--device cpu" in err and "CuPy" not in err
    assert not (tmp_path / "r").exists()


def test_segment_to_a_png_name_says_tif_or_tiff(phantom, tmp_path, capsys):
    assert main(["segment", str(phantom / "scan"), "-o", str(tmp_path / "a.png"), "--method", "dom",
                 "--no-progress"]) == 1
    assert ".tif or .tiff" in capsys.readouterr().err

