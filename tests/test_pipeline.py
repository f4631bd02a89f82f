import json

import numpy as np
import pytest

from gpuheart import Pipeline, PipelineConfig
from gpuheart.pipeline import ConfigError


def test_config_toml_roundtrip(tmp_path):
    cfg = PipelineConfig(channels=["C00"], slab_size=7, voxel_size=[4.0, 1.0, 1.0])
    cfg.dom.threshold = "otsu"
    cfg.exposure.clip_limit = 0.02
    loaded = PipelineConfig.load(cfg.save(tmp_path / "c.toml"))
    assert loaded == cfg


def test_config_defaults_are_the_papers():
    cfg = PipelineConfig()
    assert (cfg.exposure.clip_limit, cfg.exposure.kernel_size) == (0.01, 32)
    assert (cfg.dom.small, cfg.dom.large) == (3, 15)


@pytest.mark.parametrize("text, message", [
    ("slab_sise = 3\n", "unknown key"),
    ("slab_size = 'big'\n", "expected int"),
    ("[dom]\nlarge = 14\n", "odd"),
    ("[dom]\nthreshold = 'magic'\n", "threshold"),
    ("device = 'tpu'\n", "unknown device"),
    ("voxel_size = [1.0, 2.0]\n", "voxel_size"),
    ("slab_size = \n", "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        PipelineConfig.load(p)
    assert str(p) in str(err.value) or "unknown device" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        PipelineConfig.load(tmp_path / "nope.toml")


def _tiny_cfg(**kw):
    cfg = PipelineConfig(progress=False, **kw)
    return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return Pipeline(_tiny_cfg(slab_size=5)).run(None, out, phantom_preset="tiny")


def test_run_on_phantom_writes_complete_outputs(tiny_run):
    from gpuheart.io import open_scan

    out = tiny_run.out_dir
    assert (out / "config.toml").is_file() and (out / "summary.json").is_file()
    assert not list(out.rglob("*.partial"))
    summary = json.loads((out / "summary.json").read_text())
    scan_shape = tuple(summary["summary"]["input"]["shape"])
    for channel, paths in tiny_run.outputs.items():
        for kind, path in paths.items():
            with open_scan(path) as s:
                assert s.shape == scan_shape, (channel, kind)
                assert s.dtype == np.uint8
        s = tiny_run.summary[channel]
        assert np.isfinite(s["detrended_cv_raw"]) and np.isfinite(s["detrended_cv_normalized"])
    assert set(tiny_run.outputs) == {"C00", "C01", "C02"}
    assert "dom_vs_truth" in tiny_run.summary["C00"] and "dom_vs_truth" not in tiny_run.summary["C02"]
    assert tiny_run.summary["C00"]["dom_vs_truth"]["dice"] > 0.3
    for stage in ("stats (pass 1)", "clahe", "difference of medians", "write"):
        assert tiny_run.timings[stage] >= 0


def test_normalization_reduces_slice_flicker(tiny_run):
    s = tiny_run.summary["C00"]
    assert s["detrended_cv_normalized"] < s["detrended_cv_raw"]


def test_outputs_do_not_depend_on_slab_size(tiny_run, tmp_path):
    from gpuheart.io import open_scan

    other = Pipeline(_tiny_cfg(slab_size=16, channels=["C00"])).run(
        tiny_run.out_dir / "input" / "scan", tmp_path)
    for kind in ("preprocessed", "dom_mask"):
        with open_scan(tiny_run.outputs["C00"][kind]) as a, open_scan(other.outputs["C00"][kind]) as b:
            np.testing.assert_array_equal(a.read_slab(a.channels[0], 0, a.shape[0]),
                                          b.read_slab(b.channels[0], 0, b.shape[0]))


def test_unknown_channel_is_a_clear_error(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="C09"):
        Pipeline(_tiny_cfg(channels=["C09"])).run(tiny_run.out_dir / "input" / "scan", tmp_path)
