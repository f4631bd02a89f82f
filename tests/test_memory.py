"""Peak host memory of a run does not depend on the number of slices (issue: 64 vs 512 slices of 1024²)."""
import tracemalloc

import numpy as np
import tifffile

from gpuheart import Pipeline, PipelineConfig


def _scan(path, n):
    rng = np.random.default_rng(0)
    base = rng.integers(100, 400, (1024, 1024), dtype=np.uint16)
    with tifffile.TiffWriter(path) as w:
        for z in range(n):
            w.write(np.roll(base, 7 * z, axis=1), contiguous=False)  # one page per slice, read lazily
    return path


def _peak_mib(scan, out) -> float:
    # mesh and tree graph are left out: a mesh grows with what it meshes (its size budget bounds it) and
    # the graph's skeleton is capped by graph.max_voxels; every streamed stage is in
    cfg = PipelineConfig.from_dict({"progress": False, "segment": {"method": "dom"}, "mesh": {"enabled": False},
                                    "graph": {"enabled": False}, "output": {"report": False}})
    tracemalloc.start()
    try:
        Pipeline(cfg).run(scan, out, resume=False)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_slices(tmp_path):
    small = _peak_mib(_scan(tmp_path / "s64.tif", 64), tmp_path / "o64")
    large = _peak_mib(_scan(tmp_path / "s512.tif", 512), tmp_path / "o512")
    scan_mib = 512 * 1024 * 1024 * 2 / 2**20
    assert large < 1.2 * small, (small, large)
    assert large < scan_mib / 3, (large, scan_mib)  # far from holding the 1 GiB scan
