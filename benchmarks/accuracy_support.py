"""Probe: drop U-Net components that the difference of medians does not support, on held-out stacks.

On the built-in scan the U-Net marks the heart wall's autofluorescence, which bleeds into the vessel channel as
a smooth band tens of pixels wide, as vessel (its precision there is 0.18). The difference of medians, a local
contrast filter, hardly fires on a smooth band but does on vessels. So: label the U-Net mask's connected
components and keep those where at least a fraction ``f`` of the voxels are also in the difference-of-medians
mask (per-slice Otsu, as the pipeline's). The idea came from looking at the built-in scan, so it is judged on
the real stacks, with fold models that never saw the stack they are scored on (``RUNS/<stack>/best.pt``, from
``benchmarks/accuracy.py``), predicting on the training tile at the calibrated cut.

Components are taken slice by slice (8-neighbours), which a streamed pipeline can do per slab, and in 3-D
(26-neighbours), which it cannot without a whole-scan pass (reported for the record). The honest fraction for a
new stack is the one chosen leave one stack out (the best mean over the other four stacks).
Written before any real stack was scored: the per-slice filter becomes the default only if, at the fraction
chosen leave one stack out, no real stack loses more than 0.005 (U-Net mask and union), the mean does not drop,
and the built-in scan's vessel channel gains at least 0.05 (union mask) at the fraction most often chosen.

    python benchmarks/accuracy_support.py --runs /tmp/loso [--out benchmarks/results/accuracy-support.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import _phantom_vessels, dice, dom_masks, fold_probe, write_result  # noqa: E402

FRACTIONS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def supported(mask, support, f: float, per_slice: bool) -> np.ndarray:
    """``mask`` without its connected components of which less than ``f`` lies in ``support``."""
    from scipy import ndimage as ndi

    if per_slice:
        return np.stack([supported(m, s, f, False) for m, s in zip(mask, support)])
    lab, n = ndi.label(mask, np.ones((3,) * mask.ndim, bool))
    size = np.bincount(lab.ravel(), minlength=n + 1)
    hits = np.bincount(lab.ravel(), weights=support.ravel(), minlength=n + 1)
    keep = hits >= f * size
    keep[0] = False
    return keep[lab]


def scores(prob, thr, dom, lab) -> dict:
    m = prob > thr
    row = {"threshold": thr, "unet": dice(m, lab), "union": dice(m | dom, lab), "dom": dice(dom, lab)}
    for mode, per_slice in (("2d", True), ("3d", False)):
        for f in FRACTIONS:
            kept = supported(m, dom, f, per_slice)
            row[f"unet_{mode}_{f}"] = dice(kept, lab)
            row[f"union_{mode}_{f}"] = dice(kept | dom, lab)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def probe(name, pre, lab, runs: Path) -> dict:
    from gpuheart import unet

    model = unet.load_weights(runs / name / "best.pt")
    return scores(unet.predict(model, pre), float(model.meta.get("threshold", 0.5)), dom_masks(pre) > 0, lab)


def leave_one_out(per_stack: dict, kind: str, mode: str) -> dict:
    """For each stack, the fraction best on the other four, and this stack's score at it."""
    out = {}
    for name in per_stack:
        others = [r for n, r in per_stack.items() if n != name]
        f = max(FRACTIONS, key=lambda f: np.mean([r[f"{kind}_{mode}_{f}"] for r in others]))
        out[name] = {"fraction": f, "dice": per_stack[name][f"{kind}_{mode}_{f}"],
                     "change": round(per_stack[name][f"{kind}_{mode}_{f}"] - per_stack[name][kind], 4)}
    return out


def main():
    from gpuheart import unet

    a, per_stack = fold_probe(__doc__.splitlines()[0], "benchmarks/results/accuracy-support.json", probe,
                              show=lambda row: {k: row[k] for k in ("unet", "union", "unet_2d_0.1", "union_2d_0.1")})
    loo = {f"{kind}_{mode}": leave_one_out(per_stack, kind, mode) for kind in ("unet", "union") for mode in ("2d", "3d")}
    keys = [k for k, v in next(iter(per_stack.values())).items() if isinstance(v, float) and k != "threshold"]
    mean = {k: round(float(np.mean([r[k] for r in per_stack.values()])), 4) for k in keys}
    for key, rows in loo.items():
        mean[f"{key}_leave_one_out"] = round(float(np.mean([v["dice"] for v in rows.values()])), 4)
    # the built-in scan (its vessel channel) with the shipped model, as `gpuheart run` segments it
    pre, truth = _phantom_vessels()
    model = unet.load_default()
    phantom = scores(unet.predict(model, pre), float(model.meta.get("threshold", 0.5)), dom_masks(pre) > 0, truth > 0)
    write_result(a.out, {}, runs=a.runs, fractions=FRACTIONS, per_stack=per_stack, leave_one_out=loo, mean=mean,
                 phantom_shipped_model=phantom)
    print("mean", json.dumps({k: v for k, v in mean.items() if k in ("unet", "union") or k.endswith("leave_one_out")}))
    print("leave one out", json.dumps(loo))
    print("phantom", json.dumps(phantom))


if __name__ == "__main__":
    sys.exit(main())
