"""exposure benchmarks: CLAHE (ours vs scikit-image) on 2048 x 2048 slices, CLAHE + robust scaling fused
vs as two steps, slice_stats.

pytest-benchmark:   python -m pytest benchmarks/bench_exposure.py --benchmark-only
side-by-side ratios: python benchmarks/bench_exposure.py   (writes benchmarks/results/cpu-exposure.json)
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

SIZE = 2048
RESULTS = Path(__file__).resolve().parent / "results" / "cpu-exposure.json"


def make_slice(dtype, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A light-sheet-like slice: dark tissue with a bright sparse tail (so CLAHE really clips)."""
    u = np.random.default_rng(seed).random((size, size)) ** 3
    if np.dtype(dtype) == np.uint16:
        return (u * 30000 + 300).astype(np.uint16)
    return u.astype(dtype)


def _sk_clahe(x):
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(x, kernel_size=32, clip_limit=0.01)


def _our_clahe(x):
    from gpuheart.exposure import clahe

    return clahe(x, clip_limit=0.01, kernel_size=32)


@pytest.fixture(scope="module", params=["uint16", "float32"])
def slice2048(request):
    x = make_slice(np.dtype(request.param))
    _our_clahe(x[:256, :256])  # numba compile / cache load outside the timing
    return x


def test_clahe_ours(benchmark, slice2048):
    benchmark(_our_clahe, slice2048)


def _two_steps(x):
    from gpuheart.exposure import clahe, robust_scale

    return robust_scale(clahe(x, clip_limit=0.01, kernel_size=32))


def _fused(x):
    from gpuheart.exposure import clahe_robust_scale

    return clahe_robust_scale(x, clip_limit=0.01, kernel_size=32)


def test_clahe_robust_fused(benchmark, slice2048):
    benchmark(_fused, slice2048)


def test_clahe_robust_two_steps(benchmark, slice2048):
    benchmark(_two_steps, slice2048)


def test_clahe_skimage(benchmark, slice2048):
    benchmark.pedantic(_sk_clahe, args=(slice2048,), rounds=3, iterations=1)


def test_slice_stats(benchmark, slice2048):
    from gpuheart.exposure import slice_stats

    benchmark(slice_stats, slice2048)


# -- script mode: ratios measured side by side ----------------------------------------------------

def best_of(f, *args, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> dict:
    import numba
    import skimage

    from gpuheart.exposure import slice_stats

    out = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count(), "numba_threads": numba.get_num_threads(),
                       "python": sys.version.split()[0], "numpy": np.__version__,
                       "scikit-image": skimage.__version__, "numba": numba.__version__,
                       "load_avg_1min": os.getloadavg()[0]},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "shape": [SIZE, SIZE], "clahe": {"clip_limit": 0.01, "kernel_size": 32, "nbins": 256},
           "timing": "best of 3, seconds; ours and skimage interleaved in the same process (fused vs two steps: best of 5, interleaved)", "results": {}}
    for dtype in ("uint16", "float32"):
        x = make_slice(np.dtype(dtype))
        same = float(np.abs(_our_clahe(x) - _sk_clahe(x).astype(np.float32)).max())  # also warms up
        # interleaved rounds, so a burst of load from other users hits both sides alike
        rounds = [(best_of(_our_clahe, x, repeat=1), best_of(_sk_clahe, x, repeat=1)) for _ in range(3)]
        ours, sk = min(r[0] for r in rounds), min(r[1] for r in rounds)
        assert np.array_equal(_fused(x), _two_steps(x))  # also warms up
        pairs = [(best_of(_fused, x, repeat=1), best_of(_two_steps, x, repeat=1)) for _ in range(5)]
        fused, two = min(p[0] for p in pairs), min(p[1] for p in pairs)
        stats = best_of(slice_stats, x)
        pct = best_of(np.percentile, x, [1, 25, 50, 75, 99])
        out["results"][dtype] = {"clahe_ours_s": ours, "clahe_skimage_s": sk, "clahe_speedup": sk / ours,
                                 "clahe_max_abs_diff_vs_skimage": same, "slice_stats_s": stats,
                                 "np_percentile_5q_s": pct, "clahe_robust_fused_s": fused,
                                 "clahe_then_robust_scale_s": two, "fused_speedup": two / fused}
        print(f"{dtype}: clahe ours {ours * 1e3:.1f} ms, skimage {sk * 1e3:.1f} ms -> {sk / ours:.1f}x "
              f"(max diff {same:g}); + robust scale fused {fused * 1e3:.1f} ms vs two steps {two * 1e3:.1f} ms; slice_stats {stats * 1e3:.1f} ms (np.percentile alone {pct * 1e3:.1f} ms)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return out


if __name__ == "__main__":
    import argparse

    # --help (or a stray argument) must not run the benchmark and overwrite the committed result
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
