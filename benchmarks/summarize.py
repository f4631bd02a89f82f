"""Regenerate docs/benchmarks.md from every benchmarks/results/*.json.

    python benchmarks/summarize.py [--results benchmarks/results] [--out docs/benchmarks.md]

Knows the formats written by bench_filters.py (median), bench_morphology.py (closings), bench_exposure.py
(CLAHE), bench_io.py, bench_mesh.py, bench_mesh_stage.py, bench_pipeline.py (kinds "pipeline", "pipeline-graph-overlap") and benchmarks/conftest.py (kind "pytest-benchmark", one file per
device and day); other JSON files are listed by name. One section per device, newest result of each
kind first; every table says where and when it was measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

GPU_GOALS = [  # from the project's issues; targets, not results
    ("median 15x15, one 2048x2048 slice on the device", "<= 0.5 ms", "H100"),
    ("median 3x3, one 2048x2048 slice on the device", "<= 0.05 ms", "H100"),
    ("CLAHE, one 2048x2048 slice on the device", "<= 0.5 ms", "H100"),
    ("per-slice chain (preprocessing + difference of medians + threshold)", "<= 3 ms", "H100"),
    ("full scan 2056x2048x2022 x 3 channels, end to end", "< 2 minutes", "H100"),
]


# -- reading -----------------------------------------------------------------------------------------

def kind_of(doc: dict, path: Path) -> str:
    if doc.get("kind") in ("pipeline", "pytest-benchmark", "pipeline-graph-overlap", "gpu-profile", "gil",
                           "clahe-bin-table", "pipeline-ab", "thin", "mesh-export"):
        return doc["kind"]
    if str(doc.get("benchmark", "")).startswith("mesh.mesh_from_mask"):
        return "mesh-stage"
    if str(doc.get("benchmark", "")).startswith("label_slabs"):
        return "label"
    if str(doc.get("benchmark", "")).startswith("median filter"):
        return "median"
    if str(doc.get("benchmark", "")).startswith("binary closings"):
        return "morphology"
    if str(doc.get("benchmark", "")).startswith("read_slab"):
        return "io"
    if "clahe" in doc and isinstance(doc.get("results"), dict):
        return "clahe"
    if "slab_size" in doc and "slabwise_s" in doc.get("results", {}):
        return "mesh"
    if "tiles_per_s" in doc:
        return "unet"
    if "per_stack" in doc and "after" in doc.get("mean_dice", {}):
        return "finetune"
    if "per_stack" in doc and "unet" in doc.get("mean_dice", {}):
        return "accuracy"
    if "mean_dice_closings" in doc:
        return "closings"
    if "per_stack" in doc and "at_best_threshold" in doc.get("mean", {}):
        return "probe"
    if isinstance(doc.get("runs"), dict) and all("tile256_calibrated" in r.get("mean", {}) for r in doc["runs"].values()):
        return "tiles"
    if isinstance(doc.get("runs"), dict) and all("x1.0" in r.get("mean", {}) for r in doc["runs"].values()):
        return "scales"
    if "per_stack" in doc and "hyst_3d_leave_one_out" in doc.get("mean", {}):
        return "hysteresis"
    if "per_stack" in doc and "unet_2d_leave_one_out" in doc.get("mean", {}):
        return "support"
    if "three_planes" in doc and "mean_ensemble" in doc:
        return "combine"
    if "per_stack" in doc and "gpuheart_skeleton" in str(doc.get("per_stack")):
        return "cldice-skeleton"
    if "benchmarks" in doc and "machine_info" in doc:  # a raw --benchmark-json file
        return "pytest-benchmark-raw"
    return "unknown"


def device_of(doc: dict, path: Path) -> str:
    if doc.get("device_label"):
        return doc["device_label"]
    gh = (doc.get("machine_info") or {}).get("gpuheart") or {}
    if gh.get("device_label"):
        return gh["device_label"]
    return path.stem.split("-")[0]  # cpu-filters.json -> cpu


def when(doc: dict) -> str:
    d = doc.get("date") or (doc.get("datetime") or "")
    try:
        return datetime.fromisoformat(str(d).replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(d) or "unknown date"


def load(results: Path) -> list[dict]:
    out = []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"skipping {path.name}: {err}", file=sys.stderr)
            continue
        if not isinstance(doc, dict):
            continue
        out.append({"path": path, "doc": doc, "kind": kind_of(doc, path), "device": device_of(doc, path),
                    "when": when(doc)})
    return out


# -- formatting ----------------------------------------------------------------------------------------

def ms(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e3:.3f} ms"
    if s < 10:
        return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
    return f"{s:.1f} s"


def dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def mean3(values) -> str:
    """The mean of per-stack scores to three decimals, from the scores themselves (stored to four): a JSON's
    own mean is already rounded to four, and rounding that again gave 0.670 for a mean of 0.67054."""
    values = [Decimal(str(v)) for v in values]
    return str((sum(values) / len(values)).quantize(Decimal("0.001"), ROUND_HALF_EVEN))


# the day [segment] tile stopped defaulting to 256 (now the model's training tile; docs/accuracy.md)
TILE_DEFAULT_CHANGED = "2026-11-26T14:05"


def unet_tile(d: dict) -> str:
    """Which inference tile a pipeline result's U-Net ran on; results from before the change do not say."""
    c = d["config"]
    if c.get("segment_method") not in ("unet", "union"):
        return ""
    if "unet_tile" in c:
        return (" on the model's training tile (128 for the shipped one)" if c["unet_tile"] == 0
                else f" on {c['unet_tile']}-pixel tiles")
    if d.get("date", "") < TILE_DEFAULT_CHANGED:
        return (" on 256-pixel U-Net tiles (the default until 2026-11-26; now the model's training tile, 128: "
                "see the U-Net section)")
    return ""


def tiles_then(d: dict) -> str:
    """Accuracy results scored before the training-tile default predicted on 256-pixel tiles; say so."""
    return ", U-Net on 256-pixel tiles (the default then)" if d.get("date", "") < TILE_DEFAULT_CHANGED else ""


def machine_line(doc: dict) -> str:
    m = doc.get("machine") or {}
    cpu = m.get("cpu_model") or m.get("processor") or m.get("machine") or "unknown CPU"
    bits = [f"{cpu}, {m.get('cpu_count', '?')} cores"]
    if m.get("load_avg_1min") is not None:
        bits.append(f"load average {m['load_avg_1min']:.1f}")
    if (m.get("gpu") or {}).get("name"):
        bits.insert(0, m["gpu"]["name"])
    return "; ".join(bits)


def src(entry) -> str:
    return f"`benchmarks/results/{entry['path'].name}`"


# -- sections ----------------------------------------------------------------------------------------

def _paragraph(title: str, text: str) -> list[str]:
    """A section of one paragraph under a ### heading."""
    return [f"### {title}", "", text, ""]


def section_pipeline(e) -> list[str]:
    d = e["doc"]
    z, y, x = d["scan"]["shape_zyx"]
    c = d["scan"]["channels"]
    p = d["projection"]
    mem = d["memory"]
    out = ["### Pipeline throughput, end to end",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}). Scan: {z} slices of {y}x{x} uint16 x {c} "
           f"channels (synthetic 'large' phantom, per-slice TIFFs); device `{d['config']['device']}`, "
           f"segmentation `{d['config']['segment_method']}`{unet_tile(d)}, mesh {'on' if d['config']['mesh'] else 'off'}, "
           f"report {'on' if d['config']['report'] else 'off'}"
           + (f", tree graph {'on' if d['config']['graph'] else 'off'}" if "graph" in d["config"] else "")
           + "".join(f"; {ch} with the `{v['preset']}` preset" for ch, v in
                     (d["config"].get("channel_settings") or {}).items() if "preset" in v) + ".",
           "",
           f"Run: **{d['total_s']:.1f} s** for {d['slice_channels']} slice-channels = "
           f"{d['slices_per_s']:.3f} slice-channels/s ({d['seconds_per_slice_channel']:.2f} s each). "
           f"Writing the scan (setup, not counted): {d['setup_s']:.1f} s. Dominant stage: **{d['dominant_stage']}** "
           f"({100 * d['dominant_stage_share']:.0f}% of this run); projected to the full scan: "
           f"**{p['dominant_stage_full_scan']}**.",
           "",
           "| stage | seconds | share | slice-channels/s | ms per slice-channel | projected full scan | scaled as |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in d["stages"]:
        sps = f"{r['slices_per_s']:.2f}" if r.get("slices_per_s") and r["seconds"] >= 1e-3 else "-"
        out.append(f"| {r['stage']} | {r['seconds']:.2f} | {100 * r['share']:.1f}% | {sps} | "
                   f"{r['ms_per_slice_channel']:.0f} | {dur(r['projected_full_scan_s'])} | {r['projection_scaling']} |")
    out += ["",
            f"**Projection, not a measurement** - the paper's full scan, 2056x2048x2022 x 3 channels, on this "
            f"machine: **{dur(p['by_stage_s'])}** by stage ({p['by_stage_rule']}); "
            f"{dur(p['naive_s'])} by the naive rule ({p['naive_rule']})"
            + (f"; {dur(p['by_stage_without_tree_graph_s'])} by stage without the tree graph (a measurement "
               f"stage, after the mesh)" if p.get("by_stage_without_tree_graph_s") else "")
            + ". The GPU goal is "
            f"{dur(p['gpu_goal_s'])}. Projections assume per-slice costs grow with the pixel count; measure at "
            f"2048x2048 (from smaller slices they overestimate) and with more slices when you can (the z-closing's "
            f"edge padding and the per-channel figures are a large share of a few-slice run)."
            + (" The mesh stage is scaled per slice here, which overstates it: a full scan's masks give more faces "
               "than `[mesh] max_memory_faces` and take the block-mean path: two streamed passes over the mask (one "
               "more for each block factor whose mesh is still over the budget) and at most that many faces to "
               "measure and write (a whole 2022x2048x2048 mask through it: "
               "`cpu-mesh-stage-sparse-fullscan.json`, in the mesh-stage sections)."
               if any(r["stage"] == "mesh" for r in d["stages"]) else ""),
            "",
            f"Peak host memory: {mem['ru_maxrss_mib']:.0f} MiB resident (ru_maxrss"
            f"{', set during the run' if mem.get('run_set_the_peak') else ''}); "
            + (f"{mem['tracemalloc_peak_mib']:.0f} MiB of NumPy buffers at once (tracemalloc peak)"
               if mem.get("tracemalloc_peak_mib") is not None else "tracemalloc off")
            + (f"; device: {', '.join(f'{k} {v:.0f}' for k, v in mem['device'].items() if isinstance(v, float))}"
               if mem.get("device") else "") + "."]
    for n in d.get("notes", []):
        out.append(f"- {n}")
    return out + [""]


def section_median(e) -> list[str]:
    d = e["doc"]
    out = ["### Median filter, one 2048x2048 slice",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d.get('benchmark', '')}; "
           f"{d.get('note', '')}.",
           "",
           "| dtype | window | gpuheart | scipy.ndimage | OpenCV | gpuheart speed-up vs scipy | gpuheart time / OpenCV time |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        t = r["seconds"]
        oc = f"{r['ratio_to_opencv']:.2f}" if r.get("ratio_to_opencv") else "- (no OpenCV path)"
        out.append(f"| {r['dtype']} | {r['size']}x{r['size']} | {ms(t.get('gpuheart'))} | {ms(t.get('scipy'))} | "
                   f"{ms(t.get('opencv'))} | {r['speedup_vs_scipy']:.0f}x | {oc} |")
    return out + [""]


def section_morphology(e) -> list[str]:
    d = e["doc"]
    out = ["### Closings (pass 3), a vessel-like mask",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d.get('benchmark', '')}; {d.get('note', '')}. "
           "The SciPy baseline: edge-pad, `binary_dilation` then `binary_erosion` with `iterations`, crop.",
           "",
           "| mask (z, y, x) | foreground before -> after | gpuheart | scipy.ndimage | speed-up |",
           "|---|---|---:|---:|---:|"]
    for r in d["results"]:
        t = r["seconds"]
        out.append(f"| {'x'.join(map(str, r['shape_zyx']))} | {r['foreground_before']:.1%} -> "
                   f"{r['foreground_after']:.1%} | {ms(t['gpuheart'])} | {ms(t['scipy'])} | "
                   f"{r['speedup_vs_scipy']:.1f}x |")
    return out + [""]


def section_clahe(e) -> list[str]:
    d = e["doc"]
    c = d["clahe"]
    out = ["### CLAHE and slice statistics, one 2048x2048 slice",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}). Timing: {d.get('timing', '')}. CLAHE kernel "
           f"{c['kernel_size']}, clip {c['clip_limit']}, {c['nbins']} bins.",
           "",
           "| dtype | gpuheart clahe | skimage equalize_adapthist | speed-up | max abs diff | slice_stats | np.percentile (5 q) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for dtype, r in d["results"].items():
        out.append(f"| {dtype} | {ms(r['clahe_ours_s'])} | {ms(r['clahe_skimage_s'])} | {r['clahe_speedup']:.1f}x | "
                   f"{r['clahe_max_abs_diff_vs_skimage']:g} | {ms(r['slice_stats_s'])} | {ms(r['np_percentile_5q_s'])} |")
    fused = {k: r for k, r in d["results"].items() if "clahe_robust_fused_s" in r}
    if fused:
        out += ["", "CLAHE then robust scaling (the chain's last two steps), fused (`clahe_robust_scale`, what "
                "`preprocess` runs) vs as two calls, same output bit for bit:", "",
                "| dtype | fused | two steps | speed-up |", "|---|---:|---:|---:|"]
        out += [f"| {k} | {ms(r['clahe_robust_fused_s'])} | {ms(r['clahe_then_robust_scale_s'])} | "
                f"{r['fused_speedup']:.1f}x |" for k, r in fused.items()]
    return out + [""]


def section_io(e) -> list[str]:
    d = e["doc"]
    n = d["machine"].get("read_threads_default", "?")
    out = ["### Reading a per-slice TIFF folder", "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}): {d['benchmark']}. Timing: {d.get('timing', '')}. "
           f"The slices of a slab are decoded by up to 8 threads (`GPUHEART_READ_THREADS`; {n} here); with one, "
           f"tifffile decodes a page's strips with {d['machine'].get('tifffile_maxworkers', '?')} worker(s). "
           + _io_sizes(d["results"]), "",
           f"| compression | 1 thread | {n} threads | speed-up | MiB on disk |", "|---|---:|---:|---:|---:|"]
    out += [f"| {k} | {ms(r['one_thread_s'])} | {ms(r['default_threads_s'])} | {r['speedup']:.2f}x | {r['mib_on_disk']:.0f} |"
            for k, r in d["results"].items()]
    mw = d.get("mask_write")
    if mw:
        z, y, x = mw["slab"]
        out += ["", f"Writing one {z}x{y}x{x} 0/255 mask slab ({100 * mw['foreground']:.1f}% foreground) to OME-Zarr, "
                "same run: the image codec (Blosc zstd 5, byte shuffle) vs the mask codec the pipeline's masks use "
                "(Blosc zstd 3, bit shuffle).", "",
                "| codec | seconds | MiB on disk |", "|---|---:|---:|",
                f"| image codec | {mw['image_codec_s']:.3f} | {mw['image_codec_mib']:.2f} |",
                f"| mask codec | {mw['mask_codec_s']:.3f} | {mw['mask_codec_mib']:.2f} |",
                f"| speed-up | {mw['speedup']:.1f}x | |"]
    return out + [""]


def _io_sizes(results: dict) -> str:
    """What the MiB-on-disk column says about compression, from the numbers (LZW can make noise larger)."""
    raw = (results.get("none") or {}).get("mib_on_disk")
    other = {k: r["mib_on_disk"] for k, r in results.items() if k != "none" and "mib_on_disk" in r}
    if not raw or not other:
        return ""
    sizes = ", ".join(f"{k} {v:.0f} MiB" for k, v in other.items())
    larger = [k for k, v in other.items() if v > raw]
    return (f"The slices are mostly noise, so compression saves little or nothing: {sizes} on disk against "
            f"{raw:.0f} MiB uncompressed" + (f" ({' and '.join(larger)} larger than uncompressed)." if larger else "."))


def section_mesh(e) -> list[str]:
    d = e["doc"]
    r = d["results"]
    z, y, x = d["shape"]
    return ["### Marching cubes, slab-wise vs whole volume",
            "",
            f"Measured {e['when']} on {machine_line(d)} ({src(e)}). Timing: {d.get('timing', '')}. Mask {z}x{y}x{x}, "
            f"slabs of {d['slab_size']}.",
            "",
            "| implementation | seconds | peak MiB |",
            "|---|---:|---:|",
            f"| gpuheart slab-wise | {r['slabwise_s']:.2f} | {r['slabwise_peak_mib']:.0f} |",
            f"| skimage whole volume | {r['skimage_whole_s']:.2f} | {r['skimage_whole_peak_mib']:.0f} |",
            "",
            f"Time ratio slab-wise / whole: {r['slabwise_s'] / r['skimage_whole_s']:.2f}; memory ratio: "
            f"{r['slabwise_peak_mib'] / r['skimage_whole_peak_mib']:.2f}; {r['vertices']:,} vertices, "
            f"{r['faces']:,} faces (same counts as skimage: {r['same_counts']}).",
            ""]


def section_mesh_stage(e) -> list[str]:
    d = e["doc"]
    st, best = d["stats"], d["best_s"]
    z, y, x = d["shape"]
    out = [f"### The mesh stage, whole (`mesh_from_mask`), {d.get('mask', 'sponge')} mask",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d['benchmark']}; {z}x{y}x{x}, "
           f"{d['mask_fraction']:.{0 if d['mask_fraction'] >= 0.1 else 1}%} inside: {st['faces']:,} faces, "
           f"{st['components']:,} components written"
           + (f" (max_memory_faces {d.get('max_memory_faces') or 20_000_000:,} under the mask's "
              f"{st['estimated_faces']:,} faces: "
              f"meshed from {st['block_factor']}-voxel block means, the path of any mask over the budget; the "
              f"paper's 2022 slices of this mask would give about {st['estimated_faces'] / z * 2022 / 1e6:.0f} M "
              "faces, over the default 20 M). "
              if st.get("block_factor", 1) > 1 else ". ") +
           f"Best of {len(next(iter(d['seconds'].values())))} alternating rounds.",
           "",
           "| mesh.py | seconds |", "|---|---:|"]
    out += [f"| {'this commit' if k == 'current' else 'commit ' + k} | {v:.1f} |" for k, v in best.items()]
    if d.get("against_commit") and d.get("outputs_equal_as", "bytes") == "bytes":
        out += ["", f"Speed-up {d['speedup_best']:.2f}x; both wrote the same bytes (mesh, largest component, "
                "component table) and the same statistics."]
    elif d.get("against_commit"):
        out += ["", f"Speed-up {d['speedup_best']:.2f}x; both wrote the same surface: the same counts of vertices, "
                "faces and components, areas and volumes equal to 1e-9, the same component table (its rows compared "
                "sorted), with the vertices numbered in another order."]
    return out + [""]


def section_label(e) -> list[str]:
    d = e["doc"]
    z, y, x = d["shape"]
    slowest = max(d["best_s"].values())
    out = ["### The tree graph: labelling (`label_slabs`) and skeleton",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d['benchmark'].split(': ', 1)[1]}; "
           f"{z}x{y}x{x}, {d['mask_fraction']:.1%} inside, {d['components']:,} components. "
           f"Best of {len(next(iter(d['seconds'].values())))} alternating rounds; every side found the same "
           "components.",
           "",
           "| morphology.py | seconds | ms per slice | speed-up over the slowest |", "|---|---:|---:|---:|"]
    out += [f"| {k} | {v:.2f} | {v / z * 1e3:.0f} | {slowest / v:.2f}x |" for k, v in d["best_s"].items()]
    sk = d.get("skeleton")
    if sk:
        bz, by, bx = sk["box_shape"]
        slowest = max(sk["best_s"].values())
        out += ["", f"Then the skeleton stage, `graph.skeleton_graph` of the largest tree's box pooled {sk['downsample_yx']}x{sk['downsample_yx']} "
                f"in (y, x) as the pipeline pools it to `graph.max_voxels` ({bz}x{by}x{bx}, {sk['box_fraction_inside']:.1%} inside, "
                f"{sk['branches']:,} branches; the same branches and lengths on every side, "
                + ("the same radii" if sk["max_radius_relative_difference"] == 0 else
                   f"radii within {sk['max_radius_relative_difference']:.0e} relative") + "):",
                "", "| graph.py | seconds | speed-up over the slowest |", "|---|---:|---:|"]
        out += [f"| {k} | {v:.2f} | {slowest / v:.2f}x |" for k, v in sk["best_s"].items()]
    return out + [""]


def section_pipeline_ab(e) -> list[str]:
    d = e["doc"]
    z, y, x = d["scan"]["shape_zyx"]
    mean = {k: sum(v["total_s"]) / len(v["total_s"]) for k, v in d["sides"].items()}
    (old, t_old), (new, t_new) = mean.items()
    out = ["### End to end, against an older commit",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}): {z}x{y}x{x} x {d['scan']['channels']} channels, "
           f"mesh on, runs alternating ({d['order']}). Mean total {t_old:.1f} s at {old}, {t_new:.1f} s at {new} "
           f"({t_old / t_new:.2f}x). Per run, seconds:",
           "",
           "| stage | " + " | ".join(d["sides"]) + " |", "|---|" + "---:|" * len(d["sides"])]
    stages = next(iter(d["sides"].values()))["stages_s"]
    out += [f"| {k} | " + " | ".join(", ".join(f"{t:.1f}" for t in v["stages_s"][k]) for v in d["sides"].values()) + " |"
            for k in stages]
    out += ["| total | " + " | ".join(", ".join(f"{t:.1f}" for t in v["total_s"]) for v in d["sides"].values()) + " |"]
    return out + [""] + [f"- {n}" for n in d.get("notes", [])] + [""]


def section_graph_overlap(e) -> list[str]:
    d = e["doc"]
    z, y, x = d["scan"]["shape_zyx"]
    t = d["total_s"]
    rows = [f"| {i + 1} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" for i, (a, b) in enumerate(zip(t["in turn"],
                                                                                          t["background"]))]
    return ["### Tree graph in a worker thread vs in turn (whole runs)",
            "",
            f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d['benchmark']}. Scan {z}x{y}x{x} x "
            f"{d['scan']['channels']} channels, segmentation {d['config']['segment_method']}, mesh on.",
            "",
            "| pair | in turn, s | background, s | ratio |", "|---:|---:|---:|---:|"] + rows + [""]


def section_gil(e) -> list[str]:
    d = e["doc"]
    rows = [f"| {name} | {min(r['serial_s']):.3f} | {min(r['two_threads_s']):.3f} | {r['speedup_best']:.2f}x |"
            for name, r in d["blocks"].items()]
    return ["### Which mesh and tree-graph building blocks run side by side in threads",
            "",
            f"Measured {e['when']} on {machine_line(d)} ({src(e)}). Two inputs one after the other, then in two "
            "threads at once (best of the repeats): about 2x where the work releases Python's GIL, about 1x "
            "where it holds it.",
            "",
            "| building block | serial, s | two threads, s | ratio |", "|---|---:|---:|---:|"] + rows + [""]


def section_thin(e) -> list[str]:
    d = e["doc"]
    rows = [f"| {c['case']} | {c['tree_voxels']:,} | {min(c['old_s']):.2f} | {min(c['new_s']):.2f} | "
            f"{c['speedup_best']:.2f}x | {'yes' if c['identical'] else 'no'} |" for c in d["cases"]]
    return ["### The tree graph's thinning against the one it replaced",
            "",
            f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d['benchmark']}."
            + "".join(f" {n[0].upper()}{n[1:]}." for n in d.get("notes", [])),
            "",
            "| case | tree voxels | old, s | new, s | ratio | same skeleton |",
            "|---|---:|---:|---:|---:|---|"] + rows + [""]


def section_mesh_export(e) -> list[str]:
    d = e["doc"]
    rows = []
    for c in d["cases"]:
        g, p = c["glb"], c["picture"]
        rows.append(f"| {c['case']} | {c['faces']:,} | {g['old']['vertices_written_per_vertex']:.2f}x | "
                    f"{g['new']['vertices_written_per_vertex']:.2f}x | {c['glb_bytes_new_over_old']:.2f}x | "
                    f"{g['old']['s']:.2f} | {g['new']['s']:.2f} | {p['old']['s']:.2f} | {p['new']['s']:.2f} | "
                    f"{c['picture_speedup']:.2f}x |")
    return ["### GLB nodes and the report's mesh picture, new against old",
            "",
            f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d['benchmark']}."
            + "".join(f" {n[0].upper()}{n[1:]}." for n in d.get("notes", [])),
            "",
            "| case | faces | GLB vertices written, old | new | GLB bytes, new / old | GLB export old, s | new, s "
            "| picture old, s | new, s | picture ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"] + rows + [""]


def section_bin_table(e) -> list[str]:
    d = e["doc"]
    med = d["median_ms"]
    rev = d["against_commit"]
    return _paragraph("CLAHE's per-slice bin table (uint16 input), against an older commit",
                      f"Measured {e['when']} on {machine_line(d)} ({src(e)}). {d['keys']}; identical tables checked. "
                      f"Median per table: {med[rev]:.3f} ms at {rev}, {med['current']:.3f} ms now "
                      f"({d['speedup_median']:.1f}x). On a GPU this is host time per slice of the chain.")


def section_unet(e) -> list[str]:
    d = e["doc"]
    where = d.get("gpu") or f"{d.get('machine', '?')}, {d.get('cpus', '?')} cores, {d.get('torch_threads', '?')} torch threads"
    return ["### U-Net inference",
            "",
            f"Measured {d.get('date', e['when'])} on {where} ({src(e)}): the shipped U-Net, 256x256 tiles without "
            f"overlap, through `unet.predict`.",
            "",
            "| device | tiles | seconds | tiles/s |",
            "|---|---:|---:|---:|",
            f"| {d['device']}{' (bf16)' if d.get('bf16') else ''} | {d['tiles']} | {d['seconds']:.2f} | "
            f"{d['tiles_per_s']:.1f} |",
            *([f"| {d['device']} (bf16 autocast, opt-in: `[segment] cpu_bf16`) | {b['tiles']} | {b['seconds']:.2f} | "
               f"{b['tiles_per_s']:.1f} ({d.get('bf16_speedup', 0):.1f}x, same run) |"]
              if (b := d.get("bf16_autocast")) else []),
            "",
            *_unet_compiled(d),
            *_unet_tiles(d),
            *_unet_sweep(d),
            "Not a result: the project's reference point for a GPU is a figure quoted in its issues, about 6,600 "
            "tiles/s for a plain 16-channel U-Net in bf16 on an H100, not measured here.",
            ""]


def _unet_compiled(d: dict) -> list[str]:
    """The default (torch.compile on CUDA) against the same predict uncompiled, side by side in one run."""
    u = d.get("uncompiled")
    if not u:
        return []
    return [f"`torch.compile` (the default on CUDA since 2026-11-27): {d['tiles_per_s']:,.0f} tiles/s, against "
            f"{u['tiles_per_s']:,.0f} uncompiled in the same run ({d.get('compiled_speedup', 0):.1f}x); compiling "
            f"took {d.get('warmup_s', 0):.0f} s once (the untimed warm-up call). Automatic batch size: "
            f"{d.get('auto_batch_size', '?')} tiles.", ""]


def _unet_tiles(d: dict) -> list[str]:
    """The pipeline's default inference tile (the model's training tile) against 256-pixel tiles, per slice."""
    rows = d.get("inference_tile_vs_256") or []
    if not rows:
        return []
    out = ["Per slice, the pipeline's default tiles (the model's training tile, overlap a quarter) against 256-pixel "
           "tiles (overlap 64), interleaved in the same run:", "",
           "| slice | training tile | seconds, training tile | seconds, 256 | ratio |", "|---|---:|---:|---:|---:|"]
    out += [f"| {r['size']}x{r['size']} | {r['training_tile']} | {r['seconds']['training_tile']:.3f} | "
            f"{r['seconds']['tile256']:.3f} | {r['ratio_training_over_256']:.2f} |" for r in rows]
    return out + [""]


def _unet_sweep(d: dict) -> list[str]:
    """The GPU batch-size sweep (bench_unet.cuda_sweep), one row per batch size: uncompiled (since 2026-11-27),
    or in older results autotuning off and on."""
    rows = d.get("sweep") or []
    if not rows:
        return []
    auto = d.get("auto_batch_size", "?")
    if "compiled" in rows[0]:
        return ["Uncompiled, by batch size (same run):", "", "| batch size | tiles/s |", "|---|---:|",
                *[f"| {r['batch_size']}{f' (= {auto})' if r['batch_size'] == 'auto' else ''} | {r['tiles_per_s']} |"
                  for r in rows], ""]
    by = {}
    for r in rows:
        by.setdefault(str(r["batch_size"]), {})[r["cudnn_benchmark"]] = r["tiles_per_s"]
    return ["| batch size | tiles/s | tiles/s with cuDNN autotuning |", "|---|---:|---:|",
            *[f"| {bs}{f' (= {auto})' if bs == 'auto' else ''} | {v.get(False, '-')} | {v.get(True, '-')} |"
              for bs, v in by.items()], ""]


def section_accuracy(e) -> list[str]:
    d = e["doc"]
    m = d["mean_dice"]
    st = d.get("settings", {})
    recipe = ", ".join(f"{k} {st[k]}" for k in ("loss", "epochs", "steps", "norm") if k in st)
    extra = {k: st[k] for k in ("seed", "context", "zoom", "haze", "phantoms") if st.get(k) not in (None, 0)}
    # settings whose default is not 0/None: named when a run changed them, or two recipes read alike
    extra.update({k: st[k] for k, default in (("schedule", "plateau"), ("balance", "pixel"), ("tile", 128), ("width", 16),
                                              ("batch_size", 8))
                  if st.get(k) not in (None, default)})
    recipe += "".join(f", {k} {v}" for k, v in extra.items())
    ph = [r["phantom"]["unet"]["dice"] for r in d["per_stack"].values() if "phantom" in r]
    phantom = f" Fold models on the built-in scan's vessels: mean Dice {sum(ph) / len(ph):.3f}." if ph else ""
    folds = d.get("fold_devices") or {}
    if folds:   # merged one-fold runs: say how many and where each trained
        where = ", ".join(f"{sum(v == dev for v in folds.values())} on {dev}" for dev in sorted(set(folds.values())))
        phantom += f" Merged from {len(folds)} folds ({where}); the means are over those stacks only."
    m = {k: mean3(r[k]["dice"] for r in d["per_stack"].values()) if k in m else "-" for k in ("unet", "union",
                                                                                              "otsu", "dom")}
    return [f"### Segmentation accuracy, leave one stack out ({recipe})",
            "",
            f"{src(e)}{tiles_then(e['doc'])}; per-stack tables in docs/accuracy.md. Mean Dice: U-Net {m['unet']}, union "
            f"{m['union']}, global Otsu {m['otsu']}, difference of medians {m['dom']}."
            + phantom,
            ""]


def section_finetune(e) -> list[str]:
    d = e["doc"]
    st, rows = d.get("settings", {}), d["per_stack"].values()
    m = {f"{k}{c}": mean3(r[k][f"dice{c}"] for r in rows) if all(f"dice{c}" in r[k] for r in rows) else "-"
         for k in ("before", "after") for c in ("", "_at_0.5")}
    cut = f", fixed cut {st['threshold']}" if st.get("threshold") is not None else ""
    if st.get("pseudo"):
        return ["### Self-training each held-out fold model on its own mask of the stack (no labels)",
                "",
                f"{src(e)}{tiles_then(e['doc'])}; see docs/accuracy.md. Mean Dice on every slice, before -> after: "
                f"{m['before']} -> {m['after']} at the model's cut, "
                f"{m['before_at_0.5']} -> {m['after_at_0.5']} at 0.5.",
                ""]
    return [f"### Fine-tuning on {st.get('slices', '?')} labelled slices of each held-out stack{cut}",
            "",
            f"{src(e)}{tiles_then(e['doc'])}; see docs/accuracy.md. Mean Dice on the other slices, before -> after: "
            f"{m['before']} -> {m['after']} at the calibrated cut, "
            f"{m['before_at_0.5']} -> {m['after_at_0.5']} at 0.5.",
            ""]


def section_probe(e) -> list[str]:
    m = e["doc"]["mean"]
    return _paragraph("What limits the held-out Dice (probes on the fold models)",
                      f"{src(e)}{tiles_then(e['doc'])}; see docs/accuracy.md. Mean Dice: calibrated {m['calibrated']:.3f}, best threshold per stack "
                      f"(chosen with its labels) {m['at_best_threshold']:.3f}, 8-fold TTA {m['tta8_calibrated']:.3f}"
                      + (f", ensemble {m['ensemble_at_0.5']:.3f}" if "ensemble_at_0.5" in m else "") + ".")


def section_tiles(e) -> list[str]:
    runs = e["doc"]["runs"]
    gains = [r["mean"]["training_calibrated"] - r["mean"]["tile256_calibrated"] for r in runs.values()]
    first = next(iter(runs.values()))["mean"]
    return _paragraph("Inference tile: the training tile against 256-pixel tiles (same fold models)",
                      f"{src(e)}; see docs/accuracy.md. {len(runs)} recipes' fold models; at the calibrated cut the training "
                      f"tile is ahead in {sum(g > 0 for g in gains)} of {len(gains)} (change {min(gains):+.3f} to "
                      f"{max(gains):+.3f}); first run ({next(iter(runs))}): {first['tile256_calibrated']:.3f} -> "
                      f"{first['training_calibrated']:.3f}.")


def section_scales(e) -> list[str]:
    runs = e["doc"]["runs"]
    def recipe(r):
        c = r["recipe"]
        return f"{c['loss']}, {'no' if c['norm'] == 'none' else c['norm']} norm, {c['epochs']} epochs of {c['steps_per_epoch']} x {c['batch_size']}, tile {c['tile']}"

    rows = [f"{recipe(r)}: {r['mean']['x1.0']['calibrated']:.3f} unresized, "
            f"{r['mean']['scale_chosen_leave_one_out_calibrated']:.3f} at the scale chosen leave one stack out, "
            f"{r['mean']['best_scale_per_stack_calibrated']:.3f} at the best scale per stack"
            for r in runs.values()]
    return _paragraph("Inference scale: the input resized before the U-Net (same fold models)",
                      f"{src(e)}; see docs/accuracy.md. Mean Dice at the calibrated cut, {len(runs)} recipes' fold models: "
                      + "; ".join(rows) + ".")


def section_hysteresis(e) -> list[str]:
    m = e["doc"]["mean"]
    return _paragraph("Hysteresis on the probabilities (same fold models)",
                      f"{src(e)}; see docs/accuracy.md. Mean Dice: calibrated cut {m['calibrated']:.3f}; hysteresis with the "
                      f"(low, high) pair chosen leave one stack out {m['hyst_3d_leave_one_out']:.3f} in 3-D, "
                      f"{m['hyst_2d_leave_one_out']:.3f} slice by slice.")


def section_support(e) -> list[str]:
    d = e["doc"]
    m, ph = d["mean"], d["phantom_shipped_model"]
    return _paragraph("U-Net components kept only where the difference of medians supports them (same fold models)",
                      f"{src(e)}; see docs/accuracy.md. Mean Dice of the U-Net mask: {m['unet']:.3f} as it is; "
                      f"{m['unet_2d_leave_one_out']:.3f} slice by slice and {m['unet_3d_leave_one_out']:.3f} in 3-D at the "
                      f"fraction chosen leave one stack out. The built-in scan's vessels (shipped model): "
                      f"{ph['unet']:.3f} -> {ph['unet_2d_0.05']:.3f} slice by slice at a fraction of 0.05.")


def section_combine(e) -> list[str]:
    d = e["doc"]
    m = d["mean_ensemble"]
    planes = "; ".join(f"{name}: " + ", ".join(f"{fam} {r['xy']:.3f} -> {r['three']:.3f}" for fam, r in rows.items())
                       for name, rows in d["three_planes"].items())
    return _paragraph("Three planes and a two-family ensemble (held-out fold models of two recipes)",
                      f"{src(e)}; see docs/accuracy.md. Mean Dice: {m['runs']:.3f} (`--runs`), {m['other']:.3f} "
                      f"(`--other`), {m['ensemble']:.3f} for their mean probability at the mean cut. Three planes "
                      f"against xy alone, isotropic stacks: {planes}.")


def section_cldice_skeleton(e) -> list[str]:
    c = e["doc"]["change"]
    return _paragraph("clDice with gpuheart's skeleton against scikit-image's (Otsu and difference-of-medians masks)",
                      f"{src(e)}; see docs/accuracy.md. Change per stack and method: {c['min']:+.3f} to "
                      f"{c['max']:+.3f}, mean {c['mean']:+.3f}.")


def section_closings(e) -> list[str]:
    m = e["doc"]["mean_dice_closings"]
    return _paragraph("The paper's closings on the held-out masks",
                      f"{src(e)}{tiles_then(e['doc'])}; see docs/accuracy.md. Mean Dice as segmented -> after the closings: union "
                      f"{m['union']:.3f} -> {m['union_closed']:.3f}, U-Net {m['unet']:.3f} -> {m['unet_closed']:.3f}, "
                      f"difference of medians {m['dom']:.3f} -> {m['dom_closed']:.3f}.")


def section_session(e) -> list[str]:
    d = e["doc"]
    rows = d.get("benchmarks", [])
    best = {}
    for b in rows:
        g = b.get("group") or ""
        best[g] = min(best.get(g, float("inf")), b["stats"]["median"])
    out = ["### pytest-benchmark session",
           "",
           f"Measured {e['when']} on {machine_line(d)} ({src(e)}); seconds per call, 'vs fastest' = this "
           f"median / the fastest median in its group.",
           "",
           "| group | test | min | median | rounds | vs fastest | goal |",
           "|---|---|---:|---:|---:|---:|---|"]
    for b in rows:
        s, g = b["stats"], b.get("group") or ""
        goal = (b.get("extra_info") or {}).get("goal_ms_h100")
        out.append(f"| {g} | `{b['name']}` | {ms(s['min'])} | {ms(s['median'])} | {s['rounds']} | "
                   f"{s['median'] / best[g]:.2f} | {f'<= {goal} ms (H100)' if goal else ''} |")
    return out + [""] + [f"- {n}" for n in d.get("notes", [])] + ([""] if d.get("notes") else [])


def section_gpu_profile(e) -> list[str]:
    """benchmarks/gpu_profile.py --only chain: each step of the per-slice chain, wall clock against the GPU's
    own timeline (CUDA events), and the kernels' summed GPU time."""
    d = e["doc"]
    before = {r["step"]: r for r in (d.get("before") or {}).get("chain_steps_2048_uint16", [])}
    out = ["### Per-slice chain by step (diagnostics, benchmarks/gpu_profile.py)", "",
           f"Measured {e['when']} on {d.get('gpu', '?')} ({src(e)}): one 2048x2048 uint16 slice on the device, "
           "best of 20 calls with a synchronize (wall) and of 10 between CUDA events (GPU timeline, idle gaps "
           "included).", ""]
    if before:
        b = d["before"]
        out += [f"'Before': {b.get('what', 'an earlier run')} ({b.get('source', '?')}); not side by side.", ""]
    out += ["| step | wall, ms | events, ms |" + (" before: wall, ms |" if before else ""),
            "|---|---:|---:|" + ("---:|" if before else "")]
    for r in d.get("chain_steps_2048_uint16", []):
        b = before.get(r["step"], {})
        out.append(f"| {r['step']} | {r.get('wall_ms', '-')} | {r.get('events_ms', '-')} |"
                   + (f" {b.get('wall_ms', '-')} |" if before else ""))
    out.append("")
    host = d.get("chain_host_profile") or {}
    if host:
        out += ["Host time by function (cProfile over 50 calls; own time per call, the five largest):", "",
                "| step | function | calls | own, us | cumulative, us |", "|---|---|---:|---:|---:|"]
        for step, rows in host.items():
            for r in rows[:5]:
                out.append(f"| {step} | `{r['function']}` | {r['calls_per_call']} | {r['own_us_per_call']} | "
                           f"{r['cumulative_us_per_call']} |")
        out.append("")
    for n in d.get("notes", []):
        out.append(f"- {n}")
    return out + [""]


SECTIONS = {"pipeline": section_pipeline, "median": section_median, "morphology": section_morphology,
            "clahe": section_clahe, "io": section_io,
            "mesh": section_mesh, "unet": section_unet, "accuracy": section_accuracy,
            "finetune": section_finetune, "probe": section_probe, "tiles": section_tiles, "scales": section_scales,
            "hysteresis": section_hysteresis, "support": section_support, "combine": section_combine, "cldice-skeleton": section_cldice_skeleton,
            "closings": section_closings,
            "pytest-benchmark": section_session, "mesh-stage": section_mesh_stage, "label": section_label,
            "pipeline-graph-overlap": section_graph_overlap, "pipeline-ab": section_pipeline_ab, "gpu-profile": section_gpu_profile, "gil": section_gil,
            "clahe-bin-table": section_bin_table, "thin": section_thin,
            "mesh-export": section_mesh_export}
ORDER = ["pipeline", "pipeline-ab", "pipeline-graph-overlap", "gpu-profile", "median", "morphology", "clahe", "clahe-bin-table", "io",
         "mesh", "mesh-stage", "mesh-export", "label", "thin", "gil", "unet", "accuracy", "probe", "tiles", "scales", "hysteresis", "support", "combine", "cldice-skeleton",
         "closings", "finetune",
         "pytest-benchmark"]


def _goal_measurements(mine: list[dict]) -> list[str]:
    """One cell per GPU_GOALS row from a device's latest results ('-' where none measured it)."""
    def latest(kind):
        found = sorted((e for e in mine if e["kind"] == kind), key=lambda e: e["when"], reverse=True)
        return found[0]["doc"] if found else None

    session, pipeline = latest("pytest-benchmark"), latest("pipeline")
    med = {b["name"]: b["stats"]["median"] for b in (session or {}).get("benchmarks", [])}

    def per_call(*names):
        got = [f"{ms(med[n])} ({n.split('[')[-1].split('-')[0]})" if "[" in n else ms(med[n])
               for n in names if n in med]
        return ", ".join(got) + " per single-slice call" if got else "-"

    full = (pipeline or {}).get("projection", {}).get("by_stage_s")
    return [per_call("test_median_gpuheart[uint8-15]", "test_median_gpuheart[uint16-15]"),
            per_call("test_median_gpuheart[uint8-3]", "test_median_gpuheart[uint16-3]"),
            per_call("test_clahe_gpuheart"),
            per_call("test_slice_chain_gpuheart"),
            f"{dur(full)} projected (not measured)" if full else "-"]


def render(entries: list[dict]) -> str:
    devices = sorted({e["device"] for e in entries}, key=lambda d: (d != "cpu", d))
    gpu_devices = [d for d in devices if d != "cpu"]
    out = ["# Benchmarks",
           "",
           "<!-- generated by `python benchmarks/summarize.py` from benchmarks/results/*.json; do not edit by hand -->",
           "",
           "How to measure (each script writes its JSON to `benchmarks/results/`; then run "
           "`python benchmarks/summarize.py` to rebuild this page):",
           "",
           "| what | command | writes |",
           "|---|---|---|",
           "| end-to-end pipeline | `python benchmarks/bench_pipeline.py --slices 8 --size 2048 --channels 3` | `<device>-pipeline.json` |",
           "| median vs scipy / OpenCV | `python benchmarks/bench_filters.py` | `cpu-filters.json` |",
           "| closings vs scipy.ndimage | `python benchmarks/bench_morphology.py` | `cpu-morphology.json` |",
           "| CLAHE vs scikit-image | `python benchmarks/bench_exposure.py` | `cpu-exposure.json` |",
           "| reading per-slice TIFFs, 1 thread vs several; mask codec | `python benchmarks/bench_io.py` | `cpu-io.json` |",
           "| end to end against an older commit (runs alternating; a worktree of the commit runs its own copy) | `python benchmarks/bench_pipeline.py --slices 8 --size 2048 --channels 3 --mesh --out ...`, alternately from each checkout | `cpu-pipeline-ab.json` (assembled from the runs) |",
           "| tree graph in a worker thread vs in turn | `python benchmarks/bench_pipeline.py --slices 8 --size 1024 --compare-graph-background 3` | `<device>-pipeline-graph-overlap.json` |",
           "| marching cubes | `python benchmarks/bench_mesh.py [--shape 512 1024 1024 --out ...]` | `cpu-mesh*.json` |",
           "| the whole mesh stage (optionally against an older commit) | `python benchmarks/bench_mesh_stage.py --against REV` | `cpu-mesh-stage.json` |",
           "| the tree graph's labelling (1 thread vs several) and skeleton, optionally against an older commit | `python benchmarks/bench_label.py --against REV [--mask OUT/C02/mask.ome.zarr --out ...]` | `cpu-label.json`, `cpu-label-dense.json` |",
           "| the tree graph's thinning against the one it replaced | `python benchmarks/bench_thin.py [--mask OUT/C02/mask.ome.zarr ...]` | `cpu-thin.json` |",
           "| GLB nodes and the report's mesh picture, new against old | `python benchmarks/bench_mesh_export.py [--mask OUT/C02/mask.ome.zarr ...]` | `cpu-mesh-export.json` |",
           "| which mesh / tree-graph building blocks release the GIL | `python benchmarks/bench_gil.py` | `cpu-gil.json` |",
           "| CLAHE's per-slice bin table against an older commit | `python benchmarks/bench_bin_table.py --against REV` | `cpu-clahe-bin-table.json` |",
           "| U-Net inference | `python benchmarks/bench_unet.py` | `<device>-unet.json` |",
           "| accuracy, leave one stack out | `python benchmarks/accuracy.py --epochs 20 --steps 50 --loss dice_bce` | `accuracy-loso.json` |",
           "| what limits it (no training) | `python benchmarks/accuracy_probe.py --runs RUNS...` | `accuracy-probes.json` |",
           "| inference tile: training tile vs 256 (no training) | `python benchmarks/accuracy_tiles.py --runs RUNS...` | `accuracy-tiles.json` |",
           "| inference scale: the input resized before the U-Net (no training) | `python benchmarks/accuracy_scales.py --runs RUNS...` | `accuracy-scales.json` |",
           "| hysteresis on the probabilities (no training) | `python benchmarks/accuracy_hysteresis.py --runs RUNS` | `accuracy-hysteresis.json` |",
           "| U-Net components the difference of medians supports (no training) | `python benchmarks/accuracy_support.py --runs RUNS` | `accuracy-support.json` |",
           "| three planes, two-recipe ensemble (no training) | `python benchmarks/accuracy_combine.py --runs RUNS --other RUNS2` | `accuracy-combine.json` |",
           "| clDice with gpuheart's skeleton against scikit-image's (no training) | `python benchmarks/accuracy_cldice_skeleton.py` | `accuracy-cldice-skeleton.json` |",
           "| fine-tuning on a few target slices | `python benchmarks/accuracy_finetune.py --runs RUNS --slices N --out benchmarks/results/accuracy-finetune-N.json` (N = 4 or 8; with `--threshold 0.5`: `-N-t05.json`) | `accuracy-finetune-4.json`, `-8.json`, `-4-t05.json`, `-8-t05.json` |",
           "| self-training on its own mask (no labels) | `python benchmarks/accuracy_finetune.py --runs RUNS --pseudo --threshold 0.5 --out benchmarks/results/accuracy-selftrain.json` | `accuracy-selftrain.json` |",
           "| everything, incl. GPU baselines (skip without CUDA) | `python -m pytest benchmarks/ --benchmark-only` | `<device>-<date>.json/.md` |",
           "",
           "## GPU",
           ""]
    if not gpu_devices:
        out += ["**No GPU numbers exist yet.** No GPU has been available to the sessions that measured these "
                "results; gpuheart's CUDA kernels (median, CLAHE, fused elementwise, closings) are compiled in CI "
                "and their logic runs on the CPU through a host emulator (tests/cuda_emulator.py, equal to the CPU "
                "path), and whole runs with `device = \"cuda\"` go through a fake GPU (tests/fake_device.py) and equal "
                "the CPU run, but they have not yet run on a GPU, so nothing is known of their speed. The GPU baselines (`benchmarks/bench_gpu_baselines.py`: cupyx and cuCIM median, "
                "cuCIM CLAHE, gpuheart on CuPy arrays, the per-slice chain) are ready and skip without CUDA.",
                ""]
    measured = {dev: _goal_measurements([e for e in entries if e["device"] == dev]) for dev in gpu_devices}
    out += ["Goals (targets from the project's issues, **not results**), and the latest measurement per GPU (its "
            "section below says how and when):", "",
            "| what | goal | on |" + "".join(f" {d} |" for d in gpu_devices),
            "|---|---|---|" + "---|" * len(gpu_devices)]
    out += [f"| {w} | {g} | {dev} |" + "".join(f" {measured[d][i]} |" for d in gpu_devices)
            for i, (w, g, dev) in enumerate(GPU_GOALS)]
    out.append("")
    for dev in devices:
        mine = [e for e in entries if e["device"] == dev]
        name = next((e["doc"].get("device_name") for e in mine if e["doc"].get("device_name")), None)
        out += [f"## {'CPU' if dev == 'cpu' else 'GPU'}: {name or dev} (`{dev}`)", ""]
        if dev == "cpu":
            out += ["These CPU numbers come from a 2-core shared machine that was at times running other work "
                    "(where a result recorded the 1-minute load average, its section gives it; 2 means both cores "
                    "busy): the ratios were measured side by side in one process and are the meaningful part; "
                    "absolute times hold only for \"this 2-core CPU, as loaded then\".", ""]
        for kind in ORDER:
            found = sorted((e for e in mine if e["kind"] == kind), key=lambda e: e["when"], reverse=True)
            if kind == "pytest-benchmark":
                found = found[:1]  # the latest session per device
            for e in found:
                out += SECTIONS[kind](e)
    others = [e for e in entries if e["kind"] not in SECTIONS]
    if others:
        out += ["## Other result files", ""] + [f"- {src(e)} ({e['kind']}, {e['when']})" for e in others] + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    entries = load(Path(args.results))
    text = render(entries)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} from {len(entries)} result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
