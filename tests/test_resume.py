"""A run killed with SIGKILL and started again with the same command equals an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpuheart.io import open_scan

CONFIG = """
slab_size = 2
checkpoint_seconds = 0.0
[segment]
method = "dom"
[output]
report = false
"""


def _cmd(scan, out, cfg):
    return [sys.executable, "-m", "gpuheart", "run", str(scan), "-o", str(out), "-c", str(cfg),
            "--channels", "C00", "--no-progress"]


def _measurements(out):
    s = json.loads((out / "summary.json").read_text())["summary"]["C00"]
    s["mesh"].pop("path")  # the only difference: which output folder it lies in
    return s


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from gpuheart.phantom import PhantomConfig, write_phantom

    folder = tmp_path_factory.mktemp("ph") / "ph"
    write_phantom(PhantomConfig.preset("default", shape=(40, 128, 128)), folder)
    return folder / "scan"


def test_sigkill_then_same_command_resumes_and_equals_uninterrupted(scan, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_cmd(scan, ref, cfg), check=True, capture_output=True)

    proc = subprocess.Popen(_cmd(scan, out, cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = out / "C00" / ".resume" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(manifest.read_text()).get("next_z", 0) >= 10:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    assert not (out / "C00" / "mask.ome.zarr").exists()  # nothing that looks complete

    again = subprocess.run(_cmd(scan, out, cfg), check=True, capture_output=True, text=True)
    assert "resumed an interrupted run at slice" in again.stdout
    for name in ("preprocessed", "dom_mask", "mask"):
        with open_scan(ref / "C00" / f"{name}.ome.zarr") as a, open_scan(out / "C00" / f"{name}.ome.zarr") as b:
            np.testing.assert_array_equal(a.read_slab(0, 0, a.shape[0]), b.read_slab(0, 0, b.shape[0]))
    assert _measurements(out) == _measurements(ref)
    with np.load(ref / "C00" / "figures.npz") as fa, np.load(out / "C00" / "figures.npz") as fb:
        for k in fa.files:
            np.testing.assert_array_equal(fa[k], fb[k])


def test_changed_settings_do_not_resume(scan, tmp_path):
    from gpuheart import Pipeline, PipelineConfig

    cfg = PipelineConfig.from_dict({"slab_size": 4, "progress": False, "segment": {"method": "dom"},
                                    "output": {"report": False}, "mesh": {"enabled": False},
                                    "graph": {"enabled": False}, "channels": ["C00"]})
    first = Pipeline(cfg).run(scan, tmp_path)
    assert first.resumed == {}
    assert Pipeline(cfg).run(scan, tmp_path).resumed == {"C00": 40}  # complete: reused
    cfg.dom.large = 13
    assert Pipeline(cfg).run(scan, tmp_path).resumed == {}  # other settings: recomputed
    assert Pipeline(cfg).run(scan, tmp_path, resume=False).resumed == {}


def test_device_out_of_memory_shrinks_the_slab_and_gives_the_same_result(scan, tmp_path, monkeypatch):
    """Simulated on the CPU: the slab processing raises CuPy's OutOfMemoryError for pieces over 3 slices."""
    import cupy

    from gpuheart import Pipeline, PipelineConfig, pipeline

    cfg = PipelineConfig.from_dict({"slab_size": 8, "progress": False, "channels": ["C00"],
                                    "segment": {"method": "dom"}, "output": {"report": False},
                                    "mesh": {"enabled": False}, "graph": {"enabled": False}})
    ref = Pipeline(cfg).run(scan, tmp_path / "ref")
    real = pipeline._process_slab
    sizes = []

    def tight(x, *a, **k):
        sizes.append(x.shape[0])
        if x.shape[0] > 3:
            raise cupy.cuda.memory.OutOfMemoryError(x.nbytes, 0, 0)
        return real(x, *a, **k)

    monkeypatch.setattr(pipeline, "_process_slab", tight)
    with pytest.warns(RuntimeWarning, match="out of device memory"):
        got = Pipeline(cfg).run(scan, tmp_path / "oom")
    assert max(sizes) == 8 and sizes[-1] <= 2  # tried the slab, then kept to the smaller pieces
    for name in ("preprocessed", "dom_mask", "mask"):
        with open_scan(ref.outputs["C00"][name]) as a, open_scan(got.outputs["C00"][name]) as b:
            np.testing.assert_array_equal(a.read_slab(0, 0, a.shape[0]), b.read_slab(0, 0, b.shape[0]))
    for key in ("detrended_cv_normalized", "snr_dom", "slice_means_normalized"):
        assert got.summary["C00"][key] == ref.summary["C00"][key]


def test_other_errors_are_not_retried(scan, tmp_path, monkeypatch):
    from gpuheart import Pipeline, PipelineConfig, pipeline

    calls = []

    def broken(x, *a, **k):
        calls.append(x.shape[0])
        raise ValueError("boom")

    monkeypatch.setattr(pipeline, "_process_slab", broken)
    cfg = PipelineConfig.from_dict({"progress": False, "channels": ["C00"], "segment": {"method": "dom"}})
    with pytest.raises(ValueError, match="boom"):
        Pipeline(cfg).run(scan, tmp_path / "x")
    assert calls == [16]


@pytest.mark.gpu
def test_capped_device_memory_pool_still_completes(scan, tmp_path, monkeypatch):
    """On a GPU, with a memory pool too small for a 16-slice slab: the slab plan sees the cap, and when a
    slab does not fit anyway (the plan forced to the whole slab here), the out-of-memory error reaches
    the shrink-and-retry path (it is not swallowed by a kernel's host fallback) and the output is the
    same as an uncapped run's."""
    import cupy

    from gpuheart import Pipeline, PipelineConfig, backend, exposure, filters, morphology, pipeline

    cfg = PipelineConfig.from_dict({"slab_size": 16, "progress": False, "channels": ["C00"], "device": "cuda",
                                    "segment": {"method": "dom"}, "output": {"report": False},
                                    "mesh": {"enabled": False}, "graph": {"enabled": False}})
    ref = Pipeline(cfg).run(scan, tmp_path / "ref")
    filters._CUDA_FAILED.clear(), exposure._warned.clear(), morphology._warned.clear()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    cap = 16 * 128 * 128 * 4 * 3  # about three float32 copies of a 16-slice slab: less than one needs
    pool.set_limit(size=cap)
    try:
        assert backend.device_free_bytes() <= cap
        assert pipeline.plan_slices(16, (40, 128, 128), backend.device_free_bytes()) < 16
        monkeypatch.setattr(pipeline, "plan_slices", lambda step, shape, free, fraction=0.5: step)
        with pytest.warns(RuntimeWarning, match="out of device memory"):
            got = Pipeline(cfg).run(scan, tmp_path / "capped")
    finally:
        pool.set_limit(size=0)
    assert not filters._CUDA_FAILED and not exposure._warned and not morphology._warned
    for name, path in ref.outputs["C00"].items():   # pieces are written at offsets inside a slab's chunks
        if path.name.endswith(".ome.zarr"):
            with open_scan(path) as a, open_scan(got.outputs["C00"][name]) as b:
                np.testing.assert_array_equal(a.read_slab(0, 0, a.shape[0]), b.read_slab(0, 0, b.shape[0]), name)
    for key in ("detrended_cv_normalized", "snr_dom", "slice_means_normalized", "dom_vs_truth"):
        assert got.summary["C00"].get(key) == ref.summary["C00"].get(key), key


@pytest.mark.gpu
def test_accumulator_restored_from_a_checkpoint_accepts_device_slabs():
    """A resumed GPU run: the accumulator's state comes back from the checkpoint as NumPy, the next
    slabs arrive as CuPy."""
    import cupy as cp

    from gpuheart.pipeline import _ChannelAccumulator

    acc = _ChannelAccumulator((4, 8, 8), None, "C00")
    acc.add_raw(0, cp.ones((2, 8, 8), cp.uint16))
    acc2 = _ChannelAccumulator((4, 8, 8), None, "C00")
    acc2.load_state(*acc.state())
    acc2.add_raw(2, cp.ones((2, 8, 8), cp.uint16))
