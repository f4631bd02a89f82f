"""The tree graph's labelling: ``morphology.label_slabs`` (26-connected, streamed in slabs) on a vessel mask, then
the slabs of the largest component's box relabelled (``SlabLabels.relabel``), as the pipeline's tree graph does.

The mask is the built-in scan's vessel truth at 2048 x 2048 (the ``large`` phantom preset), read slab by slab
from a uint8 0/255 volume as the pipeline reads its mask store. Timed: one thread, ``--workers`` threads, and
optionally ``morphology.py`` of an older commit; every side must give the same components (sizes, numbering,
boxes). Then the graph's skeleton stage (``graph.skeleton_graph`` of the largest tree's box), this code against
``graph.py`` of the older commit: the same branches, lengths and radii (to 1e-12).

pytest-benchmark:   python -m pytest benchmarks/bench_label.py --benchmark-only
side by side:       python benchmarks/bench_label.py [--slices 64] [--workers 2] [--against REV]
                    (writes benchmarks/results/cpu-label.json)
a run's own mask:   python benchmarks/bench_label.py --mask OUT/C02/mask.ome.zarr --against REV --out FILE
                    (e.g. the dense autofluorescence channel of ``bench_pipeline.py --keep``)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu-label.json"
SLAB = 16   # the pipeline's default slab_size
VOXEL = (4.0, 1.0, 1.0)   # the built-in scan's (z, y, x) µm


def vessel_mask(slices: int, size: int = 2048) -> np.ndarray:
    """uint8 0/255 vessel truth of the built-in scan's ``large`` preset, ``slices`` x ``size`` x ``size``."""
    from gpuheart.phantom import Phantom, PhantomConfig

    ph = Phantom(PhantomConfig.preset("large", shape=(slices, size, size)))
    return np.concatenate([(ph.truth("C00", z, min(z + SLAB, slices)) > 0).astype(np.uint8) * 255
                           for z in range(0, slices, SLAB)])


def stored_mask(path: Path) -> np.ndarray:
    """uint8 0/255 mask of a store a run wrote (``OUT/CHANNEL/mask.ome.zarr``, or any scan gpuheart opens)."""
    from gpuheart.io import open_scan

    with open_scan(path) as m:
        return (m.read_slab(m.channels[0], 0, m.shape[0]) > 0).astype(np.uint8) * 255


def reader(mask: np.ndarray):
    return lambda z0, z1: mask[z0:z1] > 0   # as pipeline.mask_reader: a fresh bool slab


def label(morphology, mask: np.ndarray, workers: int | None):
    """The tree graph's labelling stage: components, then the largest one's voxels slab by slab (relabelled)."""
    kw = {} if workers is None else {"workers": workers}
    t = time.perf_counter()
    res = morphology.label_slabs(reader(mask), mask.shape, SLAB, connectivity=3, **kw)
    tree = int(np.argmax(res.sizes))
    z0, z1 = res.box_lo[tree - 1][0], res.box_hi[tree - 1][0]
    voxels = sum(int(np.count_nonzero(lab == tree))
                 for _, _, lab in res.relabel(reader(mask), (z0, z1), *([] if workers is None else [workers])))
    if voxels != res.sizes[tree]:
        raise AssertionError(f"relabelling found {voxels} voxels of the largest component, labelling {res.sizes[tree]}")
    return time.perf_counter() - t, res


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("sizes", "final", "box_lo", "box_hi"))


@pytest.fixture(scope="module")
def small_mask():
    return vessel_mask(32, 512)


@pytest.mark.parametrize("workers", [1, 2])
def test_label_slabs(benchmark, small_mask, workers):
    from gpuheart import morphology

    benchmark.pedantic(label, args=(morphology, small_mask, workers), rounds=3, iterations=1)


def main(argv=None) -> dict:
    sys.path.insert(0, str(HERE))
    from conftest import machine_info, module_at

    from gpuheart import morphology

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2, help="threads of the threaded side")
    ap.add_argument("--against", metavar="REV", help="also time gpuheart/morphology.py of this git revision")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mask", type=Path, help="a run's mask store instead of the built-in scan's vessel truth")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    mask = stored_mask(a.mask) if a.mask else vessel_mask(a.slices, a.size)
    here = "this code (" + _git("rev-parse", "--short", "HEAD") + (" + changes" if _git("status", "--porcelain",
                                                                                        "gpuheart") else "") + ")"
    sides = {f"{here}, 1 thread": (morphology, 1), f"{here}, {a.workers} threads": (morphology, a.workers)}
    if a.against:   # named by its commit, which stays meaningful after HEAD moves on
        a.against = _git("rev-parse", "--short", a.against)
        sides[f"commit {a.against}"] = (module_at(a.against, "morphology"), None)
    times: dict[str, list] = {k: [] for k in sides}
    results = {}
    for _ in range(a.rounds):   # alternating, so load from other users hits every side alike
        for name, (mod, workers) in sides.items():
            dt, results[name] = label(mod, mask, workers)
            times[name].append(round(dt, 4))
    first = next(iter(results.values()))
    if not all(same(first, r) for r in results.values()):
        raise AssertionError("the sides found different components")
    best = {k: min(v) for k, v in times.items()}
    skeleton = skeleton_sides(mask, here, a.against and module_at(a.against, "graph"), a.against, a.rounds)
    out = {"machine": machine_info("cpu"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "benchmark": "label_slabs: morphology.label_slabs, 26-connected, slabs of 16, then the largest component's "
                        "slabs relabelled, on " + (f"the mask store {a.mask.name} of {a.mask.parent.name}" if a.mask else
                                                   "the built-in scan's vessel truth (large preset)"),
           "mask": str(a.mask) if a.mask else None,
           "shape": list(mask.shape), "slab_size": SLAB, "mask_fraction": round(float((mask > 0).mean()), 4),
           "components": first.n_components, "seconds": times, "best_s": best, "against_commit": a.against,
           "identical_results_checked": True,
           "speedup_best": {k: round(max(best.values()) / v, 2) for k, v in best.items()}, "skeleton": skeleton}
    print(json.dumps({k: out[k] for k in ("best_s", "speedup_best", "components", "skeleton")}, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return out


def skeleton_sides(mask: np.ndarray, here: str, old_graph, rev: str | None, rounds: int) -> dict:
    """The tree graph's other stage, ``graph.skeleton_graph`` of the largest tree's box (pooled in y and x to
    ``graph.max_voxels`` as the pipeline pools it), this code against
    ``old_graph`` (graph.py of commit ``rev``) if given: same branches, radii equal to 1e-12."""
    from gpuheart import graph

    from gpuheart.pipeline import GraphConfig

    tree, _ = graph.largest_tree(mask > 0, crop=True)
    # pooled in (y, x) to graph.max_voxels, as the pipeline's tree graph does
    k = max(1, int(np.ceil(np.sqrt(tree.size / GraphConfig().max_voxels))))
    tree = graph.downsample_yx(tree, k)
    vs = tuple(np.array(VOXEL) * [1, k, k])
    sides = {here: graph} | ({f"commit {rev}": old_graph} if old_graph is not None else {})
    times: dict[str, list] = {k: [] for k in sides}
    got = {}
    for _ in range(rounds):
        for name, mod in sides.items():
            t = time.perf_counter()
            got[name] = mod.skeleton_graph(tree, vs)
            times[name].append(round(time.perf_counter() - t, 4))
    first = next(iter(got.values()))
    worst = 0.0
    for g in got.values():
        if [(b.u, b.v, b.path.tolist()) for b in g.branches] != [(b.u, b.v, b.path.tolist()) for b in first.branches]:
            raise AssertionError("the sides traced different skeletons")
        for a, b in zip(g.branches, first.branches):
            if a.length_um != b.length_um:
                raise AssertionError("the sides measured different branch lengths")
            for x, y in ((a.mean_radius_um, b.mean_radius_um), (a.max_radius_um, b.max_radius_um)):
                worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    if worst > 1e-12:
        raise AssertionError(f"radii differ by up to {worst:.2e} (relative)")
    return {"box_shape": list(tree.shape), "downsample_yx": k, "box_fraction_inside": round(float(tree.mean()), 4),
            "branches": len(first.branches), "seconds": times, "best_s": {k: min(v) for k, v in times.items()},
            "max_radius_relative_difference": worst}


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=HERE.parent, check=True, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
