"""Measurements: slice-mean variation, the paper's SNR, and overlap scores.

Every function takes plain arrays (NumPy or CuPy) and returns Python floats, so a caller can
accumulate them over a stream of slabs without holding the volume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .backend import array_module, to_host


def detrended_cv(slice_means, order: int = 1) -> float:
    """Coefficient of variation of slice means after removing a polynomial trend in z.

    ``cv = std(m_z - trend_z) / mean(m_z)`` where ``trend`` is the least-squares polynomial of
    degree ``order`` (default: a straight line) through the slice means ``m_z``. The trend stands
    for slow, real changes through the depth (tissue thickness, attenuation); what is left is the
    slice-to-slice flicker that normalization is meant to remove. Non-finite means are skipped.
    Returns NaN when fewer than ``order + 2`` finite means exist or their mean is 0.
    """
    if int(order) != order or order < 0:
        raise ValueError(f"detrended_cv: order must be an integer >= 0 (the trend's polynomial degree), got {order}")
    m = to_host(slice_means).astype(np.float64)
    if m.ndim != 1:
        raise ValueError(f"detrended_cv expects 1-D slice means (one per z-slice), got shape {m.shape}")
    z = np.arange(m.size, dtype=np.float64)
    ok = np.isfinite(m)
    if ok.sum() < order + 2 or m[ok].mean() == 0:
        return float("nan")
    coef = np.polyfit(z[ok], m[ok], order)
    resid = m[ok] - np.polyval(coef, z[ok])
    return float(resid.std() / abs(m[ok].mean()))


def snr(image, mask) -> float:
    """The paper's signal-to-noise ratio: mean value of the signal pixels / mean value of the image.

    ``mask`` (bool or 0/255) has ``image``'s shape; NaN when the mask is empty or the image's mean is 0.
    """
    if mask.shape != image.shape:
        raise ValueError(f"snr needs a mask of the image's shape {image.shape}, got {mask.shape}")
    xp = array_module(image)
    image = image.astype(xp.float64)
    mask = _as_mask(mask, "snr's mask")   # before counting: gpuheart's masks are 0/255
    mean_all = float(image.mean())
    n_sig = int(mask.sum())
    if n_sig == 0 or mean_all == 0:
        return float("nan")
    return float(image[mask].sum()) / n_sig / mean_all


def has_fractions(a) -> bool:
    """True for a float array with values strictly between 0 and 1, or NaN: a probability map, not a mask
    (taken as ``a != 0``, its every pixel above 0 would count)."""
    if a.dtype.kind != "f" or a.size == 0:
        return False
    xp = array_module(a)
    return bool(xp.any((a > 0) & (a < 1))) or bool(xp.isnan(a).any())


def _as_mask(a, what: str):
    """``a != 0`` for a bool or integer mask (gpuheart writes 0/255), and for a float one whose values are
    0 or >= 1; probabilities (:func:`has_fractions`) are refused."""
    if has_fractions(a):
        raise ValueError(f"{what} must be a mask (bool, 0/1 or 0/255), got float values between 0 and 1 "
                         "or NaN: threshold probabilities first, e.g. prob > model.meta['threshold']")
    return a.astype(bool)


@dataclass
class Confusion:
    """Voxel counts of a predicted mask against the truth; add slab by slab with ``update``."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def update(self, pred, truth) -> "Confusion":
        """Add the counts of ``pred`` against ``truth``: masks of one shape (bool, 0/1 or 0/255)."""
        if pred.shape != truth.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
        p, t = _as_mask(pred, "prediction"), _as_mask(truth, "truth")
        tp = int((p & t).sum())
        fp = int(p.sum()) - tp
        fn = int(t.sum()) - tp
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += int(p.size) - tp - fp - fn
        return self

    @property
    def dice(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0  # two empty masks agree perfectly

    @property
    def accuracy(self) -> float:
        n = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / n if n else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    def scores(self) -> dict:
        return {**asdict(self), "dice": self.dice, "accuracy": self.accuracy,
                "precision": self.precision, "recall": self.recall}


def dice(pred, truth) -> float:
    """Sørensen-Dice coefficient of two masks (bool, 0/1 or 0/255; 1.0 when both are empty). Probabilities
    (``unet.predict``'s output) are refused: threshold them first."""
    return Confusion().update(pred, truth).dice


def cl_dice(pred, truth) -> float:
    """Centerline Dice (Shit et al. 2021): how well the skeletons of tubes are covered.

    ``tprec = |skel(P) ∩ T| / |skel(P)|``, ``tsens = |skel(T) ∩ P| / |skel(T)|``,
    ``clDice = 2 tprec tsens / (tprec + tsens)``; skeletons by :func:`gpuheart.graph.skeleton`
    (scikit-image's ``skeletonize`` for a 2-D slice, Lee's 3-D thinning for volumes). Unlike Dice it is not
    dominated by the thick vessels, so losing capillaries shows. 1.0 when both masks are empty.
    """
    from .graph import skeleton

    # the skeletons are computed on the host
    p, t = _as_mask(to_host(pred), "prediction"), _as_mask(to_host(truth), "truth")
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    if p.ndim not in (2, 3):
        raise ValueError(f"cl_dice needs 2-D or 3-D masks (a slice or a (z, y, x) stack), got shape {p.shape}")
    if not p.any() and not t.any():
        return 1.0
    sp, st = skeleton(p), skeleton(t)
    tprec = (sp & t).sum() / sp.sum() if sp.any() else 0.0
    tsens = (st & p).sum() / st.sum() if st.any() else 0.0
    return float(2 * tprec * tsens / (tprec + tsens)) if tprec + tsens else 0.0
