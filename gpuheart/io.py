"""Opening scans lazily, iterating slabs with halos, writing masks atomically."""
from __future__ import annotations


def lavision_filename(prefix: str, channel: int, z: int) -> str:
    """The per-slice file name a LaVision UltraMicroscope writes: ``<prefix>_C00_xyz-Table Z0000.ome.tif``."""
    return f"{prefix}_C{channel:02d}_xyz-Table Z{z:04d}.ome.tif"
