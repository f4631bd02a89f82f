"""Bad arguments to the public functions: an error naming the argument and what was expected, never a hang,
a traceback from deep inside NumPy or torch, or a silently wrong result."""
import dataclasses

import numpy as np
import pytest

from gpuheart import exposure, filters, metrics, morphology, segment, unet


def test_predict_refuses_a_negative_batch_size_instead_of_looping_forever():
    model = unet.UNet(width=4, depth=2)
    img = np.zeros((16, 16), np.uint8)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        unet.predict(model, img, batch_size=-1)
    assert unet.predict(model, img, batch_size=0, tile=16, overlap=4).shape == img.shape   # 0: automatic


@pytest.mark.parametrize("model", [None, "weights.pt"])
def test_predict_says_what_a_model_is(model):
    with pytest.raises(TypeError, match="load_weights"):
        unet.predict(model, np.zeros((16, 16), np.uint8))


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("steps_per_epoch", 0), ("epochs", -1), ("epochs", 2.5), ("lr", -1.0), ("lr", float("nan")),
    ("tile", 100), ("tile", 8), ("val_fraction", 2.0), ("val_fraction", 0.0), ("fg_fraction", 2.0),
    ("split", "random"), ("balance", "volume"), ("lr_factor", 1.5), ("width", 0),
])
def test_train_config_names_the_setting_train_cannot_use(field, value):
    with pytest.raises(ValueError, match=field):
        unet.TrainConfig(**{field: value})


def test_train_config_defaults_are_the_commands():
    from gpuheart.cli import TRAIN_DEFAULTS

    defaults = dataclasses.asdict(unet.TrainConfig())
    assert {k: defaults[k] for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS


def _prob():
    return np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)


def test_a_probability_map_is_not_taken_for_a_mask():
    prob = _prob()
    with pytest.raises(ValueError, match="mask 2 .*threshold it first"):
        segment.union(prob > 0.5, prob)
    with pytest.raises(ValueError, match="threshold probabilities first"):
        metrics.snr(prob, prob)
    with pytest.raises(ValueError, match="probability map"):
        list(morphology.postprocess_slabs(lambda a, b: prob[a:b], prob.shape, 2))
    # a 0/1 float mask is a mask
    assert segment.union(prob > 0.5, (prob > 0.9).astype(np.float32)).sum() == (prob > 0.5).sum()


def test_streamed_morphology_checks_what_the_reader_returns_against_the_shape():
    m = _prob() > 0.5
    with pytest.raises(ValueError, match=r"returned shape \(2, 8, 8\); expected \(2, 4, 4\)"):
        morphology.label_slabs(lambda a, b: m[a:b], (4, 4, 4), 2)
    with pytest.raises(ValueError, match="expected"):
        list(morphology.postprocess_slabs(lambda a, b: m[a:b], (4, 4, 4), 2))
    with pytest.raises(ValueError, match="shape must be the mask's"):
        morphology.label_slabs(lambda a, b: m[a:b], (4, 8), 2)
    with pytest.raises(ValueError, match="min_voxels"):
        morphology.remove_small(m, -5)


def test_difference_of_medians_refuses_swapped_sizes_and_names_the_bad_one():
    img = np.zeros((20, 20), np.uint8)
    with pytest.raises(ValueError, match=r"small median \(15\) must be smaller than the large one \(3\)"):
        segment.dom_mask(img, small=15, large=3)
    with pytest.raises(ValueError, match="large must be an odd integer"):
        filters.difference_of_medians(img, 3, 4)


def test_metrics_check_their_input_shapes():
    with pytest.raises(ValueError, match="2-D or 3-D"):
        metrics.cl_dice(np.ones(5, bool), np.ones(5, bool))
    with pytest.raises(ValueError, match="1-D slice means"):
        metrics.detrended_cv(np.ones((3, 3)))
    with pytest.raises(ValueError, match="order must be an integer >= 0"):
        metrics.detrended_cv(np.arange(5.0), order=-1)


@pytest.mark.parametrize("clip", [-1.0, float("nan"), "0.01"])
def test_clahe_refuses_a_clip_limit_that_would_silently_switch_clipping_off(clip):
    img = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    for f in (exposure.clahe, exposure.clahe_robust_scale):
        with pytest.raises(ValueError, match="clip_limit must be a finite number >= 0"):
            f(img, clip_limit=clip)


def test_the_lazy_top_level_names_are_listed_before_first_use():
    import gpuheart

    assert {"Pipeline", "PipelineConfig", "RunResult", "open_scan"} <= set(dir(gpuheart))
    assert "annotations" not in dir(gpuheart)


def test_a_scan_given_as_slices_in_memory_is_told_how_to_write_them():
    import numpy as np

    from gpuheart import open_scan

    with pytest.raises(TypeError, match=r"write_tiff\(path, slices\)"):
        open_scan(iter([np.zeros((4, 4), np.uint8)]))
