"""Is the held-out Dice limited by the scale the U-Net sees? Probes on fold models of leave-one-stack-out runs.

The five labelled stacks differ in pixel size and vessel calibre, and their files carry no pixel size, so a
physical target resolution (as nnU-Net resamples to) cannot be set. This asks what resampling the input would
give instead. For every stack, the fold model that never saw it (``RUNS/<stack>/best.pt``, from
``benchmarks/accuracy.py``) predicts on the stack resized by each factor in ``--scales`` (bilinear, with
anti-aliasing when shrinking; the probabilities are resized back), and is scored at its calibrated threshold and
at 0.5. Also scored: the mean probability over all the scales (an ensemble over scale), and the **best scale for
each stack, chosen with its labels** (a ceiling no rule can beat), and one scale chosen *leave one stack out*:
for each stack, the scale with the best mean Dice on the other four (scored by their own fold models), which
is what a rule picked on these stacks would give on a new one. Nothing here trains.

    python benchmarks/accuracy_scales.py --runs /tmp/loso-a [/tmp/loso-b ...] [--out benchmarks/results/accuracy-scales.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, load_stacks, write_result  # noqa: E402
from accuracy_probe import dice  # noqa: E402

SCALES = (0.5, 0.71, 1.0, 1.41, 2.0)


def resized(a: np.ndarray, shape, shrink: bool) -> np.ndarray:
    from skimage.transform import resize

    return resize(a.astype(np.float32), shape, order=1, anti_aliasing=shrink, preserve_range=True)


def scale_probabilities(model, pre: np.ndarray, scales) -> dict[float, np.ndarray]:
    """{scale: probability map on ``pre``'s grid} from predictions on ``pre`` resized in y and x."""
    from gpuheart.unet import predict

    z, h, w = pre.shape
    out = {}
    for s in scales:
        if s == 1.0:
            out[s] = predict(model, pre)
            continue
        size = (z, max(int(round(h * s)), 16), max(int(round(w * s)), 16))
        img = np.clip(np.rint(resized(pre, size, s < 1)), 0, 255).astype(pre.dtype)
        out[s] = resized(predict(model, img), pre.shape, False)
    return out


def probe(name, pre, lab, runs: Path, scales) -> dict:
    from gpuheart import unet

    model = unet.load_weights(runs / name / "best.pt")
    thr = model.meta.get("threshold", 0.5)
    probs = scale_probabilities(model, pre, scales)
    probs["mean"] = np.mean([probs[s] for s in scales], axis=0)
    return {"threshold": thr,
            **{f"x{s}": {"calibrated": round(dice(p > thr, lab), 4), "at_0.5": round(dice(p > 0.5, lab), 4)}
               for s, p in probs.items()}}


def summarize(per_stack: dict, scales) -> dict:
    keys = [f"x{s}" for s in scales]
    mean = {k: {c: round(float(np.mean([r[k][c] for r in per_stack.values()])), 4) for c in ("calibrated", "at_0.5")}
            for k in keys + ["xmean"]}
    for cut in ("calibrated", "at_0.5"):
        best = [max(r[k][cut] for k in keys) for r in per_stack.values()]
        mean[f"best_scale_per_stack_{cut}"] = round(float(np.mean(best)), 4)
        chosen = {}
        for held in per_stack:   # the scale the other stacks' held-out scores favour
            others = [r for n, r in per_stack.items() if n != held]
            k = max(keys, key=lambda k: np.mean([r[k][cut] for r in others]))
            chosen[held] = {"scale": k, "dice": per_stack[held][k][cut]}
        mean[f"scale_chosen_leave_one_out_{cut}"] = round(float(np.mean([c["dice"] for c in chosen.values()])), 4)
        mean[f"scales_chosen_{cut}"] = {n: c["scale"] for n, c in chosen.items()}
    return mean


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--runs", nargs="+", required=True, help="fold-model folders of accuracy.py runs")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    p.add_argument("--out", default="benchmarks/results/accuracy-scales.json")
    a = p.parse_args(argv)
    if 1.0 not in a.scales:
        raise SystemExit("--scales must include 1.0 (the unresized baseline)")
    stacks = load_stacks(Path(a.data))
    runs = {}
    for run in a.runs:
        per_stack, t0 = {}, time.perf_counter()
        for name, (pre, lab) in stacks.items():
            per_stack[name] = probe(name, pre, lab, Path(run), a.scales)
            print(run, name, json.dumps(per_stack[name]), flush=True)
        runs[run] = {"recipe": recipe(Path(run) / next(iter(stacks)) / "best.pt"), "per_stack": per_stack,
                     "mean": summarize(per_stack, a.scales), "seconds": round(time.perf_counter() - t0, 1)}
        print("mean", run, json.dumps(runs[run]["mean"]), flush=True)
        write_result(a.out, {}, scales=a.scales, runs=runs)


def recipe(path: Path) -> dict:
    """The training settings a fold model records, for the result file."""
    from gpuheart import unet

    cfg = unet.load_weights(path).meta.get("config", {})
    return {k: cfg[k] for k in ("epochs", "steps_per_epoch", "batch_size", "tile", "width", "norm", "loss") if k in cfg}


if __name__ == "__main__":
    sys.exit(main())
