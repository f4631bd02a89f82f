"""A run killed with SIGKILL and started again with the same command equals an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    """For the capped-pool test on the fake GPU, where every kernel launch is emulated on the host: on the
    40x128x128 scan it was the slowest test of the suite (57 s on 2 cores; 24 s on this one). A full slab of 16
    and a short one still come through the plan and the retries. A real GPU keeps the larger scan."""
    from gpuheart.phantom import PhantomConfig, write_phantom

    folder = tmp_path_factory.mktemp("ph_small") / "ph"
    write_phantom(PhantomConfig.preset("default", shape=(24, 64, 64)), folder)
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
    at = manifest.read_text()[:300]  # where it was killed, for the messages below
    assert not (out / "summary.json").exists(), at
    assert not (out / "C00" / "mask.ome.zarr").exists(), at  # nothing that looks complete

    again = subprocess.run(_cmd(scan, out, cfg), capture_output=True, text=True)
    assert again.returncode == 0, f"killed at {at}\n{again.stdout}\n{again.stderr}"
    assert "resumed an interrupted run at slice" in again.stdout, f"killed at {at}\n{again.stdout}"
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
    cupy = pytest.importorskip("cupy", reason="CuPy (the dev extra) is not installed")

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
    capped_pool_completes(scan, tmp_path, monkeypatch)


def capped_pool_completes(scan, tmp_path, monkeypatch):
    import cupy

    from gpuheart import Pipeline, PipelineConfig, backend, exposure, filters, morphology, pipeline

    cfg = PipelineConfig.from_dict({"slab_size": 16, "progress": False, "channels": ["C00"], "device": "cuda",
                                    "segment": {"method": "dom"}, "output": {"report": False},
                                    "mesh": {"enabled": False}, "graph": {"enabled": False}})
    ref = Pipeline(cfg).run(scan, tmp_path / "ref")
    with open_scan(scan) as sc:
        shape = sc.shape
    filters._CUDA_FAILED.clear(), exposure._warned.clear(), morphology._warned.clear()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    cap = 16 * shape[1] * shape[2] * 4 * 3  # about three float32 copies of a 16-slice slab: less than one needs
    pool.set_limit(size=cap)
    try:
        assert backend.device_free_bytes() <= cap
        assert pipeline.plan_slices(16, shape, backend.device_free_bytes()) < 16
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


def _fast_cfg(**extra):
    from gpuheart import PipelineConfig

    d = {"slab_size": 4, "progress": False, "segment": {"method": "dom"}, "output": {"report": False},
         "mesh": {"enabled": False}, "graph": {"enabled": False}, "channels": ["C00"]}
    for k, v in extra.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return PipelineConfig.from_dict(d)


def _stack(scan, path, z0, z1):
    import tifffile

    with open_scan(scan, channels="C00") as s:
        tifffile.imwrite(path, s.read_slab("C00", z0, z1))
    return path


def _volume(path):
    with open_scan(path) as s:
        return s.read_slab(0, 0, s.shape[0])


def test_a_changed_input_file_is_processed_again_not_reused(scan, tmp_path):
    """Same path, shape and dtype, other pixels (a scan re-exported under its old name): not the old results."""
    from gpuheart import Pipeline

    stack, out, cfg = tmp_path / "stack.tif", tmp_path / "out", _fast_cfg()
    _stack(scan, stack, 0, 12)
    Pipeline(cfg).run(stack, out)
    assert Pipeline(cfg).run(stack, out).resumed == {"C00": 12}  # unchanged: reused
    first = _volume(out / "C00" / "preprocessed.ome.zarr")
    _stack(scan, stack, 20, 32)
    os.utime(stack, ns=(time.time_ns(), time.time_ns() + 10**9))  # a coarse file system clock must see it too
    again = Pipeline(cfg).run(stack, out)
    assert again.resumed == {} and again.reused == []
    assert not np.array_equal(_volume(out / "C00" / "preprocessed.ome.zarr"), first)


def test_killed_after_pass_2_redoes_only_the_closings(scan, tmp_path, monkeypatch):
    """Killed in the closings (after pass 2 committed its stores): the same command continues from there,
    without computing a slab again, and gives the uninterrupted run's outputs."""
    from gpuheart import Pipeline, pipeline

    cfg = _fast_cfg(checkpoint_seconds=3600.0)  # only the checkpoint at the end of pass 2
    ref = Pipeline(cfg).run(scan, tmp_path / "ref")
    real = pipeline._postprocess

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_postprocess", killed)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()
    monkeypatch.setattr(pipeline, "_postprocess", real)

    def no_slabs(*a, **k):
        raise AssertionError("pass 2 was computed again")

    monkeypatch.setattr(pipeline, "_process_slab", no_slabs)
    again = Pipeline(cfg).run(scan, tmp_path / "out")
    assert again.resumed == {"C00": 40} and again.reused == []
    for name in ("preprocessed", "dom_mask", "mask"):
        np.testing.assert_array_equal(_volume(tmp_path / "out" / "C00" / f"{name}.ome.zarr"),
                                      _volume(ref.out_dir / "C00" / f"{name}.ome.zarr"))


def test_a_run_with_other_settings_leaves_no_outputs_of_the_earlier_one(scan, tmp_path):
    from gpuheart import Pipeline
    from gpuheart.pipeline import ConfigError

    out = tmp_path / "out"
    Pipeline(_fast_cfg(output={"tiff": True})).run(scan, out)
    assert (out / "C00" / "mask.ome.zarr").is_dir() and (out / "C00" / "mask.tif").is_file()
    # without the closings the mask is the DoM mask itself: an old mask.ome.zarr would pass for this run's
    result = Pipeline(_fast_cfg(postprocess={"enabled": False})).run(scan, out)
    assert result.outputs["C00"]["mask"] == out / "C00" / "dom_mask.ome.zarr"
    assert not (out / "C00" / "mask.ome.zarr").exists() and not (out / "C00" / "mask.tif").exists()
    assert (out / "summary.json").is_file()
    bad_truth = tmp_path / "truth.tif"
    import tifffile
    tifffile.imwrite(bad_truth, np.zeros((40, 8, 8), np.uint8))
    summary = (out / "summary.json").read_bytes()
    with pytest.raises(ValueError, match="truth mask has shape"):
        Pipeline(_fast_cfg(dom={"large": 13})).run(scan, out, truth={"C00": str(bad_truth)})
    # refused before any channel started: the earlier outputs stay as its config.toml and summary.json describe
    # them (a refused command must not cost the record of a finished run)
    assert (out / "summary.json").read_bytes() == summary
    assert (out / "C00" / "dom_mask.ome.zarr").is_dir() and not (out / "C00" / "mask.ome.zarr").exists()
    with pytest.raises(ConfigError, match="truth given for channel.s. C07"):
        Pipeline(_fast_cfg()).run(scan, out, truth={"C07": str(bad_truth)})


def test_the_synthetic_scan_of_another_preset_is_written_not_reused(tmp_path):
    from gpuheart.pipeline import _write_default_input

    scan, _ = _write_default_input(tmp_path / "input", "tiny", progress=False)
    with open_scan(scan) as s:
        assert s.shape == (16, 64, 64)
    mtime = (tmp_path / "input" / "phantom.json").stat().st_mtime_ns
    _write_default_input(tmp_path / "input", "tiny", progress=False)  # same preset: reused
    assert (tmp_path / "input" / "phantom.json").stat().st_mtime_ns == mtime
    scan, _ = _write_default_input(tmp_path / "input", "default", progress=False)
    with open_scan(scan) as s:
        assert s.shape == (32, 256, 256)


def test_a_folder_of_the_users_where_the_synthetic_scan_goes_is_never_deleted(tmp_path):
    from gpuheart.pipeline import ConfigError, _write_default_input

    mine = tmp_path / "input"
    (mine / "scan").mkdir(parents=True)
    (mine / "scan" / "precious.tif").write_bytes(b"data")
    with pytest.raises(ConfigError, match="not a synthetic scan gpuheart wrote"):
        _write_default_input(mine, "tiny", progress=False)
    assert (mine / "scan" / "precious.tif").read_bytes() == b"data"
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "notes.txt").write_text("mine")
    from gpuheart import Pipeline
    with pytest.raises(ConfigError):
        Pipeline(_fast_cfg()).run(None, tmp_path, phantom_preset="tiny")
    assert (tmp_path / "report" / "notes.txt").read_text() == "mine"


def _same_run(got, ref):
    for name in ("preprocessed", "dom_mask", "mask"):
        np.testing.assert_array_equal(_volume(got / "C00" / f"{name}.ome.zarr"),
                                      _volume(ref / "C00" / f"{name}.ome.zarr"), name)
    a = json.loads((got / "summary.json").read_text())["summary"]["C00"]
    b = json.loads((ref / "summary.json").read_text())["summary"]["C00"]
    assert a == b


def test_killed_between_a_checkpoints_state_and_its_manifest_resumes_exactly(scan, tmp_path, monkeypatch):
    """A kill after a checkpoint's measurement state was written, before the manifest said which slice it
    belongs to: the resumed run must not add those slices' sums twice (the SIGKILL test's rare failure)."""
    from gpuheart import Pipeline, pipeline

    cfg = _fast_cfg(checkpoint_seconds=0.0)
    Pipeline(cfg).run(scan, tmp_path / "ref")
    real = pipeline._Checkpoint._write_manifest

    def killed_at_12(self, **fields):
        if fields.get("next_z") == 12 and "stats" not in fields:
            raise KeyboardInterrupt
        return real(self, **fields)

    monkeypatch.setattr(pipeline._Checkpoint, "_write_manifest", killed_at_12)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path / "out")
    monkeypatch.setattr(pipeline._Checkpoint, "_write_manifest", real)
    again = Pipeline(cfg).run(scan, tmp_path / "out")
    assert again.resumed == {"C00": 8}
    _same_run(tmp_path / "out", tmp_path / "ref")
    # and pass 2's final measurement state, which a rerun with other closing, mesh or graph settings starts from
    assert sorted(p.name for p in (tmp_path / "out" / "C00" / ".resume").iterdir()) == [
        "manifest.json", "pass2-acc.json", "pass2-acc.npz", "stats.json"]


def test_a_restart_from_slice_0_is_recorded_before_the_fresh_stores_fill(scan, tmp_path, monkeypatch):
    """Killed after pass 2, one pass-2 output then removed: the rerun starts pass 2 again. Killed again before
    its first checkpoint, the manifest must not still vouch for all 40 slices of the fresh, mostly empty stores."""
    from gpuheart import Pipeline, pipeline

    cfg = _fast_cfg(checkpoint_seconds=3600.0)
    Pipeline(cfg).run(scan, tmp_path / "ref")
    real_post, real_slab = pipeline._postprocess, pipeline._process_slab

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_postprocess", interrupt)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path / "out")
    monkeypatch.setattr(pipeline, "_postprocess", real_post)
    import shutil
    shutil.rmtree(tmp_path / "out" / "C00" / "dom_mask.ome.zarr")
    calls = []

    def second_slab_killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_slab(*a, **k)

    monkeypatch.setattr(pipeline, "_process_slab", second_slab_killed)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path / "out")
    monkeypatch.setattr(pipeline, "_process_slab", real_slab)
    Pipeline(cfg).run(scan, tmp_path / "out")
    _same_run(tmp_path / "out", tmp_path / "ref")


def _zarr_copy(scan, path, z0, z1):
    from gpuheart.io import ZarrWriter

    with open_scan(scan, channels="C00") as s, \
            ZarrWriter(path, (z1 - z0, *s.shape[1:]), s.dtype, chunks=(2, 64, 64)) as w:
        w.write(0, s.read_slab("C00", z0, z1))
    return path


def test_a_zarr_inputs_stamp_skips_its_chunks_and_sees_a_re_export(scan, tmp_path):
    """Stamping a Zarr store does not stat its chunk files (a scan can have hundreds of thousands), yet a
    store exported again under the same name is processed again, not reused."""
    from gpuheart import Pipeline
    from gpuheart.io import source_stamp as _stamp

    store, out, cfg = tmp_path / "scan.ome.zarr", tmp_path / "out", _fast_cfg()
    _zarr_copy(scan, store, 0, 12)
    chunks = [f for f in (store / "0").rglob("*") if f.is_file() and not f.name.startswith((".", "zarr"))]
    assert len(chunks) > 1 and _stamp(store)[0] < len(chunks)
    Pipeline(cfg).run(store, out)
    assert Pipeline(cfg).run(store, out).reused == ["C00"]
    first = _volume(out / "C00" / "preprocessed.ome.zarr")
    time.sleep(0.01)
    _zarr_copy(scan, store, 20, 32)  # written anew and renamed into place, as an export does
    again = Pipeline(cfg).run(store, out)
    assert again.resumed == {} and again.reused == []
    assert not np.array_equal(_volume(out / "C00" / "preprocessed.ome.zarr"), first)


def test_a_summary_or_report_of_the_users_in_out_is_never_removed(scan, tmp_path):
    from gpuheart import Pipeline
    from gpuheart.pipeline import ConfigError

    (tmp_path / "summary.json").write_text('{"mine": 1}')
    (tmp_path / "report.html").write_text("<html>my notes</html>")
    with pytest.raises(ConfigError, match="summary.json was not written by gpuheart"):
        Pipeline(_fast_cfg()).run(scan, tmp_path)
    assert (tmp_path / "summary.json").read_text() == '{"mine": 1}'
    (tmp_path / "summary.json").unlink()
    Pipeline(_fast_cfg()).run(scan, tmp_path)  # no report written: the user's report.html is left alone
    assert (tmp_path / "report.html").read_text() == "<html>my notes</html>"
    with pytest.raises(ConfigError, match="report.html was not written by gpuheart"):
        Pipeline(_fast_cfg(output={"report": True})).run(scan, tmp_path)
    assert (tmp_path / "report.html").read_text() == "<html>my notes</html>"
    assert (tmp_path / "summary.json").is_file()  # gpuheart's own is checked first, removed only after


def test_truth_or_input_among_the_runs_own_outputs_is_refused_not_removed(scan, tmp_path):
    """An earlier run's mask.tif, corrected by hand and given as truth to a run with other settings in the
    same OUT: the fresh channel would remove it with the earlier outputs."""
    from gpuheart import Pipeline
    from gpuheart.pipeline import ConfigError

    out = tmp_path / "out"
    Pipeline(_fast_cfg(output={"tiff": True})).run(scan, out)
    corrected = out / "C00" / "mask.tif"
    before = corrected.read_bytes()
    with pytest.raises(ConfigError, match="one of the outputs this run writes"):
        Pipeline(_fast_cfg(dom={"large": 13})).run(scan, out, truth={"C00": str(corrected)})
    assert corrected.read_bytes() == before
    with pytest.raises(ConfigError, match="one of the outputs this run writes"):
        Pipeline(_fast_cfg(dom={"large": 13})).run(out / "C00" / "dom_mask.ome.zarr", out)
    assert (out / "C00" / "dom_mask.ome.zarr").is_dir()


def test_a_fresh_channel_removes_what_a_killed_run_left_of_its_outputs(scan, tmp_path):
    from gpuheart import Pipeline

    out = tmp_path / "out"
    (out / "C00" / ".resume").mkdir(parents=True)  # what a killed run leaves (made before pass 2 writes)
    for name in ("mask.ome.zarr.old-12345", "unet_mask.ome.zarr.partial", "mask.tif.partial"):
        (out / "C00" / name).mkdir()
    (out / "C00" / "notes.old-1").write_text("mine")
    Pipeline(_fast_cfg()).run(scan, out)
    assert sorted(p.name for p in (out / "C00").iterdir() if "old" in p.name or "partial" in p.name) == ["notes.old-1"]


def test_a_finished_channel_whose_output_was_deleted_is_computed_again(scan, tmp_path):
    import shutil

    from gpuheart import Pipeline, PipelineConfig

    cfg = PipelineConfig.from_dict({"slab_size": 8, "progress": False, "segment": {"method": "dom"},
                                    "output": {"report": False}, "mesh": {"enabled": False},
                                    "graph": {"enabled": False}, "channels": ["C00"]})
    first = Pipeline(cfg).run(scan, tmp_path)
    assert Pipeline(cfg).run(scan, tmp_path).reused == ["C00"]
    shutil.rmtree(first.outputs["C00"]["mask"])
    again = Pipeline(cfg).run(scan, tmp_path)
    assert again.reused == [] and again.resumed == {}
    assert all(Path(p).exists() for p in again.outputs["C00"].values())
    assert again.summary["C00"] == first.summary["C00"]


def test_a_resume_whose_stores_are_gone_is_not_reported_as_a_resume(scan, tmp_path, monkeypatch):
    import shutil

    from gpuheart import Pipeline, pipeline

    cfg = _fast_cfg(checkpoint_seconds=3600.0)
    real_post = pipeline._postprocess

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_postprocess", interrupt)  # killed after pass 2: its checkpoint says 40
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path)
    monkeypatch.setattr(pipeline, "_postprocess", real_post)
    shutil.rmtree(tmp_path / "C00" / "dom_mask.ome.zarr")
    assert Pipeline(cfg).run(scan, tmp_path).resumed == {}  # pass 2 ran from slice 0: not a resume


def test_a_channel_folder_no_run_worked_in_keeps_files_of_output_names(scan, tmp_path):
    """OUT/C00 without .resume was not made by a gpuheart run: files there that this run does not write
    (a hand-made mask.tif, a mesh.obj) are someone's own, not an earlier run's outputs to remove."""
    from gpuheart import Pipeline

    out = tmp_path / "out"
    (out / "C00").mkdir(parents=True)
    for name in ("mask.tif", "mesh.obj", "unet_mask.ome.zarr"):
        (out / "C00" / name).write_text("mine")
    Pipeline(_fast_cfg()).run(scan, out)
    assert all((out / "C00" / n).read_text() == "mine" for n in ("mask.tif", "mesh.obj", "unet_mask.ome.zarr"))


def test_another_channels_truth_among_a_channels_outputs_is_refused_not_removed(scan, tmp_path):
    """C00's truth is C01's earlier mask.tif: C01's fresh start would remove it after C00 had read it."""
    from gpuheart import Pipeline
    from gpuheart.pipeline import ConfigError

    out = tmp_path / "out"
    Pipeline(_fast_cfg(channels=["C00", "C01"], output={"tiff": True})).run(scan, out)
    corrected = out / "C01" / "mask.tif"
    before = corrected.read_bytes()
    with pytest.raises(ConfigError, match="one of the outputs this run writes"):
        Pipeline(_fast_cfg(channels=["C00", "C01"], dom={"large": 13})).run(scan, out, truth={"C00": str(corrected)})
    assert corrected.read_bytes() == before


def test_a_resume_whose_checkpoint_state_is_lost_is_not_reported_as_a_resume(scan, tmp_path, monkeypatch):
    from gpuheart import Pipeline, pipeline

    cfg = _fast_cfg(checkpoint_seconds=3600.0)

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_postprocess", interrupt)  # killed after pass 2: its checkpoint says 40
        with pytest.raises(KeyboardInterrupt):
            Pipeline(cfg).run(scan, tmp_path)
    for f in (tmp_path / "C00" / ".resume").glob("acc-*"):
        f.unlink()
    assert Pipeline(cfg).run(scan, tmp_path).resumed == {}  # pass 2 ran from slice 0: not a resume


def test_an_out_folder_inside_a_slice_folder_scan_does_not_change_its_stamp(scan, tmp_path):
    """-o inside the scan's own folder: the run's outputs are not part of the input, so a rerun reuses them."""
    import shutil

    from gpuheart import Pipeline

    folder = tmp_path / "scan"
    shutil.copytree(scan, folder)
    cfg = _fast_cfg()
    Pipeline(cfg).run(folder, folder / "out")
    assert Pipeline(cfg).run(folder, folder / "out").reused == ["C00"]


def test_a_rerun_that_differs_only_in_progress_bars_or_checkpoint_interval_reuses(scan, tmp_path):
    """Neither changes an output: `gpuheart run` without --no-progress after a run with it is the same run."""
    from gpuheart import Pipeline

    Pipeline(_fast_cfg()).run(scan, tmp_path)
    assert Pipeline(_fast_cfg(progress=True, checkpoint_seconds=5.0)).run(scan, tmp_path).reused == ["C00"]


def test_turning_the_report_on_afterwards_reuses_the_channels_and_writes_it(scan, tmp_path):
    from gpuheart import Pipeline

    Pipeline(_fast_cfg()).run(scan, tmp_path)   # report = false
    assert not (tmp_path / "report.html").exists()
    result = Pipeline(_fast_cfg(output={"report": True})).run(scan, tmp_path)
    assert result.reused == ["C00"] and (tmp_path / "report.html").is_file()


def test_a_truth_mask_corrected_in_place_is_scored_again_not_reused(scan, tmp_path):
    """The same truth path, same size, other pixels (README: results are reused unless the truth changed)."""
    import tifffile

    from gpuheart import Pipeline

    truth, out = tmp_path / "truth.tif", tmp_path / "out"
    tifffile.imwrite(truth, np.zeros((40, 128, 128), np.uint8))
    first = Pipeline(_fast_cfg()).run(scan, out, truth={"C00": str(truth)})
    assert first.summary["C00"]["final_vs_truth"]["tp"] == 0
    size = truth.stat().st_size
    tifffile.imwrite(truth, _volume(first.outputs["C00"]["mask"]))   # the run's own mask: Dice 1
    os.utime(truth, ns=(time.time_ns(), time.time_ns() + 10**9))    # a coarse file system clock must see it too
    assert truth.stat().st_size == size
    again = Pipeline(_fast_cfg()).run(scan, out, truth={"C00": str(truth)})
    assert again.reused == [] and again.summary["C00"]["final_vs_truth"]["dice"] == 1.0


def test_a_rerun_with_fewer_outputs_leaves_only_its_own_files(scan, tmp_path):
    """Every file an earlier run with more outputs (TIFFs, mesh, tree graph) wrote is removed, so nothing in
    the channel folder passes for this run's."""
    from gpuheart import Pipeline

    out = tmp_path / "out"
    full = Pipeline(_fast_cfg(output={"tiff": True}, mesh={"enabled": True}, graph={"enabled": True})).run(scan, out)
    assert {"mask_tiff", "mesh", "largest_tree", "components", "voxel_components", "tree_branches",
            "tree_graphml"} <= set(full.outputs["C00"])
    small = Pipeline(_fast_cfg(postprocess={"enabled": False})).run(scan, out)
    own = {p.name for p in small.outputs["C00"].values()} | {"figures.npz", ".resume"}
    assert sorted(p.name for p in (out / "C00").iterdir() if p.name not in own) == []


def test_a_run_killed_while_writing_its_summary_leaves_none_and_the_same_command_finishes(scan, tmp_path,
                                                                                          monkeypatch):
    """summary.json is written then renamed: a half-written one would make the next run refuse OUT (a
    summary.json gpuheart did not write) instead of finishing."""
    from gpuheart import Pipeline

    real = Path.write_bytes

    def killed_halfway(self, data):
        if self.name.startswith("summary.json"):
            real(self, data[: len(data) // 2])
            raise KeyboardInterrupt
        return real(self, data)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", killed_halfway)
        with pytest.raises(KeyboardInterrupt):
            Pipeline(_fast_cfg()).run(scan, tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert Pipeline(_fast_cfg()).run(scan, tmp_path).reused == ["C00"]
    assert json.loads((tmp_path / "summary.json").read_text())["summary"]["C00"]["slices"] == 40


def test_an_interrupted_segment_resumes_and_leaves_no_work_folder(scan, tmp_path, monkeypatch):
    """gpuheart segment: killed halfway, the same call continues from its checkpoint (no slab before it is
    computed again) and writes the uninterrupted mask; neither a finished nor a resumed call leaves its work
    folder behind (a fresh temporary folder per call restarted from slice 0 and kept a hidden copy per kill)."""
    import tifffile

    from gpuheart import Pipeline, pipeline

    cfg = _fast_cfg(checkpoint_seconds=0.0)
    cfg.postprocess.enabled = False
    ref = Pipeline(cfg).segment(scan, tmp_path / "ref" / "mask.tif")
    out = tmp_path / "out" / "mask.tif"
    real = pipeline._process_slab

    killed_at_20 = _process_slab_killed_at(20)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", killed_at_20)
        with pytest.raises(KeyboardInterrupt):
            Pipeline(cfg).segment(scan, out)
    assert not out.exists()
    computed = []

    def after_20_only(x, z0, *a, **k):
        computed.append(z0)
        return real(x, z0, *a, **k)

    monkeypatch.setattr(pipeline, "_process_slab", after_20_only)
    Pipeline(cfg).segment(scan, out)
    assert min(computed) == 20
    np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(ref))
    assert sorted(p.name for p in out.parent.iterdir()) == ["mask.tif"]
    assert sorted(p.name for p in ref.parent.iterdir()) == ["mask.tif"]


def test_gpuheart_segment_says_it_continues_and_restart_starts_over(scan, tmp_path, monkeypatch, capsys):
    from gpuheart import pipeline
    from gpuheart.cli import main

    cfg_path = tmp_path / "fast.toml"
    _fast_cfg(checkpoint_seconds=0.0).save(cfg_path)
    out = tmp_path / "out" / "mask.tif"
    argv = ["segment", str(scan), "-o", str(out), "-c", str(cfg_path), "--no-progress"]
    real = pipeline._process_slab
    computed = []

    killed_at_20 = _process_slab_killed_at(20)
    def counted(x, z0, *a, **k):
        computed.append(z0)
        return real(x, z0, *a, **k)

    for restart in (False, True):
        with monkeypatch.context() as m:
            m.setattr(pipeline, "_process_slab", killed_at_20)
            assert main(argv) == 130   # Ctrl-C
        capsys.readouterr()
        computed.clear()
        monkeypatch.setattr(pipeline, "_process_slab", counted)
        assert main(argv + ["--restart"] * restart) == 0
        said = capsys.readouterr().out
        assert ("found an interrupted segmentation" in said) is not restart
        assert ("continued the interrupted segmentation at slice 20" in said) is not restart
        assert min(computed) == (0 if restart else 20)
        monkeypatch.setattr(pipeline, "_process_slab", real)
    # killed, then rerun with other settings: it cannot continue, and says it started over
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", killed_at_20)
        assert main(argv) == 130
    capsys.readouterr()
    computed.clear()
    monkeypatch.setattr(pipeline, "_process_slab", counted)
    assert main(argv + ["--method", "otsu"]) == 0
    said = capsys.readouterr().out
    assert "could not continue the interrupted segmentation (other settings (" in said and "continued" not in said
    assert "segment.method 'dom' -> 'otsu'" in said and "): started over" in said, said
    assert min(computed) == 0


def _process_slab_killed_at(z_kill: int):
    """pipeline._process_slab, interrupted (Ctrl-C) on reaching slice ``z_kill``."""
    from gpuheart import pipeline

    real = pipeline._process_slab

    def killed(x, z0, *a, **k):
        if z0 >= z_kill:
            raise KeyboardInterrupt
        return real(x, z0, *a, **k)

    return killed


def _padded(scan, path, n=6):
    """C00 of ``scan`` between n/2 + n/2 blank slices (the camera offset, no tissue): dark slices."""
    import tifffile

    with open_scan(scan, channels="C00") as s:
        raw = s.read_slab("C00", 0, 24)
    ends = np.full((n, *raw.shape[1:]), 100, raw.dtype)
    tifffile.imwrite(path, np.concatenate([ends[:n // 2], raw, ends[n // 2:]]))
    return path


def test_a_resume_that_starts_pass_2_over_still_leaves_dark_slices_out_of_the_measurements(scan, tmp_path,
                                                                                           monkeypatch):
    """Killed in pass 2, then one partial store lost: the rerun starts pass 2 again from slice 0 with a fresh
    measurement state, which must still know the dark slices (it forgot them: the blank ends were counted in
    the global Otsu histogram and the preprocessed mean, unlike in an uninterrupted run)."""
    import shutil

    from skimage.filters import threshold_otsu

    from gpuheart import Pipeline, pipeline

    stack = _padded(scan, tmp_path / "padded.tif")
    cfg = _fast_cfg(checkpoint_seconds=0.0, slab_size=2, segment={"method": "otsu"})
    out = tmp_path / "out"

    killed_at_12 = _process_slab_killed_at(12)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", killed_at_12)
        with pytest.raises(KeyboardInterrupt):
            Pipeline(cfg).run(stack, out)
    shutil.rmtree(out / "C00" / "dom_mask.ome.zarr.partial")
    r = Pipeline(cfg).run(stack, out)
    assert r.resumed == {}   # pass 2 ran again from slice 0
    s = r.summary["C00"]
    dark = s["normalization"]["dark_slices"]
    assert {0, 1, 2, 27, 28, 29} <= set(dark)
    with open_scan(r.outputs["C00"]["preprocessed"]) as pre:
        vol = pre.read_slab(0, 0, pre.shape[0])
    lit = np.delete(vol, dark, 0)
    assert threshold_otsu(vol) != threshold_otsu(lit)   # the premise: counting the dark slices shows
    assert s["otsu_threshold"] == threshold_otsu(lit)
    assert s["preprocessed_mean"] == pytest.approx(lit.mean(), rel=1e-12)


def test_choosing_fewer_channels_or_overriding_another_channel_reuses_a_finished_channel(scan, tmp_path):
    """`--channels C00` after a run of C00 and C01, `--preset C01=nerves`, or `--device cpu` where "auto" ran
    on the CPU: C00's outputs are those of its settings alone, so it is reused, not computed again (and a
    killed run continued with fewer channels keeps its progress); C01 with other settings is computed again."""
    from gpuheart import Pipeline, backend

    out = tmp_path / "out"
    both = Pipeline(_fast_cfg(channels=["C00", "C01"])).run(scan, out)
    assert both.reused == []
    assert Pipeline(_fast_cfg(channels=["C00"])).run(scan, out).reused == ["C00"]
    nerves = _fast_cfg(channels=["C00", "C01"], channel={"C01": {"preset": "nerves"}})
    again = Pipeline(nerves).run(scan, out)
    assert again.reused == ["C00"]
    assert again.summary["C00"] == both.summary["C00"]
    other = _fast_cfg(channels=["C00", "C01"], device=backend.resolve_device("auto"))
    assert Pipeline(other).run(scan, out).reused == ["C00"]   # C01 back to the plain settings: computed again


def _killed_run(cfg, scan, out, monkeypatch, z_kill=20):
    from gpuheart import Pipeline, pipeline

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", _process_slab_killed_at(z_kill))
        with pytest.raises(KeyboardInterrupt):
            Pipeline(cfg).run(scan, out)


def _chunk_files(store):
    """Chunk files of array "0" of a (partial) store, as 'z/y/x' keys."""
    root = Path(store) / "0"
    return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))


def test_a_chunk_file_lost_from_a_partial_store_restarts_pass_2_instead_of_reading_zeros(scan, tmp_path,
                                                                                        monkeypatch):
    """Killed at slice 20, then one chunk file of slices [0, 20) deleted from a .partial store: zarr reads a
    missing chunk as 0, so continuing gave a mask with those voxels empty. The rerun must start pass 2 over,
    say why, and equal an uninterrupted run. Both a chunk with vessels and an all-zero one (blank slices,
    which zarr 3 would not write at all by default) are checked."""
    import zarr

    from gpuheart import Pipeline

    if hasattr(zarr, "config"):   # zarr 3's default, why empty chunks need care (zarr 2 writes them)
        assert zarr.config.get("array.write_empty_chunks") is False
    stack = _padded(scan, tmp_path / "padded.tif")   # slices 0-2 blank: the first 2-slice chunk is all zero
    cfg = _fast_cfg(checkpoint_seconds=0.0, slab_size=2)
    ref = Pipeline(cfg).run(stack, tmp_path / "ref")
    dom_ref = _volume(ref.outputs["C00"]["dom_mask"])
    assert not dom_ref[0:2].any() and dom_ref[10:12].any()   # the premise: chunk 0 empty, chunk 5 not
    for lost in ("0/0/0", "5/0/0"):
        out = tmp_path / f"out-{lost.replace('/', '_')}"
        _killed_run(cfg, stack, out, monkeypatch)
        partial = out / "C00" / "dom_mask.ome.zarr.partial"
        assert _chunk_files(partial) == [f"{z}/0/0" for z in range(10)]   # every chunk of [0, 20), empty too
        (partial / "0" / lost).unlink()
        again = Pipeline(cfg).run(stack, out)
        assert again.resumed == {}, lost
        why = again.started_over["C00"]
        assert "dom_mask.ome.zarr.partial" in why and "chunk" in why and f"0/{lost}" in why, why
        np.testing.assert_array_equal(_volume(again.outputs["C00"]["dom_mask"]), dom_ref)
        assert again.summary["C00"] == ref.summary["C00"]


def test_a_chunk_lost_from_a_store_committed_before_the_closings_restarts_pass_2(scan, tmp_path, monkeypatch):
    """Killed in the closings: pass 2's stores are committed and taken back on resume; a chunk lost from one
    of them is seen there too."""
    from gpuheart import Pipeline, pipeline

    cfg = _fast_cfg(checkpoint_seconds=3600.0)
    ref = Pipeline(cfg).run(scan, tmp_path / "ref")

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_postprocess", killed)
        with pytest.raises(KeyboardInterrupt):
            Pipeline(cfg).run(scan, tmp_path / "out")
    (tmp_path / "out" / "C00" / "preprocessed.ome.zarr" / "0" / "3" / "0" / "0").unlink()
    again = Pipeline(cfg).run(scan, tmp_path / "out")
    assert again.resumed == {} and "preprocessed.ome.zarr.partial" in again.started_over["C00"]
    _same_run(tmp_path / "out", ref.out_dir)


def test_a_chunk_file_cut_short_in_a_partial_store_restarts_pass_2(scan, tmp_path, monkeypatch):
    """Killed at slice 20, then one chunk file of slices [0, 20) cut short (zarr renames a chunk file into
    place without fsync: after a power loss it can be empty or short): only missing files were seen, so the
    resume kept the store and pass 3 failed with 'error during blosc decompression'. The rerun must start
    pass 2 over, say why, and equal an uninterrupted run. A chunk file cut in half is checked in a mask, an
    emptied one in the images."""
    import numcodecs

    from gpuheart import Pipeline

    cfg = _fast_cfg(checkpoint_seconds=0.0, slab_size=2)
    ref = Pipeline(cfg).run(scan, tmp_path / "ref")
    for store, chunk, keep, slices in (("dom_mask", "5/0/0", 0.5, "Z0010-Z0011"),
                                       ("preprocessed", "3/0/0", 0.0, "Z0006-Z0007")):
        out = tmp_path / f"out-{store}"
        _killed_run(cfg, scan, out, monkeypatch)
        partial = out / "C00" / f"{store}.ome.zarr.partial"
        f = partial / "0" / chunk
        whole = f.read_bytes()
        assert len(numcodecs.Blosc().decode(whole)) == 2 * 128 * 128   # the premise: a whole Blosc chunk
        f.write_bytes(whole[:int(len(whole) * keep)])
        again = Pipeline(cfg).run(scan, out)
        assert again.resumed == {}, store
        why = again.started_over["C00"]
        assert f"{store}.ome.zarr.partial" in why and "cut short" in why and f"0/{chunk}" in why, why
        assert f"slices {slices}" in why, why
        _same_run(out, ref.out_dir)
        assert again.summary["C00"] == ref.summary["C00"]


def test_a_run_that_cannot_continue_an_earlier_one_says_why(scan, tmp_path, monkeypatch):
    """One line per channel, as data (RunResult.started_over) and from `gpuheart run`: which setting differs
    (with both values), which input changed, an unreadable checkpoint or state file, a finished run's output
    deleted (a truth mask given now keeps a finished pass 2: RunResult.later_only says so). Nothing is said on a first run, a continued or reused one, or --restart."""
    import shutil

    from gpuheart import Pipeline

    cfg, out = _fast_cfg(checkpoint_seconds=0.0), tmp_path / "out"
    stack = _stack(scan, tmp_path / "stack.tif", 0, 24)
    _killed_run(cfg, stack, out, monkeypatch, z_kill=8)
    other = _fast_cfg(checkpoint_seconds=0.0, dom={"large": 13})
    assert Pipeline(other).run(stack, out).started_over == {"C00": "other settings (dom.large 15 -> 13)"}
    assert Pipeline(other).run(stack, out).started_over == {}   # reused
    _stack(scan, stack, 1, 25)   # the same name written anew: same size, newer file
    os.utime(stack, ns=(time.time_ns(), time.time_ns() + 10**9))
    why = Pipeline(other).run(stack, out).started_over["C00"]
    assert why == f"the input {stack} changed (modified since)", why
    import tifffile

    truth = tmp_path / "truth.tif"   # a mask: a scan's intensities are refused as truth
    tifffile.imwrite(truth, (_volume(_stack(scan, tmp_path / "img.tif", 0, 24)) > 100).astype(np.uint8) * 255)
    r = Pipeline(other).run(stack, out, truth={"C00": str(truth)})   # scored from the finished run's stores
    assert r.started_over == {} and r.later_only == {"C00": f"another truth mask (none -> {truth})"}, r.later_only
    assert Pipeline(other).run(stack, out, resume=False).started_over == {}   # --restart: asked for
    shutil.rmtree(out / "C00" / "mask.ome.zarr")
    why = Pipeline(other).run(stack, out).started_over["C00"]
    assert why == f"the finished run's {out / 'C00' / 'mask.ome.zarr'} was deleted or moved since", why

    _killed_run(cfg, stack, out, monkeypatch, z_kill=8)
    for f in (out / "C00" / ".resume").glob("acc-*.npz"):
        f.write_bytes(b"cut short")
    r = Pipeline(cfg).run(stack, out)
    assert r.resumed == {} and "measurement state at slice 8 (acc-8.npz) is unreadable" in r.started_over["C00"]

    _killed_run(other, stack, out, monkeypatch, z_kill=8)   # (the finished run was cfg's: other ones)
    manifest = out / "C00" / ".resume" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    r = Pipeline(other).run(stack, out)
    assert r.resumed == {} and f"its checkpoint {manifest} is unreadable" in r.started_over["C00"]


def test_gpuheart_run_prints_why_it_started_over(scan, tmp_path, monkeypatch, capsys):
    from gpuheart.cli import main

    cfg, out = _fast_cfg(checkpoint_seconds=0.0), tmp_path / "out"
    _killed_run(cfg, scan, out, monkeypatch, z_kill=8)
    cfg_path = tmp_path / "c.toml"
    _fast_cfg(checkpoint_seconds=0.0, dom={"large": 13}).save(cfg_path)
    capsys.readouterr()
    assert main(["run", str(scan), "-o", str(out), "-c", str(cfg_path), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert (f"  C00: computed from the start, not from the earlier run in {out / 'C00'}: "
            f"other settings (dom.large 15 -> 13)\n") in said, said
    assert main(["run", str(scan), "-o", str(out), "-c", str(cfg_path), "--no-progress"]) == 0
    assert "computed from the start" not in capsys.readouterr().out


def test_a_corrupt_summary_json_in_out_is_called_unreadable_not_someone_elses(scan, tmp_path, capsys):
    """A summary.json cut short (a full disk, a copy that stopped) was reported as 'not written by gpuheart'.
    It is neither removed nor called someone else's: the error says it is not valid JSON and what to do;
    `gpuheart report` on it names the file too."""
    from gpuheart import Pipeline
    from gpuheart.cli import main
    from gpuheart.pipeline import ConfigError

    Pipeline(_fast_cfg()).run(scan, tmp_path)
    summary = tmp_path / "summary.json"
    cut = summary.read_text()[:100]
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)   # the premise: the standard library cannot parse it
    summary.write_text(cut)
    with pytest.raises(ConfigError) as err:
        Pipeline(_fast_cfg()).run(scan, tmp_path)
    msg = str(err.value)
    assert str(summary) in msg and "not valid JSON" in msg and "delete it" in msg, msg
    assert "not written by gpuheart" not in msg
    assert summary.read_text() == cut
    assert main(["report", str(tmp_path)]) == 1
    said = capsys.readouterr().err
    assert str(summary) in said and "not valid JSON" in said, said


def test_the_same_files_given_by_another_path_spelling_reuse_the_results(scan, tmp_path, monkeypatch):
    """`gpuheart run stack.tif -o out --truth t.tif` in one folder, then the same files and OUT as absolute
    paths from another folder: the same run, reused, not 'another input' computed again from scratch."""
    import tifffile

    from gpuheart import Pipeline

    work = tmp_path / "work"
    work.mkdir()
    stack = _stack(scan, work / "stack.tif", 0, 12)
    tifffile.imwrite(work / "truth.tif", (tifffile.imread(stack) > np.median(tifffile.imread(stack))).astype(np.uint8))
    cfg = _fast_cfg()
    monkeypatch.chdir(work)
    first = Pipeline(cfg).run("stack.tif", "out", truth="truth.tif")
    assert first.reused == [] and first.started_over == {}
    monkeypatch.chdir(tmp_path)
    again = Pipeline(cfg).run(work / "stack.tif", work / "out", truth=str(work / "truth.tif"))
    assert again.started_over == {} and again.reused == ["C00"]
    # the reused outputs are named as this run names OUT, so they are found from here
    assert again.outputs["C00"]["mask"] == work / "out" / "C00" / "mask.ome.zarr"
    monkeypatch.chdir(work / "out")
    third = Pipeline(cfg).run("../stack.tif", ".", truth="../truth.tif")
    assert third.reused == ["C00"] and all(p.exists() for p in third.outputs["C00"].values())


def test_a_run_killed_before_its_first_pass_2_checkpoint_keeps_its_statistics_and_says_so(scan, tmp_path,
                                                                                         monkeypatch, capsys):
    """An audit saw a rerun after an early kill say nothing: pass 1's statistics were kept (the manifest had
    them), pass 2 ran from slice 0, and no line told the user either."""
    from gpuheart.cli import main

    cfg, out = _fast_cfg(checkpoint_seconds=3600.0), tmp_path / "out"
    _killed_run(cfg, scan, out, monkeypatch, z_kill=8)
    cfg_path = tmp_path / "c.toml"
    cfg.save(cfg_path)
    assert main(["run", str(scan), "-o", str(out), "-c", str(cfg_path), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "C00: resumed an interrupted run after its first pass: the z-normalization statistics were kept" in said


def test_why_a_run_started_over_names_each_change_once_and_only_the_users():
    from gpuheart.pipeline import _why_not_the_same

    def key(voxel, method, keep_pre):
        return {"input": {"path": "/s.tif", "voxel_size": voxel}, "channel": "C00", "truth": None, "files": {},
                "config": {"voxel_size": voxel, "segment": {"method": method},
                           "output": {"write_preprocessed": keep_pre}}}

    assert _why_not_the_same(key([5, 1, 1], "union", False), key([4, 1, 1], "union", False)) == \
        "other settings (voxel_size [5, 1, 1] -> [4, 1, 1])"
    # the empty list is the scan's own voxel size, said so (it read "voxel_size [] -> [4, 1, 1]")
    assert _why_not_the_same(key([], "union", False), key([4, 1, 1], "union", False)) == \
        "other settings (voxel_size from the scan's files -> [4, 1, 1])"
    # `segment` keeps the preprocessed volume only for global Otsu: that follows from the method
    assert _why_not_the_same(key(None, "union", False), key(None, "otsu", True)) == \
        "other settings (segment.method 'union' -> 'otsu')"


@pytest.mark.parametrize("damage", ["delete a chunk", "truncate a chunk"])
def test_a_finished_run_whose_outputs_were_damaged_since_is_not_reused(scan, tmp_path, damage):
    """An audit deleted or truncated one chunk of a finished run's mask store: the rerun reused it ('reused
    the finished results'), and the mask then read 52k voxels as 0, or could not be read at all."""
    from gpuheart import Pipeline
    from gpuheart.io import open_scan

    cfg, out = _fast_cfg(), tmp_path / "out"
    first = Pipeline(cfg).run(scan, out)
    store = first.outputs["C00"]["mask"]
    with open_scan(store) as m:
        before = m.read_slab("C00", 0, m.shape[0])
    chunk = next(f for f in sorted((Path(store) / "0").rglob("*")) if f.is_file() and f.stat().st_size > 100)
    if damage == "delete a chunk":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:10])
    again = Pipeline(cfg).run(scan, out)
    assert again.reused == [] and "C00" in again.started_over
    assert again.started_over["C00"].startswith(f"the finished run's {store} changed")
    with open_scan(store) as m:
        np.testing.assert_array_equal(m.read_slab("C00", 0, m.shape[0]), before)
    assert Pipeline(cfg).run(scan, out).reused == ["C00"]   # intact again: reused


def test_other_closing_mesh_or_graph_settings_keep_pass_2_and_redo_only_the_later_stages(scan, tmp_path,
                                                                                          monkeypatch, capsys):
    """Tuning the mesh or the closings of a finished run must not cost its whole pass 2 again (hours on a
    large scan): the stores and measurement state of pass 2 are taken over, the later stages redone, and the
    result equals a fresh run with the new settings. Outputs of a stage now off do not stay behind."""
    from gpuheart import Pipeline, pipeline
    from gpuheart.cli import main

    first = _fast_cfg(mesh={"enabled": True})
    later = _fast_cfg(postprocess={"z_iterations": 2}, output={"tiff": True})
    out = tmp_path / "out"
    Pipeline(first).run(scan, out)
    assert (out / "C00" / "mesh.glb").is_file()
    Pipeline(later).run(scan, tmp_path / "ref")
    real = pipeline._process_slab

    def no_slabs(*a, **k):
        raise AssertionError("pass 2 was computed again")

    monkeypatch.setattr(pipeline, "_process_slab", no_slabs)
    r = Pipeline(later).run(scan, out)
    assert r.later_only == {"C00": "other settings (mesh.enabled True -> False, output.tiff False -> True, "
                                   "postprocess.z_iterations 5 -> 2)"}, r.later_only
    assert r.started_over == {} and r.reused == [] and r.resumed == {"C00": 40}
    assert not (out / "C00" / "mesh.glb").exists() and (out / "C00" / "mask.tif").is_file()
    _same_run(out, tmp_path / "ref")
    # and back: the first settings take over the same pass 2 again
    cfg_path = tmp_path / "first.toml"
    first.save(cfg_path)
    capsys.readouterr()
    assert main(["run", str(scan), "-o", str(out), "-c", str(cfg_path), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert (f"  C00: kept the preprocessing and segmentation of the earlier run in {out / 'C00'} and redid only "
            f"the closings, mesh and measurements (what changed does not alter the segmentation; a new truth mask "
            f"is scored against its stores): other settings") in said, said
    assert (out / "C00" / "mesh.glb").is_file() and not (out / "C00" / "mask.tif").exists()
    assert json.loads((out / "summary.json").read_text())["summary"]["this_run"]["later_stages_only"] == {
        "C00": "other settings (mesh.enabled False -> True, output.tiff True -> False, postprocess.z_iterations 2 -> 5)"}
    # killed in the closings after taking over: the same settings continue from the end of pass 2
    monkeypatch.setattr(pipeline, "_postprocess", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        Pipeline(later).run(scan, out)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "_process_slab", no_slabs)
    r = Pipeline(later).run(scan, out)
    assert r.resumed == {"C00": 40} and r.later_only == {} and r.started_over == {}
    _same_run(out, tmp_path / "ref")
    # a setting of pass 2 itself: computed from the start, as before
    monkeypatch.setattr(pipeline, "_process_slab", real)
    r = Pipeline(_fast_cfg(dom={"large": 13}, postprocess={"z_iterations": 2})).run(scan, out)
    assert r.later_only == {} and r.started_over["C00"].startswith("other settings (dom.large 15 -> 13")


def test_a_failed_segment_call_keeps_the_checkpoint_of_an_interrupted_one(scan, tmp_path, monkeypatch):
    """A mistyped option after a kill must not cost the interrupted segmentation: its work folder stays and
    the right call still continues from its checkpoint."""
    from gpuheart import Pipeline, pipeline
    from gpuheart.io import ScanError
    from gpuheart.pipeline import segment_work_dir

    cfg = _fast_cfg(checkpoint_seconds=0.0)
    out = tmp_path / "mask.tif"
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", _process_slab_killed_at(20))
        with pytest.raises(KeyboardInterrupt):
            Pipeline(cfg).segment(scan, out)
    work = segment_work_dir(out)
    assert work.is_dir()
    with pytest.raises(ScanError, match="unknown channel"):
        Pipeline(cfg).segment(scan, out, channel="C1")
    assert work.is_dir()
    Pipeline(cfg).segment(scan, out)
    p = Pipeline(cfg)
    assert not work.exists()
    # a call that fails before any checkpoint of its own leaves no folder
    with pytest.raises(ScanError, match="unknown channel"):
        p.segment(scan, tmp_path / "other.tif", channel="C1")
    assert not segment_work_dir(tmp_path / "other.tif").exists()


def test_a_second_run_into_the_folder_a_run_is_writing_is_refused(scan, tmp_path):
    """Two runs in one folder removed and rewrote each other's stores; the one finishing last reported the
    damage as its results."""
    from gpuheart import Pipeline, pipeline
    from gpuheart.pipeline import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    with pipeline._out_lock(out):   # what a running `gpuheart run -o out` holds
        with pytest.raises(ConfigError, match=f"another gpuheart run is writing in this folder \\(process {os.getpid()}\\)"):
            Pipeline(_fast_cfg()).run(scan, out)
        assert sorted(p.name for p in out.iterdir()) == [".gpuheart-lock"]
    assert Pipeline(_fast_cfg()).run(scan, out).outputs["C00"]   # released: the folder is free again


def test_a_second_segment_of_an_output_being_written_is_refused_by_its_name(scan, tmp_path, monkeypatch, capsys):
    """`gpuheart segment` while another writes the same output: it said "found an interrupted segmentation ...
    continuing it" and then refused the hidden work folder; now it refuses by the output's name, saying nothing
    of continuing, and the first one's work is left as it was."""
    from gpuheart import pipeline
    from gpuheart.cli import main
    from gpuheart.pipeline import segment_work_dir

    cfg_path = tmp_path / "fast.toml"
    _fast_cfg(checkpoint_seconds=0.0).save(cfg_path)
    out = tmp_path / "mask.tif"
    argv = ["segment", str(scan), "-o", str(out), "-c", str(cfg_path), "--no-progress"]
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", _process_slab_killed_at(20))
        assert main(argv) == 130   # an interrupted segmentation, as a running one leaves it
    capsys.readouterr()
    work = segment_work_dir(out)
    manifest = work / "C00" / ".resume" / "manifest.json"
    before = manifest.read_bytes()
    assert pipeline.lock_holder(work) is None
    with pipeline._out_lock(work):   # what the running `gpuheart segment` holds
        assert pipeline.lock_holder(work) == str(os.getpid())
        assert main(argv) != 0
        said = capsys.readouterr()
        assert "found an interrupted segmentation" not in said.out
        assert (f"{out}: another gpuheart segment is writing it (process {os.getpid()}, working in {work}); "
                f"wait for it to finish, or choose another output") in said.err
        assert manifest.read_bytes() == before and not out.exists()
    assert main(argv) == 0 and out.is_file()   # released: it continues
    assert "continued the interrupted segmentation at slice 20" in capsys.readouterr().out


def test_a_killed_run_continues_under_other_later_settings_and_a_slab_size_change_keeps_pass_2(scan, tmp_path,
                                                                                                 monkeypatch):
    """Killed in pass 2, then started with another closing setting: the slices done are kept (the setting acts
    after pass 2). A finished run's pass 2 is kept under another slab size too (it cuts pass 2, not what it
    computes); an unfinished one continues only at its own slab size (its checkpoints are slab-aligned)."""
    from gpuheart import Pipeline, pipeline

    first = _fast_cfg(checkpoint_seconds=0.0)
    later = _fast_cfg(checkpoint_seconds=0.0, postprocess={"z_iterations": 2})
    out = tmp_path / "out"
    Pipeline(later).run(scan, tmp_path / "ref")
    real = pipeline._process_slab
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", _process_slab_killed_at(20))
        with pytest.raises(KeyboardInterrupt):
            Pipeline(first).run(scan, out)
    computed = []

    def counted(x, z0, *a, **k):
        computed.append(z0)
        return real(x, z0, *a, **k)

    monkeypatch.setattr(pipeline, "_process_slab", counted)
    r = Pipeline(later).run(scan, out)
    assert min(computed) == 20 and r.resumed == {"C00": 20} and r.started_over == {}
    assert r.later_only == {"C00": "other settings (postprocess.z_iterations 5 -> 2)"}
    _same_run(out, tmp_path / "ref")
    computed.clear()
    r = Pipeline(_fast_cfg(postprocess={"z_iterations": 2}, slab_size=8)).run(scan, out)
    assert computed == [] and r.later_only == {"C00": "other settings (slab_size 4 -> 8)"}
    _same_run(out, tmp_path / "ref")
    # unfinished at slab size 4, continued at 8: pass 2 from slice 0
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", _process_slab_killed_at(20))
        with pytest.raises(KeyboardInterrupt):
            Pipeline(first).run(scan, tmp_path / "out2")
    computed.clear()
    r = Pipeline(_fast_cfg(slab_size=8)).run(scan, tmp_path / "out2")
    assert min(computed) == 0 and r.started_over["C00"].startswith("other settings (slab_size 4 -> 8")


def test_a_voxel_size_given_to_a_finished_run_keeps_its_pass_2_and_rewrites_the_stores_metadata(scan, tmp_path,
                                                                                                  monkeypatch):
    """`--voxel-size` added to a finished run changes no voxel of pass 2 (it enters only the stores'
    metadata, the mesh and the measurements in µm), so pass 2 is taken over, not computed again, and the
    taken-over stores say the new voxel size, as a fresh run's do."""
    from gpuheart import Pipeline, pipeline
    from gpuheart.io import open_scan

    out = tmp_path / "out"
    Pipeline(_fast_cfg()).run(scan, out)
    Pipeline(_fast_cfg(voxel_size=[3.0, 2.0, 2.0])).run(scan, tmp_path / "ref")
    real, computed = pipeline._process_slab, []

    def counted(x, z0, *a, **k):
        computed.append(z0)
        return real(x, z0, *a, **k)

    monkeypatch.setattr(pipeline, "_process_slab", counted)
    r = Pipeline(_fast_cfg(voxel_size=[3.0, 2.0, 2.0])).run(scan, out)
    assert computed == [] and r.later_only["C00"].startswith("other settings (voxel_size")
    _same_run(out, tmp_path / "ref")
    for name in ("preprocessed", "dom_mask", "mask"):
        with open_scan(out / "C00" / f"{name}.ome.zarr") as s:
            assert s.voxel_size == pytest.approx((3.0, 2.0, 2.0)) and s.channels == ["C00"], name


def test_a_truth_mask_added_to_or_dropped_from_a_finished_run_is_scored_from_its_stores(scan, tmp_path,
                                                                                        monkeypatch):
    """`--truth` added to a finished run scores pass 2's masks read back from their stores instead of computing
    pass 2 again; the summary and the report's truth figures equal a fresh run's with that truth. Dropped
    again, the scores and truth figures go, and the run equals one that never had a truth mask. A run killed
    in pass 2 is continued only with the truth it was scored against (its counts so far are of that one)."""
    from gpuheart import Pipeline, pipeline

    truth = {"C00": str(scan.parent / "truth" / "C00.tif")}
    out = tmp_path / "out"
    Pipeline(_fast_cfg()).run(scan, out)
    Pipeline(_fast_cfg()).run(scan, tmp_path / "ref0")
    Pipeline(_fast_cfg()).run(scan, tmp_path / "ref", truth=truth)
    real, computed = pipeline._process_slab, []

    def counted(x, z0, *a, **k):
        computed.append(z0)
        return real(x, z0, *a, **k)

    monkeypatch.setattr(pipeline, "_process_slab", counted)
    r = Pipeline(_fast_cfg()).run(scan, out, truth=truth)
    assert computed == [] and r.later_only["C00"].startswith("another truth mask (none -> ")
    assert r.summary["C00"]["dom_vs_truth"]["tp"] > 0
    _same_run(out, tmp_path / "ref")

    def figures(run):
        with np.load(run / "C00" / "figures.npz") as f:
            return {k: f[k] for k in f.files}

    got, ref = figures(out), figures(tmp_path / "ref")
    assert sorted(got) == sorted(ref) and "mip_truth" in got
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], k)
    r = Pipeline(_fast_cfg()).run(scan, out)
    assert computed == [] and "dom_vs_truth" not in r.summary["C00"]
    _same_run(out, tmp_path / "ref0")
    assert sorted(figures(out)) == sorted(figures(tmp_path / "ref0"))
    # killed in pass 2 without truth, then given one: pass 2 from slice 0, not half-scored
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_process_slab", _process_slab_killed_at(20))
        with pytest.raises(KeyboardInterrupt):
            Pipeline(_fast_cfg(checkpoint_seconds=0.0)).run(scan, tmp_path / "out2")
    computed.clear()
    r = Pipeline(_fast_cfg(checkpoint_seconds=0.0)).run(scan, tmp_path / "out2", truth=truth)
    assert min(computed) == 0 and r.started_over["C00"].startswith("another truth mask")
    _same_run(tmp_path / "out2", tmp_path / "ref")


def test_a_run_that_reuses_a_channel_keeps_the_record_of_what_computing_it_took(scan, tmp_path, capsys):
    """Rerun after a finished run, summary.json held only the rerun's seconds (a fraction of one), and the
    wall time and stage seconds of the run that computed the results were gone. They are carried in
    this_run.reused_from, through any number of reruns, and said on the console and in the report."""
    from gpuheart import Pipeline
    from gpuheart.cli import main
    from gpuheart.report import write_report

    out = tmp_path / "out"
    first = Pipeline(_fast_cfg()).run(scan, out)
    record = json.loads((out / "summary.json").read_text())
    for _ in range(2):
        again = Pipeline(_fast_cfg()).run(scan, out)
        assert again.reused == ["C00"]
        (was,) = again.summary["this_run"]["reused_from"]
        assert was["channels"] == ["C00"] and was["wall_s"] == record["summary"]["this_run"]["wall_s"]
        assert was["timings_s"] == pytest.approx(first.timings)
    assert "C00: computed by an earlier run of" in write_report(out).read_text()
    _fast_cfg().save(tmp_path / "fast.toml")
    capsys.readouterr()
    assert main(["run", str(scan), "-o", str(out), "-c", str(tmp_path / "fast.toml"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert (f"C00: reused the finished results of an earlier run with the same input and settings (that run took "
            f"{record['summary']['this_run']['wall_s']:.1f} s for C00; --restart") in said, said
    # a fresh computation records none
    assert Pipeline(_fast_cfg(dom={"large": 13})).run(scan, out).summary["this_run"]["reused_from"] == []
