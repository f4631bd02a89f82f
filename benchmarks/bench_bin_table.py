"""CLAHE's per-slice bin table for uint16 input: value -> bin for one slice's extremes.

The GPU path builds it on the host for every slice whose (min, max) it has not seen (a camera's slices all
differ) and copies it to the device; that is host time in the per-slice chain. This times a table for
12-bit-like spans, against the code of a git revision, on the same keys, alternating, and checks that
both give the same tables.

    python benchmarks/bench_bin_table.py --against REV [--out benchmarks/results/cpu-clahe-bin-table.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def ms_per_table(mod, keys) -> float:
    mod._bin_table_cached.cache_clear()
    t = time.perf_counter()
    for lo, hi in keys:
        mod._int_bin_table(np.uint16(lo), np.uint16(hi), np.dtype(np.uint16), 256, np.uint8)
    mod._bin_table_cached.cache_clear()
    return (time.perf_counter() - t) / len(keys) * 1e3


def main(argv=None) -> int:
    from conftest import machine_info, module_at

    from gpuheart import exposure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="git revision to compare with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "cpu-clahe-bin-table.json"))
    a = p.parse_args(argv)
    # named by its commit, which stays meaningful after HEAD moves on
    a.against = subprocess.run(["git", "rev-parse", "--short", a.against], cwd=HERE.parent, check=True,
                               capture_output=True, text=True).stdout.strip()
    old = module_at(a.against, "exposure")
    rng = np.random.default_rng(0)
    # 12-bit camera slices: minimum 50-400, span 2000-4000 grey values
    keys = [(int(lo), int(lo + span)) for lo, span in zip(rng.integers(50, 400, 300), rng.integers(2000, 4000, 300))]
    for lo, hi in keys:
        args = (np.uint16(lo), np.uint16(hi), np.dtype(np.uint16), 256, np.uint8)
        if not np.array_equal(old._int_bin_table(*args), exposure._int_bin_table(*args)):
            raise SystemExit(f"tables differ for extremes {lo}, {hi}")
    times = {"current": [], a.against: []}
    for _ in range(a.repeats):
        times[a.against].append(round(ms_per_table(old, keys), 4))
        times["current"].append(round(ms_per_table(exposure, keys), 4))
    med = {k: float(np.median(v)) for k, v in times.items()}   # median: a first repeat once ran at a third
    doc = {"kind": "clahe-bin-table", "benchmark": __doc__.splitlines()[0],
           "date": datetime.now(timezone.utc).isoformat(), "machine": machine_info("cpu"),
           "keys": "300 (min, max) pairs: min 50-400, span 2000-4000; uint16 input, 256 bins",
           "ms_per_table": times, "median_ms": med, "against_commit": a.against, "identical_tables_checked": True,
           "speedup_median": round(med[a.against] / med["current"], 2)}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"median_ms": med, "speedup_median": doc["speedup_median"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
