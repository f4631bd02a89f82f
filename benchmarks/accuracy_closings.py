"""What the paper's closings (step 6) do to the held-out masks: Dice before and after them.

For every stack, the fold model that never saw it (``RUNS/<stack>/best.pt``, from ``benchmarks/accuracy.py``)
segments it at its calibrated threshold; that U-Net mask, the difference-of-medians mask and their union (the
paper's segmentation) are scored as they are, after the pipeline's default closings (``morphology.postprocess``:
1x1x5 along z five times, then one 3x3x3), and after the 3x3x3 closing alone. This is the mask ``gpuheart run``
writes as ``mask`` (``mask_raw`` is the union before the closings). Nothing here trains.

    python benchmarks/accuracy_closings.py --runs /tmp/gpuheart-loso [--out results.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import baselines, fold_probe, score, write_result  # noqa: E402


def closings(name, pre, lab, runs: Path) -> dict:
    from gpuheart import unet
    from gpuheart.morphology import close_3d, postprocess
    from gpuheart.pipeline import PostprocessConfig
    from gpuheart.segment import union

    pc = PostprocessConfig()
    model = unet.load_weights(runs / name / "best.pt")
    umask = unet.predict(model, pre) > model.meta.get("threshold", 0.5)
    dom = baselines(pre, lab)["dom_mask"]
    row = {}
    for key, mask in (("unet", umask), ("dom", dom), ("union", union(umask, dom))):
        row[key] = score(mask, lab)
        row[f"{key}_closed"] = score(postprocess(mask, pc.z_size, pc.z_iterations, pc.size3d), lab)
        row[f"{key}_closed_3d_only"] = score(close_3d(mask, pc.size3d), lab)
    return row


def main():
    a, per_stack = fold_probe(__doc__.splitlines()[0], "benchmarks/results/accuracy-closings.json", closings,
                              show=lambda row: {k: v["dice"] for k, v in row.items()})
    keys = list(next(iter(per_stack.values())))
    mean = {k: round(float(np.mean([r[k]["dice"] for r in per_stack.values()])), 4) for k in keys}
    write_result(a.out, {}, runs=a.runs, per_stack=per_stack, mean_dice_closings=mean)
    print("mean", json.dumps(mean))


if __name__ == "__main__":
    sys.exit(main())
