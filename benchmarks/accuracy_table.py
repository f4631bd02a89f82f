"""Print the leave-one-stack-out table of docs/accuracy.md from a benchmarks/accuracy.py JSON.

    python benchmarks/accuracy_table.py [benchmarks/results/accuracy-loso.json]
"""
from __future__ import annotations

import json
import sys

import numpy as np


def table(d: dict) -> str:
    rows = ["| held-out stack | U-Net | union | Otsu | DoM | U-Net at 0.5 | U-Net precision / recall | threshold |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(d["per_stack"].items()):   # by name, as docs/accuracy.md lists them
        at05 = r.get("unet_at_0.5", {}).get("dice")
        cell = lambda m: f"{r[m]['dice']:.3f} ({r[m]['cldice']:.3f})"  # noqa: E731
        rows.append(f"| {name} | {cell('unet')} | {cell('union')} | {cell('otsu')} | {cell('dom')} | "
                    f"{'-' if at05 is None else f'{at05:.3f}'} | "
                    f"{r['unet']['precision']:.2f} / {r['unet']['recall']:.2f} | {r['threshold']:.2f} |")
    mean = lambda m: np.mean([r[m]["dice"] for r in d["per_stack"].values()])  # noqa: E731
    at05 = [r["unet_at_0.5"]["dice"] for r in d["per_stack"].values() if "unet_at_0.5" in r]
    rows.append(f"| **mean Dice** | **{mean('unet'):.3f}** | **{mean('union'):.3f}** | **{mean('otsu'):.3f}** | "
                f"**{mean('dom'):.3f}** | {f'{np.mean(at05):.3f}' if at05 else '-'} | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/accuracy-loso.json"
    d = json.load(open(path))
    print(table(d))
    print("\nsettings:", {k: v for k, v in d["settings"].items() if k not in ("data", "out", "runs", "only")})
