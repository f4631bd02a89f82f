"""Pass 2 on a 2-worker Dask LocalCluster gives exactly the outputs of a local run."""
import json
import re

import numpy as np
import pytest

from gpuheart import Pipeline, PipelineConfig
from gpuheart.io import open_scan

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _summary(out):
    s = json.loads((out / "summary.json").read_text())["summary"]
    for ch in ("C00", "C01"):
        s[ch].get("mesh", {}).pop("path", None)
    return {ch: s[ch] for ch in ("C00", "C01")}


def test_dask_run_equals_local_run(client, tmp_path):
    from gpuheart.phantom import PhantomConfig, write_phantom

    ph = write_phantom(PhantomConfig.preset("tiny"), tmp_path / "ph")
    truth = {c: str(ph / "truth" / f"{c}.tif") for c in ("C00", "C01")}
    cfg = PipelineConfig.from_dict({"progress": False, "slab_size": 4, "channels": ["C00", "C01"],
                                    "segment": {"method": "dom"}, "output": {"report": False}})
    local = Pipeline(cfg).run(ph / "scan", tmp_path / "local", truth=truth)
    with distributed.get_task_stream(client) as ts:
        dist = Pipeline(cfg).run(ph / "scan", tmp_path / "dask", truth=truth, client=client)
    workers = {t["worker"] for t in ts.data if "_slab_task" in t["key"]}
    assert len([t for t in ts.data if "_slab_task" in t["key"]]) == 2 * 4  # 16 slices / 4 per slab, 2 channels
    assert len(workers) == 2
    for ch in ("C00", "C01"):
        for kind in ("preprocessed", "dom_mask", "mask"):
            with open_scan(local.outputs[ch][kind]) as a, open_scan(dist.outputs[ch][kind]) as b:
                np.testing.assert_array_equal(a.read_slab(0, 0, a.shape[0]), b.read_slab(0, 0, b.shape[0]))
    assert _summary(tmp_path / "local") == _summary(tmp_path / "dask")
    # the stage seconds of a Dask run are summed over its workers: the report must not call them the run's time
    assert "worker-seconds" in dist.summary["this_run"]["stage_seconds"]
    assert local.summary["this_run"]["stage_seconds"] == "wall clock"
    with np.load(local.out_dir / "C00" / "figures.npz") as fa, np.load(dist.out_dir / "C00" / "figures.npz") as fb:
        assert set(fa.files) == set(fb.files)
        for k in fa.files:
            np.testing.assert_array_equal(fa[k], fb[k])


def test_cli_dask_local(tmp_path, capsys):
    from gpuheart.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('slab_size = 8\n[segment]\nmethod = "dom"\n[mesh]\nenabled = false\n[output]\nreport = false\n')
    assert main(["run", "-o", str(tmp_path / "o"), "--phantom-preset", "tiny", "-c", str(cfg), "--dask", "local:2",
                 "--no-progress"]) == 0
    assert (tmp_path / "o" / "C00" / "mask.ome.zarr").is_dir()
    # the cluster's start is not in the run's wall time: said on its own line
    assert re.search(r"gpuheart: Dask cluster local:2 ready in \d+\.\d s", capsys.readouterr().out)


def test_dask_run_gives_a_2p5d_unet_its_z_halo(client, tmp_path):
    """Workers read their slab with the neighbouring slices a 2.5-D U-Net needs, as a local run does."""
    torch = pytest.importorskip("torch")
    from gpuheart.phantom import PhantomConfig, write_phantom
    from gpuheart.unet import UNet, save_weights

    ph = write_phantom(PhantomConfig.preset("tiny"), tmp_path / "ph")
    torch.manual_seed(0)
    w = save_weights(UNet(in_channels=3, width=4, depth=2, norm="group"), tmp_path / "w.pt", meta={"threshold": 0.5})
    cfg = PipelineConfig.from_dict({"progress": False, "slab_size": 4, "channels": ["C00"],
                                    "segment": {"method": "unet", "weights": str(w), "tile": 64, "overlap": 16},
                                    "output": {"report": False}, "mesh": {"enabled": False},
                                    "graph": {"enabled": False}})
    whole = Pipeline(PipelineConfig.from_dict({**cfg.to_dict(), "slab_size": 16})).run(ph / "scan", tmp_path / "whole")
    dist = Pipeline(cfg).run(ph / "scan", tmp_path / "dask", client=client)
    with open_scan(whole.outputs["C00"]["unet_mask"]) as a, open_scan(dist.outputs["C00"]["unet_mask"]) as b:
        x, y = a.read_slab(0, 0, a.shape[0]), b.read_slab(0, 0, b.shape[0])
    assert 0.01 < (x > 0).mean() < 0.99
    assert np.mean(x != y) < 1e-4   # float rounding at the threshold only (tiles batched differently)


# -- killed distributed runs -----------------------------------------------------------------------

KILL_CONFIG = """
slab_size = 2
checkpoint_seconds = 0.0
[segment]
method = "dom"
[output]
report = false
"""


@pytest.fixture(scope="module")
def scan40(tmp_path_factory):
    from gpuheart.phantom import PhantomConfig, write_phantom

    folder = tmp_path_factory.mktemp("ph40") / "ph"
    write_phantom(PhantomConfig.preset("default", shape=(40, 128, 128)), folder)
    return folder / "scan"


def _run_cmd(scan, out, cfg, *extra):
    import sys

    return [sys.executable, "-m", "gpuheart", "run", str(scan), "-o", str(out), "-c", str(cfg),
            "--channels", "C00", "--no-progress", *extra]


def _dask_run_reaching(cmd, out, z, what: str):
    """``cmd`` started in a session of its own (its process group: driver, scheduler, workers), returned once it
    has checkpointed slice ``z``; the test is skipped if it finished first."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not _wait_for_slice(proc, out, z):
        proc.communicate()
        pytest.skip(f"the run finished before it could be {what} (machine too fast for this test)")
    return proc


def _wait_for_slice(proc, out, z, timeout=180):
    """Poll the run's manifest until it has checkpointed slice ``z``; False if the run ended first."""
    import time

    manifest = out / "C00" / ".resume" / "manifest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(manifest.read_text()).get("next_z", 0) >= z:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return False


def _assert_same_outputs(ref, out):
    for name in ("preprocessed", "dom_mask", "mask"):
        with open_scan(ref / "C00" / f"{name}.ome.zarr") as a, open_scan(out / "C00" / f"{name}.ome.zarr") as b:
            np.testing.assert_array_equal(a.read_slab(0, 0, a.shape[0]), b.read_slab(0, 0, b.shape[0]))
    s = [json.loads((o / "summary.json").read_text())["summary"]["C00"] for o in (ref, out)]
    for x in s:
        x["mesh"].pop("path")
    assert s[0] == s[1]


@pytest.fixture(scope="module")
def local_reference(scan40, tmp_path_factory):
    import subprocess

    d = tmp_path_factory.mktemp("ref")
    cfg = d / "c.toml"
    cfg.write_text(KILL_CONFIG)
    subprocess.run(_run_cmd(scan40, d / "ref", cfg), check=True, capture_output=True)
    return d / "ref", cfg


def test_sigkill_of_a_dask_run_then_same_command_resumes_and_equals_a_local_run(scan40, local_reference, tmp_path):
    """The whole process group (driver, scheduler, workers) killed as a batch system kills a job; the same
    command then continues from the driver's last checkpoint, and the outputs equal an uninterrupted local run."""
    import os
    import signal
    import subprocess

    psutil = pytest.importorskip("psutil")
    ref, cfg = local_reference
    out = tmp_path / "out"
    cmd = _run_cmd(scan40, out, cfg, "--dask", "local:2")
    proc = _dask_run_reaching(cmd, out, 10, "killed")
    children = psutil.Process(proc.pid).children(recursive=True)
    group = [proc.pid] + [c.pid for c in children]
    assert len(_workers(children)) >= 2, [c.cmdline() for c in children]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    gone, alive = psutil.wait_procs([p for p in map(_proc, group) if p], timeout=10)
    assert not alive, f"processes of the killed run still alive: {alive}"
    at = (out / "C00" / ".resume" / "manifest.json").read_text()[:300]
    assert not (out / "summary.json").exists(), at
    assert not (out / "C00" / "mask.ome.zarr").exists(), at   # nothing that looks complete

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, f"killed at {at}\n{again.stdout}\n{again.stderr}"
    assert "resumed an interrupted run at slice" in again.stdout, f"killed at {at}\n{again.stdout}"
    _assert_same_outputs(ref, out)


def _workers(children):
    """Dask worker processes among a driver's children (multiprocessing's resource tracker is not one)."""
    out = []
    for c in children:
        try:
            if "spawn_main" in " ".join(c.cmdline()):
                out.append(c)
        except Exception:  # noqa: BLE001 - a child that just exited
            pass
    return out


def _proc(pid):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_a_worker_killed_mid_run_is_replaced_and_the_output_equals_a_local_run(scan40, local_reference, tmp_path):
    """SIGKILL to one worker process while slabs are in flight: Dask's nanny restarts it and reruns its
    tasks (a slab rewritten whole, as a task writes every slice of it), so the run completes unchanged."""
    import os
    import signal
    import time

    psutil = pytest.importorskip("psutil")
    ref, cfg = local_reference
    out = tmp_path / "out"
    proc = _dask_run_reaching(_run_cmd(scan40, out, cfg, "--dask", "local:2"), out, 6, "a worker killed")
    children = psutil.Process(proc.pid).children(recursive=True)
    workers = _workers(children)
    assert len(workers) == 2, [c.cmdline() for c in children]
    os.kill(workers[0].pid, signal.SIGKILL)
    replaced = False   # the nanny starts a new worker process in the killed one's place
    while proc.poll() is None and not replaced:
        try:
            now = {c.pid for c in _workers(psutil.Process(proc.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            break
        replaced = bool(now - {w.pid for w in workers})
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{stdout}\n{stderr}"
    assert "resumed" not in stdout
    assert replaced or "restart" in stderr.lower(), "the killed worker was not replaced"
    _assert_same_outputs(ref, out)


def test_a_dask_run_ends_without_dask_shutdown_logs(scan40, tmp_path):
    """The cluster `--dask local:N` starts is closed by gpuheart, not left to the interpreter's exit, where its
    nannies killed workers still shutting down and logged "Worker process still alive ... killing" after every run."""
    import subprocess

    cfg = tmp_path / "c.toml"
    cfg.write_text(KILL_CONFIG.replace("slab_size = 2", "slab_size = 20"))
    done = subprocess.run(_run_cmd(scan40, tmp_path / "out", cfg, "--dask", "local:2"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "distributed." not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_ctrl_c_of_a_dask_run_prints_only_gpuheart_s_message(scan40, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group (driver, nannies, workers). The workers' logs of
    the slabs cancelled under them, and their tracebacks, used to surround gpuheart's one-line message."""
    import os
    import signal

    cfg = tmp_path / "c.toml"
    cfg.write_text(KILL_CONFIG)
    out = tmp_path / "out"
    proc = _dask_run_reaching(_run_cmd(scan40, out, cfg, "--dask", "local:2"), out, 6, "interrupted")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted; the same command continues" in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == [ln for ln in lines if ln.startswith("gpuheart:")], stderr


def test_the_cluster_gpuheart_starts_is_closed_when_its_client_fails(monkeypatch):
    """A Client that cannot connect to the cluster just started must not leave the cluster's workers running."""
    from gpuheart import cli

    closed = []
    cluster = type("Cluster", (), {"close": lambda self, timeout=None: closed.append(timeout)})()

    def refuse(_):
        raise OSError("cannot connect")

    monkeypatch.setattr(distributed, "Client", refuse)
    with pytest.raises(OSError, match="cannot connect"):
        with cli._local_client(lambda: cluster):
            pass
    assert closed == [30]


def test_ctrl_c_pressed_again_while_closing_still_closes_the_cluster(monkeypatch):
    from gpuheart import cli

    closed = []
    cluster = type("Cluster", (), {"close": lambda self, timeout=None: closed.append(timeout)})()

    class Client:
        def __init__(self, _):
            pass

        def run(self, fn):
            raise KeyboardInterrupt   # the second Ctrl-C

        def close(self, timeout=None):
            raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "Client", Client)
    with pytest.raises(KeyboardInterrupt):
        with cli._local_client(lambda: cluster):
            raise KeyboardInterrupt
    assert closed == [5]
    closed.clear()
    with pytest.raises(KeyboardInterrupt):   # a Ctrl-C while a finished run closes its cluster
        with cli._local_client(lambda: cluster):
            pass
    assert closed == [30]
