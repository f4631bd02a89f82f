"""How the centreline Dice moved when gpuheart's own 3-D thinning replaced scikit-image's (2026-11-28).

clDice needs skeletons. Until 2026-11-28 they were scikit-image's ``skeletonize`` (plus one voxel for a component
it erased); since then :func:`gpuheart.graph.skeleton`, which keeps straight vessels of even width that
scikit-image's thinning erased and paces its passes by the voxel size. The clDice figures in docs/accuracy.md
were measured before, so this scores the two baselines that need no model (one global Otsu threshold and the
difference of medians) on every labelled stack both ways, to say how far the older figures are from today's.

    python benchmarks/accuracy_cldice_skeleton.py [--out benchmarks/results/accuracy-cldice-skeleton.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, dom_masks, load_stacks, write_result  # noqa: E402


def skimage_skeleton(mask: np.ndarray) -> np.ndarray:
    """The skeleton clDice used until 2026-11-28: scikit-image's, plus the deepest voxel of each component it
    erased."""
    from skimage.morphology import skeletonize

    skel = skeletonize(mask)
    labels, n = ndi.label(mask, np.ones((3,) * mask.ndim, bool))
    kept = np.zeros(n + 1, bool)
    kept[labels[skel]] = True
    boxes = ndi.find_objects(labels)
    for i in np.flatnonzero(~kept[1:]) + 1:
        part = labels[boxes[i - 1]] == i
        depth = ndi.distance_transform_edt(np.pad(part, 1))[(slice(1, -1),) * mask.ndim]
        at = np.unravel_index(np.argmax(np.where(part, depth, -1)), part.shape)
        skel[tuple(s.start + a for s, a in zip(boxes[i - 1], at))] = True
    return skel


def cl_dice(pred, truth, skeleton) -> float:
    sp, st = skeleton(pred), skeleton(truth)
    tprec, tsens = (sp & truth).sum() / sp.sum(), (st & pred).sum() / st.sum()
    return float(2 * tprec * tsens / (tprec + tsens))


def main(argv=None) -> int:
    from skimage.filters import threshold_otsu

    from gpuheart.graph import skeleton
    from gpuheart.metrics import cl_dice as shipped

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "accuracy-cldice-skeleton.json"))
    a = p.parse_args(argv)
    rows = {}
    for name, (pre, lab) in load_stacks(Path(a.data)).items():
        rows[name] = {}
        for method, mask in (("otsu", pre > threshold_otsu(pre)), ("dom", dom_masks(pre))):
            new = cl_dice(mask, lab, skeleton)
            assert abs(new - shipped(mask, lab)) < 1e-12   # the same as gpuheart.metrics.cl_dice
            rows[name][method] = {"scikit_image_skeleton": round(cl_dice(mask, lab, skimage_skeleton), 4),
                                  "gpuheart_skeleton": round(new, 4)}
        print(name, rows[name], flush=True)
    change = [r[m]["gpuheart_skeleton"] - r[m]["scikit_image_skeleton"] for r in rows.values() for m in r]
    write_result(a.out, {"benchmark": __doc__.splitlines()[0], "per_stack": rows,
                         "change": {"min": round(min(change), 4), "max": round(max(change), 4),
                                    "mean": round(float(np.mean(change)), 4)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
