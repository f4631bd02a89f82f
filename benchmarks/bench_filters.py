"""Median filter speed on a 2048 x 2048 slice: gpuheart vs scipy.ndimage vs OpenCV.

pytest-benchmark:  python -m pytest benchmarks/bench_filters.py --benchmark-only
script (ratios, side by side, best of a few runs; writes benchmarks/results/cpu-filters.json):
                   python benchmarks/bench_filters.py
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

SHAPE = (2048, 2048)
SIZES = (3, 15)
DTYPES = ("uint8", "uint16")
RESULTS = Path(__file__).resolve().parent / "results" / "cpu-filters.json"


def make_slice(dtype: str, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Smooth structure + vessel-like lines + noise (a fixed seed), spanning most of the range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    img = 0.35 + 0.2 * np.sin(xx / 40.0) * np.cos(yy / 55.0)
    img += 0.3 * (np.abs(np.sin((xx + 0.3 * yy) / 25.0)) < 0.05)
    img += rng.normal(0, 0.05, shape).astype(np.float32)
    hi = np.iinfo(dtype).max
    return np.clip(img * hi, 0, hi).astype(dtype)


def impls():
    import cv2
    import scipy.ndimage as ndi

    from gpuheart.filters import median

    return {
        "gpuheart": lambda x, s: median(x, s),
        "scipy": lambda x, s: ndi.median_filter(x, size=s),
        "opencv": lambda x, s: cv2.medianBlur(x, s),
    }


def opencv_supports(dtype: str, size: int) -> bool:
    return dtype == "uint8" or size <= 5


# -- pytest-benchmark ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=DTYPES)
def image(request):
    return make_slice(request.param)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", ["gpuheart", "scipy", "opencv"])
def test_median_2048(benchmark, image, impl, size):
    dtype = image.dtype.name
    if impl == "opencv" and not opencv_supports(dtype, size):
        pytest.skip(f"cv2.medianBlur has no {dtype} {size}x{size}")
    f = impls()[impl]
    f(image[:64, :64], size)  # compile/warm numba outside the timing
    benchmark.group = f"median {dtype} {size}x{size}"
    if impl == "scipy" and size > 5:
        benchmark.pedantic(f, args=(image, size), rounds=1, iterations=1)
    else:
        benchmark(f, image, size)


# -- script mode: side-by-side ratios -----------------------------------------------------------

def best_of(f, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(runs: int = 5, slow_runs: int = 2) -> dict:
    fs = impls()
    rows = []
    for dtype in DTYPES:
        x = make_slice(dtype)
        for size in SIZES:
            fs["gpuheart"](x[:64, :64], size)
            t = {}
            for name, f in fs.items():
                if name == "opencv" and not opencv_supports(dtype, size):
                    continue
                n = slow_runs if name == "scipy" and size > 5 else runs
                t[name] = best_of(lambda: f(x, size), n)
            row = {"dtype": dtype, "size": size, "seconds": t,
                   "speedup_vs_scipy": t["scipy"] / t["gpuheart"],
                   "ratio_to_opencv": t["gpuheart"] / t["opencv"] if "opencv" in t else None}
            print(f"{dtype:6s} {size:2d}x{size:<2d} " + "  ".join(f"{k} {v * 1e3:9.2f} ms" for k, v in t.items())
                  + f"  | {row['speedup_vs_scipy']:.1f}x faster than scipy"
                  + (f", {row['ratio_to_opencv']:.2f}x OpenCV's time" if row["ratio_to_opencv"] else ""))
            rows.append(row)
    return rows


def main() -> int:
    import cv2
    import numba
    import scipy

    rows = measure()
    doc = {
        "benchmark": "median filter, 2048x2048 slice, mode=reflect (OpenCV: replicate, no fix-up)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"processor": platform.processor(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "numba_threads": numba.get_num_threads(), "opencv_threads": cv2.getNumThreads()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "scipy": scipy.__version__, "opencv": cv2.__version__, "numba": numba.__version__},
        "note": "times are the best of several runs, all measured side by side in one process",
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    import argparse

    # --help (or a stray argument) must not run the benchmark and overwrite the committed result
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
