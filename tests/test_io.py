"""io: opening every supported layout lazily, clear errors, atomic writers, bounded memory."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

import gpuheart.io
from gpuheart.io import (Scan, ScanError, Slab, ZarrWriter, lavision_filename, open_scan,
                         write_tiff)


def volume(shape=(12, 20, 24), dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


def write_folder(folder: Path, vols: dict[int, np.ndarray], prefix="heart", **kw):
    """A LaVision-style folder: one TIFF per channel per z, written with tifffile (the reference)."""
    folder.mkdir(parents=True, exist_ok=True)
    for c, vol in vols.items():
        for z, s in enumerate(vol):
            tifffile.imwrite(folder / lavision_filename(prefix, c, z), s, **kw)
    return folder


# -- shared real data ---------------------------------------------------------------------------------

def test_every_shared_tiff_opens_with_correct_shape_and_pixels(shared_data):
    files = sorted(shared_data.rglob("*.tif"))
    assert len(files) >= 10
    compressions = set()
    for f in files:
        with tifffile.TiffFile(f) as t:
            ref = t.series[0].asarray()
        with open_scan(f) as scan:
            assert scan.shape == ref.shape, f
            assert scan.dtype == ref.dtype
            assert scan.channels == ["C00"]
            mid = scan.shape[0] // 2
            np.testing.assert_array_equal(scan.read_slice("C00", mid), ref[mid])
            np.testing.assert_array_equal(scan.read_slab("C00", 0, scan.shape[0]), ref)
            compressions.add(scan.describe()["compression"])
    assert {"LZW", "PACKBITS"} <= compressions


# -- multi-page TIFF and hyperstacks ------------------------------------------------------------------

def test_imagej_hyperstack_channels_and_voxel_size(tmp_path):
    vol = volume((7, 2, 16, 18))  # z, c, y, x as ImageJ orders it
    f = tmp_path / "hyper.tif"
    tifffile.imwrite(f, vol, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"axes": "ZCYX", "spacing": 4.0, "unit": "um"})
    with open_scan(f) as scan:
        assert scan.channels == ["C00", "C01"]
        assert scan.shape == (7, 16, 18)
        assert scan.voxel_size == pytest.approx((4.0, 0.25, 0.5))
        for c in (0, 1):
            np.testing.assert_array_equal(scan.read_slab(f"C{c:02d}", 2, 6), vol[2:6, c])
        assert scan.describe()["format"] == "tiff-hyperstack"


def test_ome_tiff_channel_first_voxel_size_and_selection(tmp_path):
    vol = volume((3, 5, 10, 12))  # c, z, y, x
    f = tmp_path / "scan.ome.tif"
    tifffile.imwrite(f, vol, ome=True, photometric="minisblack",
                     metadata={"axes": "CZYX", "PhysicalSizeZ": 5.0, "PhysicalSizeY": 1.5,
                               "PhysicalSizeX": 1.5})
    with open_scan(f, channels=["C02", "C00"]) as scan:
        assert scan.channels == ["C02", "C00"]
        assert scan.voxel_size == pytest.approx((5.0, 1.5, 1.5))
        np.testing.assert_array_equal(scan.read_slice("C02", 4), vol[2, 4])
        np.testing.assert_array_equal(scan.read_slab("C00", 0, 5), vol[0])
    with open_scan(f, voxel_size=(2, 1, 1)) as scan:
        assert scan.voxel_size == (2.0, 1.0, 1.0)


def test_single_2d_page_is_one_slice_scan(tmp_path):
    img = volume((1, 9, 11))[0]
    tifffile.imwrite(tmp_path / "one.tif", img)
    with open_scan(tmp_path / "one.tif") as scan:
        assert scan.shape == (1, 9, 11)
        np.testing.assert_array_equal(scan.read_slice("C00", 0), img)


# -- per-slice folders ------------------------------------------------------------------------------

def test_lavision_folder_two_channels_natural_order(tmp_path):
    vols = {0: volume((12, 8, 10), seed=1), 1: volume((12, 8, 10), seed=2)}
    folder = write_folder(tmp_path / "scan", vols)
    (folder / "notes.txt").write_text("ignored")
    with open_scan(folder) as scan:
        assert scan.channels == ["C00", "C01"]
        assert scan.shape == (12, 8, 10)
        for c in (0, 1):
            np.testing.assert_array_equal(scan.read_slab(f"C{c:02d}", 0, 12), vols[c])
        d = scan.describe()
        assert d["format"] == "tiff-folder" and d["nbytes"] == 2 * 12 * 8 * 10 * 2


def test_natural_sort_z2_before_z10_and_no_channel_token(tmp_path):
    # unpadded numbers: lexical order would put Z10 and Z11 before Z2
    folder = tmp_path / "plain"
    folder.mkdir()
    for z in range(12):
        tifffile.imwrite(folder / f"slice Z{z}.tif", np.full((4, 5), z, np.uint8))
    with open_scan(folder) as scan:
        assert scan.channels == ["C00"]
        assert [int(scan.read_slice("C00", z)[0, 0]) for z in range(12)] == list(range(12))
    # and without any Z token, the numbers in the names give the order
    folder2 = tmp_path / "bare"
    folder2.mkdir()
    for z in range(12):
        tifffile.imwrite(folder2 / f"img{z}.tiff", np.full((4, 5), z, np.uint8))
    with open_scan(folder2) as scan:
        assert [int(scan.read_slice(0, z)[0, 0]) for z in range(12)] == list(range(12))


def test_ome_voxel_size_read_from_slice_files(tmp_path):
    folder = tmp_path / "ome"
    folder.mkdir()
    for z in range(3):
        tifffile.imwrite(folder / lavision_filename("h", 0, z), np.zeros((4, 4), np.uint16), ome=True,
                         metadata={"PhysicalSizeZ": 6.0, "PhysicalSizeY": 2.0, "PhysicalSizeX": 2.0})
    with open_scan(folder) as scan:
        assert scan.voxel_size == pytest.approx((6.0, 2.0, 2.0))


# -- slabs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slab_size,halo", [(4, 0), (4, 2), (5, 3), (16, 1), (1, 1)])
def test_iter_slabs_cover_scan_with_clipped_halos(tmp_path, slab_size, halo):
    vol = volume((13, 6, 7))
    tifffile.imwrite(tmp_path / "s.tif", vol)
    with open_scan(tmp_path / "s.tif") as scan:
        slabs = list(scan.iter_slabs("C00", slab_size, halo))
    assert all(isinstance(s, Slab) for s in slabs)
    np.testing.assert_array_equal(np.concatenate([s.core for s in slabs]), vol)
    for s in slabs:
        assert s.lo == min(halo, s.z0) and s.hi == min(halo, 13 - s.z1)
        np.testing.assert_array_equal(s.data, vol[s.z0 - s.lo:s.z1 + s.hi])
    assert slabs[0].z0 == 0 and slabs[-1].z1 == 13


def test_memory_stays_bounded_by_slab_not_scan(tmp_path):
    yy, xx = np.mgrid[0:1024, 0:1024]
    base = ((yy + xx) % 4096).astype(np.uint16)

    def make(n, name):
        folder = tmp_path / name
        folder.mkdir()
        for z in range(n):
            tifffile.imwrite(folder / lavision_filename("big", 0, z), base + np.uint16(z))
        return folder

    def peak(folder, n):
        with open_scan(folder) as scan:
            tracemalloc.start()
            total = 0
            for slab in scan.iter_slabs("C00", slab_size=16, halo=2):
                total += int(slab.core.sum(dtype=np.int64))
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        expected = n * int(base.sum(dtype=np.int64)) + 1024 * 1024 * n * (n - 1) // 2
        assert total == expected
        return top

    small, large = peak(make(50, "s50"), 50), peak(make(200, "s200"), 200)
    slab_bytes = 20 * 1024 * 1024 * 2  # 16 core + 2 * 2 halo slices of uint16
    assert large <= 1.2 * small
    assert large < 3 * slab_bytes  # the 200-slice scan is 400 MB


# -- zarr ---------------------------------------------------------------------------------------------

def test_zarr_writer_round_trip_is_ome_ngff(tmp_path):
    vol = volume((21, 30, 40))
    out = tmp_path / "mask.ome.zarr"
    with ZarrWriter(out, vol.shape, vol.dtype, chunks=(8, 16, 16), voxel_size=(5, 0.5, 0.5)) as w:
        for z0 in range(0, 21, 6):  # slabs not aligned with the chunks
            w.write(z0, vol[z0:z0 + 6])
    assert out.is_dir() and not (tmp_path / "mask.ome.zarr.partial").exists()
    attrs = json.loads((out / ".zattrs").read_text())  # zarr format 2
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [5.0, 0.5, 0.5]
    with open_scan(out) as scan:
        assert scan.format == "ome-zarr" and scan.shape == vol.shape
        assert scan.voxel_size == pytest.approx((5.0, 0.5, 0.5))
        np.testing.assert_array_equal(scan.read_slab("C00", 0, 21), vol)
        np.testing.assert_array_equal(scan.read_slice("C00", 13), vol[13])


def test_zarr_writer_binary_masks_are_bit_shuffled(tmp_path):
    rng = np.random.default_rng(3)
    mask = (rng.random((8, 64, 64)) < 0.05).astype(np.uint8) * 255
    sizes = {}
    for binary in (False, True):
        out = tmp_path / f"m{int(binary)}.ome.zarr"
        with ZarrWriter(out, mask.shape, np.uint8, binary=binary) as w:
            w.write(0, mask)
        comp = json.loads((out / "0" / ".zarray").read_text())["compressor"]
        assert (comp["cname"], comp["clevel"], comp["shuffle"]) == (("zstd", 3, 2) if binary else ("zstd", 5, 1))
        with open_scan(out) as scan:
            np.testing.assert_array_equal(scan.read_slab("C00", 0, 8), mask)
        sizes[binary] = sum(f.stat().st_size for f in (out / "0").rglob("*") if f.is_file())
    assert sizes[True] < sizes[False]


def test_zarr_writer_replaces_old_output_and_aborts_cleanly(tmp_path):
    out = tmp_path / "m.zarr"
    with ZarrWriter(out, (4, 5, 6), np.uint8) as w:
        w.write(0, np.ones((4, 5, 6), np.uint8))
    with ZarrWriter(out, (4, 5, 6), np.uint8) as w:
        w.write(0, np.full((4, 5, 6), 7, np.uint8))
    with open_scan(out) as scan:
        assert (scan.read_slab(0, 0, 4) == 7).all()
    with pytest.raises(RuntimeError):
        with ZarrWriter(out, (4, 5, 6), np.uint8) as w:
            w.write(0, np.zeros((2, 5, 6), np.uint8))
            raise RuntimeError("crash mid-run")
    assert not (tmp_path / "m.zarr.partial").exists()
    with open_scan(out) as scan:  # the old complete output is untouched
        assert (scan.read_slab(0, 0, 4) == 7).all()


def test_zarr_writer_refuses_incomplete_and_bad_writes(tmp_path):
    out = tmp_path / "gap.zarr"
    w = ZarrWriter(out, (6, 4, 4), np.uint16)
    with pytest.raises(ScanError, match="shape"):
        w.write(0, np.zeros((2, 4, 5), np.uint16))
    with pytest.raises(ScanError, match="outside"):
        w.write(5, np.zeros((2, 4, 4), np.uint16))
    w.write(0, np.zeros((3, 4, 4), np.uint16))
    with pytest.raises(ScanError, match="never written: Z0003-Z0005"):
        w.close()
    assert not out.exists() and not (tmp_path / "gap.zarr.partial").exists()


def test_plain_zarr_arrays(tmp_path):
    zarr = pytest.importorskip("zarr")
    v3 = volume((5, 6, 7))
    zarr.save_array(str(tmp_path / "a.zarr"), v3)
    with open_scan(tmp_path / "a.zarr") as scan:
        assert scan.channels == ["C00"] and scan.voxel_size is None
        np.testing.assert_array_equal(scan.read_slab("C00", 1, 4), v3[1:4])
    v4 = volume((2, 5, 6, 7))
    zarr.save_array(str(tmp_path / "b.zarr"), v4)
    with open_scan(tmp_path / "b.zarr") as scan:
        assert scan.channels == ["C00", "C01"] and scan.shape == (5, 6, 7)
        np.testing.assert_array_equal(scan.read_slice("C01", 3), v4[1, 3])



def test_every_zarr_read_is_a_fresh_array_the_caller_may_overwrite(tmp_path):
    """Pass 3 turns the mask it reads into bool in place; a read must never share memory with another read
    (or with zarr's chunks), whichever store layout and dtype."""
    zarr = pytest.importorskip("zarr")
    v = volume((6, 5, 7))
    zarr.save_array(str(tmp_path / "a.zarr"), v)
    with ZarrWriter(tmp_path / "m.ome.zarr", (6, 5, 7), np.uint8, voxel_size=(1, 1, 1), binary=True) as w:
        w.write(0, (v > v.mean()).astype(np.uint8) * 255)
    for path, want in ((tmp_path / "a.zarr", v), (tmp_path / "m.ome.zarr", (v > v.mean()).astype(np.uint8) * 255)):
        with open_scan(path) as scan:
            a = scan.read_slab(0, 1, 4)
            assert a.flags.writeable
            a[:] = 0
            b = scan.read_slab(0, 1, 4)
            assert not np.shares_memory(a, b)
            np.testing.assert_array_equal(b, want[1:4])
            np.testing.assert_array_equal(scan.read_slab(0, 0, 6), want)


# -- write_tiff --------------------------------------------------------------------------------------

def test_write_tiff_streams_slices_and_keeps_voxel_size(tmp_path):
    vol = volume((9, 10, 11))
    out = tmp_path / "mask.tif"
    write_tiff(out, (s for s in vol), voxel_size=(3.0, 0.75, 0.5), shape=vol.shape, dtype=vol.dtype)
    assert not (tmp_path / "mask.tif.partial").exists()
    np.testing.assert_array_equal(tifffile.imread(out), vol)  # independent reader
    with open_scan(out) as scan:
        assert scan.voxel_size == pytest.approx((3.0, 0.75, 0.5))
        np.testing.assert_array_equal(scan.read_slab(0, 0, 9), vol)


def test_write_tiff_other_dtypes_and_bool(tmp_path):
    f64 = np.random.default_rng(1).random((4, 5, 6))
    write_tiff(tmp_path / "f.tif", f64, voxel_size=(2, 1, 1))
    with open_scan(tmp_path / "f.tif") as scan:
        assert scan.dtype == np.float64 and scan.voxel_size == pytest.approx((2, 1, 1))
        np.testing.assert_array_equal(scan.read_slab(0, 0, 4), f64)
    mask = f64 > 0.5
    write_tiff(tmp_path / "b.tif", list(mask))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), mask.astype(np.uint8) * 255)


def test_write_tiff_failure_leaves_nothing(tmp_path):
    def slices():
        yield np.zeros((4, 4), np.uint8)
        raise RuntimeError("segmentation crashed")

    with pytest.raises(RuntimeError):
        write_tiff(tmp_path / "x.tif", slices(), shape=(3, 4, 4), dtype=np.uint8)
    with pytest.raises(ScanError, match="expected 3"):
        write_tiff(tmp_path / "x.tif", iter([np.zeros((4, 4), np.uint8)] * 2), shape=(3, 4, 4), dtype=np.uint8)
    with pytest.raises(ScanError, match="shape="):
        write_tiff(tmp_path / "x.tif", iter([np.zeros((4, 4), np.uint8)]))
    assert list(tmp_path.iterdir()) == []


# -- validation --------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(ScanError, match="no such file"):
        open_scan(tmp_path / "nope.tif")


def test_an_array_instead_of_a_path_is_named(tmp_path):
    # was pathlib's "expected str, bytes or os.PathLike object, not ndarray"
    with pytest.raises(TypeError, match=r"path of a TIFF.*got ndarray; .*\(3, 4, 5\) array.*write_tiff"):
        open_scan(np.zeros((3, 4, 5), np.uint16))


def test_empty_folder_and_folder_without_tiff(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="no TIFF"):
        open_scan(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "readme.txt").write_text("x")
    with pytest.raises(ScanError, match="no TIFF") as err:
        open_scan(tmp_path / "txt")
    assert "sub-folders" not in str(err.value)


def test_folder_without_tiff_names_sub_folders_that_hold_scans(tmp_path):
    """`gpuheart phantom OUT` writes OUT/scan and OUT/truth: `gpuheart run OUT` says where the scan is."""
    write_folder(tmp_path / "out" / "scan", {0: volume((2, 8, 8))})
    (tmp_path / "out" / "notes").mkdir()
    with pytest.raises(ScanError, match=r"no TIFF files .*; scans in its sub-folders: \S*out/scan$"):
        open_scan(tmp_path / "out")
    for c in (0, 1):   # one folder per channel: said how to make them one scan
        write_folder(tmp_path / "chans" / f"Ch{c}", {0: volume((2, 8, 8))})
    with pytest.raises(ScanError, match=r"Ch0, \S*Ch1 \(if these are the channels of one scan, move their slices"):
        open_scan(tmp_path / "chans")


def test_a_run_output_folder_given_as_a_scan_names_its_volumes(tmp_path):
    """`gpuheart info OUT` / `gpuheart mesh OUT` on a run's output folder: its volumes are named, the final mask
    first, with the built-in scan a run without INPUT wrote (it said only that the folder holds no TIFF)."""
    out = tmp_path / "out"
    for ch, names in (("C00", ("preprocessed", "mask")), ("C01", ("mask",))):
        (out / ch).mkdir(parents=True)
        for name in names:
            with ZarrWriter(out / ch / f"{name}.ome.zarr", (2, 4, 4), np.uint8) as w:
                w.write(0, np.zeros((2, 4, 4), np.uint8))
    write_folder(out / "input" / "scan", {0: volume((2, 8, 8))})
    (out / "summary.json").write_text("{}")
    with pytest.raises(ScanError) as err:
        open_scan(out)
    assert str(err.value) == (f"{out}: the output folder of a gpuheart run (summary.json), not a scan; expected one "
                              f"of the volumes in it: C00/mask.ome.zarr, C01/mask.ome.zarr, "
                              f"C00/preprocessed.ome.zarr, input/scan, e.g. {out / 'C00' / 'mask.ome.zarr'}")


def test_missing_slice_names_channel_and_z(tmp_path):
    vols = {0: volume((20, 4, 4)), 1: volume((20, 4, 4))}
    folder = write_folder(tmp_path / "scan", vols)
    (folder / lavision_filename("heart", 1, 7)).unlink()
    with pytest.raises(ScanError) as err:
        open_scan(folder)
    assert str(err.value) == (f"{folder}: channel C01 has no slice Z0007 "
                              f"(found Z0000-Z0006, Z0008-Z0019)")


def test_channels_with_different_slice_counts(tmp_path):
    folder = write_folder(tmp_path / "scan", {0: volume((6, 4, 4)), 1: volume((5, 4, 4))})
    with pytest.raises(ScanError, match=r"different slice counts \(C00: 6, C01: 5\)"):
        open_scan(folder)


def test_channels_numbered_over_different_slices_are_refused(tmp_path):
    """Equal counts but shifted Z numbers: pairing them by position would misalign the channels."""
    folder = write_folder(tmp_path / "scan", {0: volume((5, 4, 4)), 1: volume((5, 4, 4))})
    for z in reversed(range(5)):   # C01 now holds Z0001-Z0005
        (folder / lavision_filename("heart", 1, z)).rename(folder / lavision_filename("heart", 1, z + 1))
    with pytest.raises(ScanError) as err:
        open_scan(folder)
    assert str(err.value) == (f"{folder}: channels cover different slices (C00: Z0000-Z0004, C01: Z0001-Z0005); "
                              f"expected the same Z numbers in every channel")


def test_a_damaged_channel_not_asked_for_does_not_stop_the_others(tmp_path):
    """--channels C00: a corrupt or missing C01 slice is C01's problem; opening C01 (or all) still names it."""
    vols = {0: volume((6, 4, 4)), 1: volume((6, 4, 4), seed=1), 2: volume((6, 4, 4), seed=2)}
    folder = write_folder(tmp_path / "scan", vols)
    (folder / lavision_filename("heart", 1, 2)).write_bytes(b"not a tiff")
    (folder / lavision_filename("heart", 2, 3)).unlink()
    scan = open_scan(folder, channels=["C00"])
    assert scan.channels == ["C00"] and scan.shape == (6, 4, 4)
    np.testing.assert_array_equal(scan.read_slab("C00", 0, 6), vols[0])
    with pytest.raises(ScanError, match=r"heart_C01_xyz-Table Z0002.ome.tif: not a TIFF file"):
        open_scan(folder, channels=["C01"])
    with pytest.raises(ScanError, match=r"channel C02 has no slice Z0003"):
        open_scan(folder)
    with pytest.raises(ScanError, match=r"unknown channel\(s\) 'C07'; available: C00, C01, C02"):
        open_scan(folder, channels=["C07"])


def test_numbering_may_start_above_zero_when_all_channels_agree(tmp_path):
    folder = write_folder(tmp_path / "scan", {0: volume((3, 4, 4)), 1: volume((3, 4, 4), seed=1)})
    for c in (0, 1):
        for z in reversed(range(3)):
            (folder / lavision_filename("heart", c, z)).rename(folder / lavision_filename("heart", c, z + 1))
    scan = open_scan(folder)
    assert scan.shape == (3, 4, 4)
    np.testing.assert_array_equal(scan.read_slab("C01", 0, 3), volume((3, 4, 4), seed=1))
    assert scan.slice_file("C01", 0).name == lavision_filename("heart", 1, 1)


def test_slice_of_other_shape_or_dtype_names_file(tmp_path):
    folder = write_folder(tmp_path / "shape", {0: volume((5, 8, 8))})
    bad = folder / lavision_filename("heart", 0, 3)
    tifffile.imwrite(bad, np.zeros((8, 9), np.uint16))
    with pytest.raises(ScanError, match=r"Z0003.*\(8, 9\) uint16; expected \(8, 8\) uint16"):
        open_scan(folder)
    folder = write_folder(tmp_path / "dtype", {0: volume((5, 8, 8))})
    tifffile.imwrite(folder / lavision_filename("heart", 0, 4), np.zeros((8, 8), np.uint8))
    with pytest.raises(ScanError, match=r"Z0004.*uint8; expected \(8, 8\) uint16"):
        open_scan(folder)


def test_truncated_tiffs(tmp_path):
    # a stack cut in half
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, volume((10, 64, 64)))
    raw = stack.read_bytes()
    stack.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ScanError, match="stack.tif.*truncated"):
        open_scan(stack)
    # a slice file whose header is cut
    folder = write_folder(tmp_path / "hdr", {0: volume((4, 32, 32))})
    bad = folder / lavision_filename("heart", 0, 2)
    bad.write_bytes(bad.read_bytes()[:12])
    with pytest.raises(ScanError, match="Z0002.ome.tif.*corrupt"):
        open_scan(folder)
    # a slice file whose pixel data is cut: its tags already show it at open time
    folder = write_folder(tmp_path / "data", {0: volume((4, 32, 32))})
    bad = folder / lavision_filename("heart", 0, 1)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ScanError, match="Z0001.ome.tif.*truncated"):
        open_scan(folder)


def test_slice_cut_after_open_fails_at_read_naming_file_and_slice(tmp_path):
    folder = write_folder(tmp_path / "scan", {0: volume((4, 32, 32))})
    with open_scan(folder) as scan:
        bad = folder / lavision_filename("heart", 0, 2)
        raw = bad.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
        np.testing.assert_array_equal(scan.read_slice("C00", 1).shape, (32, 32))
        with pytest.raises(ScanError, match=r"Z0002\.ome\.tif: slice Z0002 is truncated"):
            scan.read_slab("C00", 0, 4)


def test_folder_slices_read_in_parallel_equal_serial(tmp_path, monkeypatch):
    vol = volume((9, 40, 36))
    folder = write_folder(tmp_path / "scan", {0: vol}, compression="zlib")
    got = {}
    for threads in ("1", "4"):
        monkeypatch.setenv("GPUHEART_READ_THREADS", threads)
        with open_scan(folder) as scan:
            got[threads] = scan.read_slab("C00", 1, 9)
    np.testing.assert_array_equal(got["1"], vol[1:9])
    np.testing.assert_array_equal(got["4"], vol[1:9])
    monkeypatch.delenv("GPUHEART_READ_THREADS")
    assert 1 <= gpuheart.io.read_threads() <= 8


def test_parallel_read_raises_the_first_bad_slice_in_z_order(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUHEART_READ_THREADS", "4")
    folder = write_folder(tmp_path / "scan", {0: volume((8, 32, 32))})
    with open_scan(folder) as scan:
        for z in (3, 6):
            bad = folder / lavision_filename("heart", 0, z)
            raw = bad.read_bytes()
            bad.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(ScanError, match=r"Z0003\.ome\.tif: slice Z0003 is truncated"):
            scan.read_slab("C00", 0, 8)
        np.testing.assert_array_equal(scan.read_slab("C00", 0, 3).shape, (3, 32, 32))


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_read_threads_setting_is_checked(tmp_path, monkeypatch, value):
    monkeypatch.setenv("GPUHEART_READ_THREADS", value)
    folder = write_folder(tmp_path / "scan", {0: volume((3, 8, 8))})
    with open_scan(folder) as scan, pytest.raises(ScanError, match="GPUHEART_READ_THREADS=.*whole number >= 1"):
        scan.read_slab("C00", 0, 3)


def test_non_tiff_files(tmp_path):
    fake = tmp_path / "fake.tif"
    fake.write_text("this is not an image")
    with pytest.raises(ScanError, match="fake.tif: not a TIFF"):
        open_scan(fake)
    folder = write_folder(tmp_path / "scan", {0: volume((3, 4, 4))})
    (folder / lavision_filename("heart", 0, 1)).write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    with pytest.raises(ScanError, match="Z0001.ome.tif: not a TIFF"):
        open_scan(folder)


def test_unknown_channel_lists_available(tmp_path):
    folder = write_folder(tmp_path / "scan", {0: volume((3, 4, 4)), 2: volume((3, 4, 4))})
    with pytest.raises(ScanError, match="'C01'.*available: C00, C02"):
        open_scan(folder, channels=["C01"])
    with open_scan(folder) as scan:
        with pytest.raises(ScanError, match="available: C00, C02"):
            scan.read_slice("C05", 0)
        with pytest.raises(ScanError, match="outside the scan"):
            scan.read_slab("C00", 2, 4)


def test_closed_scan_and_errors_are_value_errors(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", volume((5, 8, 9)))
    scan = open_scan(tmp_path / "s.tif")
    assert isinstance(scan, Scan)
    scan.close()
    scan.close()
    with pytest.raises(ValueError, match="closed"):
        scan.read_slice("C00", 0)
    with pytest.raises(ScanError, match="voxel_size"):
        open_scan(tmp_path / "s.tif", voxel_size=(1, 0, 1))


def test_folder_holding_one_stack_opens_the_stack(tmp_path):
    vol = volume((6, 10, 12))
    (tmp_path / "one").mkdir()
    tifffile.imwrite(tmp_path / "one" / "stack.tif", vol)
    with open_scan(tmp_path / "one") as scan:
        assert scan.shape == (6, 10, 12)
        np.testing.assert_array_equal(scan.read_slab("C00", 0, 6), vol)


def test_ngff_group_with_channel_axis_and_nanometre_units(tmp_path):
    zarr = pytest.importorskip("zarr")
    vol = volume((2, 4, 6, 8))
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    create = getattr(root, "create_array", None) or root.create_dataset  # zarr 3 or 2
    create("0", shape=vol.shape, dtype=vol.dtype, chunks=(1, 2, 6, 8))[:] = vol
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}] + [
            {"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 4000, 650, 650]}]}],
    }]
    with open_scan(tmp_path / "img.ome.zarr") as scan:
        assert scan.channels == ["C00", "C01"] and scan.shape == (4, 6, 8)
        assert scan.voxel_size == pytest.approx((4.0, 0.65, 0.65))
        np.testing.assert_array_equal(scan.read_slab("C01", 1, 3), vol[1, 1:3])


def test_a_level_of_an_ome_zarr_image_opened_by_itself_keeps_the_image_s_axes_and_voxel_size(tmp_path):
    """`gpuheart mesh OUT/C00/mask.ome.zarr/0` gave a mesh in voxel units: the array's own metadata hold no
    scale, its image's (the folder above) do. Scales per level: level 1's is its own."""
    zarr = pytest.importorskip("zarr")
    vol = volume((2, 4, 6, 8))
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    create = getattr(root, "create_array", None) or root.create_dataset  # zarr 3 or 2
    create("0", shape=vol.shape, dtype=vol.dtype, chunks=(1, 2, 6, 8))[:] = vol
    create("1", shape=(2, 4, 3, 4), dtype=vol.dtype, chunks=(1, 2, 3, 4))[:] = vol[:, :, ::2, ::2]
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}] + [
            {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1, 5, s, s]}]}
                     for k, s in ((0, 0.5), (1, 1.0))],
    }]
    for level, shape, vs in (("0", (4, 6, 8), (5.0, 0.5, 0.5)), ("1", (4, 3, 4), (5.0, 1.0, 1.0))):
        with open_scan(tmp_path / "img.ome.zarr" / level) as scan:
            assert scan.channels == ["C00", "C01"] and scan.shape == shape
            assert scan.voxel_size == pytest.approx(vs)
    with ZarrWriter(tmp_path / "mask.ome.zarr", (3, 4, 5), np.uint8, voxel_size=(4, 1, 1)) as w:   # gpuheart's own
        w.write(0, np.zeros((3, 4, 5), np.uint8))
    with open_scan(tmp_path / "mask.ome.zarr" / "0") as scan:
        assert scan.voxel_size == pytest.approx((4.0, 1.0, 1.0))


def test_stores_keep_their_channel_name_and_claim_no_voxel_size_they_were_not_given(tmp_path):
    """A store written for channel C01 reads back as C01 (it read as C00: another channel's name), the whole
    image or its level opened alone; one written without a voxel size has axes without a unit, so reading it
    back says the voxel size is unknown instead of 1 x 1 x 1 µm. Labels that are not gpuheart channel names
    (another tool's 'DAPI') or not one per channel leave the usual C00, C01, ..."""
    with ZarrWriter(tmp_path / "m.ome.zarr", (3, 4, 5), np.uint8, channel="C01") as w:
        w.write(0, np.zeros((3, 4, 5), np.uint8))
    for path in (tmp_path / "m.ome.zarr", tmp_path / "m.ome.zarr" / "0"):
        with open_scan(path) as scan:
            assert scan.channels == ["C01"] and scan.voxel_size is None
            assert scan.read_slab("C01", 0, 3).shape == (3, 4, 5)
    attrs = json.loads((tmp_path / "m.ome.zarr" / ".zattrs").read_text())
    assert all("unit" not in a for a in attrs["multiscales"][0]["axes"])
    assert attrs["omero"]["channels"][0]["window"]["end"] == 255
    with pytest.raises(ScanError, match="C00"):
        open_scan(tmp_path / "m.ome.zarr", channels=["C00"])
    for labels in (["DAPI"], ["C01", "C02"]):
        attrs["omero"]["channels"] = [{"label": n} for n in labels]
        (tmp_path / "m.ome.zarr" / ".zattrs").write_text(json.dumps(attrs))
        with open_scan(tmp_path / "m.ome.zarr") as scan:
            assert scan.channels == ["C00"]


def test_folder_names_that_are_not_slice_tokens(tmp_path):
    """Lower-case and 'ch' tokens are understood; a strain name is no channel; a stray file without a Z
    token among slices is refused by name; hidden AppleDouble files are ignored."""
    img = np.arange(20, dtype=np.uint8).reshape(4, 5)
    a = tmp_path / "a"
    a.mkdir()
    for c in (1, 2):
        for z in range(3):
            tifffile.imwrite(a / f"scan_ch{c}_z{z:03d}.tif", img + 10 * c + z)
    (a / "._scan_ch1_z000.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with open_scan(a) as scan:
        assert scan.channels == ["C01", "C02"] and scan.shape == (3, 4, 5)
        assert int(scan.read_slice("C02", 2)[0, 0]) == 22
    b = tmp_path / "b"
    b.mkdir()
    for z in range(3):
        tifffile.imwrite(b / f"heart_C57BL6_Z{z:04d}.tif", img + z)
    with open_scan(b) as scan:
        assert scan.channels == ["C00"] and scan.shape == (3, 4, 5)
    tifffile.imwrite(b / "heart_C57BL6_MIP.tif", img)
    with pytest.raises(ScanError, match="heart_C57BL6_MIP.tif' has no Z<number> slice token"):
        open_scan(b)


def test_slice_tokens_joined_to_channel_tokens_and_words(tmp_path):
    img = np.arange(20, dtype=np.uint8).reshape(4, 5)
    a = tmp_path / "a"
    a.mkdir()
    for c in (0, 1):
        for z in range(3):
            tifffile.imwrite(a / f"s_C{c:02d}Z{z:04d}.tif", img + 10 * c + z)
    with open_scan(a) as scan:
        assert scan.channels == ["C00", "C01"] and scan.shape == (3, 4, 5)
    b = tmp_path / "b"
    b.mkdir()
    for z in (0, 1, 3):   # a gap: only seen because "stackZ0001" has a slice token
        tifffile.imwrite(b / f"stackZ{z:04d}.tif", img)
    with pytest.raises(ScanError, match="no slice Z0002"):
        open_scan(b)


def test_hidden_files_do_not_change_a_slice_folders_stamp(tmp_path):
    from gpuheart.io import source_stamp

    folder = write_folder(tmp_path / "scan", {0: volume((3, 8, 10), seed=1)})
    before = source_stamp(folder)
    (folder / "._scan_C00_Z0000.tif").write_bytes(b"AppleDouble")
    assert source_stamp(folder) == before


# -- orders and voxel sizes that only show with unequal numbers -----------------------------------------

def test_the_z_token_orders_slices_whatever_the_rest_of_the_name(tmp_path):
    # e.g. slices saved in two sessions whose time stamps sort the other way round from z
    folder = tmp_path / "sessions"
    folder.mkdir()
    for z in range(6):
        stamp = "10-00-00" if z >= 3 else "11-00-00"
        tifffile.imwrite(folder / f"{stamp}_heart Z{z:04d}.tif", np.full((4, 5), z, np.uint8))
    with open_scan(folder) as scan:
        np.testing.assert_array_equal(scan.read_slab(0, 0, 6)[:, 0, 0], np.arange(6))


def test_ome_voxel_size_with_rectangular_pixels(tmp_path):
    vol = volume((3, 6, 8))
    f = tmp_path / "rect.ome.tif"
    tifffile.imwrite(f, vol, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 5.0, "PhysicalSizeY": 0.8, "PhysicalSizeX": 0.3})
    with open_scan(f) as scan:
        assert scan.voxel_size == pytest.approx((5.0, 0.8, 0.3))


def test_ngff_scale_with_rectangular_pixels_and_a_multiscales_level_scale(tmp_path):
    # NGFF 0.4: a multiscales-level coordinateTransformations applies after each dataset's own
    zarr = pytest.importorskip("zarr")
    vol = volume((4, 6, 8))
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    create = getattr(root, "create_array", None) or root.create_dataset  # zarr 3 or 2
    create("0", shape=vol.shape, dtype=vol.dtype, chunks=(2, 6, 8))[:] = vol
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.5, 0.25]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [3.0, 1.0, 1.0]}],
    }]
    with open_scan(tmp_path / "img.ome.zarr") as scan:
        assert scan.voxel_size == pytest.approx((6.0, 0.5, 0.25))
    # and gpuheart's own writer with y != x
    out = tmp_path / "mask.ome.zarr"
    with ZarrWriter(out, vol.shape, vol.dtype, voxel_size=(4.0, 0.8, 0.3)) as w:
        w.write(0, vol)
    with open_scan(out) as scan:
        assert scan.voxel_size == pytest.approx((4.0, 0.8, 0.3))


# -- stacks of several TIFF series, malformed NGFF metadata, pixels that are no intensities ---------------

def test_a_stack_written_one_page_per_write_reads_every_page(tmp_path):
    # tifffile's TiffWriter.write once per slice (its default contiguous=False) makes one series per page;
    # reading only the first series gave a 1-slice scan that looked complete
    vol = volume((5, 10, 12))
    f = tmp_path / "pagewise.tif"
    with tifffile.TiffWriter(f) as tw:
        for s in vol:
            tw.write(s)
    with tifffile.TiffFile(f) as t:
        assert len(t.series) == 5 and len(t.pages) == 5  # the layout this test is about
    with open_scan(f) as scan:
        assert scan.shape == (5, 10, 12) and scan.channels == ["C00"]
        np.testing.assert_array_equal(scan.read_slab("C00", 0, 5), vol)
        np.testing.assert_array_equal(scan.read_slab("C00", 3, 5), vol[3:5])


def test_a_reduced_resolution_thumbnail_beside_the_stack_is_ignored(tmp_path):
    vol = volume((4, 16, 16))
    f = tmp_path / "thumb.tif"
    with tifffile.TiffWriter(f) as tw:
        tw.write(vol, photometric="minisblack", metadata={"axes": "ZYX"})
        tw.write(vol[0, ::4, ::4], subfiletype=1, photometric="minisblack")  # subfiletype 1: reduced image
    with open_scan(f) as scan:
        assert scan.shape == (4, 16, 16)
        np.testing.assert_array_equal(scan.read_slab("C00", 0, 4), vol)


@pytest.mark.parametrize("layout", ["odd page", "two stacks"])
def test_several_series_that_are_not_one_stack_are_refused(tmp_path, layout):
    # tifffile groups same-shape pages into a series even across an odd page: reading series 0 skipped a slice
    f = tmp_path / "multi.tif"
    with tifffile.TiffWriter(f) as tw:
        if layout == "odd page":
            for shape in [(8, 8), (8, 8), (9, 8), (8, 8)]:
                tw.write(volume((1,) + shape)[0], photometric="minisblack", metadata=None)
        else:
            tw.write(volume((4, 8, 8)), photometric="minisblack")
            tw.write(volume((3, 6, 6)), photometric="minisblack")
    with tifffile.TiffFile(f) as t:
        assert len(t.series) == 2
    with pytest.raises(ScanError, match=r"multi\.tif: holds 2 image series .*expected one \(z, y, x\) stack"):
        open_scan(f)


def _ngff(path, multiscales, shape=(4, 6, 8), dtype=np.uint16):
    zarr = pytest.importorskip("zarr")
    root = zarr.open_group(str(path), mode="w")
    create = getattr(root, "create_array", None) or root.create_dataset  # zarr 3 or 2
    create("0", shape=shape, dtype=dtype, chunks=shape)[:] = np.ones(shape, dtype)
    root.attrs["multiscales"] = multiscales
    return path


_AXES = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]


@pytest.mark.parametrize("multiscales", [
    [{"version": "0.4", "axes": _AXES, "datasets": []}],
    [{"version": "0.4", "axes": _AXES, "datasets": [{}]}],
    {"version": "0.4", "datasets": [{"path": "0"}]},
    [{"version": "0.4", "axes": [{"type": "space"}] * 3, "datasets": [{"path": "0"}]}],
], ids=["no datasets", "dataset without path", "not a list", "axes without names"])
def test_malformed_ngff_metadata_is_a_scan_error_naming_the_store(tmp_path, multiscales):
    store = _ngff(tmp_path / "bad.ome.zarr", multiscales)
    with pytest.raises(ScanError, match=r"bad\.ome\.zarr: .*(multiscales|axes)"):
        open_scan(store)


@pytest.mark.parametrize("scale", [[0, 1, 1], [-3, 1, 1], [3, 1], ["a", 1, 1]])
def test_an_unusable_ngff_scale_leaves_the_voxel_size_unknown(tmp_path, scale):
    store = _ngff(tmp_path / "s.ome.zarr", [{"version": "0.4", "axes": _AXES, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}])
    with open_scan(store) as scan:
        assert scan.voxel_size is None and scan.shape == (4, 6, 8)


@pytest.mark.parametrize("unit, scale, um", [
    ("centimeter", [5e-4, 1e-4, 2e-4], (5.0, 1.0, 2.0)),          # 1 cm = 10^4 µm
    ("angstrom", [50000, 10000, 6500], (5.0, 1.0, 0.65)),         # 1 Å = 10^-4 µm
    ("inch", [0.001, 0.0005, 0.0005], (25.4, 12.7, 12.7)),        # 1 in = 25.4 mm
])
def test_ngff_length_units_are_converted_to_micrometres(tmp_path, unit, scale, um):
    axes = [{"name": a, "type": "space", "unit": unit} for a in "zyx"]
    store = _ngff(tmp_path / "u.ome.zarr", [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}])
    with open_scan(store) as scan:
        assert scan.voxel_size == pytest.approx(um)


def test_ome_tiff_in_angstrom_is_converted(tmp_path):
    f = tmp_path / "a.ome.tif"
    tifffile.imwrite(f, volume((3, 6, 8)), ome=True, photometric="minisblack", metadata={
        "axes": "ZYX", "PhysicalSizeZ": 3.0, "PhysicalSizeZUnit": "µm", "PhysicalSizeY": 5000.0,
        "PhysicalSizeYUnit": "Å", "PhysicalSizeX": 5000.0, "PhysicalSizeXUnit": "Å"})
    with open_scan(f) as scan:
        assert scan.voxel_size == pytest.approx((3.0, 0.5, 0.5))


def test_complex_pixels_and_empty_arrays_are_refused_at_open(tmp_path):
    # complex TIFF pixels reached exposure.slice_stats and ended in a TypeError traceback
    zarr = pytest.importorskip("zarr")
    f = tmp_path / "c.tif"
    tifffile.imwrite(f, volume((3, 6, 8)).astype(np.complex64), photometric="minisblack")
    with pytest.raises(ScanError, match=r"c\.tif: pixels are complex64; expected integer, float or boolean"):
        open_scan(f)
    for name, shape in [("z0.zarr", (0, 6, 8)), ("y0.zarr", (3, 0, 8))]:
        arr = zarr.open_array(str(tmp_path / name), mode="w", shape=shape, dtype="u2")
        assert arr.shape == shape
        with pytest.raises(ScanError, match=rf"{name}: image of shape .* is empty"):
            open_scan(tmp_path / name)


def test_a_tiff_header_pointing_nowhere_says_so(tmp_path):
    # a TIFF magic followed by garbage: tifffile only warns and raises IndexError(0), which read "corrupt TIFF (0)"
    junk = b"II*\x00" + np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    (tmp_path / "junk.tif").write_bytes(junk)
    with pytest.raises(ScanError, match=r"junk\.tif: corrupt TIFF \(no image page where its header points\)"):
        open_scan(tmp_path / "junk.tif")
    folder = write_folder(tmp_path / "f", {0: volume((3, 6, 8))})
    (folder / lavision_filename("heart", 0, 1)).write_bytes(junk)
    with pytest.raises(ScanError, match=r"Z0001\.ome\.tif: corrupt TIFF \(no image page where its header points\)"):
        open_scan(folder)


def test_a_slice_that_is_a_broken_link_is_named_as_one(tmp_path):
    import os

    folder = tmp_path / "scan"
    folder.mkdir()
    for c in (0, 1):
        for z in range(3):
            tifffile.imwrite(folder / lavision_filename("h", c, z), np.full((4, 4), z, np.uint16))
    gone = folder / lavision_filename("h", 1, 1)
    gone.unlink()
    os.symlink(tmp_path / "elsewhere" / gone.name, gone)
    with pytest.raises(ScanError) as err:
        open_scan(folder)
    msg = str(err.value)
    assert gone.name in msg and "broken link" in msg and str(tmp_path / "elsewhere") in msg
    with open_scan(folder, channels=["C00"]) as scan:   # the other channel's link does not stop C00
        np.testing.assert_array_equal(scan.read_slab("C00", 0, 3)[:, 0, 0], [0, 1, 2])
    for p in folder.iterdir():   # nothing but broken links: not "holds no TIFF files"
        if p != gone:
            p.unlink()
    with pytest.raises(ScanError, match="broken link"):
        open_scan(folder)


def test_a_scan_that_is_a_broken_link_is_named_as_one(tmp_path):
    import os

    for name in ("stack.tif", "store.ome.zarr", "folder"):
        link = tmp_path / f"link-{name}"
        os.symlink(tmp_path / "unmounted" / name, link)
        with pytest.raises(ScanError) as err:
            open_scan(link)
        msg = str(err.value)
        assert str(link) in msg and "broken link" in msg and str(tmp_path / "unmounted" / name) in msg
    with pytest.raises(ScanError, match="no such file or folder"):   # a plain missing path stays as it was
        open_scan(tmp_path / "nothing.tif")


def test_ome_slices_without_a_z_step_say_what_they_give_and_what_is_missing(tmp_path):
    import warnings

    folder = tmp_path / "scan"
    folder.mkdir()
    for z in range(3):
        tifffile.imwrite(folder / lavision_filename("h", 0, z), np.zeros((4, 4), np.uint16), ome=True,
                         metadata={"PhysicalSizeX": 1.5, "PhysicalSizeY": 1.5})
    with pytest.warns(UserWarning, match=r"pixel size \(1\.5 x 1\.5 µm\) but no z step.*--voxel-size Z 1\.5 1\.5"):
        with open_scan(folder) as scan:
            assert scan.voxel_size is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # given by the user: nothing to advise
        with open_scan(folder, voxel_size=(4, 1.5, 1.5)) as scan:
            assert scan.voxel_size == (4.0, 1.5, 1.5)


def _slices(folder, names, value=lambda i: i):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        tifffile.imwrite(folder / n, np.full((6, 6), value(i), np.uint16))


@pytest.mark.parametrize("pattern", ["ch{c}_{z:04d}.tif", "heart-ch{c}-{z:04d}.tif", "C{c:02d}_{z}.tif"])
def test_channel_tokens_at_the_start_or_after_a_hyphen_are_channels_not_more_slices(tmp_path, pattern):
    """"ch0_0000.tif" was read in name order as one channel: channel 1's slices after channel 0's."""
    names = [pattern.format(c=c, z=z) for c in (0, 1) for z in range(4)]
    _slices(tmp_path, names, lambda i: 100 * (i // 4) + i % 4)
    with open_scan(tmp_path) as s:
        assert s.channels == ["C00", "C01"] and s.shape[0] == 4
        assert [int(s.read_slice("C01", z)[0, 0]) for z in range(4)] == [100, 101, 102, 103]


def test_slice_names_that_vary_in_two_numbers_are_refused_by_name(tmp_path):
    _slices(tmp_path, [f"heart_{w}nm_{z:04d}.tif" for w in (488, 561) for z in range(3)])
    with pytest.raises(ScanError, match=r"differ in 2 numbers .*'heart_488nm_0000.tif' \.\.\. 'heart_561nm_0002.tif'"):
        open_scan(tmp_path)


@pytest.mark.parametrize("names,message", [
    ([f"slice_{z}.tif" for z in range(11) if z != 5], r"has no slice number 5 \(found numbers 0-4, 6-10\)"),
    ([f"slice_{z}.tif" for z in range(5)] + ["slice_03.tif"], r"two files for slice number 3"),
    ([f"heart{z:04d}.tif" for z in range(5)] + ["MAX_heart.tif"], r"'MAX_heart.tif' is not named like the other"),
])
def test_slices_without_z_tokens_are_checked_like_those_with(tmp_path, names, message):
    _slices(tmp_path, names)
    with pytest.raises(ScanError, match=message):
        open_scan(tmp_path)


def test_slices_without_z_tokens_follow_their_number_not_the_letters(tmp_path):
    _slices(tmp_path, [f"slice_{z}.tif" for z in (10, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8)],
            lambda i: (10, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8)[i])
    with open_scan(tmp_path) as s:
        assert [int(s.read_slice(s.channels[0], z)[0, 0]) for z in range(11)] == list(range(11))


@pytest.mark.parametrize("names", [
    [f"mouse Z3 heart [{z}].tif" for z in range(4)],                      # a Z in the sample's name
    [f"heart_[00 x {t:02d}]_C00_xyz-Table Z0000.ome.tif" for t in range(3)],  # LaVision tiles of one plane
    [f"heart_T{t:03d}_Z0005.tif" for t in range(3)],                        # time points of one plane
])
def test_files_sharing_one_z_number_are_refused_not_read_as_slices(tmp_path, names):
    """A Z number the same in every file could be the sample's name, or tiles, or time points: refused, with
    what to rename, rather than guessed."""
    _slices(tmp_path, names)
    with pytest.raises(ScanError, match=r"two files for slice Z000\d.*rename"):
        open_scan(tmp_path)


def test_single_imagej_slices_carry_no_z_step(tmp_path):
    """Fiji's image sequences: a pixel size but no spacing in a one-image file, whose z step is unknown, not 1."""
    for z in range(3):
        tifffile.imwrite(tmp_path / f"heart{z:04d}.tif", np.zeros((6, 6), np.uint16), imagej=True,
                         metadata={"unit": "micron"}, resolution=(1 / 0.65, 1 / 0.65))
    with pytest.warns(UserWarning, match=r"no z step .*--voxel-size Z 0.65 0.65"):
        with open_scan(tmp_path) as s:
            assert s.voxel_size is None


def test_one_slice_file_of_a_multi_file_ome_series_points_to_its_folder(tmp_path, monkeypatch):
    """LaVision's per-slice files each carry OME metadata naming every file of the series."""
    import uuid

    ids = [f"urn:uuid:{uuid.uuid4()}" for _ in range(3)]
    name = "heart_C00_xyz-Table Z{:04d}.ome.tif"
    planes = "".join(f'<TiffData FirstZ="{z}" IFD="0" PlaneCount="1"><UUID FileName="{name.format(z)}">{ids[z]}'
                     f'</UUID></TiffData>' for z in range(3))
    for z in range(3):
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
               f'UUID="{ids[z]}"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint16" '
               f'SizeX="8" SizeY="8" SizeZ="3" SizeC="1" SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
               f'{planes}</Pixels></Image></OME>')
        tifffile.imwrite(tmp_path / name.format(z), np.full((8, 8), z, np.uint16), description=xml, metadata=None)
    with pytest.raises(ScanError, match=r"one file of a multi-file OME-TIFF series .*give its folder"):
        open_scan(tmp_path / name.format(0))
    with open_scan(tmp_path) as s:
        assert s.shape == (3, 8, 8) and int(s.read_slice(s.channels[0], 2)[0, 0]) == 2
    # asking whether the folder holds stacks probes one file, not the series its metadata names (tifffile
    # would open every slice of the scan for that, before they are all opened again as slices)
    opened = []
    real = tifffile.TiffFile.__init__
    monkeypatch.setattr(tifffile.TiffFile, "__init__", lambda self, *a, **k: opened.append(1) or real(self, *a, **k))
    with open_scan(tmp_path) as s:
        assert len(opened) <= 3 + 1, len(opened)


def test_a_bioformats2raw_store_points_to_its_image_sub_group(tmp_path):
    import zarr

    root = zarr.open_group(str(tmp_path / "scan.ome.zarr"), mode="w")
    root.attrs["bioformats2raw.layout"] = 3
    img = root.require_group("0")
    img.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in "zyx"],
                                 "datasets": [{"path": "0", "coordinateTransformations": [
                                     {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    zarr.open_array(store=str(tmp_path / "scan.ome.zarr" / "0" / "0"), mode="w", shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(ScanError, match=r"its images are in sub-groups: open .*scan\.ome\.zarr/0"):
        open_scan(tmp_path / "scan.ome.zarr")
    with open_scan(tmp_path / "scan.ome.zarr" / "0") as s:
        assert s.shape == (2, 4, 4)


@pytest.mark.parametrize("names", [
    [f"slice_{z:04d}.tif" for z in range(0, 20, 2)],                      # every second slice exported
    [f"heart_{d}um.tif" for d in range(100, 150, 5)],                     # depth in µm
    [f"frame_{t}.tif" for t in (1682941800000000, 1682941800100213, 1682941800300777)],  # time stamps
    [f"img_{i:03d}_20230501{1230 + i}.tif" for i in range(5)],            # a counter and a time stamp agree
    ["heart_0007.tif"],
])
def test_plain_numbered_slices_that_are_not_consecutive_still_open_in_their_order(tmp_path, names):
    _slices(tmp_path, names)
    with open_scan(tmp_path) as s:
        assert s.shape[0] == len(names)
        assert [int(s.read_slice(s.channels[0], z)[0, 0]) for z in range(len(names))] == list(range(len(names)))


def test_a_gap_in_a_regular_step_is_found(tmp_path):
    _slices(tmp_path, [f"heart_{d}um.tif" for d in range(100, 150, 5) if d != 120])
    with pytest.raises(ScanError, match=r"no slice number 120 in steps of 5 \(found numbers 100-115, 125-145\)"):
        open_scan(tmp_path)


def test_first_channel_does_not_trust_a_projection_beside_channel_one(tmp_path):
    from gpuheart.io import first_channel

    _slices(tmp_path, [f"heart_C01_Z{z:04d}.tif" for z in range(5)] + ["MAX_heart.tif"])
    with pytest.raises(ScanError, match="different slice counts"):
        first_channel(tmp_path)


# -- a folder of one multi-page TIFF per channel ---------------------------------------------------------

def _stacks(folder, names, shape=(6, 8, 10), **kw):
    """One stack per name, stack i filled with 100 * i + z (so a slice's value gives its channel and z)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        vol = (100 * i + np.arange(shape[0], dtype=np.uint16))[:, None, None] * np.ones(shape, np.uint16)
        tifffile.imwrite(folder / name, vol, **kw)
    return folder


@pytest.mark.parametrize("names,channels", [
    (["C1-heart.tif", "C2-heart.tif"], ["C01", "C02"]),       # Fiji's Split Channels, then Save As
    (["heart_C00.tif", "heart_C01.tif"], ["C00", "C01"]),
    (["C00.tif", "C01.tif"], ["C00", "C01"]),                 # as `gpuheart phantom` writes its truth
    (["heart_ch1.tif", "heart_ch2.tif"], ["C01", "C02"]),
    (["heart_C01.ome.tif", "heart_C00.ome.tif", "heart_C02.ome.tif"], ["C00", "C01", "C02"]),
])
def test_a_folder_of_one_stack_per_channel_is_one_scan(tmp_path, names, channels):
    """It was read as per-slice files ('channels cover different slices (C01: Z0001, C02: Z0002)')."""
    from gpuheart.io import first_channel

    folder = _stacks(tmp_path / "scan", names, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 3.0, "unit": "um"})
    value = {f"C{int(gpuheart.io._CHANNEL_RE.findall(n)[-1]):02d}": 100 * i for i, n in enumerate(names)}
    with open_scan(folder) as s:
        assert s.channels == channels and s.shape == (6, 8, 10) and s.format == "tiff-channels"
        assert s.voxel_size == pytest.approx((3.0, 0.5, 0.5))
        for c in channels:
            assert [int(v) for v in s.read_slab(c, 0, 6)[:, 0, 0]] == [value[c] + z for z in range(6)]
            assert s.slice_file(c, 4).name == names[value[c] // 100]
        slabs = list(s.iter_slabs(channels[-1], 4, halo=1))
        assert [(b.z0, b.z1, b.lo, b.hi) for b in slabs] == [(0, 4, 0, 1), (4, 6, 1, 0)]
        assert int(slabs[1].core[0, 0, 0]) == value[channels[-1]] + 4
        d = s.describe()
        assert d["nbytes"] == len(names) * 6 * 8 * 10 * 2 and d["compression"] == "NONE"
    with open_scan(folder, channels=[channels[1]]) as s:
        assert s.channels == [channels[1]] and int(s.read_slice(0, 2)[0, 0]) == value[channels[1]] + 2
    assert first_channel(folder) == channels[0]


def test_only_the_channels_asked_for_are_opened_from_a_folder_of_stacks(tmp_path):
    folder = _stacks(tmp_path / "scan", ["heart_C00.tif", "heart_C01.tif"])
    (folder / "heart_C01.tif").write_bytes((folder / "heart_C01.tif").read_bytes()[:300])
    with open_scan(folder, channels=["C00"]) as s:
        assert int(s.read_slice("C00", 5)[0, 0]) == 5
    with pytest.raises(ScanError, match="heart_C01.tif: truncated"):
        open_scan(folder)
    (folder / "heart_C01.tif").write_bytes(b"")   # unreadable: reported as the channel's file, not as a slice
    with pytest.raises(ScanError, match=r"heart_C01.tif: not a TIFF file \(the file is empty"):
        open_scan(folder)
    with open_scan(folder, channels="C00") as s:
        assert s.channels == ["C00"]


def test_a_channels_stack_that_is_a_broken_link_is_named_not_dropped(tmp_path):
    """It was left out of the scan: the run went on with the other channels, or said there was no such channel."""
    import os

    folder = _stacks(tmp_path / "scan", ["heart_C00.tif", "heart_C01.tif", "heart_C02.tif"])
    gone = folder / "heart_C02.tif"
    gone.unlink()
    os.symlink(tmp_path / "unmounted" / gone.name, gone)
    for channels in (None, ["C02"]):
        with pytest.raises(ScanError) as err:
            open_scan(folder, channels=channels)
        msg = str(err.value)
        assert str(gone) in msg and "broken link" in msg and "multi-page TIFF" in msg
    with open_scan(folder, channels=["C00", "C01"]) as s:   # the others still open by themselves
        assert s.channels == ["C00", "C01"] and int(s.read_slice("C01", 5)[0, 0]) == 105


@pytest.mark.parametrize("second,message", [
    ({"shape": (5, 8, 10)}, r"heart_C01.tif: channel C01 is \(5, 8, 10\) \(z, y, x\) uint16, but heart_C00.tif "
                            r"\(channel C00\) is \(6, 8, 10\) uint16"),
    ({"dtype": np.uint8}, r"heart_C01.tif: channel C01 is \(6, 8, 10\) \(z, y, x\) uint8, but heart_C00.tif"),
])
def test_stacks_of_another_shape_or_dtype_name_both_files(tmp_path, second, message):
    folder = _stacks(tmp_path / "scan", ["heart_C00.tif"])
    shape = second.get("shape", (6, 8, 10))
    tifffile.imwrite(folder / "heart_C01.tif", np.zeros(shape, second.get("dtype", np.uint16)))
    with pytest.raises(ScanError, match=message):
        open_scan(folder)


def test_the_voxel_size_of_a_folder_of_stacks(tmp_path):
    """The files that give one agree: it is theirs; they disagree: unknown, with both named."""
    def write(name, spacing=None):
        meta = {"axes": "ZYX", "unit": "um", **({"spacing": spacing} if spacing else {})}
        tifffile.imwrite(tmp_path / name, np.zeros((4, 6, 6), np.uint16), imagej=True,
                         **({"resolution": (2.0, 2.0), "metadata": meta} if spacing else {"metadata": {"axes": "ZYX"}}))

    write("C1-heart.tif", 3.0)
    write("C2-heart.tif")   # uncalibrated: it says nothing against C1's
    with open_scan(tmp_path) as s:
        assert s.voxel_size == pytest.approx((3.0, 0.5, 0.5))
    write("C3-heart.tif", 5.0)
    with pytest.warns(UserWarning, match=r"different voxel sizes \(C1-heart.tif: 3 x 0.5 x 0.5 µm, C3-heart.tif: "
                                         r"5 x 0.5 x 0.5 µm\).*--voxel-size"):
        with open_scan(tmp_path) as s:
            assert s.voxel_size is None
    with open_scan(tmp_path, voxel_size=(4, 1, 1)) as s:
        assert s.voxel_size == (4.0, 1.0, 1.0)


@pytest.mark.parametrize("names,message", [
    (["heart_488.tif", "heart_561.tif"], r"holds 2 multi-page TIFFs \(heart_488.tif, heart_561.tif; 6 pages each\), "
                                         r"and 'heart_488.tif' has no channel token; .*heart_C00.tif, heart_C01.tif"),
    (["a_C00.tif", "b_C00.tif"], r"'a_C00.tif' and 'b_C00.tif' are both channel C00; expected one multi-page TIFF "
                                 r"per channel"),
    ([f"heart_z{z:03d}.tif" for z in range(3)], r"named like slices \(Z tokens: heart_z000.tif.*\) but hold 6 pages "
                                                r"each \(channels of one slice\?\); expected one 2D slice per file"),
])
def test_stacks_that_are_not_one_per_channel_are_refused_by_name(tmp_path, names, message):
    _stacks(tmp_path, names)
    with pytest.raises(ScanError, match=message):
        open_scan(tmp_path)


def test_per_slice_files_of_two_pages_each_are_not_told_to_be_given_alone(tmp_path):
    """Each file holding a slice's two channels (CYX): the hint to give 'the file itself' opened one slice."""
    for z in range(4):
        tifffile.imwrite(tmp_path / f"heart_z{z:03d}.tif", np.zeros((2, 6, 6), np.uint16), imagej=True,
                         metadata={"axes": "CYX"})
    with pytest.raises(ScanError, match=r"hold 2 pages each \(channels of one slice\?\)") as err:
        open_scan(tmp_path)
    assert "give the file itself" not in str(err.value)


def test_stacks_mixed_with_slices_are_refused(tmp_path):
    _stacks(tmp_path / "a", ["heart_C00.tif", "heart_C01.tif"])
    tifffile.imwrite(tmp_path / "a" / "heart_C02.tif", np.zeros((8, 10), np.uint16))
    with pytest.raises(ScanError, match=r"holds multi-page TIFFs \(heart_C00.tif, heart_C01.tif\) and single-page "
                                        r"ones \(e.g. heart_C02.tif\)"):
        open_scan(tmp_path / "a")
    _slices(tmp_path / "b", [f"heart_{z:04d}.tif" for z in range(4)])
    tifffile.imwrite(tmp_path / "b" / "heart_0004.tif", np.zeros((5, 6, 6), np.uint16))
    with pytest.raises(ScanError, match=r"heart_0004.tif: holds 5 page\(s\).*a multi-page TIFF among slices such as "
                                        r"heart_0000.tif: move it elsewhere"):
        open_scan(tmp_path / "b")


def test_a_hyperstack_in_a_folder_of_stacks_is_refused(tmp_path):
    _stacks(tmp_path, ["heart_C00.tif"])
    tifffile.imwrite(tmp_path / "heart_C01.tif", np.zeros((6, 2, 8, 10), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    with pytest.raises(ScanError, match=r"heart_C01.tif: holds 2 channels; expected one channel per file"):
        open_scan(tmp_path)


# -- units of a calibration -------------------------------------------------------------------------------

def _imagej(path, unit, px_per_unit, spacing=None, nz=4):
    meta = {"axes": "ZYX", "unit": unit, **({"spacing": spacing} if spacing is not None else {})}
    tifffile.imwrite(path, np.zeros((nz, 6, 6), np.uint16), imagej=True, resolution=(px_per_unit, px_per_unit),
                     metadata=meta)
    return path


@pytest.mark.parametrize("unit", ["Micron", "UM", "micrometers", "Micrometres", "microns", " Um ", "\\u00B5M"])
def test_micrometre_spellings_are_micrometres_in_any_case_or_number(tmp_path, unit):
    """They were matched exactly: "Micron" or "UM" left the scan uncalibrated, silently."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_scan(_imagej(tmp_path / "s.tif", unit, 2.0, spacing=3.0)) as s:
            assert s.voxel_size == pytest.approx((3.0, 0.5, 0.5))


def test_other_units_in_any_case_or_number_are_converted(tmp_path):
    with open_scan(_imagej(tmp_path / "mm.tif", "Millimeters", 2000.0, spacing=0.003)) as s:
        assert s.voxel_size == pytest.approx((3.0, 0.5, 0.5))
    with open_scan(_imagej(tmp_path / "in.tif", "inches", 2000.0, spacing=0.001)) as s:
        assert s.voxel_size == pytest.approx((25.4, 12.7, 12.7))


@pytest.mark.parametrize("unit, px_per_unit, pixel", [("cm", 20000.0, 0.5), ("inch", 50800.0, 0.5),
                                                      ("nm", 0.002, 0.5)])
def test_a_stack_without_spacing_in_a_unit_other_than_um_has_no_z_step(tmp_path, unit, px_per_unit, pixel):
    """ImageJ leaves spacing out when it is 1 in the stack's unit: 1 cm gave voxels of 10000 x 0.5 x 0.5 µm."""
    with pytest.warns(UserWarning, match=rf"pixel size \({pixel:g} x {pixel:g} µm\) but no z step \(no spacing, which "
                                         rf"ImageJ leaves out when it is 1 {unit}.*--voxel-size Z {pixel:g} {pixel:g}"):
        with open_scan(_imagej(tmp_path / "s.tif", unit, px_per_unit)) as s:
            assert s.voxel_size is None
    with open_scan(_imagej(tmp_path / "um.tif", "micron", 2.0)) as s:   # 1 µm: a z step, as ImageJ means it
        assert s.voxel_size == pytest.approx((1.0, 0.5, 0.5))


@pytest.mark.parametrize("dpi", [72.0, 96.0])
def test_inch_at_72_or_96_dpi_is_no_calibration(tmp_path, dpi):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_scan(_imagej(tmp_path / "s.tif", "inch", dpi, spacing=1.0)) as s:
            assert s.voxel_size is None


def test_an_unknown_unit_is_named_and_pixels_are_not(tmp_path):
    import warnings

    with pytest.warns(UserWarning, match=r"calibration in 'furlong', a unit gpuheart does not know.*--voxel-size Z Y X"):
        with open_scan(_imagej(tmp_path / "f.tif", "furlong", 2.0, spacing=3.0)) as s:
            assert s.voxel_size is None
    f = tmp_path / "o.ome.tif"
    tifffile.imwrite(f, np.zeros((3, 6, 6), np.uint16), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 3.0, "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "parsec",
        "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "parsec"})
    with pytest.warns(UserWarning, match=r"o.ome.tif: the OME metadata gives its calibration in 'parsec'"):
        open_scan(f).close()
    axes = [{"name": a, "type": "space", "unit": "league"} for a in "zyx"]
    store = _ngff(tmp_path / "u.ome.zarr", [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}]}])
    with pytest.warns(UserWarning, match=r"u.ome.zarr: the OME-NGFF metadata gives its calibration in 'league'"):
        open_scan(store).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for unit in ("pixel", "pixels", "Pixels"):
            with open_scan(_imagej(tmp_path / "p.tif", unit, 1.0)) as s:
                assert s.voxel_size is None


# -- axis order of plain zarr arrays ------------------------------------------------------------------------

def _zcyx():
    return volume((5, 2, 6, 7))   # z, c, y, x: more slices than channels, as in any scan


def test_a_zarr_3_arrays_dimension_names_give_its_axes(tmp_path):
    """A (z, c, y, x) array was read as (c, z, y, x), silently: 5 'channels' of 2 slices."""
    zarr = pytest.importorskip("zarr")
    if gpuheart.io._zarr_major() < 3:
        pytest.skip("dimension_names is zarr 3's")
    vol = _zcyx()
    arr = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=vol.shape, dtype=vol.dtype, chunks=(1, 1, 6, 7),
                            zarr_format=3, dimension_names=["Z", "channel", "y", "x"])
    arr[:] = vol
    with open_scan(tmp_path / "a.zarr") as s:
        assert s.channels == ["C00", "C01"] and s.shape == (5, 6, 7)
        np.testing.assert_array_equal(s.read_slab("C01", 1, 4), vol[1:4, 1])


def test_xarray_dimension_names_give_a_zarr_arrays_axes(tmp_path):
    zarr = pytest.importorskip("zarr")
    vol = _zcyx()
    zarr.save_array(str(tmp_path / "x.zarr"), vol)
    arr = zarr.open_array(str(tmp_path / "x.zarr"), mode="r+")
    arr.attrs["_ARRAY_DIMENSIONS"] = ["z", "c", "y", "x"]
    with open_scan(tmp_path / "x.zarr") as s:
        assert s.channels == ["C00", "C01"] and s.shape == (5, 6, 7)
        np.testing.assert_array_equal(s.read_slice("C00", 4), vol[4, 0])
    arr.attrs["_ARRAY_DIMENSIONS"] = ["z", "channels", "y", "x"]
    with open_scan(tmp_path / "x.zarr") as s:
        assert s.channels == ["C00", "C01"] and s.shape == (5, 6, 7)
    arr.attrs["_ARRAY_DIMENSIONS"] = ["z", "z", "y", "x"]
    with pytest.raises(ScanError, match=r"x.zarr: axes \['z', 'z', 'y', 'x'\] name an axis twice"):
        open_scan(tmp_path / "x.zarr")
    zarr.save_array(str(tmp_path / "d.zarr"), vol[:, 0])   # xarray's default names: taken by position
    zarr.open_array(str(tmp_path / "d.zarr"), mode="r+").attrs["_ARRAY_DIMENSIONS"] = ["dim_0", "y", "x"]
    with open_scan(tmp_path / "d.zarr") as s:
        assert s.shape == (5, 6, 7)


def test_a_time_unit_is_no_plural_of_a_length():
    from gpuheart.io import _unit_factor

    assert _unit_factor("ms") is None and _unit_factor("m") == 1e6
    assert _unit_factor("Microns") == _unit_factor("micrometres") == 1.0 and _unit_factor("inches") == 25400.0


def test_an_unnamed_4d_zarr_array_with_more_channels_than_slices_is_warned_about(tmp_path):
    import warnings

    zarr = pytest.importorskip("zarr")
    vol = _zcyx()
    zarr.save_array(str(tmp_path / "u.zarr"), vol)
    with pytest.warns(UserWarning, match=r"u.zarr: a 4-D zarr array without axis names is read as \(c, z, y, x\), "
                                         r"which makes its shape \(5, 2, 6, 7\) 5 channels of 2 slices; .*"
                                         r"_ARRAY_DIMENSIONS"):
        with open_scan(tmp_path / "u.zarr") as s:
            assert len(s.channels) == 5   # read as it always was: the warning says how to say otherwise
    arr = zarr.open_array(str(tmp_path / "u.zarr"), mode="r+")
    arr.attrs["_ARRAY_DIMENSIONS"] = ["dim_0", "dim_1", "dim_2", "dim_3"]   # xarray's names for unnamed axes
    with pytest.warns(UserWarning, match="without axis names"):
        open_scan(tmp_path / "u.zarr").close()
    zarr.save_array(str(tmp_path / "c.zarr"), volume((2, 5, 6, 7)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # (c, z, y, x) with fewer channels than slices: nothing to say
        with open_scan(tmp_path / "c.zarr") as s:
            assert s.channels == ["C00", "C01"]


# -- more names ---------------------------------------------------------------------------------------------

def test_micro_manager_2_channel_tokens(tmp_path):
    """"channel000" was no channel token: the folder was refused as one channel with two files per slice."""
    names = [f"img_channel{c:03d}_position000_time000000000_z{z:03d}.tif" for c in (0, 1) for z in range(3)]
    _slices(tmp_path, names, lambda i: 100 * (i // 3) + i % 3)
    with open_scan(tmp_path) as s:
        assert s.channels == ["C00", "C01"] and s.shape[0] == 3
        assert [int(s.read_slice("C01", z)[0, 0]) for z in range(3)] == [100, 101, 102]


@pytest.mark.parametrize("name,channel", [
    ("img_channel002_z000.tif", 2), ("heart_Channel1_Z0000.tif", 1), ("channel3-heart_0000.tif", 3),
    ("heart_channels_0000.tif", None), ("heart_channel_1_0000.tif", None), ("heart_ch2annel_0000.tif", None),
])
def test_the_channel_word_is_a_channel_token_only_before_its_digits(name, channel):
    found = gpuheart.io._CHANNEL_RE.findall(name)
    assert (int(found[-1]) if found else None) == channel


def test_an_n5_container_is_named_as_one(tmp_path):
    n5 = tmp_path / "scan.n5"
    (n5 / "s0").mkdir(parents=True)
    (n5 / "attributes.json").write_text('{"n5": "2.5.1"}')
    (n5 / "s0" / "attributes.json").write_text('{"dimensions": [8, 8, 4], "dataType": "uint16"}')
    for path in (n5, n5 / "s0"):
        with pytest.raises(ScanError, match=r"an N5 container .*which gpuheart does not read; .*convert it to "
                                            r"OME-Zarr \(e.g. with bioformats2raw"):
            open_scan(path)


def test_a_channel_named_in_the_wrong_case_gets_the_right_name_offered(tmp_path):
    folder = _stacks(tmp_path / "scan", ["heart_C00.tif", "heart_C01.tif"])
    with pytest.raises(ScanError, match=r"unknown channel\(s\) 'c01'; available: C00, C01 \(names are "
                                        r"case-sensitive: 'c01' -> 'C01'\)"):
        open_scan(folder, channels=["c01"])
