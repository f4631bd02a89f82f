"""Opening scans lazily, iterating slabs with halos, writing masks atomically.

Four sources are understood (see :func:`open_scan`): a multi-page TIFF (plain, ImageJ or OME, with an
optional channel axis), a folder of one TIFF per z-slice per channel as a LaVision UltraMicroscope
writes it, a folder of one multi-page TIFF per channel (Fiji's "Split Channels", saved), and a Zarr /
OME-Zarr store. Whatever the source, a :class:`Scan` reads one slice or one slab
only when asked: the scan itself is never loaded whole, because light-sheet hearts are tens of GB.

Every failure is a :class:`ScanError` whose one-line message names the file and what was expected.
Writers (:class:`ZarrWriter`, :func:`write_tiff`) write to ``<final>.partial`` and rename on success,
so an interrupted run never leaves an output that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ScanError", "Scan", "Slab", "open_scan", "ZarrWriter", "write_tiff", "lavision_filename",
]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_SUFFIXES = (".tif", ".tiff")
# a channel token ends where its digits end, or at a slice token: "_C57BL6" (a mouse strain) is no channel 57,
# "_C01Z0000" is channel 1; "_ch1" counts. Slice tokens: "Z0000" anywhere (as LaVision writes them), and a
# lower-case "z000" where no letter precedes it (so the z of "xyz" or "size3" is none)
# a channel token starts the name or follows "_", "-" or a space: "_C00", "ch1_0000", "heart-ch0-z000", and
# Micro-Manager 2's "img_channel000_position000_time000000000_z000"
_CHANNEL_RE = re.compile(r"(?:^|(?<=[_\- ]))c(?:h(?:annel)?)?(\d+)(?![0-9])(?!(?!z\d)[a-z])", re.IGNORECASE)
_Z_RE = re.compile(r"(?:Z|(?<![A-Za-z])z)(\d+)")
# Conversion of the length units found in OME/ImageJ/NGFF metadata to micrometres.
# OME's UnitsLength symbols and NGFF's (UDUNITS-2) names, for the lengths a microscope can give.
_UNIT_UM = {
    "µm": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "\\u00B5m": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6, "meter": 1e6,
    "Å": 1e-4, "\u212b": 1e-4, "angstrom": 1e-4, "pm": 1e-6, "picometer": 1e-6, "nanometre": 1e-3,
    "millimetre": 1e3, "centimeter": 1e4, "centimetre": 1e4, "dm": 1e5, "decimeter": 1e5, "metre": 1e6,
    "in": 25400.0, "inch": 25400.0, "ft": 304800.0, "foot": 304800.0,
}
# looked up in lower case and singular: Fiji's "Micron", "UM", "micrometers" are all µm
_UNIT_LOWER = {k.lower(): v for k, v in _UNIT_UM.items()} | {"feet": 304800.0}
_UNCALIBRATED_UNITS = ("", "pixel", "pixels", "px")


def lavision_filename(prefix: str, channel: int, z: int) -> str:
    """The per-slice file name a LaVision UltraMicroscope writes: ``<prefix>_C00_xyz-Table Z0000.ome.tif``."""
    return f"{prefix}_C{channel:02d}_xyz-Table Z{z:04d}.ome.tif"


class ScanError(ValueError):
    """Any failure to open, read or write a scan; the message names the file and what was expected."""


# -- plain data -----------------------------------------------------------------------------------

@dataclass
class Slab:
    """Slices ``[z0, z1)`` of one channel plus ``lo``/``hi`` halo slices below/above.

    ``data`` covers ``[z0 - lo, z1 + hi)``; the halo is clipped at the scan ends, so ``lo`` is 0 for
    the first slab and ``hi`` 0 for the last.
    """

    z0: int
    z1: int
    lo: int
    hi: int
    data: np.ndarray

    @property
    def core(self) -> np.ndarray:
        """``data`` without the halo: exactly slices ``[z0, z1)``."""
        return self.data[self.lo:self.lo + (self.z1 - self.z0)]


@dataclass
class Scan:
    """An opened scan: metadata now, pixels on demand. Use as a context manager or call :meth:`close`."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    channels: list[str]
    voxel_size: tuple[float, float, float] | None
    format: str = "tiff"
    _source: Any = field(default=None, repr=False, compare=False)

    # reading --------------------------------------------------------------------------------
    def _channel_index(self, channel: str | int) -> int:
        if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
            if 0 <= channel < len(self.channels):
                return int(channel)
        elif channel in self.channels:
            return self.channels.index(channel)
        raise ScanError(f"{self.path}: no channel {channel!r} (available: {', '.join(self.channels)})")

    def _src(self):
        if self._source is None:
            raise ScanError(f"{self.path}: scan is closed (expected an open scan; use open_scan again)")
        return self._source

    def read_slice(self, channel: str | int, z: int) -> np.ndarray:
        """Slice ``z`` of ``channel`` as a (y, x) array."""
        return self.read_slab(channel, z, z + 1)[0]

    def read_slab(self, channel: str | int, z0: int, z1: int) -> np.ndarray:
        """Slices ``[z0, z1)`` of ``channel`` as a (z, y, x) array (a fresh array, never a view of a cache)."""
        c = self._channel_index(channel)
        nz = self.shape[0]
        if not (isinstance(z0, (int, np.integer)) and isinstance(z1, (int, np.integer))
                and 0 <= z0 <= z1 <= nz):
            raise ScanError(f"{self.path}: slab [{z0}, {z1}) is outside the scan "
                            f"(expected 0 <= z0 <= z1 <= {nz})")
        return self._src().read(c, int(z0), int(z1))

    def slice_file(self, channel: str | int, z: int) -> Path:
        """The file slice ``z`` of ``channel`` is read from: its own file in a per-slice folder, else the
        scan itself (for messages that must name the file at fault)."""
        src, c = self._src(), self._channel_index(channel)
        if isinstance(src, _ChannelView):
            src, c = src.src, src.index[c]
        if isinstance(src, _TiffFolder):
            return src.files[src.names[c]][z]
        if isinstance(src, _TiffChannels):
            return src.files[src.names[c]]
        return self.path

    def iter_slabs(self, channel: str | int, slab_size: int, halo: int = 0) -> Iterator[Slab]:
        """Yield consecutive :class:`Slab` s of ``slab_size`` core slices, each with up to ``halo``
        neighbouring slices on either side (clipped at the scan ends). One slab is read per step."""
        self._channel_index(channel)
        if int(slab_size) < 1 or int(halo) < 0:
            raise ScanError(f"{self.path}: slab_size={slab_size}, halo={halo}; "
                            f"expected slab_size >= 1 and halo >= 0")
        nz = self.shape[0]
        for z0 in range(0, nz, slab_size):
            z1 = min(z0 + slab_size, nz)
            lo, hi = min(halo, z0), min(halo, nz - z1)
            yield Slab(z0, z1, lo, hi, self.read_slab(channel, z0 - lo, z1 + hi))

    # description and lifetime --------------------------------------------------------------
    def describe(self) -> dict:
        """Plain-data summary for ``gpuheart info``: path, format, shape, dtype, channels, voxel size,
        uncompressed size (``nbytes``), size on disk (``disk_bytes``) and compression."""
        src = self._src()
        return {
            "path": str(self.path),
            "format": self.format,
            "shape": tuple(self.shape),
            "dtype": str(self.dtype),
            "channels": list(self.channels),
            "voxel_size": self.voxel_size,
            "nbytes": int(np.prod(self.shape)) * self.dtype.itemsize * len(self.channels),
            "disk_bytes": src.disk_bytes(),
            "compression": src.compression(),
        }

    def close(self) -> None:
        """Release open file handles; reading afterwards is an error. Safe to call twice."""
        if self._source is not None:
            self._source.close()
            self._source = None

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- helpers --------------------------------------------------------------------------------------

def _fmt_z(z: int) -> str:
    return f"Z{z:04d}"


def _runs(zs: Sequence[int], fmt=_fmt_z, step: int = 1) -> str:
    """'Z0000-Z0006, Z0008-Z0019' for sorted z indices (``fmt=str``: '0-6, 8-19'; runs of numbers ``step``
    apart)."""
    out, start = [], None
    for i, z in enumerate(zs):
        if start is None:
            start = z
        if i + 1 == len(zs) or zs[i + 1] != z + step:
            out.append(fmt(start) if start == z else f"{fmt(start)}-{fmt(z)}")
            start = None
    return ", ".join(out)


def _corrupt_reason(err: Exception, errors: list) -> str:
    """Why tifffile could not open a file: the reason it logged, else its exception (it may log the reason
    and raise only IndexError(0))."""
    if errors:
        return errors[0].getMessage()
    return "no image page where its header points" if isinstance(err, IndexError) else f"{type(err).__name__}: {err}"


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


@contextlib.contextmanager
def _tifffile_errors():
    """Collect what tifffile only logs (a broken IFD chain, i.e. a truncated file) so we can raise it."""
    records: list[logging.LogRecord] = []

    class _Grab(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                records.append(record)

    logger = logging.getLogger("tifffile")
    handler, propagate = _Grab(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # the message reaches the user once, as a ScanError
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _open_tiff(path: Path):
    """A tifffile.TiffFile, or a ScanError naming the file; all IFDs are walked only by the caller."""
    import tifffile

    if not _is_tiff(path):
        empty = " (the file is empty: 0 bytes)" if path.is_file() and path.stat().st_size == 0 else ""
        raise ScanError(f"{path}: not a TIFF file{empty} (expected a TIFF, a folder of TIFFs or a Zarr store)")
    try:
        with _tifffile_errors():  # what it logs about a damaged tag: the callers' checks report the damage
            return tifffile.TiffFile(path)
    except Exception as err:
        raise ScanError(f"{path}: truncated or corrupt TIFF ({err}); expected a readable TIFF header") from err


def _page_end(page) -> int:
    offs, counts = page.dataoffsets, page.databytecounts
    return max((o + n for o, n in zip(offs, counts)), default=0)


def _unit_factor(unit) -> float | None:
    """Micrometres per ``unit`` (any case, singular or plural: "Microns", "UM", "inches"), None when unknown."""
    u = str(unit).strip().lower()
    # plurals of names only: "ms" is no plural of "m" (a time unit would become metres)
    plural = len(u) > 3
    for cand in (u, u[:-1] if plural and u.endswith("s") else None, u[:-2] if plural and u.endswith("es") else None):
        if cand and cand in _UNIT_LOWER:
            return _UNIT_LOWER[cand]
    return None


def _to_um(value: float, unit: str | None) -> float | None:
    if unit is None:
        return float(value)
    factor = _unit_factor(unit)
    return None if factor is None else float(value) * factor


def _unknown_unit_advice(where, unit, what: str) -> str | None:
    """What to do about a calibration in a unit that is not known (None for "pixel", i.e. uncalibrated)."""
    if str(unit).strip().lower() in _UNCALIBRATED_UNITS or _unit_factor(unit) is not None:
        return None
    return (f"{where}: the {what} gives its calibration in {str(unit).strip()!r}, a unit gpuheart does not know, so "
            f"the voxel size is unknown; give it in µm with --voxel-size Z Y X (Python: voxel_size=(z, y, x))")


def _voxel_from_tiff(tif, advice: list[str]) -> tuple[float, float, float] | None:
    """(z, y, x) µm from OME PhysicalSize* or ImageJ spacing/resolution; None when not calibrated. What
    the user could do about a partial calibration goes to ``advice``; open_scan warns with it unless a
    voxel size was given (a list, not a warning here: silencing one with catch_warnings would change the
    process-wide filters, which is not safe where other threads run)."""
    try:
        if tif.is_ome and tif.ome_metadata:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
            if pixels is not None:
                size = []
                for ax in "ZYX":
                    v = pixels.get(f"PhysicalSize{ax}")
                    size.append(None if v is None else _to_um(float(v), pixels.get(f"PhysicalSize{ax}Unit", "µm")))
                if all(s is not None and s > 0 for s in size):
                    return tuple(size)
                odd = next((pixels.get(f"PhysicalSize{ax}Unit") for ax in "ZYX" if pixels.get(f"PhysicalSize{ax}")
                            is not None and _to_um(1.0, pixels.get(f"PhysicalSize{ax}Unit", "µm")) is None), None)
                if odd is not None:
                    advice += filter(None, [_unknown_unit_advice(tif.filehandle.path, odd, "OME metadata")])
                    return None
                if size[0] is None and all(s is not None and s > 0 for s in size[1:]):
                    # one plane per file often carries no z step: say what is known rather than drop it silently
                    advice.append(f"{tif.filehandle.path}: the OME metadata gives the pixel size ({size[1]:g} x "
                                  f"{size[2]:g} µm) but no z step (PhysicalSizeZ), so the voxel size is unknown; give "
                                  f"it with --voxel-size Z {size[1]:g} {size[2]:g} (Python: voxel_size=(z, y, x))")
                    return None
        if tif.is_imagej and tif.imagej_metadata:
            meta = tif.imagej_metadata
            unit = meta.get("unit")
            if not unit or _unit_factor(unit) is None:
                # ImageJ leaves uncalibrated images in "pixels"; any other unit it does not know is named
                advice += filter(None, [_unknown_unit_advice(tif.filehandle.path, unit or "", "ImageJ metadata")])
                return None
            tags = tif.pages.first.tags
            xr, yr = tags.get("XResolution"), tags.get("YResolution")
            if xr is None or yr is None:
                return None
            # resolution is pixels per unit
            x = xr.value[1] / xr.value[0]
            y = yr.value[1] / yr.value[0]
            if _unit_factor(unit) == _UNIT_UM["inch"] and {round(1 / x, 3), round(1 / y, 3)} <= {72.0, 96.0}:
                return None   # 72 or 96 dpi: the default resolution of many programs, not a calibration
            if "spacing" not in meta and (int(meta.get("images", 1)) <= 1 or _unit_factor(unit) != 1.0):
                # a stack omits spacing when it is 1 (in its unit): 1 µm is a plausible z step, but 1 cm or 1 inch
                # is ImageJ's default depth that nobody set; and one image never has it (Fiji's "Image Sequence"
                # writes such slices): the z step is unknown, not 1
                yx = tuple(_to_um(v, unit) for v in (y, x))
                why = ("a single image has no spacing" if int(meta.get("images", 1)) <= 1 else
                       f"no spacing, which ImageJ leaves out when it is 1 {str(unit).strip()}: a default, not a z "
                       f"step")
                if all(s is not None and s > 0 for s in yx):
                    advice.append(f"{tif.filehandle.path}: the ImageJ metadata gives the pixel size ({yx[0]:g} x "
                                  f"{yx[1]:g} µm) but no z step ({why}), so the voxel size "
                                  f"is unknown; give it with --voxel-size Z {yx[0]:g} {yx[1]:g} (Python: "
                                  f"voxel_size=(z, y, x))")
                return None
            z = float(meta.get("spacing", 1.0))   # ImageJ omits a stack's spacing when it equals 1 (µm here)
            size = tuple(_to_um(v, unit) for v in (z, y, x))
            return size if all(s is not None and s > 0 for s in size) else None
    except (ET.ParseError, ValueError, ZeroDivisionError, TypeError, KeyError):
        return None
    return None


def _compression_name(page) -> str:
    import tifffile

    try:
        return tifffile.COMPRESSION(int(page.compression)).name
    except (ValueError, TypeError):
        return str(page.compression)


# -- source: one multi-page TIFF ------------------------------------------------------------------

class _TiffStack:
    """A multi-page TIFF (plain, ImageJ or OME); the file handle stays open, pages are decoded on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.tif = _open_tiff(path)
        try:
            self._inspect()
        except Exception:
            self.tif.close()
            raise

    def _inspect(self) -> None:
        path, tif = self.path, self.tif
        size = path.stat().st_size
        with _tifffile_errors() as errors:
            try:
                series = tif.series[0]
                len(tif.pages)  # walks every IFD now, so a broken chain is reported at open time
            except Exception as err:
                raise ScanError(f"{path}: corrupt TIFF ({_corrupt_reason(err, errors)}); "
                                f"expected readable image pages") from err
        if errors:
            raise ScanError(f"{path}: truncated or corrupt TIFF ({errors[0].getMessage()}); "
                            f"expected a complete file")
        if getattr(series, "is_multifile", False) and len(tif.pages) == 1:
            # LaVision writes every slice's file with OME metadata naming the whole series: tifffile would read
            # the others through this one (checked against this file's size, missing ones found only late)
            raise ScanError(f"{path}: one file of a multi-file OME-TIFF series (its metadata names the other "
                            f"slices' files); expected the scan itself: give its folder, {path.parent}")
        pagewise = self._pagewise_stack(series)
        axes, shape = series.axes, tuple(series.shape)
        if pagewise is not None:
            axes, shape = "Q" + axes, (len(pagewise),) + shape
        if "S" in axes:
            hint = ""
            if axes.endswith("SYX") and shape[axes.index("S")] in (3, 4):
                # tifffile (to 2026 at least) stores a (3 or 4, y, x) array as planar RGB unless told otherwise
                hint = (f"; if its {shape[axes.index('S')]} planes are z-slices, save the stack again with "
                        f"tifffile.imwrite(path, stack, photometric='minisblack')")
            else:   # an RGB export of a stack (Fiji's "RGB Color", a screenshot-like TIFF)
                hint = ("; convert it to grayscale first (Fiji: Image > Type > 16-bit or 8-bit; or split the colours "
                        "into channels: Image > Color > Split Channels) and save it again")
            raise ScanError(f"{path}: image has colour samples (axes {axes}); expected grayscale (z, y, x){hint}")
        if axes[-2:] != "YX":
            raise ScanError(f"{path}: series axes {axes}; expected the last two axes to be Y, X")
        lead = [(a, n) for a, n in zip(axes[:-2], shape[:-2])]
        zlike = "ZIQ"
        if not any(a in zlike and n > 1 for a, n in lead) and any(a == "T" and n > 1 for a, n in lead):
            # Fiji's "Images to Stack" and many label exports store a z-stack as time frames; with no z axis
            # beside them, the frames can only be the slices
            zlike = "ZIQT"
            warnings.warn(f"{path}: its {dict(lead)['T']} time frames (axes {axes}) are read as z slices, as it "
                          f"has no z axis", UserWarning, stacklevel=4)
        zaxes = [a for a, n in lead if a in zlike and n > 1]
        other = [f"{a}={n}" for a, n in lead if a not in zlike + "C" and n > 1]
        if len(zaxes) > 1 or other:
            # tifffile labels the leading axes of a 4-D array it saved without axes "Q" (unknown)
            hint = ("; the file does not say which axis is which: save it again naming them, e.g. "
                    "tifffile.imwrite(path, stack, imagej=True, metadata={'axes': 'ZCYX'}), or in Fiji "
                    "(Image > Hyperstacks > Stack to Hyperstack)" if set(a for a, _ in lead) <= set("QI") else "")
            raise ScanError(f"{path}: series axes {axes} with shape {shape}; "
                            f"expected at most one z axis and one channel axis (C){hint}")
        self.lead_axes = [a for a, _ in lead]
        self.lead_shape = [n for _, n in lead]
        self.z_axis = next((i for i, (a, n) in enumerate(lead) if a in zlike and n > 1), None)
        self.c_axis = next((i for i, (a, _) in enumerate(lead) if a == "C"), None)
        nz = self.lead_shape[self.z_axis] if self.z_axis is not None else 1
        nc = self.lead_shape[self.c_axis] if self.c_axis is not None else 1
        self.series = series
        self.nplanes = int(np.prod(self.lead_shape, dtype=np.int64))
        self.shape = (nz, shape[-2], shape[-1])
        self.dtype = np.dtype(series.dtype)
        self.nchannels = nc
        self.keyframe = series.keyframe
        # Either every plane is its own page, or the data is one contiguous block (ImageJ > 4 GB,
        # tifffile "shaped" files whose later IFDs tifffile does not index).
        self.pages = series.pages if len(series.pages) == self.nplanes else None
        if pagewise is not None:
            self.pages = pagewise
        if self.pages is None:
            if series.dataoffset is None:
                raise ScanError(f"{path}: {len(series.pages)} of {self.nplanes} pages present; "
                                f"expected a complete file (truncated?)")
            need = series.dataoffset + self.nplanes * self._plane_bytes()
            if need > size:
                raise ScanError(f"{path}: truncated: pixel data needs {need} bytes, file has {size}")
        else:
            for i, page in enumerate(self.pages):
                if page is not None and _page_end(page) > size:
                    raise ScanError(f"{path}: truncated: pixel data of page {i} ends at byte "
                                    f"{_page_end(page)}, file has {size} bytes")
        self.voxel_advice: list[str] = []
        self.voxel_size = _voxel_from_tiff(tif, self.voxel_advice)
        self.format = "tiff-hyperstack" if self.c_axis is not None else "tiff"

    def _pagewise_stack(self, series) -> list | None:
        """The pages of a stack written one page per series (tifffile's ``TiffWriter.write`` called once per
        slice, its default ``contiguous=False``), which tifffile reports as one series per page; None when the
        file holds one series (reduced-resolution copies, i.e. thumbnails and pyramid levels, aside).

        Any other layout of several series (a second stack, a page of another shape among the slices) is
        refused: reading only the first series would give a scan of fewer slices that looks complete."""
        tif, path = self.tif, self.path
        main = [s for s in tif.series if not getattr(s.keyframe, "is_reduced", False)]
        if len(main) <= 1:
            return None
        if all(len(s.pages) == 1 and len(s.shape) == 2 and tuple(s.shape) == tuple(series.shape)
               and s.dtype == series.dtype and s.pages[0] is not None for s in main):
            return sorted((s.pages[0] for s in main), key=lambda p: p.index)
        desc = "; ".join(f"{s.axes} {tuple(s.shape)} {s.dtype} from page {s.keyframe.index}" for s in main[:4])
        more = f"; and {len(main) - 4} more" if len(main) > 4 else ""
        raise ScanError(f"{path}: holds {len(main)} image series ({desc}{more}); expected one (z, y, x) stack "
                        f"(or pages all of one shape and dtype): save the scan as a single series")

    def _plane_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def _plane(self, c: int, z: int) -> int:
        index = [0] * len(self.lead_shape)
        if self.z_axis is not None:
            index[self.z_axis] = z
        if self.c_axis is not None:
            index[self.c_axis] = c
        return int(np.ravel_multi_index(index, self.lead_shape)) if index else 0

    def read(self, c: int, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0,) + self.shape[1:], self.dtype)
        for k, z in enumerate(range(z0, z1)):
            i = self._plane(c, z)
            try:
                if self.pages is not None:
                    page = self.pages[i]
                    if _page_end(page) > os.path.getsize(self.path):
                        raise ScanError(f"{self.path}: slice {_fmt_z(z)} (page {i}) is truncated; "
                                        f"expected its pixel data to be complete")
                    out[k] = page.asarray().reshape(self.shape[1:])
                else:
                    fh = self.tif.filehandle
                    nbytes = self._plane_bytes()
                    fh.seek(self.series.dataoffset + i * nbytes)
                    buf = fh.read(nbytes)
                    if len(buf) != nbytes:
                        raise ScanError(f"{self.path}: slice {_fmt_z(z)} is truncated; "
                                        f"expected {nbytes} bytes, got {len(buf)}")
                    dt = self.dtype.newbyteorder(self.tif.byteorder)
                    out[k] = np.frombuffer(buf, dt).reshape(self.shape[1:])
            except ScanError:
                raise
            except Exception as err:
                raise ScanError(f"{self.path}: cannot read slice {_fmt_z(z)} (page {i}): {err}") from err
        return out

    def disk_bytes(self) -> int:
        return self.path.stat().st_size

    def compression(self) -> str:
        return _compression_name(self.keyframe)

    def close(self) -> None:
        self.tif.close()


# -- source: a folder of per-slice TIFFs ------------------------------------------------------------

def read_threads() -> int:
    """Threads that read the slices of one slab of a per-slice TIFF folder at once:
    ``GPUHEART_READ_THREADS`` if set, else the usable CPU cores, at most 8 (past that a disk, not
    the decoder, is usually what limits)."""
    env = os.environ.get("GPUHEART_READ_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ScanError(f"GPUHEART_READ_THREADS={env!r}: expected a whole number >= 1")
        return n
    return max(1, min(8, usable_cores()))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _TiffFolder:
    """One 2D TIFF per (channel, z). Files are opened only while a slice is read."""

    def __init__(self, path: Path, files: dict[str, list[Path]]):
        self.path = path
        self.files = files
        self.names = list(files)
        first = files[self.names[0]][0]
        self.shape2d, self.dtype, self.voxel_size, self._compression = None, None, None, "NONE"
        self.voxel_advice: list[str] = []
        for name in self.names:
            for f in files[name]:
                self._check_header(f, first)
        self.shape = (len(files[self.names[0]]),) + self.shape2d
        self.format = "tiff-folder"

    def _check_header(self, f: Path, first: Path) -> None:
        tif = _open_tiff(f)
        with tif, _tifffile_errors() as errors:
            try:
                page = tif.pages.first
                npages = len(tif.pages)
                shape, dtype = tuple(page.shape), np.dtype(page.dtype)
            except Exception as err:
                raise ScanError(f"{f}: corrupt TIFF ({_corrupt_reason(err, errors)}); expected one 2D image") from err
            if errors:
                raise ScanError(f"{f}: truncated or corrupt TIFF ({errors[0].getMessage()})")
            if npages != 1 or len(shape) != 2:
                # a folder whose first file is a stack was refused or opened as one stack per channel
                # (_channel_stacks): here a stack lies among slices
                stack = (f"; a multi-page TIFF among slices such as {first.name}: move it elsewhere, or give it "
                         f"alone" if npages > 1 and len(shape) == 2 and f != first else "")
                raise ScanError(f"{f}: holds {npages} page(s) of shape {shape}; "
                                f"expected one 2D grayscale slice per file in a folder of slices{stack}")
            if self.shape2d is None:
                self.shape2d, self.dtype = shape, dtype
                self.voxel_size = _voxel_from_tiff(tif, self.voxel_advice)
                self._compression = _compression_name(page)
            elif shape != self.shape2d or dtype != self.dtype:
                raise ScanError(f"{f}: slice is {shape} {dtype}; expected {self.shape2d} {self.dtype} "
                                f"like {first.name}")
            if _page_end(page) > f.stat().st_size:
                raise ScanError(f"{f}: truncated: pixel data ends at byte {_page_end(page)}, "
                                f"file has {f.stat().st_size} bytes")

    def read(self, c: int, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0,) + self.shape2d, self.dtype)
        jobs = [(out, k, self.files[self.names[c]][z], z) for k, z in enumerate(range(z0, z1))]
        # Slices are separate files, so they decode in parallel: tifffile/imagecodecs and the file
        # reads release the GIL, and one thread decoding a compressed slab is what a run waits on.
        threads = min(read_threads(), len(jobs))
        if threads <= 1:
            for job in jobs:
                self._read_into(*job)
            return out
        # one slice per thread, each decoded by its thread alone (tifffile would otherwise start its
        # own pool of strip decoders inside every one of ours)
        with ThreadPoolExecutor(threads, thread_name_prefix="gpuheart-read") as pool:
            futures = [pool.submit(self._read_into, *job, 1) for job in jobs]
            for fut in futures:
                if fut.exception() is not None:  # waits for this one; the rest need not be decoded
                    pool.shutdown(wait=True, cancel_futures=True)
                    break
        for fut in futures:  # the first bad slice in z order is raised
            if not fut.cancelled():
                fut.result()
        return out

    def _read_into(self, out: np.ndarray, k: int, f: Path, z: int, maxworkers: int | None = None) -> None:
        try:
            tif = _open_tiff(f)
            with tif:
                page = tif.pages.first
                if _page_end(page) > f.stat().st_size:
                    raise ScanError(f"{f}: slice {_fmt_z(z)} is truncated; expected complete pixel data")
                data = page.asarray(maxworkers=maxworkers)
        except ScanError:
            raise
        except Exception as err:
            raise ScanError(f"{f}: cannot read slice {_fmt_z(z)}: {err}") from err
        if data.shape != self.shape2d or data.dtype != self.dtype:
            raise ScanError(f"{f}: slice is {data.shape} {data.dtype}; expected {self.shape2d} {self.dtype}")
        out[k] = data

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for fs in self.files.values() for f in fs)

    def compression(self) -> str:
        return self._compression

    def close(self) -> None:
        pass


class _TiffChannels:
    """A folder of one multi-page TIFF per channel (Fiji's "Split Channels" saved: ``C1-heart.tif``,
    ``C2-heart.tif``): each channel is read from its own stack as a single stack is.

    The voxel size is the one the files give; a file that gives none does not count, and files that give
    different ones leave it unknown (with advice naming them), since one of them must be wrong."""

    def __init__(self, path: Path, files: dict[str, Path]):
        self.path, self.files, self.names = path, files, list(files)
        self.stacks: list[_TiffStack] = []
        try:
            for name, f in files.items():
                self.stacks.append(self._open(name, f))
        except Exception:
            self.close()
            raise
        first = self.stacks[0]
        self.shape, self.dtype = first.shape, first.dtype
        self.voxel_advice: list[str] = []
        self.voxel_size = self._voxel_size()
        self.format = "tiff-channels"

    def _open(self, name: str, f: Path) -> _TiffStack:
        stack = _TiffStack(f)
        if stack.nchannels != 1:
            stack.close()
            raise ScanError(f"{f}: holds {stack.nchannels} channels; expected one channel per file in a folder "
                            f"of one multi-page TIFF per channel (give this file alone to read its channels)")
        if self.stacks and (stack.shape, stack.dtype) != (self.stacks[0].shape, self.stacks[0].dtype):
            ref = self.stacks[0]
            stack.close()
            raise ScanError(f"{f}: channel {name} is {stack.shape} (z, y, x) {stack.dtype}, but {ref.path.name} "
                            f"(channel {self.names[0]}) is {ref.shape} {ref.dtype}; expected every channel's "
                            f"stack to have one shape and dtype")
        return stack

    def _voxel_size(self) -> tuple[float, float, float] | None:
        known = [(s.path, s.voxel_size) for s in self.stacks if s.voxel_size is not None]
        if not known:
            self.voxel_advice = next((s.voxel_advice for s in self.stacks if s.voxel_advice), [])
            return None
        (f0, v0), other = known[0], next(((f, v) for f, v in known[1:] if not np.allclose(v, known[0][1])), None)
        if other is None:
            return v0
        f1, v1 = other
        self.voxel_advice = [f"{self.path}: the channels' files give different voxel sizes ({f0.name}: "
                             f"{' x '.join(f'{x:g}' for x in v0)} µm, {f1.name}: {' x '.join(f'{x:g}' for x in v1)} "
                             f"µm), so the voxel size is unknown; give the right one with --voxel-size Z Y X "
                             f"(Python: voxel_size=(z, y, x))"]
        return None

    def read(self, c: int, z0: int, z1: int) -> np.ndarray:
        return self.stacks[c].read(0, z0, z1)

    def disk_bytes(self) -> int:
        return sum(s.disk_bytes() for s in self.stacks)

    def compression(self) -> str:
        return ", ".join(dict.fromkeys(s.compression() for s in self.stacks))

    def close(self) -> None:
        for s in self.stacks:
            s.close()


def _planes(path: Path) -> int:
    """How many 2D images the TIFF ``path`` holds (colour samples are one image); 0 when it cannot be read
    (whoever reads it as a slice says why)."""
    try:
        tif = _open_tiff(path)
    except ScanError:
        return 0
    with tif, _tifffile_errors():
        try:
            page = tif.pages.first
            if len(tif.pages) == 1 and tif.is_ome:
                # one page of OME: its own axes tell (tif.series would first open every file a LaVision slice's
                # OME metadata names, i.e. the whole scan, before this one is read again as a slice)
                return max(1, int(np.prod([n for a, n in zip(page.axes, page.shape) if a not in "YXS"],
                                          dtype=np.int64)))
            series = tif.series[0]
            if getattr(series, "is_multifile", False):   # a multi-file series: count this file
                return len(tif.pages)
            lead = [n for a, n in zip(series.axes, series.shape) if a not in "YXS"]
            return max(int(np.prod(lead, dtype=np.int64)), len(tif.pages))
        except Exception:
            return 0


def _list_names(files: Sequence[Path], n: int = 5) -> str:
    names = ", ".join(f.name for f in files[:n])
    return names + (f", ... ({len(files)} files)" if len(files) > n else "")


def _channel_stacks(path: Path, channels) -> dict[str, Path] | None:
    """The files of a folder holding one multi-page TIFF per channel, by channel name (only ``channels``,
    when given); None for any other folder (per-slice files, or a single file).

    The first readable file decides whether the folder is one of stacks (a folder of 10,000 slices is not probed
    file by file); then every file must be a stack with a channel token of its own, else the folder is
    refused by name: stacks of unknown channels, per-slice files of several channels each, or stacks mixed
    with slices would otherwise be read wrongly or half."""
    named = [p for p in path.iterdir() if _is_slice_file_name(p.name)]
    tiffs = sorted((p for p in named if p.is_file()), key=lambda p: _natural_key(p.name))
    if len(tiffs) < 2:
        return None
    pages = {}
    for f in tiffs:
        pages[f] = _planes(f)   # 0: unreadable, reported by whoever opens it (a damaged channel's stack, here)
        if not any(n > 1 for n in pages.values()):
            if pages[f] == 1:   # the first readable file is a slice: a folder of slices
                return None
            continue            # unreadable so far: the next file decides
        if pages[f] == 1:
            stacks = [g for g in pages if pages[g] > 1]
            raise ScanError(f"{path}: holds multi-page TIFFs ({_list_names(stacks)}) and single-page ones "
                            f"(e.g. {f.name}); expected either one 2D slice per file or one multi-page TIFF "
                            f"per channel (move the others elsewhere, or give one stack itself)")
    if not any(n > 1 for n in pages.values()):   # nothing readable: the slices' reader says what is wrong
        return None
    counts = set(pages.values()) - {0}
    each = f"{counts.pop()} pages each" if len(counts) == 1 else "several pages each"
    if len({z[-1] for z in (_Z_RE.findall(f.name) for f in tiffs) if z}) > 1:
        raise ScanError(f"{path}: its files are named like slices (Z tokens: {_list_names(tiffs, 3)}) but hold "
                        f"{each} (channels of one slice?); expected one 2D slice per file: save one TIFF per "
                        f"channel per slice (heart_C00_Z0000.tif), or one multi-page TIFF per channel "
                        f"(heart_C00.tif, heart_C01.tif)")
    numbers: dict[int, list[Path]] = {}
    for f in tiffs:
        if not _CHANNEL_RE.search(f.name):
            raise ScanError(f"{path}: holds {len(tiffs)} multi-page TIFFs ({_list_names(tiffs)}; {each}), and "
                            f"{f.name!r} has no channel token; expected one stack per channel named with its "
                            f"channel (heart_C00.tif, heart_C01.tif; or Fiji's C1-heart.tif), or give one file "
                            f"itself")
        numbers.setdefault(_channel_number(f.name), []).append(f)
    for c, fs in numbers.items():
        if len(fs) > 1:
            raise ScanError(f"{path}: {fs[0].name!r} and {fs[1].name!r} are both channel C{c:02d}; expected one "
                            f"multi-page TIFF per channel (put each scan in its own folder, or give one file "
                            f"itself)")
    # a channel's stack behind a link whose file is gone (a moved or unmounted disk) would otherwise vanish from
    # the scan, or be "no such channel" when asked for
    broken = {_channel_number(p.name): p for p in named if p.is_symlink() and not p.exists()
              and _CHANNEL_RE.search(p.name) and _channel_number(p.name) not in numbers}
    files = {f"C{c:02d}": (numbers[c][0] if c in numbers else broken[c]) for c in sorted({*numbers, *broken})}
    kept = _select_channels(path, list(files), channels)
    for name in kept:
        if not files[name].exists():
            _raise_broken(files[name], "a channel's multi-page TIFF")
    return {name: f for name, f in files.items() if name in kept}


def _is_slice_file_name(name: str) -> bool:
    """A TIFF that may be a slice of a per-slice folder: hidden files (macOS "._name.tif" resource forks) are not."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _TIFF_SUFFIXES


def _refuse_run_folder(path: Path):
    """A `gpuheart run` output folder given as a scan: name the volumes it holds, a level or two down."""
    stores = sorted(path.glob("*/*.ome.zarr"), key=lambda d: (d.name != "mask.ome.zarr", str(d)))
    stores = [d.relative_to(path).as_posix() for d in stores if _is_zarr_dir(d)]
    if (path / "input" / "scan").is_dir():   # the built-in scan a run without INPUT wrote
        stores.append("input/scan")
    more = f" and {len(stores) - 6} more" if len(stores) > 6 else ""
    listed = f": {', '.join(stores[:6])}{more}, e.g. {path / stores[0]}" if stores else ""
    raise ScanError(f"{path}: the output folder of a gpuheart run (summary.json), not a scan; expected one of the "
                    f"volumes in it{listed}")


def _holds_scan(d: Path) -> bool:
    try:
        return _is_zarr_dir(d) or any(_is_slice_file_name(f.name) and f.is_file() for f in d.iterdir())
    except OSError:  # unreadable sub-folder: not worth mentioning
        return False


def _channel_number(name: str) -> int:
    cm = _CHANNEL_RE.findall(name)
    return int(cm[-1]) if cm else 0


def _raise_broken(link: Path, expected: str = "a slice TIFF"):
    raise ScanError(f"{link}: a broken link to {os.readlink(link)}, which does not exist; expected {expected} "
                    f"(is the disk it points to mounted?)")


def _numbered_by_name(path: Path, channel: str, paths: list[Path]) -> tuple[list[tuple[int, Path]], int]:
    """(slice number, file) for slices without a Z token, and the step between slice numbers.

    The number is one that varies between the names and differs in every file ("slice_9", "slice_10"; with a
    frame counter and a time stamp both, they must give the same order). Numbers a regular step apart (every
    second slice exported, a depth in µm) step by it; gaps in such a sequence and duplicates are found as with
    Z tokens. Refused: a name of another pattern (a projection saved beside the slices) and names whose
    numbers repeat (a channel number without a channel token: read in name order, channel 1 would follow
    channel 0 as more slices). Names without digits keep their name order."""
    split = {p: re.split(r"(\d+)", p.name) for p in paths}
    if all(len(parts) == 1 for parts in split.values()):
        return list(enumerate(sorted(paths, key=lambda p: _natural_key(p.name)))), 1
    patterns: dict[tuple, list[Path]] = {}
    for p, parts in split.items():
        patterns.setdefault(tuple(t.lower() for t in parts[0::2]), []).append(p)
    if len(patterns) > 1:
        usual = max(patterns.values(), key=len)
        odd = min((ps for ps in patterns.values() if ps is not usual), key=len)
        raise ScanError(f"{path}: {odd[0].name!r} is not named like the other slices of channel {channel} (e.g. "
                        f"{usual[0].name!r}); expected only slices in the folder (move it elsewhere)")
    numbers = [[int(t) for t in split[p][1::2]] for p in paths]
    columns = [[row[j] for row in numbers] for j in range(len(numbers[0]))]
    varying = [col for col in columns if len(set(col)) > 1]
    unique = [col for col in varying if len(set(col)) == len(col)]
    orders = {tuple(sorted(range(len(paths)), key=col.__getitem__)) for col in unique}
    if len(orders) > 1 or (not unique and len(varying) > 1):
        first, last = sorted(paths, key=lambda p: _natural_key(p.name))[::len(paths) - 1]
        raise ScanError(f"{path}: the slice names of channel {channel} differ in {len(varying)} numbers "
                        f"({first.name!r} ... {last.name!r}), which do not agree on one order of the slices; "
                        f"expected one number that differs in every file, or Z<number> slice tokens (and channel "
                        f"tokens such as _C00 or _ch0)")
    # one varying number with repeats: duplicates, reported by the caller
    col = unique[0] if unique else (varying or columns)[-1]
    pairs = [(int(n), p) for n, p in zip(col, paths)]
    diffs = np.diff(sorted(col))
    if not diffs.size:
        return pairs, 1
    steps, counts = np.unique(diffs, return_counts=True)
    # a regular step (most differences) whose multiples are gaps; irregular numbers (time stamps) keep their order
    step = int(steps[np.argmax(counts)])
    regular = step > 0 and counts.max() * 2 > diffs.size and all(d % step == 0 for d in diffs)
    return pairs, (step if regular else 0)


def _numbers(name: str) -> list[int]:
    return [int(t) for t in re.findall(r"\d+", name)]


def _first_gap(zs: list[int], step: int) -> int | None:
    """The first number missing from the sorted ``zs`` counted in ``step``s (None: no gap, or no step)."""
    for a, b in zip(zs, zs[1:]):
        if step and b - a > step:
            return a + step
    return None


def _scan_folder(path: Path, channels=None) -> dict[str, list[Path]]:
    """Group per-slice TIFFs by channel, ordered by z, and check the z sequences are complete: those of
    ``channels`` (names, as for :func:`open_scan`) only, when given, so a damaged channel that is not asked
    for does not stop the others."""
    named = [p for p in path.iterdir() if _is_slice_file_name(p.name)]
    tiffs = [p for p in named if p.is_file()]
    # a link whose file is gone (a moved or unmounted disk) would otherwise be reported as a missing slice
    broken = {(_channel_number(p.name), p) for p in named if p.is_symlink() and not p.exists()}
    if not tiffs and broken:
        _raise_broken(min(broken)[1])
    if not tiffs and ((path / "attributes.json").is_file() or path.suffix.lower() == ".n5"):
        raise ScanError(f"{path}: an N5 container (or one of its datasets), which gpuheart does not read; expected "
                        f"a TIFF, a folder of TIFFs or a Zarr store: convert it to OME-Zarr (e.g. with "
                        f"bioformats2raw, or BigStitcher's export)")
    if not tiffs:
        # e.g. the folder `gpuheart phantom OUT` wrote, whose scan is OUT/scan
        if (path / "summary.json").is_file():
            _refuse_run_folder(path)
        subs = sorted(str(d) for d in path.iterdir() if d.is_dir() and _holds_scan(d))
        hint = f"; scans in its sub-folders: {', '.join(subs[:5])}{', ...' if len(subs) > 5 else ''}" if subs else ""
        if len({_channel_number(Path(d).name) for d in subs if _CHANNEL_RE.search(Path(d).name)}) > 1:
            # Ch0/, Ch1/: one folder per channel, which one scan cannot be read from
            hint += (" (if these are the channels of one scan, move their slices into one folder with a channel "
                     "token in every name, e.g. heart_C00_Z0000.tif, heart_C01_Z0000.tif, or give each folder "
                     "as an INPUT of its own)")
        raise ScanError(f"{path}: folder holds no TIFF files (expected *.tif/*.tiff slices){hint}")
    by_channel: dict[int, list[tuple[int | None, Path]]] = {}
    for p in tiffs:
        zm = _Z_RE.findall(p.name)
        by_channel.setdefault(_channel_number(p.name), []).append((int(zm[-1]) if zm else None, p))
    files: dict[str, list[Path]] = {}
    spans: dict[str, list[int]] = {}   # the Z numbers of channels named by Z token
    kept = set(_select_channels(path, [f"C{c:02d}" for c in sorted(by_channel)], channels))
    for c in sorted(by_channel):
        name = f"C{c:02d}"
        if name not in kept:
            continue
        for bc, b in sorted(broken):
            if bc == c:
                _raise_broken(b)
        items = by_channel[c]
        lacking = [p.name for z, p in items if z is None]
        if lacking and len(lacking) < len(items):   # e.g. a MIP saved beside the slices: it would be a slice
            raise ScanError(f"{path}: {lacking[0]!r} has no Z<number> slice token, unlike the other files of "
                            f"channel {name}; expected only slices in the folder (move it elsewhere)")
        fmt, step = _fmt_z, 1
        if lacking:
            (items, step), fmt = _numbered_by_name(path, name, [p for _, p in items]), "number {}".format
        items.sort(key=lambda t: (t[0], _natural_key(t[1].name)))
        zs = [z for z, _ in items]
        for a, b in zip(items, items[1:]):
            if a[0] == b[0]:
                # e.g. Zeiss's "_z01c1"/"_z01c2": channels gpuheart cannot tell from the name
                hint = (" (if they are two channels or tiles, rename them with a channel token such as _C00 or _ch0, "
                        "or put each in its own folder; if the Z is part of the sample's name, rename the files so "
                        "that Z<number> numbers the slices)"
                        if re.split(r"\d+", a[1].name) == re.split(r"\d+", b[1].name)
                        and _numbers(a[1].name) != _numbers(b[1].name) else "")
                raise ScanError(f"{path}: channel {name} has two files for slice {fmt(a[0])}: "
                                f"{a[1].name!r} and {b[1].name!r}; expected one{hint}")
        missing = _first_gap(zs, step)   # not a set of the whole range: a time stamp may be 10^15
        if missing is not None:
            found = _runs(zs) if fmt is _fmt_z else f"numbers {_runs(zs, str, step)}"
            each = f" in steps of {step}" if step > 1 else ""
            raise ScanError(f"{path}: channel {name} has no slice {fmt(missing)}{each} (found {found})")
        files[name] = [p for _, p in items]
        spans[name] = zs
    counts = {n: len(fs) for n, fs in files.items()}
    first = {n: z[0] for n, z in spans.items()}
    if len(set(counts.values())) == 1 and len(set(first.values())) > 1:
        # equal counts, shifted numbering (a channel that lost its first slice and gained one at the end):
        # pairing slice i of each channel would misalign them by whole slices
        detail = ", ".join(f"{n}: {_runs(zs)}" for n, zs in spans.items())
        raise ScanError(f"{path}: channels cover different slices ({detail}); expected the same Z numbers in "
                        f"every channel")
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{n}: {k}" for n, k in counts.items())
        raise ScanError(f"{path}: channels have different slice counts ({detail}); expected the same number")
    return files


# -- source: Zarr / OME-Zarr ---------------------------------------------------------------------------

def _zarr_major() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


_ZARR_METADATA = (".zarray", ".zattrs", ".zgroup", "zarr.json")


def source_stamp(path) -> list[int]:
    """[files, bytes, newest modification time in ns] of what a scan at ``path`` is read from, so a rerun can
    tell that a scan (or a truth mask, or weights) was written anew under the same name.

    A folder that is not a Zarr store is a per-slice TIFF folder: only its own TIFFs are read, so only they
    count (its sub-folders may hold anything, OUT among them, whose files change with every run).
    In a Zarr store, an array's chunks are not visited (a scan may have hundreds of thousands, which a
    network file system would take minutes to stat, on every run): its metadata files and its folder
    stand for it (rewritten or renamed into place by an export, which creates the store anew)."""
    path = Path(path)
    n = size = newest = 0

    def add(st):
        nonlocal n, size, newest
        n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime_ns)

    def walk(folder: str):
        if _is_zarr_array(folder):
            add(os.stat(folder))
            for name in _ZARR_METADATA:
                try:
                    add(os.stat(os.path.join(folder, name)))
                except FileNotFoundError:
                    pass
            return
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    walk(e.path)
                else:
                    add(e.stat())

    try:
        if not path.is_dir():
            add(path.stat())
        elif _is_zarr_dir(path):
            walk(str(path))
        else:
            with os.scandir(path) as entries:
                for e in entries:
                    if _is_slice_file_name(e.name) and e.is_file():
                        add(e.stat())
    except OSError:
        return [0, 0, 0]
    return [n, size, newest]


def _is_zarr_array(folder: str) -> bool:
    if os.path.isfile(os.path.join(folder, ".zarray")):
        return True
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as f:
            return json.loads(f.read()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and (path.suffix.lower() == ".zarr" or any(
        (path / m).exists() for m in (".zarray", ".zgroup", "zarr.json")))


_AXIS_ALIASES = {"channel": "c", "channels": "c", "ch": "c", "time": "t"}


def _zarr_dimension_names(arr) -> list[str] | None:
    """A plain array's axis names, lower case: zarr 3's ``dimension_names``, else xarray's
    ``attrs["_ARRAY_DIMENSIONS"]``; None when it has none, not one for every axis, or names without y and x
    (xarray's "dim_0", "dim_1": the axes are then taken by position, as for an array without names)."""
    names = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    if not names:
        try:
            names = dict(arr.attrs).get("_ARRAY_DIMENSIONS")
        except Exception:
            names = None
    if not isinstance(names, (list, tuple)) or len(names) != arr.ndim or not all(isinstance(n, str) and n
                                                                                for n in names):
        return None
    axes = [_AXIS_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in names]
    if not {"y", "x"} <= set(axes) or any(re.fullmatch(r"dim_\d+", a) for a in axes):
        return None   # xarray's defaults name no axis: all are taken by position
    return axes


def _ngff_axes(path: Path, ms0: dict, ndim: int) -> tuple[list[str], list]:
    """Axis names and units of an OME-NGFF image's multiscales entry."""
    raw_axes = ms0.get("axes") or list("tczyx"[-ndim:])
    try:
        axes = [str(a["name"]) if isinstance(a, dict) else str(a) for a in raw_axes]
    except (KeyError, TypeError) as err:
        raise ScanError(f"{path}: OME-NGFF axes {raw_axes!r} without a 'name'; expected axes such as "
                        f"{{'name': 'z', 'type': 'space', 'unit': 'micrometer'}}") from err
    return axes, [a.get("unit") if isinstance(a, dict) else None for a in raw_axes]


def _ngff_level(path: Path) -> tuple[dict, dict, dict] | None:
    """(multiscales entry, dataset, the image's attributes) when the array ``path`` is a level of the OME-Zarr
    image in its parent folder, whose metadata hold its axes and scale (the array's own hold neither); else None."""
    for meta in (".zattrs", "zarr.json"):
        try:
            attrs = json.loads((path.parent / meta).read_text())
        except (OSError, ValueError):
            continue
        attrs = attrs.get("attributes", attrs) if meta == "zarr.json" else attrs
        ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales") if isinstance(attrs, dict) \
            else None
        for ms0 in ms if isinstance(ms, list) else []:
            for ds in (ms0.get("datasets") or []) if isinstance(ms0, dict) else []:
                if isinstance(ds, dict) and ds.get("path") == path.name:
                    return ms0, ds, attrs
    return None


class _Zarr:
    """A zarr array ((z, y, x), (c, z, y, x), or axes as named in its metadata) or an OME-NGFF image group
    (level 0 of its multiscales)."""

    def __init__(self, path: Path):
        import zarr

        self.path = path
        try:
            node = zarr.open(store=str(path), mode="r") if _zarr_major() >= 3 else zarr.open(str(path), mode="r")
        except Exception as err:
            raise ScanError(f"{path}: cannot open as Zarr ({err}); expected a zarr array or OME-Zarr group") from err
        self.voxel_size = None
        self.voxel_advice: list[str] = []
        self.labels: list[str] = []
        axes: list[str] | None = None
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            arr, self.format = node, "zarr"
            axes = _zarr_dimension_names(node)
            level = _ngff_level(path)
            if level is not None:   # a level of an OME-Zarr image opened by itself (IMAGE.ome.zarr/0)
                ms0, ds, attrs = level
                self.labels = _omero_labels(attrs)
                axes, units = _ngff_axes(path.parent, ms0, arr.ndim)
                self.voxel_size = self._ngff_scale(ms0, ds, axes, units)
        else:
            attrs = dict(node.attrs)
            ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
            self.labels = _omero_labels(attrs)
            if not ms:
                # bioformats2raw (and NGFF plates/collections) keep the images in numbered sub-groups
                images = sorted((k for k in node.group_keys() if k.isdigit()), key=int) if hasattr(node, "group_keys") \
                    else []
                hint = (f"; its images are in sub-groups: open {path / images[0]}"
                        + (f" (of {len(images)}: {', '.join(images[:5])}{', ...' if len(images) > 5 else ''})"
                           if len(images) > 1 else "") if images else "")
                raise ScanError(f"{path}: zarr group without OME-NGFF 'multiscales' metadata; "
                                f"expected an OME-Zarr image or a plain zarr array{hint}")
            try:
                ms0 = ms[0]
                ds = ms0["datasets"][0]
                level0 = ds["path"]
                if not isinstance(level0, str):
                    raise TypeError(f"path {level0!r} is not a string")
            except (KeyError, IndexError, TypeError, AttributeError) as err:
                raise ScanError(f"{path}: malformed OME-NGFF 'multiscales' metadata ({type(err).__name__}: "
                                f"{err}); expected a list of multiscales whose 'datasets' name level 0 by "
                                f"its 'path'") from err
            try:
                arr = node[level0]
            except Exception as err:
                raise ScanError(f"{path}: multiscales level 0 ({level0!r}) is missing") from err
            axes, units = _ngff_axes(path, ms0, arr.ndim)
            self.voxel_size = self._ngff_scale(ms0, ds, axes, units)
            self.format = "ome-zarr"
        if axes is None:
            axes = {2: ["y", "x"], 3: ["z", "y", "x"], 4: ["c", "z", "y", "x"]}.get(arr.ndim)
            if axes is None:
                raise ScanError(f"{path}: zarr array has shape {arr.shape}; expected (z, y, x) or (c, z, y, x) "
                                f"(or axes named in its metadata)")
            if arr.ndim == 4 and arr.shape[0] > arr.shape[1]:
                # a scan has more slices than channels: this one may well be (z, c, y, x)
                warnings.warn(f"{path}: a 4-D zarr array without axis names is read as (c, z, y, x), which makes "
                              f"its shape {tuple(arr.shape)} {arr.shape[0]} channels of {arr.shape[1]} slices; if "
                              f"it is (z, c, y, x), name its axes (zarr 3 dimension_names, or attrs"
                              f"['_ARRAY_DIMENSIONS'] = ['z', 'c', 'y', 'x'] as xarray writes) or save it as "
                              f"OME-Zarr", UserWarning, stacklevel=4)
        if len(set(axes)) != len(axes):
            raise ScanError(f"{path}: axes {axes} name an axis twice; expected each of c, z, y, x once at most")
        if len(axes) != arr.ndim or axes[-2:] != ["y", "x"]:
            raise ScanError(f"{path}: axes {axes} do not fit array shape {arr.shape}; expected (..., y, x)")
        for a, n in zip(axes, arr.shape):
            if a not in ("c", "z", "y", "x") and n != 1:
                raise ScanError(f"{path}: axis {a!r} has size {n}; expected only c, z, y, x (others size 1)")
        self.arr, self.axes = arr, axes
        size = dict(zip(axes, arr.shape))
        self.shape = (size.get("z", 1), size["y"], size["x"])
        self.nchannels = size.get("c", 1)
        self.dtype = np.dtype(arr.dtype)

    def _ngff_scale(self, ms0, ds, axes, units):
        """(z, y, x) µm from the scale of level 0, or None: no unit, an unknown unit, or a scale that is not
        one positive number per axis (like a TIFF's unusable calibration, it is not guessed at)."""
        def scale_of(transforms):
            for t in transforms or []:
                if t.get("type") == "scale":
                    return [float(s) for s in t["scale"]]
            return [1.0] * len(axes)

        try:
            scales = [scale_of(ds.get("coordinateTransformations")), scale_of(ms0.get("coordinateTransformations"))]
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        if not all(a in axes for a in "zyx") or any(len(sc) != len(axes) for sc in scales):
            return None
        scale = np.multiply(*scales)
        out = []
        for a in "zyx":
            i = axes.index(a)
            v = _to_um(scale[i], units[i]) if units[i] else None
            if v is None and units[i]:
                self.voxel_advice += filter(None, [_unknown_unit_advice(self.path, units[i], "OME-NGFF metadata")])
            if v is None or not (np.isfinite(v) and v > 0):
                return None  # uncalibrated, an unknown unit or an unusable scale: do not guess
            out.append(v)
        return tuple(out)

    def read(self, c: int, z0: int, z1: int) -> np.ndarray:
        index = []
        for a in self.axes:
            index.append({"c": c, "z": slice(z0, z1), "y": slice(None), "x": slice(None)}.get(a, 0))
        try:
            data = np.asarray(self.arr[tuple(index)])
        except Exception as err:
            raise ScanError(f"{self.path}: cannot read slices {_fmt_z(z0)}-{_fmt_z(z1 - 1)}: {err}") from err
        if "z" not in self.axes:
            data = data[np.newaxis]
        if data.dtype == self.dtype and data.flags.c_contiguous and data.flags.writeable:
            # zarr decodes into a new array on every read (it keeps no chunk cache): already fresh, no copy
            return data.reshape((z1 - z0,) + self.shape[1:])
        return np.array(data, dtype=self.dtype, copy=True).reshape((z1 - z0,) + self.shape[1:])

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def compression(self) -> str:
        try:
            comp = getattr(self.arr, "compressors", None)
            if comp is None:
                comp = [self.arr.compressor] if self.arr.compressor else []
            return ", ".join(type(c).__name__ for c in comp) or "NONE"
        except Exception:
            return "unknown"

    def close(self) -> None:
        pass


# -- opening -----------------------------------------------------------------------------------------

def _omero_labels(attrs: dict) -> list[str]:
    """Channel names of an OME-Zarr image's ``omero`` metadata, when they are gpuheart's own (``C00``,
    ``C01``, ...) and distinct; else none. Other tools' labels (``DAPI``) are not taken: a channel is
    chosen by gpuheart's names everywhere else."""
    omero = attrs.get("omero") or (attrs.get("ome") or {}).get("omero") or {}
    try:
        labels = [ch.get("label") for ch in omero.get("channels") or []]
    except AttributeError:
        return []
    ok = all(isinstance(n, str) and re.fullmatch(r"C\d{2,}", n) for n in labels) and len(set(labels)) == len(labels)
    return labels if ok else []


def _open_source(path: Path, channels):
    if _is_zarr_dir(path):
        src = _Zarr(path)
        # a store gpuheart wrote for channel C01 keeps that name (read back as C00 it was another channel)
        names = src.labels if len(src.labels) == src.nchannels else [f"C{c:02d}" for c in range(src.nchannels)]
        return src, names
    if path.is_dir():
        stacks = _channel_stacks(path, channels)
        if stacks is not None:
            src = _TiffChannels(path, stacks)
            return src, src.names
        files = _scan_folder(path, channels)   # only the channels asked for are checked and opened
        only = next(iter(files.values()))
        if not (len(files) == 1 and len(only) == 1 and _is_tiff(only[0]) and _multi_page(only[0])):
            return _TiffFolder(path, files), list(files)
        path = only[0]  # a folder holding one stack: open the stack
    src = _TiffStack(path)
    return src, [f"C{c:02d}" for c in range(src.nchannels)]


def first_channel(path) -> str:
    """The name of a scan's first channel, found without checking the other channels' files (one that is
    damaged but not used must not stop a command that reads only the first)."""
    path = _scan_path(path)
    if path.is_dir() and not _is_zarr_dir(path):
        counts: dict[int, int] = {}
        for p in path.iterdir():
            if _is_slice_file_name(p.name):
                counts[_channel_number(p.name)] = counts.get(_channel_number(p.name), 0) + 1
        # a first "channel" with fewer files than another (a projection without a channel token beside
        # _C01 slices) is not trusted alone: the whole folder is checked, and refused if it does not add up
        if counts and counts[min(counts)] >= max(counts.values()):
            return f"C{min(counts):02d}"
    with open_scan(path) as s:   # a stack or a store: opening it reads headers only
        return s.channels[0]


def open_scan(path: str | os.PathLike, channels: Sequence[str] | str | None = None,
              voxel_size: Sequence[float] | None = None) -> Scan:
    """Open a scan lazily: metadata is read now (all TIFF headers are checked), pixels on demand.

    ``path`` is a multi-page TIFF (one channel ``"C00"``, or an ImageJ/OME hyperstack whose C axis gives
    ``"C00", "C01", ...``), a folder of per-slice TIFFs (LaVision names ``..._C00_xyz-Table Z0000.ome.tif``;
    channel from ``_C<nn>``, z from ``Z<nnnn>`` or else from the number that differs in every name; no
    channel token means ``"C00"``), a folder of one multi-page TIFF per channel (``C1-heart.tif``,
    ``C2-heart.tif`` or ``heart_C00.tif``, ``heart_C01.tif``: each name needs its own channel token), or a
    Zarr store (OME-NGFF image group, level 0; or a plain (z, y, x) / (c, z, y, x) array).

    ``channels`` keeps a subset, by name (in a per-slice folder only their files are checked, so a damaged
    channel that is not asked for does not stop the others). ``voxel_size`` (z, y, x) µm overrides the metadata; otherwise it
    comes from OME PhysicalSize*, ImageJ spacing/resolution or NGFF scale, else None.
    Raises :class:`ScanError` for anything missing, inconsistent or unreadable, ``TypeError`` for what is
    not a path (an in-memory array: write it with :func:`write_tiff` first).
    """
    path = _scan_path(path)
    if not path.exists():
        if path.is_symlink():   # the scan itself on a moved or unmounted disk, as a slice can be
            _raise_broken(path, "a TIFF, a folder of TIFFs or a Zarr store")
        raise ScanError(f"{path}: no such file or folder (expected a TIFF, a folder of TIFFs or a Zarr store)")
    src, names = _open_source(path, channels)
    if voxel_size is None:   # given: no advice about what the metadata lacks
        for advice in getattr(src, "voxel_advice", ()):
            warnings.warn(advice, stacklevel=2)
    try:
        if np.dtype(src.dtype).kind not in "biuf":
            raise ScanError(f"{path}: pixels are {np.dtype(src.dtype)}; expected integer, float or boolean "
                            f"intensities")
        if min(src.shape) < 1:
            raise ScanError(f"{path}: image of shape {tuple(src.shape)} (z, y, x) is empty; expected at least one "
                            f"slice of at least 1 x 1 pixels")
        chosen = _select_channels(path, names, channels)
        vs = src.voxel_size if voxel_size is None else _check_voxel_size(path, voxel_size)
    except Exception:
        src.close()
        raise
    scan = Scan(path=path, shape=tuple(int(n) for n in src.shape), dtype=src.dtype,
                channels=[n for n in chosen], voxel_size=vs, format=src.format, _source=None)
    scan._source = _ChannelView(src, [names.index(n) for n in chosen])
    return scan


def _scan_path(path) -> Path:
    """``path`` as a Path, or a TypeError saying what a scan is (Path() would say only 'expected str')."""
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    if hasattr(path, "shape"):
        hint = (f"; for an in-memory {path.shape} array, write it first with "
                "gpuheart.io.write_tiff(path, array), or segment it with Pipeline(config).segment_array(array)")
    elif hasattr(path, "__iter__") or hasattr(path, "__next__"):
        hint = "; for slices in memory, write them first with gpuheart.io.write_tiff(path, slices)"
    else:
        hint = ""
    raise TypeError(f"expected the path of a TIFF, a folder of TIFFs or a Zarr store, got {type(path).__name__}{hint}")


def _multi_page(path: Path) -> bool:
    tif = _open_tiff(path)
    with tif, _tifffile_errors():
        try:
            return len(tif.pages) > 1 or len(tif.series[0].shape) > 2
        except Exception:
            return False


class _ChannelView:
    """Maps the selected channels' indices onto the source's channel indices."""

    def __init__(self, src, index: list[int]):
        self.src, self.index = src, index

    def read(self, c, z0, z1):
        return self.src.read(self.index[c], z0, z1)

    def disk_bytes(self):
        return self.src.disk_bytes()

    def compression(self):
        return self.src.compression()

    def close(self):
        self.src.close()


def _select_channels(path: Path, names: list[str], channels) -> list[str]:
    if channels is None:
        return list(names)
    wanted = [channels] if isinstance(channels, str) else list(channels)
    unknown = [c for c in wanted if c not in names]
    if unknown or not wanted:
        upper = {n.upper(): n for n in names}
        near = [f"{c!r} -> {upper[str(c).upper()]!r}" for c in unknown if str(c).upper() in upper]
        hint = f" (names are case-sensitive: {', '.join(near)})" if near else ""
        raise ScanError(f"{path}: unknown channel(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"available: {', '.join(names)}{hint}")
    return wanted


def _check_voxel_size(where, voxel_size) -> tuple[float, float, float]:
    try:
        vs = tuple(float(v) for v in voxel_size)
    except (TypeError, ValueError) as err:
        raise ScanError(f"{where}: voxel_size={voxel_size!r}; expected three numbers (z, y, x) in µm") from err
    if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
        raise ScanError(f"{where}: voxel_size={voxel_size!r}; expected three positive numbers (z, y, x) in µm")
    return vs


# -- writing -------------------------------------------------------------------------------------------

def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def refuse_folder(path, what: str = "this") -> None:
    """ValueError when ``path`` is an existing folder where a file is to be written: replacing it would delete
    everything in it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; {what} writes a file there, so give a file name "
                         f"(nothing was written)")


def _commit(partial: Path, final: Path) -> None:
    """Rename ``partial`` onto ``final``, replacing what is there (a folder cannot be replaced by rename).
    A file never replaces a folder: that folder is the user's, not an earlier output."""
    if not partial.is_dir():
        refuse_folder(final, "gpuheart")
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        _remove(old)
        os.replace(final, old)
    os.replace(partial, final)
    if old is not None:
        _remove(old)


def _host(data) -> np.ndarray:
    from .backend import to_host

    return to_host(data)


def _omero_channel(label: str, dtype: np.dtype) -> dict:
    """One channel of OME-Zarr ``omero`` metadata; viewers (napari, OMERO) take the label and the display
    window from it."""
    ch = {"label": label, "color": "FFFFFF", "active": True}
    if dtype.kind in "ub":
        top = 1 if dtype.kind == "b" else int(np.iinfo(dtype).max)
        ch["window"] = {"min": 0, "max": top, "start": 0, "end": top}
    return ch


class ZarrWriter:
    """Write a (z, y, x) volume slab by slab as an OME-NGFF 0.4 image (zarr format 2), atomically.

    Data goes to ``<path>.partial``; :meth:`close` renames it to ``path`` (replacing an old output) only
    when every slice was written, so a crash or a gap never leaves something that looks complete.
    ``chunks`` defaults to ``(min(z, 16), min(y, 256), min(x, 256))``: 16 slices match the usual slab
    size, so slab writes do not re-read chunks, and 256² tiles keep random access cheap. Chunks are
    Blosc/zstd compressed; ``binary=True`` (masks: every voxel 0 or one other value) bit-shuffles them
    at zstd level 3, which wrote a 16-slice 2048² 0/255 mask slab about 2x faster and a quarter
    smaller than the byte-shuffled level 5 used for images (benchmarks/bench_io.py). One multiscale
    level ``"0"``; axes z, y, x in micrometer, scale = voxel size (unknown: scale 1 and no unit). Use as a
    context manager: an exception inside aborts and removes the partial.

    Every chunk is written, all-zero ones too (zarr 3 skips those by default): a resumed run can then tell a
    chunk file lost from the ``.partial`` store (which zarr would read back as zeros) from an empty one.
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype, chunks: Sequence[int] | None = None,
                 voxel_size: Sequence[float] | None = None, name: str | None = None, resume_slices: int = 0,
                 binary: bool = False, channel: str | None = None):
        """``resume_slices=n`` reopens the partial store an interrupted run left and counts slices
        ``[0, n)`` as written (the caller's checkpoint vouches for them); when ``n`` covers every slice and
        that store was already committed to ``path``, it is reopened from there. Without a matching store
        it starts afresh from slice 0 and ``resumed`` is 0, and ``mismatch`` says why (no store, another
        shape, chunk files of slices ``[0, n)`` missing, ...). ``channel`` names the scan channel the store
        holds (OME ``omero`` metadata), so that reading it back gives that name. Without ``voxel_size`` the
        axes get no unit: a scale of 1 with a unit would state a calibration nobody gave."""
        import numcodecs
        import zarr

        self.path = Path(path)
        self.partial = _partial(self.path)
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ScanError(f"{self.path}: shape={tuple(shape)}; expected (z, y, x) with every size >= 1")
        try:
            self.dtype = np.dtype(dtype)
        except TypeError as err:
            raise ScanError(f"{self.path}: dtype={dtype!r} is not a numpy dtype") from err
        z, y, x = self.shape
        self.chunks = tuple(int(c) for c in (chunks or (min(z, 16), min(y, 256), min(x, 256))))
        if len(self.chunks) != 3 or min(self.chunks) < 1:
            raise ScanError(f"{self.path}: chunks={chunks}; expected three positive sizes (z, y, x)")
        self.voxel_size = None if voxel_size is None else _check_voxel_size(self.path, voxel_size)
        self._name, self._channel = name or self.path.name.split(".")[0], channel
        self._written = np.zeros(z, bool)
        self._closed = False
        self.mismatch: str | None = None   # why a resume could not reopen the partial store
        if not self.path.parent.is_dir():
            raise ScanError(f"{self.path}: parent folder {self.path.parent} does not exist")
        self.resumed = self._reopen(resume_slices) if resume_slices > 0 else 0
        if self.resumed:
            return
        _remove(self.partial)  # left by an earlier crash
        compressor = (numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE) if binary
                      else numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE))
        try:
            if _zarr_major() >= 3:
                root = zarr.open_group(store=str(self.partial), mode="w", zarr_format=2)
                self.arr = root.create_array(
                    "0", shape=self.shape, chunks=self.chunks, dtype=self.dtype, compressors=compressor,
                    fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"},
                    config={"write_empty_chunks": True})
            else:  # zarr 2.18 (writes empty chunks by default)
                root = zarr.open_group(str(self.partial), mode="w")
                self.arr = root.create_dataset("0", shape=self.shape, chunks=self.chunks, dtype=self.dtype,
                                               compressor=compressor, fill_value=0, dimension_separator="/")
            root.attrs.update(self._attrs())
        except Exception as err:
            _remove(self.partial)
            raise ScanError(f"{self.path}: cannot create zarr store ({err})") from err

    def _reopen(self, n: int) -> int:
        """Slices already written by an interrupted run (``n``) if its partial store matches, else 0."""
        import zarr

        if n >= self.shape[0] and not self.partial.exists() and self.path.is_dir():
            # every slice was written and the store already committed (the run was killed after pass 2,
            # in the closings or the mesh): take it back as the partial store, to be committed again
            os.replace(self.path, self.partial)
        if not self.partial.is_dir():
            self.mismatch = "is gone"
            return 0
        try:
            arr = _open_for_writing(self.partial)
        except Exception as err:
            self.mismatch = f"cannot be opened ({err})"
            return 0
        if n >= self.shape[0] and tuple(arr.shape) == self.shape and tuple(arr.chunks) != self.chunks:
            # complete (taken over by a run with another slab size): nothing more is written to it, and any
            # chunking reads the same voxels
            self.chunks = tuple(arr.chunks)
        if tuple(arr.shape) != self.shape or np.dtype(arr.dtype) != self.dtype or tuple(arr.chunks) != self.chunks:
            self.mismatch = (f"holds shape {tuple(arr.shape)}, {np.dtype(arr.dtype)}, chunks {tuple(arr.chunks)}; "
                             f"expected {self.shape}, {self.dtype}, chunks {self.chunks}")
            return 0
        missing, cut = self._bad_chunks(n)
        if missing or cut:
            # zarr reads a missing chunk as fill value 0, and one cut short fails to decode (zarr renames a chunk
            # file into place without fsync, so after a power loss or OS crash it can be empty or short; or a
            # copy of OUT was cut short): resuming would lose those voxels or fail in pass 3
            cz = self.chunks[0]
            bad = missing or cut
            z = sorted({iz for iz, _, _ in bad})
            what = (f"lacks {len(missing)} chunk file(s)" if missing else
                    f"has {len(cut)} chunk file(s) cut short or corrupt")
            self.mismatch = (f"{what} of the slices the checkpoint vouches for "
                             f"(slices {_runs([i for iz in z for i in range(iz * cz, min((iz + 1) * cz, self.shape[0]))])}"
                             f"; e.g. 0/{'/'.join(map(str, bad[0]))})")
            return 0
        try:
            # the run taking the store over may know another voxel size (--voxel-size added): its metadata say
            # this run's, as a store written afresh would
            zarr.open_group(store=str(self.partial), mode="r+").attrs.update(self._attrs())
        except Exception as err:
            self.mismatch = f"cannot take new metadata ({err})"
            return 0
        self.arr = arr
        self._written[:n] = True
        return n

    def _attrs(self) -> dict:
        """OME-NGFF 0.4 image metadata: level "0", the voxel size as its scale (unknown: scale 1 and no unit,
        since a scale with a unit states a calibration), and the channel's name when given."""
        unit = {"unit": "micrometer"} if self.voxel_size else {}
        scale = [float(v) for v in (self.voxel_size or (1.0, 1.0, 1.0))]
        attrs = {"multiscales": [{
            "version": "0.4",
            "name": self._name,
            "axes": [{"name": a, "type": "space", **unit} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }]}
        if self._channel:
            attrs["omero"] = {"version": "0.4", "channels": [_omero_channel(self._channel, self.dtype)]}
        return attrs

    def _bad_chunks(self, n: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """The chunks lying wholly inside slices ``[0, n)`` whose file is not in the partial store (every chunk
        is written, empty ones too, so none may be absent), and those whose file is cut short: a Blosc chunk
        (what this writer writes) whose size is not the compressed size its 16-byte header gives, or whose
        header does not give the chunk's size uncompressed; an uncompressed chunk not of the chunk's size in
        bytes (stores with another codec: only missing files are seen). One directory listing per z-chunk and
        row of chunks, and one 16-byte read per chunk file (about 0.1 s for 4096 chunks on a local disk)."""
        (nz, ny, nx), (cz, cy, cx) = self.shape, self.chunks
        full = min(n, nz)
        kz = full // cz + (1 if full == nz and nz % cz else 0)
        want = {str(i) for i in range(-(-nx // cx))}
        chunk_bytes = cz * cy * cx * self.dtype.itemsize   # zarr format 2 stores edge chunks whole too
        try:
            codec = (json.loads((self.partial / "0" / ".zarray").read_text()).get("compressor") or {}).get("id", "")
        except (OSError, ValueError, AttributeError):
            codec = "?"
        missing, cut = [], []
        for iz in range(kz):
            for iy in range(-(-ny // cy)):
                row = self.partial / "0" / str(iz) / str(iy)
                try:
                    have = set(os.listdir(row))
                except OSError:
                    have = set()
                missing += [(iz, iy, int(ix)) for ix in sorted(want - have, key=int)]
                if codec in ("blosc", ""):
                    cut += [(iz, iy, int(ix)) for ix in sorted(want & have, key=int)
                            if not _whole_chunk(row / ix, codec, chunk_bytes)]
        return missing, cut

    def write(self, z0: int, data) -> None:
        """Write ``data`` ((z, y, x), or one (y, x) slice) into slices ``[z0, z0 + len(data))``."""
        if self._closed:
            raise ScanError(f"{self.path}: writer is closed; expected writes before close()")
        data = _host(data)
        if data.ndim == 2:
            data = data[np.newaxis]
        nz = self.shape[0]
        if data.ndim != 3 or data.shape[1:] != self.shape[1:]:
            raise ScanError(f"{self.path}: data of shape {data.shape}; expected (z, {self.shape[1]}, {self.shape[2]})")
        if not (0 <= z0 and z0 + data.shape[0] <= nz):
            raise ScanError(f"{self.path}: slices [{z0}, {z0 + data.shape[0]}) outside the volume (expected within [0, {nz}))")
        if not np.can_cast(data.dtype, self.dtype, "same_kind"):
            raise ScanError(f"{self.path}: data dtype {data.dtype}; expected {self.dtype} (or castable to it)")
        try:
            self.arr[z0:z0 + data.shape[0]] = data.astype(self.dtype, copy=False)
        except Exception as err:
            raise ScanError(f"{self.path}: writing slices [{z0}, {z0 + data.shape[0]}) failed: {err}") from err
        self._written[z0:z0 + data.shape[0]] = True

    def mark_written(self, z0: int, z1: int) -> None:
        """Count slices [z0, z1) as written by someone else (a worker that wrote the partial store itself,
        see :func:`write_partial_slab`)."""
        self._written[z0:z1] = True

    def close(self) -> None:
        """Commit: rename the partial store into place. Raises (and aborts) when slices were never written."""
        if self._closed:
            return
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self.abort()
            raise ScanError(f"{self.path}: slices never written: {_runs(missing.tolist())}; "
                            f"expected all {self.shape[0]} slices before close()")
        self._closed = True
        try:
            _commit(self.partial, self.path)
        except OSError as err:
            _remove(self.partial)
            raise ScanError(f"{self.path}: cannot move finished output into place: {err}") from err

    def abort(self) -> None:
        """Discard everything written so far (removes ``<path>.partial``)."""
        self._closed = True
        _remove(self.partial)

    def __enter__(self) -> ZarrWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._closed = True  # keep the .partial store: a resumed run continues from it
        elif exc_type is not None:
            self.abort()
        else:
            self.close()


def _whole_chunk(f: Path, codec: str, nbytes: int) -> bool:
    """Whether chunk file ``f`` is whole: uncompressed (``codec`` ""), ``nbytes`` long; Blosc, as long as the
    compressed size in its header (bytes 12-15), which gives ``nbytes`` uncompressed (bytes 4-7)."""
    try:
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if codec == "":
                return size == nbytes
            head = fh.read(16)
    except OSError:
        return False
    if len(head) < 16:
        return False
    raw, _, packed = struct.unpack("<III", head[4:16])
    return raw == nbytes and packed == size


def _open_for_writing(partial: Path):
    """Array ``"0"`` of a :class:`ZarrWriter`'s partial store, opened to write empty chunks too, as it was
    created (in zarr 3 that is a setting of the open array, not of the store; zarr 2 writes them by default).
    Refused when its chunk files are not named ``z/y/x`` (the layout a resume checks)."""
    import zarr

    arr = zarr.open_group(store=str(partial), mode="r+")["0"]
    meta = json.loads((partial / "0" / ".zarray").read_text())
    if meta.get("dimension_separator") != "/":
        raise ValueError(f"chunk keys separated by {meta.get('dimension_separator')!r}, expected '/'")
    if _zarr_major() < 3:
        return arr
    if not hasattr(arr, "with_config"):  # zarr 3.0.x, which pyproject excludes: say so rather than AttributeError
        raise ValueError(f"zarr {zarr.__version__} cannot set write_empty_chunks on an open array; "
                         "expected zarr 2.18 or >= 3.1")
    return arr.with_config({"write_empty_chunks": True})


def write_partial_slab(partial: str | os.PathLike, z0: int, data) -> None:
    """Write slices ``[z0, z0 + len(data))`` into the ``.partial`` store of a :class:`ZarrWriter` from another
    process (a Dask worker); the writer that owns the store commits it. Slabs must cover whole z-chunks so
    two workers never write the same chunk."""
    try:
        arr = _open_for_writing(Path(partial))
        arr[z0:z0 + len(data)] = _host(data).astype(arr.dtype, copy=False)
    except Exception as err:
        raise ScanError(f"{partial}: writing slices [{z0}, {z0 + len(data)}) failed: {err}") from err


_IMAGEJ_DTYPES = {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.float32)}


def write_tiff(path: str | os.PathLike, data_or_slices: np.ndarray | Iterable[np.ndarray],
               voxel_size: Sequence[float] | None = None, shape: Sequence[int] | None = None,
               dtype=None, compression: str | None = None) -> Path:
    """Write a (z, y, x) multi-page TIFF atomically (``<path>.partial``, then rename).

    ``data_or_slices`` is an array or an iterable of (y, x) slices; slices are streamed, so give
    ``shape`` (z, y, x) and ``dtype`` for a generator (a list or array supplies them itself). uint8,
    uint16, int16 and float32 are written as ImageJ hyperstacks (spacing and resolution in µm); other
    dtypes as OME-TIFF (PhysicalSize*); bool becomes uint8 0/255 (ImageJ's binary convention).
    Returns the final path.
    """
    import tifffile

    path = Path(path)
    if isinstance(data_or_slices, np.ndarray) or hasattr(data_or_slices, "__cuda_array_interface__"):
        arr = _host(data_or_slices)
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        shape, dtype = arr.shape if shape is None else shape, arr.dtype if dtype is None else dtype
        slices: Iterable = arr
    elif isinstance(data_or_slices, Sequence) and shape is None and len(data_or_slices):
        first = _host(data_or_slices[0])
        shape = (len(data_or_slices),) + first.shape
        dtype = first.dtype if dtype is None else dtype
        slices = data_or_slices
    else:
        slices = data_or_slices
    if shape is None or dtype is None:
        raise ScanError(f"{path}: slices come from an iterator; expected shape=(z, y, x) and dtype to be given")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ScanError(f"{path}: shape={shape}; expected (z, y, x) with every size >= 1")
    src_dtype = np.dtype(dtype)
    out_dtype = np.dtype(np.uint8) if src_dtype == bool else src_dtype
    vs = None if voxel_size is None else _check_voxel_size(path, voxel_size)
    if not path.parent.is_dir():
        raise ScanError(f"{path}: parent folder {path.parent} does not exist")

    source_errors: list[BaseException] = []

    def pages() -> Iterator[np.ndarray]:
        n, it = 0, iter(slices)
        while True:
            try:
                s = next(it)
            except StopIteration:
                break
            except BaseException as err:  # the caller's own failure: let it through unchanged
                source_errors.append(err)
                raise
            s = _host(s)
            if n >= shape[0]:
                raise ScanError(f"{path}: more than {shape[0]} slices given; expected shape {shape}")
            if s.shape != shape[1:]:
                raise ScanError(f"{path}: slice {n} has shape {s.shape}; expected {shape[1:]}")
            if s.dtype == bool:
                s = s.astype(np.uint8) * np.uint8(255)
            yield np.ascontiguousarray(s, dtype=out_dtype)
            n += 1
        if n != shape[0]:
            raise ScanError(f"{path}: got {n} slices; expected {shape[0]}")

    partial = _partial(path)
    _remove(partial)
    kwargs: dict[str, Any] = {"shape": shape, "dtype": out_dtype, "photometric": "minisblack",
                              "compression": compression}
    imagej = out_dtype in _IMAGEJ_DTYPES
    if imagej:
        meta: dict[str, Any] = {"axes": "ZYX"}
        if vs is not None:
            meta.update(spacing=vs[0], unit="um")
            kwargs["resolution"] = (1.0 / vs[2], 1.0 / vs[1])
    else:
        meta = {"axes": "ZYX"}
        if vs is not None:
            meta.update(PhysicalSizeZ=vs[0], PhysicalSizeY=vs[1], PhysicalSizeX=vs[2],
                        PhysicalSizeZUnit="µm", PhysicalSizeYUnit="µm", PhysicalSizeXUnit="µm")
    try:
        with tifffile.TiffWriter(partial, imagej=imagej, ome=not imagej, 
                                 bigtiff=not imagej and _needs_bigtiff(shape, out_dtype)) as tw:
            tw.write(pages(), metadata=meta, **kwargs)
        _commit(partial, path)
    except BaseException as err:
        _remove(partial)
        if isinstance(err, ScanError) or err in source_errors or not isinstance(err, Exception):
            raise
        raise ScanError(f"{path}: writing TIFF failed: {err}") from err
    return path


def _needs_bigtiff(shape, dtype) -> bool:
    # Plain TIFF offsets are 32-bit. ImageJ cannot read BigTIFF, so ImageJ files never use it (tifffile
    # writes them > 4 GB as one contiguous block, which ImageJ and we read).
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize > 2**32 - 2**25
