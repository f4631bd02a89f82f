"""mesh benchmarks: slab-wise marching cubes vs scikit-image on the whole 128 x 512 x 512 volume.

pytest-benchmark:   python -m pytest benchmarks/bench_mesh.py --benchmark-only
time + peak memory: python benchmarks/bench_mesh.py   (writes benchmarks/results/cpu-mesh.json)

The mask is a synthetic vessel tree stand-in (straight tubes of radius 3-9 voxels), generated once
and held in memory as bool; both timings and peaks (tracemalloc, allocations made during the call)
cover meshing only. The slab-wise peak is one float32 slab, skimage's work on it and the mesh.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

SHAPE = (128, 512, 512)
SLAB = 32
RESULTS = Path(__file__).resolve().parent / "results" / "cpu-mesh.json"


class Tubes:
    """``n`` straight tubes with random end points and radii; ``read_slab(z0, z1)`` -> bool mask."""

    def __init__(self, shape=SHAPE, n: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.shape = shape
        self.p0 = rng.random((n, 3)) * shape
        self.p1 = rng.random((n, 3)) * shape
        self.r = rng.uniform(3, 9, n)

    def read_slab(self, z0: int, z1: int) -> np.ndarray:
        _, ny, nx = self.shape
        z, y, x = np.meshgrid(np.arange(z0, z1, dtype=np.float32), np.arange(ny, dtype=np.float32),
                              np.arange(nx, dtype=np.float32), indexing="ij", sparse=True)
        out = np.zeros((z1 - z0, ny, nx), bool)
        for a, b, r in zip(self.p0, self.p1, self.r):
            d = (b - a).astype(np.float32)
            t = ((z - a[0]) * d[0] + (y - a[1]) * d[1] + (x - a[2]) * d[2]) / float(d @ d)
            t = np.clip(t, 0, 1)
            dist2 = (z - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (x - a[2] - t * d[2]) ** 2
            out |= dist2 <= r * r
        return out


def make_mask(shape=SHAPE) -> np.ndarray:
    t = Tubes(shape)
    return np.concatenate([t.read_slab(z, min(z + 16, shape[0])) for z in range(0, shape[0], 16)])


def _slabwise(mask: np.ndarray):
    from gpuheart.mesh import marching_cubes_slabs

    return marching_cubes_slabs(lambda z0, z1: mask[z0:z1], mask.shape, SLAB)


def _whole(mask: np.ndarray):
    from skimage import measure

    return measure.marching_cubes(np.pad(mask.astype(np.float32), 1), 0.5)[:2]


@pytest.fixture(scope="module")
def tubes():
    return make_mask()


def test_marching_cubes_slabs(benchmark, tubes):
    benchmark.pedantic(_slabwise, args=(tubes,), rounds=2, iterations=1)


def test_marching_cubes_skimage_whole(benchmark, tubes):
    benchmark.pedantic(_whole, args=(tubes,), rounds=2, iterations=1)


# -- script mode: time and peak memory side by side -----------------------------------------------

def measure_run(f, *args) -> tuple[float, float, object]:
    """(seconds, peak MiB traced by tracemalloc, result); NumPy reports its buffers to tracemalloc."""
    tracemalloc.start()
    t = time.perf_counter()
    res = f(*args)
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return dt, peak, res


def main(argv=None) -> dict:
    """``--shape Z Y X`` (default 128 512 512; the issue's scale test is 512 1024 1024) and ``--out``."""
    import argparse

    import skimage

    from gpuheart.mesh import mesh_volume

    ap = argparse.ArgumentParser(description="slab-wise marching cubes vs scikit-image on the whole volume")
    ap.add_argument("--shape", type=int, nargs=3, default=list(SHAPE))
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    shape = tuple(a.shape)
    gen_t, _, tubes = measure_run(make_mask, shape)
    _, _, (v, f) = measure_run(_slabwise, make_mask((8, 64, 64)))  # warm-up imports
    rounds = []
    for _ in range(2):  # interleaved, so load from other users hits both sides alike
        ts, ms, (v, f) = measure_run(_slabwise, tubes)
        tw, mw, (vw, fw) = measure_run(_whole, tubes)
        rounds.append((ts, ms, tw, mw))
    ts, tw = min(r[0] for r in rounds), min(r[2] for r in rounds)
    ms, mw = max(r[1] for r in rounds), max(r[3] for r in rounds)
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
                       "scikit-image": skimage.__version__, "load_avg_1min": os.getloadavg()[0]},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "shape": list(shape), "slab_size": SLAB, "mask_voxels_on": int(tubes.sum()),
           "timing": "best of 2 (peak: max of 2), seconds and MiB (tracemalloc, allocations during the "
                     "call; the bool input mask is allocated before)",
           "results": {"slabwise_s": ts, "skimage_whole_s": tw, "slabwise_peak_mib": ms,
                       "skimage_whole_peak_mib": mw, "mask_generation_s": gen_t,
                       "vertices": len(v), "faces": len(f), "same_counts": [len(v), len(f)] == [len(vw), len(fw)],
                       "volume_voxels_slabwise": mesh_volume(v, f)}}
    print(f"slab-wise {ts:.2f} s, peak {ms:.0f} MiB; skimage whole {tw:.2f} s, peak {mw:.0f} MiB; "
          f"{len(v):,} vertices, {len(f):,} faces, same counts: {out['results']['same_counts']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
