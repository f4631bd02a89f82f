"""U-Net inference throughput: 256x256 tiles per second through ``unet.predict``.

The target, quoted in the project's issue (not a gpuheart measurement): a plain 16-channel U-Net in bf16 did about
6,600 tiles/s on an H100.
Run as a script for a JSON result (``python benchmarks/bench_unet.py``), or under pytest-benchmark.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpuheart import backend, unet


def _model():
    import torch

    torch.manual_seed(0)
    try:
        return unet.load_default()
    except FileNotFoundError:  # benchmark the default architecture even before weights ship
        return unet.UNet()


def _slab(n_slices: int, size: int = 2048, device: str = "cpu"):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_slices, size, size), dtype=np.uint8)
    return backend.to_device(x, device)


_MODELS: dict = {}


def tiles_per_second(n_slices=1, size=1024, device="auto", overlap=0, repeats=2, amp=None, batch_size=None,
                     compile=None) -> dict:
    """Time ``predict`` on ``n_slices`` slices of ``size``² with 256 tiles (overlap 0: tiles = pixels / 256²).
    One model object per device, so a compiled model is compiled once (in the untimed warm-up)."""
    dev = backend.resolve_device(device)
    model, x = _MODELS.setdefault(dev, _model()), _slab(n_slices, size, dev)
    grid = unet.tile_grid((size, size), 256, overlap)
    n_tiles = n_slices * len(grid.starts_y) * len(grid.starts_x)
    kw = dict(tile=256, overlap=overlap, device=dev, amp=amp, batch_size=batch_size, compile=compile)
    t0 = time.perf_counter()
    unet.predict(model, x, **kw)  # warm-up (compilation, cuDNN autotune, allocations) on the shapes timed below
    warmup = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        if dev == "cuda":
            import cupy

            cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        unet.predict(model, x, **kw)
        if dev == "cuda":
            cupy.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"device": dev, "tiles": n_tiles, "seconds": best, "tiles_per_s": n_tiles / best,
            "bf16": dev == "cuda" if amp is None else bool(amp) and (dev == "cuda" or unet._cpu_bf16()),
            "compiled": unet._use_compile(compile, __import__("torch").device(dev)), "warmup_s": warmup}


def inference_tile_vs_256(size: int, repeats: int = 3) -> dict:
    """Seconds for one ``size``² slice with the pipeline's default tiles (the model's training tile, overlap a
    quarter of it) and with 256-pixel tiles (overlap 64), interleaved in one run (best of ``repeats``)."""
    model, x = _model(), _slab(1, size)[0]
    train_tile, train_overlap = unet.inference_tile(model)
    cases = {"training_tile": dict(tile=train_tile, overlap=train_overlap), "tile256": dict(tile=256, overlap=64)}
    best = {k: float("inf") for k in cases}
    for kw in cases.values():
        unet.predict(model, x, device="cpu", **kw)   # warm-up
    for _ in range(repeats):
        for k, kw in cases.items():
            t0 = time.perf_counter()
            unet.predict(model, x, device="cpu", **kw)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {"size": size, "training_tile": train_tile, "seconds": best,
            "ratio_training_over_256": best["training_tile"] / best["tile256"]}


def test_unet_inference_cpu(benchmark):
    model, x = _model(), _slab(1, 512)
    benchmark.pedantic(unet.predict, args=(model, x), kwargs=dict(tile=256, overlap=0, device="cpu"),
                       rounds=2, iterations=1)


@pytest.mark.skipif(not backend.cuda_available(), reason="needs a CUDA device")
def test_unet_inference_cuda(benchmark):
    import cupy

    model, x = _model(), _slab(8, 2048, "cuda")

    def run():
        unet.predict(model, x, tile=256, overlap=0, device="cuda")
        cupy.cuda.Device().synchronize()

    run()
    benchmark.pedantic(run, rounds=3, iterations=1)


def cuda_sweep() -> list[dict]:
    """Tiles/s on the GPU of the uncompiled model for fixed batch sizes, side by side in one run: the data to
    check the automatic batch size against. (Compiled, each batch shape would compile again: ~20 s each.)
    cuDNN autotuning made no difference on an H200 (2026-11-27), so it is no longer swept."""
    rows = []
    for bs in (64, 256, 512, None):
        r = tiles_per_second(n_slices=8, size=2048, device="cuda", batch_size=bs, compile=False)
        rows.append({"compiled": False, "batch_size": bs or "auto", "tiles_per_s": round(r["tiles_per_s"])})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    dev = backend.resolve_device("auto")
    r = tiles_per_second(n_slices=8 if dev == "cuda" else 1, size=2048 if dev == "cuda" else 1024, device=dev)
    name = "cuda" if dev == "cuda" else "cpu"
    if dev == "cpu":  # measured side by side: fp32 (the CPU default) and bf16 autocast (opt-in)
        r["bf16_autocast"] = tiles_per_second(n_slices=1, size=1024, device=dev, amp=True)
        r["bf16_speedup"] = r["bf16_autocast"]["tiles_per_s"] / r["tiles_per_s"]
        # what the pipeline's default inference tile costs against 256-pixel tiles, on a large and a small slice
        r["inference_tile_vs_256"] = [inference_tile_vs_256(s) for s in (1024, 256)]
    if dev == "cuda":
        import cupy

        r["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from conftest import slug

        r["device_label"], r["device_name"] = slug(r["gpu"]), r["gpu"]   # as the other results
        r["auto_batch_size"] = unet._auto_batch_size(_model(), 256, __import__("torch").device("cuda"))
        # side by side in this run: the same predict with torch.compile off (the default before 2026-11-27)
        r["uncompiled"] = tiles_per_second(n_slices=8, size=2048, device=dev, compile=False)
        r["compiled_speedup"] = r["tiles_per_s"] / r["uncompiled"]["tiles_per_s"]
        r["sweep"] = cuda_sweep()
    r.update(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
             torch_threads=__import__("torch").get_num_threads(), date=time.strftime("%Y-%m-%d"))
    # GPUHEART_BENCH_RESULTS, as for the pytest-benchmark results: a session's run does not replace committed files
    results = Path(os.environ.get("GPUHEART_BENCH_RESULTS") or Path(__file__).parent / "results")
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{r.get('device_label', name)}-unet.json"
    out.write_text(json.dumps(r, indent=2))
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    import argparse

    # --help (or a stray argument) must not run the benchmark and overwrite the committed result
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.exit(main())
