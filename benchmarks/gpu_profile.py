"""Where the GPU time goes: U-Net forward variants and the per-slice chain, by kernel (diagnostics for a lent GPU).

    PYTHONPATH=. python3 benchmarks/gpu_profile.py OUT.json [--only chain|unet]

Not a benchmark of record: it answers "what to change" questions. U-Net: 256 tiles of 256x256 through the
shipped model in several precision / memory-layout / compile variants, forward only, each best of 10 after
warm-up, with the fraction of mask pixels each variant flips against fp32 on real preprocessed tiles.
Chain: each step's GPU time (CUDA events) against its wall time (host overhead and synchronizations),
and the top kernels by GPU time under torch.profiler (CUPTI sees CuPy's kernels too).
"""
from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _sibling(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_p_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _time_cuda(fn, warm=3, reps=10):
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _real_tiles(n=256):
    """Preprocessed 256x256 tiles from a labelled stack (uint8 0-255 -> [0, 1]), else the phantom."""
    import cupy as cp

    from gpuheart import exposure
    from gpuheart.io import open_scan

    import os
    data = Path(os.environ.get("GPUHEART_DATA", ".gpu-carry/data"))
    files = sorted(data.glob("*/*.tif"))
    files = [f for f in files if "label" not in f.name.lower() and "mask" not in f.name.lower()]
    tiles = []
    for f in files:
        try:
            with open_scan(f) as s:
                vol = s.read_slab(0, 0, min(s.shape[0], 16))
        except Exception:
            continue
        if vol.ndim != 3 or min(vol.shape[1:]) < 256:
            continue
        pre = cp.asnumpy(exposure.preprocess_volume(vol))
        for k in range(pre.shape[0]):
            tiles.append(pre[k, :256, :256])
            if len(tiles) >= n:
                break
        if len(tiles) >= n:
            break
    src = f"{len(tiles)} tiles from {files[0].parent.name if files else 'none'}"
    while len(tiles) < n:
        tiles.append(np.random.default_rng(len(tiles)).integers(0, 256, (256, 256), np.uint8))
    return np.stack(tiles)[:, None].astype(np.float32) / 255, src


def unet_variants(out):
    import torch

    from gpuheart import unet

    dev = torch.device("cuda")
    base = unet.load_default().to(dev).eval()
    thr = float((getattr(base, "meta", None) or {}).get("threshold", 0.5))
    tiles, src = _real_tiles()
    out["tiles_source"] = src
    x32 = torch.from_numpy(tiles).to(dev)
    with torch.inference_mode():
        ref = torch.sigmoid(base(x32)).float() > thr
    cl = torch.channels_last

    def no_norm(m):
        m = copy.deepcopy(m)
        for name, mod in list(m.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, torch.nn.GroupNorm):
                    setattr(mod, cname, torch.nn.Identity())
        return m

    variants = {
        "fp32 NCHW": (lambda: base, torch.float32, False, None),
        "autocast bf16 channels_last (predict today)": (lambda: base.to(memory_format=cl), torch.float32, True, cl),
        "autocast bf16 NCHW": (lambda: base.to(memory_format=torch.contiguous_format), torch.float32, True, None),
        "bf16 weights channels_last": (lambda: copy.deepcopy(base).to(torch.bfloat16, memory_format=cl),
                                       torch.bfloat16, False, cl),
        "bf16 weights NCHW": (lambda: copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16, False, None),
        "fp16 weights channels_last": (lambda: copy.deepcopy(base).to(torch.float16, memory_format=cl),
                                       torch.float16, False, cl),
        "no GroupNorm (diagnostic) autocast bf16 channels_last": (lambda: no_norm(base).to(memory_format=cl),
                                                                   torch.float32, True, cl),
        "torch.compile autocast bf16 channels_last": ("compile", torch.float32, True, cl),
        "torch.compile bf16 weights channels_last": ("compile-bf16", torch.bfloat16, False, cl),
    }
    rows = []
    for name, (make, dtype, amp, fmt) in variants.items():
        row = {"variant": name}
        try:
            t0 = time.perf_counter()
            if make == "compile":
                model = torch.compile(copy.deepcopy(base).to(memory_format=cl))
            elif make == "compile-bf16":
                model = torch.compile(copy.deepcopy(base).to(torch.bfloat16, memory_format=cl))
            else:
                model = make()
            x = x32.to(dtype)
            x = x.contiguous(memory_format=fmt) if fmt is not None else x

            def fwd():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    return model(x)

            first = fwd()
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            s = _time_cuda(fwd)
            row["tiles_per_s"] = round(x.shape[0] / s)
            with torch.inference_mode():
                row["mask_pixels_flipped_vs_fp32"] = float(((torch.sigmoid(first.float()) > thr) != ref)
                                                           .float().mean())
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        print(row, flush=True)
        rows.append(row)
    out["unet_forward_256_tiles"] = rows
    # the kernels of today's predict path, forward only
    model = base.to(memory_format=cl)
    x = x32.contiguous(memory_format=cl)

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    out["unet_top_kernels"] = _top_kernels(forward, 3, 15)


def chain_profile(out):
    import cupy as cp

    from gpuheart import exposure, filters, segment

    x = cp.asarray(_sibling("bench_exposure").make_slice(np.uint16))
    znorm = exposure.ZNorm.from_stats([exposure.slice_stats(x.get(), z=0)])
    x3 = x[None]
    cfg = exposure.ExposureConfig()
    scale = cfg.asinh_scale or znorm.scale or 1.0
    stretched = exposure._znorm_asinh_cuda(x3, znorm, 0, True, scale)
    pre = exposure.preprocess(x3, znorm, 0)
    dom = filters.difference_of_medians(pre, 3, 15)
    steps = {
        "znorm+asinh": lambda: exposure._znorm_asinh_cuda(x3, znorm, 0, True, scale),
        "clahe+robust (float32 in)": lambda: exposure.clahe_robust_scale(stretched, cfg.clip_limit, cfg.kernel_size,
                                                                        low=cfg.robust_low, high=cfg.robust_high),
        "clahe (uint16 in)": lambda: exposure.clahe(x3),
        "preprocess": lambda: exposure.preprocess(x3, znorm, 0),
        "median 3x3 u8": lambda: filters.median(pre, 3),
        "median 15x15 u8": lambda: filters.median(pre, 15),
        "median 3x3 u16": lambda: filters.median(x3, 3),
        "difference_of_medians": lambda: filters.difference_of_medians(pre, 3, 15),
        "dom_thresholds otsu": lambda: segment.dom_thresholds(dom, "otsu"),
        "threshold compare": lambda: dom > segment.dom_thresholds(dom, "otsu"),
    }
    rows = []
    for name, f in steps.items():
        row = {"step": name}
        try:
            wall = _time_cuda(f, warm=3, reps=20)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            gpu = []
            for _ in range(10):
                start.record()
                f()
                end.record()
                end.synchronize()
                gpu.append(cp.cuda.get_elapsed_time(start, end))
            row.update(wall_ms=round(wall * 1e3, 3), events_ms=round(min(gpu), 3))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        print(row, flush=True)
        rows.append(row)
    out["chain_steps_2048_uint16"] = rows

    def chain():
        p = exposure.preprocess(x3, znorm, 0)
        d = filters.difference_of_medians(p, 3, 15)
        return d > segment.dom_thresholds(d, "otsu")

    out["chain_top_kernels"] = _top_kernels(chain, 5, 25, cpu=True)
    host = {name: steps[name] for name in ("clahe (uint16 in)", "preprocess", "median 3x3 u8",
                                           "dom_thresholds otsu")}
    host["chain"] = chain
    out["chain_host_profile"] = {name: _host_profile(f) for name, f in host.items()}


def _host_profile(fn, calls: int = 50, rows: int = 15) -> list[dict]:
    """Where the host time of ``calls`` calls of ``fn`` goes (cProfile, by own time per call): the steps
    whose wall clock is far above their kernels' are host-bound, and this names the Python behind it."""
    import cProfile
    import pstats

    import cupy as cp

    fn()
    cp.cuda.get_current_stream().synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    cp.cuda.get_current_stream().synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:rows]
    return [{"function": f"{Path(f).name}:{line}:{name}", "calls_per_call": round(nc / calls, 2),
             "own_us_per_call": round(tt / calls * 1e6, 1), "cumulative_us_per_call": round(ct / calls * 1e6, 1)}
            for (f, line, name), (_, nc, tt, ct, _) in top]


def _top_kernels(fn, calls: int, rows: int, cpu: bool = False) -> str:
    """torch.profiler's table of the kernels ``calls`` calls of ``fn`` ran (CUPTI sees CuPy's too), by GPU
    time; the error, as text, where profiling fails."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
        with profile(activities=acts) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
    except Exception as err:
        table = f"{type(err).__name__}: {err}"
    print(table, flush=True)
    return table


def main():
    import cupy as cp

    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="gpu-profile.json")
    ap.add_argument("--only", choices=("chain", "unet"), help="one part (default: both)")
    args = ap.parse_args()
    dest = Path(args.out)
    gpu = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    from conftest import slug

    label = slug(gpu)
    out = {"kind": "gpu-profile", "gpu": gpu, "device_label": label, "device_name": gpu,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    parts = {"chain": chain_profile, "unet": unet_variants}
    for part in [parts[args.only]] if args.only else parts.values():
        try:
            part(out)
        except Exception:
            out[f"{part.__name__}_error"] = traceback.format_exc()[-2000:]
            print(out[f"{part.__name__}_error"], flush=True)
        dest.write_text(json.dumps(out, indent=2))
    print("wrote", dest)


if __name__ == "__main__":
    main()
