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
