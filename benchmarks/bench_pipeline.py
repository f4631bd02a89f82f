"""End-to-end throughput: the whole Pipeline on a large synthetic scan, per stage, with a projection
to the paper's full scan (2056 x 2048 x 2022, 3 channels).

script:  python benchmarks/bench_pipeline.py --slices 4 --size 2048 --channels 3 [--device auto]
                [--mesh] [--report] [--out benchmarks/results/<device>-pipeline.json]
pytest:  python -m pytest benchmarks/bench_pipeline.py   (test_pipeline_throughput: one round on a small
         scan; GPUHEART_BENCH_PIPELINE_SLICES / _SIZE change it)

What is timed. Setup (writing the phantom as per-slice TIFFs, in a child process so it does not count
towards this process's peak memory) is timed on its own. A warm-up run on the "tiny" phantom comes
first, so numba compilation and imports are not in the numbers. Then one ``Pipeline.run`` with the
default config (U-Net + DoM union; DoM only when no shipped weights exist), mesh and report off unless
asked. Per-stage seconds come from ``RunResult.timings``; the benchmark also times, by wrapping them at
run time, the work the pipeline does not charge to a stage (the per-channel accumulators that collect
summary numbers and figure images, the report, loading the U-Net), and reports what is left as "other".

Projections (labelled as such; nothing here measured a full scan):
- ``naive``: measured seconds per slice-channel x 2022 x 3 x (2056*2048 / size^2), the literal rule.
- ``by_stage``: per-slice stages scaled the same way; the z-closing scaled by the slices it really
  processes (at small N the edge padding of close_z, 20 slices per face, dominates: a 4-slice run
  closes 44 slices, the full scan ~1.45 per output slice); per-channel fixed costs ("report figures": figures.npz) scaled
  by pixels and channels only; the report and "other" kept as measured. Prefer this one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

# overlapped(stage): the stage ran in a background thread beside the others (backend.prefetch's read, the
# tree graphs): reported and projected, but not added to the totals; what it cost the critical path is
# "input wait" / "tree graph: wait"
from gpuheart.report import overlapped

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FULL_SCAN = {"shape_zyx": [2022, 2056, 2048], "channels": 3}

# stages whose cost does not grow with the number of slices (per channel, or per run)
PER_CHANNEL_FIXED = {"report figures"}  # figures.npz: per-channel projections, written once per channel
PER_RUN_FIXED = {"report", "[bench] report", "[bench] u-net load", "other (not timed by the pipeline)"}


def _conftest():
    """benchmarks/conftest.py, loaded by path (its machine_info is shared with pytest's hooks)."""
    mod = sys.modules.get("_gpuheart_bench_conftest")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_gpuheart_bench_conftest", HERE / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["_gpuheart_bench_conftest"] = mod
    return mod


# -- setup --------------------------------------------------------------------------------------

def write_scan(folder: Path, slices: int, size: int, in_process: bool = False) -> float:
    """Write the "large" phantom (slices x size x size, 3 channels) to ``folder``; returns seconds."""
    code = ("import sys; from gpuheart.phantom import PhantomConfig, write_phantom; "
            "n, s, f = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]; "
            "write_phantom(PhantomConfig.preset('large', shape=(n, s, s)), f, overwrite=True)")
    t = time.perf_counter()
    if in_process:
        from gpuheart.phantom import PhantomConfig, write_phantom

        write_phantom(PhantomConfig.preset("large", shape=(slices, size, size)), folder, overwrite=True)
    else:
        subprocess.run([sys.executable, "-c", code, str(slices), str(size), str(folder)], check=True,
                       cwd=str(HERE.parent))
    return time.perf_counter() - t


def make_config(device: str, channels: int, mesh: bool, report: bool, graph: bool = True):
    from gpuheart import PipelineConfig
    from gpuheart.unet import default_weights_path

    from gpuheart.pipeline import PHANTOM_CHANNEL_SETTINGS

    cfg = PipelineConfig(device=device, progress=False)
    cfg.channels = ["C00", "C01", "C02"][:channels]
    # the nerve channel with the nerve preset, as `gpuheart run` gives the built-in scan: with vessel settings
    # it was 12 % mask, and skeletonizing that junk was half of the run (C02, autofluorescence, has no preset)
    cfg.channel = dict(PHANTOM_CHANNEL_SETTINGS)
    cfg.mesh.enabled = mesh
    cfg.output.report = report
    if hasattr(cfg, "graph"):
        cfg.graph.enabled = graph
    note = None
    if cfg.uses_unet and not default_weights_path().is_file():
        cfg.segment.method = "dom"
        note = (f"no shipped U-Net weights at gpuheart/{default_weights_path().relative_to(default_weights_path().parents[1])}"
                f": segment.method = 'dom' (the U-Net stage is NOT in these numbers)")
    return cfg, note


# -- instrumentation of work the pipeline does not charge to a stage -----------------------------

@contextmanager
def instrumented(extra: dict):
    """Wrap, for the duration, the pipeline's untimed helpers so their seconds land in ``extra``."""
    import gpuheart.pipeline as P
    import gpuheart.report as R

    def timed(owner, name, stage):
        orig = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                extra[stage] = extra.get(stage, 0.0) + time.perf_counter() - t
        return orig, wrapper

    acc = P._ChannelAccumulator
    patches = [(acc, n, "[bench] accumulators") for n in ("add_raw", "add_normalized", "add", "summary")]  # add calls score
    # save_figures is the pipeline's own "report figures" stage; wrapping it too counted it twice
    patches += [(R, "write_report", "[bench] report"),
                (P, "_load_model", "[bench] u-net load")]
    saved = []
    for owner, name, stage in patches:
        orig, wrapper = timed(owner, name, stage)
        saved.append((owner, name, orig))
        setattr(owner, name, wrapper)
    try:
        yield extra
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


def device_memory(device: str) -> dict | None:
    if device != "cuda":
        return None
    out = {}
    try:
        import cupy as cp

        pool = cp.get_default_memory_pool()
        out["cupy_pool_total_mib"] = pool.total_bytes() / 2**20  # the pool keeps freed blocks: ~ high water
        out["cupy_pool_used_mib_at_end"] = pool.used_bytes() / 2**20
        out["cupy_pinned_pool_free_blocks"] = cp.get_default_pinned_memory_pool().n_free_blocks()
        free, total = cp.cuda.runtime.memGetInfo()
        out["device_used_mib_at_end"] = (total - free) / 2**20
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    try:
        import torch

        if torch.cuda.is_available():
            out["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception:
        pass
    return out


def reset_device_peaks(device: str):
    if device != "cuda":
        return
    try:
        import cupy as cp

        cp.get_default_memory_pool().free_all_blocks()
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:
        pass


def synchronize(device: str):
    if device == "cuda":
        import cupy as cp

        cp.cuda.Device().synchronize()


# -- the measurement -----------------------------------------------------------------------------

def closing_slices(nz: int, cfg) -> int:
    """Slices the streamed z-closing really processes for an ``nz``-slice scan: each slab plus its
    halo, plus close_z's edge padding at the volume's two faces (mirrors pipeline._postprocess and
    morphology.postprocess_slabs)."""
    from gpuheart.morphology import reach

    p = cfg.postprocess
    h = reach(p.z_size, p.z_iterations, p.size3d)
    pad = 2 * (p.z_size // 2) * p.z_iterations
    slab = max(cfg.slab_size, 4 * p.z_size * p.z_iterations)
    total = 0
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        a, b = max(0, z0 - h), min(nz, z1 + h)
        total += (b - a) + pad * (a == 0) + pad * (b == nz)
    return total


def run_pipeline(scan_dir: Path, out_dir: Path, cfg, trace_memory: bool = True) -> dict:
    """One timed Pipeline.run; returns total seconds, stage seconds, memory."""
    from gpuheart import Pipeline
    from gpuheart.backend import resolve_device

    device = resolve_device(cfg.device)
    reset_device_peaks(device)
    extra: dict[str, float] = {}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace_memory:
        tracemalloc.start()
    with instrumented(extra):
        synchronize(device)
        t = time.perf_counter()
        result = Pipeline(cfg).run(scan_dir, out_dir)
        synchronize(device)
        total = time.perf_counter() - t
    traced_peak = tracemalloc.get_traced_memory()[1] if trace_memory else None
    if trace_memory:
        tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stages = dict(result.timings)
    stages.update(extra)
    if "report" in stages and "[bench] report" in stages:  # the same work when RunResult has it
        stages.pop("[bench] report")
    stages["other (not timed by the pipeline)"] = max(0.0, total - sum(v for k, v in stages.items()
                                                                     if not overlapped(k)))
    return {"total_s": total, "stages_s": stages, "summary": result.summary, "device": device,
            "memory": {"ru_maxrss_mib": rss_after / 1024, "ru_maxrss_mib_before_run": rss_before / 1024,
                       "run_set_the_peak": rss_after > rss_before,
                       "tracemalloc_peak_mib": traced_peak / 2**20 if traced_peak is not None else None,
                       "device": device_memory(device)}}


def analyse(run: dict, slices: int, size: int, channels: int, cfg) -> dict:
    full_z, full_y, full_x = FULL_SCAN["shape_zyx"]
    full_c = FULL_SCAN["channels"]
    sc = slices * channels
    pixel_ratio = (full_y * full_x) / (size * size)
    per_slice_scale = (full_z * full_c) / sc * pixel_ratio
    close_scale = (closing_slices(full_z, cfg) * full_c) / (closing_slices(slices, cfg) * channels) * pixel_ratio
    # the skeleton works on the largest tree's box pooled to at most graph.max_voxels: at most that at full scale
    cap = getattr(getattr(cfg, "graph", None), "max_voxels", 50_000_000)
    skeleton_scale = full_c / channels * min(full_z * full_y * full_x, cap) / min(slices * size * size, cap)
    total = run["total_s"]
    rows, proj_total = [], 0.0
    for stage, s in sorted(run["stages_s"].items(), key=lambda kv: -kv[1]):
        if stage in PER_RUN_FIXED:
            scale, how = 1.0, "fixed per run"
        elif stage in PER_CHANNEL_FIXED:
            scale, how = full_c / channels * pixel_ratio, "per channel x pixels"
        elif stage == "closing":
            scale, how = close_scale, "slices processed incl. halo/padding x pixels"
        elif stage.startswith("tree graph: skeleton"):
            scale, how = skeleton_scale, "per channel x min(voxels, graph.max_voxels) (cost taken as proportional to the voxels skeletonized)"
        elif stage == "tree graph: wait":
            # a full scan's channel passes take far longer than a graph, so only the last channel's graph is
            # waited for: its labelling and skeleton as projected, over the channels
            graph_s = {k: v for k, v in run["stages_s"].items() if k.startswith("tree graph:") and k != stage}
            full = sum(v * (skeleton_scale if "skeleton" in k else per_slice_scale) for k, v in graph_s.items())
            scale = full / full_c / s if s > 0 else 0.0
            how = "the last channel's tree graph (labelling per slice, skeleton per min(voxels, graph.max_voxels))"
        else:
            scale, how = per_slice_scale, "per slice-channel x pixels"
        proj = s * scale
        if overlapped(stage):
            how += " (background thread, overlapped: not in the totals)"
        else:
            proj_total += proj
        rows.append({"stage": stage, "seconds": s, "share": s / total if total else 0.0,
                     "slices_per_s": sc / s if s > 0 else None, "ms_per_slice_channel": 1e3 * s / sc,
                     "projection_scaling": how, "projected_full_scan_s": proj})
    for r in rows:
        r["projected_share"] = (r["projected_full_scan_s"] / proj_total
                                if proj_total and not overlapped(r["stage"]) else 0.0)
    naive = total / sc * full_z * full_c * pixel_ratio
    dominant = rows[0]["stage"] if rows else None
    dominant_full = max(rows, key=lambda r: r["projected_full_scan_s"])["stage"] if rows else None
    return {
        "slice_channels": sc, "slices_per_s": sc / total, "seconds_per_slice_channel": total / sc,
        "stages": rows,
        "dominant_stage": dominant, "dominant_stage_share": rows[0]["share"] if rows else None,
        "projection": {
            "label": "PROJECTION, not a measurement: extrapolated from this run to the paper's full scan "
                     f"{full_x}x{full_y}x{full_z} x {full_c} channels",
            "full_scan": FULL_SCAN, "pixel_ratio": pixel_ratio,
            "naive_s": naive,
            "naive_rule": "measured seconds per slice-channel x 2022 x 3 x (2056*2048 / size^2)",
            "by_stage_s": proj_total,
            "by_stage_rule": "per-slice stages x 2022*3/(N*C) x pixel ratio; closing x (slices it processes, "
                             "full scan / this run) x pixel ratio; report figures (figures.npz) per channel x pixel ratio; "
                             "tree-graph skeleton per channel x min(voxels, graph.max_voxels) (in a background thread: "
                             "only the last channel's graph, as the 'wait'); report and 'other' fixed",
            "by_stage_without_tree_graph_s": proj_total - sum(r["projected_full_scan_s"] for r in rows
                                                              if r["stage"].startswith("tree graph")
                                                              and not overlapped(r["stage"])),
            "dominant_stage_full_scan": dominant_full,
            "gpu_goal_s": 120,
        },
    }


def scratch(workdir: str | None) -> Path:
    """A fresh folder for the scan and outputs, inside ``workdir`` (made if missing) or the system temp folder."""
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="gpuheart-bench-", dir=workdir))


def measure(slices: int, size: int, channels: int, device: str = "auto", mesh: bool = False,
            report: bool = False, workdir: str | None = None, keep: bool = False, trace_memory: bool = True,
            in_process_setup: bool = False, warmup: bool = True, graph: bool = True) -> dict:
    cfg, note = make_config(device, channels, mesh, report, graph)
    base = scratch(workdir)
    try:
        setup_s = write_scan(base / "input", slices, size, in_process=in_process_setup)
        scan_bytes = sum(f.stat().st_size for f in (base / "input" / "scan").iterdir())
        warm_s = None
        if warmup:
            from gpuheart import Pipeline
            from gpuheart.phantom import PhantomConfig, write_phantom

            t = time.perf_counter()
            write_phantom(PhantomConfig.preset("tiny"), base / "tiny", overwrite=True)
            Pipeline(cfg).run(base / "tiny" / "scan", base / "tiny-out")
            warm_s = time.perf_counter() - t
        run = run_pipeline(base / "input" / "scan", base / "out", cfg, trace_memory)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    info = _conftest().machine_info(device)
    a = analyse(run, slices, size, channels, cfg)
    return {
        "kind": "pipeline",
        "benchmark": "end-to-end Pipeline.run on the 'large' synthetic scan (per-slice TIFFs)",
        "device_label": info["device_label"], "device_name": info["device_name"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "scan": {"shape_zyx": [slices, size, size], "channels": channels, "dtype": "uint16",
                 "tiff_bytes": scan_bytes, "source": "gpuheart.phantom 'large' preset, write_phantom"},
        "config": {"device": run["device"], "segment_method": cfg.segment.method, "mesh": mesh, "report": report,
                   "graph": bool(getattr(getattr(cfg, "graph", None), "enabled", False)),
                   "slab_size": cfg.slab_size, "postprocess": cfg.postprocess.enabled,
                   "write_preprocessed": cfg.output.write_preprocessed,
                   "unet_tile": cfg.segment.tile, "unet_overlap": cfg.segment.overlap,
                   "channel_settings": cfg.channel},
        "notes": [n for n in [
            note,
            "setup (writing the scan) and a warm-up run on the tiny phantom are excluded from total_s",
            "tracemalloc was on during the run (it sees NumPy buffers, not numba/OpenCV/CuPy allocations)"
            if trace_memory else "tracemalloc off",
            "stages named [bench] ... are timed by this benchmark's wrappers, not by RunResult.timings",
            "the tree graph's labelling is projected per slice; its skeleton per channel, by the voxels it "
            "skeletonizes, which graph.max_voxels caps (an estimate: the scan's box stands in for the tree's)" if getattr(getattr(cfg, "graph", None),
                                                                                    "enabled", False) else None,
        ] if n],
        "setup_s": setup_s, "warmup_s": warm_s,
        "total_s": run["total_s"], **a,
        "memory": run["memory"],
        "summary_mask_fraction": {c: v.get("dom_mask_fraction") for c, v in run["summary"].items()
                                  if isinstance(v, dict) and "slices" in v},
    }


def compare_graph_background(slices: int, size: int, channels: int, pairs: int = 2, device: str = "auto",
                             workdir: str | None = None) -> dict:
    """The tree graph in a worker thread ([graph] background, the default) against in turn, on one scan,
    alternating (in turn first) so that drift in the machine's load falls on both; mesh on, as `gpuheart run`.
    The outputs are checked equal before any time is reported."""
    from dataclasses import replace

    cfg, note = make_config(device, channels, mesh=True, report=False)
    base = scratch(workdir)
    times: dict[str, list] = {"in turn": [], "background": []}
    stages: dict[str, list] = {"in turn": [], "background": []}
    try:
        write_scan(base / "input", slices, size)
        for i in range(pairs):
            for name, bg in (("in turn", False), ("background", True)):
                c = replace(cfg, graph=replace(cfg.graph, background=bg))
                run = run_pipeline(base / "input" / "scan", base / f"out-{name}-{i}".replace(" ", "-"), c, False)
                times[name].append(run["total_s"])
                stages[name].append({k: v for k, v in run["stages_s"].items() if k.startswith("tree graph")
                                     or k in ("mesh", "u-net")})
        for ch in cfg.channels:
            for f in ("tree_branches.csv", "tree.graphml", "voxel_components.csv"):
                a, b = (base / "out-in-turn-0" / ch / f), (base / "out-background-0" / ch / f)
                if a.exists() != b.exists() or (a.exists() and a.read_bytes() != b.read_bytes()):
                    raise AssertionError(f"{ch}/{f} differs between the two modes")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    info = _conftest().machine_info(device)
    best = {k: min(v) for k, v in times.items()}
    return {
        "kind": "pipeline-graph-overlap",
        "benchmark": "Pipeline.run with the tree graph in a worker thread ([graph] background = true) against "
                     "in turn (false), alternating on one scan; outputs checked equal",
        "device_label": info["device_label"], "device_name": info["device_name"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
        "scan": {"shape_zyx": [slices, size, size], "channels": channels},
        "config": {"segment_method": cfg.segment.method, "mesh": True, "channel_settings": cfg.channel},
        "notes": [n for n in [note, "each total_s is one whole run; the scan is written once, before"] if n],
        "total_s": times, "stages_s": stages, "best_s": best,
        "speedup_best": best["in turn"] / best["background"],
    }


def print_report(doc: dict):
    print(f"{doc['device_name']} ({doc['config']['device']}), scan {doc['scan']['shape_zyx']} x "
          f"{doc['scan']['channels']} ch, segment={doc['config']['segment_method']}")
    print(f"setup {doc['setup_s']:.1f} s (not counted); run {doc['total_s']:.1f} s = "
          f"{doc['slices_per_s']:.3f} slice-channels/s")
    print(f"{'stage':38s} {'s':>8s} {'share':>6s} {'slices/s':>9s} {'proj. full s':>12s}")
    for r in doc["stages"]:
        sps = f"{r['slices_per_s']:.2f}" if r["slices_per_s"] else "-"
        print(f"{r['stage']:38s} {r['seconds']:8.2f} {100 * r['share']:5.1f}% {sps:>9s} "
              f"{r['projected_full_scan_s']:12.0f}")
    p = doc["projection"]
    print(f"dominant stage: {doc['dominant_stage']} ({100 * doc['dominant_stage_share']:.0f}% of this run); "
          f"full scan: {p['dominant_stage_full_scan']}")
    print(f"PROJECTION for 2056x2048x2022 x 3 channels: by stage {p['by_stage_s'] / 3600:.1f} h, "
          f"naive {p['naive_s'] / 3600:.1f} h (GPU goal: {p['gpu_goal_s']} s)")
    m = doc["memory"]
    print(f"peak host memory: ru_maxrss {m['ru_maxrss_mib']:.0f} MiB, tracemalloc "
          f"{m['tracemalloc_peak_mib'] or 0:.0f} MiB; device: {m['device']}")
    for n in doc["notes"]:
        print("note:", n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048, help="y = x size of each slice")
    ap.add_argument("--channels", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--mesh", action="store_true", help="also run the mesh stage (off by default)")
    ap.add_argument("--report", action="store_true", help="also write report.html (off by default)")
    ap.add_argument("--no-graph", action="store_true", help="skip the tree-graph stage (on by default)")
    ap.add_argument("--out", help="JSON to write (default benchmarks/results/<device>-pipeline.json)")
    ap.add_argument("--workdir", help="where the temporary scan goes (default: the system temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary scan and outputs")
    ap.add_argument("--no-tracemalloc", action="store_true", help="do not trace NumPy allocations")
    ap.add_argument("--compare-graph-background", type=int, metavar="PAIRS",
                    help="instead: PAIRS alternating runs with the tree graph in turn and in a worker thread "
                         "(default out: benchmarks/results/<device>-pipeline-graph-overlap.json)")
    args = ap.parse_args(argv)
    from gpuheart.backend import DeviceError, resolve_device
    try:
        resolve_device(args.device)
    except DeviceError as err:   # one line, before any scan is written
        print(f"bench_pipeline: {err}", file=sys.stderr)
        return 2
    if args.compare_graph_background:
        doc = compare_graph_background(args.slices, args.size, args.channels, args.compare_graph_background,
                                       args.device, args.workdir)
        print(json.dumps({k: doc[k] for k in ("total_s", "best_s", "speedup_best")}, indent=1))
        out = Path(args.out) if args.out else RESULTS / f"{doc['device_label']}-pipeline-graph-overlap.json"
        out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {out}")
        return 0
    doc = measure(args.slices, args.size, args.channels, args.device, args.mesh, args.report, args.workdir,
                  args.keep, not args.no_tracemalloc, graph=not args.no_graph)
    print_report(doc)
    out = Path(args.out) if args.out else RESULTS / f"{doc['device_label']}-pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


# -- pytest-benchmark ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    n = int(os.environ.get("GPUHEART_BENCH_PIPELINE_SLICES", "4"))
    size = int(os.environ.get("GPUHEART_BENCH_PIPELINE_SIZE", "512"))
    folder = tmp_path_factory.mktemp("pipeline-bench") / "input"
    write_scan(folder, n, size, in_process=True)
    return folder / "scan", n, size


def test_pipeline_throughput(benchmark, small_scan, tmp_path):
    scan_dir, n, size = small_scan
    cfg, note = make_config("auto", 3, mesh=False, report=False)
    benchmark.group = "pipeline end-to-end"
    runs = []

    def once():
        out = tmp_path / f"out{len(runs)}"
        runs.append(run_pipeline(scan_dir, out, cfg, trace_memory=False))

    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    run = runs[-1]
    a = analyse(run, n, size, 3, cfg)
    benchmark.extra_info.update({
        "scan_zyx": [n, size, size], "channels": 3, "segment_method": cfg.segment.method, "note": note,
        "stages_s": run["stages_s"], "dominant_stage": a["dominant_stage"],
        "slice_channels_per_s": a["slices_per_s"], "projected_full_scan_s_by_stage": a["projection"]["by_stage_s"]})
    assert run["total_s"] > 0 and "stats (pass 1)" in run["stages_s"]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
