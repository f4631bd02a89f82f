"""Leave-one-stack-out accuracy of the segmentation methods on the labelled real stacks.

For every stack: the U-Net is trained on all the *other* stacks (never on the one it is scored on),
then scored on it; global Otsu on the preprocessed stack and the difference-of-medians mask are
scored alongside as baselines. Every image goes through the pipeline's own preprocessing
(``exposure.preprocess_volume``), so the model sees what it will see at inference.

    python benchmarks/accuracy.py [--data DIR] [--epochs N] [--steps N] [--out results.json]

Writes a JSON with per-stack Dice, clDice, precision and recall (and the settings) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def load_stacks(data: Path):
    import tifffile

    from gpuheart.exposure import preprocess_volume

    stacks = {}
    for f in sorted(data.glob("*/*_image.tif")):
        name = f.name.removesuffix("_image.tif")
        img = tifffile.imread(f)
        lab = tifffile.imread(f.with_name(name + "_label.tif")) > 0
        stacks[name] = (preprocess_volume(img), lab)
    return stacks


def baselines(pre, lab) -> dict:
    from skimage.filters import threshold_otsu

    from gpuheart.metrics import Confusion
    from gpuheart.segment import dom_mask

    otsu = pre > threshold_otsu(pre)
    dom = np.stack([dom_mask(s, 3, 15, "otsu") for s in pre])
    return {"otsu": score(otsu, lab), "dom": score(dom, lab)}


def score(pred, lab) -> dict:
    from gpuheart.metrics import Confusion, cl_dice

    s = Confusion().update(pred, lab).scores()
    s["cldice"] = cl_dice(pred, lab)
    return {k: round(float(v), 4) for k, v in s.items() if k in ("dice", "cldice", "precision", "recall")}


def main(argv=None):
    from gpuheart import unet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("GPUHEART_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--data", default=default_data)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--only", nargs="*", help="score only these stacks")
    p.add_argument("--out", default="benchmarks/results/accuracy-loso.json")
    p.add_argument("--runs", default="/tmp/gpuheart-loso")
    a = p.parse_args(argv)
    stacks = load_stacks(Path(a.data))
    results = {}
    for held in a.only or list(stacks):
        t0 = time.time()
        train_names = [n for n in stacks if n != held]
        cfg = unet.TrainConfig(epochs=a.epochs, steps_per_epoch=a.steps, tile=a.tile, width=a.width,
                               batch_size=8, patience=6, lr_patience=3, num_threads=os.cpu_count(), seed=0)
        res = unet.train([stacks[n][0] for n in train_names], [stacks[n][1] for n in train_names], cfg,
                         Path(a.runs) / held, progress=False)
        model = unet.load_weights(res.best_path)
        pre, lab = stacks[held]
        prob = unet.predict(model, pre, tile=256, overlap=64)
        results[held] = {"unet": score(prob > 0.5, lab), **baselines(pre, lab),
                         "train_stacks": train_names, "best_epoch": res.best_epoch,
                         "val_dice": round(res.best_val_dice, 4), "seconds": round(time.time() - t0, 1)}
        print(held, json.dumps(results[held]), flush=True)
    summary = {m: round(float(np.mean([r[m]["dice"] for r in results.values()])), 4) for m in ("unet", "otsu", "dom")}
    out = {"machine": {"processor": platform.processor(), "cpus": os.cpu_count()},
           "settings": vars(a), "per_stack": results, "mean_dice": summary}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print("mean Dice", summary)


if __name__ == "__main__":
    sys.exit(main())
