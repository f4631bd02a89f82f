"""Deterministic synthetic light-sheet scan of heart tissue with exact ground truth.

The geometry (vessel trees, nerve fibres) is generated once from the seed in physical units (µm) as a
short list of capsules; pixels are produced slab by slab, rasterizing only the capsules whose bounding
box meets the slab, so a 2048x2048 x many-slice scan never sits in memory.

Every random draw that touches pixels is seeded per ``(seed, channel, z)`` and the PSF blur runs on a
slab extended by a halo >= the blur's radius, so ``slab(0, 16)`` equals
``concatenate([slab(0, 5), slab(5, 16)])`` bit for bit.

Axis order is (z, y, x); voxel sizes are (z, y, x) in µm. Channel frames: C00 and C02 are in the
tissue frame; C01 is acquired ``nerve_shift_z`` slices late (C01 slice ``k`` shows tissue slice
``k - nerve_shift_z``), and its truth is given in its own frame.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy.ndimage import gaussian_filter1d

PHANTOM_CHANNELS = {"C00": "vessels", "C01": "nerves", "C02": "autofluorescence"}
_CHANNEL_IDS = list(PHANTOM_CHANNELS)
# Reference volume for the auto vessel/nerve counts: PhantomConfig's own default, 48x256x256 at (4, 1, 1) µm
# (the "default" preset's 32 slices get 4 trees and 4 fibres).
_REF_VOLUME_UM3 = 192.0 * 256.0 * 256.0
_PSF_TRUNCATE = 3.0


@dataclass
class PhantomConfig:
    """Parameters of a synthetic scan. Lengths in µm, intensities in photo-electrons (gain 1 ADU/e-)."""

    shape: tuple[int, int, int] = (48, 256, 256)
    voxel_size: tuple[float, float, float] = (4.0, 1.0, 1.0)
    seed: int = 0
    # geometry
    n_roots: int | None = None  # vessel trees; None scales 6 per _REF_VOLUME_UM3
    n_nerves: int | None = None  # nerve fibres; None scales 6 per _REF_VOLUME_UM3
    vessel_radius_um: float = 8.0  # root radius
    min_radius_um: float | None = None  # capillaries and nerves; None: max(min voxel, max voxel / 2)
    branch_length: float = 8.0  # branch length in units of its radius
    tortuosity: float = 0.15
    max_segments: int = 400_000
    nerve_shift_z: int = 2  # C01 lags C00 by this many slices
    # optics and camera
    psf_sigma_um: tuple[float, float, float] = (3.0, 0.7, 0.7)
    camera_offset: float = 100.0
    read_noise: float = 2.0
    vessel_photons: float = 600.0
    nerve_photons: float = 300.0
    af_photons: float = 80.0  # tissue autofluorescence in C02
    wall_gain: float = 5.0  # the wall is this much brighter than tissue in C02
    wall_bleed: float = 0.1  # fraction of the C02 wall seen in C00
    af_crosstalk: float = 0.12  # fraction of tissue autofluorescence seen in C00 and C01
    # acquisition artefacts
    illumination_falloff: float = 0.5  # the light sheet loses this fraction across x
    vignetting: float = 0.2
    drift: float = 0.3  # slow loss of signal over the depth
    jitter: float = 0.04  # per-slice multiplicative jitter (log-normal sigma)
    dark_slice_at: float | None = 0.6  # fraction of the depth; None (or under 3 slices): no laser dropout
    dark_gain: float = 0.02
    hot_pixels: int | None = None  # None: max(3, 2e-5 of the slice)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PhantomConfig":
        """A named configuration: "tiny" (16x64x64, unit tests), "default" (32x256x256, the input of
        ``gpuheart run``) or "large" (2048x2048 slices for benchmarks; pass ``slices=n`` or ``shape``).
        """
        presets = {
            "tiny": dict(shape=(16, 64, 64), vessel_radius_um=6.0, branch_length=5.0),
            "default": dict(shape=(32, 256, 256)),
            "large": dict(shape=(16, 2048, 2048)),
        }
        if name not in presets:
            raise ValueError(f"unknown phantom preset {name!r}; expected one of {sorted(presets)}")
        kw = dict(presets[name])
        slices = overrides.pop("slices", None)
        kw.update(overrides)
        if slices is not None:
            kw["shape"] = (int(slices),) + tuple(kw.get("shape", cls.shape))[1:]
        return cls(**kw)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.voxel_size = tuple(float(v) for v in self.voxel_size)
        self.psf_sigma_um = tuple(float(v) for v in self.psf_sigma_um)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive ints (z, y, x), got {self.shape}")
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be 3 positive µm values (z, y, x), got {self.voxel_size}")
        if len(self.psf_sigma_um) != 3 or min(self.psf_sigma_um) < 0:
            raise ValueError(f"psf_sigma_um must be 3 µm values >= 0 (z, y, x), got {self.psf_sigma_um}")
        if int(self.seed) < 0:  # NumPy's seeding would say only "expected non-negative integer"
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.dark_slice_at is not None and not 0 <= self.dark_slice_at <= 1:
            raise ValueError(f"dark_slice_at must be a fraction of the depth in [0, 1] or None, got {self.dark_slice_at}")

    @property
    def r_min(self) -> float:
        # A capsule thinner than half the z step would miss every voxel centre between two slices,
        # so the thinnest tubes are half a z voxel (and at least one lateral voxel) in radius.
        if self.min_radius_um is not None:
            return float(self.min_radius_um)
        return max(min(self.voxel_size), max(self.voxel_size) / 2)


# ----------------------------------------------------------------------------------------------
# geometry: capsules in tissue µm coordinates


@dataclass
class Capsules:
    """Tubes as straight capsules ``a -> b`` (µm, z y x) with a radius and a relative brightness."""

    a: np.ndarray  # (n, 3)
    b: np.ndarray  # (n, 3)
    radius: np.ndarray  # (n,)
    value: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.radius)


def _extent(cfg: PhantomConfig) -> np.ndarray:
    """Physical position of the last voxel centre per axis (voxel centres at index * voxel_size)."""
    return (np.array(cfg.shape) - 1) * np.array(cfg.voxel_size)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _zdamp(cfg: PhantomConfig) -> float:
    # In thin slabs (the "large" benchmark preset) trees should wander in-plane, not leave through z.
    ext = _extent(cfg) + np.array(cfg.voxel_size)
    return float(np.clip(1.5 * ext[0] / max(ext[1], ext[2]), 0.05, 1.0))


def _auto_count(cfg: PhantomConfig, per_ref: float) -> int:
    vol = float(np.prod(np.array(cfg.shape) * np.array(cfg.voxel_size)))
    return max(2, int(round(per_ref * vol / _REF_VOLUME_UM3)))


def _entry(rng: np.random.Generator, cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """A start point and an inward direction: on a face of the volume (faces weighted by area) or,
    in thin slabs, mostly inside with an in-plane direction (a vessel arriving from outside the slab)."""
    ext = _extent(cfg) + np.array(cfg.voxel_size)
    zd = _zdamp(cfg)
    pos = rng.uniform(0.15, 0.85, 3) * ext
    if rng.random() > zd:
        return pos, _unit(rng.normal(size=3) * np.array([zd, 1.0, 1.0]))
    areas = np.array([ext[1] * ext[2] * zd**2, ext[0] * ext[2], ext[0] * ext[1]])
    axis = rng.choice(3, p=areas / areas.sum())
    side = rng.integers(2)
    pos[axis] = side * _extent(cfg)[axis]
    normal = np.zeros(3)
    normal[axis] = 1.0 if side == 0 else -1.0
    d = normal + 0.6 * rng.normal(size=3) * np.array([zd, 1.0, 1.0])
    return pos, _unit(d)


def _outside(p: np.ndarray, ext: np.ndarray, margin: float) -> bool:
    return bool(np.any(p < -margin) or np.any(p > ext + margin))


def _turn(rng: np.random.Generator, d: np.ndarray, degrees: float) -> np.ndarray:
    """``d`` rotated by ``degrees`` towards a random perpendicular direction."""
    perp = _unit(np.cross(d, rng.normal(size=3)))
    t = np.deg2rad(degrees)
    return _unit(np.cos(t) * d + np.sin(t) * perp)


def _walk(rng, pos, d, radius, value, n_steps, step, cfg, out, ext, zd) -> tuple[np.ndarray, np.ndarray, bool]:
    """Smooth random walk of ``n_steps`` capsules; returns (end, direction, left_volume)."""
    w = np.zeros(3)
    damp = np.array([zd, 1.0, 1.0])
    for _ in range(n_steps):
        # AR(1) steering noise: the centreline bends smoothly instead of zig-zagging.
        w = 0.8 * w + 0.6 * rng.normal(size=3) * damp
        d = _unit(d + cfg.tortuosity * w * min(step / 4.0, 1.0))
        value = float(np.clip(value * np.exp(0.08 * rng.normal()), 0.3, 1.6))
        nxt = pos + d * step
        out.append((pos, nxt, radius, value))
        pos = nxt
        if _outside(pos, ext, radius):
            return pos, d, True
    return pos, d, False


def _vessel_tree(rng: np.random.Generator, cfg: PhantomConfig, out: list) -> None:
    """One recursively branching tree entering through a face; radii follow Murray's law r^3 = r1^3 + r2^3."""
    ext, zd, r_min = _extent(cfg), _zdamp(cfg), cfg.r_min
    pos, d = _entry(rng, cfg)
    r0 = max(r_min, cfg.vessel_radius_um * rng.uniform(0.85, 1.0))
    stack = [(pos, d, r0, rng.uniform(0.7, 1.3))]
    while stack and len(out) < cfg.max_segments:
        pos, d, r, val = stack.pop()
        step = float(np.clip(0.8 * r, 2.0, 6.0))
        n_steps = max(3, int(cfg.branch_length * r * rng.uniform(0.6, 1.4) / step))
        pos, d, left = _walk(rng, pos, d, r, val, n_steps, step, cfg, out, ext, zd)
        if left or r <= r_min * 1.01:
            continue
        r1 = max(r_min, r * rng.uniform(0.72, 0.9))
        r2 = max(r_min, (max(r**3 - r1**3, 0.0)) ** (1 / 3))
        val = out[-1][3]
        stack.append((pos, _turn(rng, d, rng.uniform(30, 75)), r2, val * rng.uniform(0.8, 1.1)))
        stack.append((pos, _turn(rng, d, rng.uniform(5, 25)), r1, val))


def _nerve(rng: np.random.Generator, cfg: PhantomConfig, out: list) -> None:
    """A long thin fibre crossing the volume, with at most one side branch."""
    ext, zd = _extent(cfg), _zdamp(cfg)
    pos, d = _entry(rng, cfg)
    r = cfg.r_min
    n_steps = int(2.0 * ext.max() / 4.0) + 1
    cfg_n = replace(cfg, tortuosity=cfg.tortuosity * 0.4)
    fork = rng.integers(n_steps // 4, n_steps // 2 + 1) if rng.random() < 0.4 else n_steps
    end, d2, left = _walk(rng, pos, d, r, 1.0, fork, 4.0, cfg_n, out, ext, zd)
    if not left and fork < n_steps:
        _walk(rng, end, _turn(rng, d2, 35), r, 0.8, n_steps - fork, 4.0, cfg_n, out, ext, zd)
        _walk(rng, end, d2, r, 1.0, n_steps - fork, 4.0, cfg_n, out, ext, zd)


def _pack(rows: list) -> Capsules:
    if not rows:
        z = np.zeros((0, 3))
        return Capsules(z, z.copy(), np.zeros(0), np.zeros(0))
    return Capsules(
        a=np.array([r[0] for r in rows], dtype=np.float64),
        b=np.array([r[1] for r in rows], dtype=np.float64),
        radius=np.array([r[2] for r in rows], dtype=np.float64),
        value=np.array([r[3] for r in rows], dtype=np.float64),
    )


def vessel_capsules(cfg: PhantomConfig) -> Capsules:
    """The vessel trees of ``cfg`` in tissue µm coordinates (deterministic in ``cfg.seed``)."""
    rng = np.random.default_rng([cfg.seed, 1001])
    rows: list = []
    n = cfg.n_roots if cfg.n_roots is not None else _auto_count(cfg, 6.0)
    for _ in range(n):
        _vessel_tree(rng, cfg, rows)
    return _pack(rows[: cfg.max_segments])


def nerve_capsules(cfg: PhantomConfig) -> Capsules:
    """The nerve fibres of ``cfg`` in tissue µm coordinates."""
    rng = np.random.default_rng([cfg.seed, 1002])
    rows: list = []
    n = cfg.n_nerves if cfg.n_nerves is not None else _auto_count(cfg, 6.0)
    for _ in range(n):
        _nerve(rng, cfg, rows)
    return _pack(rows)


# ----------------------------------------------------------------------------------------------
# rasterization


@dataclass
class _Raster:
    """Capsules in one channel frame with their voxel bounding boxes, ready to rasterize by slab."""

    caps: Capsules
    lo: np.ndarray  # (n, 3) first voxel index that may be inside
    hi: np.ndarray  # (n, 3) one past the last

    @classmethod
    def build(cls, caps: Capsules, cfg: PhantomConfig, shift_z: int) -> "_Raster":
        vs = np.array(cfg.voxel_size)
        off = np.array([shift_z * vs[0], 0.0, 0.0])
        caps = Capsules(caps.a + off, caps.b + off, caps.radius, caps.value)
        r = caps.radius[:, None]
        lo = np.ceil((np.minimum(caps.a, caps.b) - r) / vs - 1e-9).astype(np.int64)
        hi = np.floor((np.maximum(caps.a, caps.b) + r) / vs + 1e-9).astype(np.int64) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.array(cfg.shape))
        keep = np.all(hi > lo, axis=1)
        sel = Capsules(caps.a[keep], caps.b[keep], caps.radius[keep], caps.value[keep])
        return cls(sel, lo[keep], hi[keep])

    def render(self, z0: int, z1: int, shape_yx, vs, values: bool) -> np.ndarray:
        """Inside mask (bool) or brightness (float32, max over capsules) of slices [z0, z1)."""
        out = np.zeros((z1 - z0,) + tuple(shape_yx), dtype=np.float32 if values else bool)
        hits = np.nonzero((self.lo[:, 0] < z1) & (self.hi[:, 0] > z0))[0]
        c = self.caps
        for i in hits:
            lo = np.maximum(self.lo[i], (z0, 0, 0))
            hi = np.minimum(self.hi[i], (z1,) + tuple(shape_yx))
            # voxel centres relative to a, as an open grid
            pz = (np.arange(lo[0], hi[0]) * vs[0] - c.a[i, 0])[:, None, None]
            py = (np.arange(lo[1], hi[1]) * vs[1] - c.a[i, 1])[None, :, None]
            px = (np.arange(lo[2], hi[2]) * vs[2] - c.a[i, 2])[None, None, :]
            d = c.b[i] - c.a[i]
            dd = float(d @ d)
            proj = pz * d[0] + py * d[1] + px * d[2]
            t = np.clip(proj / dd, 0.0, 1.0) if dd > 0 else np.zeros_like(proj)
            dist2 = pz * pz + py * py + px * px - 2 * t * proj + t * t * dd
            inside = dist2 <= c.radius[i] ** 2
            box = out[lo[0] - z0 : hi[0] - z0, lo[1] : hi[1], lo[2] : hi[2]]
            if values:
                np.maximum(box, np.where(inside, np.float32(c.value[i]), np.float32(0)), out=box)
            else:
                box |= inside
        return out


# ----------------------------------------------------------------------------------------------
# the phantom


def _sinusoid_field(rng: np.random.Generator, n: int, wavelengths=(60.0, 300.0)):
    """Random plane waves (k in rad/µm, phase, amplitude) for a smooth tissue texture."""
    k = []
    for _ in range(n):
        direction = _unit(rng.normal(size=3))
        k.append((direction * 2 * np.pi / rng.uniform(*wavelengths), rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1)))
    return k


class Phantom:
    """A synthetic 3-channel light-sheet scan (uint16) with exact vessel and nerve ground truth."""

    def __init__(self, cfg: PhantomConfig | None = None):
        self.cfg = cfg = cfg or PhantomConfig()
        self.shape = cfg.shape
        self.voxel_size = cfg.voxel_size
        self.channels = list(_CHANNEL_IDS)
        self.dtype = np.dtype(np.uint16)
        self.shift_z = {"C00": 0, "C01": int(cfg.nerve_shift_z), "C02": 0}
        self.vessels = vessel_capsules(cfg)
        self.nerves = nerve_capsules(cfg)
        self._raster = {
            "C00": _Raster.build(self.vessels, cfg, 0),
            "C01": _Raster.build(self.nerves, cfg, self.shift_z["C01"]),
        }
        # scipy's reach, int(truncate * sigma + 0.5), with sigma computed first as _blur passes it: in another
        # order the rounding can fall one slice short (e.g. 0.7 um blur at 1.4 um slices)
        self.halo = int(_PSF_TRUNCATE * (cfg.psf_sigma_um[0] / cfg.voxel_size[0]) + 0.5)
        self._setup_tissue()
        self._illumination = self._make_illumination()
        self._hot = self._make_hot_pixels()

    # -- public -------------------------------------------------------------------------------

    def slab(self, channel, z0: int, z1: int) -> np.ndarray:
        """Slices [z0, z1) of ``channel`` ("C00"/"C01"/"C02" or 0/1/2) as uint16 (z1-z0, y, x)."""
        ch = self._channel(channel)
        z0, z1 = self._check_range(z0, z1)
        a, b = max(0, z0 - self.halo), min(self.shape[0], z1 + self.halo)
        clean = self._blur(self._clean(ch, a, b))[z0 - a : z1 - a]
        out = np.empty((z1 - z0,) + self.shape[1:], dtype=np.uint16)
        for k, z in enumerate(range(z0, z1)):
            out[k] = self._acquire(ch, z, clean[k])
        return out

    def truth(self, channel, z0: int, z1: int) -> np.ndarray:
        """Exact ground truth of slices [z0, z1) in the channel's own frame: True where the voxel
        centre lies inside a vessel (C00) or nerve (C01) capsule. C02 has none (ValueError)."""
        ch = self._channel(channel)
        if ch not in self._raster:
            raise ValueError(f"channel {ch} ({PHANTOM_CHANNELS[ch]}) has no ground truth; use C00 or C01")
        z0, z1 = self._check_range(z0, z1)
        return self._raster[ch].render(z0, z1, self.shape[1:], self.voxel_size, values=False)

    def iter_slabs(self, channel, slab_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(z0, z1, slab)`` covering the whole depth in order."""
        for z0 in range(0, self.shape[0], int(slab_size)):
            z1 = min(self.shape[0], z0 + int(slab_size))
            yield z0, z1, self.slab(channel, z0, z1)

    def read_slice(self, channel, z: int) -> np.ndarray:
        """One slice (y, x) of ``channel``."""
        return self.slab(channel, z, z + 1)[0]

    read_slab = slab

    def dark_slice(self) -> int | None:
        """Index of the laser-dropout slice, or None (also in stacks under 3 slices)."""
        # a dropout is one dark slice between bright ones; in a 1-slice scan it would be the whole scan
        if self.cfg.dark_slice_at is None or self.shape[0] < 3:
            return None
        return min(self.shape[0] - 1, int(round(self.cfg.dark_slice_at * (self.shape[0] - 1))))

    def hot_pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y, x, value) of the camera's hot pixels (the same in every slice and channel)."""
        return self._hot

    # -- internals ------------------------------------------------------------------------------

    def _channel(self, channel) -> str:
        if isinstance(channel, (int, np.integer)) and 0 <= channel < len(self.channels):
            return self.channels[int(channel)]
        if channel in PHANTOM_CHANNELS:
            return channel
        raise ValueError(f"unknown phantom channel {channel!r}; expected one of {self.channels}")

    def _check_range(self, z0, z1) -> tuple[int, int]:
        z0, z1 = int(z0), int(z1)
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise ValueError(f"slab [{z0}, {z1}) outside the phantom's {self.shape[0]} slices")
        return z0, z1

    def _setup_tissue(self) -> None:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1003])
        ext = _extent(cfg) + np.array(cfg.voxel_size)
        self._waves = _sinusoid_field(rng, 6)
        # The heart wall: an ellipsoid shell whose centre lies outside the field of view, so the
        # wall crosses the volume as a curved band that moves laterally with z.
        self._centre = ext * np.array([rng.uniform(0.2, 0.4), -0.35, rng.uniform(0.35, 0.65)])
        self._axes = ext * np.array([1.0, 0.85, 0.95])
        self._wall_um = 0.05 * min(ext[1], ext[2]) + 6.0

    def _autofluorescence(self, a: int, b: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, wall) fields of slices [a, b) of a frame lagging ``shift`` slices; float32."""
        vs = self.voxel_size
        z = (np.arange(a, b) - shift) * vs[0]
        y = np.arange(self.shape[1]) * vs[1]
        x = np.arange(self.shape[2]) * vs[2]
        # sin(kz z + ky y + kx x + p) = sin(u) cos(kx x) + cos(u) sin(kx x) with u = kz z + ky y + p:
        # per slice the texture is one small matrix product (y, 2K) @ (2K, x), cheap even at 2048^2.
        kx = np.array([k[2] for k, _, _ in self._waves])
        amp = np.array([m for _, _, m in self._waves])
        right = np.concatenate([np.cos(np.outer(kx, x)), np.sin(np.outer(kx, x))]).astype(np.float32)
        c, ax = self._centre, self._axes
        ry = (((y - c[1]) / ax[1]) ** 2).astype(np.float32)[:, None]
        rx = (((x - c[2]) / ax[2]) ** 2).astype(np.float32)[None, :]
        tissue = np.empty((b - a,) + self.shape[1:], dtype=np.float32)
        wall = np.empty_like(tissue)
        for i, zi in enumerate(z):
            u = np.stack([k[0] * zi + k[1] * y + ph for k, ph, _ in self._waves], axis=1)  # (y, K)
            left = np.concatenate([amp * np.sin(u), amp * np.cos(u)], axis=1).astype(np.float32)
            tex = left @ right
            rho = np.sqrt(ry + rx + np.float32(((zi - c[0]) / ax[0]) ** 2))
            d_um = (rho - np.float32(1.0)) * np.float32(ax[1])
            # dim lumen inside the ellipsoid, tissue outside; the wall is a band around its surface
            tissue[i] = (0.675 + 0.325 * np.tanh(d_um / np.float32(20.0))) * (1 + np.float32(0.12) * tex)
            wall[i] = np.exp(-((d_um / np.float32(self._wall_um)) ** 2)) * (1 + np.float32(0.2) * tex)
        return tissue, wall

    def _clean(self, ch: str, a: int, b: int) -> np.ndarray:
        """Noise-free photon signal of slices [a, b) before the PSF."""
        cfg = self.cfg
        shape_yx, vs = self.shape[1:], self.voxel_size
        tissue, wall = self._autofluorescence(a, b, self.shift_z[ch])
        if ch == "C02":
            return cfg.af_photons * (tissue + cfg.wall_gain * wall)
        sig = cfg.af_crosstalk * cfg.af_photons * tissue
        if ch == "C00":
            sig += cfg.wall_bleed * cfg.wall_gain * cfg.af_photons * wall
            sig += cfg.vessel_photons * self._raster[ch].render(a, b, shape_yx, vs, values=True)
        else:
            sig += cfg.af_crosstalk * cfg.wall_gain * cfg.af_photons * wall
            sig += cfg.nerve_photons * self._raster[ch].render(a, b, shape_yx, vs, values=True)
        return sig.astype(np.float32)

    def _blur(self, vol: np.ndarray) -> np.ndarray:
        # Per-line 1-D passes: the result of a voxel depends only on its neighbours within the
        # truncation radius, so a slab with a full halo reproduces the whole-volume blur exactly.
        for axis, (s, v) in enumerate(zip(self.cfg.psf_sigma_um, self.voxel_size)):
            if s > 0 and vol.shape[axis] > 1:
                vol = gaussian_filter1d(vol, s / v, axis=axis, mode="reflect", truncate=_PSF_TRUNCATE)
        return vol

    def _make_illumination(self) -> np.ndarray:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1004])
        ny, nx = self.shape[1:]
        y = np.linspace(-1, 1, ny)[:, None]
        x = np.linspace(0, 1, nx)[None, :]
        # the sheet enters from x = 0 and is absorbed along x; shadows make stripes along x
        sheet = 1.0 - cfg.illumination_falloff * (1 - np.exp(-2.5 * x)) / (1 - np.exp(-2.5))
        vignette = 1.0 - cfg.vignetting * (y**2 + (2 * x - 1) ** 2) / 2
        stripes = 1.0 - 0.06 * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(6, 12) * y + rng.uniform(0, 6.3)))
        return (sheet * vignette * stripes).astype(np.float32)

    def _make_hot_pixels(self):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1005])
        ny, nx = self.shape[1:]
        n = cfg.hot_pixels if cfg.hot_pixels is not None else max(3, int(2e-5 * ny * nx))
        n = min(n, ny * nx)
        flat = rng.choice(ny * nx, size=n, replace=False)
        return flat // nx, flat % nx, rng.integers(4000, 60000, size=n).astype(np.uint16)

    def _gain(self, ch: str, z: int, rng: np.random.Generator) -> float:
        """Slice gain: slow trend with depth, a slow wobble, per-slice jitter, laser dropout."""
        cfg = self.cfg
        nz = max(self.shape[0] - 1, 1)
        ci = self.channels.index(ch)
        g = (1.0 - cfg.drift * z / nz) * (1.0 + 0.05 * np.sin(2 * np.pi * z / (0.7 * nz + 1) + ci))
        g *= float(np.exp(cfg.jitter * rng.standard_normal()))
        if z == self.dark_slice():
            g *= cfg.dark_gain
        return g

    def _acquire(self, ch: str, z: int, clean: np.ndarray) -> np.ndarray:
        """Camera model for one slice: illumination x gain, Poisson, read noise, offset, hot pixels."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.channels.index(ch), z])
        photons = clean * self._illumination * np.float32(self._gain(ch, z, rng))
        counts = rng.poisson(np.maximum(photons, 0)).astype(np.float32)
        counts += rng.standard_normal(counts.shape, dtype=np.float32) * np.float32(cfg.read_noise)
        counts += np.float32(cfg.camera_offset)
        img = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
        hy, hx, hv = self._hot
        img[hy, hx] = np.maximum(img[hy, hx], hv)
        return img


# ----------------------------------------------------------------------------------------------
# writing a LaVision-style folder


def _ome_metadata(voxel_size) -> dict:
    vz, vy, vx = voxel_size
    return {
        "axes": "YX",
        "PhysicalSizeX": vx, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": vy, "PhysicalSizeYUnit": "µm",
        "PhysicalSizeZ": vz, "PhysicalSizeZUnit": "µm",
    }


def write_phantom(cfg: PhantomConfig, folder, prefix: str = "phantom", progress: bool = False,
                  *, slab_size: int = 8, overwrite: bool = False) -> Path:
    """Write the phantom of ``cfg`` to ``folder`` and return ``folder``.

    Layout: ``scan/`` one OME-TIFF per channel per slice with LaVision names (voxel size in the OME
    metadata), ``truth/C00.tif`` and ``truth/C01.tif`` (multi-page uint8, 0/255), ``phantom.json``.
    Built in ``<folder>.partial`` and renamed into place, streaming ``slab_size`` slices at a time.
    An existing ``folder`` is an error unless ``overwrite``.
    """
    import tifffile

    from .io import lavision_filename

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; give --overwrite (in Python: overwrite=True) to replace it")
    if folder.exists() or folder.is_symlink():
        _check_replaceable(folder)
    _check_size(cfg, folder, slab_size)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "scan").mkdir(parents=True)
    (tmp / "truth").mkdir()
    ph = Phantom(cfg)
    bar = _progress_bar(progress, 3 * ph.shape[0] + 2 * ph.shape[0])
    meta = _ome_metadata(ph.voxel_size)
    for c, ch in enumerate(ph.channels):
        for z0, z1, data in ph.iter_slabs(ch, slab_size):
            for k in range(z1 - z0):
                tifffile.imwrite(tmp / "scan" / lavision_filename(prefix, c, z0 + k), data[k], metadata=meta)
                bar.update(1)
    for ch in ("C00", "C01"):
        pages = _truth_pages(ph, ch, slab_size, bar)
        # OME, for the voxel size: meshed or scored on its own, the truth has the scan's µm
        with tifffile.TiffWriter(tmp / "truth" / f"{ch}.tif", ome=True) as tw:
            tw.write(pages, shape=ph.shape, dtype=np.uint8, photometric="minisblack",
                     metadata={**_ome_metadata(ph.voxel_size), "axes": "ZYX"})
    info = {
        "config": asdict(cfg),
        "channels": PHANTOM_CHANNELS,
        "shape": list(ph.shape),
        "voxel_size": list(ph.voxel_size),
        "channel_shift_z": ph.shift_z,
        "dark_slice": ph.dark_slice(),
        "prefix": prefix,
    }
    (tmp / "phantom.json").write_text(json.dumps(info, indent=2))
    bar.close()
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


_PHANTOM_ENTRIES = {"scan", "truth", "phantom.json"}


def _check_replaceable(folder: Path) -> None:
    """``overwrite`` replaces a synthetic scan written earlier, never a folder of anything else (a mistyped
    OUT would otherwise be deleted whole)."""
    if not folder.is_dir() or folder.is_symlink():
        raise FileExistsError(f"{folder}: exists and is not a folder; expected a folder for the synthetic scan "
                              f"(a new one, or one gpuheart phantom wrote, to replace)")
    entries = {p.name for p in folder.iterdir()}
    if "phantom.json" not in entries or not entries <= _PHANTOM_ENTRIES:
        extra = sorted(entries - _PHANTOM_ENTRIES) or ["no phantom.json"]
        raise FileExistsError(f"{folder}: not a synthetic scan gpuheart wrote ({', '.join(extra[:3])}"
                              f"{', ...' if len(extra) > 3 else ''}), so --overwrite does not replace it; "
                              f"expected a new folder or one holding only scan/, truth/ and phantom.json")


def _check_size(cfg: PhantomConfig, folder: Path, slab_size: int) -> None:
    """A shape mistyped by a few zeros ran for hours without a word, or filled the disk; refused up front."""
    z, y, x = (int(v) for v in cfg.shape)
    disk = z * y * x * (3 * 2 + 2)   # three uint16 channels and two uint8 truths
    # a slab's float64 fields (vessel distance, noise, blur): about 48 bytes a voxel at the peak
    slab = min(slab_size, z) * y * x * 48
    parent = next((p for p in [folder.parent, *folder.parent.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free
    ram = _available_memory()
    if disk > free:
        raise ValueError(f"{folder}: a synthetic scan of shape {(z, y, x)} needs about {disk / 2**30:.1f} GiB on "
                         f"disk, and {parent} has {free / 2**30:.1f} GiB free; expected a smaller --shape")
    if ram is not None and slab > ram // 2:
        raise ValueError(f"synthetic scan shape {(z, y, x)}: its slices of {y} x {x} need about "
                         f"{slab / 2**30:.1f} GiB of memory per slab, more than half of the {ram / 2**30:.1f} GiB "
                         f"available; expected a smaller --shape")


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):   # not POSIX
        return None


def _truth_pages(ph: Phantom, ch: str, slab_size: int, bar) -> Iterator[np.ndarray]:
    for z0 in range(0, ph.shape[0], slab_size):
        z1 = min(ph.shape[0], z0 + slab_size)
        t = ph.truth(ch, z0, z1)
        for k in range(z1 - z0):
            bar.update(1)
            yield t[k].astype(np.uint8) * np.uint8(255)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="phantom", unit="slice")
