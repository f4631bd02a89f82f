"""The whole mesh stage, not only marching cubes: ``mesh.mesh_from_mask`` with what a run writes (GLB split
for Unity, the largest component, the component table) on a dense, spongy mask (autofluorescence segmented
as vessels gives such masks: millions of faces, thousands of pieces, cavities).

pytest-benchmark:   python -m pytest benchmarks/bench_mesh_stage.py --benchmark-only
side by side:       python benchmarks/bench_mesh_stage.py [--shape 16 1024 1024] [--mask sponge|sparse] [--against REV]
                    (writes benchmarks/results/cpu-mesh-stage.json, or cpu-mesh-stage-sparse.json)

``--against REV`` loads ``gpuheart/mesh.py`` as it was at git revision REV and times it alternately with the
current one on the same mask, after checking that both write the same surface: the same bytes (mesh, largest
component, table) and statistics, or, where the vertices are numbered differently (the marching cubes of masks
since 2026-11-27), the same counts, areas and volumes to 1e-9 and the same component table.
``--mask sparse`` meshes a vessel-like mask (about 0.4 % inside, thin pieces) instead of the sponge;
``--max-memory-faces N`` below the mask's face count times the block-mean path (what a full scan takes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu-mesh-stage.json"
VOXEL = (2.0, 0.5, 0.5)


def sponge(shape, seed: int = 0) -> np.ndarray:
    """Smoothed noise cut at its median: a spongy bool mask, about half inside."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    return np.concatenate([ndi.gaussian_filter(rng.random((min(8, shape[0] - z),) + tuple(shape[1:]),
                                                          np.float32), (0.8, 2.0, 2.0)) > 0.5
                           for z in range(0, shape[0], 8)])


def sparse(shape, seed: int = 0) -> np.ndarray:
    """Smoothed noise cut high: a sparse bool mask of thin, branching pieces (about 0.4 % inside)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    out = np.empty(shape, bool)   # filled in place: a full scan's mask (8.5 GB) is not held twice
    for z in range(0, shape[0], 8):
        out[z:z + 8] = ndi.gaussian_filter(rng.random((min(8, shape[0] - z),) + tuple(shape[1:]), np.float32),
                                           4.0) > 0.52
    return out


MASKS = {"sponge": sponge, "sparse": sparse}


def same_surface(tmp: Path, a: str, b: str, stats: dict) -> str:
    """How the two sides' outputs were found equal ("bytes" or "surface"); raises where they differ."""
    files = ("mesh.glb", "mesh.csv", "mesh-largest.glb")
    if all((tmp / a / f).read_bytes() == (tmp / b / f).read_bytes() for f in files) and stats[a] == stats[b]:
        return "bytes"
    sa, sb = stats[a], stats[b]
    for k in sa:
        if (sa[k] != pytest.approx(sb[k], rel=1e-9)) if isinstance(sa[k], float) else sa[k] != sb[k]:
            raise AssertionError(f"statistic {k} differs: {sa[k]} against {sb[k]}")
    ta, tb = (np.loadtxt(tmp / s / "mesh.csv", delimiter=",", skiprows=1, ndmin=2) for s in (a, b))
    # components tied on face count may be listed in either order: compare the rows sorted
    ta, tb = (t[:, 1:] for t in (ta, tb))   # the component numbers themselves follow the order
    ta, tb = (t[np.lexsort(t[:, ::-1].T)] for t in (ta, tb))
    np.testing.assert_allclose(ta, tb, rtol=1e-5, err_msg="component tables differ")
    return "surface"


def run_stage(mesh_module, mask: np.ndarray, out: Path, tag: str, max_memory_faces: int | None = None):
    out.mkdir(parents=True, exist_ok=True)
    budget = {} if max_memory_faces is None else {"max_memory_faces": max_memory_faces}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*the mask would give about", RuntimeWarning)   # the block factor's
        st = mesh_module.mesh_from_mask(mask, mask.shape, out / f"{tag}.glb", VOXEL, slab_size=8,
                                        table_path=out / f"{tag}.csv", largest_path=out / f"{tag}-largest.glb",
                                        **budget)
    return time.perf_counter() - t, st


@pytest.fixture(scope="module")
def small_sponge():
    return sponge((8, 256, 256))


def test_mesh_stage(benchmark, small_sponge, tmp_path):
    from gpuheart import mesh

    benchmark.pedantic(run_stage, args=(mesh, small_sponge, tmp_path, "m"), rounds=2, iterations=1)


def _commit() -> str:
    """The checkout's commit, marked "+changes" where the working tree differs from it."""
    def run(*cmd):
        return subprocess.run(["git", *cmd], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()

    return run("rev-parse", "--short", "HEAD") + ("+changes" if run("status", "--porcelain", "gpuheart") else "")


def main(argv=None) -> dict:
    from gpuheart import mesh

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[16, 1024, 1024])
    ap.add_argument("--against", metavar="REV", help="also time gpuheart/mesh.py of this git revision")
    ap.add_argument("--mask", choices=sorted(MASKS), default="sponge")
    ap.add_argument("--max-memory-faces", type=int, metavar="N",
                    help="mesh_from_mask's budget (default: its own); a small one times the block-mean path")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, help=f"default: {RESULTS.name}, {RESULTS.stem}-sparse.json for --mask "
                                             "sparse, with -blocks before .json for --max-memory-faces")
    a = ap.parse_args(argv)
    tag = ("" if a.mask == "sponge" else f"-{a.mask}") + ("" if a.max_memory_faces is None else "-blocks")
    a.out = a.out or RESULTS.with_name(f"{RESULTS.stem}{tag}.json")
    mask = MASKS[a.mask](tuple(a.shape))
    sides = {"current": mesh}
    if a.against:   # named by its commit, which stays meaningful after HEAD moves on
        a.against = subprocess.run(["git", "rev-parse", "--short", a.against], cwd=HERE.parent, check=True,
                                   capture_output=True, text=True).stdout.strip()
        sys.path.insert(0, str(HERE))
        from conftest import module_at

        sides[a.against] = module_at(a.against, "mesh")
    times: dict[str, list] = {k: [] for k in sides}
    stats = {}
    with tempfile.TemporaryDirectory(prefix="gpuheart-mesh-stage-") as tmp:
        for r in range(a.rounds):   # alternating, so load from other users hits both sides alike
            for name, mod in sides.items():
                dt, st = run_stage(mod, mask, Path(tmp) / name, "mesh", a.max_memory_faces)
                times[name].append(dt)
                stats[name] = {k: v for k, v in asdict(replace(st, path="")).items() if k != "path"}
        same = same_surface(Path(tmp), "current", a.against, stats) if a.against else None
    best = {k: min(v) for k, v in times.items()}
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count(),
                       "python": sys.version.split()[0], "numpy": np.__version__,
                       "load_avg_1min": os.getloadavg()[0]},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "benchmark": "mesh.mesh_from_mask with a GLB, its largest component and the component table, on a "
                        + ("spongy mask (smoothed noise > 0.5)" if a.mask == "sponge"
                           else "sparse mask (smoothed noise, sigma 4, > 0.52)"),
           "mask": a.mask, "max_memory_faces": a.max_memory_faces,
           "shape": list(a.shape), "voxel_size": list(VOXEL), "mask_fraction": float(mask.mean()),
           "stats": stats["current"], "seconds": times, "best_s": best,
           "commit": _commit(), "against_commit": a.against, "identical_outputs_checked": bool(a.against), "outputs_equal_as": same}
    if a.against:
        out["speedup_best"] = best[a.against] / best["current"]
    print(json.dumps({k: out[k] for k in ("best_s", "stats") if k in out}, indent=1),
          f"\nspeed-up: {out.get('speedup_best', float('nan')):.2f}x" if a.against else "")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
