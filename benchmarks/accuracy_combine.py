"""Probe: two ways of combining predictions of held-out fold models, with no retraining.

1. Three planes (isotropic stacks only): the 2-D model predicts the stack's xy slices, and also its xz and yz
   planes, and the three probability maps are averaged. A vessel that crosses the xy plane steeply is a dot there
   and a line in the other two. Only the light-sheet stack is isotropic; the two-photon stacks (5x1x1 um, 15-26
   slices) are left out of it.
2. Two model families: per stack, the mean probability of a GroupNorm fold model (``--runs``) and a fold model of
   another recipe (``--other``, here the 8x recipe without normalization layers), cut at the mean of their
   calibrated thresholds. The first family wins on the light-sheet stack, the second on the two-photon ones.

Both rules were committed before any score (63d06ee, then the next commit): three planes become an option only if
the fold models of both families gain >= 0.02 on the light-sheet stack; an ensemble option only if its five-stack
mean beats the better family alone by >= 0.01 with no stack more than 0.03 below the GroupNorm fold.

    python benchmarks/accuracy_combine.py --runs RUNS_GN --other RUNS_NONORM [--out benchmarks/results/accuracy-combine.json]

A fold model is the ``best.pt`` in a folder named after its stack, anywhere under ``--runs`` / ``--other``
(merged one-fold runs nest one level deeper).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, dice, load_stacks, write_result  # noqa: E402

ISOTROPIC = ("capillaries_000",)   # shared/data/README.md: the light-sheet stack's voxels are isotropic


def fold_model(runs: Path, name: str):
    from gpuheart import unet

    found = sorted(runs.glob(f"**/{name}/best.pt"))
    if not found:
        raise SystemExit(f"no {name}/best.pt under {runs}")
    return unet.load_weights(found[0])


def cut(model) -> float:
    return float(model.meta.get("threshold", 0.5))


def three_planes(model, pre) -> dict:
    """Probability maps of the xy, xz and yz planes, each back in (z, y, x) order."""
    from gpuheart import unet

    def along(axis):
        return np.moveaxis(unet.predict(model, np.ascontiguousarray(np.moveaxis(pre, axis, 0))), 0, axis)

    return {"xy": along(0), "xz": along(1), "yz": along(2)}


def planes_row(model, pre, lab) -> dict:
    p = three_planes(model, pre)
    p["three"] = (p["xy"] + p["xz"] + p["yz"]) / 3
    return {"threshold": cut(model), **{k: round(dice(v > cut(model), lab), 4) for k, v in p.items()}}


def ensemble_row(a, b, pre, lab) -> dict:
    from gpuheart import unet

    pa, pb = unet.predict(a, pre), unet.predict(b, pre)
    t = round((cut(a) + cut(b)) / 2, 4)
    return {"runs": round(dice(pa > cut(a), lab), 4), "other": round(dice(pb > cut(b), lab), 4), "cut": t,
            "ensemble": round(dice((pa + pb) / 2 > t, lab), 4),
            "ensemble_at_0.5": round(dice((pa + pb) / 2 > 0.5, lab), 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--runs", required=True, help="fold models of a GroupNorm recipe")
    p.add_argument("--other", required=True, help="fold models of a second recipe")
    p.add_argument("--out", default="benchmarks/results/accuracy-combine.json")
    a = p.parse_args()
    runs, other = Path(a.runs), Path(a.other)
    planes, ensemble = {}, {}
    for name, (pre, lab) in load_stacks(Path(a.data)).items():
        ga, gb = fold_model(runs, name), fold_model(other, name)
        ensemble[name] = ensemble_row(ga, gb, pre, lab)
        if name in ISOTROPIC:
            planes[name] = {"runs": planes_row(ga, pre, lab), "other": planes_row(gb, pre, lab)}
        print(name, json.dumps({"ensemble": ensemble[name], "planes": planes.get(name)}), flush=True)
    mean = {k: round(float(np.mean([r[k] for r in ensemble.values()])), 4)
            for k in ("runs", "other", "ensemble", "ensemble_at_0.5")}
    write_result(a.out, {}, runs=a.runs, other=a.other, three_planes=planes, ensemble=ensemble, mean_ensemble=mean)
    print("mean", json.dumps(mean))


if __name__ == "__main__":
    sys.exit(main())
