"""Which CPU building blocks of the mesh and the tree graph can run side by side in threads.

The pipeline computes a channel's tree graph in a worker thread while the main thread meshes it, and the
next step for the mesh stage (the largest share of a GPU run, benchmarks/results/nvidia-h200-pipeline.json)
is to mesh channels side by side. Threads only help where the work releases Python's GIL. This times each
building block on two inputs one after the other, then in two threads at once, alternating, and reports
serial / threaded (about 2 on two free cores where the GIL is released, about 1 where it is held).

    python benchmarks/bench_gil.py [--repeats 3] [--out benchmarks/results/cpu-gil.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def blocks(rng) -> dict:
    """name -> (function of one input, two inputs)."""
    from scipy import ndimage as ndi
    from skimage.measure import marching_cubes
    from skimage.morphology import skeletonize

    from gpuheart.graph import thin

    def sponge(shape):
        return ndi.gaussian_filter(rng.random(shape, np.float32), (0.8, 2.0, 2.0)) > 0.5

    masks = [sponge((16, 512, 512)) for _ in range(2)]
    small = [m[:, :256, :256] for m in masks]
    faces = [rng.integers(0, 4_000_000, (4_000_000, 3)) for _ in range(2)]
    coords = rng.random((4_000_000, 3))
    return {
        "skimage marching_cubes (mesh)": (lambda m: marching_cubes(m.astype(np.float32), 0.5), masks),
        "scipy ndimage.label 26-connected (tree graph labelling)":
            (lambda m: ndi.label(m, np.ones((3, 3, 3), bool)), masks),
        "gpuheart graph.thin (tree graph skeleton)": (thin, small),
        "skimage skeletonize (the tree graph's skeleton until 2026-11-28)": (skeletonize, small),
        "numpy gather of face corners (mesh measures)": (lambda f: coords[f].sum(axis=1), faces),
        "numpy bincount (mesh components)": (lambda f: np.bincount(f.ravel(), minlength=4_000_000), faces),
    }


def serial_and_threaded(fn, inputs) -> tuple[float, float]:
    t = time.perf_counter()
    for x in inputs:
        fn(x)
    serial = time.perf_counter() - t
    threads = [threading.Thread(target=fn, args=(x,)) for x in inputs]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return serial, time.perf_counter() - t


def main(argv=None) -> int:
    from conftest import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "cpu-gil.json"))
    a = p.parse_args(argv)
    rows = {}
    for name, (fn, inputs) in blocks(np.random.default_rng(0)).items():
        fn(inputs[0])   # warm-up: imports, first-call allocations
        runs = [serial_and_threaded(fn, inputs) for _ in range(a.repeats)]
        s, t = min(r[0] for r in runs), min(r[1] for r in runs)
        rows[name] = {"serial_s": [round(r[0], 4) for r in runs], "two_threads_s": [round(r[1], 4) for r in runs],
                      "speedup_best": round(s / t, 2)}
        print(f"{name}: serial {s:.3f} s, two threads {t:.3f} s, x{s / t:.2f}", flush=True)
    doc = {"kind": "gil", "benchmark": __doc__.splitlines()[0], "date": datetime.now(timezone.utc).isoformat(),
           "machine": machine_info("cpu"), "notes": ["best of the repeats; each repeat runs serial then threaded"],
           "blocks": rows}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
