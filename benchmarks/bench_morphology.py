"""The paper's closings (z-line 1x1x5 five times, then one 3x3x3 cube) on a vessel-like mask:
gpuheart vs scipy.ndimage (CPU) and vs cupyx.scipy.ndimage (GPU).

pytest-benchmark:  python -m pytest benchmarks/bench_morphology.py --benchmark-only
                   (the GPU entries skip, with the reason, without CUDA)
script (CPU ratios, side by side, best of a few runs; writes benchmarks/results/cpu-morphology.json):
                   python benchmarks/bench_morphology.py [--slices 48 --size 1024]

The baseline is what anyone would write with SciPy: edge-pad, ``binary_dilation`` then ``binary_erosion``
with the structuring element and ``iterations``, crop. gpuheart's host path (``morphology.postprocess``)
gives the same voxels by separable running max/min filters; the script checks they are equal before timing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

RESULTS = Path(__file__).resolve().parent / "results" / "cpu-morphology.json"
SHAPE = (48, 1024, 1024)
Z_SIZE, Z_ITER, CUBE = 5, 5, 3


def make_mask(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Vessel-like: thin oblique bands drifting with z (about 8 % of the voxels), 10 % of their pixels
    dropped at random (noise holes) and two whole slices missing (laser dropout), which the closings fill."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    out = np.empty(shape, bool)
    for z in range(nz):
        phase = np.abs(np.sin((xx + 0.3 * yy + 2.0 * z) / 25.0)) < 0.06
        phase |= np.abs(np.sin((0.2 * xx - yy - 1.5 * z) / 40.0)) < 0.04
        out[z] = phase & (rng.random((ny, nx)) > 0.1)
    out[[nz // 3, 2 * nz // 3]] = False
    return out


def scipy_closings(mask: np.ndarray) -> np.ndarray:
    import scipy.ndimage as ndi

    return _reference(mask, ndi, np)


def cupyx_closings(mask):
    import cupy as cp
    import cupyx.scipy.ndimage as cndi

    return _reference(mask, cndi, cp)


def _reference(mask, ndi, xp):
    r = 2 * (Z_SIZE // 2) * Z_ITER
    line = xp.ones((Z_SIZE, 1, 1), bool)
    p = xp.pad(mask, ((r, r), (0, 0), (0, 0)), mode="edge")
    # cupyx implements only brute_force for iterations > 1 (same result); SciPy keeps its faster default
    it = dict(iterations=Z_ITER, brute_force=xp is not np)
    p = ndi.binary_erosion(ndi.binary_dilation(p, line, **it), line, **it)[r:-r]
    c = 2 * (CUBE // 2)
    cube = xp.ones((CUBE,) * 3, bool)
    p = xp.pad(p, c, mode="edge")
    p = ndi.binary_erosion(ndi.binary_dilation(p, cube), cube)
    return p[c:-c, c:-c, c:-c]


def gpuheart_closings(mask):
    from gpuheart.morphology import postprocess

    return postprocess(mask, Z_SIZE, Z_ITER, CUBE)


# -- pytest-benchmark ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mask():
    return make_mask()


@pytest.mark.parametrize("impl", ["gpuheart", "scipy"])
def test_closings_cpu(benchmark, mask, impl):
    f = gpuheart_closings if impl == "gpuheart" else scipy_closings
    benchmark.group = f"closings {'x'.join(map(str, mask.shape))} (cpu)"
    benchmark.pedantic(f, args=(mask,), rounds=2, iterations=1)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["gpuheart", "cupyx"])
def test_closings_gpu(benchmark, mask, impl):
    from gpuheart.backend import cuda_available

    if not cuda_available():
        pytest.skip("no CUDA device: the GPU closings are not measured here")
    import cupy as cp

    d = cp.asarray(mask)
    f = gpuheart_closings if impl == "gpuheart" else cupyx_closings
    want = scipy_closings(mask)
    assert np.array_equal(cp.asnumpy(f(d)), want), f"{impl} closings differ from the SciPy reference"

    def timed():
        f(d)
        cp.cuda.get_current_stream().synchronize()

    benchmark.group = f"closings {'x'.join(map(str, mask.shape))} (device)"
    benchmark(timed)


# -- script mode: side-by-side ratios -----------------------------------------------------------

def _sibling(name: str):
    """Another file of benchmarks/, loaded by path (conftest: the machine's description; bench_filters: best_of)."""
    spec = importlib.util.spec_from_file_location(f"_gpuheart_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=SHAPE[0])
    ap.add_argument("--size", type=int, default=SHAPE[1], help="y = x size of each slice")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    m = make_mask((args.slices, args.size, args.size))
    ours, ref = gpuheart_closings(m), scipy_closings(m)
    if not np.array_equal(ours, ref):
        print("gpuheart's closings differ from the SciPy reference: not timing a wrong answer", file=sys.stderr)
        return 1
    best_of = _sibling("bench_filters").best_of
    t = {"gpuheart": best_of(lambda: gpuheart_closings(m), args.runs),
         "scipy": best_of(lambda: scipy_closings(m), max(1, args.runs - 1))}
    row = {"shape_zyx": list(m.shape), "foreground_before": float(m.mean()), "foreground_after": float(ref.mean()),
           "seconds": t, "speedup_vs_scipy": t["scipy"] / t["gpuheart"],
           "voxels_per_s": {k: m.size / v for k, v in t.items()}}
    print(f"{row['shape_zyx']}: gpuheart {t['gpuheart']:.2f} s, scipy {t['scipy']:.2f} s "
          f"({row['speedup_vs_scipy']:.1f}x)")
    doc = {
        "benchmark": f"binary closings: z-line 1x1x{Z_SIZE} x{Z_ITER}, then one {CUBE}x{CUBE}x{CUBE} cube "
                     "(edge-replicated borders)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _sibling("conftest").machine_info("cpu"),
        "note": "times are the best of several runs, measured side by side in one process; outputs checked equal",
        "results": [row],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
