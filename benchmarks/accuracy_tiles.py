"""Inference tile size on held-out stacks: the fold models' training tile (128) against 256-pixel tiles.

For every ``--runs`` folder of ``benchmarks/accuracy.py`` fold models and every stack, the model that never saw
the stack predicts it with 256-pixel tiles (overlap 64) and with its training tile (overlap a quarter of it);
Dice at its calibrated threshold and at 0.5, precision and recall, and (first run only) clDice. With GroupNorm a
tile's output depends on the tile's size, and the calibrated threshold and best epoch were chosen at the training
tile, so this asks which inference tile the default should be. Nothing here trains.

    python benchmarks/accuracy_tiles.py --runs /tmp/loso-a [/tmp/loso-b ...] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, dice, load_stacks, write_result  # noqa: E402


def score(model, pre, lab, tile: int, with_cldice: bool) -> dict:
    from gpuheart import unet
    from gpuheart.metrics import cl_dice

    prob = unet.predict(model, pre, tile=tile, overlap=tile // 4)
    mask = prob > model.meta.get("threshold", 0.5)
    row = {"calibrated": dice(mask, lab), "at_0.5": dice(prob > 0.5, lab),
           "precision": float((mask & lab).sum() / max(int(mask.sum()), 1)),
           "recall": float((mask & lab).sum() / max(int(lab.sum()), 1))}
    if with_cldice:
        row["cldice"] = cl_dice(mask, lab)
    return {k: round(v, 4) for k, v in row.items()}


def main(argv=None):
    from gpuheart import unet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--runs", nargs="+", required=True, help="fold-model folders of accuracy.py runs")
    p.add_argument("--out", default="benchmarks/results/accuracy-tiles.json")
    a = p.parse_args(argv)
    stacks = load_stacks(Path(a.data))
    runs = {}
    for i, run in enumerate(a.runs):
        per_stack = {}
        for name, (pre, lab) in stacks.items():
            model = unet.load_weights(Path(run) / name / "best.pt")
            train_tile = unet.inference_tile(model)[0]
            per_stack[name] = {"threshold": model.meta.get("threshold", 0.5), "training_tile": train_tile,
                               "tile256": score(model, pre, lab, 256, i == 0),
                               "training": score(model, pre, lab, train_tile, i == 0)}
            print(run, name, json.dumps(per_stack[name]), flush=True)
        mean = {f"{t}_{k}": round(float(np.mean([r[t][k] for r in per_stack.values()])), 4)
                for t in ("tile256", "training") for k in ("calibrated", "at_0.5")}
        runs[run] = {"settings": json.loads((Path(run) / "settings.json").read_text())
                     if (Path(run) / "settings.json").is_file() else None, "per_stack": per_stack, "mean": mean}
        print("mean", run, json.dumps(mean), flush=True)
        write_result(a.out, {}, runs=runs)


if __name__ == "__main__":
    sys.exit(main())
