import json
import time
from dataclasses import replace

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from gpuheart.io import lavision_filename
from gpuheart.phantom import PHANTOM_CHANNELS, Phantom, PhantomConfig, write_phantom


@pytest.fixture(scope="module")
def tiny():
    return Phantom(PhantomConfig.preset("tiny"))


@pytest.fixture(scope="module")
def default():
    return Phantom(PhantomConfig.preset("default"))


def test_api_shape_dtype(tiny):
    assert tiny.shape == (16, 64, 64)
    assert tiny.voxel_size == (4.0, 1.0, 1.0)
    assert tiny.channels == ["C00", "C01", "C02"] == list(PHANTOM_CHANNELS)
    assert tiny.dtype == np.uint16
    for ch in tiny.channels:
        s = tiny.slab(ch, 3, 7)
        assert s.dtype == np.uint16 and s.shape == (4, 64, 64)
    assert tiny.truth("C00", 0, 16).dtype == bool
    assert tiny.truth("C01", 2, 5).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="no ground truth"):
        tiny.truth("C02", 0, 4)
    with pytest.raises(ValueError):
        tiny.slab("C00", 10, 17)
    assert np.array_equal(tiny.slab(1, 0, 2), tiny.slab("C01", 0, 2))


def test_presets_and_overrides():
    assert PhantomConfig.preset("default").shape == (32, 256, 256)
    large = PhantomConfig.preset("large", slices=5, seed=3)
    assert large.shape == (5, 2048, 2048) and large.seed == 3
    with pytest.raises(ValueError, match="unknown phantom preset"):
        PhantomConfig.preset("huge")


def test_determinism_and_seed():
    cfg = PhantomConfig.preset("tiny")
    a, b = Phantom(cfg), Phantom(cfg)
    for ch in ("C00", "C01", "C02"):
        assert a.slab(ch, 0, 16).tobytes() == b.slab(ch, 0, 16).tobytes()
    assert np.array_equal(a.truth("C00", 0, 16), b.truth("C00", 0, 16))
    c = Phantom(replace(cfg, seed=1))
    assert not np.array_equal(a.slab("C00", 0, 16), c.slab("C00", 0, 16))
    assert not np.array_equal(a.truth("C00", 0, 16), c.truth("C00", 0, 16))


@pytest.mark.parametrize("ch", ["C00", "C01", "C02"])
def test_partition_invariance(tiny, ch):
    whole = tiny.slab(ch, 0, 16)
    # cuts next to the volume ends and a single-slice slab exercise the halo clipping
    parts = np.concatenate([tiny.slab(ch, 0, 1), tiny.slab(ch, 1, 5), tiny.slab(ch, 5, 6), tiny.slab(ch, 6, 16)])
    assert np.array_equal(whole, parts)
    it = np.concatenate([s for _, _, s in tiny.iter_slabs(ch, 3)])
    assert np.array_equal(whole, it)
    assert [(z0, z1) for z0, z1, _ in tiny.iter_slabs(ch, 7)] == [(0, 7), (7, 14), (14, 16)]
    if ch != "C02":
        t = tiny.truth(ch, 0, 16)
        assert np.array_equal(t, np.concatenate([tiny.truth(ch, 0, 7), tiny.truth(ch, 7, 16)]))


def test_truth_matches_capsules(tiny):
    """Brute force over every voxel centre for a few capsules: truth is exactly 'centre inside'."""
    t = tiny.truth("C00", 0, 16)
    vs = np.array(tiny.voxel_size)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * v for n, v in zip(tiny.shape, vs)], indexing="ij")
    p = np.stack([zz, yy, xx], -1).reshape(-1, 3)
    inside = np.zeros(len(p), bool)
    caps = tiny.vessels
    for a, b, r in zip(caps.a, caps.b, caps.radius):
        d = b - a
        s = np.clip((p - a) @ d / (d @ d), 0, 1)
        inside |= np.sum((p - a - s[:, None] * d) ** 2, axis=1) <= r * r
    assert np.array_equal(t.reshape(-1), inside)


def test_vessel_radii_and_border(default):
    caps = default.vessels
    cfg = default.cfg
    assert caps.radius.max() == pytest.approx(cfg.vessel_radius_um, rel=0.16)
    assert caps.radius.min() == pytest.approx(cfg.r_min)
    t = default.truth("C00", 0, default.shape[0])
    assert 0.003 < t.mean() < 0.15
    # in-plane distance to the background (lateral voxels are 1 µm): thick trunks and thin capillaries
    edt = np.stack([ndimage.distance_transform_edt(s) for s in t])
    assert 6.0 <= edt.max() <= 10.0
    assert np.mean(edt[t] <= 2.5) > 0.3
    # some branches leave through the lateral faces
    faces = [t[:, 0], t[:, -1], t[:, :, 0], t[:, :, -1]]
    assert sum(f.any() for f in faces) >= 2
    # the tree is branched: many separate pieces per slice, few in 3D
    n3d = ndimage.label(t)[1]
    assert n3d < sum(ndimage.label(s)[1] for s in t) / 5


def test_nerves_thin_and_long(default):
    t = default.truth("C01", 0, default.shape[0])
    assert t.any()
    edt = np.stack([ndimage.distance_transform_edt(s) for s in t])
    assert edt.max() <= 4.0
    lengths = np.linalg.norm(default.nerves.b - default.nerves.a, axis=1).sum()
    assert lengths > 2 * max(default.shape[1:])


def test_vessels_brighter_than_background(tiny):
    img = tiny.slab("C00", 0, 16).astype(float)
    t = tiny.truth("C00", 0, 16)
    t[tiny.dark_slice()] = False
    bg = img[~ndimage.binary_dilation(t, iterations=3)]
    sigma = 1.4826 * np.median(np.abs(bg - np.median(bg)))  # robust: hot pixels would dominate std
    assert np.median(img[t]) - np.median(bg) > 5 * sigma
    assert 90 < np.median(bg) < 160  # camera offset ~100 plus a little autofluorescence


def test_dark_slice(tiny):
    z = tiny.dark_slice()
    assert z == round(0.6 * 15)
    s = tiny.slab("C02", z - 1, z + 2).reshape(3, -1)
    level = np.median(s, axis=1) - tiny.cfg.camera_offset
    assert level[1] < 0.1 * min(level[0], level[2])


def test_hot_pixels(tiny):
    hy, hx, hv = tiny.hot_pixels()
    assert len(hy) >= 3
    for ch in tiny.channels:
        s = tiny.slab(ch, 0, 16)
        assert np.all(s[:, hy, hx] >= hv)
        assert np.all(s[:, hy, hx] >= 4000)


def test_channel_z_shift_geometry():
    cfg = PhantomConfig.preset("tiny", nerve_shift_z=2)
    shifted, aligned = Phantom(cfg), Phantom(replace(cfg, nerve_shift_z=0))
    assert np.array_equal(shifted.truth("C01", 2, 16), aligned.truth("C01", 0, 14))
    assert not np.array_equal(shifted.truth("C01", 0, 16), aligned.truth("C01", 0, 16))


def test_channel_z_shift_visible(default):
    """The autofluorescent wall seen in C01 lags C02 by nerve_shift_z slices."""
    nz, offset = default.shape[0], default.cfg.camera_offset

    def prep(ch):
        v = ndimage.uniform_filter(default.slab(ch, 0, nz).astype(np.float32), (1, 9, 9)) - offset
        v = np.log(np.maximum(v, 1))
        # remove what does not move with z: illumination (per pixel) and slice gain (per slice)
        v -= v.mean(axis=0)
        v -= v.mean(axis=(1, 2), keepdims=True)
        v[default.dark_slice()] = np.nan
        return v

    c1, c2 = prep("C01"), prep("C02")

    def score(s):
        a, b = c1[s + 8 : nz - 8 + s], c2[8 : nz - 8]
        ok = ~(np.isnan(a[:, 0, 0]) | np.isnan(b[:, 0, 0]))
        a, b = a[ok].ravel(), b[ok].ravel()
        return a @ b / np.sqrt((a @ a) * (b @ b))

    scores = {s: score(s) for s in range(-5, 6)}
    assert max(scores, key=scores.get) == default.cfg.nerve_shift_z


def test_slice_drift():
    cfg = PhantomConfig.preset("tiny", dark_slice_at=None, read_noise=0.0)
    flat = Phantom(replace(cfg, drift=0.0, jitter=0.0))
    drifting = Phantom(cfg)
    m0 = flat.slab("C02", 0, 16).mean(axis=(1, 2)) - cfg.camera_offset
    m1 = drifting.slab("C02", 0, 16).mean(axis=(1, 2)) - cfg.camera_offset
    ratio = m1 / m0
    slope = np.polyfit(np.arange(16) / 15, ratio, 1)[0]
    assert slope < -0.6 * cfg.drift
    resid = ratio - np.polyval(np.polyfit(np.arange(16), ratio, 2), np.arange(16))
    assert resid.std() > 0.01  # per-slice jitter on top of the trend


def test_uneven_illumination(tiny):
    cfg = tiny.cfg
    s = tiny.slab("C02", 0, 16).astype(float) - cfg.camera_offset
    flat = Phantom(replace(cfg, illumination_falloff=0.0, vignetting=0.0)).slab("C02", 0, 16) - cfg.camera_offset
    ratio = s.sum(axis=(0, 1)) / flat.sum(axis=(0, 1))
    # the light sheet enters at x = 0 and fades across the field
    assert ratio[:8].mean() > ratio[-8:].mean() + 0.2


def test_write_phantom_round_trip(tmp_path):
    cfg = PhantomConfig.preset("tiny", shape=(6, 32, 40))
    out = write_phantom(cfg, tmp_path / "ph", prefix="mouse")
    assert out == tmp_path / "ph" and not (tmp_path / "ph.partial").exists()
    files = sorted(p.name for p in (out / "scan").iterdir())
    assert len(files) == 3 * 6
    assert lavision_filename("mouse", 2, 5) in files
    ph = Phantom(cfg)
    with tifffile.TiffFile(out / "scan" / lavision_filename("mouse", 0, 3)) as tf:
        assert tf.is_ome
        px = tf.ome_metadata
        assert np.array_equal(tf.asarray(), ph.slab("C00", 3, 4)[0])
    for key, v in (("PhysicalSizeZ", 4.0), ("PhysicalSizeY", 1.0), ("PhysicalSizeX", 1.0)):
        assert f'{key}="{v}"' in px
    truth = tifffile.imread(out / "truth" / "C00.tif")
    assert truth.shape == (6, 32, 40) and truth.dtype == np.uint8
    assert np.array_equal(truth == 255, ph.truth("C00", 0, 6))
    assert set(np.unique(truth)) <= {0, 255}
    info = json.loads((out / "phantom.json").read_text())
    assert info["channels"] == PHANTOM_CHANNELS and info["shape"] == [6, 32, 40]
    assert PhantomConfig(**info["config"]) == cfg
    with pytest.raises(FileExistsError):
        write_phantom(cfg, out)
    write_phantom(replace(cfg, seed=5), out, overwrite=True)
    assert json.loads((out / "phantom.json").read_text())["config"]["seed"] == 5
    from gpuheart.io import open_scan

    with open_scan(out / "truth" / "C00.tif") as t:   # the scan's µm: meshed on its own, the truth is to scale
        assert t.voxel_size == (4.0, 1.0, 1.0)


def test_overwrite_replaces_only_a_synthetic_scan_and_huge_shapes_are_refused(tmp_path, capsys):
    """--overwrite on a mistyped OUT deleted the folder whole, whatever it held; a shape off by a few zeros
    ran silently for hours."""
    from gpuheart.cli import main

    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "thesis.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a synthetic scan gpuheart wrote \\(sub\\)"):
        write_phantom(PhantomConfig.preset("tiny"), precious, overwrite=True)
    assert (precious / "sub" / "thesis.txt").is_file()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["phantom", str(afile), "--overwrite", "--no-progress"]) == 1
    assert "afile: exists and is not a folder" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path / "big"), "--shape", "8", "1000000", "1000000", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "expected a smaller --shape" in err and not (tmp_path / "big").exists(), err


def test_write_phantom_interrupted_is_not_complete(tmp_path, monkeypatch):
    calls = []

    def boom(self, channel, z0, z1):
        calls.append(z0)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return np.zeros((z1 - z0,) + self.shape[1:], np.uint16)

    monkeypatch.setattr(Phantom, "slab", boom)
    with pytest.raises(KeyboardInterrupt):
        write_phantom(PhantomConfig.preset("tiny", shape=(4, 16, 16)), tmp_path / "ph", slab_size=2)
    assert not (tmp_path / "ph").exists()


def test_generation_timing(capsys):
    t0 = time.perf_counter()
    ph = Phantom(PhantomConfig.preset("tiny"))
    for ch in ph.channels:
        ph.slab(ch, 0, ph.shape[0])
    t_tiny = time.perf_counter() - t0
    t0 = time.perf_counter()
    ph = Phantom(PhantomConfig.preset("default"))
    for ch in ph.channels:
        for _ in ph.iter_slabs(ch, 16):
            pass
    t_default = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nphantom generation: tiny {t_tiny:.2f} s, default (3 channels) {t_default:.2f} s")


@pytest.mark.parametrize("psf_z,vz", [(0.7, 1.4), (1.4, 1.2)])
def test_partition_invariance_where_the_halo_rounding_is_tight(psf_z, vz):
    """The z halo must reach as far as scipy's blur for any blur/voxel pair, not only the built-in 3 um / 4 um."""
    ph = Phantom(PhantomConfig.preset("tiny", voxel_size=(vz, 1.0, 1.0), psf_sigma_um=(psf_z, 0.7, 0.7)))
    whole = ph.slab("C00", 0, 16)
    np.testing.assert_array_equal(np.concatenate([ph.slab("C00", z, z + 1) for z in range(16)]), whole)


@pytest.mark.parametrize("slices", [1, 2])
def test_a_stack_too_thin_for_a_dropout_has_none(slices):
    """The laser dropout is one dark slice among bright ones: a 1- or 2-slice phantom (a 2-D test image) was
    itself the dropout, every slice at 2 % of its signal (or half the stack)."""
    cfg = PhantomConfig.preset("tiny", shape=(slices, 32, 32))
    ph = Phantom(cfg)
    assert ph.dark_slice() is None
    assert np.array_equal(ph.slab("C00", 0, slices), Phantom(replace(cfg, dark_slice_at=None)).slab("C00", 0, slices))
    assert Phantom(PhantomConfig.preset("tiny", shape=(3, 32, 32))).dark_slice() == 1


@pytest.mark.parametrize("field,value", [("seed", -1), ("psf_sigma_um", (-1.0, 0.7, 0.7)),
                                         ("psf_sigma_um", (1.0, 0.7)), ("dark_slice_at", 1.5),
                                         ("dark_slice_at", -0.2)])
def test_bad_config_values_are_refused_by_name(field, value):
    # a negative seed failed in NumPy with "expected non-negative integer" (gpuheart phantom --seed -1), a
    # negative blur sliced slabs at negative offsets, and dark_slice_at < 0 made dark_slice() a negative index
    with pytest.raises(ValueError, match=field):
        PhantomConfig.preset("tiny", **{field: value})
