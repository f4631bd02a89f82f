"""Tests for gpuheart.unet: model shapes, losses, augmentation alignment, tiled inference, weights, training."""
import csv

import math
import warnings

import numpy as np
import pytest
import torch
from skimage.draw import disk, line

from gpuheart import unet
from gpuheart.unet import (AugmentConfig, TrainConfig, UNet, dice_bce_loss, geometric_augment, predict,
                           split_slices, tile_grid, tversky_focal_loss)

torch.set_num_threads(1)
GEOMETRIC_ONLY = AugmentConfig(scale=1, noise=0, brightness=0, contrast=0, gamma=1, blur=0)


def _tiny(depth=2, width=4, seed=0):
    torch.manual_seed(seed)
    return UNet(depth=depth, width=width).eval()


# -- model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("up", ["bilinear", "transpose"])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_unet_shapes(norm, up):
    model = UNet(in_channels=2, out_channels=3, depth=3, width=6, norm=norm, up=up).eval()
    out = model(torch.rand(2, 2, 48, 40))
    assert out.shape == (2, 3, 48, 40)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 2, 44, 40))


def test_unet_without_norm_sees_a_tiles_brightness_and_keeps_its_signal():
    """GroupNorm divides a tile's features by the tile's own spread, so a tile and the same tile at a quarter of
    its brightness give nearly one output; without a norm the brightness reaches the output, and He
    initialisation keeps the signal from vanishing over its convolutions."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 64, 64)
    outs = {}
    for norm in ("group", "none"):
        torch.manual_seed(0)
        model = UNet(depth=3, width=8, norm=norm).eval()
        with torch.no_grad():
            outs[norm] = (model(x), model(x / 4))
    g, n = outs["group"], outs["none"]
    assert (g[0] - g[1]).abs().max() < 0.05 * (n[0] - n[1]).abs().max()
    assert n[0].std() > 1e-2
    model = UNet(norm="none")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(c.bias is not None for c in convs)
    with pytest.raises(ValueError, match="batch, group, none"):
        UNet(norm="layer")


def test_default_unet_is_paper_size():
    model = UNet()
    assert len(model.downs) == 4 and len(model.ups) == 4   # 4 down + bottleneck + 4 up = 9 levels
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 < 10e6   # fp16 weights well under 10 MB


# -- losses --------------------------------------------------------------------------------------

def _target():
    t = torch.zeros(1, 1, 32, 32)
    t[..., 8:24, 8:24] = 1
    return t


@pytest.mark.parametrize("loss", [tversky_focal_loss, dice_bce_loss])
def test_losses_perfect_prediction_near_zero(loss):
    t = _target()
    perfect = (t * 2 - 1) * 20
    assert float(loss(perfect, t)) < 1e-3
    assert float(loss(-perfect, t)) > 0.5


def test_tversky_alpha_penalises_false_negatives_more():
    t = _target()
    k = 40  # pixels missed in one prediction, added spuriously in the other
    miss = t.clone()
    miss.view(-1)[torch.nonzero(t.view(-1))[:k, 0]] = 0
    extra = t.clone()
    extra.view(-1)[torch.nonzero(1 - t.view(-1))[:k, 0]] = 1
    fn_logits, fp_logits = (miss * 2 - 1) * 20, (extra * 2 - 1) * 20
    assert tversky_focal_loss(fn_logits, t) > tversky_focal_loss(fp_logits, t)
    # and with the weights swapped the order flips
    swapped = dict(alpha=0.3, beta=0.7)
    assert tversky_focal_loss(fn_logits, t, **swapped) < tversky_focal_loss(fp_logits, t, **swapped)


def test_focal_exponent_convention():
    t = _target()
    logits = torch.zeros_like(t)  # p = 0.5 everywhere
    plain = tversky_focal_loss(logits, t, gamma=1.0)
    assert torch.isclose(tversky_focal_loss(logits, t, gamma=4 / 3), plain ** 0.75)


def test_losses_have_finite_gradients_at_perfect_prediction():
    t = _target()
    logits = ((t * 2 - 1) * 20).requires_grad_()
    tversky_focal_loss(logits, t).backward()
    assert torch.isfinite(logits.grad).all()


# -- augmentation --------------------------------------------------------------------------------

def test_geometric_augment_moves_image_and_label_identically():
    rng = np.random.default_rng(1)
    label = np.zeros((64, 64), np.uint8)
    label[10:30, 5:50] = 1
    label[40:60, 20:28] = 1
    for _ in range(20):
        # the label as the image: any misalignment shows as disagreement
        img, lab = geometric_augment(label.astype(np.float32), label, rng, GEOMETRIC_ONLY)
        assert set(np.unique(lab)) <= {0, 1}
        assert np.mean((img > 0.5) != lab) < 0.01
        assert abs(int(lab.sum()) - int(label.sum())) < 0.15 * label.sum()


def test_rot90_flip_is_exact():
    rng = np.random.default_rng(2)
    a = np.arange(36, dtype=np.float32).reshape(6, 6)
    cfg = AugmentConfig(rotate_deg=0, shift=0, scale=1, noise=0, brightness=0, contrast=0, gamma=1, blur=0)
    seen = set()
    for _ in range(40):
        img, lab = geometric_augment(a, a.astype(np.int64), rng, cfg)
        assert np.array_equal(img, lab)
        assert sorted(img.ravel()) == sorted(a.ravel())   # a permutation: no interpolation
        seen.add(img.tobytes())
    assert len(seen) == 8   # all symmetries of the square occur


def test_intensity_augment_keeps_label_and_range():
    rng = np.random.default_rng(3)
    img = rng.random((32, 32)).astype(np.float32)
    lab = (img > 0.7).astype(np.uint8)
    cfg = AugmentConfig(rot90_flip=False, p_affine=0, p_gamma=1, p_blur=1)
    out_img, out_lab = unet.augment_pair(img, lab, rng, cfg)
    assert np.array_equal(out_lab, lab) and out_img.dtype == np.float32
    assert out_img.min() >= 0 and out_img.max() <= 1 and not np.array_equal(out_img, img)



def test_haze_adds_a_smooth_bright_field_and_leaves_the_label():
    """Haze augmentation: a non-negative field, peak as drawn, far smoother than a vessel edge, the same on
    every channel of a 2.5-D image; the label is untouched and the default recipe does not use it."""
    assert AugmentConfig().haze == 0
    rng = np.random.default_rng(4)
    for _ in range(20):
        f = unet.haze_field((128, 96), 0.4, rng)
        assert f.shape == (128, 96) and f.min() >= 0 and abs(f.max() - 0.4) < 1e-6
        assert np.abs(np.diff(f, axis=0)).max() < 0.1 and np.abs(np.diff(f, axis=1)).max() < 0.1
    img = np.zeros((3, 64, 64), np.float32)
    cfg = AugmentConfig(rot90_flip=False, p_affine=0, noise=0, brightness=0, contrast=0, gamma=1, blur=0,
                        haze=0.5, p_haze=1)
    lab = np.zeros((64, 64), np.uint8)
    out, out_lab = unet.augment_pair(img, lab, np.random.default_rng(5), cfg)
    assert 0.1 <= out.max() <= 0.5 and np.array_equal(out[0], out[2]) and not out_lab.any()

def test_zoom_scales_label_area():
    """A zoom by z changes a label's area by z**2, and the label stays binary and aligned with the image."""
    img = np.zeros((96, 96), np.float32)
    img[40:56, 40:56] = 1
    cfg = AugmentConfig(rot90_flip=False, rotate_deg=0, shift=0, scale=2.0, p_affine=1,
                        noise=0, brightness=0, contrast=0, gamma=1, blur=0)
    areas = set()
    for seed in range(20):
        out_img, out_lab = geometric_augment(img, img.astype(np.uint8), np.random.default_rng(seed), cfg)
        assert set(np.unique(out_lab)) <= {0, 1}
        assert np.mean((out_img > 0.5) != out_lab) < 0.01
        ratio = out_lab.sum() / 256
        assert 0.2 < ratio < 4.5   # zoom in [1/2, 2] -> area ratio in [1/4, 4], plus nearest-neighbour slack
        areas.add(int(out_lab.sum()))
    assert len(areas) > 5


# -- tiled inference -----------------------------------------------------------------------------

class Pointwise(torch.nn.Module):
    """A stand-in model whose output at a pixel depends on that pixel only."""

    depth = 0

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(6.0)
            self.conv.bias.fill_(-3.0)

    def forward(self, x):
        return self.conv(x)


def test_tile_runs_cover_every_tile_once_in_batches_and_in_order_per_slice():
    from gpuheart.unet import _tile_runs

    positions = [(0, 0), (0, 48), (48, 0), (48, 48)]
    for k_lo, k_hi, bs in ((0, 5, 3), (1, 4, 4), (0, 1, 2), (2, 9, 16)):
        batches = list(_tile_runs(positions, k_lo, k_hi, bs))
        sizes = [sum(k1 - k0 for _, _, k0, k1 in b) for b in batches]
        assert all(n == bs for n in sizes[:-1]) and 0 < sizes[-1] <= bs
        tiles = [(k, sy, sx) for b in batches for sy, sx, k0, k1 in b for k in range(k0, k1)]
        assert sorted(tiles) == sorted((k, sy, sx) for k in range(k_lo, k_hi) for sy, sx in positions)
        for k in range(k_lo, k_hi):   # each pixel sums its tiles in the same order as tile-by-tile prediction
            assert [(sy, sx) for kk, sy, sx in tiles if kk == k] == positions


def test_prediction_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    model = UNet(depth=2, width=4, norm="group").eval()
    slab = np.random.default_rng(1).integers(0, 256, (3, 100, 130), dtype=np.uint8)
    ref = predict(model, slab, tile=64, overlap=16, batch_size=1, device="cpu")
    for bs in (2, 5, 64):
        np.testing.assert_allclose(predict(model, slab, tile=64, overlap=16, batch_size=bs, device="cpu"), ref,
                                   atol=1e-5)


def test_tiled_prediction_of_pointwise_model_has_no_seams():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (700, 530), dtype=np.uint8)
    model = Pointwise()
    expected = torch.sigmoid(model(torch.from_numpy(image).float()[None, None] / 255))[0, 0].detach().numpy()
    got = predict(model, image, tile=128, overlap=32, device="cpu")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_tiled_unet_matches_per_tile_prediction_away_from_overlaps():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (200, 170), dtype=np.uint8)
    model = _tiny(depth=3)
    tile, overlap = 64, 16
    got = predict(model, image, tile=tile, overlap=overlap, device="cpu")
    grid = tile_grid(image.shape, tile, overlap)
    padded = np.pad(image.astype(np.float32) / 255, grid.pad, mode="reflect")
    (top, _), (left, _) = grid.pad
    cover_y = np.zeros(padded.shape[0], int)
    cover_x = np.zeros(padded.shape[1], int)
    for s in grid.starts_y:
        cover_y[s:s + tile] += 1
    for s in grid.starts_x:
        cover_x[s:s + tile] += 1
    checked = 0
    with torch.no_grad():
        for sy in grid.starts_y:
            for sx in grid.starts_x:
                ref = torch.sigmoid(model(torch.from_numpy(padded[sy:sy + tile, sx:sx + tile])[None, None]))[0, 0]
                for y in range(sy, sy + tile):
                    for x in range(sx, sx + tile):
                        inside = top <= y < top + image.shape[0] and left <= x < left + image.shape[1]
                        if inside and cover_y[y] == 1 and cover_x[x] == 1:
                            assert abs(got[y - top, x - left] - float(ref[y - sy, x - sx])) < 1e-5
                            checked += 1
    assert checked > 0.3 * image.size
    # everywhere (overlaps included) the blend is a convex combination of tile outputs: a valid probability
    assert got.min() >= 0 and got.max() <= 1


def test_predict_shapes_dtypes_and_slab():
    rng = np.random.default_rng(6)
    model = _tiny()
    slab = rng.integers(0, 256, (3, 50, 37), dtype=np.uint8)   # smaller than a tile: padded
    out = predict(model, slab, tile=64, overlap=16, device="cpu")
    assert out.shape == slab.shape and out.dtype == np.float32 and isinstance(out, np.ndarray)
    for k in range(3):   # a slab is predicted slice by slice
        np.testing.assert_allclose(out[k], predict(model, slab[k], tile=64, overlap=16, device="cpu"), atol=1e-6)
    as_float = predict(model, slab.astype(np.float32) / 255, tile=64, overlap=16, batch_size=1, device="cpu")
    np.testing.assert_allclose(as_float, out, atol=1e-5)
    tiny = predict(model, slab[0, :1, :3], tile=64, overlap=16, device="cpu")   # 1-pixel axis
    assert tiny.shape == (1, 3)
    with pytest.raises(ValueError, match="divisible"):
        predict(model, slab, tile=66, overlap=16, device="cpu")


def test_cpu_prediction_is_fp32_unless_bf16_is_asked_for():
    rng = np.random.default_rng(8)
    model = _tiny()
    slab = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    fp32 = predict(model, slab, tile=64, overlap=16, device="cpu")
    with torch.no_grad():   # the default on the CPU is plain fp32, the model's own numbers
        ref = torch.sigmoid(model.float()(torch.from_numpy(slab[:, None].astype(np.float32) / 255)))[:, 0].numpy()
    np.testing.assert_allclose(fp32, ref, atol=1e-5)
    bf16 = predict(model, slab, tile=64, overlap=16, device="cpu", amp=True)
    np.testing.assert_allclose(bf16, fp32, atol=0.1)   # bf16 where the CPU has it natively, else fp32
    if not unet._cpu_bf16():
        np.testing.assert_array_equal(bf16, fp32)


@pytest.mark.gpu
def test_predict_cupy_stays_on_device_and_matches_cpu():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(7)
    slab = rng.integers(0, 256, (2, 150, 90), dtype=np.uint8)
    model = _tiny(depth=3)
    cpu = predict(model, slab, tile=64, overlap=16, device="cpu")
    gpu = predict(model, cp.asarray(slab), tile=64, overlap=16, amp=False)
    assert isinstance(gpu, cp.ndarray) and gpu.dtype == cp.float32 and gpu.shape == slab.shape
    np.testing.assert_allclose(cp.asnumpy(gpu), cpu, atol=1e-4)
    bf16 = predict(model, cp.asarray(slab), tile=64, overlap=16, amp=True)
    assert float(abs(bf16 - gpu).max()) < 0.05   # bf16 autocast: close, not equal



def test_a_cpu_build_of_torch_beside_a_gpu_runs_the_unet_on_the_cpu(monkeypatch):
    """CuPy sees a GPU but PyTorch is a CPU build (its CPU wheel on a GPU desktop): 'auto' warns and predicts
    on the CPU, 'cuda' is a DeviceError naming the cause (was torch's AssertionError inside .to)."""
    monkeypatch.setattr(unet, "resolve_device", lambda device="auto": "cpu" if device == "cpu" else "cuda")
    monkeypatch.setattr(unet, "_torch_cuda", lambda: False)
    monkeypatch.setattr(unet, "_warned", set())
    with pytest.warns(UserWarning, match="U-Net runs on the CPU"):
        assert unet.torch_device("auto") == "cpu"
    assert unet.torch_device("cpu") == "cpu"
    with pytest.raises(unet.DeviceError, match="CUDA build of PyTorch"):
        unet.torch_device("cuda")
    slab = np.random.default_rng(3).integers(0, 256, (1, 64, 64), dtype=np.uint8)
    model = _tiny()
    np.testing.assert_array_equal(predict(model, slab, tile=64, overlap=16),
                                  predict(model, slab, tile=64, overlap=16, device="cpu"))


@pytest.mark.gpu
def test_cupy_input_with_a_cpu_build_of_torch_comes_back_on_the_device(monkeypatch):
    cp = pytest.importorskip("cupy")
    monkeypatch.setattr(unet, "_torch_cuda", lambda: False)
    monkeypatch.setattr(unet, "_warned", set())
    slab = np.random.default_rng(4).integers(0, 256, (2, 80, 70), dtype=np.uint8)
    model = _tiny()
    with pytest.warns(UserWarning, match="U-Net runs on the CPU"):
        gpu = predict(model, cp.asarray(slab), tile=64, overlap=16)
    assert isinstance(gpu, cp.ndarray) and gpu.shape == slab.shape
    np.testing.assert_array_equal(cp.asnumpy(gpu), predict(model, slab, tile=64, overlap=16, device="cpu"))



def test_float_images_far_outside_unit_range_are_refused():
    """A float copy of a 0-255 slice (or z-scores) reached the model unscaled: nearly every pixel came out as
    vessel. Values a little outside [0, 1] (interpolation overshoot) are still taken."""
    model = _tiny()
    img = np.random.default_rng(5).integers(0, 256, (64, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="divide a 0-255 float image by 255"):
        predict(model, img, tile=64, overlap=16, device="cpu")
    with pytest.raises(ValueError, match=r"got values -\d"):
        predict(model, (img - img.mean()) / img.std() * 1.7, tile=64, overlap=16, device="cpu")
    predict(model, np.clip(img / 255 * 1.02 - 0.01, -0.02, 1.02), tile=64, overlap=16, device="cpu")


# -- weights -------------------------------------------------------------------------------------

def test_weights_round_trip(tmp_path):
    model = UNet(depth=2, width=4, norm="group", up="transpose").eval()
    path = unet.save_weights(model, tmp_path / "w.pt", meta={"val_dice": 0.8, "note": "x"})
    back = unet.load_weights(path)
    assert back.hparams == model.hparams and back.meta == {"val_dice": 0.8, "note": "x"}
    assert not back.training and next(back.parameters()).dtype == torch.float32
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():   # fp16 storage: close, not identical
        np.testing.assert_allclose(back(x).numpy(), model(x).numpy(), atol=2e-2)
    big = unet.save_weights(UNet(), tmp_path / "big.pt")
    assert big.stat().st_size < 10e6


def test_a_file_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    """A TIFF or a text file passed as --weights: a ValueError naming it, not torch's pickle traceback."""
    import tifffile

    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((2, 8, 8), np.uint8))
    (tmp_path / "notes.pt").write_text("garbage")
    torch.save({"some": "dict"}, tmp_path / "other.pt")
    for name in ("mask.tif", "notes.pt", "other.pt"):
        with pytest.raises(ValueError, match=f"{name} is not a gpuheart U-Net weights file"):
            unet.load_weights(tmp_path / name)


def test_default_weights_missing_says_how_to_train(monkeypatch, tmp_path):
    assert unet.default_weights_path().name == "unet_default.pt"
    monkeypatch.setattr(unet, "default_weights_path", lambda: tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match="train"):
        unet.load_default()


# -- training ------------------------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint():
    train, val = split_slices([10, 5, 1], 0.2)
    assert val == [(0, 8), (0, 9), (1, 4)] and (2, 0) in train and not set(train) & set(val)
    train, val = split_slices([10, 5, 7], 0.3, by="volume")
    assert {v for v, _ in val} == {2} and {v for v, _ in train} == {0, 1}


def _synthetic(seed=0, shape=(6, 80, 72)):
    """Bright disks and lines on a noisy background, with their exact mask."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    for k in range(shape[0]):
        for _ in range(4):
            rr, cc = disk(tuple(rng.integers(8, min(shape[1:]) - 8, 2)), rng.integers(3, 7), shape=shape[1:])
            lab[k, rr, cc] = 1
        for _ in range(3):
            r0, c0, r1, c1 = rng.integers(0, min(shape[1:]), 4)
            rr, cc = line(r0, c0, r1, c1)
            lab[k, rr, cc] = 1
            lab[k, np.clip(rr + 1, 0, shape[1] - 1), cc] = 1
    img = np.clip(40 + 140 * lab + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
    return img, lab


def _cfg(**kw):
    base = dict(epochs=2, steps_per_epoch=8, batch_size=4, lr=1e-2, tile=64, width=4, depth=2,
                loss="dice_bce", val_fraction=0.34, seed=0, num_threads=1)
    return TrainConfig(**{**base, **kw})


def test_train_smoke(tmp_path):
    img, lab = _synthetic()
    res = unet.train([img], [lab], _cfg(), tmp_path, progress=False)
    assert res.epochs_run == 2 and len(res.history) == 2
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    for name in ("best.pt", "last.pt", "log.csv", "curves.png"):
        assert (tmp_path / name).is_file()
    rows = list(csv.DictReader(open(res.log_path)))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    model = unet.load_weights(res.best_path)
    assert model.meta["epoch"] == res.best_epoch and model.meta["config"]["width"] == 4
    assert np.isclose(model.meta["val_dice"], res.best_val_dice)


def test_train_is_deterministic_and_resumable(tmp_path):
    img, lab = _synthetic(1)
    cfg = _cfg(loss="tversky_focal", steps_per_epoch=3)
    full = unet.train([img], [lab], cfg, tmp_path / "a", progress=False)
    first = _cfg(loss="tversky_focal", steps_per_epoch=3, epochs=1)
    unet.train([img], [lab], first, tmp_path / "b", progress=False)   # as if interrupted after epoch 1
    resumed = unet.train([img], [lab], cfg, tmp_path / "b", progress=False, resume=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
    a = torch.load(full.last_path, weights_only=False)["model"]
    b = torch.load(resumed.last_path, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_worker_processes_draw_a_reproducible_resumable_stream(tmp_path):
    img, lab = _synthetic(1)
    sampler = unet.TileSampler([img], [lab], [(0, k) for k in range(4)], tile=64)
    cfg = _cfg(steps_per_epoch=5, workers=2)
    drawn = [b[0] for b in unet._epoch_batches(sampler, None, cfg, epoch=3, device="cpu")]
    assert len(drawn) == 5
    # batch i is worker i % 2's (i // 2)-th draw: the loader keeps step order whatever the workers' speed
    for w in (0, 1):
        rng = np.random.default_rng([cfg.seed, 3, w])
        for i in range(w, 5, 2):
            assert torch.equal(drawn[i], sampler.batch(rng, cfg.batch_size, cfg.aug)[0])
    # training with workers is deterministic, and a run interrupted and resumed trains the same model
    full = unet.train([img], [lab], _cfg(steps_per_epoch=3, workers=2), tmp_path / "a", progress=False)
    unet.train([img], [lab], _cfg(steps_per_epoch=3, workers=2, epochs=1), tmp_path / "b", progress=False)
    resumed = unet.train([img], [lab], _cfg(steps_per_epoch=3, workers=2), tmp_path / "b", progress=False,
                         resume=True)
    a = torch.load(full.last_path, weights_only=False)["model"]
    b = torch.load(resumed.last_path, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="workers"):
        _cfg(workers=-1)


def test_resume_refuses_other_settings_and_says_when_there_is_nothing_to_resume(tmp_path):
    img, lab = _synthetic(1)
    unet.train([img], [lab], _cfg(epochs=1), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"last.pt: cannot resume with different settings \(width 4 -> 8"):
        unet.train([img], [lab], _cfg(epochs=2, width=8), tmp_path / "a", progress=False, resume=True)
    more = unet.train([img], [lab], _cfg(epochs=2), tmp_path / "a", progress=False, resume=True)
    assert [r["epoch"] for r in more.history] == [1, 2]          # longer is fine
    with pytest.warns(UserWarning, match="nothing to resume"):
        unet.train([img], [lab], _cfg(epochs=1), tmp_path / "new", progress=False, resume=True)


def test_cosine_schedule_decays_to_min_lr_and_stretches_on_resume(tmp_path):
    img, lab = _synthetic(1)
    res = unet.train([img], [lab], _cfg(epochs=4, steps_per_epoch=1, schedule="cosine"), tmp_path / "a",
                     progress=False)
    def cosine(done, epochs):
        return 1e-6 + (1e-2 - 1e-6) * 0.5 * (1 + math.cos(math.pi * done / epochs))

    lrs = [r["lr"] for r in res.history]    # the rate each epoch trained at
    assert lrs == pytest.approx([1e-2] + [cosine(e, 4) for e in (1, 2, 3)])
    longer = unet.train([img], [lab], _cfg(epochs=8, steps_per_epoch=1, schedule="cosine"), tmp_path / "a",
                        progress=False, resume=True)
    # epoch 5 trains on the stretched curve, not at the 4-epoch curve's end (1e-6, what it was left at)
    assert [r["lr"] for r in longer.history[4:]] == pytest.approx([cosine(e, 8) for e in (4, 5, 6, 7)])
    with pytest.raises(ValueError, match="schedule"):
        unet.train([img], [lab], _cfg(schedule="step"), tmp_path / "b", progress=False)


def test_train_rejects_bad_input(tmp_path):
    img, lab = _synthetic()
    with pytest.raises(ValueError, match="uint8"):
        unet.train([img.astype(np.float32)], [lab], _cfg(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="loss"):
        unet.train([img], [lab], _cfg(loss="nope"), tmp_path, progress=False)


def test_sampler_pads_small_slices_and_keeps_pairs_aligned():
    img, lab = _synthetic(2, shape=(2, 40, 30))   # smaller than the tile
    img = np.where(lab > 0, 255, 0).astype(np.uint8)   # image equals label: alignment is visible
    sampler = unet.TileSampler([img], [lab], [(0, 0), (0, 1)], tile=64)
    rng = np.random.default_rng(0)
    for _ in range(10):
        t_img, t_lab = sampler.sample(rng)
        assert t_img.shape == t_lab.shape == (64, 64)
        assert np.array_equal(t_img > 0.5, t_lab > 0)


def test_sampler_oversamples_vessels_on_real_stack(shared_data):
    tifffile = pytest.importorskip("tifffile")
    stem = shared_data / "vesselnn" / "poon2015_BBB_noLeakage"   # sparsest labels (~4 % vessel)
    img = tifffile.imread(f"{stem}_image.tif")
    lab = (tifffile.imread(f"{stem}_label.tif") > 0).astype(np.uint8)
    slices = [(0, k) for k in range(img.shape[0])]
    rng = np.random.default_rng(0)

    def tiles(fg_fraction):
        s = unet.TileSampler([img], [lab], slices, tile=64, fg_fraction=fg_fraction)
        return np.stack([s.sample(rng)[1] for _ in range(300)])

    uniform, oversampled = tiles(0.0), tiles(1.0)
    assert abs(uniform.mean() - lab.mean()) < 0.01   # uniform tiles reflect the stack
    assert oversampled.mean() > 1.5 * uniform.mean()
    assert oversampled.any(axis=(1, 2)).all()   # every tile holds a vessel...
    assert oversampled[:, 16:48, 16:48].any(axis=(1, 2)).mean() > 0.9   # ...its central half (unless at a border)


def test_sampler_balance_gives_every_stack_the_same_share():
    small, big = np.zeros((2, 64, 64), np.uint8), np.zeros((8, 64, 64), np.uint8)
    ls, lb = small.copy(), big.copy()
    ls[:, :10], lb[:, :2] = 1, 1          # the small stack holds more vessel pixels per slice
    slices = [(0, 0), (0, 1)] + [(1, k) for k in range(8)]
    per_pixel = unet.TileSampler([small, big], [ls, lb], slices, tile=32)
    np.testing.assert_allclose(per_pixel.area_p, 0.1)            # every slice has the same area
    np.testing.assert_allclose(per_pixel.fg_p[:2].sum(), 20 / 36)  # in proportion to vessel pixels
    per_stack = unet.TileSampler([small, big], [ls, lb], slices, tile=32, balance="stack")
    for p in (per_stack.area_p, per_stack.fg_p):
        np.testing.assert_allclose([p[:2].sum(), p[2:].sum()], [0.5, 0.5])
        np.testing.assert_allclose(p[2:], 1 / 16)                 # per pixel within a stack
    with pytest.raises(ValueError, match="balance"):
        unet.TileSampler([small], [ls], slices[:2], tile=32, balance="slice")


# -- 2.5-D input (neighbouring slices as channels) -----------------------------------------------

def test_context_augment_applies_one_transform_to_every_channel():
    label = np.zeros((48, 48), np.uint8)
    label[10:30, 5:40] = 1
    image = np.stack([label * 0.9, label * 0.5, label * 0.2]).astype(np.float32)
    for seed in range(10):
        stack, lab3 = unet.augment_pair(image, label, np.random.default_rng(seed), GEOMETRIC_ONLY)
        plane, lab2 = unet.augment_pair(image[1], label, np.random.default_rng(seed), GEOMETRIC_ONLY)
        assert stack.shape == (3, 48, 48) and np.array_equal(lab3, lab2)
        np.testing.assert_allclose(stack[1], plane, atol=1e-6)
        np.testing.assert_allclose(stack[0] / 0.9, stack[2] / 0.2, atol=1e-5)   # same geometry in every channel


def test_context_predict_with_halo_equals_whole_stack():
    torch.manual_seed(0)
    model = UNet(in_channels=3, depth=2, width=4, norm="group").eval()
    assert unet.context_slices(model) == 1
    vol = np.random.default_rng(0).integers(0, 255, (7, 40, 40), dtype=np.uint8)
    whole = predict(model, vol, tile=32, overlap=8)
    assert whole.shape == vol.shape
    part = predict(model, vol[2:6], tile=32, overlap=8, halo=(1, 1))   # slices 3, 4 with real neighbours
    np.testing.assert_allclose(part, whole[3:5], atol=1e-6)
    cut = predict(model, vol[3:5], tile=32, overlap=8)                  # no halo: ends repeated, differs
    assert not np.allclose(cut, whole[3:5], atol=1e-4)
    with pytest.raises(ValueError, match="halo"):
        predict(model, vol[:2], tile=32, overlap=8, halo=(1, 1))


def test_context_sampler_and_training(tmp_path):
    img, lab = _synthetic()
    sampler = unet.TileSampler([img], [lab.astype(np.uint8)], [(0, 0), (0, 1)], 32, context=1)
    x, y = sampler.batch(np.random.default_rng(0), 4, None)
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 1, 32, 32)
    res = unet.train([img], [lab], _cfg(context=1, epochs=1), tmp_path, progress=False)
    model = unet.load_weights(res.best_path)
    assert model.hparams["in_channels"] == 3 and unet.context_slices(model) == 1
    assert predict(model, img, tile=64, overlap=16).shape == img.shape


def test_fine_tuning_starts_from_given_weights(tmp_path):
    img, lab = _synthetic()
    first = unet.train([img], [lab], _cfg(epochs=1), tmp_path / "a", progress=False)
    tuned = unet.train([img], [lab], _cfg(epochs=1, init=str(first.best_path), lr=0.0), tmp_path / "b",
                       progress=False)
    a, b = unet.load_weights(first.best_path), unet.load_weights(tuned.best_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # lr 0: unchanged
    with pytest.raises(ValueError, match="width"):
        unet.train([img], [lab], _cfg(epochs=1, init=str(first.best_path), width=8), tmp_path / "c", progress=False)


def test_fixed_threshold_is_stored_instead_of_calibrated(tmp_path):
    img, lab = _synthetic()
    res = unet.train([img], [lab], _cfg(epochs=1, threshold=0.5), tmp_path, progress=False)
    assert unet.load_weights(res.best_path).meta["threshold"] == 0.5
    assert res.history[0]["threshold"] == 0.5
    with pytest.raises(ValueError, match="threshold"):
        unet.train([img], [lab], _cfg(epochs=1, threshold=1.5), tmp_path / "x", progress=False)


def test_validation_slices_without_labels_are_reported(tmp_path):
    """Labels only in the first slices (the validation slices are the last ones): Dice cannot choose best.pt."""
    img, lab = _synthetic()
    lab[3:] = 0
    with pytest.warns(UserWarning, match="validation slices .* has a labelled pixel.*--sparse-labels"):
        unet.train([img], [lab], _cfg(epochs=1, steps_per_epoch=1), tmp_path, progress=False)


def test_last_checkpoint_given_as_weights_points_to_best_pt(tmp_path):
    model = UNet(depth=1, width=4)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
    unet._save_last(tmp_path / "last.pt", model, opt, sched, np.random.default_rng(0), {"epoch": 1}, TrainConfig(),
                    [])
    with pytest.raises(ValueError, match="best.pt"):
        unet.load_weights(tmp_path / "last.pt")


def _fixed_val_dice(monkeypatch, dices):
    it = iter(dices)
    monkeypatch.setattr(unet, "_validate", lambda *a, **k: (next(it), 0.5))


def test_patience_running_out_on_the_last_epoch_is_not_an_early_stop(tmp_path, monkeypatch):
    img, lab = _synthetic()
    _fixed_val_dice(monkeypatch, [0.5, 0.4])
    res = unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1, patience=1), tmp_path / "a", progress=False)
    assert res.epochs_run == 2 and not res.stopped_early
    _fixed_val_dice(monkeypatch, [0.5, 0.4, 0.3])
    res = unet.train([img], [lab], _cfg(epochs=3, steps_per_epoch=1, patience=1), tmp_path / "b", progress=False)
    assert res.epochs_run == 2 and res.stopped_early


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_predict_refuses_integer_images_it_would_not_scale(dtype):
    with pytest.raises(ValueError, match="uint8 .* or float"):
        unet.predict(_tiny(), np.zeros((64, 64), dtype), tile=64, overlap=16)


@pytest.mark.parametrize("shape", [(596, 300), (2056, 2048), (100, 1000), (257, 529), (64, 65)])
@pytest.mark.parametrize("tile,overlap,align", [(256, 64, 16), (128, 32, 16), (64, 16, 4), (64, 10, 8), (64, 60, 16),
                                                (128, 0, 16)])
def test_tiles_start_on_the_pooling_grid_and_cover_the_slice(shape, tile, overlap, align):
    grid = tile_grid(shape, tile, overlap, align)
    for n, (lo, hi), starts in zip(shape, grid.pad, (grid.starts_y, grid.starts_x)):
        assert lo % align == 0 and all((s - lo) % align == 0 for s in starts)
        assert starts[0] == 0 and starts[-1] + tile == lo + n + hi   # first and last flush with the padding
        # overlapping by at least ``overlap`` where the grid allows (abutting at 0), so covering
        assert all(0 < b - a <= max(tile - overlap, align) for a, b in zip(starts, starts[1:]))
        assert lo >= min(overlap // 2, (tile - n) // 2 // align * align)
        if n > tile:   # tiled: at least overlap // 2 of reflected context before the first and after the last pixel
            assert lo >= overlap // 2 and hi >= overlap // 2


def test_a_tile_at_the_end_of_an_odd_sized_slice_agrees_with_the_whole_image_network():
    """With no normalization a U-Net is translation-equivariant only in steps of 2**depth: the last tile of a
    slice whose side is not such a multiple must still start on that grid, or its overlap disagrees."""
    torch.manual_seed(0)
    model = UNet(depth=3, width=4).eval()   # eval BatchNorm: a per-channel affine map, equivariant
    image = np.random.default_rng(0).integers(0, 256, (596, 300), dtype=np.uint8)
    tile, overlap = 256, 64
    grid = tile_grid(image.shape, tile, overlap, align=8)
    padded = np.pad(image.astype(np.float32) / 255, grid.pad, mode="reflect")
    with torch.no_grad():
        whole = model(torch.from_numpy(padded)[None, None])[0, 0].numpy()
        c = slice(88, 168)   # tile centre: beyond the receptive field of the tile's zero-padded edges
        for sy in grid.starts_y:
            t = model(torch.from_numpy(padded[sy:sy + tile, :tile].copy())[None, None])[0, 0].numpy()
            np.testing.assert_allclose(t[c, c], whole[sy + 88:sy + 168, 88:168], atol=1e-4)


def test_predict_defaults_to_the_tile_the_model_was_trained_on():
    """GroupNorm makes a tile's output depend on the tile's size, and the stored threshold was chosen at the
    training tile: that is what inference uses unless told otherwise."""
    model = _tiny()
    assert unet.inference_tile(model) == (256, 64)   # no training record
    model.meta = {"config": {"tile": 64}}
    assert unet.inference_tile(model) == (64, 16) and unet.inference_tile(model, 128, 0) == (128, 0)
    img = np.random.default_rng(2).integers(0, 256, (150, 170), dtype=np.uint8)
    np.testing.assert_array_equal(predict(model, img, device="cpu"),
                                  predict(model, img, tile=64, overlap=16, device="cpu"))
    assert unet.inference_tile(unet.load_default()) == (128, 32)


def test_predict_takes_big_endian_images_like_native_ones():
    # a TIFF read without byte-order conversion gives '>f4'; DLPack refused it with a BufferError
    img = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    model = _tiny()
    np.testing.assert_array_equal(unet.predict(model, img.astype(">f4"), tile=64, overlap=16),
                                  unet.predict(model, img, tile=64, overlap=16))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_predict_refuses_nan_and_inf_pixels(bad):
    # one NaN pixel turned its whole tile to NaN probabilities, which every threshold reads as background
    img = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    img[3, 4] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf pixel"):
        unet.predict(_tiny(), img, tile=64, overlap=16)


def test_predict_refuses_an_empty_slice_by_name():
    with pytest.raises(ValueError, match=r"non-empty \(y, x\) slice .* got shape \(2, 0, 5\)"):
        unet.predict(_tiny(), np.zeros((2, 0, 5), np.uint8), tile=64, overlap=16)


# -- pinned by mutation testing ------------------------------------------------------------------

class ProbOfChannel(torch.nn.Module):
    """A stand-in model whose probability at a pixel is input channel ``pick`` at that pixel."""

    depth = 0

    def __init__(self, channels=1, pick=0):
        super().__init__()
        self.hparams = {"in_channels": channels}
        self.pick = pick

    def forward(self, x):
        return torch.logit(x[:, self.pick:self.pick + 1].clamp(1e-4, 1 - 1e-4))


def test_overlapping_tiles_blend_with_the_squared_sine_window():
    """Each pixel is sum(w * p) / sum(w) over the tiles covering it, w = sin^2(pi (i + 0.5) / tile) in y times
    the same in x (a plain sine, or a window in one axis only, passed every other test)."""
    image = np.random.default_rng(9).integers(0, 256, (100, 90), dtype=np.uint8)
    model, tile, overlap = _tiny(depth=2), 64, 32
    grid = tile_grid(image.shape, tile, overlap, align=4)
    padded = np.pad(image.astype(np.float32) / 255, grid.pad, mode="reflect")
    w1 = np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2
    win = np.outer(w1, w1)
    num, den = np.zeros(padded.shape), np.zeros(padded.shape)
    with torch.no_grad():
        for sy in grid.starts_y:
            for sx in grid.starts_x:
                t = torch.from_numpy(padded[sy:sy + tile, sx:sx + tile].copy())[None, None]
                num[sy:sy + tile, sx:sx + tile] += win * torch.sigmoid(model(t))[0, 0].numpy()
                den[sy:sy + tile, sx:sx + tile] += win
    (top, _), (left, _) = grid.pad
    expected = (num / den)[top:top + 100, left:left + 90]
    np.testing.assert_allclose(predict(model, image, tile=tile, overlap=overlap, device="cpu"), expected, atol=1e-5)


def test_context_channels_are_the_slices_below_to_above_with_ends_repeated():
    """Channel i of slice k is slice k - context + i, clamped to the stack, in predict and in the sampler alike."""
    vol = np.random.default_rng(3).integers(10, 246, (5, 32, 32), dtype=np.uint8)
    for pick, shift in ((0, -1), (2, 1)):
        got = predict(ProbOfChannel(3, pick), vol, tile=32, overlap=8, device="cpu")
        want = vol[np.clip(np.arange(5) + shift, 0, 4)] / 255
        np.testing.assert_allclose(got, want, atol=1e-5)
    flat = np.repeat(np.arange(5, dtype=np.uint8)[:, None, None] * 10, 32, axis=1).repeat(32, axis=2)
    for k, channels in ((0, [0, 0, 1]), (4, [3, 4, 4])):
        sampler = unet.TileSampler([flat], [np.zeros_like(flat)], [(0, k)], 32, fg_fraction=0, context=1)
        img, _ = sampler.sample(np.random.default_rng(0))
        np.testing.assert_allclose(img[:, 0, 0], np.array(channels) * 10 / 255)


def test_auto_batch_size_is_four_on_the_cpu_and_capped_by_pixels_on_a_gpu(monkeypatch):
    model = _tiny()
    assert unet._auto_batch_size(model, 256, torch.device("cpu")) == 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 50, 1 << 50))   # memory no limit
    assert unet._auto_batch_size(model, 256, torch.device("cuda")) == 256
    assert unet._auto_batch_size(model, 128, torch.device("cuda")) == 1024   # as many pixels in smaller tiles
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1, 1 << 50))
    assert unet._auto_batch_size(model, 256, torch.device("cuda")) == 1


def test_default_losses_equal_their_formulas():
    """Tversky-Focal with alpha 0.7 on FN, beta 0.3 on FP, exponent 1 / (4/3); Dice+BCE half and half (NumPy)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 1, 16, 16))
    t = (rng.random(logits.shape) < 0.3).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    tp, fn, fp = (p * t).sum(), ((1 - p) * t).sum(), (p * (1 - t)).sum()
    tversky = (1 - (tp + 1) / (tp + 0.7 * fn + 0.3 * fp + 1)) ** 0.75
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    dice = (2 * tp + 1) / (p.sum() + t.sum() + 1)
    lt, tt = torch.from_numpy(logits).float(), torch.from_numpy(t).float()
    assert float(tversky_focal_loss(lt, tt)) == pytest.approx(tversky, rel=1e-5)
    assert float(dice_bce_loss(lt, tt)) == pytest.approx(0.5 * bce + 0.5 * (1 - dice), rel=1e-5)


def test_geometric_augment_keeps_a_label_aligned_where_it_touches_the_border():
    label = np.zeros((64, 64), np.uint8)
    label[:, :12] = 1
    label[:10, :] = 1
    cfg = AugmentConfig(scale=1.3, p_affine=1, noise=0, brightness=0, contrast=0, gamma=1, blur=0)
    for seed in range(10):
        img, lab = geometric_augment(label.astype(np.float32), label, np.random.default_rng(seed), cfg)
        assert np.mean((img > 0.5) != lab) < 0.01


def test_geometric_augment_shifts_by_up_to_the_shift_fraction():
    img = np.zeros((64, 64), np.float32)
    img[30:34, 30:34] = 1
    cfg = AugmentConfig(rot90_flip=False, rotate_deg=0, shift=0.0625, scale=1, p_affine=1,
                        noise=0, brightness=0, contrast=0, gamma=1, blur=0)
    from scipy import ndimage

    moves = []
    for seed in range(20):
        out, lab = geometric_augment(img, img.astype(np.uint8), np.random.default_rng(seed), cfg)
        moves.append(np.abs(np.array(ndimage.center_of_mass(out)) - 31.5))
        assert np.mean((out > 0.5) != lab) < 0.01
    assert np.max(moves) <= 4 + 1e-6 and np.max(moves) > 2   # up to 0.0625 * 64 = 4 pixels per axis


def test_contrast_is_a_gain_about_the_tile_mean_and_blur_stays_in_plane():
    rng = np.random.default_rng(0)
    img = (0.3 + 0.4 * rng.random((32, 32))).astype(np.float32)
    only_contrast = AugmentConfig(noise=0, brightness=0, contrast=0.15, gamma=1, blur=0)
    for _ in range(5):
        out = unet.intensity_augment(img, rng, only_contrast)
        assert out.mean() == pytest.approx(img.mean(), abs=1e-5) and not np.allclose(out, img)
    slices = np.stack([np.full((32, 32), v, np.float32) for v in (0.2, 0.5, 0.8)])   # 2.5-D: neighbours
    only_blur = AugmentConfig(noise=0, brightness=0, contrast=0, gamma=1, blur=2.0, p_blur=1)
    np.testing.assert_allclose(unet.intensity_augment(slices, rng, only_blur), slices, atol=1e-6)


def test_a_tie_is_not_an_improvement(tmp_path, monkeypatch):
    img, lab = _synthetic()
    _fixed_val_dice(monkeypatch, [0.5, 0.5, 0.5])
    res = unet.train([img], [lab], _cfg(epochs=3, steps_per_epoch=1, patience=1), tmp_path, progress=False)
    assert (res.best_epoch, res.epochs_run, res.stopped_early) == (1, 2, True)
    assert unet.load_weights(res.best_path).meta["epoch"] == 1


def test_plateau_halves_the_lr_after_lr_patience_epochs_without_a_better_dice_also_across_resume(
        tmp_path, monkeypatch):
    img, lab = _synthetic()
    dices = [0.5, 0.6, 0.6, 0.6, 0.7, 0.7]
    cfg = dict(steps_per_epoch=1, lr_patience=1, lr_factor=0.5)
    _fixed_val_dice(monkeypatch, dices)
    full = unet.train([img], [lab], _cfg(epochs=6, **cfg), tmp_path / "a", progress=False)
    # ReduceLROnPlateau(mode="max"): a reduction once more than lr_patience epochs in a row bring no better Dice
    assert [r["lr"] for r in full.history] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-2, 5e-3, 5e-3])   # trained at
    _fixed_val_dice(monkeypatch, dices[:3])
    unet.train([img], [lab], _cfg(epochs=3, **cfg), tmp_path / "b", progress=False)
    _fixed_val_dice(monkeypatch, dices[3:])
    resumed = unet.train([img], [lab], _cfg(epochs=6, **cfg), tmp_path / "b", progress=False, resume=True)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]


def test_a_run_that_stopped_early_stays_stopped_when_resumed_for_more_epochs(tmp_path, monkeypatch):
    img, lab = _synthetic()
    _fixed_val_dice(monkeypatch, [0.5, 0.4, 0.3, 0.2])
    first = unet.train([img], [lab], _cfg(epochs=3, steps_per_epoch=1, patience=1), tmp_path, progress=False)
    assert first.stopped_early and first.epochs_run == 2
    again = unet.train([img], [lab], _cfg(epochs=5, steps_per_epoch=1, patience=1), tmp_path, progress=False,
                       resume=True)
    assert again.epochs_run == 2 and again.stopped_early and len(again.history) == 2


def test_validation_dice_and_threshold_calibration_on_known_probabilities():
    """Probabilities equal to the image (a stand-in model): vessel pixels at 200/255 = 0.78, a bright background
    patch at 150/255 = 0.59. Every threshold from 0.6 to 0.75 separates them exactly (Dice 1); at a fixed 0.5
    the patch counts as false positives, Dice 2 TP / (2 TP + FP)."""
    vol = np.full((4, 32, 32), 20, np.uint8)
    lab = np.zeros(vol.shape, np.uint8)
    lab[:, 5:15, 5:25] = 1
    vol[lab > 0] = 200
    vol[:, 20:25, 5:15] = 150
    cfg = TrainConfig(tile=32, threshold=None, amp=False)
    dice, thr = unet._validate(ProbOfChannel(), [vol], [lab], [(0, 2), (0, 3)], cfg, "cpu")
    assert dice == pytest.approx(1.0) and 0.6 <= thr <= 0.75
    fixed = TrainConfig(tile=32, threshold=0.5, amp=False)
    dice, thr = unet._validate(ProbOfChannel(), [vol], [lab], [(0, 2), (0, 3)], fixed, "cpu")
    tp, fp = 2 * 200, 2 * 50
    assert thr == 0.5 and dice == pytest.approx(2 * tp / (2 * tp + fp))


def test_validation_of_a_2_5d_model_gives_it_the_real_neighbouring_slices():
    """A model that predicts slice k from slice k - 1 scores Dice 1 on labels made that way, but only when the
    first validation slice gets its real lower neighbour (not itself repeated)."""
    rng = np.random.default_rng(0)
    vol = np.where(rng.random((5, 32, 32)) < 0.2, 220, 20).astype(np.uint8)
    lab = np.zeros_like(vol)
    lab[1:] = vol[:-1] > 128
    cfg = TrainConfig(tile=32, context=1, threshold=0.5, amp=False)
    dice, _ = unet._validate(ProbOfChannel(3, pick=0), [vol], [lab], [(0, 3), (0, 4)], cfg, "cpu")
    assert dice == pytest.approx(1.0)


def test_split_rounds_slices_up_and_volumes_to_nearest():
    assert split_slices([7], 0.2)[1] == [(0, 5), (0, 6)]           # ceil(1.4) = 2 validation slices
    train, val = split_slices([3, 3, 3, 3], 0.3, by="volume")      # round(1.2) = 1 validation volume
    assert {v for v, _ in val} == {3} and {v for v, _ in train} == {0, 1, 2}


def test_resume_refuses_a_different_learning_rate(tmp_path):
    """Only how long and where a run goes on may change: the optimizer state would override a new lr unseen."""
    img, lab = _synthetic(1)
    unet.train([img], [lab], _cfg(epochs=1, steps_per_epoch=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume with different settings \(lr 0.01 -> 0.001\)"):
        unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1, lr=1e-3), tmp_path, progress=False, resume=True)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_a_fixed_threshold_of_0_or_1_is_refused(tmp_path, threshold):
    # prob > 1 never holds, prob > 0 almost always: an empty or a full mask whatever the model learnt
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        _cfg(epochs=1, threshold=threshold)
    cfg = _cfg(epochs=1)
    cfg.threshold = threshold   # changed after construction: train checks again, before making its folder
    img, lab = _synthetic()
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        unet.train([img], [lab], cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [(dict(loss="dice"), "unknown loss 'dice'"),
                                              (dict(schedule="step"), "unknown schedule 'step'"),
                                              (dict(context=-1), "context must be an integer >= 0"),
                                              (dict(norm="layer"), "unknown norm 'layer'")])
def test_bad_train_settings_are_refused_when_the_config_is_made(setting, message):
    with pytest.raises(ValueError, match=message):
        unet.TrainConfig(**setting)


def test_gpuheart_train_refuses_a_bad_threshold_before_reading_data(tmp_path, capsys):
    from gpuheart.cli import main

    # the data path does not exist: the threshold is what it must complain about, and no folder is made
    assert main(["train", str(tmp_path / "missing"), "-o", str(tmp_path / "run"), "--threshold", "1.5",
                 "--no-progress"]) == 1
    assert "threshold must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("peak", [5.0, 1.01, -0.5, float("nan")])
def test_a_haze_peak_outside_0_to_1_is_refused(tmp_path, capsys, peak):
    """The image is 0-1: a haze field peaking above 1 only saturates the tiles it is added to, and a negative
    one darkens them. gpuheart train --haze 5 was accepted; AugmentConfig took any number."""
    from gpuheart.cli import main

    want = r"haze = .* expected 0 \(off\) or a value in \(0, 1\]"
    with pytest.raises(ValueError, match=want):
        unet.AugmentConfig(haze=peak)
    cfg = _cfg(epochs=1)
    cfg.aug.haze = peak   # changed after construction: train checks again, before making its folder
    img, lab = _synthetic()
    with pytest.raises(ValueError, match=want):
        unet.train([img], [lab], cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path / "missing"), "-o", str(tmp_path / "run"), "--haze", str(peak)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --haze" in err and "expected a value in (0, 1]" in err, err
    assert not (tmp_path / "run").exists()


def test_haze_peaks_in_0_to_1_and_0_for_off_are_taken():
    from gpuheart.cli import _parser

    for peak in (0.0, 0.05, 0.5, 1.0):
        assert unet.AugmentConfig(haze=peak).haze == peak
    assert _parser().parse_args(["train", "d", "-o", "r", "--haze", "1"]).haze == 1.0


def test_resume_refuses_other_training_data(tmp_path):
    """best.pt's Dice was measured on that run's validation slices: another data set cannot continue the run."""
    img, lab = _synthetic(1)
    other_img, other_lab = _synthetic(2)
    unet.train([img], [lab], _cfg(epochs=1, steps_per_epoch=1), tmp_path, progress=False)
    for images, labels in (([other_img], [other_lab]), ([img, other_img], [lab, other_lab]), ([img], [1 - lab])):
        with pytest.raises(ValueError, match=r"last.pt: cannot resume on other training data .*--init .*best.pt"):
            unet.train(images, labels, _cfg(epochs=2, steps_per_epoch=1), tmp_path, progress=False, resume=True)
    more = unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1), tmp_path, progress=False, resume=True)
    assert [r["epoch"] for r in more.history] == [1, 2]


def test_train_refuses_probability_maps_as_labels(tmp_path):
    img, lab = _synthetic()
    with pytest.raises(ValueError, match=r"pair 0: labels must be a mask.*probability map"):
        unet.train([img], [np.where(lab > 0, 0.8, 0.1)], _cfg(), tmp_path, progress=False)


def test_training_slices_without_any_label_are_refused(tmp_path):
    """Labels only in the validation slices (the last ones) or none at all: there is nothing to learn from."""
    img, lab = _synthetic()
    lab[:3] = 0   # 6 slices: ceil(0.34 * 6) = 3 validation slices, the last ones
    for labels in (lab, np.zeros_like(lab)):
        with pytest.raises(ValueError, match=r"none of the 3 training slices \(all but the 3 validation slices "
                                             r"\(the last 34% .*\) has a labelled"):
            unet.train([img], [labels], _cfg(), tmp_path, progress=False)
    assert not (tmp_path / "best.pt").exists()


def test_single_slice_images_are_split_like_the_slices_of_one_stack():
    """A folder of 2-D label pairs: the last ceil(0.2 * n) images validate, at least one trains; stacks as before."""
    assert split_slices([1] * 5, 0.2) == ([(0, 0), (1, 0), (2, 0), (3, 0)], [(4, 0)])
    assert split_slices([1, 1], 0.2) == ([(0, 0)], [(1, 0)])
    train, val = split_slices([1, 4, 1, 1], 0.5)   # singles 0, 2, 3: ceil(1.5) = 2 validate; the stack its last 2
    assert sorted(val) == [(1, 2), (1, 3), (2, 0), (3, 0)] and sorted(train) == [(0, 0), (1, 0), (1, 1)]
    assert split_slices([1], 0.2) == ([(0, 0)], [])


def test_a_single_2d_image_is_refused_with_what_to_give(tmp_path):
    img, lab = _synthetic(shape=(1, 64, 64))
    with pytest.raises(ValueError, match=r"1 training and 0 validation slices of scan\.tif \(1 slice\); need both: "
                                         r"give at least two slices"):
        unet.train([img], [lab], _cfg(), tmp_path, progress=False, names=["scan.tif"])
    res = unet.train([img, img], [lab, lab], _cfg(epochs=1, steps_per_epoch=1), tmp_path, progress=False)
    assert res.epochs_run == 1


def test_a_run_killed_mid_way_has_its_log_and_curves_so_far(tmp_path, monkeypatch):
    img, lab = _synthetic()
    real, calls = unet._train_epoch, []

    def killed_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(unet, "_train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        unet.train([img], [lab], _cfg(epochs=3, steps_per_epoch=1), tmp_path, progress=False)
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "log.csv"))] == ["1"]
    assert (tmp_path / "curves.png").is_file()


def test_a_kill_right_after_the_last_checkpoint_leaves_a_complete_log(tmp_path, monkeypatch):
    """Killed once last.pt of the final epoch is written: the resume has nothing left to train, and the log
    must already hold that epoch."""
    img, lab = _synthetic()
    real = unet._save_last

    def killed_after_epoch_2(path, model, opt, sched, rng, state, *a):
        real(path, model, opt, sched, rng, state, *a)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(unet, "_save_last", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1), tmp_path, progress=False)
    monkeypatch.setattr(unet, "_save_last", real)
    res = unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1), tmp_path, progress=False, resume=True)
    assert res.epochs_run == 2
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "log.csv"))] == ["1", "2"]


def test_resuming_a_finished_run_reports_it_as_it_ended(tmp_path, monkeypatch):
    """Patience ran out on the last of 3 epochs: not an early stop, neither then nor when resumed with 3 epochs."""
    img, lab = _synthetic()
    _fixed_val_dice(monkeypatch, [0.5, 0.4, 0.3])
    cfg = _cfg(epochs=3, steps_per_epoch=1, patience=2)
    first = unet.train([img], [lab], cfg, tmp_path, progress=False)
    again = unet.train([img], [lab], cfg, tmp_path, progress=False, resume=True)
    assert (first.stopped_early, first.epochs_run) == (again.stopped_early, again.epochs_run) == (False, 3)


def test_last_pt_given_as_weights_or_init_points_to_best_pt(tmp_path):
    img, lab = _synthetic(1)
    unet.train([img], [lab], _cfg(epochs=1, steps_per_epoch=1), tmp_path / "a", progress=False)
    last = tmp_path / "a" / "last.pt"
    with pytest.raises(ValueError, match=r"training state .* not a weights file .*--init.*: use best.pt"):
        unet.load_weights(last)
    with pytest.raises(ValueError, match=r"training state .*: use best.pt"):
        unet.train([img], [lab], _cfg(epochs=1, steps_per_epoch=1, init=str(last)), tmp_path / "b", progress=False)


# -- torch.compile on the GPU ------------------------------------------------------------------------------

class _RecordingCompile:
    """Stands in for torch.compile: records the batch shapes the compiled model is called with, or fails."""

    def __init__(self, fail: Exception | None = None):
        self.compiled, self.shapes, self.fail = 0, [], fail

    def __call__(self, model, **kw):
        self.compiled += 1

        def run(x):
            self.shapes.append(tuple(x.shape))
            if self.fail is not None:
                raise self.fail
            return model(x)
        return run


def test_compiled_prediction_pads_every_batch_to_one_shape_and_compiles_once(monkeypatch):
    fake = _RecordingCompile()
    monkeypatch.setattr(unet.torch, "compile", fake)
    monkeypatch.setattr(unet, "_compiled_models", type(unet._compiled_models)())
    torch.manual_seed(0)
    model = UNet(depth=2, width=4, norm="group").eval()
    slab = np.random.default_rng(1).integers(0, 256, (3, 100, 130), dtype=np.uint8)
    ref = predict(model, slab, tile=64, overlap=16, batch_size=5, device="cpu", compile=False)
    got = predict(model, slab, tile=64, overlap=16, batch_size=5, device="cpu", compile=True)
    again = predict(model, slab[:2], tile=64, overlap=16, batch_size=5, device="cpu", compile=True)
    assert fake.compiled == 1                             # one compilation per model, kept across calls
    assert set(fake.shapes) == {(5, 1, 64, 64)}           # 3 x 9 tiles = 27: the last batch of 2 padded to 5
    np.testing.assert_allclose(got, ref, atol=1e-5)       # padding tiles change nothing (GroupNorm is per tile)
    np.testing.assert_allclose(again, ref[:2], atol=1e-5)


def test_a_compile_failure_warns_once_and_predicts_uncompiled(monkeypatch):
    fake = _RecordingCompile(fail=RuntimeError("no working triton installation"))
    monkeypatch.setattr(unet.torch, "compile", fake)
    monkeypatch.setattr(unet, "_compiled_models", type(unet._compiled_models)())
    monkeypatch.setattr(unet, "_warned", set())
    model = _tiny()
    image = np.random.default_rng(2).integers(0, 256, (90, 70), dtype=np.uint8)
    ref = predict(model, image, tile=64, overlap=16, device="cpu", compile=False)
    with pytest.warns(RuntimeWarning, match="torch.compile of the U-Net failed.*triton"):
        got = predict(model, image, tile=64, overlap=16, device="cpu", compile=True)
    np.testing.assert_array_equal(got, ref)
    calls = len(fake.shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(predict(model, image, tile=64, overlap=16, device="cpu", compile=True), ref)
    assert len(fake.shapes) == calls and fake.compiled == 1   # not tried again for this model


def test_a_device_oom_in_the_compiled_model_is_not_taken_for_a_compile_failure(monkeypatch):
    """The pipeline shrinks its slabs and retries on an out-of-memory error; a fallback would hide it."""
    monkeypatch.setattr(unet.torch, "compile", _RecordingCompile(fail=torch.OutOfMemoryError("CUDA out of memory")))
    monkeypatch.setattr(unet, "_compiled_models", type(unet._compiled_models)())
    with pytest.raises(torch.OutOfMemoryError):
        predict(_tiny(), np.zeros((64, 64), np.uint8), tile=64, overlap=16, device="cpu", compile=True)


def test_compile_is_on_for_cuda_by_default_and_off_on_the_cpu_or_by_environment(monkeypatch):
    monkeypatch.delenv("GPUHEART_UNET_COMPILE", raising=False)
    assert unet._use_compile(None, torch.device("cuda")) and not unet._use_compile(None, torch.device("cpu"))
    assert not unet._use_compile(False, torch.device("cuda")) and unet._use_compile(True, torch.device("cpu"))
    monkeypatch.setenv("GPUHEART_UNET_COMPILE", "0")
    assert not unet._use_compile(None, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.real_gpu(reason="torch.compile for CUDA (Triton kernels)")
def test_compiled_gpu_prediction_agrees_with_uncompiled():
    cp = pytest.importorskip("cupy")
    model = unet.load_default()
    thr = model.meta["threshold"]
    slab = cp.asarray(np.random.default_rng(3).integers(0, 256, (2, 300, 260), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a compile failure must fail this test, not fall back
        compiled = predict(model, slab, compile=True)
    eager = predict(model, slab, compile=False)
    assert float(((compiled > thr) != (eager > thr)).mean()) < 1e-3
    assert float(abs(compiled - eager).max()) < 0.05


def test_a_truncated_last_pt_and_a_refused_init_say_what_to_do_and_leave_no_folder(tmp_path):
    """From a training audit: --resume on a cut-short last.pt gave torch's zip error naming no file, and a
    refused --init left an empty run folder behind."""
    img, lab = _synthetic()
    unet.train([img], [lab], _cfg(epochs=1), tmp_path / "a", progress=False)
    last = tmp_path / "a" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"last.pt: cannot resume from it, it is unreadable .*--init .*best.pt"):
        unet.train([img], [lab], _cfg(epochs=2), tmp_path / "a", progress=False, resume=True)
    with pytest.raises(Exception):
        unet.train([img], [lab], _cfg(epochs=1, width=8, init=str(tmp_path / "a" / "best.pt")), tmp_path / "b",
                   progress=False)
    assert not (tmp_path / "b").exists()


def test_training_curves_leave_the_users_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    rows = [dict(epoch=e, train_loss=1 / e, val_dice=0.5, threshold=0.5, lr=1e-3 * 0.9 ** e, seconds=1.0)
            for e in range(1, 40)]   # a cosine-like lr, changing every epoch
    assert unet._plot_curves(rows, tmp_path / "c.png").is_file()
    assert matplotlib.get_backend() == before


# -- audit of gpuheart train: settable Tversky weights, names in the metadata, progress per step -------------

def test_the_tversky_weights_are_settings_that_reach_the_loss_and_the_weights_metadata(tmp_path, monkeypatch):
    img, lab = _synthetic()
    seen = []

    def spy(logits, target, **kw):
        seen.append(kw)
        return tversky_focal_loss(logits, target, **kw)

    monkeypatch.setitem(unet.LOSSES, "tversky_focal", spy)
    cfg = _cfg(epochs=1, steps_per_epoch=1, loss="tversky_focal", tversky_alpha=0.9, tversky_beta=0.1,
               tversky_gamma=2.0)
    res = unet.train([img], [lab], cfg, tmp_path / "a", progress=False)
    assert seen == [dict(alpha=0.9, beta=0.1, gamma=2.0)]
    c = unet.load_weights(res.best_path).meta["config"]
    assert (c["tversky_alpha"], c["tversky_beta"], c["tversky_gamma"]) == (0.9, 0.1, 2.0)
    with pytest.raises(ValueError, match=r"cannot resume with different settings \(tversky_alpha 0.9 -> 0.7\)"):
        unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1, loss="tversky_focal", tversky_beta=0.1,
                                      tversky_gamma=2.0), tmp_path / "a", progress=False, resume=True)


def test_a_run_from_before_the_tversky_settings_resumes_with_the_defaults_only(tmp_path):
    img, lab = _synthetic()
    unet.train([img], [lab], _cfg(epochs=1, steps_per_epoch=1, loss="tversky_focal"), tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for k in unet.TVERSKY_FIELDS:
        del ckpt["config"][k]
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="tversky_gamma 1.3333333333333333 -> 2"):
        unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1, loss="tversky_focal", tversky_gamma=2.0),
                   tmp_path, progress=False, resume=True)
    assert unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=1, loss="tversky_focal"), tmp_path,
                      progress=False, resume=True).epochs_run == 2


@pytest.mark.parametrize("kw, message", [
    (dict(tversky_alpha=-0.1), "tversky_alpha must be a finite number >= 0"),
    (dict(tversky_beta=float("nan")), "tversky_beta must be a finite number >= 0"),
    (dict(tversky_gamma=0.0), "tversky_gamma must be a finite number > 0"),
    (dict(tversky_alpha=0.0, tversky_beta=0.0), "both 0"),
    (dict(loss="dice_bce", tversky_alpha=0.5), "tversky_alpha 0.5: used only by the loss 'tversky_focal'"),
])
def test_tversky_weights_out_of_range_or_without_their_loss_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"loss": "tversky_focal", **kw})


def test_the_weights_record_the_volumes_trained_and_validated_on(tmp_path):
    img, lab = _synthetic()
    res = unet.train([img, img[:2]], [lab, lab[:2]], _cfg(epochs=1, steps_per_epoch=1), tmp_path, progress=False,
                     names=["a", "b"])
    data = unet.load_weights(res.best_path).meta["training_data"]
    n = img.shape[0]
    assert data == [dict(name="a", slices=n, validation_slices=math.ceil(0.34 * n)),
                    dict(name="b", slices=2, validation_slices=1)]
    with pytest.raises(ValueError, match="names: 1 given for 2 volumes"):
        unet.train([img, img], [lab, lab], _cfg(), tmp_path / "x", progress=False, names=["a"])


def test_the_progress_bar_moves_every_training_step(tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n, self.closed = kw, kw.get("initial", 0), False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_description(self, desc):
            self.desc = desc

        def set_postfix(self, **kw):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    img, lab = _synthetic()
    unet.train([img], [lab], _cfg(epochs=2, steps_per_epoch=3), tmp_path, progress=True)
    (bar,) = bars
    assert (bar.kw["total"], bar.kw["unit"], bar.n, bar.closed) == (6, "step", 6, True)
    assert bar.desc.startswith("train unet, epoch 2/2")
    unet.train([img], [lab], _cfg(epochs=3, steps_per_epoch=3), tmp_path, progress=True, resume=True)
    assert (bars[1].kw["initial"], bars[1].n) == (6, 9)   # a resumed run starts where it was


def test_training_on_cuda_without_torch_cuda_says_so_in_torch_terms(monkeypatch):
    monkeypatch.setattr(unet, "_torch_cuda", lambda: False)
    with pytest.raises(unet.DeviceError, match=r"training, which runs on PyTorch.*--device cpu") as err:
        unet.training_device("cuda")
    assert "CuPy" not in str(err.value)
    assert unet.training_device("auto") == "cpu"
    monkeypatch.setattr(unet, "_torch_cuda", lambda: True)
    monkeypatch.setattr(unet, "resolve_device", lambda device="auto": "cpu")   # as without CuPy
    assert unet.training_device("cuda") == unet.training_device("auto") == "cuda"   # CuPy is not needed to train
    assert unet.training_device("cpu") == "cpu"
    # validation predicts on the training device as given, not through CuPy's view of the machine
    img, model = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8), UNet(width=4, depth=2)
    np.testing.assert_array_equal(predict(model, img, tile=32, overlap=8, device=torch.device("cpu")),
                                  predict(model, img, tile=32, overlap=8, device="cpu"))
