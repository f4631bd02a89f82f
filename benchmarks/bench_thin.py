"""graph.thin (Lee's 3-D thinning, the tree graph's skeleton) against the thinning it replaced, side by side.

    python benchmarks/bench_thin.py [--repeats 2] [--mask OUT/C02/mask.ome.zarr ...] [--out FILE]

The old thinning tested every object voxel in every pass; it is kept in tests/test_graph.py as the test-only
reference (``reference_thin``) and loaded from there. Each case is thinned old then new, ``--repeats`` times
interleaved (best of the repeats), and the two skeletons must be the same bits. Cases: synthetic vessel trees
(random straight tubes of radius 3-12 µm, and a dense mask with tunnels) at 4 x 1 x 1 µm voxels and one at
1 x 1 x 1, each cut to its largest 26-connected component as the pipeline's tree graph does
(:func:`gpuheart.graph.largest_tree` with ``crop``); ``--mask`` adds a pipeline's mask (the largest tree of
its first channel, at the scan's voxel size). Writes benchmarks/results/cpu-thin.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "cpu-thin.json"


def reference_thin():
    """tests/test_graph.py's ``reference_thin``: the thinning before the border list."""
    spec = importlib.util.spec_from_file_location("_thin_reference", REPO / "tests" / "test_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reference_thin


def tubes(shape, voxel_size, n, r_um, seed):
    """Bool mask of ``n`` straight tubes (capsules) between random points, radii uniform in ``r_um`` (µm)."""
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_size, np.float32)
    ext = np.asarray(shape) * vs
    out = np.zeros(shape, bool)
    z, y, x = (np.arange(n_, dtype=np.float32) * s for n_, s in zip(shape, vs))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    for _ in range(n):
        a, b = rng.random(3) * ext, rng.random(3) * ext
        r = rng.uniform(*r_um)
        lo = np.maximum(np.floor((np.minimum(a, b) - r) / vs).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(a, b) + r) / vs).astype(int) + 1, shape)
        zz, yy, xx = z[lo[0]:hi[0]], y[:, lo[1]:hi[1]], x[:, :, lo[2]:hi[2]]
        d = (b - a).astype(np.float32)
        t = np.clip(((zz - a[0]) * d[0] + (yy - a[1]) * d[1] + (xx - a[2]) * d[2]) / float(d @ d), 0, 1)
        dist2 = (zz - a[0] - t * d[0]) ** 2 + (yy - a[1] - t * d[1]) ** 2 + (xx - a[2] - t * d[2]) ** 2
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= dist2 <= r * r
    return out


def dense(shape, seed):
    """Mostly foreground, with tunnels and cavities (a thresholded smoothed noise, ~75 % foreground)."""
    noise = ndi.gaussian_filter(np.random.default_rng(seed).random(shape, np.float32), (1.0, 4.0, 4.0))
    return noise > np.quantile(noise, 0.25)


def synthetic_cases():
    shape = (48, 512, 512)
    t = tubes(shape, (4.0, 1.0, 1.0), 100, (3.0, 12.0), 0)
    yield "tubes r 3-12 um, 48x512x512 at 4x1x1 um", t, (4.0, 1.0, 1.0)
    yield "the same tubes' voxels at 1x1x1 um", t, (1.0, 1.0, 1.0)
    yield "dense with tunnels, 48x512x512 at 4x1x1 um", dense(shape, 1), (4.0, 1.0, 1.0)


def mask_case(path):
    import gpuheart
    scan = gpuheart.open_scan(path)
    m = scan.read_slab(scan.channels[0], 0, scan.shape[0]) != 0
    return f"pipeline mask {path}", m, tuple(float(v) for v in scan.voxel_size)


def measure(name, mask, vs, repeats, old_thin):
    from gpuheart import graph
    tree, _ = graph.largest_tree(mask, crop=True)
    old_s, new_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        want = old_thin(tree, vs)
        old_s.append(round(time.perf_counter() - t, 3))
        t = time.perf_counter()
        got = graph.thin(tree, vs)
        new_s.append(round(time.perf_counter() - t, 3))
        if not np.array_equal(got, want):
            raise SystemExit(f"{name}: the skeletons differ in {int((got != want).sum())} voxels")
    row = {"case": name, "shape": list(tree.shape), "voxel_size_um": list(vs), "tree_voxels": int(tree.sum()),
           "skeleton_voxels": int(want.sum()), "identical": True, "old_s": old_s, "new_s": new_s,
           "speedup_best": round(min(old_s) / min(new_s), 2)}
    print(f"{name}: {row['tree_voxels']:,} voxels, old {old_s} s, new {new_s} s, {row['speedup_best']}x, "
          "same skeleton", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mask", action="append", default=[], help="a pipeline's mask.ome.zarr (repeatable)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from conftest import machine_info, write_result
    from gpuheart import graph

    old_thin = reference_thin()
    warm = np.zeros((5, 5, 5), bool)
    warm[1:4, 1:4, 1:4] = True
    old_thin(warm), graph.thin(warm)   # compile both first
    cases = list(synthetic_cases()) + [mask_case(p) for p in args.mask]
    rows = [measure(name, m, vs, args.repeats, old_thin) for name, m, vs in cases]
    doc = {"kind": "thin",
           "benchmark": "graph.thin, the tree graph's skeleton, against the thinning it replaced (every object "
                        "voxel tested in every pass; tests/test_graph.py's reference_thin), old then new in turn "
                        "in one process, each case cut to its largest tree",
           "date": datetime.now(timezone.utc).isoformat(), "machine": machine_info("cpu"),
           "notes": [f"best of {args.repeats} interleaved repeats; both compiled before timing; the skeletons "
                     "are checked to be the same bits"],
           "cases": rows}
    write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
