"""Probe: hysteresis instead of one cut on the U-Net's probabilities, on held-out stacks.

The probes in accuracy.md found that no single cut, chosen without labels, recovers the gap between the held-out
stacks' conventions: burgess2014_lowerRes wants a low cut (its labels fill thick vessels' dim interiors), santos2015
and burgess2014_bbbDisruption a high one (their labels leave dim vessel-like structures out). Hysteresis asks for
both at once: keep a voxel above a low cut only if it is connected to a voxel above a high cut. Dim interiors
touch bright walls; isolated dim structures touch nothing bright. It needs no labels.

For every stack the fold model that never saw it (``RUNS/<stack>/best.pt``, from ``benchmarks/accuracy.py``)
predicts it on its training tile; masks from a grid of (low, high) pairs, connected in 3-D (26-neighbours) and
slice by slice (8-neighbours), are scored against its labels. The honest number for a new stack is the pair
chosen leave one stack out (for each held-out stack, the pair with the best mean over the other four), as in
``accuracy_scales.py``. Written before any result was seen: hysteresis becomes the default only if that
number gains at least 0.01 on the mean over the calibrated cut and costs no stack more than 0.01.

    python benchmarks/accuracy_hysteresis.py --runs /tmp/loso [--out benchmarks/results/accuracy-hysteresis.json]
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import dice, fold_probe, write_result  # noqa: E402

LOWS = (0.1, 0.2, 0.3, 0.4)
HIGHS = (0.5, 0.6, 0.7, 0.8, 0.9)


def hysteresis(prob, low: float, high: float, per_slice: bool) -> np.ndarray:
    from skimage.filters import apply_hysteresis_threshold

    if per_slice:
        return np.stack([apply_hysteresis_threshold(p, low, high) for p in prob])
    return apply_hysteresis_threshold(prob, low, high)


def probe(name, pre, lab, runs: Path) -> dict:
    from gpuheart import unet

    model = unet.load_weights(runs / name / "best.pt")
    thr = float(model.meta.get("threshold", 0.5))
    prob = unet.predict(model, pre)  # the training tile, as the pipeline predicts
    row = {"threshold": thr, "calibrated": dice(prob > thr, lab), "at_0.5": dice(prob > 0.5, lab)}
    for mode, per_slice in (("3d", False), ("2d", True)):
        for low, high in itertools.product(LOWS, HIGHS):
            row[f"hyst_{mode}_{low}_{high}"] = dice(hysteresis(prob, low, high, per_slice), lab)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def leave_one_out(per_stack: dict, mode: str) -> dict:
    """For each stack, the (low, high) pair best on the other four, and its score on this one."""
    keys = [k for k in next(iter(per_stack.values())) if k.startswith(f"hyst_{mode}_")]
    out = {}
    for name in per_stack:
        others = [r for n, r in per_stack.items() if n != name]
        best = max(keys, key=lambda k: np.mean([r[k] for r in others]))
        out[name] = {"pair": best.removeprefix(f"hyst_{mode}_"), "dice": per_stack[name][best]}
    return out


def main():
    a, per_stack = fold_probe(__doc__.splitlines()[0], "benchmarks/results/accuracy-hysteresis.json", probe,
                              show=lambda row: row["calibrated"])
    loo = {mode: leave_one_out(per_stack, mode) for mode in ("3d", "2d")}
    keys = [k for k, v in next(iter(per_stack.values())).items() if isinstance(v, float) and k != "threshold"]
    mean = {k: round(float(np.mean([r[k] for r in per_stack.values()])), 4) for k in keys}
    for mode in loo:
        mean[f"hyst_{mode}_leave_one_out"] = round(float(np.mean([v["dice"] for v in loo[mode].values()])), 4)
    write_result(a.out, {}, runs=a.runs, lows=LOWS, highs=HIGHS, per_stack=per_stack, leave_one_out=loo, mean=mean)
    best = sorted(((v, k) for k, v in mean.items()), reverse=True)[:6]
    print("calibrated", mean["calibrated"], "at 0.5", mean["at_0.5"])
    print("leave one out", {m: mean[f"hyst_{m}_leave_one_out"] for m in loo}, json.dumps(loo))
    print("best pairs (chosen with all labels)", best)


if __name__ == "__main__":
    sys.exit(main())
