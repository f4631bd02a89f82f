import numpy as np
import pytest

from gpuheart.metrics import Confusion, detrended_cv, dice, snr


def test_detrended_cv_ignores_linear_trend():
    z = np.arange(50)
    assert detrended_cv(100 + 2.0 * z) == pytest.approx(0.0, abs=1e-12)


def test_detrended_cv_of_alternating_flicker():
    means = 100 + 10 * (-1.0) ** np.arange(100)  # +/-10 around 100, no trend
    # residual std of an alternating +/-10 sequence is 10 (the fitted line is ~flat)
    assert detrended_cv(means) == pytest.approx(0.10, rel=1e-3)


def test_detrended_cv_skips_nan_and_short_input():
    assert np.isnan(detrended_cv([1.0, np.nan]))
    assert detrended_cv([1.0, np.nan, 1.0, 1.0]) == pytest.approx(0.0)


def test_snr_known_answer():
    img = np.zeros((10, 10))
    img[:5] = 4.0  # half the pixels at 4: image mean 2, signal mean 4
    mask = img > 0
    assert snr(img, mask) == pytest.approx(2.0)
    assert np.isnan(snr(img, np.zeros_like(mask)))


def test_dice_and_confusion_known_answer():
    a = np.zeros((4, 4), bool); a[:2] = True          # 8 voxels
    b = np.zeros((4, 4), bool); b[1:3] = True         # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    c = Confusion().update(a[:2], b[:2]).update(a[2:], b[2:])  # slab-wise equals whole
    assert c.scores() == Confusion().update(a, b).scores()
    assert (c.tp, c.fp, c.fn, c.tn) == (4, 4, 4, 4)
    assert c.accuracy == 0.5 and c.precision == 0.5 and c.recall == 0.5
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:2])
