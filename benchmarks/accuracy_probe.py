"""What limits the held-out Dice: probes on the fold models a leave-one-stack-out run left behind.

For every stack, the model that never saw it (``RUNS/<stack>/best.pt``, from ``benchmarks/accuracy.py``) is
scored on it at its calibrated threshold, at 0.5, and at the **best threshold for that stack** (chosen with its
labels: a ceiling no threshold rule can beat); with 8-fold test-time augmentation (the square's rotations and
flips); with 128-pixel inference tiles (the training tile side); the mean of the probabilities of the fold
models of every ``--runs`` folder given (an ensemble); and, on the mask at 0.5, post-processing that needs no
labels: removing 3-D connected components under 1,000 voxels, filling holes slice by slice, and combining the
mask with one global Otsu threshold of the preprocessed stack (AND, OR). Nothing here trains.

    python benchmarks/accuracy_probe.py --runs /tmp/loso-a [/tmp/loso-b ...] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, dice, load_stacks, write_result  # noqa: E402

THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def dihedral_mean(model, pre) -> np.ndarray:
    """Mean probability over the 8 rotations/flips of every slice (each prediction mapped back)."""
    from gpuheart.unet import predict

    acc = np.zeros(pre.shape, np.float32)
    for flip in (False, True):
        img = pre[:, :, ::-1] if flip else pre
        for k in range(4):
            p = np.rot90(predict(model, np.ascontiguousarray(np.rot90(img, k, axes=(1, 2))), tile=256, overlap=64),
                         -k, axes=(1, 2))
            acc += p[:, :, ::-1] if flip else p
    return acc / 8


def probe(name, pre, lab, runs: list[Path]) -> dict:
    from gpuheart import unet

    model = unet.load_weights(runs[0] / name / "best.pt")
    thr = model.meta.get("threshold", 0.5)
    prob = unet.predict(model, pre, tile=256, overlap=64)
    curve = [dice(prob > t, lab) for t in THRESHOLDS]
    tta = dihedral_mean(model, pre)
    row = {"labelled_fraction": round(float(lab.mean()), 4), "calibrated": dice(prob > thr, lab), "threshold": thr,
           "at_0.5": dice(prob > 0.5, lab), "best_threshold": float(THRESHOLDS[int(np.argmax(curve))]),
           "at_best_threshold": max(curve), "tta8_calibrated": dice(tta > thr, lab),
           "tta8_at_best_threshold": max(dice(tta > t, lab) for t in THRESHOLDS),
           "tile128_calibrated": dice(unet.predict(model, pre, tile=128, overlap=32) > thr, lab)}
    row.update(postprocess_probes(prob > 0.5, pre, lab))
    # label-free thresholds chosen per stack from its own probability map: can any recover the best cut?
    from skimage.filters import threshold_li, threshold_otsu

    row["at_otsu_of_probabilities"] = dice(prob > threshold_otsu(prob), lab)
    row["at_li_of_probabilities"] = dice(prob > threshold_li(prob), lab)
    if len(runs) > 1:
        probs = [prob] + [unet.predict(unet.load_weights(r / name / "best.pt"), pre, tile=256, overlap=64)
                          for r in runs[1:]]
        row["ensemble_at_0.5"] = dice(np.mean(probs, axis=0) > 0.5, lab)
        row["members_at_0.5"] = [round(dice(p > 0.5, lab), 4) for p in probs]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def postprocess_probes(mask, pre, lab) -> dict:
    """Dice of label-free clean-ups of the 0.5 mask: what a pipeline stage could do on an unseen stack."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    comps, _ = ndi.label(mask, np.ones((3, 3, 3), bool))
    sizes = np.bincount(comps.ravel())
    keep = sizes >= 1000
    keep[0] = False
    otsu = pre > threshold_otsu(pre)
    return {"at_0.5_without_components_under_1000": dice(keep[comps], lab),
            "at_0.5_holes_filled_per_slice": dice(np.stack([ndi.binary_fill_holes(m) for m in mask]), lab),
            "at_0.5_and_otsu": dice(mask & otsu, lab), "at_0.5_or_otsu": dice(mask | otsu, lab)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--runs", nargs="+", required=True, help="fold-model folders of accuracy.py runs; the first is probed")
    p.add_argument("--out", default="benchmarks/results/accuracy-probes.json")
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs]
    per_stack = {}
    for name, (pre, lab) in load_stacks(Path(a.data)).items():
        per_stack[name] = probe(name, pre, lab, runs)
        print(name, json.dumps(per_stack[name]), flush=True)
    keys = [k for k, v in next(iter(per_stack.values())).items() if isinstance(v, float) and k != "threshold"]
    mean = {k: round(float(np.mean([r[k] for r in per_stack.values()])), 4) for k in keys}
    write_result(a.out, {}, runs=[str(r) for r in runs], per_stack=per_stack, mean=mean)
    print("mean", json.dumps(mean))


if __name__ == "__main__":
    sys.exit(main())
