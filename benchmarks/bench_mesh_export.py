"""Mesh output, new against old side by side: the GLB's Unity nodes and the report's mesh picture.

    python benchmarks/bench_mesh_export.py [--repeats 2] [--mask OUT/C02/mask.ome.zarr ...] [--out FILE]

*GLB nodes* (:func:`gpuheart.mesh.export_mesh`): the faces are cut into nodes of at most 65,535 vertices along a
Z-order curve (:func:`gpuheart.mesh._spatial_order`); before, they were cut in marching-cubes order, long thin
strips through the volume whose cut vertices are written once per node they touch. Old = ``_spatial_order``
replaced by the identity. Recorded: vertices written over the mesh's vertices, GLB bytes, seconds to export.

*Mesh picture* (:func:`gpuheart.report._mesh`, the report's ``mesh.png``): a mesh over 400k faces is vertex-clustered
on a 192-cell grid; a clustered mesh still over 10x the picture's 20,000 faces is now clustered again to about
that before the quadric decimation, which on a clustered (not manifold) mesh stalled and was retried on coarser
grids. Old = ``report._RECLUSTER_FACTOR = None``. Recorded: seconds, faces drawn.

Cases: marching cubes of synthetic vessel masks (benchmarks/bench_thin.py's tubes, and its dense mask with
tunnels), and with ``--mask`` a pipeline's mask (marching cubes of its first channel at the scan's voxel size, as
the mesh stage makes it before any decimation; a mesh file would not do: a GLB's faces are already in Z-order). Old and new run in turn, ``--repeats`` times (best of).
Writes benchmarks/results/cpu-mesh-export.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu-mesh-export.json"


def synthetic_cases():
    from bench_thin import dense, tubes
    from gpuheart.mesh import marching_cubes_volume

    shape, vs = (48, 768, 768), (4.0, 1.0, 1.0)
    yield "tubes r 3-12 um, 48x768x768 at 4x1x1 um", marching_cubes_volume(tubes(shape, vs, 200, (3.0, 12.0), 0), vs)
    yield "dense with tunnels, 48x768x768 at 4x1x1 um", marching_cubes_volume(dense(shape, 1), vs)


def mask_case(path):
    import bench_thin
    from gpuheart.mesh import marching_cubes_volume

    name, m, vs = bench_thin.mask_case(path)
    return name, marching_cubes_volume(m, vs)


@contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _glb(v, f, folder: Path, spatial: bool) -> dict:
    from gpuheart import mesh as M

    identity = (lambda vertices, faces, chunk=0: np.arange(len(faces)))
    with _patched(M, "_spatial_order", M._spatial_order if spatial else identity):
        t = time.perf_counter()
        size = M.export_mesh(v, f, folder / "m.glb")
        s = time.perf_counter() - t
        written = sum(len(pv) for pv, _ in M.split_for_unity(v, f))
    return {"s": round(s, 3), "bytes": size, "vertices_written": written,
            "vertices_written_per_vertex": round(written / len(v), 3)}


def _picture(mesh_file: Path, folder: Path, recluster: bool) -> dict:
    from gpuheart import report as R

    with _patched(R, "_RECLUSTER_FACTOR", R._RECLUSTER_FACTOR if recluster else None):
        t = time.perf_counter()
        R._mesh(mesh_file, folder / "mesh.png")
        return {"s": round(time.perf_counter() - t, 3)}


def measure(name, v, f, repeats, folder: Path) -> dict:
    import trimesh

    mesh_file = folder / "mesh.ply"
    trimesh.Trimesh(v, f, process=False).export(mesh_file)
    glb = {"old": [], "new": []}
    pic = {"old": [], "new": []}
    for _ in range(repeats):
        for key, new in (("old", False), ("new", True)):
            glb[key].append(_glb(v, f, folder, spatial=new))
            pic[key].append(_picture(mesh_file, folder, recluster=new))

    def best(rows):
        return min(rows, key=lambda r: r["s"])

    row = {"case": name, "vertices": len(v), "faces": len(f),
           "glb": {k: {"runs_s": [r["s"] for r in rs], **best(rs)} for k, rs in glb.items()},
           "picture": {k: {"runs_s": [r["s"] for r in rs], **best(rs)} for k, rs in pic.items()}}
    g, p = row["glb"], row["picture"]
    row["glb_bytes_new_over_old"] = round(g["new"]["bytes"] / g["old"]["bytes"], 3)
    row["glb_export_speedup"] = round(g["old"]["s"] / g["new"]["s"], 2)
    row["picture_speedup"] = round(p["old"]["s"] / p["new"]["s"], 2)
    print(f"{name}: {len(v):,} vertices, {len(f):,} faces; GLB vertices written "
          f"{g['old']['vertices_written_per_vertex']}x -> {g['new']['vertices_written_per_vertex']}x, bytes "
          f"{row['glb_bytes_new_over_old']}x, export {row['glb_export_speedup']}x faster; picture "
          f"{p['old']['s']} -> {p['new']['s']} s ({row['picture_speedup']}x)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mask", action="append", default=[], help="a pipeline's mask.ome.zarr (repeatable)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from conftest import machine_info, write_result

    cases = [mask_case(p) for p in args.mask] + list(synthetic_cases())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (v, f) in cases:
            rows.append(measure(name, v, f, args.repeats, Path(tmp)))
    doc = {"kind": "mesh-export",
           "benchmark": "GLB nodes for Unity cut along a Z-order curve against marching-cubes order, and the "
                        "report's mesh picture with and without re-clustering to ~10x its faces before "
                        "decimation; old then new in turn in one process",
           "date": datetime.now(timezone.utc).isoformat(), "machine": machine_info("cpu"),
           "notes": [f"best of {args.repeats} interleaved repeats; 'vertices_written_per_vertex': vertices in all "
                     "GLB nodes over the mesh's vertices (those on a cut between nodes are written once per node)"],
           "cases": rows}
    write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
