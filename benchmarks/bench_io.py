"""Reading a slab of a per-slice TIFF folder (the paper's scan format): one thread vs several; and
writing a mask slab to OME-Zarr with the image codec vs the mask codec.

pytest-benchmark:   python -m pytest benchmarks/bench_io.py --benchmark-only
side-by-side ratios: python benchmarks/bench_io.py   (writes benchmarks/results/cpu-io.json)

Slices of 2048 x 2048 uint16 (bench_filters.make_slice: smooth structure, lines and noise) are written
once per compression to a temporary folder; the slab is then read through ``open_scan(...).read_slab``
with ``GPUHEART_READ_THREADS`` set to 1 and to the default, in alternating rounds, so both see the same
page cache and the same background load. Files come from the page cache (they were just written), so
this measures decoding and copying, not a disk. The slices are mostly noise, so zlib and LZW barely
shrink them (see the sizes): real scans with dark background compress, and decode, differently.
With one thread, tifffile decodes a page's strips with its own pool (``tifffile_maxworkers`` in the
JSON: 1 on a 2-core machine); gpuheart's threads each decode one slice alone.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpuheart.io import lavision_filename, open_scan, read_threads

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu-io.json"
SLICES = 16
COMPRESSIONS = (None, "zlib", "lzw")


def _make_slice():
    spec = importlib.util.spec_from_file_location("_gpuheart_bench_filters", HERE / "bench_filters.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_slice


def write_scan(folder: Path, compression, slices: int = SLICES) -> Path:
    base = _make_slice()("uint16")
    folder.mkdir(parents=True, exist_ok=True)
    for z in range(slices):
        tifffile.imwrite(folder / lavision_filename("bench", 0, z), np.roll(base, 17 * z, axis=1),
                         compression=compression)
    return folder


@contextmanager
def _threads(n):
    old = os.environ.get("GPUHEART_READ_THREADS")
    if n is None:
        os.environ.pop("GPUHEART_READ_THREADS", None)
    else:
        os.environ["GPUHEART_READ_THREADS"] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GPUHEART_READ_THREADS", None)
        else:
            os.environ["GPUHEART_READ_THREADS"] = old


def read_all(folder: Path) -> np.ndarray:
    with open_scan(folder) as scan:
        return scan.read_slab("C00", 0, scan.shape[0])


@pytest.fixture(scope="module", params=COMPRESSIONS, ids=lambda c: c or "none")
def scan_folder(request, tmp_path_factory):
    return write_scan(tmp_path_factory.mktemp(f"io-{request.param}"), request.param)


@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "default-threads"])
def test_read_slab(benchmark, scan_folder, threads):
    benchmark.group = f"read {SLICES} x 2048^2 uint16 TIFF slices ({scan_folder.name.split('-')[1].rstrip('0123456789')})"
    with _threads(threads):
        benchmark(read_all, scan_folder)


def _noisy_mask(slices: int = 16, size: int = 2048, seed: int = 0) -> np.ndarray:
    """A 0/255 mask of vessel-like blobs with ragged edges (thresholded smooth structure + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = 0.35 + 0.2 * np.sin(xx / 40.0) * np.cos(yy / 55.0)
    return np.stack([(base + rng.normal(0, 0.08, base.shape)) > 0.6 for _ in range(slices)]).astype(np.uint8) * 255


def mask_write(rounds: int = 3) -> dict:
    """One 16-slice 2048² mask slab through ZarrWriter: the image codec (byte shuffle, zstd 5) vs the
    mask codec (bit shuffle, zstd 3) that the pipeline's mask outputs use, alternating rounds."""
    from gpuheart.io import ZarrWriter

    mask = _noisy_mask()
    best, size = {False: float("inf"), True: float("inf")}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for binary in best:
                path = Path(tmp) / f"m{int(binary)}-{r}.ome.zarr"
                with ZarrWriter(path, mask.shape, np.uint8, binary=binary) as w:
                    t0 = time.perf_counter()
                    w.write(0, mask)
                    best[binary] = min(best[binary], time.perf_counter() - t0)
                size[binary] = sum(f.stat().st_size for f in (path / "0").rglob("*") if f.is_file())
    res = {"slab": list(mask.shape), "foreground": float((mask > 0).mean()),
           "image_codec_s": best[False], "mask_codec_s": best[True], "speedup": best[False] / best[True],
           "image_codec_mib": size[False] / 2**20, "mask_codec_mib": size[True] / 2**20}
    print(f"mask write: image codec {best[False]:.3f} s ({res['image_codec_mib']:.2f} MiB), mask codec "
          f"{best[True]:.3f} s ({res['mask_codec_mib']:.2f} MiB) -> {res['speedup']:.1f}x")
    return res


def main() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.lower().startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() \
        else platform.machine()
    out = {"machine": {"cpu_model": cpu, "cpu_count": os.cpu_count(), "read_threads_default": read_threads(),
                       "tifffile_maxworkers": tifffile.TIFF.MAXWORKERS,
                       "python": sys.version.split()[0], "tifffile": tifffile.__version__,
                       "load_avg_1min": os.getloadavg()[0]},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "benchmark": f"read_slab of {SLICES} slices of 2048x2048 uint16, one TIFF per slice, from the page cache",
           "timing": "best of 5 alternating rounds, seconds, in one process", "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for comp in COMPRESSIONS:
            folder = write_scan(Path(tmp) / (comp or "none"), comp)
            mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            ref = read_all(folder)  # warms the page cache
            best = {1: float("inf"), None: float("inf")}
            for _ in range(5):
                for n in best:
                    with _threads(n):
                        t0 = time.perf_counter()
                        got = read_all(folder)
                        best[n] = min(best[n], time.perf_counter() - t0)
                    assert np.array_equal(got, ref)
            one, many = best[1], best[None]
            out["results"][comp or "none"] = {"one_thread_s": one, "default_threads_s": many,
                                              "speedup": one / many, "mib_on_disk": mb,
                                              "slices_per_s_default": SLICES / many}
            print(f"{comp or 'none':5s}: 1 thread {one:.3f} s, {read_threads()} threads {many:.3f} s -> "
                  f"{one / many:.2f}x ({mb:.0f} MiB on disk)")
    out["mask_write"] = mask_write()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return out


if __name__ == "__main__":
    import argparse

    # --help (or a stray argument) must not run the benchmark and overwrite the committed result
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
