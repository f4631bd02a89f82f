"""Training defects found by a user audit: diverged runs, label values, run folders, stack names, early checks."""
import math

import numpy as np
import pytest
import tifffile
import torch

from gpuheart import unet
from gpuheart.io import ScanError


def _synthetic(seed=0, shape=(4, 48, 48)):
    """Bright bars on a noisy background, with their mask."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    lab[:, 10:14, :] = 1
    lab[:, :, 30:33] = 1
    img = np.clip(40 + 140 * lab + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
    return img, lab


def _cfg(**kw):
    base = dict(epochs=1, steps_per_epoch=2, batch_size=2, lr=1e-2, tile=32, width=4, depth=2,
                loss="dice_bce", val_fraction=0.5, seed=0, num_threads=1)
    return unet.TrainConfig(**{**base, **kw})


# -- 1: a diverged run ----------------------------------------------------------------------------

def test_a_nan_loss_stops_training_saying_where_and_keeps_the_last_finite_weights(tmp_path, monkeypatch):
    img, lab = _synthetic()
    calls = []

    def nan_in_epoch_2_step_2(logits, target):
        calls.append(1)
        loss = unet.dice_bce_loss(logits, target)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setitem(unet.LOSSES, "dice_bce", nan_in_epoch_2_step_2)
    with pytest.raises(unet.TrainingDiverged, match=r"training loss became NaN .* in epoch 2, step 2 of 2, at "
                                                    r"learning rate 0.01.*epochs 1-1 are kept.*lower --lr"):
        unet.train([img], [lab], _cfg(epochs=3), tmp_path / "run", progress=False)
    model = unet.load_weights(tmp_path / "run" / "best.pt")   # epoch 1's, finite
    assert model.meta["epoch"] == 1
    assert [int(r.split(",")[0]) for r in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]] == [1]


def test_a_run_diverging_in_its_first_epoch_leaves_no_folder(tmp_path, monkeypatch):
    img, lab = _synthetic()
    monkeypatch.setitem(unet.LOSSES, "dice_bce", lambda logits, target: logits.sum() * float("inf"))
    with pytest.raises(unet.TrainingDiverged, match="epoch 1, step 1 of 2.*no weights were saved"):
        unet.train([img], [lab], _cfg(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_weights_that_are_not_finite_are_neither_saved_nor_loaded(tmp_path):
    model = unet.UNet(width=4, depth=2)
    with torch.no_grad():
        model.head.bias.fill_(math.nan)
    with pytest.raises(ValueError, match=r"w.pt: not saved, 1 weight\(s\) are NaN or infinite .*head.bias"):
        unet.save_weights(model, tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"format": unet.WEIGHTS_FORMAT, "hparams": model.hparams, "meta": {}, "state_dict": state},
               tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan.pt: 1 weight\(s\) are NaN .*segment nothing.*lower learning rate"):
        unet.load_weights(tmp_path / "nan.pt")


# -- 2: label values ------------------------------------------------------------------------------

def _stack(nz=4, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(300, 20, (nz, 40, 40))
    lab = np.zeros(img.shape, np.uint8)
    lab[:, 10:13, :] = 1
    img[lab > 0] *= 3
    return img.astype(np.uint16), lab


def _pair(folder, name, image, label):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"{name}_image.tif", image, photometric="minisblack")
    tifffile.imwrite(folder / f"{name}_label.tif", label, photometric="minisblack")
    return folder


def _fake_train(monkeypatch):
    """unet.train replaced by a recorder: what train_from_files hands it, without training."""
    from types import SimpleNamespace

    seen = {}

    def fake(images, labels, cfg, out_dir, progress=True, resume=False, overwrite=False, names=None):
        seen.update(images=images, labels=labels, cfg=cfg)
        return SimpleNamespace(best_val_dice=0.0, best_epoch=0, epochs_run=0, stopped_early=False, best_path="x")

    monkeypatch.setattr(unet, "train", fake)
    return seen


@pytest.mark.parametrize("vessel, dtype", [(-1, np.int8), (-255, np.int16), (-3.0, np.float32)])
def test_negative_label_values_are_vessel(tmp_path, vessel, dtype):
    from gpuheart.training import find_pairs, load_pair

    img, lab = _stack()
    (stack,) = find_pairs([_pair(tmp_path, "s", img, (lab.astype(dtype) * vessel).astype(dtype))])
    np.testing.assert_array_equal(load_pair(stack)[1], lab > 0)
    vols, labs = unet._check_pairs([img.astype(np.uint8)], [(lab.astype(dtype) * vessel).astype(dtype)])
    np.testing.assert_array_equal(labs[0], lab)


def test_labels_with_several_vessel_values_are_warned_about_by_file_and_values(tmp_path):
    from gpuheart.training import find_pairs, load_pair

    img, lab = _stack()
    multi = lab * np.arange(1, 41, dtype=np.uint8)[None, None, :] % 4   # 0..3 along the bar
    (stack,) = find_pairs([_pair(tmp_path, "m", img, multi)])
    with pytest.warns(RuntimeWarning, match=r"m_label.tif: holds 3 distinct nonzero values \(1, 2, 3\).*all nonzero "
                                            r"values are taken as vessel"):
        got = load_pair(stack)[1]
    np.testing.assert_array_equal(got, multi > 0)
    with pytest.warns(RuntimeWarning, match=r"pair 0: the labels hold 3 distinct nonzero values \(1, 2, 3\)"):
        unet._check_pairs([img.astype(np.uint8)], [multi])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pair(find_pairs([_pair(tmp_path / "b", "b", img, lab * 255)])[0])


def test_an_unlabelled_stack_alone_is_one_error_and_beside_labelled_ones_one_warning(tmp_path, monkeypatch):
    import warnings

    from gpuheart.training import train_from_files

    img, lab = _stack()
    data = _pair(tmp_path / "d", "e", img, np.zeros_like(lab))
    seen = _fake_train(monkeypatch)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ScanError, match="e_label.tif: no labelled"):
        warnings.simplefilter("always")
        train_from_files([data], tmp_path / "run", progress=False)
    assert not [w for w in caught if "background" in str(w.message)]   # not taught as background, then refused
    _pair(data, "s", img, lab)
    with pytest.warns(RuntimeWarning, match=r"e_label.tif: no labelled .*taught as background.*--exclude e"):
        train_from_files([data], tmp_path / "run", progress=False)
    assert len(seen["labels"]) == 2


# -- 3, 4: run folders ----------------------------------------------------------------------------

def test_resume_without_last_pt_beside_a_run_is_refused_and_replaces_nothing(tmp_path):
    img, lab = _synthetic()
    unet.train([img], [lab], _cfg(), tmp_path / "run", progress=False)
    (tmp_path / "run" / "last.pt").unlink()
    best = (tmp_path / "run" / "best.pt").read_bytes()
    with pytest.raises(ValueError, match=r"run: cannot resume, last.pt .* is missing .*holds best.pt, log.csv.*"
                                         r"--init .*best.pt"):
        unet.train([img], [lab], _cfg(epochs=2), tmp_path / "run", progress=False, resume=True)
    assert (tmp_path / "run" / "best.pt").read_bytes() == best


def test_the_python_api_refuses_a_folder_holding_a_run_unless_told_to_overwrite_it(tmp_path):
    img, lab = _synthetic()
    first = unet.train([img], [lab], _cfg(), tmp_path / "run", progress=False)
    before = first.best_path.read_bytes()
    with pytest.raises(ValueError, match=r"run: holds a training run already \(best.pt\); --resume"):
        unet.train([img], [lab], _cfg(seed=1), tmp_path / "run", progress=False)
    assert first.best_path.read_bytes() == before
    (tmp_path / "run" / "log.csv").write_text("epoch\n9\n")   # a stale row must not survive the new run
    again = unet.train([img], [lab], _cfg(seed=1), tmp_path / "run", progress=False, overwrite=True)
    assert [r["epoch"] for r in again.history] == [1] and (tmp_path / "run" / "log.csv").read_text().count("\n") == 2
    with pytest.raises(ValueError, match="give one"):
        unet.train([img], [lab], _cfg(), tmp_path / "run", progress=False, resume=True, overwrite=True)


def test_an_output_that_is_a_file_is_refused_before_the_data_are_read(tmp_path, monkeypatch):
    from gpuheart import training

    (tmp_path / "out").write_text("")
    monkeypatch.setattr(training, "find_pairs", lambda paths: pytest.fail("the data were read"))
    with pytest.raises(ValueError, match=r"out: is a file; expected a folder for the run"):
        training.train_from_files(["data"], tmp_path / "out", progress=False)


def test_resume_settings_init_architecture_and_device_are_checked_before_the_data_are_read(tmp_path, monkeypatch):
    from gpuheart import training
    from gpuheart.backend import cuda_available

    img, lab = _synthetic()
    unet.train([img], [lab], _cfg(), tmp_path / "run", progress=False)
    monkeypatch.setattr(training, "find_pairs", lambda paths: pytest.fail("the data were read"))
    kw = dict(epochs=1, steps_per_epoch=2, batch_size=2, lr=1e-2, tile=32, width=4, depth=2, loss="dice_bce",
              val_fraction=0.5, num_threads=1)
    with pytest.raises(ValueError, match=r"last.pt: cannot resume with different settings \(width 4 -> 8"):
        training.train_from_files(["data"], tmp_path / "run", resume=True, progress=False, **{**kw, "width": 8})
    with pytest.raises(ValueError, match=r"best.pt: its U-Net differs .*'width': \(4, 8\)"):
        training.train_from_files(["data"], tmp_path / "new", progress=False,
                                  **{**kw, "width": 8, "init": str(tmp_path / "run" / "best.pt")})
    if not cuda_available():
        with pytest.raises(RuntimeError, match="device 'cuda' was requested"):
            training.train_from_files(["data"], tmp_path / "new", progress=False, **{**kw, "device": "cuda"})
    assert not (tmp_path / "new").exists()


# -- 5, 6, 7: finding stacks ----------------------------------------------------------------------

def _tiny_pair(folder, image="a_image.tif", label="a_label.tif"):
    folder.mkdir(parents=True, exist_ok=True)
    img = np.zeros((2, 16, 16), np.uint8)
    tifffile.imwrite(folder / image, img, photometric="minisblack")
    tifffile.imwrite(folder / label, img, photometric="minisblack")
    return folder


def test_one_path_given_as_a_string_or_path_is_one_path(tmp_path, monkeypatch):
    from gpuheart.training import find_pairs, stack_names, train_from_files

    data = _tiny_pair(tmp_path / "data")
    assert [s.name for s in find_pairs(str(data))] == ["a"] == stack_names(data)
    assert [s.name for s in find_pairs(data / "a_image.tif")] == ["a"]
    img, lab = _stack()
    _pair(data, "s", img, lab)
    seen = _fake_train(monkeypatch)
    train_from_files(str(data), tmp_path / "run", exclude=["a"], progress=False)
    assert len(seen["images"]) == 1


def test_upper_case_names_pair_in_folders_and_given_directly(tmp_path):
    from gpuheart.training import find_pairs

    data = _tiny_pair(tmp_path / "up", "A_IMAGE.TIF", "A_LABEL.TIF")
    _tiny_pair(data, "b_Image.tiff", "b_Label.tiff")
    _tiny_pair(data, "c_image.tif", "C_LABEL.TIFF")
    found = [(s.name, s.image.name, s.label.name) for s in find_pairs(data)]
    assert found == [("A", "A_IMAGE.TIF", "A_LABEL.TIF"), ("b", "b_Image.tiff", "b_Label.tiff"),
                     ("c", "c_image.tif", "C_LABEL.TIFF")]
    assert find_pairs(data / "A_IMAGE.TIF")[0].label.name == "A_LABEL.TIF"
    (data / "A_LABEL.TIF").unlink()
    with pytest.raises(ScanError, match="A_IMAGE.TIF: its label A_LABEL.TIF is missing"):
        find_pairs(data / "A_IMAGE.TIF")


def test_a_file_given_twice_is_one_stack_and_same_named_stacks_are_told_apart(tmp_path, monkeypatch):
    from gpuheart.training import find_pairs, train_from_files

    data = _tiny_pair(tmp_path / "good")
    assert len(find_pairs([data / "a_image.tif", data, str(data / "a_image.tif")])) == 1
    nest = tmp_path / "nest"
    _tiny_pair(nest / "s1")
    _tiny_pair(nest / "s2")
    with pytest.warns(UserWarning, match=r"2 stacks are named a .*called s1/a, s2/a"):
        assert [s.name for s in find_pairs(nest)] == ["s1/a", "s2/a"]
    img, lab = _stack()
    _pair(nest / "s1", "a", img, lab)
    _pair(nest / "s2", "a", img, lab)
    seen = _fake_train(monkeypatch)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"--exclude a: 2 stacks in different folders "
                                                                    r"are named a: s1/a, s2/a"):
        train_from_files(nest, tmp_path / "run", exclude=["a"], progress=False)
    with pytest.warns(UserWarning):
        train_from_files(nest, tmp_path / "run", exclude=["s2/a"], progress=False)
    assert len(seen["images"]) == 1
    _tiny_pair(nest / "s1", "a_image.tiff", "a_label.tiff")
    with pytest.raises(ScanError, match=r"a_image.tif and .*a_image.tiff: two images of one stack in one folder"):
        find_pairs(nest / "s1")


# -- 8: data swallowed by an option ---------------------------------------------------------------

def test_data_taken_by_exclude_or_finetune_is_met_with_put_the_data_first(tmp_path, capsys):
    from gpuheart.cli import main

    data = _tiny_pair(tmp_path / "good")
    assert main(["train", "--exclude", "a", str(data), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"--exclude {data}: expected stack names, and {data} is a folder; put the data first: gpuheart train " \
           f"{data} -o RUN --exclude a" in err, err
    image = data / "a_image.tif"
    assert main(["train", "-o", str(tmp_path / "x"), "--finetune", str(image)]) == 1
    err = capsys.readouterr().err
    assert "expected a weights file" in err and f"put the data first: gpuheart train {image} -o RUN --finetune" in err
    assert not (tmp_path / "x").exists()


# -- 9: label layouts -----------------------------------------------------------------------------

def test_a_label_saved_as_channels_says_how_to_save_it_as_slices_and_one_saved_as_frames_is_read(tmp_path):
    from gpuheart.training import find_pairs, load_pair

    img, lab = _stack()
    _pair(tmp_path, "a", img, lab)
    tifffile.imwrite(tmp_path / "a_label.tif", lab, imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(ScanError, match=r"a_label.tif: has 4 channels \(C00, C01, C02, C03\).*if its 4 channels are "
                                        r"the image's 4 z-slices.*Channels \(c\) 1, Slices \(z\) 4"):
        load_pair(find_pairs(tmp_path)[0])
    # frames (Fiji's "Images to Stack") with no z axis beside them can only be the slices
    tifffile.imwrite(tmp_path / "a_label.tif", lab, imagej=True, metadata={"axes": "TYX"})
    with pytest.warns(UserWarning, match=r"a_label.tif: its 4 time frames \(axes TYX\) are read as z slices"):
        _, got = load_pair(find_pairs(tmp_path)[0])
    assert np.array_equal(got > 0, lab > 0)


# -- 10: settings checked up front ----------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("device", "gpu", "unknown device 'gpu'"), ("context", 1.5, "context must be an integer >= 0, got 1.5"),
    ("workers", 1.5, "workers must be an integer"), ("seed", "a", "seed must be an integer >= 0, got 'a'"),
    ("seed", -1, "seed must be an integer >= 0"), ("weight_decay", math.nan, "weight_decay must be a finite"),
    ("num_threads", -1, "num_threads must be an integer >= 1"), ("patience", 2.5, "patience must be an integer"),
    ("lr_patience", -1, "lr_patience"), ("min_lr", math.inf, "min_lr"), ("threshold", "0.5", "threshold must be"),
    ("fg_fraction", math.nan, "fg_fraction"), ("amp", "yes", "amp must be True or False"), ("init", 3, "init must be"),
    ("aug", {}, "aug must be an AugmentConfig")])
def test_bad_settings_are_named_when_the_config_is_made(field, value, message):
    with pytest.raises(ValueError, match=message):
        unet.TrainConfig(**{field: value})


def test_batchnorm_on_one_value_per_channel_is_refused_before_a_folder_is_made(tmp_path, capsys):
    from gpuheart.cli import main

    with pytest.raises(ValueError, match=r"norm 'batch' with batch_size 1 of 16-pixel tiles .*norm 'group'"):
        unet.TrainConfig(tile=16, norm="batch", batch_size=1)
    unet.TrainConfig(tile=16, norm="batch", batch_size=2)
    unet.TrainConfig(tile=32, norm="batch", batch_size=1)
    data = _tiny_pair(tmp_path / "d")
    assert main(["train", str(data), "-o", str(tmp_path / "run"), "--tile", "16", "--norm", "batch",
                 "--batch-size", "1", "--no-progress"]) == 1
    assert "norm 'batch' with batch_size 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- 11: curves -----------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold, label", [(None, "validation Dice (at the calibrated threshold)"),
                                              (0.5, "validation Dice (at the fixed threshold 0.5)")])
def test_the_curves_name_the_threshold_the_dice_was_scored_at(tmp_path, monkeypatch, threshold, label):
    from matplotlib.axes import Axes

    labels = []
    real = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda ax, text, **kw: labels.append(text) or real(ax, text, **kw))
    img, lab = _synthetic()
    unet.train([img], [lab], _cfg(threshold=threshold), tmp_path / "run", progress=False)
    assert labels[-1] == label


def test_train_help_says_what_a_label_value_means_and_how_same_named_stacks_are_excluded(capsys):
    from gpuheart.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 background, any nonzero value vessel" in text and "named FOLDER/NAME" in text
