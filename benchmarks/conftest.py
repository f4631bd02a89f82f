"""Benchmark session plumbing: describe the machine, and keep every measured run.

At the end of a ``pytest benchmarks/`` session that measured anything (not with ``--benchmark-disable``),
this writes

    benchmarks/results/<device>-<date>.json   machine + device name + pytest-benchmark stats per test
    benchmarks/results/<device>-<date>.md     the same as a markdown table

``<device>`` is ``cpu`` without CUDA, else the GPU's name as a slug (``nvidia-h100-80gb-hbm3``).
A second run on the same day and device is merged into the same files (a test measured again replaces
its earlier entry), so running one benchmark file at a time still builds one day's table.
Set ``GPUHEART_BENCH_NO_SAVE=1`` to write nothing; ``GPUHEART_BENCH_RESULTS=DIR`` writes elsewhere.

It also adds the same machine description to pytest-benchmark's own ``--benchmark-json`` /
``--benchmark-autosave`` output (``pytest_benchmark_update_machine_info``).

``machine_info()`` is shared with the script modes (``bench_pipeline.py`` loads this file by path).
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# -- machine / device description -----------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict | None:
    """Name, memory and compute capability of CUDA device 0, or None without CUDA."""
    try:
        from gpuheart.backend import cuda_available

        if not cuda_available():
            return None
        import cupy as cp

        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return {"name": name, "id": dev.id, "total_memory_gib": props["totalGlobalMem"] / 2**30,
                "compute_capability": f"{props['major']}.{props['minor']}",
                "multiprocessors": props["multiProcessorCount"],
                "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                "driver": cp.cuda.runtime.driverGetVersion(), "cupy": cp.__version__}
    except Exception as err:  # a broken CUDA install must not break a CPU benchmark run
        return {"error": f"{type(err).__name__}: {err}"} if "cupy" in sys.modules else None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "skimage", "cv2", "numba", "torch", "cupy", "cucim", "pytest_benchmark"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except Exception:
                continue
        out[name] = getattr(mod, "__version__", "?")
    return out


def machine_info(device: str = "auto") -> dict:
    """Where a benchmark ran. ``device`` is the pipeline's device ("auto" | "cpu" | "cuda")."""
    from gpuheart.backend import resolve_device

    dev = resolve_device(device)
    gpu = gpu_info() if dev == "cuda" else None
    gpu_name = (gpu or {}).get("name")
    return {
        "device": dev,
        "device_label": slug(gpu_name) if gpu_name else "cpu",
        "device_name": gpu_name or cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "gpu": gpu,
        "versions": _versions(),
    }


def module_at(rev: str, name: str):
    """``gpuheart/<name>.py`` of git revision ``rev``, imported as a module of the gpuheart package (for
    benchmarks that time the current code against an older commit's, alternating, in one process)."""
    import importlib.util
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:gpuheart/{name}.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix=f"gpuheart-{name}-rev-")) / f"{name}_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"gpuheart._{name}_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "gpuheart"
    sys.modules[spec.name] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# -- pytest-benchmark hooks -----------------------------------------------------------------------

def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: F811 (hook, not the function)
    info = globals()["machine_info"]()
    machine_info["gpuheart"] = info


_written = {"n": 0}   # benchmark entries already written by this session


def pytest_runtest_logfinish(nodeid, location):
    """Write what is measured so far after each benchmark, so a run stopped by a time limit (the GPU
    session's steps have one) keeps its finished entries; the file merges entries by name."""
    config = _config.get("config")
    if config is not None:
        _save(config, final=False)


_config: dict = {}


def pytest_configure(config):
    _config["config"] = config


def pytest_sessionfinish(session, exitstatus):
    """Write the day's results for this device (pytest-benchmark's own hook wrapper has already
    computed the stats; with --benchmark-disable there are none and nothing is written)."""
    _save(session.config, final=True)


def _save(config, final: bool):
    if os.environ.get("GPUHEART_BENCH_NO_SAVE"):
        return
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or getattr(bs, "disabled", False):
        return
    if not final and len(getattr(bs, "benchmarks", [])) == _written["n"]:
        return   # no new entry since the last write
    _written["n"] = len(getattr(bs, "benchmarks", []))
    rows = []
    for bench in getattr(bs, "benchmarks", []):
        try:
            if bench.has_error or not bench.stats or not bench.stats.data:
                continue
            d = bench.as_dict(include_data=False)
        except Exception:
            continue
        rows.append({"fullname": d["fullname"], "name": d["name"], "group": d["group"],
                     "params": _plain(d.get("params")), "extra_info": _plain(d.get("extra_info")),
                     "stats": {k: d["stats"].get(k) for k in
                               ("min", "max", "mean", "stddev", "median", "iqr", "rounds", "iterations", "ops")}})
    if not rows:
        return
    try:
        write_session(rows, quiet=not final)
    except Exception as err:  # never turn a finished benchmark run into a failure
        print(f"\nbenchmarks/conftest.py: could not write results: {type(err).__name__}: {err}", file=sys.stderr)


def _plain(x):
    return json.loads(json.dumps(x, default=str)) if x is not None else None


def write_session(rows: list[dict], out_dir: Path | None = None, quiet: bool = False) -> Path:
    out_dir = Path(os.environ.get("GPUHEART_BENCH_RESULTS") or out_dir or RESULTS)
    info = machine_info()
    date = time.strftime("%Y-%m-%d")
    path = out_dir / f"{info['device_label']}-{date}.json"
    old = {}
    if path.is_file():
        try:
            old = {b["fullname"]: b for b in json.loads(path.read_text()).get("benchmarks", [])}
        except (ValueError, KeyError, TypeError):
            old = {}
    for r in rows:
        old[r["fullname"]] = dict(r, measured=time.strftime("%Y-%m-%d %H:%M:%S"))
    doc = {"kind": "pytest-benchmark", "device_label": info["device_label"], "device_name": info["device_name"],
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info,
           "note": "pytest-benchmark stats in seconds per call; entries measured in several sessions of the "
                   "same day are merged (see 'measured')",
           "benchmarks": sorted(old.values(), key=lambda b: (b.get("group") or "", b["fullname"]))}
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(doc, indent=2) + "\n")
    _atomic_write(path.with_suffix(".md"), markdown_table(doc))
    if not quiet:
        print(f"\nbenchmarks/conftest.py: wrote {path} and {path.with_suffix('.md').name}")
    return path


def fmt_seconds(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def markdown_table(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# pytest-benchmark results: {doc['device_name']} ({doc['device_label']})", "",
             f"Measured {doc['date']} on {m['cpu_model']} ({m['cpu_count']} cores, load {m['load_avg_1min']:.1f} "
             f"at the end), {m['platform']}.", "",
             "| group | test | min | median | mean | rounds |", "|---|---|---|---|---|---|"]
    for b in doc["benchmarks"]:
        s = b["stats"]
        lines.append(f"| {b.get('group') or ''} | `{b['name']}` | {fmt_seconds(s['min'])} | {fmt_seconds(s['median'])} "
                     f"| {fmt_seconds(s['mean'])} | {s['rounds']} |")
    return "\n".join(lines) + "\n"


def write_result(doc: dict, out) -> Path:
    """A script benchmark's JSON result at ``out`` (folders made, written atomically), said on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
