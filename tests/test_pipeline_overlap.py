"""The tree graph of a channel is computed in a worker thread while the next channel runs (#7: the
skeleton is CPU work that a GPU run would otherwise wait for)."""
import json
import threading

import pytest

from gpuheart import Pipeline, PipelineConfig, graph, pipeline


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


def test_the_background_setting_does_not_stop_a_rerun_from_reusing(scan, tmp_path):
    """It changes no output, so it is not part of what a resumed run must match."""
    _run(scan, tmp_path, _cfg(True, channels=["C00"]))
    assert Pipeline(_cfg(False, channels=["C00"])).run(scan, tmp_path).reused == ["C00"]
