"""2D U-Net for vessel segmentation: model, losses, augmentation, training, tiled inference, weights.

The network sees one (y, x) slice at a time; volumes (z, y, x) are predicted slice by slice.
Images enter as uint8 (the output of the exposure chain) and are scaled to [0, 1]; labels are 0/1.

Public API
----------
- ``UNet(in_channels=1, out_channels=1, depth=4, width=16, norm="batch", up="bilinear")``
- ``tversky_focal_loss``, ``dice_bce_loss``, ``LOSSES``
- ``AugmentConfig``, ``augment_pair``, ``geometric_augment``, ``intensity_augment``
- ``TrainConfig``, ``TrainResult``, ``check_training_setup``,
  ``train(images, labels, cfg, out_dir, progress=True, resume=False, overwrite=False)``
- ``save_weights``, ``load_weights``, ``default_weights_path``, ``load_default``
- ``TileGrid``, ``tile_grid``, ``inference_tile``, ``predict(model, image, tile=None, overlap=None, ...)``

This module reads no files other than weights and checkpoints.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import functools
import math
import numbers
import os
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .backend import (DeviceError, as_torch, from_torch, is_device_array, is_device_oom, native_byte_order,
                      resolve_device, to_device, to_host)
from .metrics import has_fractions

WEIGHTS_FORMAT = "gpuheart-unet/1"


# -- model ---------------------------------------------------------------------------------------

NORMS = ("batch", "group", "none")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # gcd keeps the group count a divisor of the channel count for any width
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}: expected one of {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> ReLU); the conv has a bias only without a norm (a norm adds its own)."""

    def __init__(self, c_in: int, c_out: int, norm: str = "batch"):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), _norm_layer(norm, c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias), _norm_layer(norm, c_out), nn.ReLU(inplace=True),
        )
        if norm == "none":
            # He initialisation: PyTorch's default shrinks the signal's spread ~2.4x a ReLU layer (a norm
            # would undo that)
            for m in self:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)


class Up(nn.Module):
    """Upsample by 2 halving the channels, concatenate the skip, then a ConvBlock."""

    def __init__(self, c_in: int, c_out: int, norm: str, up: str):
        super().__init__()
        if up == "bilinear":
            # bilinear + 1x1 conv: no checkerboard artefacts, fewer parameters than a transposed conv
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(c_in, c_out, 1))
        elif up == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        else:
            raise ValueError(f"unknown up {up!r}: expected 'bilinear' or 'transpose'")
        self.conv = ConvBlock(2 * c_out, c_out, norm)

    def forward(self, x, skip):
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """2D U-Net returning logits.

    ``depth`` down levels, a bottleneck and ``depth`` up levels (depth=4 is the paper's "9 layers");
    level ``i`` has ``width * 2**i`` channels. Inputs (N, in_channels, H, W) need H and W divisible
    by ``2**depth``. BatchNorm (default) makes the eval-mode network translation-equivariant, so tiled
    inference matches whole-image inference away from borders; GroupNorm is there for tiny batches.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, depth: int = 4, width: int = 16,
                 norm: str = "batch", up: str = "bilinear"):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        self.hparams = dict(in_channels=in_channels, out_channels=out_channels, depth=depth, width=width,
                            norm=norm, up=up)
        self.depth = depth
        ch = [width * 2 ** i for i in range(depth + 1)]
        self.downs = nn.ModuleList(ConvBlock(in_channels if i == 0 else ch[i - 1], ch[i], norm)
                                   for i in range(depth))
        self.bottleneck = ConvBlock(ch[depth - 1], ch[depth], norm)
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i], norm, up) for i in reversed(range(depth)))
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, x):
        m = 2 ** self.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"UNet(depth={self.depth}) needs H and W divisible by {m}, got {tuple(x.shape[-2:])}")
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.head(x)


# -- losses --------------------------------------------------------------------------------------

def tversky_focal_loss(logits, target, alpha: float = 0.7, beta: float = 0.3, gamma: float = 4 / 3,
                       smooth: float = 1.0):
    """Focal Tversky loss (Abraham & Khan 2019): ``(1 - TI) ** (1 / gamma)``.

    ``TI = (TP + s) / (TP + alpha * FN + beta * FP + s)`` with soft counts from ``sigmoid(logits)``,
    summed over the whole batch (one index per batch, so tiles without vessels do not each blow up).
    ``alpha`` weighs false negatives, ``beta`` false positives. Exponent convention: the paper's
    ``1/gamma`` with gamma in [1, 3]; the default gamma=4/3 gives exponent 0.75.
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    tp = (p * t).sum()
    fn = ((1 - p) * t).sum()
    fp = (p * (1 - t)).sum()
    ti = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    # clamp: d/dx x**0.75 is infinite at 0, which would give NaN gradients on a perfect batch
    return (1 - ti).clamp_min(1e-6) ** (1 / gamma)


def dice_bce_loss(logits, target, bce_weight: float = 0.5, smooth: float = 1.0):
    """``bce_weight * BCE + (1 - bce_weight) * (1 - soft Dice)``, Dice over the whole batch."""
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), t)
    p = torch.sigmoid(logits.float())
    dice = (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    return bce_weight * bce + (1 - bce_weight) * (1 - dice)


LOSSES: dict[str, Callable] = {"tversky_focal": tversky_focal_loss, "dice_bce": dice_bce_loss}


# -- augmentation --------------------------------------------------------------------------------

@dataclass
class AugmentConfig:
    """Which augmentations ``augment_pair`` applies; 0 / False switches one off."""

    rot90_flip: bool = True      # the 8 symmetries of the square (exact, no interpolation)
    rotate_deg: float = 15.0     # uniform small rotation in [-rotate_deg, rotate_deg]
    shift: float = 0.0625        # translation, fraction of the tile side
    scale: float = 1.4           # zoom drawn log-uniformly from [1/scale, scale]: microscopes differ in pixel size
    p_affine: float = 0.5        # probability of the (interpolating) rotation + translation + zoom
    noise: float = 0.02          # Gaussian noise sigma drawn from [0, noise] (image scale 0..1)
    brightness: float = 0.1      # additive offset in [-brightness, brightness]
    contrast: float = 0.15       # gain in [1 - contrast, 1 + contrast] about the tile mean
    gamma: float = 1.5           # with probability p_gamma, image ** g, log g uniform in [-log gamma, log gamma]
    p_gamma: float = 0.3
    blur: float = 1.0            # with probability p_blur, Gaussian blur, sigma uniform in [0.5, blur] pixels
    p_blur: float = 0.2
    haze: float = 0.0            # with probability p_haze, add a smooth bright field of peak in [0.1, haze]
    p_haze: float = 0.3          # (autofluorescent tissue, a heart wall, scattered light): not vessel

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError for a haze peak outside (0, 1] (0: off): the image is 0-1, so a field above 1 only
        saturates the tiles it is added to (also run by ``TrainConfig.check``: fields may change later)."""
        if not (self.haze == 0 or 0 < self.haze <= 1):   # NaN fails both
            raise ValueError(f"haze = {self.haze} is the peak of a bright field added to the 0-1 image; expected "
                             f"0 (off) or a value in (0, 1]: above 1 it only saturates the tiles")


def haze_field(shape: tuple[int, int], peak: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth non-negative field over a (y, x) tile with maximum ``peak``: a few random blobs or bands
    far wider than a vessel (coarse noise on a 2-6 cell grid, upsampled cubically)."""
    cells = int(rng.integers(2, 7))
    coarse = rng.normal(size=(cells + 1, cells + 1))
    field = ndimage.zoom(coarse, (shape[0] / (cells + 1), shape[1] / (cells + 1)), order=3, mode="nearest",
                         grid_mode=True)[:shape[0], :shape[1]]
    field = np.clip(field - np.quantile(field, rng.uniform(0.3, 0.7)), 0, None)
    top = field.max()
    return (field * (peak / top) if top > 0 else field).astype(np.float32)


def geometric_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                      cfg: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
    """The same random rotation/flip/translation/zoom applied to a (y, x) image and its label.

    ``image`` may also be (c, y, x), neighbouring slices as channels (2.5-D input): every channel gets
    the label's transform. The image is interpolated linearly, the label by nearest neighbour so it
    stays binary; both use reflect borders so they stay aligned at the edges too.
    """
    if cfg.rot90_flip:
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        image, label = np.rot90(image, k, axes=(-2, -1)), np.rot90(label, k)
        if flip:
            image, label = image[..., ::-1], label[:, ::-1]
    if (cfg.rotate_deg or cfg.shift or cfg.scale > 1) and rng.random() < cfg.p_affine:
        theta = np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        shift = rng.uniform(-cfg.shift, cfg.shift, size=2) * np.array(label.shape)
        zoom = np.exp(rng.uniform(-np.log(cfg.scale), np.log(cfg.scale))) if cfg.scale > 1 else 1.0
        c, s = np.cos(theta) / zoom, np.sin(theta) / zoom
        mat = np.array([[c, -s], [s, c]])
        centre = (np.array(label.shape) - 1) / 2
        # affine_transform maps output coords o to input coords mat @ o + offset
        offset = centre - mat @ centre + shift
        if image.ndim == 2:
            image = ndimage.affine_transform(image, mat, offset, order=1, mode="reflect")
        else:
            image = np.stack([ndimage.affine_transform(ch, mat, offset, order=1, mode="reflect") for ch in image])
        label = ndimage.affine_transform(label, mat, offset, order=0, mode="reflect")
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def intensity_augment(image: np.ndarray, rng: np.random.Generator,
                      cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Haze, blur, gamma, contrast, brightness and Gaussian noise on a float image in [0, 1]; the result is
    clipped to [0, 1]. Blur and gamma stand in for a wider or narrower PSF and a different stain or
    detector response than the training stacks had."""
    image = image.astype(np.float32, copy=True)
    if cfg.haze and rng.random() < cfg.p_haze:   # one field for all channels: haze changes slowly along z
        image += haze_field(image.shape[-2:], rng.uniform(0.1, max(cfg.haze, 0.1)), rng)
    if cfg.blur and rng.random() < cfg.p_blur:
        sigma = rng.uniform(0.5, max(cfg.blur, 0.5))
        # in-plane only: the channels of a (c, y, x) image are neighbouring slices
        sigma = sigma if image.ndim == 2 else (0, sigma, sigma)
        image = ndimage.gaussian_filter(image, sigma, mode="reflect")
    if cfg.gamma > 1 and rng.random() < cfg.p_gamma:
        image = np.power(np.clip(image, 0, 1), np.exp(rng.uniform(-np.log(cfg.gamma), np.log(cfg.gamma))),
                         dtype=np.float32)
    if cfg.contrast:
        mean = image.mean()
        image = (image - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    if cfg.brightness:
        image += rng.uniform(-cfg.brightness, cfg.brightness)
    if cfg.noise:
        image += rng.normal(0, rng.uniform(0, cfg.noise), image.shape).astype(np.float32)
    return np.clip(image, 0, 1, out=image)


def augment_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 cfg: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Geometric then intensity augmentation of a float (y, x) or (c, y, x) image in [0, 1] and its 0/1 label."""
    image, label = geometric_augment(image, label, rng, cfg)
    return intensity_augment(image, rng, cfg), label


# -- weights -------------------------------------------------------------------------------------

def _atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name then rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_weights(model: UNet, path, meta: dict | None = None) -> Path:
    """Save architecture hyper-parameters, ``meta`` (plain Python values) and fp16 weights.

    fp16 storage halves the file (a width-16 depth-4 model is about 4 MB); ``load_weights`` casts back
    to float32. ``meta`` must hold only str/int/float/bool/None/lists/dicts (it is loaded with
    ``weights_only=True``).
    """
    state = {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad:   # a diverged model (or one past fp16's range) would segment nothing, silently
        raise ValueError(f"{path}: not saved, {bad}; expected finite weights (a diverged training run?)")
    _atomic_save({"format": WEIGHTS_FORMAT, "hparams": dict(model.hparams), "meta": dict(meta or {}),
                  "state_dict": state}, Path(path))
    return Path(path)


def load_weights(path, device: str = "cpu") -> UNet:
    """The UNet saved by ``save_weights``, float32, in eval mode, on ``device`` ("cpu" | "cuda" | "auto").

    Its metadata is available as ``model.meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"U-Net weights not found at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip or EOF errors alike; torch's text advises weights_only=False, wrongly here
        raise ValueError(f"{path} is not a gpuheart U-Net weights file (not a readable PyTorch checkpoint: "
                         f"{type(err).__name__}); expected best.pt from gpuheart train") from err
    if isinstance(ckpt, dict) and {"model", "opt", "state"} <= ckpt.keys():
        raise ValueError(f"{path} is the training state that gpuheart train --resume continues from, not a weights "
                         f"file (to segment with, or to start training from with --init): use best.pt in the same "
                         f"folder")
    if not isinstance(ckpt, dict) or ckpt.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a gpuheart U-Net weights file (expected format {WEIGHTS_FORMAT!r})")
    bad = _non_finite(ckpt["state_dict"])
    if bad:   # NaN weights predict NaN, read as background: an empty mask, silently
        raise ValueError(f"{path}: {bad}, so it would segment nothing; expected finite weights: the training "
                         f"run that wrote it diverged, train again with a lower learning rate (--lr)")
    model = UNet(**ckpt["hparams"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    model.meta = ckpt["meta"]
    return model.to(torch_device(device)).eval()


def _non_finite(state: dict) -> str:
    """'' when every float tensor of a state dict is finite, else which ones are not and how many values."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if not bad:
        return ""
    first = ", ".join(list(bad)[:3]) + (", ..." if len(bad) > 3 else "")
    return f"{sum(bad.values())} weight(s) are NaN or infinite (in {len(bad)} tensor(s): {first})"


def _torch_cuda() -> bool:
    return torch.cuda.is_available()


def torch_device(device: str = "auto") -> str:
    """Where torch computes: :func:`resolve_device`, except that a CPU build of PyTorch beside a working CuPy
    (e.g. ``pip install torch`` from the CPU index on a GPU desktop) runs the U-Net on the CPU with a warning
    under ``auto``, and is a :class:`DeviceError` naming the cause under ``cuda`` (torch's own message is an
    AssertionError deep inside ``.to``)."""
    dev = resolve_device(device)
    if dev == "cpu" or _torch_cuda():
        return dev
    why = (f"PyTorch {torch.__version__} here has no CUDA (a CPU build, or no driver it can use), although CuPy "
           f"sees a GPU")
    if device == "cuda":
        raise DeviceError(f"device 'cuda' was requested but {why}; install a CUDA build of PyTorch or use device 'cpu' (--device cpu)")
    if "torch-cpu" not in _warned:
        _warned.add("torch-cpu")
        warnings.warn(f"{why}: the U-Net runs on the CPU (slow), the other stages on the GPU; install a CUDA "
                      f"build of PyTorch for speed", stacklevel=3)
    return "cpu"


_warned: set[str] = set()


def training_device(device: str = "auto") -> str:
    """Where ``train`` computes. Training needs PyTorch's CUDA only (CuPy, which :func:`torch_device` consults for
    the pipeline's other stages, plays no part): ``auto`` is a GPU that torch sees, and ``cuda`` without one is
    refused in torch's terms."""
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"unknown device {device!r}: expected one of auto, cpu, cuda")
    if device == "cpu" or (device == "auto" and not _torch_cuda()):
        return "cpu"
    if _torch_cuda():
        return "cuda"
    raise DeviceError(f"device 'cuda' was requested for training, which runs on PyTorch, but PyTorch "
                          f"{torch.__version__} finds no CUDA GPU (none here, no driver it can use, or a CPU build "
                          f"of PyTorch); train on the CPU with --device cpu (Python: device='cpu'), or install a "
                          f"CUDA build of PyTorch on a GPU machine")


def default_weights_path() -> Path:
    """Where the packaged default weights live (may not exist yet)."""
    return Path(__file__).parent / "weights" / "unet_default.pt"


def load_default(device: str = "cpu") -> UNet:
    """The packaged default model, or a FileNotFoundError saying how to make one."""
    path = default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"no default U-Net weights at {path}. Make them with the command in docs/model-card.md (gpuheart "
            f"train on labelled stacks, then copy RUN/best.pt to that path), or pass your own weights file.")
    return load_weights(path, device)


# -- tiled inference -----------------------------------------------------------------------------

@dataclass
class TileGrid:
    """Tile layout of one (y, x) slice: reflect padding ``pad`` ((top, bottom), (left, right)), then tiles of
    side ``tile`` whose top-left corners are every (y, x) in ``starts_y`` x ``starts_x`` (padded coordinates)."""

    tile: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    starts_y: list[int]
    starts_x: list[int]


def _aligned_starts(n: int, tile: int, stride: int, align: int) -> tuple[list[int], int]:
    """Tile starts over a padded axis of length ``n`` > ``tile``, all multiples of ``align``, and the padding
    to add at the end so that the last tile, flush with it, fits."""
    stride = max(align, stride // align * align)
    last = -(-(n - tile) // align) * align
    starts = [s for s in range(0, n - tile, stride) if s < last] + [last]
    return starts, last + tile - n


def tile_grid(shape: tuple[int, int], tile: int = 256, overlap: int = 64, align: int = 1) -> TileGrid:
    """Layout for a slice of ``shape``: ``overlap // 2`` reflect margin on every side so image borders are
    seen with context (a slice no larger than a tile is centred in one tile instead).

    Every tile starts a multiple of ``align`` pixels from the image origin (``predict`` passes the U-Net's
    2**depth): a tile off its pooling grid is not a shifted copy of the whole-image network, so its
    output would differ from its neighbours' where they overlap. To keep that, the margin is rounded up,
    the stride rounded down, and the last tile rather padded past the end than pulled back off the grid.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    if align < 1 or tile % align:
        raise ValueError(f"tile {tile} must be a multiple of align {align}")
    m = -(-(overlap // 2) // align) * align
    pads, starts = [], []
    for n in shape:
        if n <= tile:  # one tile covers it: spend the padding on context around it, not on a second tile
            lo = (tile - n) // 2 // align * align
            pads.append((lo, tile - n - lo))
            starts.append([0])
            continue
        s, end = _aligned_starts(n + 2 * m, tile, tile - overlap, align)
        pads.append((m, m + end))
        starts.append(s)
    return TileGrid(tile, (pads[0], pads[1]), starts[0], starts[1])


def _window(tile: int, device) -> torch.Tensor:
    """Separable squared-sine window, largest at the centre, small but > 0 at the edges (no division by 0)."""
    w = torch.sin(math.pi * (torch.arange(tile, dtype=torch.float64) + 0.5) / tile) ** 2
    return torch.outer(w, w).to(device=device, dtype=torch.float32)


def _reflect_pad(t: torch.Tensor, pad: tuple[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
    """Reflect-pad the last two axes of (N, C, H, W); repeated for pads larger than the image, which
    torch's reflect refuses in one go (a 1-pixel axis falls back to replicate)."""
    (top, bottom), (left, right) = pad
    while top or bottom or left or right:
        h, w = t.shape[-2:]
        step = [min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)]
        if not any(step):   # a 1-pixel axis cannot be reflected
            return F.pad(t, (left, right, top, bottom), mode="replicate")
        t = F.pad(t, step, mode="reflect")
        left, right, top, bottom = left - step[0], right - step[1], top - step[2], bottom - step[3]
    return t


def _auto_batch_size(model: nn.Module, tile: int, device: torch.device) -> int:
    """CPU: 4 tiles. CUDA: about half the free memory over a rough per-tile activation estimate, at most 256
    tiles of 256x256 or as many pixels in smaller tiles (a 16-channel U-Net needs batches in the hundreds to
    keep a large GPU busy; benchmarks/bench_unet.py sweeps the batch size on a GPU to check)."""
    if device.type != "cuda":
        return 4
    width = getattr(model, "hparams", {}).get("width", 32)
    # ~2 * width * tile^2 activations summed over levels, ~8 live tensors, 2-byte bf16 (4 to be safe)
    per_tile = 2 * width * tile * tile * 8 * 4
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(256 * 256 * 256 // (tile * tile), free // 2 // per_tile)))


def _to_unit_float(t: torch.Tensor) -> torch.Tensor:
    """uint8 images become float32 / 255 (what training saw); floats are taken as already in [0, 1]."""
    if t.dtype == torch.uint8:
        return t.float() / 255
    if not t.is_floating_point():   # a uint16 or int image would reach the model unscaled
        raise ValueError(f"the U-Net takes uint8 (0-255) or float (0-1) images, got {t.dtype}: preprocess the "
                         f"scan first (gpuheart.exposure.preprocess gives uint8)")
    t = t.float()
    lo, hi = (float(v) for v in torch.aminmax(t))   # one reduction (one device sync); NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):   # one NaN pixel turns its whole tile to NaN, read as background
        raise ValueError(f"the U-Net takes float images in [0, 1], got one with {int((~torch.isfinite(t)).sum())} "
                         f"NaN/Inf pixel(s)")
    if lo < -0.5 or hi > 1.5:   # a 0-255 float slice or z-scores would be read as saturated vessel everywhere
        raise ValueError(f"the U-Net takes float images in [0, 1] (or uint8 0-255), got values {lo:.3g} to "
                         f"{hi:.3g}: pass the preprocessed uint8 slice, or divide a 0-255 float image by 255")
    return t


def context_slices(model: nn.Module) -> int:
    """Neighbouring slices on each side a model takes as extra input channels (0: plain 2-D)."""
    c = getattr(model, "hparams", {}).get("in_channels", 1)
    if c % 2 == 0:
        raise ValueError(f"a gpuheart U-Net takes 2k+1 input channels (a slice and k neighbours each side), got {c}")
    return (c - 1) // 2


def inference_tile(model: nn.Module, tile: int | None = None, overlap: int | None = None) -> tuple[int, int]:
    """Tile side and overlap to predict with. By default the tile the model was trained and validated on
    (``model.meta["config"]["tile"]``; 256 for a model without that record) and a quarter of it as overlap:
    with GroupNorm a tile's output depends on the tile's size, and the stored threshold and best epoch were
    chosen at that size (held-out stacks: +0.002 to +0.016 Dice in all nine recipes measured, see
    docs/accuracy.md)."""
    if tile is None:
        tile = int((getattr(model, "meta", None) or {}).get("config", {}).get("tile", 256))
    return int(tile), int(tile // 4 if overlap is None else overlap)


def predict(model: nn.Module, image, tile: int | None = None, overlap: int | None = None,
            batch_size: int | None = None, device: str = "auto", amp: bool | None = None,
            halo: tuple[int, int] = (0, 0), compile: bool | None = None):
    """Vessel probabilities (float32, same shape and array kind as ``image``) by overlapping tiles.

    ``image``: a (y, x) slice or a (z, y, x) slab (predicted slice by slice), NumPy or CuPy, uint8
    (scaled by 1/255) or float in [0, 1]. Tiles of side ``tile`` overlap by ``overlap`` (by default the
    model's training tile and a quarter of it: :func:`inference_tile`); each tile's
    sigmoid output is weighted by a squared-sine window and the sum is normalised by the summed weights,
    so there are no seams. Borders are reflect-padded. CuPy input stays on the GPU (DLPack, no host
    round trip). ``amp``: bf16 autocast; None (the default) means on for CUDA and off on the CPU, where
    fp32 keeps results identical across machines (True turns it on for CPUs with native bf16, about 2x
    faster, with about 0.03 % of mask pixels flipped at the calibrated threshold). ``model`` must output
    one channel of logits; it is moved to the compute device, put in eval mode and given the channels-last
    memory layout (same numbers, faster convolutions on the CPU, the layout cuDNN prefers for bf16).

    ``compile``: run the model through ``torch.compile`` (None, the default: on CUDA only, unless the
    environment sets GPUHEART_UNET_COMPILE=0). On an H200 that took predict with the shipped model from 2,142
    to 9,666 256x256 tiles/s (benchmarks/results/nvidia-h200-unet.json: GroupNorm, its casts and the upsampling
    fused), for about 20 s of compiling once per model and process; the masks differ from uncompiled bf16 as bf16 differs from fp32 (about
    6e-5 of pixels). Batches are padded to one shape so it compiles once. Where compiling fails (no Triton,
    no C compiler) it warns once and runs the model as it is. It pays back from about 60,000 tiles of 256x256
    (~1e9 voxels at the pipeline's overlapping 128-pixel tiles; :data:`COMPILE_MIN_VOXELS`): for a few slices,
    pass ``compile=False``.

    A 2.5-D model (``context_slices(model) = k > 0``) sees every slice with its k neighbours on each
    side; ``halo = (lo, hi)`` says that the first ``lo`` and last ``hi`` slices of the slab are there
    only as such neighbours (they are not predicted and not returned). Beyond the slab, the end slice
    is repeated, so a slab cut without a halo of k differs from the whole stack near its cut.

    ``batch_size``: tiles per forward pass; None or 0 chooses it from the free memory of the device.
    ``device``: "auto" | "cpu" | "cuda" (:func:`torch_device`), or a ``torch.device`` taken as it is (training
    validates where it trains, which needs no CuPy).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"predict needs a U-Net (gpuheart.unet.load_weights(path) or load_default()), got "
                        f"{type(model).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 0):
        raise ValueError(f"batch_size must be an integer >= 1 (0 or None: chosen automatically), got {batch_size!r}")
    if not hasattr(image, "ndim"):
        raise TypeError(f"predict needs a NumPy or CuPy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or 0 in image.shape[-2:]:
        raise ValueError(f"predict needs a non-empty (y, x) slice or (z, y, x) slab, got shape {image.shape}")
    if not is_device_array(image):
        image = native_byte_order(image)   # DLPack refuses big-endian arrays (a TIFF read without conversion)
    lo, hi = (int(h) for h in halo)
    if lo < 0 or hi < 0 or (image.ndim == 2 and (lo or hi)) or (image.ndim == 3 and lo + hi >= image.shape[0]):
        raise ValueError(f"halo {halo} must be >= 0 and leave at least one slice of {image.shape} to predict")
    tile, overlap = inference_tile(model, tile, overlap)
    depth = getattr(model, "depth", 0)
    if tile % 2 ** depth:
        raise ValueError(f"tile {tile} must be divisible by 2**depth = {2 ** depth}")
    if is_device_array(image) and torch_device("auto") == "cpu":   # torch cannot take the GPU array: via the host
        return to_device(predict(model, to_host(image), tile, overlap, batch_size, "cpu", amp, halo))
    x = as_torch(image if image.flags.c_contiguous else _contiguous(image))
    # CuPy input is computed on its own GPU (x.device), NumPy input where ``device`` says
    dev = (x.device if is_device_array(image) else device if isinstance(device, torch.device)
           else torch.device(torch_device(device)))
    x = _to_unit_float(x.to(dev))
    slab = x[None] if image.ndim == 2 else x
    use_amp = (dev.type == "cuda") if amp is None else bool(amp) and (dev.type == "cuda" or _cpu_bf16())
    model = model.to(dev, memory_format=torch.channels_last).eval()
    bs = batch_size or _auto_batch_size(model, tile, dev)
    runner = _Compiled(model) if _use_compile(compile, dev) else None
    out = _predict_slab(model, slab, tile, overlap, bs, use_amp, context_slices(model), (lo, hi), runner)
    out = out[0] if image.ndim == 2 else out
    if not is_device_array(image):
        return np.ascontiguousarray(out.cpu().numpy())
    return from_torch(out)


def _cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX); elsewhere bf16 would be emulated, slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _contiguous(a):
    from .backend import array_module
    return array_module(a).ascontiguousarray(a)


@torch.inference_mode()
def _predict_slab(model: nn.Module, slab: torch.Tensor, tile: int, overlap: int, batch_size: int,
                  amp: bool, context: int = 0, halo: tuple[int, int] = (0, 0),
                  runner: "_Compiled | None" = None) -> torch.Tensor:
    """Blend tiled predictions of a float (z, y, x) tensor; returns float32 (z - sum(halo), y, x) on the
    same device. Slice k's input is slices k-context..k+context (the end slices repeated beyond the slab)."""
    z, h, w = slab.shape
    grid = tile_grid((h, w), tile, overlap, align=2 ** getattr(model, "depth", 0))
    padded = _reflect_pad(slab[:, None], grid.pad)[:, 0]
    if context:  # the end slices repeated once, so slice k's inputs are rows k .. k + 2 * context
        padded = padded[torch.arange(-context, z + context, device=slab.device).clamp_(0, z - 1)]
    inputs = padded.unfold(0, 2 * context + 1, 1).permute(0, 3, 1, 2)   # (z, 2c+1, H, W), a view
    win = _window(tile, slab.device)
    acc = torch.zeros((z - halo[0] - halo[1], *padded.shape[1:]), device=slab.device)
    wsum = torch.zeros(padded.shape[1:], device=slab.device)
    positions = [(sy, sx) for sy in grid.starts_y for sx in grid.starts_x]
    for sy, sx in positions:
        wsum[sy:sy + tile, sx:sx + tile] += win
    with torch.autocast(slab.device.type, dtype=torch.bfloat16, enabled=amp):
        for batch in _tile_runs(positions, halo[0], z - halo[1], batch_size):
            x = torch.cat([inputs[k0:k1, :, sy:sy + tile, sx:sx + tile] for sy, sx, k0, k1 in batch])
            x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x) if runner is None else runner(x, batch_size)
            prob = torch.sigmoid(logits.float())[:, 0] * win
            i = 0
            for sy, sx, k0, k1 in batch:   # one add per run of slices, not per tile: what keeps a GPU busy
                acc[k0 - halo[0]:k1 - halo[0], sy:sy + tile, sx:sx + tile] += prob[i:i + k1 - k0]
                i += k1 - k0
    (top, _), (left, _) = grid.pad
    return (acc[:, top:top + h, left:left + w] / wsum[top:top + h, left:left + w]).contiguous()


# Where torch.compile pays back its ~23 s on an H200 (2026-11-27: 2,142 -> 9,666 tiles/s of 256x256, so ~0.36 ms
# saved a tile; ~63,000 tiles): about 4e9 voxels at 256-pixel tiles without overlap, and about half of that at
# the pipeline's 128-pixel tiles overlapping by 32 (1.8x the tiles per voxel). Per channel, with the compiled
# model shared by the run's other channels: 1e9, about 240 slices of 2048x2048.
COMPILE_MIN_VOXELS = 1_000_000_000


def _use_compile(compile: bool | None, dev: torch.device) -> bool:
    if compile is None:
        return dev.type == "cuda" and os.environ.get("GPUHEART_UNET_COMPILE", "1") != "0"
    return bool(compile)


# torch.compile's arguments; tests swap in backend="eager" to check the plumbing without compiling
_COMPILE_OPTIONS: dict = {}
# id(model) -> (weak reference to the model, its compiled forward or None where compiling failed), the
# last few models only: the compiled module holds its model, so a weak-keyed cache would never let go
_compiled_models: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_COMPILED_KEPT = 4


class _Compiled:
    """Calls ``model`` through torch.compile on batches padded to ``batch_size`` tiles (one shape, so one
    compilation: a second shape would compile again, for dynamic shapes)."""

    def __init__(self, model: nn.Module):
        self.model = model
        ref, fn = _compiled_models.get(id(model), (None, None))
        if ref is None or ref() is not model:   # new, or an id reused by another model
            fn = torch.compile(model, **_COMPILE_OPTIONS)
            _compiled_models[id(model)] = (weakref.ref(model), fn)
            while len(_compiled_models) > _COMPILED_KEPT:
                _compiled_models.popitem(last=False)
        _compiled_models.move_to_end(id(model))
        self.fn = fn

    def __call__(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.fn is None:
            return self.model(x)
        n = x.shape[0]
        if n < batch_size:   # zero tiles: each tile's output depends only on itself (GroupNorm is per sample)
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last)
        try:
            return self.fn(x)[:n]
        except Exception as err:  # noqa: BLE001 - any compiler failure: the model runs as it is
            if is_device_oom(err):
                raise   # the pipeline shrinks its slabs and retries
            _compiled_models[id(self.model)] = (weakref.ref(self.model), None)
            self.fn = None
            if "compile" not in _warned:
                _warned.add("compile")
                warnings.warn(f"torch.compile of the U-Net failed ({type(err).__name__}: {str(err)[:200]}); "
                              "running it uncompiled (slower on a GPU; GPUHEART_UNET_COMPILE=0 skips trying)",
                              RuntimeWarning, stacklevel=3)
            return self.model(x[:n])


def _tile_runs(positions, k_lo: int, k_hi: int, batch_size: int):
    """Batches of ``batch_size`` tiles as runs ``(sy, sx, k0, k1)``: one tile position over consecutive
    slices, so a batch is gathered and scattered with a few slicing ops. Each slice still receives its tiles
    in row-major position order, so every pixel sums the same terms in the same order as tile by tile."""
    batch, n = [], 0
    for sy, sx in positions:
        k = k_lo
        while k < k_hi:
            take = min(k_hi - k, batch_size - n)
            batch.append((sy, sx, k, k + take))
            n, k = n + take, k + take
            if n == batch_size:
                yield batch
                batch, n = [], 0
    if batch:
        yield batch


# -- training data -------------------------------------------------------------------------------

def split_slices(depths: list[int], val_fraction: float, by: str = "slab") -> tuple[list, list]:
    """Deterministic train/validation split: two lists of (volume, z) pairs.

    ``by="slab"``: the last ``ceil(val_fraction * z)`` slices of every volume are validation, so every
    volume (modality) is seen in both sets and neighbouring slices only leak across one boundary.
    ``by="volume"``: the last ``round(val_fraction * n)`` volumes (at least one) are validation.
    With ``by="slab"``, volumes of a single slice (2-D images) are split like the slices of one stack:
    the last ``ceil(val_fraction * n)`` of them are validation, at least one stays in training.
    """
    if by == "volume":
        if len(depths) < 2:
            raise ValueError("split by volume needs at least 2 volumes")
        n_val = min(len(depths) - 1, max(1, round(val_fraction * len(depths))))
        vols = [[(v, k) for k in range(d)] for v, d in enumerate(depths)]
        return sum(vols[:-n_val], []), sum(vols[-n_val:], [])
    if by != "slab":
        raise ValueError(f"unknown split {by!r}: expected 'slab' or 'volume'")
    singles = [v for v, d in enumerate(depths) if d == 1]
    # else a folder of 2-D label pairs, the commonest annotation, would have no validation slice at all
    n_single = min(len(singles) - 1, math.ceil(val_fraction * len(singles))) if singles else 0
    single_val = set(singles[len(singles) - n_single:])
    train, val = [], []
    for v, d in enumerate(depths):
        n_val = min(d - 1, math.ceil(val_fraction * d)) if d > 1 else int(v in single_val)
        train += [(v, k) for k in range(d - n_val)]
        val += [(v, k) for k in range(d - n_val, d)]
    return train, val


@dataclass
class TileSampler:
    """Draws (image, label) tiles from training slices, with probability ``fg_fraction`` placed around a
    random vessel pixel (vessels are a few % of the voxels, so uniform tiles are mostly background).

    Slices are drawn in proportion to their area (background draws) or vessel pixel count (vessel
    draws), i.e. uniformly per pixel, so a deep stack of small slices does not dominate. With
    ``balance="stack"`` every volume gets the same share of the draws instead (per pixel within it), so
    the largest stack, and its annotator's convention, does not dominate either.
    """

    volumes: list[np.ndarray]   # uint8 (z, y, x); padded here so y, x >= tile
    labels: list[np.ndarray]    # uint8 0/1, same shapes
    slices: list[tuple[int, int]]
    tile: int
    fg_fraction: float = 0.5
    context: int = 0            # neighbouring slices each side as extra channels (end slices repeated)
    balance: str = "pixel"      # "pixel": every pixel alike; "stack": every volume alike

    def __post_init__(self):
        if self.balance not in ("pixel", "stack"):
            raise ValueError(f"unknown balance {self.balance!r}: expected 'pixel' or 'stack'")
        areas = np.array([self.volumes[v].shape[1] * self.volumes[v].shape[2] for v, _ in self.slices], float)
        self.area_p = self._shares(areas, self.slices)   # real areas: padding must not weigh in
        self.volumes = [_pad_to_tile(v, self.tile) for v in self.volumes]
        self.labels = [_pad_to_tile(v, self.tile) for v in self.labels]
        # flat int32 indices of vessel pixels per slice: compact, and one draw picks a pixel uniformly
        self.fg = {s: np.flatnonzero(self.labels[s[0]][s[1]]).astype(np.int32) for s in self.slices}
        self.fg_slices = [s for s in self.slices if self.fg[s].size]
        counts = np.array([self.fg[s].size for s in self.fg_slices], dtype=np.float64)
        self.fg_p = self._shares(counts, self.fg_slices) if counts.size else counts

    def _shares(self, weights: np.ndarray, slices) -> np.ndarray:
        """Draw probabilities proportional to ``weights``, within each volume when balancing stacks."""
        if self.balance == "stack":
            vols = np.array([v for v, _ in slices])
            totals = np.bincount(vols, weights=weights)
            weights = weights / totals[vols] / np.count_nonzero(totals)
        return weights / weights.sum()

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One float32 image tile in [0, 1], (t, t) or with context (2 * context + 1, t, t), and its
        uint8 (t, t) label tile."""
        t = self.tile
        if self.fg_slices and rng.random() < self.fg_fraction:
            v, k = self.fg_slices[rng.choice(len(self.fg_slices), p=self.fg_p)]
            h, w = self.volumes[v].shape[1:]
            py, px = divmod(int(self.fg[(v, k)][rng.integers(self.fg[(v, k)].size)]), w)
            # the vessel pixel lands anywhere in the central half, so it has context on every side
            y0 = int(np.clip(py - rng.integers(t // 4, t - t // 4), 0, h - t))
            x0 = int(np.clip(px - rng.integers(t // 4, t - t // 4), 0, w - t))
        else:
            v, k = self.slices[rng.choice(len(self.slices), p=self.area_p)]
            h, w = self.volumes[v].shape[1:]
            y0, x0 = int(rng.integers(h - t + 1)), int(rng.integers(w - t + 1))
        if self.context:
            z = self.volumes[v].shape[0]
            ks = np.clip(np.arange(k - self.context, k + self.context + 1), 0, z - 1)
            img = self.volumes[v][ks, y0:y0 + t, x0:x0 + t].astype(np.float32) / 255
        else:
            img = self.volumes[v][k, y0:y0 + t, x0:x0 + t].astype(np.float32) / 255
        return img, self.labels[v][k, y0:y0 + t, x0:x0 + t]

    def batch(self, rng: np.random.Generator, n: int, augment: AugmentConfig | None):
        """(n, 2 * context + 1, tile, tile) float32 images and (n, 1, tile, tile) labels as torch tensors."""
        pairs = [self.sample(rng) for _ in range(n)]
        if augment is not None:
            pairs = [augment_pair(i, l, rng, augment) for i, l in pairs]
        img = np.stack([p[0] for p in pairs])
        img = torch.from_numpy(img if self.context else img[:, None])
        lab = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.float32))
        return img, lab


def _check_pairs(images, labels) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(images) != len(labels) or not images:
        raise ValueError(f"need matching non-empty lists of images and labels, "
                         f"got {len(images)} and {len(labels)}")
    vols, labs = [], []
    for i, (im, lb) in enumerate(zip(images, labels)):
        im, lb = np.asarray(im), np.asarray(lb)
        im, lb = (im[None], lb[None]) if im.ndim == 2 else (im, lb)
        if im.ndim != 3 or im.shape != lb.shape:
            raise ValueError(f"pair {i}: image {im.shape} and label {lb.shape} must be equal (z, y, x) shapes")
        if im.dtype != np.uint8:
            raise ValueError(f"pair {i}: images must be uint8 (preprocessed with gpuheart.exposure), "
                             f"got {im.dtype}")
        if has_fractions(lb):   # > 0 would make every pixel of a probability map vessel
            raise ValueError(f"pair {i}: labels must be a mask (0 background, nonzero vessel), got float values "
                             f"between 0 and 1 or NaN (a probability map?): threshold it first")
        _warn_pair_values(i, lb)
        vols.append(im)
        labs.append((lb != 0).astype(np.uint8))   # an int8 0/255 mask reads as 0/-1: any nonzero value is vessel
    return vols, labs


def _warn_pair_values(i: int, lb: np.ndarray) -> None:
    from .training import describe_values, nonzero_values

    values = nonzero_values(lb)
    if len(values) > 1:   # a multi-class or instance mask: its classes would all become vessel
        warnings.warn(f"pair {i}: the labels hold {len(values)} distinct nonzero values "
                      f"({describe_values(values)}); all nonzero values are taken as vessel - if it is a "
                      f"multi-class or instance mask, pass the vessel class alone", RuntimeWarning, stacklevel=4)


def _pad_to_tile(vol: np.ndarray, tile: int) -> np.ndarray:
    """Reflect-pad y and x up to ``tile`` (slices smaller than a tile still give full tiles)."""
    py, px = max(0, tile - vol.shape[1]), max(0, tile - vol.shape[2])
    if not (py or px):
        return vol
    return np.pad(vol, ((0, 0), (0, py), (0, px)), mode="symmetric")


# -- training ------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything ``train`` needs besides the data; saved in checkpoints and weights metadata."""

    # the defaults of `gpuheart train` (cli.TRAIN_DEFAULTS); 128-pixel tiles, not the paper's 256: at the same
    # pixels per step the 256-pixel recipe scored 0.642 against 0.674 on held-out stacks (docs/accuracy.md)
    epochs: int = 60
    steps_per_epoch: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    tile: int = 128
    width: int = 16
    depth: int = 4
    context: int = 0               # 2.5-D: this many neighbouring slices each side as extra input channels
    norm: str = "group"             # GroupNorm: eval behaves like training whatever the batch mix
    loss: str = "tversky_focal"    # a key of LOSSES
    # the paper's Tversky-Focal weights (tversky_focal_loss), used only with that loss
    tversky_alpha: float = 0.7     # weight of false negatives
    tversky_beta: float = 0.3      # weight of false positives
    tversky_gamma: float = 4 / 3   # the loss is (1 - Tversky index) ** (1 / gamma)
    val_fraction: float = 0.2
    split: str = "slab"            # "slab" | "volume", see split_slices
    fg_fraction: float = 0.5       # share of tiles centred near a vessel
    balance: str = "pixel"         # tile draws: "pixel" (every labelled pixel alike) or "stack" (every volume alike)
    patience: int = 15             # early stopping: epochs without a better val Dice
    schedule: str = "plateau"       # "plateau": ReduceLROnPlateau on val Dice; "cosine": lr -> min_lr over the epochs
    lr_factor: float = 0.5         # ReduceLROnPlateau
    lr_patience: int = 5
    min_lr: float = 1e-6
    seed: int = 0
    init: str | None = None         # weights file to start from (fine-tuning), else random initialisation
    threshold: float | None = None  # fixed decision threshold; None calibrates it on the validation slices
    num_threads: int | None = None  # torch CPU threads; None leaves torch's setting alone
    workers: int = 0               # processes drawing and augmenting tiles (0: the training process itself)
    device: str = "auto"
    amp: bool = True               # bf16 autocast on CUDA
    augment: bool = True
    aug: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if isinstance(self.init, os.PathLike):   # saved in the weights' metadata, which holds plain values
            self.init = str(self.init)
        self.check()   # a bad setting fails before data are loaded or a folder is made

    def check(self) -> None:
        """ValueError naming the first setting ``train`` cannot use (also run by ``train``: fields may be
        changed after construction)."""
        for name, choices in (("loss", tuple(LOSSES)), ("norm", NORMS), ("schedule", ("plateau", "cosine")),
                              ("split", ("slab", "volume")), ("balance", ("pixel", "stack")),
                              ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: expected one of {', '.join(choices)}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "width", "depth", "patience"):
            _want_int(name, getattr(self, name), 1)
        for name in ("context", "workers", "lr_patience", "seed"):   # a seed < 0 is refused by NumPy's generators
            _want_int(name, getattr(self, name), 0)
        if self.num_threads is not None:
            _want_int("num_threads", self.num_threads, 1, " (None: torch's own setting)")
        if self.threshold is not None:
            _want_float("threshold", self.threshold, lambda v: 0 < v < 1, "in (0, 1)")
        # lr 0 trains nothing: a fine-tuning baseline
        _want_float("lr", self.lr, lambda v: v >= 0, "a finite number >= 0")
        _want_float("weight_decay", self.weight_decay, lambda v: v >= 0, "a finite number >= 0")
        _want_float("min_lr", self.min_lr, lambda v: v >= 0, "a finite number >= 0")
        _want_float("lr_factor", self.lr_factor, lambda v: 0 < v < 1, "in (0, 1) (ReduceLROnPlateau's factor)")
        _want_float("val_fraction", self.val_fraction, lambda v: 0 < v < 1,
                    "in (0, 1) (the share of slices kept to validate on)")
        _want_float("fg_fraction", self.fg_fraction, lambda v: 0 <= v <= 1,
                    "in [0, 1] (the share of tiles centred near a vessel)")
        self._check_tversky()
        for name in ("amp", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.init is not None and not isinstance(self.init, str):
            raise ValueError(f"init must be the path of a weights file or None, got {self.init!r}")
        if not isinstance(self.aug, AugmentConfig):
            raise ValueError(f"aug must be an AugmentConfig, got {type(self.aug).__name__}")
        self._check_tile()
        self.aug.check()

    def _check_tversky(self) -> None:
        _want_float("tversky_alpha", self.tversky_alpha, lambda v: v >= 0, "a finite number >= 0")
        _want_float("tversky_beta", self.tversky_beta, lambda v: v >= 0, "a finite number >= 0")
        _want_float("tversky_gamma", self.tversky_gamma, lambda v: v > 0, "a finite number > 0")
        if self.tversky_alpha == self.tversky_beta == 0:   # the index is then 1 whatever is predicted
            raise ValueError("tversky_alpha and tversky_beta are both 0: the loss would not see a false negative "
                             "or a false positive and teach nothing; expected at least one > 0 (defaults 0.7, 0.3)")
        changed = [k for k in TVERSKY_FIELDS if getattr(self, k) != getattr(TrainConfig, k)]
        if changed and self.loss != "tversky_focal":   # a weight that is silently not used misleads its reader
            raise ValueError(f"{', '.join(f'{k} {getattr(self, k):g}' for k in changed)}: used only by the loss "
                             f"'tversky_focal', and loss is {self.loss!r}; set loss 'tversky_focal' or leave "
                             f"{' and '.join(changed)} at the default")

    def loss_function(self) -> Callable:
        """The loss ``train`` minimises, with this configuration's Tversky weights where they apply."""
        if self.loss != "tversky_focal":
            return LOSSES[self.loss]
        return functools.partial(LOSSES[self.loss], alpha=self.tversky_alpha, beta=self.tversky_beta,
                                 gamma=self.tversky_gamma)

    def _check_tile(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, numbers.Integral) or self.tile < 2 ** self.depth \
                or self.tile % 2 ** self.depth:
            raise ValueError(f"tile must be a multiple of 2**depth = {2 ** self.depth} (the U-Net pools {self.depth} "
                             f"times), got {self.tile!r}")
        if self.norm == "batch" and self.batch_size * (self.tile // 2 ** self.depth) ** 2 < 2:
            # BatchNorm cannot normalise one value per channel (torch refuses it in the first step)
            raise ValueError(f"norm 'batch' with batch_size {self.batch_size} of {self.tile}-pixel tiles leaves one "
                             f"value per channel at the U-Net's bottom level ({self.tile} / 2**depth = 1 pixel); "
                             f"expected batch_size >= 2, tile >= {2 ** (self.depth + 1)}, or norm 'group'")


TVERSKY_FIELDS = ("tversky_alpha", "tversky_beta", "tversky_gamma")


def _want_int(name: str, v, least: int, also: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
        raise ValueError(f"{name} must be an integer >= {least}{also}, got {v!r}")


def _want_float(name: str, v, ok: Callable[[float], bool], what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be {what}, got {v!r}")


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    log_path: Path
    curves_path: Path | None
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict]


LOG_FIELDS = ["epoch", "train_loss", "val_dice", "threshold", "lr", "seconds"]


# finer near 1: a recall-biased loss (Tversky, alpha > beta) often puts the best cut above 0.9
VAL_THRESHOLDS = np.concatenate([np.round(np.arange(0.1, 0.9, 0.05), 2), [0.9, 0.93, 0.95, 0.97, 0.98, 0.99]])


def _validate(model, vols, labs, val_slices, cfg: TrainConfig, device: str) -> tuple[float, float]:
    """(best Dice, its threshold) over all validation slices (summed counts), whole slices through the
    tiled ``predict``. The threshold is calibrated here, on validation slices of the training stacks,
    because losses such as Tversky (alpha > beta) deliberately bias probabilities towards recall, so 0.5
    is rarely the best cut; the chosen value ships in the weights' metadata."""
    # a fixed threshold (cfg.threshold) is scored as is: a slice or two of validation calibrate badly
    thresholds = VAL_THRESHOLDS if cfg.threshold is None else np.array([cfg.threshold])
    tp = np.zeros(len(thresholds))
    ps = np.zeros(len(thresholds))
    ts = 0
    for v in sorted({v for v, _ in val_slices}):
        ks = [k for vv, k in val_slices if vv == v]
        # validation slices are a contiguous run (split_slices); a 2.5-D model gets their real neighbours
        lo, hi = min(cfg.context, ks[0]), min(cfg.context, vols[v].shape[0] - 1 - ks[-1])
        prob = predict(model, vols[v][ks[0] - lo:ks[-1] + 1 + hi], tile=cfg.tile, overlap=cfg.tile // 4,
                       device=torch.device(device), amp=cfg.amp and device == "cuda", halo=(lo, hi),
                       compile=False)   # a few slices per epoch: ~20 s of compiling would not pay back
        t = labs[v][ks] > 0
        ts += int(t.sum())
        for i, thr in enumerate(thresholds):
            p = prob > thr
            tp[i] += int((p & t).sum())
            ps[i] += int(p.sum())
    dice = np.where(ps + ts > 0, 2 * tp / np.maximum(ps + ts, 1), 1.0)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


class _WorkerBatches(torch.utils.data.IterableDataset):
    """One epoch's training batches drawn by DataLoader worker processes. Worker w of n draws every n-th
    batch with its own generator, seeded by (seed, epoch, w): the stream depends on the seed, the epoch and
    the number of workers only, so a run is reproducible and a resumed one draws what it would have drawn."""

    def __init__(self, sampler: TileSampler, cfg: TrainConfig, epoch: int):
        self.sampler, self.cfg, self.epoch = sampler, cfg, epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, w])
        aug = self.cfg.aug if self.cfg.augment else None
        for _ in range(w, self.cfg.steps_per_epoch, n):   # the loader takes them round-robin: in step order
            yield self.sampler.batch(rng, self.cfg.batch_size, aug)


def _epoch_batches(sampler: TileSampler, rng, cfg: TrainConfig, epoch: int, device: str):
    """The epoch's (image, label) batches: drawn here with ``rng``, or by ``cfg.workers`` processes so that a
    GPU is not left waiting for one CPU core's augmentation."""
    if not cfg.workers:
        for _ in range(cfg.steps_per_epoch):
            yield sampler.batch(rng, cfg.batch_size, cfg.aug if cfg.augment else None)
        return
    yield from _Loader(_WorkerBatches(sampler, cfg, epoch), batch_size=None,
                       num_workers=min(cfg.workers, cfg.steps_per_epoch), pin_memory=device == "cuda")


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader without torch's advice against more workers than cores, given twice an epoch: the number
    of workers decides the tiles drawn, so a small machine repeating a GPU recipe (``--workers 7`` on two cores,
    as the shipped model was made) needs that many; they only run slower."""

    def check_worker_number_rationality(self):
        pass


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: nothing learnt from then on is worth saving."""


def _diverged(what: str, epoch: int, step: int, cfg: TrainConfig, lr: float) -> TrainingDiverged:
    kept = (f"best.pt and last.pt of epochs 1-{epoch} are kept; train again in another folder"
            if epoch else "no weights were saved; train again")
    return TrainingDiverged(f"the {what} became NaN or infinite in epoch {epoch + 1}, step {step} of "
                            f"{cfg.steps_per_epoch}, at learning rate {lr:g}: training diverged and stopped "
                            f"({kept} with a lower --lr, Python: lr; the default is 1e-3)")


def _train_epoch(model, opt, sampler, rng, loss_fn, cfg: TrainConfig, device: str, epoch: int = 0,
                 on_step: Callable[[], object] = lambda: None) -> float:
    model.train()
    total = 0.0
    lr = opt.param_groups[0]["lr"]
    for step, (img, lab) in enumerate(_epoch_batches(sampler, rng, cfg, epoch, device), 1):
        img, lab = img.to(device, non_blocking=True), lab.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device == "cuda"):
            logits = model(img)
        loss = loss_fn(logits.float(), lab)
        value = float(loss.detach())   # a sync each step anyway: the epoch's mean needs it
        if not math.isfinite(value):   # its gradients would turn every weight NaN
            raise _diverged("training loss", epoch, step, cfg, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += value
        on_step()
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):   # the last step's update overflowed
        raise _diverged("weights", epoch, cfg.steps_per_epoch, cfg, lr)
    return total / cfg.steps_per_epoch


def _write_log(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def train(images, labels, cfg: TrainConfig, out_dir, progress: bool = True, resume: bool = False,
          overwrite: bool = False, names=None) -> TrainResult:
    """Train a UNet on 2D tiles of (z, y, x) uint8 volumes with 0/1 (or 0/nonzero) labels.

    ``names``: one per volume (e.g. the stack names), used in messages and recorded in the weights' metadata
    (``training_data``: per volume its name, slices and how many of its last slices were validation);
    default ``volume 0``, ``volume 1``, ...

    Writes ``out_dir/best.pt`` (fp16 weights of the best validation Dice, for ``load_weights``),
    ``out_dir/last.pt`` (full state for ``resume=True``), ``out_dir/log.csv`` (one row per epoch) and
    ``out_dir/curves.png``, both rewritten after every epoch. Deterministic for a given seed on the CPU, also across an interruption
    and resume (RNG states are checkpointed). A folder holding a run is refused unless ``resume`` continues
    it or ``overwrite`` replaces it (its run files are removed once the data have been checked).
    """
    out_dir = Path(out_dir)
    device = check_training_setup(cfg, out_dir, resume, overwrite)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    vols, labs = _check_pairs(images, labels)
    names = _volume_names(names, len(vols))
    train_sl, val_sl = split_slices([v.shape[0] for v in vols], cfg.val_fraction, cfg.split)
    if not train_sl or not val_sl:
        held = ", ".join(f"{n} ({_count(v.shape[0], 'slice')})" for n, v in zip(names, vols))
        raise ValueError(f"the split left {len(train_sl)} training and {len(val_sl)} validation slices of {held}; "
                         f"need both: give at least two slices, one to train on and one to validate on "
                         f"(validation takes the last val_fraction, {cfg.val_fraction:g}, of each volume's slices "
                         f"but leaves one for training, so one 2-D image cannot be split)")
    which = (f" (the last {cfg.val_fraction:.0%} of each stack's slices)" if cfg.split == "slab" else "")
    if not any(labs[v][z].any() for v, z in train_sl):   # it would learn that there are no vessels, unwarned
        raise ValueError(f"none of the {len(train_sl)} training slices (all but the {len(val_sl)} validation "
                         f"slices{which}) has a labelled (nonzero) pixel: nothing to learn vessels from")
    if not any(labs[v][z].any() for v, z in val_sl):
        warnings.warn(f"none of the {len(val_sl)} validation slices{which} has a labelled pixel: validation "
                      f"Dice (1 for an empty prediction, 0 otherwise) cannot choose best.pt or calibrate its "
                      f"threshold; label vessels in those slices, or pass "
                      f"--sparse-labels to train and validate on the labelled slices only", stacklevel=2)
    sampler = TileSampler(vols, labs, train_sl, cfg.tile, cfg.fg_fraction, cfg.context, cfg.balance)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = UNet(1 + 2 * cfg.context, 1, cfg.depth, cfg.width, cfg.norm)
    if cfg.init:
        model.load_state_dict(_init_weights(cfg).state_dict())
    with _new_folder(out_dir):   # only now: a refused run (bad data, bad --init) leaves no folder
        if overwrite:
            _remove_run(out_dir)
        return _fit(model, sampler, vols, labs, val_sl, rng, cfg, device, out_dir, progress, resume,
                    _training_data(names, vols, val_sl))


def _volume_names(names, n: int) -> list[str]:
    if names is None:
        return [f"volume {i}" for i in range(n)]
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"names: {len(names)} given for {n} volumes; expected one name per volume")
    return names


def _training_data(names: list[str], vols, val_sl) -> list[dict]:
    """What the weights were trained and validated on, for their metadata (reproducing a model, or knowing
    which stacks a held-out score may not use)."""
    val = collections.Counter(v for v, _ in val_sl)
    return [dict(name=n, slices=int(v.shape[0]), validation_slices=val[i]) for i, (n, v) in enumerate(zip(names, vols))]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


RUN_FILES = ("best.pt", "last.pt", "log.csv")


def check_training_setup(cfg: TrainConfig, out_dir, resume: bool = False, overwrite: bool = False) -> str:
    """What ``train`` can check before it has any data, so that a command fails before minutes of reading
    and preprocessing: the settings, the run folder, the device (returned), the ``init`` weights' architecture
    and, on resume, the settings the run was made with."""
    cfg.check()
    check_run_folder(out_dir, resume, overwrite)
    device = training_device(cfg.device)
    if cfg.init:
        _init_weights(cfg)
    last = Path(out_dir) / "last.pt"
    if resume and last.is_file():
        _check_resumable(last, _read_last(last).get("config", {}), cfg)
    return device


def check_run_folder(out_dir, resume: bool = False, overwrite: bool = False) -> None:
    """ValueError where training into ``out_dir`` would lose a run or cannot continue one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file; expected a folder for the run (best.pt, last.pt, log.csv): "
                         f"give a new folder name")
    if resume and overwrite:
        raise ValueError(f"{out_dir}: resume continues the run there and overwrite replaces it: give one")
    held = [n for n in RUN_FILES if (out_dir / n).is_file()]
    if held and not (resume or overwrite):
        raise ValueError(f"{out_dir}: holds a training run already ({held[0]}); --resume (Python: resume=True) "
                         f"continues it, or give another folder to start anew (nothing there is replaced)")
    if held and resume and "last.pt" not in held:   # starting anew would replace its best.pt and log
        then = (f"start a new run in another folder from its weights with --init {out_dir / 'best.pt'}"
                if "best.pt" in held else "start a new run in another folder")
        raise ValueError(f"{out_dir}: cannot resume, last.pt (the state --resume continues from) is missing and "
                         f"the folder holds {', '.join(held)} of a run; {then}")


def _remove_run(out_dir: Path) -> None:
    """What an earlier run wrote, so that none of it passes for the new run's (``overwrite``)."""
    for name in (*RUN_FILES, "curves.png"):
        (out_dir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _new_folder(path: Path):
    """Make the run folder; a run failing before it wrote anything there (a diverged first epoch, too little
    memory) removes it again, so that the same command can be given again."""
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if made and not any(path.iterdir()):
            path.rmdir()
        raise


def _fit(model, sampler, vols, labs, val_sl, rng, cfg: TrainConfig, device: str, out_dir: Path, progress: bool,
         resume: bool, training_data: list | None = None) -> TrainResult:
    """The epochs of ``train``, from scratch or from ``out_dir/last.pt``."""
    # channels-last from the start: predict (validation) uses it, and a resumed run must compute alike
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience, min_lr=cfg.min_lr)
    state = dict(epoch=0, best_dice=-1.0, best_epoch=0, bad_epochs=0, history=[])
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.csv"
    data = _data_record(vols, labs)
    if resume and last_path.is_file():
        state = _load_last(last_path, model, opt, sched, rng, cfg, data)
        if cfg.schedule == "cosine" and state["epoch"]:   # resumed with more epochs: the next rate on the new curve
            _step_lr(opt, sched, cfg, state["epoch"], state["best_dice"])
    elif resume:
        warnings.warn(f"nothing to resume in {out_dir} (no last.pt): starting a new run", stacklevel=4)

    loss_fn = cfg.loss_function()
    stopped = state["bad_epochs"] >= cfg.patience and state["epoch"] < cfg.epochs
    bar = _progress(progress, cfg, state["epoch"])
    try:   # closed also when interrupted, so that the message after it starts on a line of its own
        for epoch in range(state["epoch"], cfg.epochs):
            if stopped:
                break
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]   # the rate this epoch trains at (the log's lr), before the schedule steps
            bar.set_description(f"train unet, epoch {epoch + 1}/{cfg.epochs}")
            train_loss = _train_epoch(model, opt, sampler, rng, loss_fn, cfg, device, epoch, bar.update)
            bar.set_description(f"train unet, epoch {epoch + 1}/{cfg.epochs}, validating")
            val_dice, threshold = _validate(model, vols, labs, val_sl, cfg, device)
            bar.set_description(f"train unet, epoch {epoch + 1}/{cfg.epochs}")
            _step_lr(opt, sched, cfg, epoch + 1, val_dice)
            row = dict(epoch=epoch + 1, train_loss=train_loss, val_dice=val_dice, threshold=threshold,
                       lr=lr, seconds=round(time.perf_counter() - t0, 3))
            state["history"].append(row)
            state["epoch"] = epoch + 1
            if val_dice > state["best_dice"]:
                state.update(best_dice=val_dice, best_epoch=epoch + 1, bad_epochs=0)
                save_weights(model, best_path, meta=dict(epoch=epoch + 1, val_dice=val_dice, threshold=threshold,
                                                         config=asdict(cfg), training_data=training_data))
            else:
                state["bad_epochs"] += 1
            stopped = state["bad_epochs"] >= cfg.patience and state["epoch"] < cfg.epochs
            # log and curves before last.pt: a run killed in between never has a last.pt ahead of its log,
            # which a resume that finds nothing left to train would not write again
            _write_log(state["history"], log_path)
            # every epoch, so a killed run has them too
            _plot_curves(state["history"], out_dir / "curves.png", cfg.threshold)
            _save_last(last_path, model, opt, sched, rng, state, cfg, data)
            bar.set_postfix(loss=f"{train_loss:.4f}", dice=f"{val_dice:.4f}", best=f"{state['best_dice']:.4f}")
    finally:
        bar.close()
    curves = _plot_curves(state["history"], out_dir / "curves.png", cfg.threshold)
    return TrainResult(best_path, last_path, log_path, curves, state["best_dice"], state["best_epoch"],
                       state["epoch"], stopped, state["history"])


def _init_weights(cfg: TrainConfig) -> UNet:
    """The weights training starts from (fine-tuning on a new microscope's labels); the architectures must
    agree."""
    src = load_weights(cfg.init)
    want = UNet(1 + 2 * cfg.context, 1, cfg.depth, cfg.width, cfg.norm).hparams
    if src.hparams != want:
        diff = {k: (src.hparams.get(k), v) for k, v in want.items() if src.hparams.get(k) != v}
        raise ValueError(f"{cfg.init}: its U-Net differs from the one configured for training "
                         f"(weights vs config: {diff}); set width, depth, norm and context to match (gpuheart train "
                         f"--width, --depth, --norm, --context; in_channels is 2 * context + 1); --finetune {cfg.init} "
                         f"instead of --init takes them from the weights, with the fine-tuning recipe")
    return src


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, desc):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(enabled: bool, cfg: TrainConfig, epochs_done: int):
    """A bar over every training step of the run, not its epochs: with the model card's recipe an epoch takes
    minutes, and a bar that moves once per epoch looks hung."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(desc="train unet", unit="step", total=cfg.epochs * cfg.steps_per_epoch,
                initial=epochs_done * cfg.steps_per_epoch)


def _step_lr(opt, sched, cfg: TrainConfig, epochs_done: int, val_dice: float) -> None:
    """After an epoch: the plateau rule, or the cosine curve's value for the next epoch. The cosine value is
    computed from ``cfg.epochs`` each time, so a run resumed with more epochs stretches its curve."""
    if cfg.schedule == "plateau":
        sched.step(val_dice)
        return
    lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(epochs_done / cfg.epochs, 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr


def _data_record(vols, labs) -> list:
    """Per training volume its shape, pixel sum and labelled voxels: enough to tell other data on resume."""
    return [[list(v.shape), int(v.sum(dtype=np.uint64)), int(np.count_nonzero(lb))] for v, lb in zip(vols, labs)]


def _save_last(path, model, opt, sched, rng, state, cfg, data) -> None:
    _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                  "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                  "state": state, "config": asdict(cfg), "data": data}, path)


# settings a resumed run may change: how long it goes on and where it runs, not what it learns
# (``workers`` changes which tiles are drawn from then on, not from what they are drawn)
RESUMABLE_CHANGES = ("epochs", "patience", "num_threads", "device", "workers")


def _read_last(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # cut short (a full disk), or not a checkpoint: torch's message names neither
        raise ValueError(f"{path}: cannot resume from it, it is unreadable ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]}); start a new run, or one from its weights with "
                         f"--init {Path(path).with_name('best.pt')}") from err


def _check_resumable(path, then: dict, cfg: TrainConfig) -> None:
    """ValueError naming the settings that differ from those the run at ``path`` was made with."""
    now = asdict(cfg)
    # a run from before the Tversky weights were settings trained with their defaults
    then = {**{k: getattr(TrainConfig, k) for k in TVERSKY_FIELDS}, **then}
    changed = {k: (v, now.get(k)) for k, v in then.items() if k not in RESUMABLE_CHANGES and v != now.get(k)}
    if changed:
        diff = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"{path}: cannot resume with different settings ({diff}); use the settings of that run "
                         f"(only {', '.join(RESUMABLE_CHANGES)} may change) or a new output folder")


def _load_last(path, model, opt, sched, rng, cfg: TrainConfig, data: list) -> dict:
    """Restore everything ``_save_last`` wrote; the returned state says where to continue."""
    ckpt = _read_last(path)
    # other data would be scored on other validation slices, so its Dice could not be compared with best.pt's
    if ckpt.get("data", data) != data:
        raise ValueError(f"{path}: cannot resume on other training data than that run's ({len(ckpt['data'])} "
                         f"volumes then, {len(data)} now, or the same number with other shapes, pixels or labels); "
                         f"give the same data (and --sparse-labels, --exclude, --phantom), or start a new run "
                         f"from its weights with --init {Path(path).with_name('best.pt')}")
    _check_resumable(path, ckpt.get("config", {}), cfg)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    rng.bit_generator.state = ckpt["numpy_rng"]
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["state"]


def _plot_curves(rows: list[dict], path: Path, threshold: float | None = None) -> Path | None:
    """PNG of the log: train loss and validation Dice per epoch on their own axes, the best epoch marked and
    each learning-rate change drawn as a dotted line (redrawn every epoch, so a killed run has it too).
    ``threshold``: the fixed one the Dice was scored at (None: calibrated each epoch)."""
    if len(rows) < 1:
        return None
    # a Figure with its own Agg canvas, not pyplot: training must not switch a notebook's backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    dice = [r["val_dice"] for r in rows]
    fig = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(epochs, dice, "o-", ms=3, color="tab:red", label="validation Dice")
    at = "the calibrated threshold" if threshold is None else f"the fixed threshold {threshold:g}"
    ax2.set_ylabel(f"validation Dice (at {at})", color="tab:red")
    ax2.set_ylim(0, 1)
    best = int(np.argmax(dice))
    ax2.plot([epochs[best]], [dice[best]], "*", ms=12, color="tab:red")
    ax2.annotate(f"best {dice[best]:.3f} (epoch {epochs[best]})", (epochs[best], dice[best]),
                 textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    changes = [row for prev, row in zip(rows, rows[1:]) if row["lr"] != prev["lr"]]
    for row in changes if len(changes) <= 6 else []:   # plateau halvings; a cosine curve changes every epoch
        ax.axvline(row["epoch"] - 0.5, color="grey", ls=":", lw=1)
        ax.text(row["epoch"] - 0.5, 0, f" lr {row['lr']:.2g}", rotation=90, va="bottom", fontsize=7, color="grey")
    ax.set_xlim(0.5, max(epochs) + 0.5)
    if len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return path
