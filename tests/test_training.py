"""gpuheart.training: labelled TIFF pairs -> preprocessed training volumes, whole or sparsely labelled."""
import numpy as np
import pytest
import tifffile

from gpuheart.cli import main
from gpuheart.exposure import preprocess_volume
from gpuheart.io import ScanError
from gpuheart.training import SLAB, _runs, find_pairs, load_pair


def _pair(folder, name, image, label):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"{name}_image.tif", image, photometric="minisblack")
    tifffile.imwrite(folder / f"{name}_label.tif", label, photometric="minisblack")
    return folder


def _stack(nz=SLAB + 5, seed=0):
    """Vessel-like bright lines on a noisy background whose brightness drifts with z (so the
    z-normalization matters), with the lines as labels."""
    rng = np.random.default_rng(seed)
    img = rng.normal(300, 20, (nz, 64, 64)) * np.linspace(1, 2, nz)[:, None, None]
    lab = np.zeros(img.shape, np.uint8)
    lab[:, 20:24, :] = 255
    lab[:, :, 40:43] = 255
    img[lab > 0] *= 3
    return img.astype(np.uint16), lab


def test_load_pair_equals_the_whole_stack_preprocessed_across_slab_cuts(tmp_path):
    img, lab = _stack()
    (stack,) = find_pairs([_pair(tmp_path, "s", img, lab)])
    pre, got = load_pair(stack)
    np.testing.assert_array_equal(pre, preprocess_volume(img))
    np.testing.assert_array_equal(got, lab > 0)


def test_sparse_labels_keep_only_the_labelled_slices_normalized_over_the_whole_stack(tmp_path):
    img, lab = _stack()
    labelled = [3, 4, SLAB - 1, SLAB, SLAB + 3]   # runs that cross the slab cut
    sparse = np.zeros_like(lab)
    sparse[labelled] = lab[labelled]
    (stack,) = find_pairs([_pair(tmp_path, "s", img, sparse)])
    pre, got = load_pair(stack, sparse=True)
    np.testing.assert_array_equal(pre, preprocess_volume(img)[labelled])
    np.testing.assert_array_equal(got, lab[labelled] > 0)
    assert load_pair(stack)[0].shape[0] == img.shape[0]   # without sparse: every slice, empty ones as background


def test_sparse_labels_with_nothing_labelled_name_the_file(tmp_path):
    img, lab = _stack(nz=4)
    (stack,) = find_pairs([_pair(tmp_path, "empty", img, np.zeros_like(lab))])
    with pytest.raises(ScanError, match="empty_label.tif"):
        load_pair(stack, sparse=True)


def test_runs_split_consecutive_slices_into_bounded_reads():
    assert _runs([0, 1, 2, 5, 6, 9], 16) == [(0, 3), (5, 7), (9, 10)]
    assert _runs(list(range(5)), 2) == [(0, 2), (2, 4), (4, 5)]
    assert _runs([], 4) == []


def test_train_sparse_labels_from_the_command_line(tmp_path, capsys):
    img, lab = _stack(nz=12)
    sparse = np.zeros_like(lab)
    sparse[[2, 5, 8, 11]] = lab[[2, 5, 8, 11]]
    data = _pair(tmp_path / "data", "s", img, sparse)
    common = ["--epochs", "1", "--steps", "1", "--batch-size", "2", "--tile", "32", "--width", "4", "--no-progress"]
    assert main(["train", str(data), "-o", str(tmp_path / "run"), "--sparse-labels", *common]) == 0
    assert (tmp_path / "run" / "best.pt").is_file()
    assert main(["train", str(data), "-o", str(tmp_path / "ctx"), "--sparse-labels", "--context", "1", *common]) == 1
    assert "2.5-D" in capsys.readouterr().err


def test_a_multichannel_image_is_refused_naming_its_channels(tmp_path):
    img, lab = _stack(nz=4)
    _pair(tmp_path, "two", img, lab)
    two = np.stack([img, img], 1)  # (z, c, y, x)
    tifffile.imwrite(tmp_path / "two_image.tif", two, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ScanError, match=r"two_image.tif: has 2 channels \(C00, C01\)"):
        load_pair(find_pairs([tmp_path])[0])


def test_train_refuses_a_misspelt_exclude_and_a_folder_holding_a_run(tmp_path, capsys):
    img, lab = _stack(nz=6)
    data = _pair(tmp_path / "data", "s", img, lab)
    _pair(tmp_path / "data", "t", img, lab)
    common = ["--epochs", "1", "--steps", "1", "--batch-size", "2", "--tile", "32", "--width", "4", "--no-progress"]
    assert main(["train", str(data), "-o", str(tmp_path / "run"), "--exclude", "u", *common]) == 1
    assert "--exclude u: no labelled stack of that name; stacks: s, t" in capsys.readouterr().err
    assert main(["train", str(data), "-o", str(tmp_path / "run"), "--exclude", "t", *common]) == 0
    best = (tmp_path / "run" / "best.pt").read_bytes()
    assert main(["train", str(data), "-o", str(tmp_path / "run"), *common]) == 1
    assert "holds a training run already" in capsys.readouterr().err
    assert (tmp_path / "run" / "best.pt").read_bytes() == best


def test_a_label_that_covers_most_voxels_is_questioned(tmp_path):
    img, _ = _stack(nz=4)
    (stack,) = find_pairs([_pair(tmp_path, "s", img, img)])   # the image given as its own label
    with pytest.warns(RuntimeWarning, match="100% of the voxels are labelled"):
        load_pair(stack)


def test_train_command_leaves_excluded_stacks_out_passes_balance_and_reads_0_1_labels(tmp_path, monkeypatch):
    """What reaches unet.train: only the stacks not --exclude'd, 0/1 label files as vessel masks, --balance."""
    from types import SimpleNamespace

    from gpuheart import unet

    img, lab = _stack(nz=4)
    data = _pair(tmp_path / "data", "s", img, (lab > 0).astype(np.uint8))   # labels saved as 0/1
    _pair(tmp_path / "data", "t", img[:, ::-1], lab)
    seen = {}

    def fake_train(images, labels, cfg, out_dir, progress=True, resume=False, overwrite=False, names=None):
        seen.update(images=images, labels=labels, cfg=cfg)
        return SimpleNamespace(best_val_dice=0.0, best_epoch=0, epochs_run=0, stopped_early=False, best_path="x")

    monkeypatch.setattr(unet, "train", fake_train)
    assert main(["train", str(data), "-o", str(tmp_path / "run"), "--exclude", "t", "--balance", "stack",
                 "--no-progress"]) == 0
    assert len(seen["images"]) == 1
    np.testing.assert_array_equal(seen["images"][0], preprocess_volume(img))
    np.testing.assert_array_equal(seen["labels"][0], lab > 0)
    assert seen["cfg"].balance == "stack"
    assert seen["cfg"].aug.haze == 0   # off unless asked for
    assert main(["train", str(data), "-o", str(tmp_path / "run2"), "--haze", "0.4", "--no-progress"]) == 0
    assert seen["cfg"].aug.haze == 0.4 and seen["cfg"].aug.p_haze == 0.3


def test_a_probability_map_as_label_is_refused_naming_the_file(tmp_path):
    """> 0 would make every pixel of a probability map a vessel; 0/1 floats and 0/255 stay masks."""
    img, lab = _stack(nz=4)
    prob = np.where(lab > 0, 0.9, 0.05).astype(np.float32)
    (stack,) = find_pairs([_pair(tmp_path / "p", "prob", img, prob)])
    with pytest.raises(ScanError, match=r"prob_label.tif: holds float values between 0 and 1.*probability map"):
        load_pair(stack)
    (stack,) = find_pairs([_pair(tmp_path / "f", "f", img, (lab > 0).astype(np.float32))])
    np.testing.assert_array_equal(load_pair(stack)[1], lab > 0)


def test_label_files_without_a_labelled_pixel_are_refused_by_name(tmp_path, capsys):
    img, lab = _stack(nz=6)
    data = _pair(tmp_path / "data", "s", img, np.zeros_like(lab))
    _pair(tmp_path / "data", "t", img, np.zeros_like(lab))
    common = ["--epochs", "1", "--steps", "1", "--batch-size", "2", "--tile", "32", "--width", "4", "--no-progress"]
    assert main(["train", str(data), "-o", str(tmp_path / "run"), *common]) == 1
    err = capsys.readouterr().err
    assert "s_label.tif" in err and "t_label.tif" in err and "no labelled (nonzero) pixel" in err
    assert "taught as background" not in err   # one message, not a warning that the error contradicts
    assert not (tmp_path / "run" / "best.pt").exists()
    _pair(tmp_path / "data", "u", img, lab)   # an empty stack beside a labelled one: a background example
    assert main(["train", str(data), "-o", str(tmp_path / "run"), *common]) == 0


def test_a_labelled_dark_slice_is_trained_as_the_blank_image_it_becomes(tmp_path):
    """A dropout slice is preprocessed to 0 (as in a run, whose masks are empty there); vessels drawn on it
    (traced from its neighbours) would teach the model to find vessels in a blank image. The slice stays, so
    a 2.5-D model's neighbours are still the stack's."""
    img, lab = _stack(nz=6)
    img[2] = 300   # laser dropout: flat, spread 0 <= 0.1 of the stack's
    (stack,) = find_pairs([_pair(tmp_path, "s", img, lab)])
    with pytest.warns(RuntimeWarning, match=r"slice\(s\) \[2\] are dark"):
        pre, got = load_pair(stack)
    np.testing.assert_array_equal(pre, preprocess_volume(img))
    assert not pre[2].any()
    want = lab > 0
    want[2] = False
    np.testing.assert_array_equal(got, want)
    img[:] = 300
    (flat,) = find_pairs([_pair(tmp_path / "flat", "f", img, lab)])
    with pytest.warns(RuntimeWarning), pytest.raises(ScanError, match="every labelled slice is dark"):
        load_pair(flat)


def test_phantom_training_pairs_have_no_vessels_on_the_blank_dropout_slice():
    from gpuheart.phantom import Phantom, PhantomConfig
    from gpuheart.training import phantom_pairs

    (name, pre, truth), = phantom_pairs(1)
    ph = Phantom(PhantomConfig.preset("default", seed=1))
    d = ph.dark_slice()
    assert ph.truth("C00", 0, ph.shape[0])[d].any()   # the geometry goes on through it
    assert not pre[d].any() and not truth[d].any()
    np.testing.assert_array_equal(np.delete(truth, d, 0), np.delete(ph.truth("C00", 0, ph.shape[0]), d, 0))


def test_tiff_pairs_are_found_with_either_extension(tmp_path):
    import tifffile

    img = np.zeros((2, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "a_image.tiff", img, photometric="minisblack")
    tifffile.imwrite(tmp_path / "a_label.tif", img, photometric="minisblack")
    tifffile.imwrite(tmp_path / "b_image.TIF", img, photometric="minisblack")
    tifffile.imwrite(tmp_path / "b_label.TIF", img, photometric="minisblack")
    (tmp_path / "c_image.txt").write_text("not an image")
    found = find_pairs([tmp_path])
    assert [(s.name, s.image.name, s.label.name) for s in found] == [
        ("a", "a_image.tiff", "a_label.tif"), ("b", "b_image.TIF", "b_label.TIF")]
    with pytest.raises(Exception, match="expected a file named NAME_image.tif"):
        find_pairs([tmp_path / "c_image.txt"])
    (tmp_path / "slices").mkdir()
    with pytest.raises(Exception, match="no synthetic scan .*--phantom N") as err:
        find_pairs([tmp_path / "slices"])
    assert "per-slice" not in str(err.value)
    for z in range(2):   # a scan's per-slice TIFFs: how to make a training pair of them
        tifffile.imwrite(tmp_path / "slices" / f"scan_Z{z:04d}.tif", img[z])
    with pytest.raises(Exception, match=r"per-slice files, which training does not read: .*multi-page NAME_image\.tif "
                                        r"\(Fiji: File > Import > Image Sequence.*NAME_label\.tif beside it.*--phantom N"):
        find_pairs([tmp_path / "slices"])


def test_stacks_with_many_unlabelled_slices_are_warned_about_unless_sparse(tmp_path):
    img, lab = _stack()
    few = lab.copy()
    few[3:] = 0
    (stack,) = find_pairs([_pair(tmp_path / "few", "few", img, few)])
    with pytest.warns(RuntimeWarning, match=r"only 3 of \d+ slices have a labelled pixel.*--sparse-labels"):
        load_pair(stack)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pair(stack, sparse=True)
        load_pair(find_pairs([_pair(tmp_path / "all", "all", img, lab)])[0])
    (empty,) = find_pairs([_pair(tmp_path / "empty", "e", img, np.zeros_like(lab))])
    with warnings.catch_warnings():   # a background example beside labelled stacks: train_from_files's to judge
        warnings.simplefilter("error")
        load_pair(empty)
