"""The HTML report of a run: figures from what the pipeline left in ``out_dir``, and one page.

``write_report(out_dir)`` reads ``out_dir/summary.json`` and, per channel, ``out_dir/<channel>/figures.npz``
(maximum projections, one line profile, the middle slice) and an optional ``mesh.ply``/``mesh.glb``, draws PNGs
under ``out_dir/report/`` and writes ``out_dir/report.html`` that refers to them relatively, so the folder can be
moved or archived as a whole. Nothing here measures the scan: every number comes from ``summary.json``
(computed by :mod:`gpuheart.metrics` during the run); the only arithmetic is display scaling.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np

REPORT_DIR = "report"  # figures folder, relative to out_dir (the page links are relative too)
_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()   # how the figures are drawn (see _Drawn)

# MIP columns: (npz key, title). The order is the order of the stages.
_MIP_STAGES = [("mip_raw", "raw"), ("mip_normalized", "z-normalized"),
               ("mip_preprocessed", "asinh + CLAHE + scale"), ("mip_dom", "difference of medians (>0)"),
               ("mip_mask", "mask"), ("mip_final", "mask after closings"), ("mip_truth", "truth")]
# 0/1 panels: drawn on a fixed 0..1 scale, since percentile limits turn a projection that is all ones
# (a mask that covers every (y, x) somewhere in z, common for thick stacks) black, the look of an empty mask
_BINARY_MIPS = {"mip_mask", "mip_final", "mip_truth"}

# Measurement rows: (summary key, label). Missing keys are left out of the table.
_MEASUREMENTS = [("detrended_cv_raw", "detrended CV of slice means, raw"),
                 ("detrended_cv_normalized", "detrended CV of slice means, normalized"),
                 ("preprocessed_mean", "mean of preprocessed image"),
                 ("dom_mask_fraction", "difference-of-medians mask fraction"),
                 ("dom_mean", "mean of DoM image"),
                 ("snr_preprocessed", "SNR, preprocessed"),
                 ("snr_dom", "SNR, difference of medians")]
_TRUTH_SCORES = ["dice", "precision", "recall", "accuracy"]


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display; safe in worker threads and on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(out_dir) -> Path:
    """Write ``out_dir/report.html`` and its figures under ``out_dir/report/``; return the page's path.

    Raises ``FileNotFoundError`` when ``out_dir/summary.json`` is missing (no run has finished there).
    Channels whose ``figures.npz`` is missing get their numbers but no figures.
    """
    out_dir = Path(out_dir)
    try:
        run = json.loads((out_dir / "summary.json").read_bytes())
    except ValueError as err:   # cut short or damaged (UnicodeDecodeError too)
        raise ValueError(f"{out_dir / 'summary.json'}: not valid JSON ({err}); expected the summary a gpuheart "
                         f"run writes: delete it and give the run's command again (it reuses finished channels)") from None
    fig_dir = out_dir / REPORT_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    summary = run.get("summary", {})
    # A channel's entry is the dict with a slice count; other top-level entries (input, device, ...) are not.
    channels = [c for c, v in summary.items() if isinstance(v, dict) and "slices" in v]
    parts = [_header(out_dir, summary), _timing_table(run.get("timings_s", {}), summary, channels)]
    drawn = _Drawn(fig_dir)
    for channel in channels:
        parts.append(_channel_section(out_dir, fig_dir, channel, summary[channel], drawn))
    page = _PAGE.format(title="gpuheart report", body="\n".join(parts))
    path = out_dir / "report.html"
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a page
    _remove_stale_figures(fig_dir, page)
    drawn.save()
    return path


class _Drawn:
    """What each PNG in report/ was drawn from, so that a report written again (every rerun of a finished run,
    `gpuheart report`) draws only figures whose sources changed: drawing a mesh picture took 3-12 s a channel
    from a 7-million-face mesh, nearly all of a rerun's 26 s. A source is named by what it was drawn from (the
    channel's figures.npz by content, a mesh file by size, time and inode since it is replaced by renaming, the
    summary's numbers) and this module's own code, so a figure is never kept past a change of how it is drawn."""

    NAME = ".figures.json"

    def __init__(self, fig_dir: Path):
        self.path = fig_dir / self.NAME
        try:
            self.before = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.before = {}
        self.now: dict[str, str] = {}

    def figure(self, png: Path, source: str, draw) -> Path | None:
        key = hashlib.sha256(f"{_CODE}\n{source}".encode()).hexdigest()
        if self.before.get(png.name) == key and png.is_file():
            self.now[png.name] = key
            return png
        out = draw(png)
        if out is not None:
            self.now[png.name] = key
        return out

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps(self.now, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def _file_key(path: Path | None, content: bool = False) -> str:
    if path is None or not path.is_file():
        return "none"
    if content:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    st = path.stat()
    return f"{path.name} {st.st_size} {st.st_mtime_ns} {st.st_ino}"


_FIGURE_KINDS = ("mips", "slice_means", "profile", "overlay", "mesh")


def _remove_stale_figures(fig_dir: Path, page: str) -> None:
    """Figures an earlier report drew (another channel, a mesh since turned off) that this page does not show:
    left in report/ they pass for this run's. Only names this module writes are touched."""
    shown = set(re.findall(rf'src="{REPORT_DIR}/([^"]+)"', page))
    for png in fig_dir.glob("*.png"):
        if png.name not in shown and png.stem.endswith(tuple(f"_{k}" for k in _FIGURE_KINDS)):
            png.unlink()


# ---------------------------------------------------------------- page parts (HTML strings)

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
</body></html>
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _num(x) -> str:
    """A number for a table cell: 4 significant digits, '–' for missing or NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def _table(header, rows) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _header(out_dir: Path, summary) -> str:
    inp = summary.get("input", {})
    rows = [(k, _voxel(v) if k == "voxel_size" else json.dumps(v) if isinstance(v, (list, dict)) else v)
            for k, v in inp.items()]
    # the folder the page is in (a run's folder may have been moved or copied since it was written)
    return (f"<p>Output folder: <code>{_esc(str(out_dir.absolute()))}</code></p>"
            f"<h2>Input</h2>{_table(['property', 'value'], rows)}"
            f"<p>Device: <b>{_esc(summary.get('device', 'unknown'))}</b></p>")


def _voxel(v) -> str:
    if not v:  # the run's lengths, areas and volumes then assume 1 µm voxels (pipeline, mesh, tree graph)
        return "not in the metadata: 1 x 1 x 1 µm assumed"
    return " x ".join(f"{x:g}" for x in v) + " µm (z, y, x)"


def _timing_table(timings, summary, channels) -> str:
    """Seconds per stage and throughput: slices (all channels together) this run computed, per second."""
    this = summary.get("this_run")
    if this is None:   # a summary.json from before runs recorded what they computed: every channel counts
        n_slices = sum(int(summary[c].get("slices", 0)) for c in channels)
        total, note = run_seconds(timings), f"{n_slices} slices in {len(channels)} channel(s)."
    else:
        # a reused channel took no time in this run, and a resumed one computed only its remaining slices
        n_slices = sum(int(summary[c].get("slices", 0)) - int(this["resumed_at"].get(c, 0))
                       for c in this["computed"] if c in summary)
        total = float(this["wall_s"])
        note = f"{n_slices} slices computed in {len(this['computed'])} channel(s)"
        later = this.get("later_stages_only") or {}   # summaries before 2026-11-28 lack it
        interrupted = {c: z for c, z in this["resumed_at"].items() if c not in later}
        if interrupted:
            note += " (continuing an interrupted run: " + ", ".join(
                f"{c} from slice {z}" for c, z in interrupted.items()) + ")"
        if later:
            note += (" (preprocessing and segmentation kept from an earlier run that differed only in the closing, "
                     f"mesh or graph settings: {', '.join(later)})")
        note += (f"; reused from an earlier run, not counted: {', '.join(this['reused'])}." if this["reused"]
                 else ".")
        for r in this.get("reused_from") or []:   # summaries before 2026-11-28 lack it
            note += (f" {', '.join(r['channels'])}: computed by an earlier run of {float(r['wall_s']):.1f} s wall "
                     f"({_earlier_stages(r.get('timings_s') or {})}).")
        # the page is drawn before its own seconds are known: summary.json and the console add them afterwards
        upto = "" if "report" in timings else (" up to drawing this page (summary.json's wall_s and the console "
                                               "include the page)")
        note += f" Stage seconds: {this['stage_seconds']}; the total is the run's wall-clock time{upto}."
    rows = [(stage + (" (background, overlapped)" if stage in OVERLAPPED else ""), f"{s:.3f}",
             _num(n_slices / s) if s > 0 and n_slices else "–") for stage, s in timings.items()]
    if any(overlapped(stage) for stage in timings):
        note += " Background stages ran beside the others: their seconds are not in the total."
    rows.append(("total", f"{total:.3f}", _num(n_slices / total) if total > 0 and n_slices else "–"))
    return f"<h2>Timings</h2><p>{_esc(note)}</p>" + _table(["stage", "seconds", "slices/s"], rows)


def _earlier_stages(timings: dict) -> str:
    """An earlier run's three longest stages, for a reused channel's note (summary.json keeps them all)."""
    top = sorted(timings.items(), key=lambda kv: -float(kv[1]))[:3]
    return ", ".join(f"{k} {float(v):.1f} s" for k, v in top) or "no stage seconds recorded"


# stages timed in a background thread while the others run: their seconds are already inside the others' wall
# time ("input wait" is what the read leaves over, "tree graph: wait" what the graphs do), so a total that
# added them would count them twice
OVERLAPPED = ("read",)


def overlapped(stage: str) -> bool:
    """Whether ``stage`` ran in a background thread beside the others (the read, the tree graphs)."""
    from .pipeline import BACKGROUND

    return stage in OVERLAPPED or stage.endswith(BACKGROUND)


def run_seconds(timings: dict) -> float:
    """The run's seconds: every stage's, without the overlapped ones."""
    return sum(v for k, v in timings.items() if not overlapped(k))


def _measurement_table(s: dict) -> str:
    rows = [(label, _num(s[key])) for key, label in _MEASUREMENTS if key in s]
    table = _table(["measurement", "value"], rows)
    # one row per mask scored against the truth (dom, unet, union, otsu, final), in pipeline order
    scored = [(k[: -len("_vs_truth")], v) for k, v in s.items() if k.endswith("_vs_truth") and isinstance(v, dict)]
    if scored:
        table += _table(["mask vs truth"] + _TRUTH_SCORES,
                        [(name, *(_num(v[k]) if k in v else "–" for k in _TRUTH_SCORES)) for name, v in scored])
    return table


def _method_line(s: dict) -> str:
    """How the channel was segmented and whether a truth mask scored it (the page's Dice rows need it)."""
    method = s.get("segmentation", "unknown")
    if any(k.endswith("_vs_truth") for k in s):
        truth = ("scored against the truth mask " + (f"<code>{_esc(s['truth_path'])}</code>" if s.get("truth_path")
                                                      else "given with --truth"))
    else:
        truth = "no truth mask: no Dice"
    dark = s.get("normalization", {}).get("dark_slices") or []
    note = (f" Dark slices (no signal; written as 0, no vessels found in them; the closings along z bridge vessels "
            f"across them in the final mask): {_esc(', '.join(map(str, dark)))}."
            if dark else "")
    return f"<p>Segmentation: <b>{_esc(method)}</b>; {truth}.{note}</p>"


def _structure_table(s: dict) -> str:
    """The mesh and largest-tree numbers summary.json holds (the console prints them too)."""
    rows = []
    if m := s.get("mesh"):
        k = int(m.get("block_factor", 1))
        rows += [("mesh faces", _num(m.get("faces"))), ("mesh components", _num(m.get("components"))),
                 ("mesh surface area (µm²)", _num(m.get("surface_area"))),
                 ("mesh volume (µm³)", _num(m.get("volume")))]
        if k > 1:
            rows.append(("mesh made from voxel blocks (over max_memory_faces)", f"{k} x {k} x {k}"))
    if (t := s.get("tree")) and "n_branches" in t:
        rows += [("largest tree: voxels", _num(t.get("tree_voxels"))), ("largest tree: branches", _num(t["n_branches"])),
                 ("largest tree: vessel length (µm)", _num(t.get("total_length_um"))),
                 ("largest tree: mean radius (µm)", _num(t.get("mean_radius_um")))]
        if (k := int(t.get("downsample_yx", 1))) > 1:
            rows.append(("largest tree: skeleton grid (box over graph.max_voxels; coarse lengths and radii)",
                         f"{k} x coarser in y and x"))
    return _table(["structure", "value"], rows) if rows else ""


def _img(fig_dir: Path, path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    return f'<img src="{_esc(path.relative_to(fig_dir.parent).as_posix())}" alt="{_esc(alt)}">'


def _channel_section(out_dir: Path, fig_dir: Path, channel: str, s: dict, drawn: _Drawn) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", channel)  # channel names become file names
    npz = out_dir / channel / "figures.npz"
    loaded: list[dict] = []

    def f() -> dict:   # read only when a figure has to be drawn
        if not loaded:
            loaded.append(dict(np.load(npz)) if npz.is_file() else {})
        return loaded[0]

    npz_key, mesh = _file_key(npz, content=True), _find_mesh(out_dir / channel)
    k = int(s.get("mesh", {}).get("block_factor", 1))
    figs = [(drawn.figure(fig_dir / f"{name}_mips.png", npz_key, lambda p: _mip_row(f(), p)),
             "maximum projections per stage"),
            (drawn.figure(fig_dir / f"{name}_slice_means.png", json.dumps(s, sort_keys=True, default=str),
                          lambda p: _slice_means(s, p)), "slice means"),
            (drawn.figure(fig_dir / f"{name}_profile.png", npz_key, lambda p: _profile(f(), p)),
             "difference-of-medians profile"),
            (drawn.figure(fig_dir / f"{name}_overlay.png", npz_key, lambda p: _overlay(f(), p)),
             "segmentation overlay"),
            (drawn.figure(fig_dir / f"{name}_mesh.png", f"{_file_key(mesh)} {k}",
                          lambda p: _mesh(mesh, p, block_factor=k)), "mesh")]
    imgs = "\n".join(_img(fig_dir, p, f"{channel}: {alt}") for p, alt in figs)
    # said, not silently left out: the page would otherwise look complete without them
    lost = ("" if npz.is_file() else f"<p><b>{_esc(str(npz))} is missing</b>: the projections, profile and overlay "
            f"of this channel cannot be drawn (give the run's command again to write it).</p>\n")
    if figs[-1][0] is None and int(s.get("mesh", {}).get("faces") or 0) > 0:   # the run wrote a mesh with faces
        what = f"{_esc(str(mesh))} could not be read" if mesh is not None else "its mesh file is missing"
        lost += (f"<p><b>{what}</b>: no picture of this channel's mesh (give the run's command again to write "
                 f"it).</p>\n")
    return (f"<h2>Channel {_esc(channel)}</h2>\n{_method_line(s)}\n{_measurement_table(s)}\n"
            f"{_structure_table(s)}\n{lost}{imgs}")


# ---------------------------------------------------------------- figures (each returns its PNG path or None)

def _save(fig, path: Path) -> Path:
    """Save a figure to PNG atomically and free it (pyplot keeps every open figure alive otherwise)."""
    plt = _pyplot()
    tmp = path.with_name(path.name + ".partial")
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path


def _stretch(img, lo=1.0, hi=99.5):
    """Display limits: percentiles, so a few hot pixels do not make the whole image black."""
    a = np.asarray(img, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(finite, [lo, hi])
    if vmax <= vmin:  # flat image or a 0/1 mask with few ones: fall back to the full range
        vmin, vmax = float(finite.min()), float(finite.max())
    return float(vmin), float(vmax if vmax > vmin else vmin + 1)


def _mip_row(f: dict, path: Path) -> Path | None:
    panels = [(k, t) for k, t in _MIP_STAGES if k in f]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        vmin, vmax = (0.0, 1.0) if key in _BINARY_MIPS else _stretch(f[key])
        ax.imshow(f[key], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("maximum-intensity projections along z")
    return _save(fig, path)


def _slice_means(s: dict, path: Path) -> Path | None:
    """Slice means through z before and after normalization, each on its own axis (different units)."""
    curves = [("slice_means_raw", "raw", "detrended_cv_raw", "tab:red"),
              ("slice_means_normalized", "z-normalized", "detrended_cv_normalized", "tab:blue")]
    curves = [c for c in curves if s.get(c[0])]
    if not curves:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(curves), 1, figsize=(8, 2.4 * len(curves)), sharex=True, squeeze=False)
    for ax, (key, label, cv_key, colour) in zip(axes[:, 0], curves):
        m = np.array(s[key], dtype=np.float64)  # JSON NaN may arrive as None
        # markers: a line alone draws nothing for one slice, or for a slice between two NaN (unreached) ones
        ax.plot(np.arange(m.size), m, color=colour, marker="o", markersize=2.5,
                label=f"{label} (detrended CV {_num(s.get(cv_key))})")
        ax.set_ylabel("slice mean")
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("z (slice)")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # slices, not -0.04 .. 0.04
    return _save(fig, path)


def _profile(f: dict, path: Path) -> Path | None:
    """The paper's figure 12: raw, preprocessed and DoM values along one line, stacked (different scales)."""
    lines = [(k, t) for k, t in [("profile_raw", "raw"), ("profile_preprocessed", "preprocessed"),
                                 ("profile_dom", "difference of medians")] if k in f]
    if not lines:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(lines), 1, figsize=(8, 1.8 * len(lines)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], lines):
        ax.plot(f[key], lw=0.8)
        ax.set_ylabel(title, fontsize=8)
    axes[-1, 0].set_xlabel("x (pixel)")
    where = f"z = {int(f['profile_z'])}, y = {int(f['profile_y'])}" if "profile_z" in f and "profile_y" in f else ""
    fig.suptitle(f"values along one line ({where})" if where else "values along one line")
    return _save(fig, path)


def _overlay(f: dict, path: Path) -> Path | None:
    """Middle slice in grey, mask filled in red, truth outlined in cyan."""
    if "mid_preprocessed" not in f:
        return None
    plt = _pyplot()
    img = f["mid_preprocessed"]
    fig, ax = plt.subplots(figsize=(6, 6 * img.shape[0] / max(img.shape[1], 1) + 0.5))
    vmin, vmax = _stretch(img)
    ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    legend = []
    # the mask the run wrote (mask.ome.zarr): after the closings when there were any
    key, label = ("mid_final", "mask after closings") if "mid_final" in f else ("mid_mask", "mask")
    if key in f:
        rgba = np.zeros(f[key].shape + (4,), dtype=np.float32)
        rgba[f[key] > 0] = (1.0, 0.0, 0.0, 0.45)  # red, half transparent; clear elsewhere
        ax.imshow(rgba, interpolation="nearest")
        legend.append(f"{label}: red")
    if "mid_truth" in f and f["mid_truth"].max() > 0:
        ax.contour(f["mid_truth"] > 0, levels=[0.5], colors="cyan", linewidths=0.8)
        legend.append("truth: cyan outline")
    ax.set_title("middle slice" + (f" ({', '.join(legend)})" if legend else ""), fontsize=9)
    ax.axis("off")
    return _save(fig, path)


def _find_mesh(folder: Path) -> Path | None:
    for name in ("mesh.ply", "mesh.glb", "mesh.obj", "mesh.stl"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_mesh(path: Path):
    """(vertices, faces) via trimesh, or None when trimesh is not installed or the file does not load; for a
    binary STL (triangles, None) (:func:`_stl_triangles`).

    ``process=False``: merging vertices (trimesh's default) costs about as much as the mesh itself and the
    picture does not need it. trimesh would load an STL at ~500 bytes a face, more than twice what the mesh stage
    held (~200), so it is read from a memory map instead."""
    try:
        import trimesh
    except ImportError:
        return None
    try:
        if path.suffix.lower() == ".stl" and (tri := _stl_triangles(path)) is not None:
            return tri, None
        m = trimesh.load(path, force="mesh", process=False)  # force: a GLB loads as a Scene otherwise
        return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)
    except Exception:  # a broken mesh must not cost the rest of the report
        return None


def _stl_triangles(path: Path):
    """A binary STL's triangles as a read-only (n, 3, 3) float32 memory map, or None for a text STL."""
    with open(path, "rb") as fh:
        head = fh.read(84)
    n = int(np.frombuffer(head[80:84], "<u4")[0]) if len(head) == 84 else -1
    if n <= 0 or path.stat().st_size != 84 + 50 * n:
        return None
    rec = np.memmap(path, np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]), "r", 84, (n,))
    return rec["v"]


# Meshes with more faces than this are vertex-clustered on a _CLUSTER_GRID**3 grid, chunk by chunk, before the
# quadric decimation: fast-simplification holds a few hundred bytes a face, so on the whole mesh the picture
# would need about as much memory as the mesh stage; the clustered mesh is bounded by the grid (its faces lie in
# a few grid**2 cells), whatever the scan's size. Smaller meshes are decimated directly (a finer picture).
_CLUSTER_ABOVE = 400_000
_CLUSTER_GRID = 192
_CLUSTER_CHUNK = 1 << 18
# a clustered mesh over this many times the picture's faces is clustered again to about that many before the
# decimation (see _mesh); None: decimate it as it is (benchmarks/bench_mesh_export.py times both)
_RECLUSTER_FACTOR: float | None = 10


def _mesh(path: Path | None, png: Path, max_faces: int = 20000, block_factor: int = 1) -> Path | None:
    loaded = _load_mesh(path) if path is not None else None
    if loaded is None:
        return None
    v, f = loaded
    n = len(v) if f is None else len(f)
    if n == 0:
        return None
    if f is None or n > _CLUSTER_ABOVE:
        v, f = _cluster(v, f, _CLUSTER_GRID)
        k = _RECLUSTER_FACTOR
        if k and len(f) > k * max_faces:
            # decimating a clustered mesh (not manifold) stalls at 2-4x the target, after 3 s on a million
            # faces, and was retried on coarser grids: cluster again to about 10x the target first (faces
            # go as the grid squared), from which decimation reaches it (a pipeline's 7 M-face mesh: 10.7 s
            # -> 5.8 s a picture, loading included; benchmarks/bench_mesh_export.py)
            v, f = _cluster(v, f, max(16, int(_CLUSTER_GRID * math.sqrt(k * max_faces / len(f)))))
    return draw_mesh(v, f, png, max_faces=max_faces, n_faces=n, block_factor=block_factor)


def _triangle_chunks(v, f):
    """(m, 3, 3) corner positions of the faces, a chunk at a time (``f`` None: ``v`` holds the triangles)."""
    n = len(v) if f is None else len(f)
    for i in range(0, n, _CLUSTER_CHUNK):
        yield np.asarray(v[i:i + _CLUSTER_CHUNK] if f is None else v[f[i:i + _CLUSTER_CHUNK]], np.float64)


def _cluster(v, f, grid: int):
    """Vertex clustering: corners snapped to the centres of cubic cells, ``grid`` along the longest side, faces
    that collapse dropped, duplicates merged; streamed over :func:`_triangle_chunks`. Winding is not kept: the
    picture shades both sides alike."""
    bounds = np.array([(c.min((0, 1)), c.max((0, 1))) for c in _triangle_chunks(v, f)])
    lo, hi = bounds[:, 0].min(0), bounds[:, 1].max(0)
    cell = max(float((hi - lo).max()) / grid, 1e-12)
    dims = tuple(int(d) for d in np.floor((hi - lo) / cell).astype(np.int64) + 1)
    keys = [np.zeros((0, 3), np.int64)]
    for tri in _triangle_chunks(v, f):
        c = np.minimum(((tri - lo) / cell).astype(np.int64), np.array(dims) - 1)
        k = np.sort(np.ravel_multi_index((c[..., 0], c[..., 1], c[..., 2]), dims), axis=1)
        keys.append(np.unique(k[(k[:, 0] != k[:, 1]) & (k[:, 1] != k[:, 2])], axis=0))
    used, inv = np.unique(np.unique(np.concatenate(keys), axis=0), return_inverse=True)
    centres = lo + (np.stack(np.unravel_index(used, dims), axis=1) + 0.5) * cell
    return centres, inv.reshape(-1, 3).astype(np.int64)


def draw_mesh(vertices, faces, png: Path, max_faces: int = 20000, n_faces: int | None = None,
              block_factor: int = 1) -> Path:
    """A shaded 3D view of a triangle mesh with at most ``max_faces`` faces, since matplotlib draws each
    polygon in Python and a heart mesh has millions: larger meshes are decimated for the picture (so
    the surface stays closed), or, where decimation is unavailable, drawn from an even subset of faces.
    ``n_faces``: the face count for the title, when ``faces`` is already a reduction of the mesh;
    ``block_factor`` > 1: the mesh was made from k x k x k voxel blocks (summary.json), said in the title.
    Coordinates are the mesh file's: (x, y, z) in µm."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    plt = _pyplot()
    v, fc = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    if len(fc) > max_faces:
        v, fc = _fewer_faces(v, fc, max_faces)
    tri = v[fc]  # (n, 3 corners, xyz)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    light = np.array([0.4, 0.3, 0.87])  # Lambert shading from one fixed direction, two-sided
    shade = 0.25 + 0.75 * np.abs(normal @ (light / np.linalg.norm(light)))
    colours = plt.get_cmap("Reds")(0.35 + 0.5 * shade)
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="3d")
    ax.add_collection3d(Poly3DCollection(tri, facecolors=colours, linewidths=0))
    lo, hi = v.min(axis=0), v.max(axis=0)
    for setlim, a, b in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), lo, hi):
        setlim(a, b if b > a else a + 1)
    ax.set_box_aspect(np.maximum(hi - lo, 1e-9))  # physical proportions, not a stretched cube
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_zlabel("z (µm)")
    blocks = f", from {block_factor} x {block_factor} x {block_factor} voxel blocks" if block_factor > 1 else ""
    ax.set_title(f"mesh ({len(faces) if n_faces is None else n_faces} faces{blocks}; drawn with {len(fc)})",
                 fontsize=9)
    return _save(fig, png)


def _fewer_faces(v, fc, max_faces):
    """Decimation to about ``max_faces``; where it stalls (a vertex-clustered mesh is not manifold, and quadric
    decimation stopped at 79k of 257k faces on a real stack's mesh, 4x the target), vertex clustering on coarser
    grids first, which always thins, and decimation again. An even subset of faces, scattered triangles that
    only show where the mesh is, is the last resort (no fast-simplification)."""
    try:
        import fast_simplification
    except ImportError:
        fast_simplification = None
    grid = _CLUSTER_GRID
    while fast_simplification is not None:
        try:
            v2, f2 = fast_simplification.simplify(v.astype(np.float32), fc.astype(np.int32),
                                                  target_reduction=max(0.0, 1 - max_faces / len(fc)))
        except Exception:   # a picture is not worth failing the report over: the even subset below
            break
        if 0 < len(f2) <= 2 * max_faces:
            return np.asarray(v2, np.float64), np.asarray(f2, np.int64)
        grid = int(grid / 1.4)
        if grid < 16:
            break
        v, fc = _cluster(v, fc, grid)
        if len(fc) <= max_faces:
            return v, fc
    return v, fc[np.linspace(0, len(fc) - 1, min(max_faces, len(fc))).astype(np.int64)]
