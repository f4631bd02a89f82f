"""The tree graph of a channel is computed in a worker thread while the next channel runs (#7: the
skeleton is CPU work that a GPU run would otherwise wait for)."""
import json
import threading

import pytest

from gpuheart import Pipeline, PipelineConfig, graph, pipeline
from gpuheart.io import usable_cores


def _cfg(background=True, **extra):
    return PipelineConfig.from_dict({"progress": False, "slab_size": 5, "segment": {"method": "dom"},
                                     "output": {"report": False}, "graph": {"background": background}, **extra})


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from gpuheart.phantom import PhantomConfig, write_phantom

    folder = tmp_path_factory.mktemp("ph") / "ph"
    write_phantom(PhantomConfig.preset("tiny"), folder)
    return folder / "scan"


def _run(scan, out, cfg):
    return Pipeline(cfg).run(scan, out, resume=False)


def _pause_c00_graph_until_c01_starts(monkeypatch, timeout=30.0):
    """C00's skeleton waits for C01's pass 1: it can only finish if the two overlap."""
    c01_started, seen = threading.Event(), {}
    real_stats, real_skeleton = pipeline._slice_stats, graph.skeleton_graph

    def stats(scan, channel, cfg):
        if channel == "C01":
            c01_started.set()
        return real_stats(scan, channel, cfg)

    def skeleton(*a, **k):
        if "thread" not in seen:
            seen["thread"] = threading.current_thread().name
            seen["overlapped"] = c01_started.wait(timeout)
        return real_skeleton(*a, **k)

    monkeypatch.setattr(pipeline, "_slice_stats", stats)
    monkeypatch.setattr(graph, "skeleton_graph", skeleton)
    return seen


def test_a_channels_tree_graph_overlaps_the_next_channel(scan, tmp_path, monkeypatch):
    seen = _pause_c00_graph_until_c01_starts(monkeypatch)
    result = _run(scan, tmp_path, _cfg(channels=["C00", "C01"]))
    assert seen["overlapped"], "C00's tree graph did not run while C01 was processed"
    assert seen["thread"].startswith("gpuheart-tree-graph")
    assert result.summary["C00"]["tree"]["n_branches"] > 0 and "tree_graphml" in result.outputs["C00"]
    # the checkpoints say done once the graph is in: a rerun reuses both channels
    assert Pipeline(_cfg(channels=["C00", "C01"])).run(scan, tmp_path).reused == ["C00", "C01"]


def test_without_background_the_graph_runs_in_the_channels_own_turn(scan, tmp_path, monkeypatch):
    seen = _pause_c00_graph_until_c01_starts(monkeypatch, timeout=0.5)
    _run(scan, tmp_path, _cfg(background=False, channels=["C00", "C01"]))
    assert not seen["overlapped"] and seen["thread"] == threading.current_thread().name


def test_background_and_inline_graphs_are_the_same_outputs(scan, tmp_path):
    a = _run(scan, tmp_path / "a", _cfg(True, channels=["C00", "C01"]))
    b = _run(scan, tmp_path / "b", _cfg(False, channels=["C00", "C01"]))
    for channel in ("C00", "C01"):
        assert set(a.outputs[channel]) == set(b.outputs[channel])
        for name in ("tree_branches", "tree_graphml", "voxel_components"):
            assert a.outputs[channel][name].read_bytes() == b.outputs[channel][name].read_bytes()
        assert a.summary[channel]["tree"] == b.summary[channel]["tree"]
        manifest = json.loads((tmp_path / "a" / channel / ".resume" / "manifest.json").read_text())
        assert manifest["done"]
        assert manifest["result"]["summary"]["tree"] == json.loads(json.dumps(a.summary[channel]["tree"]))


def test_an_interrupt_in_the_next_channel_still_finishes_the_channel_whose_graph_ran(scan, tmp_path,
                                                                                     monkeypatch):
    """Ctrl-C while C01 runs and C00's graph is being computed: the graph is waited for and C00 is
    finished, so the same command reuses it instead of redoing its closings and mesh."""
    graph_started = threading.Event()
    real_stats, real_skeleton = pipeline._slice_stats, graph.skeleton_graph

    def skeleton(*a, **k):
        graph_started.set()
        return real_skeleton(*a, **k)

    def stats(scan, channel, cfg):
        if channel == "C01":
            assert graph_started.wait(30)
            raise KeyboardInterrupt
        return real_stats(scan, channel, cfg)

    monkeypatch.setattr(pipeline, "_slice_stats", stats)
    monkeypatch.setattr(graph, "skeleton_graph", skeleton)
    cfg = _cfg(channels=["C00", "C01"])
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path)
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(pipeline, "_slice_stats", real_stats)
    again = Pipeline(cfg).run(scan, tmp_path)
    assert again.reused == ["C00"] and again.summary["C00"]["tree"]["n_branches"] > 0


def test_an_error_in_the_graph_is_the_runs_error_and_the_channel_is_not_finished(scan, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise MemoryError("no room for the skeleton")

    monkeypatch.setattr(graph, "skeleton_graph", broken)
    with pytest.raises(MemoryError, match="no room for the skeleton"):
        Pipeline(_cfg(channels=["C00", "C01"])).run(scan, tmp_path)
    assert not (tmp_path / "summary.json").exists()
    manifest = json.loads((tmp_path / "C00" / ".resume" / "manifest.json").read_text())
    assert not manifest.get("done")


def test_an_error_in_a_background_graph_names_its_channel(scan, tmp_path, monkeypatch, capsys):
    """Raised when the run next waits for it, maybe in a later channel's turn: it must not look like that
    channel's error."""
    from gpuheart import cli

    def broken(*a, **k):
        raise ValueError("the skeleton broke")

    monkeypatch.setattr(graph, "skeleton_graph", broken)
    with pytest.raises(ValueError, match="the skeleton broke") as info:
        Pipeline(_cfg(channels=["C00"])).run(scan, tmp_path / "py")
    assert any("C00's tree graph" in note for note in info.value.__notes__)
    assert cli.main(["run", str(scan), "-o", str(tmp_path / "cli"), "--channels", "C00", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "gpuheart: error: the skeleton broke; in C00's tree graph (computed in the background" in err


def test_the_background_setting_does_not_stop_a_rerun_from_reusing(scan, tmp_path):
    """It changes no output, so it is not part of what a resumed run must match."""
    _run(scan, tmp_path, _cfg(True, channels=["C00"]))
    assert Pipeline(_cfg(False, channels=["C00"])).run(scan, tmp_path).reused == ["C00"]


# -- interrupts (Ctrl-C) while a graph is in the worker ------------------------------------------------------


def _manifest(folder):
    return json.loads((folder / ".resume" / "manifest.json").read_text())


def test_ctrl_c_while_the_run_waits_for_the_last_graph_still_finishes_that_channel(scan, tmp_path, monkeypatch,
                                                                                   capfd):
    """A real SIGINT while the run waits for the last channel's graph: the graph is waited for (it was
    running), so its channel must be finished and reused by the same command, not redone."""
    import signal
    import time

    waiting, calls = threading.Event(), []
    real_wait, real_skeleton = pipeline.futures_wait, graph.skeleton_graph

    def futures_wait(fs, *a, **k):
        waiting.set()
        return real_wait(fs, *a, **k)

    def skeleton(*a, **k):
        calls.append(threading.current_thread().name)
        assert waiting.wait(30), "the run never waited for the graph"
        time.sleep(0.2)  # until it blocks: a signal just before that would wait for the graph to end
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C, to the waiting main thread
        time.sleep(1.0)  # a thinning long enough to be told about
        return real_skeleton(*a, **k)

    monkeypatch.setattr(pipeline, "futures_wait", futures_wait)
    monkeypatch.setattr(graph, "skeleton_graph", skeleton)
    # a suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and Python then
    # leaves it ignored: this test's Ctrl-C would never arrive. Python's own handler, for this test only
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = _cfg(channels=["C00"])
    try:
        Pipeline(cfg).run(scan, tmp_path)
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capfd.readouterr().err
    assert interrupted, f"the run was not interrupted; skeleton calls: {calls}, waited: {waiting.is_set()}, " \
                        f"stderr: {err[-2000:]}"
    assert calls and calls[0].startswith("gpuheart-tree-graph")
    assert (tmp_path / "C00" / "tree.graphml").exists()  # the graph ran to its end: it was waited for
    assert _manifest(tmp_path / "C00").get("done"), "C00's graph was waited for, but C00 was not finished"
    assert "waiting for C00's tree graph" in err
    monkeypatch.setattr(graph, "skeleton_graph", real_skeleton)
    again = Pipeline(cfg).run(scan, tmp_path)
    assert again.reused == ["C00"] and again.summary["C00"]["tree"]["n_branches"] > 0


def test_ctrl_c_in_a_channels_mesh_does_not_run_its_queued_graph(scan, tmp_path, monkeypatch):
    """C00's graph runs; C01's waits in the queue behind it; Ctrl-C in C01's mesh. C00's graph is waited
    for and C00 finished, but C01's graph, whose channel cannot be finished, must not start: the user
    would wait for a whole graph whose result is thrown away."""
    import time

    c01_mesh, calls = threading.Event(), []
    real_mesh, real_skeleton = pipeline._mesh, graph.skeleton_graph

    def mesh(mask, out, *a, **k):
        if out.name == "C01":
            c01_mesh.set()
            raise KeyboardInterrupt
        return real_mesh(mask, out, *a, **k)

    def skeleton(*a, **k):
        calls.append(a[0].shape)
        if len(calls) == 1:  # C00's: still running when C01's graph is queued and the interrupt comes
            assert c01_mesh.wait(30)
            time.sleep(0.5)
        return real_skeleton(*a, **k)

    monkeypatch.setattr(pipeline, "_mesh", mesh)
    monkeypatch.setattr(graph, "skeleton_graph", skeleton)
    cfg = _cfg(channels=["C00", "C01"], mesh={"enabled": True})
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path)
    assert len(calls) == 1, "C01's queued graph ran after the interrupt"
    assert not (tmp_path / "C01" / "tree.graphml").exists()
    assert _manifest(tmp_path / "C00").get("done") and not _manifest(tmp_path / "C01").get("done")


def test_ctrl_c_in_the_mesh_stops_the_channels_own_graph_at_its_next_slab(scan, tmp_path, monkeypatch):
    """Ctrl-C in C00's mesh while C00's graph labels its mask: C00 cannot be finished, so its graph is of
    no use; it must stop at its next slab instead of being waited for to its end (the skeleton)."""
    import time

    labelling, calls, reads = threading.Event(), [], []
    real_reader, real_skeleton = pipeline.mask_reader, graph.skeleton_graph

    def reader(m):
        read = real_reader(m)

        def slow(z0, z1):
            # the graph's worker, or the threads it labels slabs in
            if threading.current_thread().name.startswith(("gpuheart-tree-graph", "gpuheart-label")):
                reads.append((z0, z1))
                labelling.set()
                time.sleep(0.3)
            return read(z0, z1)
        return slow

    def mesh(*a, **k):
        assert labelling.wait(30)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "mask_reader", reader)
    monkeypatch.setattr(pipeline, "_mesh", mesh)
    monkeypatch.setattr(graph, "skeleton_graph", lambda *a, **k: calls.append(1) or real_skeleton(*a, **k))
    cfg = _cfg(channels=["C00"], mesh={"enabled": True})
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run(scan, tmp_path)
    # 16 slices in slabs of 5: 4 reads to label, more to cut out the tree; the graph stopped after the slabs
    # being read when the interrupt came (one, or one per labelling thread)
    workers = min(4, usable_cores())
    assert len(reads) <= max(2, workers) and not calls, f"the graph went on after the interrupt: {len(reads)} slabs read"
    assert not _manifest(tmp_path / "C00").get("done")


def test_a_process_interrupted_while_a_graph_runs_exits_without_waiting_for_it(tmp_path):
    """A second Ctrl-C while close() waits leaves the main thread with a graph still running. Python 3.13
    joins every non-daemon thread (a ThreadPoolExecutor's included) at exit, so `gpuheart run` hung until
    the thinning ended and a third Ctrl-C printed a traceback; the worker must not keep the process alive."""
    import subprocess
    import sys
    import time

    script = tmp_path / "s.py"
    script.write_text(
        "import time\n"
        "from gpuheart.pipeline import _TreeGraphs\n"
        "g = _TreeGraphs()\n"
        "g.start(lambda stop: time.sleep(30), True, 'C00')\n"  # a thinning that no stop reaches
        "time.sleep(0.5)\n"
        "raise SystemExit(130)\n")  # what main() does after the second KeyboardInterrupt
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert time.monotonic() - t0 < 15, "the process waited for the graph's thread at exit"
    assert "Traceback" not in proc.stderr
