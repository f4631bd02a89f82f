"""The ``gpuheart`` command: argument parsing, messages and exit codes; the work is in Pipeline."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuheart",
        description="Light-sheet heart scan -> preprocessed volume, vessel mask and mesh, on one GPU or the CPU.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="process a scan (default: the built-in synthetic scan)",
                       description="Stream a scan through the pipeline and write its outputs to OUT. "
                                   "Without INPUT, a synthetic scan with ground truth is written to OUT/input "
                                   "and processed, and Dice against the truth is reported.")
    r.add_argument("input", nargs="?", help="multi-page TIFF, folder of per-slice TIFFs, or OME-Zarr")
    r.add_argument("-o", "--out", default="gpuheart-out", help="output folder (default: %(default)s)")
    r.add_argument("-c", "--config", help="TOML config file (see config.toml written by any run)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute (default: auto)")
    r.add_argument("--channels", nargs="+", metavar="C", help="channels to process, e.g. C00 C01 (default: all)")
    r.add_argument("--slab-size", type=int, help="z-slices per slab (default: 16)")
    r.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size in µm")
    r.add_argument("--truth", nargs=2, action="append", metavar=("CHANNEL", "MASK"),
                   help="score CHANNEL's mask against MASK (repeatable)")
    r.add_argument("--phantom-preset", default="default", choices=["tiny", "default", "large"],
                   help="size of the built-in synthetic scan when no INPUT is given (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    ph = sub.add_parser("phantom", help="write a synthetic scan as a per-slice TIFF folder",
                        description="Write a deterministic synthetic 3-channel light-sheet scan with ground truth: "
                                    "OUT/scan (LaVision-style per-slice OME-TIFFs), OUT/truth, OUT/phantom.json.")
    ph.add_argument("out", help="output folder")
    ph.add_argument("--preset", default="default", choices=["tiny", "default", "large"])
    ph.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="override the preset's shape")
    ph.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    ph.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ph.add_argument("--no-progress", action="store_true", help="no progress bar")

    rp = sub.add_parser("report", help="write report.html for a finished run",
                        description="Write OUT_DIR/report.html with PNG figures (projections before and after each "
                                    "stage, slice-mean curves, line profile, overlays, mesh, stage times) from "
                                    "what a run left in OUT_DIR. gpuheart run does this automatically.")
    rp.add_argument("out_dir", help="the output folder of a run (holds summary.json)")

    i = sub.add_parser("info", help="describe a scan", description="Print shape, dtype, channels, voxel size "
                                                                   "and format of a scan without reading its pixels.")
    i.add_argument("input")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_run(a) -> int:
    from .pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig.load(a.config) if a.config else PipelineConfig()
    for name, value in (("device", a.device), ("channels", a.channels), ("slab_size", a.slab_size),
                        ("voxel_size", a.voxel_size)):
        if value is not None:
            setattr(cfg, name, list(value) if isinstance(value, (list, tuple)) else value)
    if a.no_progress:
        cfg.progress = False
    truth = {c: m for c, m in a.truth} if a.truth else None
    result = Pipeline(cfg).run(a.input, a.out, truth=truth, phantom_preset=a.phantom_preset)
    _print_run(result)
    return EXIT_OK


def _print_run(result) -> None:
    total = sum(result.timings.values())
    print(f"gpuheart: wrote {result.out_dir} in {total:.1f} s on {result.summary['device']}")
    for channel, paths in result.outputs.items():
        s = result.summary[channel]
        line = (f"  {channel}: CV of slice means {s['detrended_cv_raw']:.3f} -> {s['detrended_cv_normalized']:.3f}")
        if "snr_dom" in s:
            line += f", SNR {s['snr_preprocessed']:.1f} -> {s['snr_dom']:.1f} (difference of medians)"
        if "dom_vs_truth" in s:
            line += f", Dice vs truth {s['dom_vs_truth']['dice']:.3f}"
        print(line)
        for kind, path in paths.items():
            print(f"    {kind}: {path}")
    if result.report:
        print(f"  report: {result.report}")
    print("  stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))


def _cmd_phantom(a) -> int:
    from .phantom import PhantomConfig, write_phantom

    over = {}
    if a.shape:
        over["shape"] = tuple(a.shape)
    if a.seed is not None:
        over["seed"] = a.seed
    cfg = PhantomConfig.preset(a.preset, **over)
    path = write_phantom(cfg, Path(a.out), progress=not a.no_progress, overwrite=a.overwrite)
    print(f"gpuheart: wrote synthetic scan {tuple(cfg.shape)} x 3 channels to {path / 'scan'} "
          f"(ground truth in {path / 'truth'})")
    return EXIT_OK


def _cmd_report(a) -> int:
    from .report import write_report

    if not (Path(a.out_dir) / "summary.json").is_file():
        raise FileNotFoundError(f"{a.out_dir}: no summary.json, so no finished gpuheart run to report on")
    print(f"gpuheart: wrote {write_report(a.out_dir)}")
    return EXIT_OK


def _cmd_info(a) -> int:
    from .io import open_scan

    with open_scan(a.input) as scan:
        d = scan.describe()
    if a.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        for k, v in d.items():
            print(f"{k}: {v}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"run": _cmd_run, "phantom": _cmd_phantom, "info": _cmd_info, "report": _cmd_report}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("gpuheart: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        # our errors (ScanError, ConfigError, DeviceError) carry a one-line message naming the file;
        # a user should not have to read a traceback to learn that a slice is missing
        print(f"gpuheart: error: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
