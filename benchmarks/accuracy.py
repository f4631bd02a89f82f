"""Leave-one-stack-out accuracy of the segmentation methods on the labelled real stacks.

For every stack: the U-Net is trained with the shipped recipe (``gpuheart train``: the labelled
stacks plus synthetic scans) on all the *other* stacks — never on the one it is scored on — then
scored on it at the threshold it calibrated on its own validation slices; global Otsu on the
preprocessed stack, the difference-of-medians mask and the union (the paper's segmentation) are
scored alongside. Every image goes through the pipeline's own preprocessing
(``exposure.preprocess_volume``), so the model sees what it will see at inference.

    python benchmarks/accuracy.py [--data DIR] [--epochs N] [--steps N] [--phantoms N] [--out results.json]

Writes a JSON with per-stack Dice, clDice, precision and recall (and the settings) and prints a table.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


# the labelled stacks: $GPUHEART_DATA, else ../shared/data beside the checkout (as the tests find them)
DEFAULT_DATA = os.environ.get("GPUHEART_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


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


def dom_masks(pre) -> np.ndarray:
    """The difference-of-medians mask (3x3 - 15x15, per-slice Otsu) of every slice, as dom_mask gives it."""
    from gpuheart.segment import dom_mask

    return np.stack([dom_mask(s, 3, 15, "otsu") for s in pre])


def baselines(pre, lab) -> dict:
    from skimage.filters import threshold_otsu

    otsu = pre > threshold_otsu(pre)
    dom = dom_masks(pre)
    return {"otsu": score(otsu, lab), "dom": score(dom, lab), "dom_mask": dom}


def score(pred, lab) -> dict:
    from gpuheart.metrics import Confusion, cl_dice

    s = Confusion().update(pred, lab).scores()
    s["cldice"] = cl_dice(pred, lab)
    return {k: round(float(v), 4) for k, v in s.items() if k in ("dice", "cldice", "precision", "recall")}


@functools.lru_cache(maxsize=1)
def _phantom_vessels():
    """The built-in scan's vessel channel, preprocessed, and its truth (made once for all fold models)."""
    from gpuheart.exposure import preprocess_volume
    from gpuheart.phantom import Phantom, PhantomConfig

    ph = Phantom(PhantomConfig.preset("default"))
    z = ph.shape[0]
    return preprocess_volume(ph.slab("C00", 0, z)), ph.truth("C00", 0, z)


def phantom_score(model) -> dict:
    """Dice of ``model`` on the built-in scan's vessel channel (seed 0, which ``--phantoms N`` never trains on:
    it uses seeds 1..N), at the model's threshold and at 0.5."""
    from gpuheart import unet

    pre, truth = _phantom_vessels()
    prob = unet.predict(model, pre)
    return {"unet": score(prob > model.meta.get("threshold", 0.5), truth), "unet_at_0.5": score(prob > 0.5, truth)}


def device_label() -> str:
    """Where the fold models were trained: "cpu", or the name of the GPU torch trains on."""
    import torch

    from gpuheart.unet import torch_device

    if torch_device("auto") != "cuda":
        return "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import slug   # the label every other result file uses

    return slug(torch.cuda.get_device_name())


def write_result(path, doc: dict, **fields) -> Path:
    """``doc`` plus the device label, the date and ``fields``, as indented JSON at ``path``."""
    out = {"device_label": device_label(), "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), **doc, **fields}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))
    return Path(path)


def dice(pred, lab) -> float:
    """Dice of two bool masks (0 where both are empty)."""
    return float(2 * (pred & lab).sum() / max(int(pred.sum()) + int(lab.sum()), 1))


def fold_probe(description: str, out: str, probe, show=lambda row: row) -> tuple[argparse.Namespace, dict]:
    """The command line of a script that probes the fold models of an earlier run (``--data``, ``--runs``,
    ``--out``): ``probe(name, pre, lab, runs)`` for every labelled stack, printed through ``show``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--runs", required=True, help="fold-model folder of an accuracy.py run")
    p.add_argument("--out", default=out)
    a = p.parse_args()
    per_stack = {}
    for name, (pre, lab) in load_stacks(Path(a.data)).items():
        per_stack[name] = probe(name, pre, lab, Path(a.runs))
        print(name, json.dumps(show(per_stack[name])), flush=True)
    return a, per_stack


def mean_dice(per_stack: dict) -> dict:
    return {m: round(float(np.mean([r[m]["dice"] for r in per_stack.values()])), 4)
            for m in ("unet", "union", "otsu", "dom")}


def merge_folds(paths, out) -> None:
    """One result of several one-fold runs (``--only STACK`` each, same settings but for ``only``): their
    per-stack scores side by side and the mean over them."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    # where the data and outputs lay on each machine does not matter; the data are the same stacks
    settings = [{k: v for k, v in d["settings"].items() if k not in ("only", "out", "runs", "data")} for d in docs]
    if any(s != settings[0] for s in settings):
        raise SystemExit("the fold results were made with different settings; merge runs of one recipe")
    per_stack = {k: v for d in docs for k, v in d["per_stack"].items()}
    # results are filed under a GPU's label when any fold trained on one; fold_devices says which
    devices = sorted({d["device_label"] for d in docs}, key=lambda dev: dev == "cpu")
    write_result(out, {"machine": docs[0]["machine"], "device_label": devices[0],
                       "date": max(d["date"] for d in docs),
                       "fold_devices": {k: d["device_label"] for d in docs for k in d["per_stack"]}},
                 settings={**settings[0], "only": sorted(per_stack), "merged_from": [Path(p).name for p in paths]},
                 per_stack=per_stack, mean_dice=mean_dice(per_stack))
    print("mean Dice", mean_dice(per_stack), "over", len(per_stack), "stacks")


def main(argv=None):
    from gpuheart import unet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="tiles per training step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=0, help="tile-drawing processes (gpuheart train --workers)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: every core; give 1 when folds run side by side)")
    p.add_argument("--phantoms", type=int, default=0, help="synthetic scans added to the training data")
    p.add_argument("--loss", default="tversky_focal")
    p.add_argument("--norm", default="group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="plateau", help="learning-rate schedule: plateau or cosine")
    p.add_argument("--context", type=int, default=0, help="2.5-D: neighbouring slices each side as input channels")
    p.add_argument("--zoom", type=float, default=None, help="zoom augmentation range (AugmentConfig.scale)")
    p.add_argument("--haze", type=float, default=None, help="haze augmentation peak (AugmentConfig.haze)")
    p.add_argument("--balance", default="pixel", help="tile draws: pixel (every pixel alike) or stack (every stack alike)")
    p.add_argument("--only", nargs="*", help="score only these stacks")
    p.add_argument("--out", default="benchmarks/results/accuracy-loso.json")
    p.add_argument("--merge", nargs="+", metavar="FOLD_JSON",
                   help="only merge these one-fold results (runs of --only STACK side by side) into --out")
    p.add_argument("--runs", help="a new folder for the fold models (default: a fresh /tmp/gpuheart-loso-*; "
                                   "training refuses a folder that holds a run)")
    a = p.parse_args(argv)
    if a.merge:
        return merge_folds(a.merge, a.out)
    if a.runs is None:
        import tempfile

        a.runs = tempfile.mkdtemp(prefix="gpuheart-loso-")
    print(f"fold models go to {a.runs}", flush=True)
    stacks = load_stacks(Path(a.data))
    results = {}
    aug_over = {k: v for k, v in (("scale", a.zoom), ("haze", a.haze)) if v is not None}
    aug_kw = {"aug": unet.AugmentConfig(**aug_over)} if aug_over else {}
    for held in a.only or list(stacks):
        t0 = time.time()
        from gpuheart.segment import union
        from gpuheart.training import train_from_files

        train_names = [n for n in stacks if n != held]
        # overwrite: a rerun of this script replaces its own earlier fold runs
        res = train_from_files([a.data], Path(a.runs) / held, phantoms=a.phantoms, exclude=[held], progress=False,
                               overwrite=True,
                               epochs=a.epochs, steps_per_epoch=a.steps, tile=a.tile, width=a.width, seed=a.seed,
                               loss=a.loss, norm=a.norm, context=a.context, schedule=a.schedule, balance=a.balance,
                               batch_size=a.batch_size, lr=a.lr, num_threads=a.threads, workers=a.workers,
                               **aug_kw)
        model = unet.load_weights(res.best_path)
        thr = model.meta.get("threshold", 0.5)
        pre, lab = stacks[held]
        prob = unet.predict(model, pre)
        umask = prob > thr
        base = baselines(pre, lab)
        # the uncalibrated cut, for the record: the shipped threshold is the calibrated one
        results[held] = {"unet": score(umask, lab), "unet_at_0.5": score(prob > 0.5, lab), **{k: v for k, v in base.items() if k != "dom_mask"},
                         "union": score(union(umask, base["dom_mask"]), lab), "threshold": thr,
                         "phantom": phantom_score(model), "train_stacks": train_names, "best_epoch": res.best_epoch,
                         "val_dice": round(res.best_val_dice, 4), "seconds": round(time.time() - t0, 1)}
        print(held, json.dumps(results[held]), flush=True)
    summary = mean_dice(results)
    write_result(a.out, {"machine": {"processor": platform.processor(), "cpus": os.cpu_count()}},
                 settings={**vars(a), "augment": asdict(aug_kw.get("aug", unet.AugmentConfig()))},
                 per_stack=results, mean_dice=summary)
    print("mean Dice", summary)


if __name__ == "__main__":
    sys.exit(main())
