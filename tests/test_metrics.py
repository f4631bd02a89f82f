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


def test_cl_dice_known_answers():
    from gpuheart.metrics import cl_dice

    tube = np.zeros((9, 40), bool)
    tube[3:6, 2:38] = True
    assert cl_dice(tube, tube) == pytest.approx(1.0)
    assert cl_dice(np.zeros_like(tube), np.zeros_like(tube)) == 1.0
    assert cl_dice(np.zeros_like(tube), tube) == 0.0
    # a prediction covering the left half of the tube: precision of its skeleton is 1,
    # it covers about half of the true centerline, so clDice ~ 2 * 1 * 0.5 / 1.5 = 2/3
    half = tube.copy()
    half[:, 20:] = False
    assert cl_dice(half, tube) == pytest.approx(2 / 3, abs=0.06)
    # a thick over-segmentation still contains the whole centerline: tsens = 1
    fat = np.zeros_like(tube)
    fat[1:8, 2:38] = True
    assert cl_dice(fat, tube) > 0.95


def test_cl_dice_3d():
    from gpuheart.metrics import cl_dice

    vol = np.zeros((10, 10, 30), bool)
    vol[4:7, 4:7, 2:28] = True
    assert cl_dice(vol, vol) == pytest.approx(1.0)


def test_snr_of_a_0_255_mask_equals_that_of_the_bool_mask():
    from gpuheart.metrics import snr

    rng = np.random.default_rng(0)
    img = rng.random((8, 32, 32))
    m = img > 0.7
    assert snr(img, m.astype(np.uint8) * 255) == pytest.approx(snr(img, m)) and snr(img, m) > 1


def test_snr_names_a_mask_of_another_shape():
    # was numpy's "boolean index did not match indexed array along axis 0"
    with pytest.raises(ValueError, match=r"mask of the image's shape \(4, 5\), got \(4, 4\)"):
        snr(np.ones((4, 5)), np.ones((4, 4), bool))


def test_dice_refuses_probabilities_and_nan_but_takes_float_masks():
    # dice(predict(model, img), truth) counted every probability above 0 as vessel, silently
    truth = np.zeros((8, 8), bool)
    truth[2:5, 2:5] = True
    prob = np.where(truth, 0.9, 0.02).astype(np.float32)
    with pytest.raises(ValueError, match="threshold probabilities first"):
        dice(prob, truth)
    with pytest.raises(ValueError, match="truth must be a mask"):
        Confusion().update(truth, np.where(truth, 1.0, np.nan))
    from gpuheart.metrics import cl_dice
    with pytest.raises(ValueError, match="threshold probabilities first"):
        cl_dice(prob, truth)
    assert dice(prob > 0.5, truth) == 1.0
    assert dice(truth.astype(np.float32) * 255, truth.astype(np.float64)) == 1.0


def test_detrended_cv_needs_more_points_than_the_trend_has_parameters():
    # a line through two means leaves no residual: that is no measurement, not a CV of 0
    assert np.isnan(detrended_cv([100.0, 120.0]))
    assert np.isnan(detrended_cv([100.0, np.nan, 120.0]))
    assert np.isnan(detrended_cv([1.0, 2.0, 3.0], order=2))


def test_detrended_cv_fits_the_trend_at_the_slices_true_depths():
    # a blank slice (NaN) in the middle does not shift the later slices' z: a pure line stays a line
    means = 100 + 3.0 * np.arange(20)
    means[[4, 5, 11]] = np.nan
    assert detrended_cv(means) == pytest.approx(0.0, abs=1e-12)
    ok = np.isfinite(means)
    z = np.arange(20)[ok]
    wiggle = means.copy()
    wiggle[ok] += (-1.0) ** z
    resid = wiggle[ok] - np.polyval(np.polyfit(z, wiggle[ok], 1), z)
    assert detrended_cv(wiggle) == pytest.approx(resid.std() / wiggle[ok].mean(), rel=1e-12)


def test_precision_and_recall_are_not_swapped():
    truth = np.zeros((10, 10), bool)
    truth[:5] = True                         # 50 voxels
    pred = np.zeros_like(truth)
    pred[:2] = True                          # 20 voxels, all inside the truth
    pred[9, :5] = True                       # and 5 outside
    c = Confusion().update(pred, truth)
    assert (c.tp, c.fp, c.fn) == (20, 5, 30)
    assert c.precision == pytest.approx(20 / 25)
    assert c.recall == pytest.approx(20 / 50)
    assert c.dice == pytest.approx(2 * 20 / (2 * 20 + 5 + 30))


def test_cl_dice_penalises_a_skeleton_running_outside_the_truth():
    from gpuheart.metrics import cl_dice

    tube = np.zeros((9, 40), bool)
    tube[3:6, 2:38] = True
    half = tube.copy()
    half[:, 20:] = False
    # the whole tube predicted against half of it: every true centerline pixel is covered (tsens = 1),
    # but about half of the predicted centerline lies outside the truth (tprec ~ 0.5)
    assert cl_dice(tube, half) == pytest.approx(2 / 3, abs=0.06)


@pytest.mark.gpu
def test_every_measurement_takes_cupy_arrays():
    """The module promises NumPy or CuPy arrays; cl_dice and detrended_cv handed CuPy's device arrays to
    NumPy, which CuPy refuses. Reference: the same formulas on the host arrays, written out."""
    import cupy as cp
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    from gpuheart.metrics import cl_dice

    t = np.zeros((16, 20, 30), bool)
    t[7:10, 4:7, 3:27] = True                    # a rod along x and one along z, odd widths: both keep a skeleton
    t[2:14, 12:15, 12:15] = True
    p = np.roll(t, 1, axis=1)                    # shifted by one voxel, and cut short: covers part of it
    p[:, :, 18:] = False
    sp, st = skeletonize(p), skeletonize(t)
    lab = ndi.label(t, np.ones((3, 3, 3)))[0]
    assert np.unique(lab[st]).size == lab.max() == 2 and sp.any()
    tprec, tsens = (sp & t).sum() / sp.sum(), (st & p).sum() / st.sum()
    assert 0 < tsens < 1 and 0 < tprec
    assert cl_dice(cp.asarray(p), cp.asarray(t)) == pytest.approx(2 * tprec * tsens / (tprec + tsens))
    means = 100 + 10 * (-1.0) ** np.arange(40)
    assert detrended_cv(cp.asarray(means)) == pytest.approx(np.std(means - np.polyval(np.polyfit(np.arange(40), means, 1), np.arange(40))) / 100)
    img = np.random.default_rng(3).random((20, 20))
    assert snr(cp.asarray(img), cp.asarray(img > 0.5)) == pytest.approx(img[img > 0.5].mean() / img.mean())
    c = Confusion().update(cp.asarray(p), cp.asarray(t))
    assert (c.tp, c.fp, c.fn) == ((p & t).sum(), (p & ~t).sum(), (~p & t).sum())
    assert dice(cp.asarray(p), cp.asarray(t)) == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_detrended_cv_is_the_documented_formula(order):
    """cv = std(m_z - trend_z) / mean(m_z), trend the least-squares polynomial of degree ``order`` through
    the finite means at their own z (written out here with lstsq on a Vandermonde matrix)."""
    rng = np.random.default_rng(order)
    m = rng.normal(100, 5, 60) + np.linspace(0, 30, 60) + 0.01 * np.arange(60) ** 2
    m[[4, 17, 40]] = np.nan
    z = np.arange(60.0)
    ok = np.isfinite(m)
    a = np.vander(z[ok], order + 1)
    resid = m[ok] - a @ np.linalg.lstsq(a, m[ok], rcond=None)[0]
    assert detrended_cv(m, order) == pytest.approx(np.sqrt(np.mean(resid ** 2)) / np.mean(m[ok]), rel=1e-9)
