"""Launch-shape sweep of the uint16 15x15 sliding-histogram median (median_hist16) on a GPU.

For each (coarse bins in the fine band, rows per block, warps per block) the kernel
source is compiled with those #defines and run on the benchmark's 2048x2048 slice
(``bench_filters.make_slice``), checked equal to the CPU median, and timed with CUDA events (median of
``--reps`` launches, data on the device). Diagnostics for choosing the shipped defines, not a benchmark
of record: ``bench_gpu_baselines.py`` times the shipped kernel against cupyx and cuCIM.

    python benchmarks/gpu_median_sweep.py OUT.json [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_filters import make_slice  # noqa: E402

from gpuheart import backend, filters  # noqa: E402


# --ablate: the kernel with one part cut out (wrong answers, timing only), to see where its time goes,
# and exact variants (other ways to do the same: centred_band, select_loads, separate_rebuild), to see what they buy.
_SEARCH = ("const int low = gh_select256(fine + (m & (B - 1)) * 64, kth - lb, g, lane, fb);", "const int low = fb = 0;")
_REBUILD = ("if (__any_sync(0xFFFFFFFFu, out)) {", "if (false && __any_sync(0xFFFFFFFFu, out)) {")
_UPDATES = [("if ((unsigned int)(co - F) < (unsigned int)B) gh_iadd(fine", "if (false) gh_iadd(fine"),
            ("if ((unsigned int)(cn - F) < (unsigned int)B) gh_iadd(fine", "if (false) gh_iadd(fine")]
EXACT = ("none", "centred_band", "select_loads", "separate_rebuild")
ABLATIONS = {
    "none": [], "no_fine_search": [_SEARCH], "no_rebuild": [_REBUILD], "no_fine_updates": _UPDATES,
    "coarse_only": [_SEARCH, _REBUILD] + _UPDATES,
    # the band rebuilt centred on the median instead of ahead of its drift
    "centred_band": [("const int behind = F < 0 ? B / 2 - 1 : out ? (m >= F + B ? 1 : B - 2) : (d < B / 2 ? B - 3 : 2);",
                      "const int behind = B / 2 - 1;")],
    # a column rebuilds only when its own median leaves its band, not also when the other column of its warp does
    "separate_rebuild": [("const int rebuild = out || d < 2 || d >= B - 2;", "const int rebuild = out;")],
    # a search's lane sums from four uint4 loads per lane instead of three shuffles
    "select_loads": [("""    const uint4 v = reinterpret_cast<const uint4*>(h)[g];
    unsigned int t = v.x + v.y + v.z + v.w;
    t += __shfl_xor_sync(0xFFFFFFFFu, t, 1, 16);
    t += __shfl_xor_sync(0xFFFFFFFFu, t, 2, 16);
    const int s = (int)((__shfl_sync(0xFFFFFFFFu, t, (g & 3) * 4, 16) >> (8 * (g >> 2))) & 0xFFu);""",
                      """    const uint4* hq = reinterpret_cast<const uint4*>(h) + (g & 3) * 4;
    const uint4 v0 = hq[0], v1 = hq[1], v2 = hq[2], v3 = hq[3];
    const unsigned int t = v0.x + v0.y + v0.z + v0.w + v1.x + v1.y + v1.z + v1.w + v2.x + v2.y + v2.z + v2.w
                         + v3.x + v3.y + v3.z + v3.w;
    const int s = (int)((t >> (8 * (g >> 2))) & 0xFFu);""")],
}


def _source(defines: dict[str, int], ablation: str = "none") -> str:
    src = backend.kernel_source("median.cu")
    for name, value in defines.items():
        src, n = re.subn(rf"#define {name} \d+", f"#define {name} {value}", src)
        assert n == 1, name
    for old, new in ABLATIONS[ablation]:
        assert src.count(old) == 1, (ablation, old)
        src = src.replace(old, new)
    return src


def _time(cp, launch, reps: int) -> float:
    launch()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        launch()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--size", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="the default shape and its neighbours only")
    ap.add_argument("--ablate", action="store_true", help="the default shape with parts cut out (see ABLATIONS)")
    args = ap.parse_args()
    import cupy as cp

    size = args.size
    host = make_slice("uint16", (2048, 2048))
    ref = filters.median(host, size)
    x = cp.asarray(host)
    out = cp.empty_like(x)
    rows_map, cols_map = (cp.asarray(m) for m in filters._border_maps(2048, 2048, size // 2, "reflect"))
    h = w = 2048
    results = []
    grid_band = (4, 8, 16)
    grid_rows = (32, 64)
    grid_warps = (2, 4, 8)
    shapes = list(itertools.product(grid_band, grid_rows, grid_warps))
    default = (8, 64, 4)
    shapes.sort(key=lambda s: sum(a != b for a, b in zip(s, default)))  # the default and its neighbours first
    if args.quick:
        shapes = [s for s in shapes if sum(a != b for a, b in zip(s, default)) <= 1]
    runs = [(s, "none") for s in shapes]
    if args.ablate:
        runs = [(default, a) for a in ABLATIONS]
    for (band, rows, warps), ablation in runs:
        entry = {"band": band, "rows": rows, "warps": warps, "ablation": ablation}
        try:
            t0 = time.perf_counter()
            mod = cp.RawModule(code=_source({"GH_H16_WARPS": warps, "GH_H16_ROWS": rows, "GH_H16_BAND": band}, ablation),
                               options=backend.NVRTC_OPTIONS, name_expressions=["median_hist16"])
            kern = mod.get_function("median_hist16")
            entry["compile_s"] = round(time.perf_counter() - t0, 2)
            for attr in ("num_regs", "shared_size_bytes", "local_size_bytes"):  # spills show as local bytes
                entry[attr] = getattr(kern, attr, None)
            cols = warps * 32 // 16
            grid = (-(-w // cols), -(-h // rows), 1)
            block = (warps * 32, 1, 1)
            argv = (x, out, rows_map, cols_map, np.int32(h), np.int32(w), np.uint32(0), np.int32(size))

            def launch():
                kern(grid, block, argv)

            out.fill(0)
            entry["ms"] = round(_time(cp, launch, args.reps), 4)
            entry["exact"] = bool((out.get() == ref).all())
        except Exception as exc:  # a shape whose shared memory exceeds the static limit, say
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(entry, flush=True)
        results.append(entry)
        _write(args, cp, results)  # after every shape: a run cut short keeps what it measured
    print("best", _write(args, cp, results)["best"])


def _write(args, cp, results) -> dict:
    ok = [r for r in results if r.get("exact") and r["ablation"] in EXACT]
    doc = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "size": args.size,
           "slice": "bench_filters.make_slice('uint16', (2048, 2048))", "reps": args.reps,
           "results": results, "best": min(ok, key=lambda r: r["ms"]) if ok else None}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
