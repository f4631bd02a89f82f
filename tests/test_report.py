"""gpuheart.report: the page and its figures, from a run folder built here by hand (no pipeline run)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from gpuheart.report import draw_mesh, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def _figures(rng, shape=(40, 56), truth=True, mask=True) -> dict:
    """The arrays the pipeline saves per channel (see _ChannelAccumulator.save_figures)."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    vessel = (np.abs(y - shape[0] / 2 - 6 * np.sin(x / 8)) < 3).astype(np.float32)
    raw = (200 + 800 * vessel + rng.normal(0, 30, shape)).astype(np.float32)
    f = {"mip_raw": raw, "mip_normalized": raw / 1000, "mip_preprocessed": np.clip(raw / 4, 0, 255),
         "profile_raw": raw[shape[0] // 2], "profile_preprocessed": np.clip(raw[shape[0] // 2] / 4, 0, 255),
         "mid_preprocessed": np.clip(raw / 4, 0, 255), "profile_z": np.int64(3), "profile_y": np.int64(shape[0] // 2)}
    if mask:
        dom = np.maximum(raw - 300, 0).astype(np.float32)
        f.update(mip_dom=dom, mip_mask=vessel, profile_dom=dom[shape[0] // 2], mid_mask=vessel)
    if truth:
        f.update(mip_truth=vessel, mid_truth=np.roll(vessel, 1, axis=0))
    return {k: np.asarray(v, dtype=np.float32) if k.startswith(("mip", "mid", "profile_r", "profile_p", "profile_d"))
            else v for k, v in f.items()}


def _channel_summary(n=7, truth=True, mask=True) -> dict:
    s = {"slices": n, "detrended_cv_raw": 0.12, "detrended_cv_normalized": 0.004, "preprocessed_mean": 61.5,
         "slice_means_raw": [100 + 10 * (-1) ** i + i for i in range(n)],
         "slice_means_normalized": [1.0] * (n - 1) + [float("nan")]}  # NaN: a slice the run did not reach
    if mask:
        s.update(dom_mask_fraction=0.08, dom_mean=3.2, snr_preprocessed=2.5, snr_dom=9.75)
    if truth:
        s["dom_vs_truth"] = {"tp": 10, "fp": 2, "fn": 3, "tn": 100, "dice": 0.8, "precision": 0.83,
                             "recall": 0.77, "accuracy": 0.96}
    return s


def make_run(out: Path) -> Path:
    """A run folder: channel C00 with truth and a mask, C01 with neither, C02 summary-only (no figures.npz)."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for ch, kw in {"C00": {}, "C01": {"truth": False, "mask": False}}.items():
        (out / ch).mkdir()
        np.savez_compressed(out / ch / "figures.npz", **_figures(rng, **kw))
    summary = {"input": {"shape": [7, 40, 56], "dtype": "uint16", "channels": ["C00", "C01", "C02"],
                         "voxel_size": [5.0, 1.2, 1.2], "path": "/data/<scan> & co"},
               "device": "cpu", "C00": _channel_summary(), "C01": _channel_summary(truth=False, mask=False),
               "C02": _channel_summary(truth=False)}
    run = {"out_dir": str(out), "outputs": {"C00": {"mask": str(out / "C00" / "mask.ome.zarr")}},
           "timings_s": {"stats (pass 1)": 0.5, "to device": 0.0, "difference of medians": 2.0}, "summary": summary}
    (out / "summary.json").write_text(json.dumps(run))  # json writes NaN as NaN, as the pipeline's does
    return out


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def img_sources(page: Path) -> list[str]:
    p = _Imgs()
    p.feed(page.read_text())
    return p.src


def test_page_and_figures(tmp_path):
    out = make_run(tmp_path / "run")
    page = write_report(out)
    assert page == out / "report.html" and not (out / "report.html.partial").exists()
    src = img_sources(page)
    # C00: mips, slice means, profile, overlay; C01: the same (no mask/truth panels); C02: slice means only.
    assert len(src) == 9, src
    for s in src:
        assert not Path(s).is_absolute() and s.startswith("report/"), s  # relative: the folder can be moved
        data = (out / s).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, s
    assert not list((out / "report").glob("*.partial"))
    text = page.read_text()
    for needle in ["cpu", "0.8", "9.75", "Channel C02", "&lt;scan&gt; &amp; co", "slices/s"]:
        assert needle in text, needle
    assert "<scan>" not in text  # values are escaped
    # throughput: 21 slices (3 channels x 7) over 2.0 s of one stage; a 0-second stage shows no rate
    assert re.search(r"difference of medians</td><td>2\.000</td><td>10\.5<", text)
    assert re.search(r"to device</td><td>0\.000</td><td>–<", text)
    assert "C00_mips.png" in text and "C02_mips.png" not in text
    # and C02's lost figures are said, not silently left out
    assert f"{out / 'C02' / 'figures.npz'} is missing</b>" in text and text.count("is missing</b>") == 1
    # every mask scored against the truth gets a row: here the difference-of-medians mask of C00
    assert re.search(r"mask vs truth</th>.*?<td>dom</td><td>0\.8</td>", text, re.S)


def test_a_rerun_with_fewer_channels_leaves_no_figures_of_the_earlier_ones(tmp_path):
    """report/ is the run's: figures of a channel the new summary does not have would pass for this run's."""
    out = make_run(tmp_path / "run")
    write_report(out)
    assert {"C01_mips.png", "C01_slice_means.png"} <= {p.name for p in (out / "report").iterdir()}
    (out / "report" / "my_notes.png").write_bytes(PNG_MAGIC)   # not a name the report writes: kept
    run = json.loads((out / "summary.json").read_text())
    del run["summary"]["C01"], run["summary"]["C02"]
    (out / "summary.json").write_text(json.dumps(run))
    page = write_report(out)
    left = sorted(p.name for p in (out / "report").iterdir())
    assert left == sorted([Path(s).name for s in img_sources(page)] + ["my_notes.png", ".figures.json"]), left
    assert not any(n.startswith(("C01", "C02")) for n in left)


def test_missing_summary_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path)


def test_mesh_rendered_when_loadable(tmp_path, monkeypatch):
    """A mesh file in the channel folder becomes a figure; trimesh is replaced by a stub that returns a cube."""
    v = np.array([[x, y, z] for x in (0, 1) for y in (0, 2) for z in (0, 3)], dtype=float)
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    loaded = []
    stub = types.SimpleNamespace(load=lambda p, force=None, **kw: loaded.append((Path(p).name, force))
                                 or types.SimpleNamespace(vertices=v, faces=faces))
    monkeypatch.setitem(sys.modules, "trimesh", stub)
    out = make_run(tmp_path / "run")
    (out / "C00" / "mesh.glb").write_bytes(b"stub")
    src = img_sources(write_report(out))
    assert "report/C00_mesh.png" in src and loaded == [("mesh.glb", "mesh")]
    assert (out / "report" / "C00_mesh.png").read_bytes()[:8] == PNG_MAGIC
    for fmt in ("stl", "obj"):   # every format a run writes gets its picture
        loaded.clear()
        out = make_run(tmp_path / f"run_{fmt}")
        (out / "C00" / f"mesh.{fmt}").write_bytes(b"stub")
        assert "report/C00_mesh.png" in img_sources(write_report(out)) and loaded == [(f"mesh.{fmt}", "mesh")]


def test_mesh_skipped_without_trimesh(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trimesh", None)  # import now raises ImportError
    out = make_run(tmp_path / "run")
    (out / "C00" / "mesh.ply").write_bytes(b"ply\n")
    assert not any("mesh" in s for s in img_sources(write_report(out)))


def test_draw_mesh_subsamples_faces(tmp_path):
    rng = np.random.default_rng(1)
    v = rng.random((300, 3))
    f = rng.integers(0, 300, (500, 3))
    png = draw_mesh(v, f, tmp_path / "m.png", max_faces=50)
    assert png.read_bytes()[:8] == PNG_MAGIC


# After load, record in the DOM whether every image decoded; --dump-dom prints the DOM after the load event.
_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const d = document.createElement("div");
  d.id = "imgcheck";
  d.textContent = `loaded=${imgs.length - bad.length} total=${imgs.length} bad=${bad.join(",")}`;
  document.body.appendChild(d);
});
</script>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser check needs /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_images_load_in_chromium(tmp_path):
    out = make_run(tmp_path / "run")
    page = write_report(out)
    n = len(img_sources(page))
    # The check runs on a copy beside report.html, so the same relative links are resolved.
    probe = out / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _CHECK + "</body>"))
    dom = _dump_dom(probe, tmp_path / "profile")
    m = re.search(r'<div id="imgcheck">loaded=(\d+) total=(\d+) bad=([^<]*)</div>', dom)
    assert m, dom[-2000:]
    assert (int(m[1]), int(m[2]), m[3]) == (n, n, "")
    # The folder can be moved: the page still finds its figures.
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    m = re.search(r'loaded=(\d+) total=(\d+)', _dump_dom(moved / "probe.html", tmp_path / "profile2"))
    assert m and int(m[1]) == int(m[2]) == n


def _dump_dom(page: Path, profile: Path) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _drawn(monkeypatch) -> dict:
    """What each figure shows, recorded as write_report saves it: PNG name -> suptitle and, per axes, title,
    labels, legend, images and plotted lines."""
    from gpuheart import report

    real, seen = report._save, {}

    def save(fig, path):
        axes = []
        for ax in fig.axes:
            legend = ax.get_legend()
            axes.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                         "zlabel": ax.get_zlabel() if hasattr(ax, "get_zlabel") else None,
                         "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
                         "images": [np.asarray(im.get_array()) for im in ax.get_images()],
                         "clims": [im.get_clim() for im in ax.get_images()],
                         "lines": [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()],
                         "markers": [line.get_marker() for line in ax.get_lines()],
                         "xticks": list(ax.get_xticks())})
        seen[path.name] = {"suptitle": fig.get_suptitle(), "axes": axes}
        return real(fig, path)

    monkeypatch.setattr(report, "_save", save)
    return seen


def test_each_figure_shows_its_channels_stages_under_their_labels(tmp_path, monkeypatch):
    out = make_run(tmp_path / "run")
    seen = _drawn(monkeypatch)
    page = write_report(out)
    stages = {"mip_raw": "raw", "mip_normalized": "z-normalized", "mip_preprocessed": "asinh + CLAHE + scale",
              "mip_dom": "difference of medians (>0)", "mip_mask": "mask", "mip_truth": "truth"}
    for channel, keys in {"C00": list(stages), "C01": ["mip_raw", "mip_normalized", "mip_preprocessed"]}.items():
        f = dict(np.load(out / channel / "figures.npz"))
        mips = seen[f"{channel}_mips.png"]["axes"]
        assert [a["title"] for a in mips] == [stages[k] for k in keys]
        for a, k in zip(mips, keys):
            np.testing.assert_array_equal(a["images"][0], f[k], err_msg=f"{channel} {k}")
        prof = seen[f"{channel}_profile.png"]
        want = [("raw", "profile_raw"), ("preprocessed", "profile_preprocessed"),
                ("difference of medians", "profile_dom")][: 3 if channel == "C00" else 2]
        assert [a["ylabel"] for a in prof["axes"]] == [label for label, _ in want]
        for a, (_, k) in zip(prof["axes"], want):
            np.testing.assert_array_equal(a["lines"][0], f[k])
        assert prof["axes"][-1]["xlabel"] == "x (pixel)" and "(z = 3, y = 20)" in prof["suptitle"]
    s = _channel_summary()
    means = seen["C00_slice_means.png"]["axes"]
    np.testing.assert_array_equal(means[0]["lines"][0], s["slice_means_raw"])
    np.testing.assert_array_equal(means[1]["lines"][0], s["slice_means_normalized"])   # NaN where not reached
    assert [a["legend"] for a in means] == [["raw (detrended CV 0.12)"], ["z-normalized (detrended CV 0.004)"]]
    assert means[-1]["xlabel"] == "z (slice)"
    f = dict(np.load(out / "C00" / "figures.npz"))
    overlay = seen["C00_overlay.png"]["axes"][0]
    np.testing.assert_array_equal(overlay["images"][0], f["mid_preprocessed"])
    np.testing.assert_array_equal(overlay["images"][1][..., 3] > 0, f["mid_mask"] > 0)   # red where the mask is
    assert "mask: red" in overlay["title"] and "truth: cyan outline" in overlay["title"]
    text = page.read_text()
    assert re.findall(r"<h2>Channel (.*?)</h2>", text) == ["C00", "C01", "C02"]   # not the input's table
    assert re.search(r"SNR, preprocessed</td><td>2\.5<", text) and re.search(r"SNR, difference of medians</td><td>9\.75<",
                                                                            text)
    # every figure under its own name and description
    alts = re.findall(r'<img src="([^"]+)" alt="([^"]+)">', text)
    for src, alt in alts:
        kind = {"maximum projections per stage": "mips", "slice means": "slice_means",
                "difference-of-medians profile": "profile", "segmentation overlay": "overlay"}[alt.split(": ")[1]]
        assert src == f"report/{alt.split(':')[0]}_{kind}.png"
    assert len({src for src, _ in alts}) == len(alts) == 9


def test_the_overlay_outlines_the_truth_only_where_the_middle_slice_has_some(tmp_path, monkeypatch):
    out = make_run(tmp_path / "run")
    f = dict(np.load(out / "C00" / "figures.npz"))
    f["mid_truth"] = np.zeros_like(f["mid_truth"])   # truth elsewhere in the stack (its projection), none here
    np.savez_compressed(out / "C00" / "figures.npz", **f)
    seen = _drawn(monkeypatch)
    write_report(out)
    assert seen["C00_overlay.png"]["axes"][0]["title"] == "middle slice (mask: red)"


def test_the_overlay_and_projections_show_the_mask_after_the_closings_when_there_is_one(tmp_path, monkeypatch):
    """The run's mask (mask.ome.zarr) is the one after the closings: the overlay reds it, not the mask
    before them, and the projections show both, each under its own title."""
    out = make_run(tmp_path / "run")
    f = dict(np.load(out / "C00" / "figures.npz"))
    closed = np.roll(f["mid_mask"], 3, axis=1)   # any image other than the mask before the closings
    closed[:, :5] = 1
    f.update(mid_final=closed, mip_final=closed)
    np.savez_compressed(out / "C00" / "figures.npz", **f)
    seen = _drawn(monkeypatch)
    write_report(out)
    overlay = seen["C00_overlay.png"]["axes"][0]
    np.testing.assert_array_equal(overlay["images"][1][..., 3] > 0, closed > 0)
    assert overlay["title"] == "middle slice (mask after closings: red, truth: cyan outline)"
    mips = seen["C00_mips.png"]["axes"]
    titles = [a["title"] for a in mips]
    assert titles[-3:] == ["mask", "mask after closings", "truth"]
    np.testing.assert_array_equal(mips[-3]["images"][0], f["mip_mask"])
    np.testing.assert_array_equal(mips[-2]["images"][0], closed)


def test_a_mask_projection_that_is_all_ones_is_drawn_white(tmp_path, monkeypatch):
    """A mask that covers every (y, x) at some z projects to all ones; percentile limits made that
    (vmin = vmax = 1 -> 1..2) black, as if the mask were empty. Mask panels use 0 (black) .. 1 (white)."""
    out = make_run(tmp_path / "run")
    f = dict(np.load(out / "C00" / "figures.npz"))
    f.update(mip_final=np.ones_like(f["mip_mask"]), mid_final=f["mid_mask"])
    np.savez_compressed(out / "C00" / "figures.npz", **f)
    seen = _drawn(monkeypatch)
    write_report(out)
    mips = {a["title"]: a for a in seen["C00_mips.png"]["axes"]}
    for title in ("mask", "mask after closings", "truth"):
        assert mips[title]["clims"] == [(0.0, 1.0)], title


def test_a_large_mesh_is_drawn_from_a_vertex_clustered_one(tmp_path, monkeypatch):
    """Over _CLUSTER_ABOVE faces the picture is drawn from a vertex clustering streamed in chunks, so it needs
    far less memory than the mesh; an STL is read from a memory map. References: trimesh's sphere and STL reader."""
    trimesh = pytest.importorskip("trimesh")
    from gpuheart import report

    sphere = trimesh.creation.icosphere(subdivisions=5, radius=10.0)            # 20480 faces
    sphere.export(tmp_path / "mesh.stl")
    tri = report._stl_triangles(tmp_path / "mesh.stl")
    np.testing.assert_allclose(tri, trimesh.load(tmp_path / "mesh.stl", process=False).triangles, atol=1e-5)
    monkeypatch.setattr(report, "_CLUSTER_CHUNK", 1000)                        # many chunks
    v, f = report._cluster(np.asarray(sphere.vertices), np.asarray(sphere.faces), 16)
    cell = 20.0 / 16
    assert 0 < len(f) < len(sphere.faces) and len(np.unique(np.sort(f, 1), axis=0)) == len(f)
    r = np.linalg.norm(v, axis=1)                                                # corners snapped to cell centres
    assert np.abs(r - 10.0).max() <= cell * np.sqrt(3) / 2 + 1e-9
    np.testing.assert_allclose(v.min(0), -10 + cell / 2, atol=cell)
    drawn = []
    monkeypatch.setattr(report, "draw_mesh", lambda v, f, png, max_faces, n_faces, **kw: drawn.append((len(f), n_faces)))
    monkeypatch.setattr(report, "_CLUSTER_ABOVE", 1000)
    monkeypatch.setattr(report, "_CLUSTER_GRID", 16)
    for name in ("mesh.stl", "mesh.glb"):
        if name == "mesh.glb":
            sphere.export(tmp_path / name)
        report._mesh(tmp_path / name, tmp_path / "m.png")
    assert drawn == [(len(f), 20480)] * 2                                      # the file's count in the title


def _cell(text: str, label: str) -> str:
    m = re.search(rf"<td>{re.escape(label)}</td><td>([^<]*)</td>", text)
    assert m, label
    return m.group(1)


def test_the_page_says_how_each_channel_was_segmented_and_gives_its_mesh_and_tree(tmp_path, monkeypatch):
    """summary.json's method, mesh and tree numbers reach the page (they did not: only the console had them),
    and a mesh made from k x k x k voxel blocks says so in its table and picture, with axes in µm."""
    out = make_run(tmp_path / "run")
    run = json.loads((out / "summary.json").read_text())
    mesh = {"faces": 1860, "components": 4, "surface_area": 15821.34, "volume": 51072.5, "block_factor": 3}
    tree = {"n_branches": 24, "tree_voxels": 14306, "total_length_um": 452.046, "mean_radius_um": 3.0557}
    run["summary"]["C00"].update(segmentation="union", mesh=mesh, tree=tree)
    run["summary"]["C01"]["segmentation"] = "dom"
    (out / "summary.json").write_text(json.dumps(run))
    v = np.array([[x, y, z] for x in (0, 1) for y in (0, 2) for z in (0, 3)], dtype=float)
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1]])
    monkeypatch.setitem(sys.modules, "trimesh", types.SimpleNamespace(
        load=lambda p, **kw: types.SimpleNamespace(vertices=v, faces=faces)))
    (out / "C00" / "mesh.glb").write_bytes(b"stub")
    seen = _drawn(monkeypatch)
    text = write_report(out).read_text()
    c00, c01 = text.split("<h2>Channel C01</h2>")[0], text.split("<h2>Channel C01</h2>")[1]
    assert "Segmentation: <b>union</b>; scored against the truth" in c00
    assert "Segmentation: <b>dom</b>; no truth mask" in c01.split("<h2>")[0]
    assert _cell(c00, "mesh faces") == "1860" and _cell(c00, "mesh components") == "4"
    assert _cell(c00, "mesh surface area (µm²)") == "1.582e+04" and _cell(c00, "mesh volume (µm³)") == "5.107e+04"
    assert _cell(c00, "mesh made from voxel blocks (over max_memory_faces)") == "3 x 3 x 3"
    assert _cell(c00, "largest tree: branches") == "24" and _cell(c00, "largest tree: vessel length (µm)") == "452"
    assert _cell(c00, "largest tree: mean radius (µm)") == "3.056"
    ax = seen["C00_mesh.png"]["axes"][0]
    assert "6 faces, from 3 x 3 x 3 voxel blocks" in ax["title"]
    assert (ax["xlabel"], ax["ylabel"], ax["zlabel"]) == ("x (µm)", "y (µm)", "z (µm)")
    assert "structure" not in c01   # no mesh, no tree: no empty table


def test_the_total_time_leaves_out_the_overlapped_read(tmp_path, capsys):
    """"read" runs in a background thread while the other stages run ("input wait" is what it leaves over):
    adding it counted the reading twice in the page's total and the console's "wrote ... in"."""
    from gpuheart.cli import _print_run

    out = make_run(tmp_path / "run")
    run = json.loads((out / "summary.json").read_text())
    run["timings_s"] = {"stats (pass 1)": 0.5, "read": 30.0, "input wait": 1.5, "difference of medians": 2.0}
    (out / "summary.json").write_text(json.dumps(run))
    text = write_report(out).read_text()
    # 0.5 + 1.5 + 2.0 = 4 s for 21 slices (3 channels x 7)
    assert re.search(r"<td>total</td><td>4\.000</td><td>5\.25<", text)
    assert "read (background, overlapped)</td>" in text
    result = types.SimpleNamespace(timings=run["timings_s"], out_dir=out, summary={"device": "cpu"}, resumed={},
                                   reused=[], outputs={}, report=None)
    _print_run(result)
    assert "in 4.0 s on cpu" in capsys.readouterr().out


def test_the_voxel_size_is_given_in_um_or_said_to_be_assumed(tmp_path):
    out = make_run(tmp_path / "run")
    assert _cell(write_report(out).read_text(), "voxel_size") == "5 x 1.2 x 1.2 µm (z, y, x)"
    run = json.loads((out / "summary.json").read_text())
    run["summary"]["input"]["voxel_size"] = None   # a TIFF without the metadata, no --voxel-size
    (out / "summary.json").write_text(json.dumps(run))
    assert _cell(write_report(out).read_text(), "voxel_size") == "not in the metadata: 1 x 1 x 1 µm assumed"


def test_a_one_slice_scan_shows_its_slice_means(tmp_path, monkeypatch):
    """One slice: the CVs are NaN (shown '–') and each curve is a single point, which a plain line does not
    draw at all; the z axis had ticks at -0.04 .. 0.04. Each point gets a marker, ticks are whole slices."""
    out = make_run(tmp_path / "run")
    run = json.loads((out / "summary.json").read_text())
    run["summary"]["C00"].update(slices=1, slice_means_raw=[145.2], slice_means_normalized=[139.9],
                                 detrended_cv_raw=float("nan"), detrended_cv_normalized=float("nan"))
    (out / "summary.json").write_text(json.dumps(run))
    seen = _drawn(monkeypatch)
    text = write_report(out).read_text()
    axes = seen["C00_slice_means.png"]["axes"]
    assert [a["lines"][0].tolist() for a in axes] == [[145.2], [139.9]]
    assert all(a["markers"][0] not in ("None", "", " ", None) for a in axes)
    assert all(float(t).is_integer() for t in axes[-1]["xticks"]), axes[-1]["xticks"]
    assert _cell(text.split("Channel C01")[0], "detrended CV of slice means, raw") == "–"


def test_throughput_counts_only_what_this_run_computed_over_its_wall_time(tmp_path, capsys):
    """A rerun that reused finished channels, or resumed one, reported every channel's slices as its own; with
    Dask the stage seconds are summed over workers, so their sum is not the run's time."""
    from gpuheart.cli import _print_run

    out = make_run(tmp_path / "run")
    run = json.loads((out / "summary.json").read_text())
    run["timings_s"] = {"stats (pass 1)": 3.0, "difference of medians": 7.0}   # worker-seconds: 10 s in all
    run["summary"]["this_run"] = {"wall_s": 4.0, "computed": ["C00", "C01"], "reused": ["C02"],
                                  "resumed_at": {"C01": 5}, "stage_seconds": "summed over the Dask workers "
                                                                               "(worker-seconds)"}
    (out / "summary.json").write_text(json.dumps(run))
    text = write_report(out).read_text()
    # C00's 7 slices and C01's last 2 (resumed at 5 of 7); C02 reused: 9 slices over the 4 s wall time
    assert re.search(r"<td>total</td><td>4\.000</td><td>2\.25<", text)
    assert "9 slices computed in 2 channel(s) (continuing an interrupted run: C01 from slice 5)" in text
    assert "not counted: C02" in text and "worker-seconds" in text
    result = types.SimpleNamespace(timings=run["timings_s"], out_dir=out, summary=run["summary"], resumed={},
                                   reused=[], outputs={}, report=None)
    _print_run(result)
    assert "in 4.0 s on cpu" in capsys.readouterr().out


def test_a_rerun_that_reused_every_channel_reports_no_throughput(tmp_path):
    import tifffile

    from gpuheart import Pipeline, PipelineConfig

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 4000, (5, 48, 48), dtype=np.uint16),
                     photometric="minisblack")
    cfg = PipelineConfig.from_dict({"progress": False, "segment": {"method": "dom"}, "mesh": {"enabled": False}})
    first = Pipeline(cfg).run(stack, tmp_path / "out")
    assert first.summary["this_run"]["computed"] == ["C00"] and first.summary["this_run"]["wall_s"] > 0
    again = Pipeline(cfg).run(stack, tmp_path / "out")
    assert again.summary["this_run"]["computed"] == [] and again.summary["this_run"]["reused"] == ["C00"]
    text = (tmp_path / "out" / "report.html").read_text()
    assert "0 slices computed in 0 channel(s); reused from an earlier run, not counted: C00" in text
    assert re.search(r"<td>total</td><td>[0-9.]+</td><td>–<", text)
    # other mesh settings: pass 2 kept, which is not an interrupted run continued
    cfg.mesh.enabled = True
    Pipeline(cfg).run(stack, tmp_path / "out")
    text = (tmp_path / "out" / "report.html").read_text()
    assert ("0 slices computed in 1 channel(s) (preprocessing and segmentation kept from an earlier run that "
            "differed only in the closing, mesh or graph settings: C00).") in text
    assert "interrupted" not in text


def test_a_mesh_picture_whose_decimation_stalls_is_clustered_coarser_not_scattered(monkeypatch):
    """An audit's real-stack mesh picture was 20,000 loose triangles: quadric decimation of the vertex-clustered
    mesh stopped at 4x the target, and the fallback drew an even subset of faces. Coarser clustering comes
    first now (here decimation is made to stall entirely)."""
    import fast_simplification
    from scipy import ndimage as ndi

    from gpuheart import mesh, report

    m = ndi.gaussian_filter(np.random.default_rng(0).random((20, 40, 40)), 1.5) > 0.52
    v, f = mesh.marching_cubes_volume(m)
    monkeypatch.setattr(fast_simplification, "simplify", lambda v, f, **kw: (v, f))
    v2, f2 = report._fewer_faces(v, f, len(f) // 10)
    assert 0 < len(f2) <= 2 * (len(f) // 10)   # what _fewer_faces accepts from a decimation, too
    # the corners are cell centres of a clustering, not marching-cubes vertices: a thinned surface, not a subset
    assert not set(map(tuple, v2[np.unique(f2)])) & set(map(tuple, v))


def test_a_report_written_again_draws_only_figures_whose_sources_changed(tmp_path, monkeypatch):
    """Every rerun of a finished run writes its report again, and a mesh picture took 3-12 s a channel to draw
    (nearly all of a reusing rerun's time): unchanged figures are kept, changed sources drawn again."""
    from gpuheart import report

    v = np.array([[x, y, z] for x in (0, 1) for y in (0, 2) for z in (0, 3)], dtype=float)
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    monkeypatch.setitem(sys.modules, "trimesh", types.SimpleNamespace(
        load=lambda p, force=None, **kw: types.SimpleNamespace(vertices=v, faces=faces)))
    real, saved = report._save, []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(path.name) or real(fig, path))
    out = make_run(tmp_path / "run")
    (out / "C00" / "mesh.glb").write_bytes(b"stub")

    def drawn():
        saved.clear()
        page = write_report(out)
        assert all((out / s).read_bytes()[:8] == PNG_MAGIC for s in img_sources(page))
        return sorted(saved)

    first = drawn()
    assert "C00_mesh.png" in first and "C01_mips.png" in first
    assert drawn() == []                                     # nothing changed: nothing drawn
    rng = np.random.default_rng(5)
    np.savez_compressed(out / "C00" / "figures.npz", **_figures(rng))   # the channel's figures.npz rewritten
    assert drawn() == ["C00_mips.png", "C00_overlay.png", "C00_profile.png"]
    tmp = out / "C00" / "mesh.glb.partial"   # a new mesh, renamed into place as the mesh stage writes it
    tmp.write_bytes(b"stub2")
    tmp.replace(out / "C00" / "mesh.glb")
    assert drawn() == ["C00_mesh.png"]
    run = json.loads((out / "summary.json").read_text())
    run["summary"]["C01"]["detrended_cv_raw"] = 0.5            # a number the slice-means figure shows
    (out / "summary.json").write_text(json.dumps(run))
    assert drawn() == ["C01_slice_means.png"]
    (out / "report" / "C00_mips.png").unlink()                  # a figure deleted by hand
    assert drawn() == ["C00_mips.png"]
    monkeypatch.setattr(report, "_CODE", "another version of report.py")
    assert drawn() == first                                     # how figures are drawn changed: all again


def test_a_clustered_mesh_far_over_the_picture_s_faces_is_clustered_coarser_before_decimation(tmp_path, monkeypatch):
    """Decimating a clustered million-face mesh stalled at 2-4x the picture's faces after seconds, and was
    retried on coarser grids: the clustered mesh is brought to about 10x the target first."""
    trimesh = pytest.importorskip("trimesh")
    from gpuheart import report

    sphere = trimesh.creation.icosphere(subdivisions=6, radius=10.0)            # 81920 faces
    sphere.export(tmp_path / "mesh.glb")
    drawn = []
    monkeypatch.setattr(report, "draw_mesh", lambda v, f, png, max_faces, n_faces, **kw: drawn.append(len(f)))
    monkeypatch.setattr(report, "_CLUSTER_ABOVE", 1000)
    report._mesh(tmp_path / "mesh.glb", tmp_path / "m.png", max_faces=500)
    first = len(report._cluster(np.asarray(sphere.vertices), np.asarray(sphere.faces), report._CLUSTER_GRID)[1])
    assert first > 10 * 500                                                      # the case in question
    assert 500 < drawn[0] < first / 4, (first, drawn)                            # about 10x: 17k here


def test_the_runs_own_page_says_its_total_stops_where_the_page_is_drawn(tmp_path):
    """The page said 'the total is the run's wall-clock time' beside 8 s where summary.json said 11 s: the page
    cannot hold its own drawing time, which summary.json adds afterwards."""
    from gpuheart import Pipeline, PipelineConfig
    from gpuheart.report import write_report

    cfg = PipelineConfig(progress=False, channels=["C00"])
    cfg.segment.method = "dom"
    cfg.mesh.enabled = cfg.graph.enabled = False
    r = Pipeline(cfg).run(None, tmp_path, phantom_preset="tiny")
    assert "up to drawing this page" in r.report.read_text()
    assert "up to drawing this page" not in write_report(tmp_path).read_text()   # summary.json has its seconds


def test_a_damaged_or_missing_mesh_file_is_said_not_left_out(tmp_path):
    """summary.json counts a mesh's faces, but a truncated (or deleted) mesh file left the page without its
    picture and without a word."""
    out = make_run(tmp_path / "run")
    s = json.loads((out / "summary.json").read_text())
    s["summary"]["C00"]["mesh"] = {"faces": 1200, "components": 1}
    (out / "summary.json").write_text(json.dumps(s))
    (out / "C00" / "mesh.glb").write_bytes(b"glTF truncated")
    text = write_report(out).read_text()
    assert f"{out / 'C00' / 'mesh.glb'} could not be read</b>: no picture of this channel's mesh" in text
    (out / "C00" / "mesh.glb").unlink()
    assert "its mesh file is missing</b>" in write_report(out).read_text()
    assert "could not be read" not in write_report(make_run(tmp_path / "run2")).read_text()   # no mesh run
