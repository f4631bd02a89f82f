"""How much a few labelled slices from the target microscope help: fine-tuning the held-out fold models.

For every stack, the model that never saw it (``RUNS/<stack>/best.pt`` from ``benchmarks/accuracy.py``) is
fine-tuned (``TrainConfig(init=...)``, what ``gpuheart train --init`` does) on the stack's first ``--slices``
slices (the last of them for validation and threshold calibration), then both models are scored on the
slices after a gap of ``--gap`` (neighbouring slices look alike, so they are left out of the test).

``--pseudo`` asks the label-free question instead (self-training, a form of test-time adaptation): the
held-out model labels the whole stack itself (its mask at its own threshold), is fine-tuned on those pseudo
labels (a fifth of the slices for validation, cut fixed at 0.5), and both models are scored on every slice
against the real labels, which are used for nothing else.

    python benchmarks/accuracy_finetune.py --runs /tmp/loso-v3 [--slices 4] [--out results.json]
    python benchmarks/accuracy_finetune.py --runs /tmp/loso-v3 --pseudo --threshold 0.5 --out accuracy-selftrain.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, load_stacks, score, write_result  # noqa: E402


def main(argv=None):
    from gpuheart import unet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--runs", required=True, help="fold-model folder of an accuracy.py run")
    p.add_argument("--slices", type=int, default=4, help="labelled slices of the held-out stack to fine-tune on")
    p.add_argument("--gap", type=int, default=2, help="slices skipped between those and the test slices")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threshold", type=float, default=None,
                   help="fixed cut stored in the fine-tuned weights (None: calibrated on the validation slice)")
    p.add_argument("--pseudo", action="store_true",
                   help="self-training: fine-tune on the model's own mask of the whole stack, no labels")
    p.add_argument("--out", default="benchmarks/results/accuracy-finetune.json")
    p.add_argument("--work", default="/tmp/gpuheart-finetune")
    a = p.parse_args(argv)
    results = {}
    for name, (pre, lab) in load_stacks(Path(a.data)).items():
        t0 = time.time()
        base_path = Path(a.runs) / name / "best.pt"
        base = unet.load_weights(base_path)
        n = a.slices
        if a.pseudo:   # the model's own mask of every slice; the real labels only score
            own = unet.predict(base, pre) > base.meta.get("threshold", 0.5)
            train_pre, train_lab, val_fraction, test_pre, test_lab = [pre], [own], 0.2, pre, lab
        else:
            train_pre, train_lab, val_fraction = [pre[:n]], [lab[:n]], 1 / n
            test_pre, test_lab = pre[n + a.gap:], lab[n + a.gap:]
        cfg = unet.TrainConfig(epochs=a.epochs, steps_per_epoch=a.steps, lr=a.lr, tile=128, seed=0,
                               loss=base.meta["config"]["loss"], norm=base.hparams["norm"],
                               width=base.hparams["width"], depth=base.hparams["depth"],
                               val_fraction=val_fraction, init=str(base_path), threshold=a.threshold,
                               num_threads=os.cpu_count())
        # overwrite: a rerun of this script replaces its own earlier fold runs
        res = unet.train(train_pre, train_lab, cfg, Path(a.work) / name, progress=False, overwrite=True)
        tuned = unet.load_weights(res.best_path)
        row = {}
        for label, model in (("before", base), ("after", tuned)):
            prob = unet.predict(model, test_pre)
            row[label] = score(prob > model.meta.get("threshold", 0.5), test_lab)
            row[label]["threshold"] = model.meta.get("threshold", 0.5)
            row[label]["dice_at_0.5"] = score(prob > 0.5, test_lab)["dice"]
        row.update(test_slices=int(len(test_pre)), seconds=round(time.time() - t0, 1))
        results[name] = row
        print(name, json.dumps(row), flush=True)
    mean = {f"{k}{cut}": round(float(np.mean([r[k]["dice" + cut] for r in results.values()])), 4)
            for k in ("before", "after") for cut in ("", "_at_0.5")}
    write_result(a.out, {}, settings=vars(a), per_stack=results, mean_dice=mean)
    print("mean Dice", mean)


if __name__ == "__main__":
    sys.exit(main())
