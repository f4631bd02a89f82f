"""The ``gpuheart`` command: argument parsing, messages and exit codes; the work is in Pipeline."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGPIPE = 141   # what a shell reports for a command its reader stopped reading (128 + SIGPIPE)
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as a shell reports Ctrl-C


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _dask_spec(text: str) -> str:
    """``--dask``: ``local:N`` needs N >= 1 (``local:0`` would wait for workers forever); an address or
    ``local-cuda`` is passed on as given."""
    if text.startswith("local:"):
        n = text.split(":", 1)[1]
        if not (n.isdigit() and int(n) >= 1):
            raise argparse.ArgumentTypeError(f"local:N needs N, the number of worker processes, to be a positive "
                                             f"integer, got {text!r}")
    return text


def _nonnegative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):   # a voxel of 0, -2 or nan um gives volumes of 0, < 0 or nan
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v < 1:   # NaN fails too
        raise argparse.ArgumentTypeError(f"is the share of each stack's slices kept to validate on: expected a "
                                         f"value in (0, 1), got {text}")
    return v


def _nonnegative_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _haze_peak(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:   # AugmentConfig.check says the same to Python callers
        raise argparse.ArgumentTypeError(f"is the peak of a bright field added to the 0-1 image: expected a "
                                         f"value in (0, 1], got {text} (above 1 it only saturates the tiles)")
    return v


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
    r.add_argument("input", nargs="*", help="multi-page TIFF, folder of per-slice TIFFs, or OME-Zarr; several "
                                            "(or a quoted glob) run as a batch into OUT/<scan name>/")
    r.add_argument("-o", "--out", default="gpuheart-out", help="output folder (default: %(default)s)")
    r.add_argument("-c", "--config", help="TOML config file (see config.toml written by any run)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute (default: auto)")
    r.add_argument("--channels", nargs="+", metavar="C", help="channels to process, e.g. C00 C01 (default: all; of the built-in synthetic scan, the stained "
                        "C00 and C01, not the autofluorescence C02)")
    r.add_argument("--slab-size", type=_positive_int, help="z-slices per slab (default: 16)")
    r.add_argument("--voxel-size", type=_positive_float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size in µm")
    r.add_argument("--truth", nargs="+", action="append", metavar="[CHANNEL] MASK",
                   help="score CHANNEL's mask against MASK (repeatable); CHANNEL may be left out for a one-channel "
                        "scan")
    r.add_argument("--preset", action="append", metavar="CHANNEL=NAME",
                   help="segment CHANNEL with a named preset of settings, e.g. C01=nerves (repeatable; presets: "
                        "nerves, vessels; see README 'Settings per channel')")
    r.add_argument("--phantom-preset", default=None, choices=["tiny", "default", "large"],
                   help="size of the built-in synthetic scan when no INPUT is given (default: default)")
    r.add_argument("--dask", metavar="ADDRESS|local:N", type=_dask_spec,
                   help="run the slabs on a Dask cluster: a scheduler address (tcp://host:8786), or local:N for N "
                        "local worker processes (with dask-cuda installed, local-cuda starts one worker per GPU)")
    r.add_argument("--restart", action="store_true",
                   help="ignore the checkpoints of an earlier, interrupted run into OUT and start over")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    ph = sub.add_parser("phantom", help="write a synthetic scan as a per-slice TIFF folder",
                        description="Write a deterministic synthetic 3-channel light-sheet scan with ground truth: "
                                    "OUT/scan (LaVision-style per-slice OME-TIFFs), OUT/truth, OUT/phantom.json.")
    ph.add_argument("out", help="output folder")
    ph.add_argument("--preset", default="default", choices=["tiny", "default", "large"],
                    help="tiny 16x64x64, default 32x256x256, large 16x2048x2048 (default: %(default)s)")
    ph.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="override the preset's shape")
    ph.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    ph.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ph.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = sub.add_parser("mesh", help="mesh a mask (TIFF or OME-Zarr) to GLB/PLY/OBJ/STL",
                       description="Marching cubes over the mask slab by slab (seams welded), pieces under "
                                   "--min-faces removed, optional decimation to --max-faces, written atomically. "
                                   "GLB meshes over 65,535 vertices are split into nodes Unity can import.")
    m.add_argument("mask", help="binary mask (0 outside, one nonzero value inside), such as OUT/C00/mask.ome.zarr: "
                                "multi-page TIFF, per-slice folder or OME-Zarr; a scan's intensities or labels "
                                "(more values) are refused")
    m.add_argument("--channel", metavar="NAME",
                   help="the channel to mesh where MASK holds several (e.g. C01); required then")
    m.add_argument("-o", "--out", required=True, help="output mesh: .glb, .ply, .obj or .stl")
    m.add_argument("--voxel-size", type=_positive_float, nargs=3, metavar=("Z", "Y", "X"),
                   help="voxel size in µm (default: from the mask's metadata, else 1 1 1)")
    m.add_argument("--min-faces", type=_nonnegative_int, default=20, help="drop pieces with fewer faces (default: %(default)s)")
    m.add_argument("--max-faces", type=_nonnegative_int,
                   help="decimate to at most this many faces (0: keep every face; a warning says when "
                        "decimation has to stop above it)")
    m.add_argument("--max-bytes", type=_positive_float, default=float(1 << 30),   # [mesh] max_bytes: run's limit
                   help="decimate a mesh whose file would be larger to fit (default: 1073741824 = 1 GiB)")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the marching cubes runs (default: auto); the rest of the stage runs on the CPU")
    m.add_argument("--max-memory-faces", type=_nonnegative_int, default=20_000_000,   # [mesh] max_memory_faces
                   help="the mesh is held whole (~200 bytes a face): a mask that would give more marching-cubes faces "
                        "is meshed from k x k x k voxel-block means, k the smallest that fits, with a warning "
                        "(default: %(default)s, ~4 GiB; 0: no limit)")
    m.add_argument("--slab-size", type=_positive_int, default=64, help="z-slices meshed at a time (default: %(default)s)")
    m.add_argument("--table", help="also write the component table (CSV) here")
    m.add_argument("--largest", help="also write the largest connected component as its own mesh here")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")

    sg = sub.add_parser("segment", help="segment a scan into a uint8 0/255 mask TIFF",
                        description="Preprocess INPUT and segment it (steps 1-5 of the method) into OUT, "
                                    "a uint8 0/255 multi-page TIFF of the same (z, y, x) shape.")
    sg.add_argument("input", help="multi-page TIFF, per-slice folder or OME-Zarr")
    sg.add_argument("-o", "--out", required=True, help="output mask .tif")
    sg.add_argument("--method", choices=["unet", "dom", "union", "otsu"], help="default: the config's (union)")
    sg.add_argument("--weights", help="U-Net weights: a .pt file, or the run folder of gpuheart train (its best.pt) "
                                      "(default: the shipped model)")
    sg.add_argument("--channel", help="channel to segment (default: the first)")
    sg.add_argument("--voxel-size", type=_positive_float, nargs=3, metavar=("Z", "Y", "X"),
                    help="voxel size in µm (default: from the input's metadata)")
    sg.add_argument("--postprocess", action="store_true",
                    help="apply the paper's closings too (step 6; default: no, whatever a -c config says)")
    sg.add_argument("-c", "--config", help="TOML config file")
    sg.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute (default: the config's, auto)")
    sg.add_argument("--restart", action="store_true",
                    help="ignore the checkpoint of an earlier, interrupted segmentation into OUT and start over")
    sg.add_argument("--no-progress", action="store_true")

    tr = sub.add_parser("train", help="train the U-Net on labelled stacks",
                        description="Train the U-Net on image/label TIFF pairs (NAME_image.tif + NAME_label.tif, "
                                    "given as files or folders holding them), synthetic scans written by gpuheart "
                                    "phantom (their vessel channel and its truth) and/or generated ones "
                                    "(--phantom N). Images go "
                                    "through the pipeline's own preprocessing first. Writes OUT/best.pt (the best "
                                    "checkpoint by validation Dice), last.pt (for --resume), log.csv, curves.png.")
    tr.add_argument("data", nargs="*", help="NAME_image.tif files or folders of them, each with NAME_label.tif "
                                            "beside it (0 background, any nonzero value vessel), or folders that "
                                            "gpuheart phantom wrote")
    tr.add_argument("-o", "--out", required=True, help="run folder")
    tr.add_argument("--phantom", type=_nonnegative_int, default=0, metavar="N",
                    help="also train on N synthetic scans (default preset, seeds 1..N)")
    tr.add_argument("--exclude", nargs="*", default=[],
                    help="stack names to leave out (held-out evaluation); stacks sharing a NAME in different "
                         "folders are named FOLDER/NAME. Give the data before it")
    tr.add_argument("--finetune", nargs="?", const="default", metavar="WEIGHTS",
                    help="fine-tune WEIGHTS (a .pt file, or a run folder: its best.pt; default: the shipped model) "
                         "on your labelled slices with the measured recipe: its architecture, tile and loss (with "
                         "its Tversky weights), 6 epochs of 25 steps, lr 3e-4, threshold 0.5; any flag below still "
                         "overrides")
    tr.add_argument("--sparse-labels", action="store_true",
                    help="train only on slices with at least one labelled pixel: label a few slices of a large stack "
                         "completely and leave the rest empty (they are skipped, not taught as background)")
    tr.add_argument("--epochs", type=_positive_int, help="default: 60 (--finetune: 6)")
    tr.add_argument("--steps", type=_positive_int, help="steps per epoch (default: 50; --finetune: 25)")
    tr.add_argument("--batch-size", type=_positive_int, default=8)
    tr.add_argument("--threshold", type=float,
                    help="store this decision threshold instead of calibrating one on the validation slices "
                         "(--finetune: 0.5, as calibrating on a few slices is unreliable)")
    tr.add_argument("--lr", type=_positive_float, help="learning rate (default: 1e-3; --finetune: 3e-4)")
    tr.add_argument("--schedule", choices=["plateau", "cosine"], default="plateau",
                    help="learning rate: halved when validation Dice stalls (plateau, default), or a cosine decay "
                         "to 1e-6 over the epochs")
    tr.add_argument("--balance", choices=["pixel", "stack"], default="pixel",
                    help="draw training tiles uniformly per pixel (default) or give every stack the same share")
    tr.add_argument("--haze", type=_haze_peak, metavar="PEAK",
                    help="haze augmentation: add smooth bright fields (peak 0.1-PEAK of the 0-1 image, PEAK in (0, 1]) to 30%% of the "
                         "tiles, labels unchanged, for stains with bright autofluorescent tissue (default: off)")
    tr.add_argument("--tile", type=_positive_int, help="training tile side (default: 128; --finetune: the model's)")
    tr.add_argument("--width", type=_positive_int, help="channels of the first U-Net level (default: 16; --finetune: the model's)")
    tr.add_argument("--depth", type=_positive_int,
                    help="pooling levels of the U-Net (default: 4, the paper's 9 layers; --finetune: the model's; "
                         "--tile must be a multiple of 2**depth)")
    tr.add_argument("--init", metavar="WEIGHTS",
                    help="start from these weights (a .pt file, or a run folder: its best.pt) instead of random, "
                         "with every other setting as given (--finetune sets them for you)")
    tr.add_argument("--context", type=_nonnegative_int, metavar="K",
                    help="2.5-D input: K neighbouring slices on each side as extra channels (default: 0, 2-D)")
    tr.add_argument("--loss", choices=["tversky_focal", "dice_bce"], help="default: tversky_focal (the paper's)")
    tr.add_argument("--tversky-alpha", type=_nonnegative_float, metavar="A",
                    help="tversky_focal loss: weight of false negatives (default: 0.7)")
    tr.add_argument("--tversky-beta", type=_nonnegative_float, metavar="B",
                    help="tversky_focal loss: weight of false positives (default: 0.3; alpha and beta not both 0)")
    tr.add_argument("--tversky-gamma", type=_positive_float, metavar="G",
                    help="tversky_focal loss: (1 - Tversky index) ** (1 / G) (default: 4/3)")
    tr.add_argument("--norm", choices=["batch", "group", "none"],
                    help="normalization layers: batch, group (batch-size independent; default), or none "
                         "(keeps a tile's absolute brightness; away from tile borders the output does not "
                         "depend on the tile size)")
    tr.add_argument("--val-fraction", type=_fraction, metavar="F",
                    help="share of each stack's slices (its last ones) kept to validate on, at least one slice, "
                         "and one left to train on; of one-slice (2-D) pairs, that share of the pairs "
                         "(default: 0.2)")
    tr.add_argument("--patience", type=_positive_int, metavar="N",
                    help="stop early after N epochs without a better validation Dice (default: 15)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to train (default: auto, a CUDA GPU if PyTorch sees one)")
    tr.add_argument("--workers", type=_nonnegative_int, default=0, metavar="N",
                    help="processes that draw and augment training tiles, so a GPU does not wait for one CPU core "
                         "(default: 0, the training process itself; the tiles drawn depend on N)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    tr.add_argument("--no-progress", action="store_true")

    rp = sub.add_parser("report", help="write report.html for a finished run",
                        description="Write OUT_DIR/report.html with a table of stage times and PNG figures "
                                    "(projections before and after each stage, slice-mean curves, line profile, "
                                    "overlays, mesh) from what a run left in OUT_DIR. gpuheart run does this "
                                    "automatically.")
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
    from .pipeline import ConfigError, Pipeline, PipelineConfig

    cfg = PipelineConfig.load(a.config) if a.config else PipelineConfig()
    for name, value in (("device", a.device), ("channels", a.channels), ("slab_size", a.slab_size),
                        ("voxel_size", a.voxel_size)):
        if value is not None:
            setattr(cfg, name, list(value) if isinstance(value, (list, tuple)) else value)
    if a.no_progress:
        cfg.progress = False
    for spec in a.preset or ():
        channel, sep, name = spec.partition("=")
        if not sep or not channel or not name:
            raise ConfigError(f"--preset wants CHANNEL=NAME (e.g. C01=nerves), got {spec!r}")
        cfg.channel[channel] = {**cfg.channel.get(channel, {}), "preset": name}
    cfg.validate()
    truth = _truth_by_channel(a.truth)
    inputs = _expand_inputs(a.input)
    if inputs and a.phantom_preset:
        raise ConfigError(f"--phantom-preset {a.phantom_preset}: it sizes the built-in synthetic scan, which runs "
                          f"only when no INPUT is given; expected either INPUT or --phantom-preset")
    started = time.monotonic()
    with _dask_client(a.dask) as client:
        if client is not None:   # not in a run's own time (summary.json's wall_s), so said here
            print(f"gpuheart: Dask cluster {a.dask} ready in {time.monotonic() - started:.1f} s")
        if len(inputs) <= 1:
            result = Pipeline(cfg).run(inputs[0] if inputs else None, a.out, truth=truth,
                                       phantom_preset=a.phantom_preset or "default", resume=not a.restart,
                                       client=client)
            _print_run(result)
            return EXIT_OK
        return _run_batch(Pipeline(cfg), inputs, Path(a.out), truth, resume=not a.restart, client=client)


def _truth_by_channel(pairs) -> dict[str, str] | None:
    """--truth [CHANNEL] MASK as a dict (channel None: the scan's only one, named once it is open); a channel
    given twice is an error, not a silent last-wins."""
    from .pipeline import ConfigError

    truth: dict[str | None, str] = {}
    for values in pairs or ():
        # "--truth MASK SCAN" would otherwise read as channel MASK: the scan given after --truth is swallowed
        if len(values) > 2 or (len(values) == 2 and Path(values[0]).exists()):
            raise ConfigError(f"--truth takes [CHANNEL] MASK, got {' '.join(values)}; give the scan before --truth "
                              f"(gpuheart run SCAN --truth MASK) and --truth once per channel")
        channel, mask = (None, values[0]) if len(values) == 1 else values
        if channel in truth and truth[channel] != mask:
            raise ConfigError(f"--truth {channel} given twice ({truth[channel]} and {mask}); expected one mask per "
                              f"channel")
        truth[channel] = mask
    return truth or None


def _dask_client(spec: str | None):
    """A context manager giving a dask.distributed Client for ``--dask``, or None without it."""
    from contextlib import nullcontext

    if not spec:
        return nullcontext(None)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise RuntimeError("--dask needs dask.distributed: pip install 'gpuheart[dask]'") from None
    if spec == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise RuntimeError("--dask local-cuda needs dask-cuda: pip install \".[multigpu]\" from a gpuheart "
                               "checkout, or dask-cuda itself") from None
        return _local_client(LocalCUDACluster)
    if spec.startswith("local:"):
        n = int(spec.split(":", 1)[1])
        # the workers share the cores: each reads its slabs with its share of the read threads
        from .io import read_threads

        env = {"GPUHEART_READ_THREADS": str(max(1, read_threads() // max(1, n)))}
        return _local_client(lambda: LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=":0", env=env))
    return Client(spec)


@contextlib.contextmanager
def _local_client(make_cluster):
    """A Client of a cluster this process starts, and closes: left to the interpreter's exit, the cluster's
    nannies killed workers still shutting down and logged it ("Worker process still alive after 4.0 seconds,
    killing") after every run; after Ctrl-C the workers logged each slab cancelled under them around gpuheart's
    one-line message. Those logs are about gpuheart's own workers going away, as intended, so they are silenced
    while the cluster closes (not during the run, when a worker's warnings, e.g. about memory, are the user's)."""
    import signal
    import threading

    from distributed import Client

    # Ctrl-C in a terminal reaches every process of the group: the workers would die of it mid-slab, each with
    # its traceback, while this process stops the run in order. They inherit the ignored signal; this one
    # handles it and closes the cluster.
    main = threading.current_thread() is threading.main_thread()   # signal handlers can only be set there
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        cluster = make_cluster()
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)
    client, interrupted = None, False
    try:
        client = Client(cluster)
        yield client
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        wait = 5 if interrupted else 30
        steps = [lambda: cluster.close(timeout=wait)]   # each tried: the cluster is closed whatever the client did
        if client is not None:
            steps.insert(0, lambda: client.close(timeout=wait))
            if interrupted:   # before the client goes, which cancels the slabs the workers are busy with
                steps.insert(0, lambda: client.run(_silence_dask_logs))
        again = None
        with _quiet_dask():
            for step in steps:
                try:
                    step()
                except KeyboardInterrupt as err:   # Ctrl-C pressed again while closing: close the rest first
                    again = err
                except Exception:  # noqa: BLE001 - a cluster that will not close must not hide the run's outcome
                    pass
        if again is not None and not interrupted:
            raise again


def _silence_dask_logs() -> None:
    import logging

    for name in ("distributed", "dask_cuda"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _quiet_dask():
    import logging

    logs = [logging.getLogger(n) for n in ("distributed", "dask_cuda")]
    levels = [log.level for log in logs]
    _silence_dask_logs()
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _expand_inputs(args: list[str]) -> list[str]:
    """Paths as given; a pattern with glob characters expands (sorted), and must match something. A path that
    exists is taken as it is, though its name holds such characters (``scan[1].tif``)."""
    import glob

    out = []
    for arg in args:
        if any(ch in arg for ch in "*?[") and not Path(arg).exists():
            hits = sorted(glob.glob(arg))
            if not hits:
                raise FileNotFoundError(f"{arg}: the pattern matches no file or folder")
            out.extend(hits)
        else:
            out.append(arg)
    return out


def _run_batch(pipeline, inputs: list[str], out: Path, truth, resume: bool = True, client=None) -> int:
    """Every scan into OUT/<name>/; a failing scan is reported and skipped, the exit code counts failures."""
    names = _unique_names(inputs)
    failed = []
    for src, name in zip(inputs, names):
        print(f"gpuheart: [{names.index(name) + 1}/{len(inputs)}] {src}")
        try:
            _print_run(pipeline.run(src, out / name, truth=truth, resume=resume, client=client))
        except (ValueError, OSError, RuntimeError) as err:
            failed.append((src, _with_notes(err)))
            print(f"gpuheart: error: {_with_notes(err)}", file=sys.stderr)
    print(f"gpuheart: batch done: {len(inputs) - len(failed)} succeeded, {len(failed)} failed")
    for src, err in failed:
        print(f"  FAILED {src}: {err}")
    return EXIT_FAILED if failed else EXIT_OK


def _unique_names(inputs: list[str]) -> list[str]:
    """OUT sub-folder names: each scan's name without its extension; scans of one name are told apart by as
    many of their parent folders as it takes ("a-scan", "b-scan"), so a scan keeps its folder (and can reuse
    its results) whatever order the inputs come in; numbers only where the paths themselves cannot."""
    parts = []
    for src in inputs:
        path = Path(src.rstrip("/")).absolute()
        base = path.name
        for suffix in (".ome.zarr", ".zarr", ".ome.tif", ".ome.tiff", ".tif", ".tiff"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        parts.append([p.name for p in reversed(path.parents) if p.name] + [base])
    names = []
    for own in parts:
        same = [p for p in parts if p[-1] == own[-1] and p is not own]
        depth = 1
        while any(p[-depth:] == own[-depth:] for p in same) and depth < len(own):
            depth += 1
        names.append("-".join(own[-depth:]))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):   # the same path given twice
        seen[name] = seen.get(name, 0) + 1
        names[i] = name if seen[name] == 1 else f"{name}-{seen[name]}"
    return names


def _removed(removed: int, lost: int | None, limit: str) -> str:
    """How many mesh components were dropped, and why: under the face limit, or by a decimation (None: a
    summary from before the two were told apart)."""
    if lost is None:
        return f"{removed} under {limit} or lost in decimation removed"
    return f"{removed - lost} under {limit} removed" + (f", {lost} lost in decimation" if lost else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fmt(v) -> str:
    """A measurement for the console: 'n/a' where it is undefined (say, the CV of a one-slice stack)."""
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _print_run(result) -> None:
    from .report import run_seconds

    # the run's wall clock where recorded (Dask stage seconds are summed over workers); else the stages without
    # the background read, which overlaps the others
    total = (result.summary.get("this_run") or {}).get("wall_s") or run_seconds(result.timings)
    print(f"gpuheart: wrote {result.out_dir} in {total:.1f} s on {result.summary['device']}")
    for channel, z in result.resumed.items():
        if channel in result.reused:
            took = next((f"that run took {float(r['wall_s']):.1f} s for {', '.join(r['channels'])}; " for r in
                         result.summary.get("this_run", {}).get("reused_from") or [] if channel in r["channels"]), "")
            print(f"  {channel}: reused the finished results of an earlier run with the same input and settings "
                  f"({took}--restart recomputes them)")
        elif channel in getattr(result, "later_only", {}) and z < result.summary[channel]["slices"]:
            print(f"  {channel}: continued the interrupted run in {result.out_dir / channel} at slice {z}: only "
                  f"settings that act after pass 2 changed (closings, mesh, graph, voxel size): "
                  f"{result.later_only[channel]}")
        elif channel in getattr(result, "later_only", {}):
            print(f"  {channel}: kept the preprocessing and segmentation of the earlier run in {result.out_dir / channel} "
                  f"and redid only the closings, mesh and measurements (what changed does not alter the "
                  f"segmentation; a new truth mask is scored against its stores): {result.later_only[channel]}")
        elif z == 0:
            print(f"  {channel}: resumed an interrupted run after its first pass: the z-normalization statistics "
                  f"were kept, every slice was processed")
        elif z >= result.summary[channel]["slices"]:
            print(f"  {channel}: resumed an interrupted run at slice {z} of {z}: only the closings, mesh and "
                  f"measurements were redone")
        else:
            print(f"  {channel}: resumed an interrupted run at slice {z} of {result.summary[channel]['slices']}")
    for channel, why in getattr(result, "started_over", {}).items():   # a result-like object may lack it
        print(f"  {channel}: computed from the start, not from the earlier run in {result.out_dir / channel}: {why}")
    for channel, paths in result.outputs.items():
        s = result.summary[channel]
        line = f"  {channel}: CV of slice means {_fmt(s['detrended_cv_raw'])} -> {_fmt(s['detrended_cv_normalized'])}"
        if "snr_dom" in s:
            line += f", SNR {s['snr_preprocessed']:.1f} -> {s['snr_dom']:.1f} (difference of medians)"
        print(line)
        raw, normed = s.get("detrended_cv_raw"), s.get("detrended_cv_normalized")
        if isinstance(raw, float) and isinstance(normed, float) and normed > 1.5 * raw > 0:
            # seen on a uint8 two-photon stack with a background of 3-4 counts: the median steps a whole count
            print("    note: z-normalization left the slice means less even than recorded; where the background "
                  "is a few counts of integer data, its per-slice median moves in whole counts "
                  "([exposure] normalize = false keeps the slices as recorded)")
        norm = s.get("normalization", {})
        if norm.get("dark_slices"):   # blanked: the user must hear of it, and how to keep them
            print(f"    dark slices (spread <= {norm.get('dark_ratio', 0.1):g} of the stack's, or <= "
                  f"{norm.get('dark_neighbour_ratio', 0.35):g} of the slices' on both sides, e.g. laser dropout): "
                  f"{len(norm['dark_slices'])} at z = {_z_ranges(norm['dark_slices'])}; written as 0, no vessels "
                  f"found in them, though the closings along z bridge vessels across them in the final mask "
                  f"([exposure] dark_ratio = 0 and dark_neighbour_ratio = 0 keep all but blank ones)")
        scores = [f"{k.removesuffix('_vs_truth')} {v['dice']:.3f}" for k, v in s.items() if k.endswith("_vs_truth")]
        if scores:
            print("    Dice vs truth: " + ", ".join(scores))
        if "mesh" in s:
            m = s["mesh"]
            print(f"    mesh: {m['faces']} faces, {_count(m['components'], 'component')} "
                  f"({_removed(m['components_removed'], m.get('components_lost_in_decimation'), 'the face limit')}), "
                  f"{m['bytes'] / 1e6:.1f} MB"
                  + _blocks_note(m.get("block_factor", 1)))
        if "tree" in s and "n_branches" in s["tree"]:
            t = s["tree"]
            r = t.get("mean_radius_um")
            radius = f"{r:.1f} µm" if isinstance(r, (int, float)) and math.isfinite(r) else "none (no branch)"
            print(f"    largest tree: {t['tree_voxels']} voxels, {t['n_branches']} branches, "
                  f"{t['total_length_um']:.0f} µm of vessel, mean radius {radius}")
            if (k := int(t.get("downsample_yx", 1))) > 1:
                # said, not only recorded: the lengths and radii change several-fold with the grid
                print(f"    note: the largest tree's box is over [graph] max_voxels, so its skeleton was taken on "
                      f"a grid {k} times coarser in y and x: vessels under about {k} voxels across merge or "
                      f"vanish, and lengths, radii and branch counts are coarse (raise [graph] max_voxels, "
                      f"at up to about 17 bytes of memory a voxel of the box)")
        for kind, path in paths.items():
            print(f"    {kind}: {path}")
    if result.summary.get("input", {}).get("voxel_size") is None and result.outputs:
        print("  note: the input's metadata gives no voxel size and none was set: lengths, areas and volumes "
              "assume 1 x 1 x 1 µm voxels (--voxel-size Z Y X)")
    if result.report:
        print(f"  report: {result.report}")
    print("  stage seconds: " + (", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
                                 or "none (nothing computed)"))


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


def _cmd_mesh(a) -> int:
    from .io import open_scan
    from .mesh import binary_mask_reader, mesh_from_mask

    with open_scan(a.mask, channels=a.channel) as m:
        if len(m.channels) > 1:   # meshing the first channel of a scan meshed its intensities, silently
            raise ValueError(f"{m.path}: holds {len(m.channels)} channels ({', '.join(m.channels)}); expected a "
                             f"one-channel mask such as OUT/C00/mask.ome.zarr, or pick one with --channel NAME")
        voxel_known = m.voxel_size is not None
        voxel = tuple(a.voxel_size) if a.voxel_size else (m.voxel_size or (1.0, 1.0, 1.0))
        where = f"{m.path} (channel {a.channel})" if a.channel else str(m.path)
        read = binary_mask_reader(lambda z0, z1: m.read_slab(m.channels[0], z0, z1), where, fresh=True)
        st = mesh_from_mask(read, m.shape, a.out, voxel,   # --max-faces 0: every face, as in the config
                            slab_size=a.slab_size, min_faces=a.min_faces, max_faces=a.max_faces or None,
                            max_bytes=int(a.max_bytes), table_path=a.table, largest_path=a.largest,
                            max_memory_faces=a.max_memory_faces or None, device=a.device,
                            progress=not a.no_progress)
    if not st.faces:
        print("  note: the mesh file holds no surface: " + (
            f"every piece was under --min-faces {a.min_faces}" if st.components_removed
            else "the mask has no voxel inside (every voxel 0)"))
    if not a.voxel_size and not voxel_known:
        print("  note: the mask's metadata gives no voxel size and none was set: coordinates, areas and volumes "
              "assume 1 x 1 x 1 µm voxels (--voxel-size Z Y X)")
    print(f"gpuheart: wrote {st.path}: {st.vertices} vertices, {st.faces} faces, {_count(st.components, 'component')} "
          f"({_removed(st.components_removed, st.components_lost_in_decimation, f'{a.min_faces} faces')}), "
          f"{st.bytes / 1e6:.1f} MB, "
          f"volume {st.volume:.4g} µm³, area {st.surface_area:.4g} µm²" + _blocks_note(st.block_factor))
    return EXIT_OK


def _blocks_note(k: int) -> str:
    return f", meshed from {k} x {k} x {k} voxel blocks (over max_memory_faces)" if k > 1 else ""


def _segment_config(a):
    """The PipelineConfig of a ``segment`` command: the config file's (or the defaults), then the flags given."""
    from .pipeline import ConfigError, PipelineConfig

    # checked once the flags are applied: `--method unet` with a file that disables the difference of medians
    # is valid, though the file's own method ("union") would not be
    cfg = PipelineConfig.load(a.config, validate=False) if a.config else PipelineConfig()
    if a.method:
        cfg.segment.method = a.method
    if a.weights:
        cfg.segment.weights = str(weights_file(a.weights, "--weights"))
    if a.voxel_size:
        cfg.voxel_size = list(a.voxel_size)
    if a.device:
        cfg.device = a.device
    cfg.progress = not a.no_progress
    # steps 1-5 unless asked: a config's [postprocess] enabled is true by default, so it cannot say "asked"
    cfg.postprocess.enabled = bool(a.postprocess)
    try:
        return cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{a.config}: {err}" if a.config else str(err)) from None


def _cmd_segment(a) -> int:
    from .pipeline import Pipeline, lock_holder, segment_work_dir

    cfg = _segment_config(a)
    if a.weights and not cfg.uses_unet:
        warnings.warn(f"--weights {a.weights} is not used: method {cfg.segment.method!r} has no U-Net",
                      RuntimeWarning, stacklevel=1)
    work = segment_work_dir(a.out)
    found = work.is_dir() and not a.restart and lock_holder(work) is None   # held: refused below, not continued
    if found:   # said now, before a long run; whether it could continue is known only after
        print(f"gpuheart: found an interrupted segmentation in {work}: continuing it if its input and settings "
              f"are these (--restart starts over)")
    pipe = Pipeline(cfg)
    out = pipe.segment(a.input, a.out, channel=a.channel, resume=not a.restart)
    if found:
        run = pipe.last_run
        z = next(iter(run.resumed.values()), None) if run else None
        why = next(iter(run.started_over.values()), None) if run else None
        if z:
            print(f"gpuheart: continued the interrupted segmentation at slice {z}")
        elif z == 0:
            print("gpuheart: continued the interrupted segmentation after its first pass (its z-normalization "
                  "statistics)")
        else:
            print(f"gpuheart: could not continue the interrupted segmentation "
                  f"({why or 'it had saved no checkpoint of its work yet'}): started over")
    closed = " after the paper's closings" if cfg.postprocess.enabled else ""
    print(f"gpuheart: wrote {out} ({cfg.segment.method} mask{closed}, uint8 0/255)")
    return EXIT_OK


# unet.TrainConfig's defaults, spelled out so that the help needs no torch (tests/test_api_arguments.py: they agree)
TRAIN_DEFAULTS = dict(epochs=60, steps_per_epoch=50, lr=1e-3, threshold=None, loss="tversky_focal", tile=128,
                      width=16, depth=4, norm="group", context=0, init=None, tversky_alpha=0.7, tversky_beta=0.3,
                      tversky_gamma=4 / 3, patience=15, val_fraction=0.2)
TVERSKY_FLAGS = {"tversky_alpha": "--tversky-alpha", "tversky_beta": "--tversky-beta",
                 "tversky_gamma": "--tversky-gamma"}
# what benchmarks/accuracy_finetune.py measured (docs/accuracy.md): 0.685 -> 0.774 held-out Dice with 4 slices
FINETUNE_DEFAULTS = dict(epochs=6, steps_per_epoch=25, lr=3e-4, threshold=0.5)


def _train_settings(a) -> dict:
    """TrainConfig keywords: the defaults, or the fine-tuning recipe on top of the model's own architecture,
    then every flag the user gave."""
    settings = dict(TRAIN_DEFAULTS)
    if a.finetune:
        from . import unet

        if a.init:
            raise ValueError("give --finetune WEIGHTS or --init WEIGHTS, not both")
        path = unet.default_weights_path() if a.finetune == "default" else Path(a.finetune)
        if path.is_dir() and (path / "best.pt").is_file() and a.data:   # a run folder, the data given first
            path = path / "best.pt"
        if path.is_dir() or (not path.exists() and not a.data) or path.suffix.lower() in (".tif", ".tiff"):
            # `train --finetune DATA -o RUN`: the optional WEIGHTS took the data (a folder or a NAME_image.tif)
            raise ValueError(f"--finetune {a.finetune}: expected a weights file (.pt), a run folder holding best.pt "
                             f"or nothing (the shipped model); to fine-tune the shipped model on {a.finetune}, put "
                             f"the data first: gpuheart train {a.finetune} -o RUN --finetune")
        made_with = unet.load_weights(path).meta.get("config", {})
        settings.update({k: made_with[k] for k in ("loss", "tile", "width", "depth", "norm", "context",
                                                   *TVERSKY_FLAGS) if k in made_with},
                        **FINETUNE_DEFAULTS, init=str(path))
    given = dict(epochs=a.epochs, steps_per_epoch=a.steps, lr=a.lr, threshold=a.threshold, loss=a.loss,
                 tile=a.tile, width=a.width, depth=a.depth, norm=a.norm, context=a.context,
                 init=a.init and str(weights_file(a.init, "--init")), tversky_alpha=a.tversky_alpha,
                 tversky_beta=a.tversky_beta, tversky_gamma=a.tversky_gamma, patience=a.patience,
                 val_fraction=a.val_fraction)
    settings.update({k: v for k, v in given.items() if v is not None})
    _check_tversky_flags(a, settings)
    if a.haze:
        from .unet import AugmentConfig

        settings["aug"] = AugmentConfig(haze=a.haze)
    return settings


def _check_tversky_flags(a, settings: dict) -> None:
    """Tversky weights with another loss would be silently unused; the weights a fine-tuned model was made with
    are dropped with its loss (--finetune W --loss dice_bce), as they no longer apply."""
    given = [flag for k, flag in TVERSKY_FLAGS.items() if getattr(a, k) is not None]
    if settings["loss"] == "tversky_focal":
        return
    if given:
        why = " (the loss of the --finetune weights)" if a.finetune and not a.loss else ""
        raise ValueError(f"{', '.join(given)}: weight(s) of the tversky_focal loss, and this run's loss is "
                         f"{settings['loss']}{why}; add --loss tversky_focal or leave {', '.join(given)} out")
    for k in TVERSKY_FLAGS:
        settings[k] = TRAIN_DEFAULTS[k]


def weights_file(path, flag: str) -> Path:
    """A weights file as given, or the best.pt of a gpuheart train run folder (a ValueError where the folder
    has none)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "best.pt").is_file():
        return path / "best.pt"
    raise ValueError(f"{flag} {path}: a folder without best.pt; expected a weights file (.pt) or the run folder of "
                     f"gpuheart train, which holds best.pt")


def _check_exclude_took_no_data(a) -> None:
    """`train --exclude a DATA -o RUN`: --exclude takes any number of names, so it took the data too."""
    taken = [e for e in a.exclude if Path(e).exists()] if not a.data else []
    if taken:
        rest = " ".join(e for e in a.exclude if e not in taken)
        raise ValueError(f"--exclude {taken[0]}: expected stack names, and {taken[0]} is a "
                         f"{'folder' if Path(taken[0]).is_dir() else 'file'}; put the data first: "
                         f"gpuheart train {' '.join(taken)} -o RUN --exclude {rest or 'NAME'}")


def _cmd_train(a) -> int:
    from .training import train_from_files

    _check_exclude_took_no_data(a)
    # last.pt is rewritten after every epoch trained (the log may be an epoch ahead of it after a kill)
    last = Path(a.out) / "last.pt"
    before = last.stat().st_mtime_ns if a.resume and last.is_file() else None
    try:
        res = train_from_files(a.data, a.out, phantoms=a.phantom, exclude=a.exclude, resume=a.resume,
                               sparse=a.sparse_labels, balance=a.balance,
                               progress=not a.no_progress, batch_size=a.batch_size, schedule=a.schedule,
                               seed=a.seed, device=a.device, workers=a.workers, **_train_settings(a))
    except KeyboardInterrupt:
        print(f"gpuheart: interrupted; {_train_interrupted(Path(a.out))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"gpuheart: best validation Dice {res.best_val_dice:.3f} at epoch {res.best_epoch} "
          f"({_count(res.epochs_run, 'epoch')}{', stopped early' if res.stopped_early else ''}); "
          f"weights: {res.best_path}")
    if before is not None and last.stat().st_mtime_ns == before:
        print("  note: --resume found nothing left to train: " + (
            "the run had stopped early (no better validation Dice for `patience` epochs)" if res.stopped_early
            else f"it had run its {res.epochs_run} epochs; give a larger --epochs to train on"))
    return EXIT_OK


def _train_interrupted(out: Path) -> str:
    """What an interrupted ``train`` left, so that what it says to do next is true: --resume needs last.pt,
    written at the end of each epoch, and a run stopped before its first one leaves nothing."""
    last = out / "last.pt"
    if last.is_file():
        with contextlib.suppress(Exception):   # the epoch is a courtesy: the advice holds without it
            import torch

            epoch = torch.load(last, map_location="cpu", weights_only=True)["state"]["epoch"]
            return (f"epochs 1-{epoch} are saved in {out}; add --resume to the same command to continue from "
                    f"epoch {epoch + 1}")
        return f"add --resume to the same command to continue from the last epoch saved in {out}"
    if not out.exists():
        return (f"it stopped before the first epoch ended, so nothing was saved (and no folder {out} is left); "
                f"give the same command (without --resume) to start again")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return (f"it stopped before the first epoch ended, so nothing was saved ({out} is empty); give the same "
                f"command (without --resume) to start again")
    return (f"{out} holds no last.pt (what --resume continues from; it holds {', '.join(held[:4])}), so there is "
            f"nothing to resume; start again in another folder")


def _cmd_report(a) -> int:
    from .report import write_report

    if not Path(a.out_dir).is_dir():
        raise FileNotFoundError(f"{a.out_dir}: no such folder; expected the OUT folder of a gpuheart run")
    if not (Path(a.out_dir) / "summary.json").is_file():
        # a batch's OUT holds one run folder per scan: the report is per run
        runs = sorted(str(d) for d in Path(a.out_dir).iterdir() if (d / "summary.json").is_file())
        hint = (f"; the runs of a batch are in its sub-folders: gpuheart report {runs[0]}"
                + (f" (and {len(runs) - 1} more: {', '.join(runs[1:4])}{', ...' if len(runs) > 4 else ''})"
                   if len(runs) > 1 else "") if runs else "")
        raise FileNotFoundError(f"{a.out_dir}: no summary.json, so no finished gpuheart run to report on{hint}")
    print(f"gpuheart: wrote {write_report(a.out_dir)}")
    return EXIT_OK


def _cmd_info(a) -> int:
    from .io import open_scan

    with open_scan(a.input) as scan:
        d = scan.describe()
    if a.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        for k, v in _readable_info(d).items():
            print(f"{k}: {v}")
    return EXIT_OK


def _z_ranges(zs) -> str:
    """'0-9, 19, 2000-2021' for sorted slice indices."""
    from .io import _runs

    return _runs(zs, fmt=str)


def _readable_info(d: dict) -> dict:
    """``Scan.describe()`` for a person: units on the voxel size and the sizes (``--json`` keeps raw numbers)."""
    out = dict(d)
    v = d.get("voxel_size")
    out["voxel_size"] = (" x ".join(f"{x:g}" for x in v) + " µm (z, y, x)" if v
                         else "not in the files (a run assumes 1 x 1 x 1 µm unless given --voxel-size Z Y X)")
    for key in ("nbytes", "disk_bytes"):
        if isinstance(d.get(key), (int, float)):
            out[key] = f"{d[key]:,} bytes ({_human_bytes(d[key])})"
    return out


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # a user of the command wants the message, not the library line that raised it
    return f"gpuheart: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    handler = {"run": _cmd_run, "phantom": _cmd_phantom, "info": _cmd_info, "report": _cmd_report,
               "mesh": _cmd_mesh, "segment": _cmd_segment, "train": _cmd_train}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        again = {"run": "; the same command continues from the last checkpoint (--restart starts over)",
                 "segment": "; the same command continues from the last checkpoint (--restart starts over)"}
        print(f"gpuheart: interrupted{again.get(args.command, '')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # what reads our output (head, a closed pager) has gone: no error to report, and none again at exit
        # when Python flushes stdout into the same closed pipe
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
    except (ValueError, OSError, RuntimeError) as err:
        # our errors (ScanError, ConfigError, DeviceError) carry a one-line message naming the file;
        # a user should not have to read a traceback to learn that a slice is missing
        print(f"gpuheart: error: {_with_notes(err)}", file=sys.stderr)
        return EXIT_FAILED


def _with_notes(err: BaseException) -> str:
    """The message and its notes (e.g. which channel's background stage raised it), as a traceback shows them."""
    return "; ".join([str(err), *getattr(err, "__notes__", [])])


if __name__ == "__main__":
    sys.exit(main())
