"""The Pipeline: wires the stages over a stream of slabs, one channel at a time.

No image algorithm lives here; this module decides order, memory (one slab at a time),
outputs, timings and summary numbers.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import threading
import time
import warnings
from collections import defaultdict
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import backend
from .exposure import ExposureConfig


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


@dataclass(slots=True)
class DomConfig:
    """Paper step 4: difference of medians (median small - median large), thresholded per slice."""

    enabled: bool = True
    small: int = 3
    large: int = 15
    threshold: str = "otsu"  # "otsu", "sigma" (k x MAD sigma), "noise" (k x sigma of the negative DoM) or a number
    k: float = 3.0


@dataclass(slots=True)
class SegmentConfig:
    """Paper steps 3 and 5: the U-Net, and which mask becomes the segmentation."""

    method: str = "union"  # "dom", "unet", "union" of both (the paper's choice), or "otsu" (global, streamed)
    weights: str = ""  # U-Net weights file; empty: the weights shipped inside gpuheart
    threshold: float = 0.0  # on the U-Net's probability; 0: the model's own (calibrated in training), else 0.5
    tile: int = 0  # inference tile side; 0: the tile the model was trained on (128 for the shipped one)
    overlap: int = -1  # between inference tiles; -1: a quarter of the tile
    # bf16 on the CPU too (about 2x faster where the CPU has native bf16, ~0.03 % of mask pixels differ);
    # off by default so a CPU run gives the same mask on every machine. CUDA always uses bf16.
    cpu_bf16: bool = False
    # torch.compile the U-Net on CUDA for channels of at least unet.COMPILE_MIN_VOXELS (1e9, ~240 slices of
    # 2048x2048), where its ~20 s once per run pays back (4.5x the tiles/s on an H200); smaller runs and the CPU
    # run uncompiled. GPUHEART_UNET_COMPILE=0 in the environment turns it off too
    compile: bool = True


@dataclass(slots=True)
class PostprocessConfig:
    """Paper step 6: closing along z (1x1xz_size, z_iterations times), then one size3d^3 closing."""

    enabled: bool = True
    z_size: int = 5
    z_iterations: int = 5
    size3d: int = 3


@dataclass(slots=True)
class MeshConfig:
    """Paper step 7: marching cubes, pieces under min_faces dropped, optional decimation."""

    enabled: bool = True
    format: str = "glb"  # glb, ply, obj or stl
    min_faces: int = 20
    max_faces: int = 0  # 0: keep every face
    max_bytes: int = 1 << 30  # mesh files over this are decimated to fit (game engines choke); error if they cannot
    # the mesh is held whole (~200 B a face): a mask that would give more marching-cubes faces is meshed from
    # k x k x k voxel-block means, k the smallest that fits (mesh.MAX_MEMORY_FACES: ~4 GiB); 0: no limit
    max_memory_faces: int = 20_000_000
    slab_size: int = 64
    largest: bool = True  # also write the largest connected tree as its own mesh
    component_table: bool = True


@dataclass(slots=True)
class GraphConfig:
    """The connected vascular tree (largest 26-connected component) as a skeleton graph."""

    enabled: bool = True
    max_voxels: int = 50_000_000  # the tree's bounding box is downsampled in (y, x) to stay under this
    # computed in a worker thread while the mesh and the next channel go on (the outputs are the same)
    background: bool = True


@dataclass(slots=True)
class OutputConfig:
    write_preprocessed: bool = True
    tiff: bool = False  # also write every mask as a multi-page TIFF beside its OME-Zarr
    report: bool = True  # report.html with figures at the end of the run


# Sections a channel may override ([channel.C01.dom] ...); run-wide settings (device, slabs, output) may not.
MASK_OUTPUTS = frozenset({"dom_mask", "unet_mask", "mask_raw"})  # 0/255 stores: written with the mask codec
CHANNEL_SECTIONS = ("exposure", "dom", "segment", "postprocess", "mesh", "graph")

# Named bundles of channel overrides: [channel.C01] preset = "nerves".
CHANNEL_PRESETS: dict[str, dict] = {
    # Thin, dim fibres in a mostly empty channel: the vessel U-Net has never seen them, and a per-slice
    # Otsu threshold splits the noise when well under 1 % of the pixels are signal. k noise sigmas,
    # measured on the negative half of the difference of medians, need no share of signal.
    "nerves": {"segment": {"method": "dom"}, "dom": {"threshold": "noise", "k": 5.0}},
    "vessels": {},
}

# What the built-in synthetic scan's channels hold (gpuheart.phantom.PHANTOM_CHANNELS).
PHANTOM_CHANNEL_SETTINGS = {"C01": {"preset": "nerves"}}


def _check_ranges(cfg: "PipelineConfig") -> None:
    """Numbers a stage would only reject (or silently misuse) hours into a run, checked before it starts."""
    e, p, m = cfg.exposure, cfg.postprocess, cfg.mesh
    rules = [
        ("checkpoint_seconds", cfg.checkpoint_seconds, cfg.checkpoint_seconds >= 0, ">= 0"),
        ("exposure.clip_limit", e.clip_limit, e.clip_limit >= 0, ">= 0"),
        ("exposure.kernel_size", e.kernel_size, e.kernel_size >= 1, ">= 1"),
        ("exposure.asinh_scale", e.asinh_scale, e.asinh_scale >= 0, ">= 0 (0: the stack's own scale)"),
        ("exposure.robust_low", e.robust_low, 0 <= e.robust_low < e.robust_high, "in [0, robust_high)"),
        ("exposure.robust_high", e.robust_high, e.robust_high <= 100, "<= 100"),
        ("exposure.dark_ratio", e.dark_ratio, 0 <= e.dark_ratio < 1, "in [0, 1) (0, with dark_neighbour_ratio = 0: only blank slices are dark)"),
        ("exposure.dark_neighbour_ratio", e.dark_neighbour_ratio, 0 <= e.dark_neighbour_ratio < 1,
         "in [0, 1) (0: no slice is dark for dipping below its neighbours)"),
        ("dom.k", cfg.dom.k, cfg.dom.k > 0, "> 0"),
        ("segment.threshold", cfg.segment.threshold, 0 <= cfg.segment.threshold < 1,
         "in [0, 1) (0: the model's own)"),
        ("postprocess.z_size", p.z_size, p.z_size >= 1 and p.z_size % 2 == 1, "an odd number >= 1"),
        ("postprocess.z_iterations", p.z_iterations, p.z_iterations >= 0, ">= 0"),
        ("postprocess.size3d", p.size3d, p.size3d >= 1 and p.size3d % 2 == 1, "an odd number >= 1"),
        ("mesh.min_faces", m.min_faces, m.min_faces >= 0, ">= 0"),
        ("mesh.max_faces", m.max_faces, m.max_faces >= 0, ">= 0 (0: every face)"),
        ("mesh.max_bytes", m.max_bytes, m.max_bytes > 0, "> 0"),
        ("mesh.max_memory_faces", m.max_memory_faces, m.max_memory_faces >= 0, ">= 0 (0: no limit)"),
        ("mesh.slab_size", m.slab_size, m.slab_size >= 1, ">= 1"),
        ("graph.max_voxels", cfg.graph.max_voxels, cfg.graph.max_voxels >= 1, ">= 1"),
    ]
    for key, value, ok, want in rules:
        if not ok:   # NaN fails every comparison, so it lands here too
            raise ConfigError(f"{key} must be {want}, got {value!r}")


@dataclass(slots=True)
class PipelineConfig:
    """Everything a run needs besides its input; defaults are the paper's settings.

    Saved next to every run's output as ``config.toml`` and loadable with :meth:`load`.
    """

    device: str = "auto"
    channels: list[str] = field(default_factory=list)  # empty: every channel of the scan
    slab_size: int = 16
    voxel_size: list[float] = field(default_factory=list)  # (z, y, x) µm; empty: from the scan's metadata
    progress: bool = True
    checkpoint_seconds: float = 30.0  # how often pass 2 records where a killed run can resume
    exposure: ExposureConfig = field(default_factory=ExposureConfig)
    dom: DomConfig = field(default_factory=DomConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # per-channel overrides of CHANNEL_SECTIONS, optionally starting from a CHANNEL_PRESETS entry:
    # {"C01": {"preset": "nerves", "dom": {"k": 4.0}}}; channels not named use the settings above
    channel: dict = field(default_factory=dict)

    def for_channel(self, name: str) -> "PipelineConfig":
        """The settings ``name`` runs with: these, with its ``channel`` overrides applied."""
        over = self.channel.get(name)
        if not over:
            return self
        where = f"channel.{name}"
        if not isinstance(over, dict):
            raise ConfigError(f"{where}: expected a table of sections, got {over!r}")
        over = dict(over)
        preset = over.pop("preset", None)
        if preset is not None and preset not in CHANNEL_PRESETS:
            raise ConfigError(f"{where}.preset: unknown preset {preset!r}; known: {', '.join(CHANNEL_PRESETS)}")
        bad = sorted(set(over) - set(CHANNEL_SECTIONS))
        if bad:
            raise ConfigError(f"{where}: cannot override {', '.join(bad)} per channel; "
                              f"allowed: preset, {', '.join(CHANNEL_SECTIONS)}")
        d = self.to_dict()
        d["channel"] = {}
        for layer in (CHANNEL_PRESETS.get(preset, {}), over):
            for section, values in layer.items():
                if not isinstance(values, dict):
                    raise ConfigError(f"{where}.{section}: expected a table, got {values!r}")
                d[section] = {**d[section], **values}
        cfg = _build(PipelineConfig, d, where)  # its errors already name the key, e.g. channel.C01.dom.large
        try:
            return cfg.validate()
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def validate(self) -> "PipelineConfig":
        # set from Python, a value skips from_dict's type checks: PipelineConfig(channels="C00") ran as
        # channels 'C' and '0'; the checks of a config file, on these settings (types, unknown keys)
        _build(PipelineConfig, self.to_dict(), "config")
        backend.resolve_device(self.device)  # raises DeviceError with the reason
        for name in self.channel:   # a name no scan can have would be ignored, silently
            if not re.fullmatch(r"C\d{2,}", str(name)):
                m = re.fullmatch(r"(?i)c(?:h)?(\d+)", str(name))
                hint = f"; did you mean C{int(m.group(1)):02d}?" if m else ""
                raise ConfigError(f"channel.{name}: channels are named C00, C01, ... (a file's _C01 or _ch1 token "
                                  f"is channel C01), so {name!r} names none{hint}")
        if self.slab_size < 1:
            raise ConfigError(f"slab_size must be >= 1, got {self.slab_size}")
        if self.voxel_size and (len(self.voxel_size) != 3 or min(self.voxel_size) <= 0):
            raise ConfigError(f"voxel_size must be three positive numbers (z, y, x) µm, got {self.voxel_size}")
        if self.dom.small % 2 == 0 or self.dom.large % 2 == 0 or not 1 <= self.dom.small < self.dom.large:
            raise ConfigError(f"dom sizes must be odd with small < large, got {self.dom.small}, {self.dom.large}")
        _threshold_arg(self.dom.threshold)
        if self.segment.method not in ("dom", "unet", "union", "otsu"):
            raise ConfigError(f"segment.method must be 'dom', 'unet', 'union' or 'otsu', got {self.segment.method!r}")
        if self.segment.method == "otsu" and not self.output.write_preprocessed:
            raise ConfigError("segment.method 'otsu' thresholds the preprocessed volume: needs "
                              "output.write_preprocessed = true")
        if self.segment.method in ("dom", "union") and not self.dom.enabled:
            raise ConfigError(f"segment.method {self.segment.method!r} needs dom.enabled = true")
        if self.segment.tile < 0 or self.segment.overlap < -1 or 0 < self.segment.tile <= self.segment.overlap:
            raise ConfigError(f"segment.tile must be > 0 (0: the model's training tile) and segment.overlap in "
                              f"[0, tile) (-1: a quarter of the tile), got {self.segment.tile}, {self.segment.overlap}")
        if self.mesh.format not in ("glb", "ply", "obj", "stl"):
            raise ConfigError(f"mesh.format must be glb, ply, obj or stl, got {self.mesh.format!r}")
        _check_ranges(self)
        for name in self.channel:
            self.for_channel(name)
        return self

    @property
    def uses_unet(self) -> bool:
        """Whether this segmentation needs the U-Net (per channel: ``for_channel(name).uses_unet``)."""
        return self.segment.method in ("unet", "union")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        return _build(cls, data, "config")

    def save(self, path: str | os.PathLike) -> Path:
        import tomli_w

        path = Path(path)
        _atomic_write_bytes(path, tomli_w.dumps(self.to_dict()).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, validate: bool = True) -> "PipelineConfig":
        """The settings of a TOML file; ``validate=False`` leaves the checks to a caller that first applies
        options of its own (a ``--method`` that settles what the file's method alone would not allow)."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        try:
            cfg = cls.from_dict(data)
            _weights_beside(cfg, path.parent)
            return cfg.validate() if validate else cfg
        except (ConfigError, backend.DeviceError) as err:
            raise ConfigError(f"{path}: {err}") from None


def _map_weights(cfg: PipelineConfig, fn) -> None:
    """``segment.weights`` (and every channel table's) replaced by ``fn(path)``, where one is set."""
    if cfg.segment.weights:
        cfg.segment.weights = fn(cfg.segment.weights)
    for over in cfg.channel.values():
        seg = over.get("segment") if isinstance(over, dict) else None
        if isinstance(seg, dict) and isinstance(seg.get("weights"), str) and seg["weights"]:
            seg["weights"] = fn(seg["weights"])


def _absolute_weights(cfg: PipelineConfig) -> PipelineConfig:
    """A copy of ``cfg`` with every weights path made absolute."""
    import copy

    out = copy.deepcopy(cfg)
    _map_weights(out, _absolute)
    return out


def _weights_beside(cfg: PipelineConfig, folder: Path) -> None:
    """A relative ``segment.weights`` in a config file names a file beside that file where one is there (as
    paths in config files usually do), so a config kept with its weights runs from any working folder."""
    _map_weights(cfg, lambda w: str((folder / w).resolve()) if not Path(w).is_absolute() and (folder / w).exists()
                 else w)


def _run_folder_weights(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg``, or a copy whose weights that name a ``gpuheart train`` run folder name its best.pt (as
    ``--weights RUN`` does): the run's fingerprint and summary then record the file itself."""
    import copy

    def best(w):
        return str(Path(w) / "best.pt") if Path(w).is_dir() and (Path(w) / "best.pt").is_file() else w

    out = copy.deepcopy(cfg)
    _map_weights(out, best)
    return out


# keys earlier versions wrote into config.toml, accepted with a warning so those files still load
_RETIRED = {"OutputConfig": {"write_mask": "the final mask is always written: the mesh and measurements read it"}}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in set(data) & set(_RETIRED.get(cls.__name__, {})):  # config files written by earlier versions
        warnings.warn(f"{where}.{key} is no longer used ({_RETIRED[cls.__name__][key]}); ignored", stacklevel=4)
        data = {k: v for k, v in data.items() if k != key}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value, default, where):
    # TOML ints are fine where floats are expected; anything else must match the default's type.
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str) and where.endswith("threshold") and isinstance(value, (int, float)):
        ok, value = True, str(value)
    elif isinstance(default, list):
        # the list's items too: voxel_size = ["a", 1, 2] was a TypeError traceback in the range check
        item = _LIST_ITEMS.get(where.rsplit(".", 1)[-1])
        ok = isinstance(value, (list, tuple)) and all(_is(v, item) for v in value)   # a tuple: from Python
        value = list(value) if ok else value
        want = f"a list of {'strings' if item is str else 'numbers'}" if item else "list"
        if ok and item is float:
            value = [float(v) for v in value]
        if not ok:
            raise ConfigError(f"{where}: expected {want}, got {value!r}")
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


_LIST_ITEMS = {"channels": str, "voxel_size": float}


def _is(value, item) -> bool:
    if item is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return item is None or isinstance(value, item)


def _threshold_arg(value: str):
    if value in ("otsu", "sigma", "noise"):
        return value
    try:
        t = float(value)
    except ValueError:
        raise ConfigError(f"dom.threshold must be 'otsu', 'sigma', 'noise' or a number, got {value!r}") from None
    # vessels are brighter than their surroundings: a negative cut marks most of the background
    if not t >= 0 or t == float("inf"):
        raise ConfigError(f"dom.threshold must be a number >= 0 (grey levels of the difference of medians of the "
                          f"0-255 preprocessed image), got {value!r}")
    return t


@dataclass
class RunResult:
    """What a run produced: output paths, per-stage seconds, and summary numbers per channel."""

    out_dir: Path
    outputs: dict[str, dict[str, Path]]
    timings: dict[str, float]
    summary: dict[str, Any]
    report: Path | None = None
    # channel -> slice pass 2 continued at (a reused channel, or one whose pass 2 was kept: its slice count)
    resumed: dict[str, int] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # channels whose finished results an identical run left
    # channel -> why the checkpoint an earlier run left in its folder was neither continued nor reused (one line)
    started_over: dict[str, str] = field(default_factory=dict)
    # channel -> the settings of later stages (closings, mesh, graph, slab size) that differed from the earlier
    # run whose pass 2 (preprocessing and segmentation stores) this one took over, finished or to continue
    later_only: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir),
                "outputs": {c: {k: str(v) for k, v in o.items()} for c, o in self.outputs.items()},
                "timings_s": self.timings, "summary": self.summary,
                "report": str(self.report) if self.report else None,
                "resumed": dict(self.resumed), "reused": list(self.reused), "started_over": dict(self.started_over),
                "later_only": dict(self.later_only)}


class _Timer:
    """Accumulates wall seconds per stage name.

    On CUDA, kernels run asynchronously: without a synchronization a stage's kernels would be charged to
    whichever later stage first waits for them. So in the thread that created it (the one queueing the
    work), the timer waits for the current stream at both ends of a stage; elsewhere (the background
    reader) it does not, so it never stalls a thread that queues no device work.
    """

    def __init__(self, device: str = "cpu"):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = backend.synchronizer(device)
        self._owner = threading.get_ident()

    @contextmanager
    def __call__(self, stage: str):
        sync = self._sync if threading.get_ident() == self._owner else None
        if sync:
            sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                sync()
            self.seconds[stage] += time.perf_counter() - t0


class Pipeline:
    """``Pipeline(config).run(source, out_dir)``: stream a scan through the stages.

    ``source`` is the path of anything :func:`gpuheart.io.open_scan` opens, or None for the built-in synthetic
    scan (written to ``out_dir/input`` first, with its ground truth, so Dice is reported too). An in-memory
    array is refused (TypeError): write it with :func:`gpuheart.io.write_tiff` first.
    ``truth`` maps channel names to mask files (any format ``open_scan`` reads) to score against.
    """

    def __init__(self, config: PipelineConfig | None = None):
        self.config = (config or PipelineConfig()).validate()
        self.last_run: RunResult | None = None   # what segment()'s run did (resumed where), for its caller

    def run(self, source=None, out_dir="gpuheart-out", truth: dict[str, str] | str | os.PathLike | None = None,
            phantom_preset: str = "default", resume: bool = True, client=None) -> RunResult:
        """Process ``source`` into ``out_dir``. ``source=None`` writes the built-in synthetic scan (with exact truth) to
        ``out_dir/input`` first, of size ``phantom_preset`` ("tiny", "default" or "large", as
        :meth:`gpuheart.phantom.PhantomConfig.preset`), and scores against it. With ``resume`` (the default), a
        run that was killed continues from its last checkpoint when started again with the same input and
        settings (a manifest in ``out_dir/<channel>/.resume`` records completed work); the outputs equal those
        of an uninterrupted run (``RunResult.started_over`` says, per channel, why an earlier run's checkpoint
        could not be used). ``resume=False`` starts over. With a ``dask.distributed`` ``client``, the slabs of
        pass 2 (the per-slice stages and the U-Net) run as tasks on its workers, which must see the same file
        system; global statistics, halos and mesh seams stay with this process, so the outputs equal a local
        run's. ``truth`` maps channel names to labelled masks to score against; a bare path is the mask of a
        one-channel scan's (or a one-channel run's) channel."""
        from .io import _scan_path

        if source is not None:
            _scan_path(source)   # an array is refused before an earlier run's summary is removed
        # absolute: summary.json's paths must resolve from wherever it is read, not the folder a run started in
        out_dir = Path(out_dir).absolute()
        created = not out_dir.exists()
        try:
            with _out_lock(_writable_folder(out_dir)):
                return self._run(source, out_dir, truth, phantom_preset, resume, client)
        except BaseException:
            if created:   # a scan that failed at once (a wrong path) leaves no empty OUT/<name>/ behind
                (out_dir / _LOCK).unlink(missing_ok=True)
                _remove_if_empty(out_dir)
            raise

    def _run(self, source, out_dir: Path, truth, phantom_preset: str, resume: bool, client) -> RunResult:
        from .io import open_scan

        started = time.monotonic()
        cfg = _run_folder_weights(self.config)
        timer = _Timer(backend.resolve_device(cfg.device))
        out_dir = _writable_folder(out_dir)
        # an earlier run's summary and report would make this run look finished until it is
        # (report/ is left: it is rewritten with the page, and OUT may be a folder with one of the user's own);
        # removed only once the scan and settings pass their checks: a refused command (a mistyped channel) must
        # not cost the record of a finished run
        earlier = _earlier_run_files(out_dir, cfg.output.report)
        # read now: the file goes before this run writes its own, and a channel reused from it keeps the record
        # of what computing it cost
        earlier_runs = _earlier_computations(out_dir / "summary.json") if out_dir / "summary.json" in earlier \
            else []
        channels = list(dict.fromkeys(cfg.channels)) or None   # "--channels C00 C00" runs C00 once
        # a bare path is the truth of a one-channel scan's channel (key None until the scan is open)
        user_truth = {None: truth} if isinstance(truth, (str, os.PathLike)) else dict(truth or {})
        phantom = source is None
        if phantom:
            with timer("phantom"):
                source, truth = _write_default_input(out_dir / "input", phantom_preset, cfg.progress)
            channels = channels or list(truth)  # the phantom's stained channels, not autofluorescence
            if not cfg.channel:  # its channels' contents are known: nerves get the nerve settings
                from dataclasses import replace

                cfg = replace(cfg, channel={c: v for c, v in PHANTOM_CHANNEL_SETTINGS.items() if c in channels}
                              ).validate()
        voxel = tuple(cfg.voxel_size) or None
        with open_scan(source, channels=channels, voxel_size=voxel) as scan:
            user_truth = _truth_files(_name_the_only_channel(scan, user_truth))
            if not phantom:
                truth = user_truth
            _check_channel_names(scan, cfg, user_truth)
            _check_truths(scan, user_truth)
            _warn_single_slice(scan, cfg)
            # every channel before any runs: a channel's fresh start removes files in its own folder, where
            # another channel's truth may lie
            for channel in scan.channels:
                _check_inputs_are_not_outputs(out_dir / channel, scan.path, *(truth or {}).values())
            for path in earlier:
                path.unlink(missing_ok=True)
            models: dict[str, Any] = {}  # weights path -> model, loaded once
            resumed: dict[str, int] = {}
            reused: list[str] = []
            started_over: dict[str, str] = {}
            later_only: dict[str, str] = {}
            desc = scan.describe()  # once: for a Zarr store it sums every chunk file's size
            desc["path"] = str(Path(desc["path"]).absolute())
            outputs, summary = {}, {"input": desc, "device": backend.resolve_device(cfg.device),
                                    "segmentation": cfg.segment.method}
            stamps: dict = {}  # the files' stamps, taken once for every channel
            graphs, ok = _TreeGraphs(timer), False
            try:
                for channel in scan.channels:
                    graphs.settle(wait=False)  # finish the channels whose graph is in, for a resume
                    t = (truth or {}).get(channel)
                    ccfg = cfg.for_channel(channel)
                    key = _fingerprint_key(ccfg, scan, channel, t, stamps, desc)
                    ck = _Checkpoint(out_dir / channel, key, resume)
                    if ck.next_z or ck.done or ck.manifest.get("stats"):   # 0: after pass 1, its statistics kept
                        resumed[channel] = scan.shape[0] if ck.done else ck.next_z
                    if ck.done:
                        reused.append(channel)
                    model = None
                    if ccfg.uses_unet and not ck.done:
                        _warn_if_preprocessing_differs_from_training(channel, ccfg.exposure)
                        if ccfg.segment.weights not in models:
                            models[ccfg.segment.weights] = _load_model(ccfg)
                        model = models[ccfg.segment.weights]
                        _check_tiles(channel, ccfg.segment, model)
                    outputs[channel], summary[channel] = _run_channel(scan, channel, ccfg, out_dir / channel, timer,
                                                                      t, model, ck, client, graphs)
                    if ck.restarted:  # its stores did not match the checkpoint: pass 2 ran from slice 0
                        resumed.pop(channel, None)
                    if ck.why:
                        started_over[channel] = ck.why
                    elif ck.later and not ck.restarted:
                        later_only[channel] = ck.later
                    summary[channel]["segmentation"] = ccfg.segment.method
                graphs.settle(wait=True)
                ok = True
            finally:
                graphs.close(ok)
        _absolute_weights(cfg).save(out_dir / "config.toml")   # reloadable from any working folder
        # channel folders an earlier run worked in and this one left alone: not removed (the user may want
        # them), but this run's config.toml and summary.json do not describe them, so say so
        others = sorted(d.name for d in out_dir.iterdir() if d.is_dir() and (d / ".resume").is_dir()
                        and d.name not in outputs)
        if others:
            warnings.warn(f"{out_dir}: {', '.join(others)} hold(s) outputs of an earlier run with other channels "
                          f"or settings, which this run's config.toml and summary.json do not describe",
                          RuntimeWarning, stacklevel=3)
        # what this run itself did, for throughput: reused channels cost it nothing, a resumed one only its
        # remaining slices, and with Dask the stage seconds are summed over the workers, so only this wall
        # time is the run's
        summary["this_run"] = {
            "wall_s": time.monotonic() - started, "computed": [c for c in outputs if c not in reused],
            "reused": list(reused), "resumed_at": {c: z for c, z in resumed.items() if c not in reused},
            "later_stages_only": dict(later_only),
            "stage_seconds": "summed over the Dask workers (worker-seconds)" if client is not None else "wall clock",
            "reused_from": _reused_from(earlier_runs, reused)}
        result = RunResult(out_dir, outputs, dict(timer.seconds), summary, resumed=resumed, reused=reused,
                           started_over=started_over, later_only=later_only)
        _write_summary(out_dir, result)
        if cfg.output.report:
            from .report import write_report

            with timer("report"):
                result.report = write_report(out_dir)
            # the page cannot hold its own time, but the run's seconds in summary.json and on the console must
            # (drawing a large mesh's picture took 3-12 s a channel, missing from both)
            result.timings["report"] = timer.seconds["report"]
            summary["this_run"]["wall_s"] = time.monotonic() - started
            _write_summary(out_dir, result)
        return result

    def segment(self, source, out_path, channel: str | None = None, resume: bool = True) -> Path:
        """Steps 1-5 (and 6 when ``config.postprocess.enabled``) on one channel of ``source``, written
        as a uint8 0/255 multi-page TIFF of the scan's (z, y, x) shape at ``out_path`` (atomically; a
        one-slice scan gives one page, which TIFF readers return as (y, x)).

        The run works in ``.<name>.gpuheart-work/`` beside ``out_path``, removed once the TIFF is written;
        a killed segmentation leaves it, and the same call continues from its checkpoint (``resume=False``
        starts over), as :meth:`run` does."""
        from dataclasses import replace

        from .io import _is_zarr_dir, _scan_path, first_channel, open_scan, refuse_folder

        refuse_folder(out_path, "segment")   # now, not after the segmentation
        if Path(out_path).suffix.lower() not in (".tif", ".tiff"):   # a TIFF named mask.png opens nowhere
            raise ValueError(f"{out_path}: segment writes a multi-page TIFF; expected an output name ending in .tif "
                             f"or .tiff (gpuheart run writes OME-Zarr masks)")
        src, dst = _scan_path(source).resolve(), Path(out_path).resolve()
        # a slice folder reads only the files directly in it; a Zarr store owns everything below it
        if dst == src or dst.parent == src or (src in dst.parents and _is_zarr_dir(src)):
            raise ConfigError(f"{out_path}: is the input scan or lies in its folder (where it would be read as a "
                              f"slice); expected an output path outside {source}")
        cfg = replace(self.config, mesh=replace(self.config.mesh, enabled=False),
                      graph=replace(self.config.graph, enabled=False))
        if channel:
            cfg.channels = [channel]
        elif cfg.channels:
            cfg.channels = cfg.channels[:1]   # one mask is written: the others' work would be thrown away
        else:
            cfg.channels = [first_channel(source)]
        # a config shared with `run` may hold other channels' tables: not this command's to call unused
        cfg.channel = {k: v for k, v in cfg.channel.items() if k in cfg.channels}
        # global Otsu thresholds the written preprocessed volume; it lives in the temporary run folder
        keep_pre = "otsu" in (cfg.segment.method, cfg.for_channel(cfg.channels[0]).segment.method)
        cfg = replace(cfg, output=replace(cfg.output, write_preprocessed=keep_pre, report=False))
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # a fixed name, not a fresh temporary folder: a killed segmentation of a large scan is resumed by the
        # same command instead of starting over beside a hidden copy of what it had done
        work = segment_work_dir(out_path)
        if (holder := lock_holder(work)) is not None:
            raise ConfigError(f"{out_path}: another gpuheart segment is writing it (process {holder}, working in "
                              f"{work}); wait for it to finish, or choose another output")
        existed = work.exists()
        try:
            result = self.last_run = Pipeline(cfg).run(source, work, resume=resume)
            mask_path = result.outputs[cfg.channels[0]]["mask"]
            with open_scan(mask_path) as m:
                voxel = m.voxel_size
            # an unknown voxel size stays unknown in the TIFF rather than becoming a calibrated 1 µm
            known = result.summary.get("input", {}).get("voxel_size") is not None
            _zarr_to_tiff(mask_path, out_path, voxel if known else None)
        except Exception:
            # an earlier interrupted segmentation's checkpoint is kept whatever failed now (a mistyped option
            # must not cost it), and so is this call's own once it has a checkpoint (a full disk is no reason
            # to lose hours of work); only a failure before any checkpoint leaves nothing worth a folder
            if not existed and not (work / cfg.channels[0] / ".resume" / "manifest.json").is_file():
                shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        return out_path

    def segment_array(self, volume, work_dir=None) -> np.ndarray:
        """:meth:`segment` of an in-memory (z, y, x) or (y, x) array (NumPy or CuPy): the uint8 0/255 mask, of
        the array's shape, on the host.

        The same answer as ``gpuheart segment`` on the array saved as a TIFF, because that is what runs: the
        array is written to a temporary folder (in ``work_dir``, else the system's temporary folder: it needs
        about the array's size twice over) that is removed afterwards, so a killed call is not resumed."""
        import tempfile
        from dataclasses import replace

        import tifffile

        from .io import write_tiff

        arr = backend.to_host(volume) if hasattr(volume, "shape") else np.asarray(volume)
        _check_volume(arr)
        with tempfile.TemporaryDirectory(prefix="gpuheart-segment-", dir=work_dir) as tmp:
            src = write_tiff(Path(tmp) / "volume.tif", _tiff_storable(arr))
            cfg = replace(self.config, channels=[])   # the TIFF's one channel, whatever the config names
            with warnings.catch_warnings():
                if arr.ndim == 2:   # asked for: not worth the warning a one-slice scan gets
                    warnings.filterwarnings("ignore", message=".*the scan has one slice")
                mask = tifffile.imread(Pipeline(cfg).segment(src, Path(tmp) / "mask.tif", resume=False))
        return mask.reshape(arr.shape)


def _check_volume(arr: np.ndarray) -> None:
    """Refused here, by the array's own terms: the run would name a temporary file instead."""
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise ValueError(f"expected a (z, y, x) or (y, x) array with no empty axis, got shape {arr.shape}")
    if arr.dtype.kind not in "buif":
        raise ValueError(f"expected a numeric array (bool, integers or floats), got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = (~np.isfinite(arr if arr.ndim == 3 else arr[np.newaxis])).any(axis=(1, 2))
        if bad.any():
            zs = np.flatnonzero(bad)
            raise ValueError(f"the array holds NaN or infinite values (slice {int(zs[0])}; {len(zs)} of "
                             f"{len(bad)} slices); expected finite intensities (e.g. np.nan_to_num first)")


def _tiff_storable(arr: np.ndarray) -> np.ndarray:
    """64-bit integers (NumPy's default, e.g. ``np.array`` of Python ints), which TIFF does not hold, as the
    smallest integer type that holds their values; values beyond int32 are refused, not rounded."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize < 8:
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    for t in (np.uint8, np.uint16, np.int16, np.uint32, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return arr.astype(t)
    raise ValueError(f"the {arr.dtype} array holds values from {lo} to {hi}, beyond what a TIFF slice holds "
                     f"as an integer (int32); expected intensities, e.g. rescaled to float32")


def _is_run_summary(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and {"outputs", "timings_s", "summary"} <= d.keys()


def _json_error(path: Path) -> str | None:
    """Why ``path`` is not readable JSON (None when it is)."""
    try:
        json.loads(path.read_bytes())
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    except ValueError as err:   # UnicodeDecodeError too
        return f"not valid JSON: {err}"
    return None


def _is_run_report(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"<title>gpuheart report</title>" in f.read(4096)
    except OSError:
        return False


def _tile_args(seg: SegmentConfig) -> tuple[int | None, int | None]:
    """``predict``'s tile and overlap from the config's (0 and -1 mean "the model's own": None)."""
    return seg.tile or None, None if seg.overlap < 0 else seg.overlap


def _check_tiles(channel: str, seg: SegmentConfig, model) -> None:
    """The inference tile and overlap this model will get, checked before pass 1 rather than at the first slab."""
    from .unet import inference_tile

    tile, overlap = inference_tile(model, *_tile_args(seg))
    align = 2 ** getattr(model, "depth", 0)
    if tile % align or not 0 <= overlap < tile:
        raise ConfigError(f"channel {channel}: segment.tile {tile} and segment.overlap {overlap} do not suit "
                          f"this U-Net: expected a tile divisible by {align} (2**depth) and an overlap in [0, tile)")


def segment_work_dir(out_path) -> Path:
    """The folder :meth:`Pipeline.segment` works in for ``out_path`` (left by a killed segmentation)."""
    out_path = Path(out_path)
    return out_path.parent / f".{out_path.name}.gpuheart-work"


_LOCK = ".gpuheart-lock"


@contextmanager
def _out_lock(out_dir: Path):
    """Hold ``out_dir`` for this run: two runs writing one folder remove and rewrite each other's stores, and
    the one that finishes last reports the damage as results. An advisory lock (flock) the OS drops when the
    process dies, so a killed run never leaves the folder locked. The file stays: unlinking it would let a
    third run lock a new file while a second still holds the old one."""
    try:
        import fcntl
    except ImportError:   # Windows: no flock; runs are not guarded there
        yield
        return
    path = out_dir / _LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConfigError(f"{out_dir}: another gpuheart run is writing in this folder (process {holder}); "
                              f"expected a folder no other run uses: wait for it to finish, or choose another -o"
                              ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(out_dir) -> str | None:
    """The process id another run holding ``out_dir`` wrote in its lock ("unknown" where it wrote none yet), or
    None when no run holds it (or the platform has no flock)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(Path(out_dir) / _LOCK)
    except OSError:   # no lock file: no run ever held the folder
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()   # refuses a folder with anything in it: work to resume from is never removed
    except OSError:
        pass


def _writable_folder(path: Path) -> Path:
    """``path`` as an existing folder this process can write in, or a ConfigError saying why not (before any
    work, instead of the OS's errno text from deep inside the first write)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder; expected an output folder")
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):   # nameless where the OS allows: nothing left behind
            pass
    except OSError as err:
        raise ConfigError(f"{path}: cannot write there ({err.strerror or err}); expected a writable output "
                          f"folder") from None
    return path


def _warn_if_preprocessing_differs_from_training(channel: str, exposure: ExposureConfig) -> None:
    """``gpuheart train`` preprocesses with the default [exposure] settings; a U-Net fed other preprocessing
    sees images unlike those it learned from, and says nothing about it."""
    # the dark ratios only decide which slices come out blank, where the U-Net's mask is emptied anyway
    changed = {k: v for k, v in asdict(exposure).items()
               if v != getattr(ExposureConfig(), k) and k not in ("dark_ratio", "dark_neighbour_ratio")}
    if changed:
        warnings.warn(f"channel {channel}: [exposure] {changed} differs from the defaults the U-Net was trained "
                      f"on (gpuheart train preprocesses with the defaults), so its mask may be worse than its "
                      f"scores; the difference of medians is not affected", RuntimeWarning, stacklevel=4)


def _earlier_run_files(out_dir: Path, report: bool) -> list[Path]:
    """The summary.json and report.html an earlier run left in ``out_dir``, for removal once this run is known
    to go ahead. A file of that name that no gpuheart run wrote (OUT may be a folder of the user's) is never
    removed: it is an error when this run would write over it, before anything is written."""
    ours = []
    for name, is_ours, writes in (("summary.json", _is_run_summary, True), ("report.html", _is_run_report, report)):
        path = out_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        if is_ours(path):
            ours.append(path)
        elif writes:
            bad = _json_error(path) if name == "summary.json" else None
            if bad:   # cut short or damaged: whose it was cannot be told, so it is not removed either
                raise ConfigError(f"{path} is unreadable ({bad}), and a run writes its {name} there: if an "
                                  f"earlier gpuheart run left it, delete it and run again; else choose another -o")
            raise ConfigError(f"{path} was not written by gpuheart, and a run writes its {name} there: "
                              f"choose another -o (or move that file)")
    return ours


def _earlier_computations(path: Path) -> list[dict]:
    """The runs that computed the channels of an earlier run's summary.json: that run for the channels it
    computed, and the records it carried for those it reused. [] when the file does not say (unreadable,
    or from before runs recorded what they computed)."""
    try:
        record = json.loads(path.read_text())
        this = record["summary"]["this_run"]
        own = {"channels": [str(c) for c in this["computed"]], "wall_s": float(this["wall_s"]),
               "resumed_at": dict(this.get("resumed_at") or {}), "stage_seconds": this.get("stage_seconds"),
               "timings_s": {str(k): float(v) for k, v in record["timings_s"].items()}}
        carried = [r for r in this.get("reused_from") or []
                   if isinstance(r, dict) and isinstance(r.get("channels"), list)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return ([own] if own["channels"] else []) + carried


def _reused_from(runs: list[dict], reused: list[str]) -> list[dict]:
    """Of the earlier runs' records, those that computed a channel this run reused, narrowed to those channels:
    a run that reuses every channel costs seconds, and the minutes that computing them took stay on record."""
    kept = [{**r, "channels": [c for c in r["channels"] if c in reused]} for r in runs]
    return [r for r in kept if r["channels"]]


def _check_inputs_are_not_outputs(out: Path, *inputs) -> None:
    """A scan or truth mask given from among a channel's own outputs (``OUT/C00/mask.tif`` as truth) would be
    removed or written over by the run that reads it."""
    own = {(out / name).resolve() for name in _CHANNEL_OUTPUTS}
    for given in inputs:
        if given is None:
            continue
        p = Path(given).resolve()
        if p in own or own.intersection(p.parents):
            raise ConfigError(f"{given} is one of the outputs this run writes in {out} (it would be removed and "
                              f"rewritten): copy it elsewhere first, or choose another -o")


def _name_the_only_channel(scan, truth: dict) -> dict:
    """A truth mask given without a channel (key None) is the scan's only channel's; with several channels
    it is refused, naming them, rather than scored against a guess."""
    if None not in truth:
        return truth
    if len(scan.channels) != 1 and (per_channel := _truth_folder_channels(truth[None], scan.channels)):
        # a folder of one stack per channel (gpuheart phantom's truth/): each channel its own file
        named = {k: v for k, v in truth.items() if k is not None}
        return {**per_channel, **named}
    if len(scan.channels) != 1:
        raise ConfigError(f"{scan.path}: a truth mask ({truth[None]}) was given without a channel, but this run "
                          f"processes {len(scan.channels)} channels ({', '.join(scan.channels)}); name one: "
                          f"--truth CHANNEL MASK (Python: truth={{'CHANNEL': path}})")
    named = {k: v for k, v in truth.items() if k is not None}
    only = scan.channels[0]
    if only in named and named[only] != truth[None]:
        raise ConfigError(f"truth for channel {only} given twice ({named[only]} and {truth[None]}); expected one mask")
    return {**named, only: truth[None]}


def _truth_folder_channels(path, channels) -> dict:
    """{channel: path} for the run's ``channels`` that a folder of one stack per channel at ``path`` has a file
    for; {} where ``path`` is no such folder or has none of them."""
    from .io import ScanError, _channel_stacks

    if not Path(path).is_dir():
        return {}
    try:
        stacks = _channel_stacks(Path(path), None) or {}
    except (ScanError, OSError):   # not such a folder: the usual message follows
        return {}
    return {c: str(stacks[c]) for c in channels if c in stacks}


def _check_channel_names(scan, cfg: PipelineConfig, truth: dict) -> None:
    """A truth mask for a channel that is not processed is an error (no Dice would be reported, silently);
    per-channel settings for a channel the scan does not have are reported (a config may serve many scans)."""
    unknown = [c for c in truth if c not in scan.channels]
    if unknown:
        raise ConfigError(f"{scan.path}: truth given for channel(s) {', '.join(unknown)}, which this run does not "
                          f"process (its channels: {', '.join(scan.channels)})")
    unused = [c for c in cfg.channel if c not in scan.channels]
    if unused:
        which = (f"which this run does not process (it processes {', '.join(scan.channels)})" if cfg.channels
                 else f"which the scan does not have (its channels: {', '.join(scan.channels)})")
        warnings.warn(f"{scan.path}: settings given for channel(s) {', '.join(unused)} (--preset or [channel.NAME]), "
                      f"{which}; they are unused", stacklevel=4)


def _warn_single_slice(scan, cfg: PipelineConfig) -> None:
    """One slice runs (a 2-D test image is a fair first try) but its closings along z, mesh and vessel tree
    are those of a one-voxel-thick slab: a multi-page file opened as one page, or the wrong file of a folder,
    would otherwise pass as a finished scan. Said only when such a stage runs (`segment` of a 2-D image
    without --postprocess is a plain 2-D segmentation)."""
    stages = [name for name, on in (("the closings along z", cfg.postprocess.enabled), ("the mesh", cfg.mesh.enabled),
                                    ("the vessel tree", cfg.graph.enabled)) if on]
    if scan.shape[0] == 1 and stages:
        said = ", ".join(stages[:-1]) + (" and " if len(stages) > 1 else "") + stages[-1]
        warnings.warn(f"{scan.path}: the scan has one slice ({scan.shape[1]} x {scan.shape[2]}): it is processed "
                      f"as a one-slice volume, a slab one voxel thick for {said}; expected a stack (a folder of "
                      f"slices or a multi-page TIFF)", UserWarning, stacklevel=5)


def _truth_files(truth: dict) -> dict:
    """A truth given as a folder of one stack per channel (what ``gpuheart phantom`` writes as OUT/truth, or
    Fiji's Split Channels) stands for its file of that channel: ``--truth C00 OUT/truth``."""
    from .io import ScanError, _channel_stacks

    out = {}
    for channel, path in truth.items():
        if Path(path).is_dir():
            try:   # only that channel's file is looked at (a damaged one of another channel is no matter)
                stacks = _channel_stacks(Path(path), [channel])
            except (ScanError, OSError):   # not such a folder, or not with this channel: _check_truths says why
                stacks = None
            path = str(stacks[channel]) if stacks else path
        out[channel] = path
    return out


def _check_truths(scan, truth: dict) -> None:
    """Each truth mask opened and checked before the first channel runs (not hours later, at its channel).
    A mask of several channels would be scored by its first one, silently: a scan given as truth by mistake
    (every pixel of its first channel above 0 counts as vessel) passed as a poor segmentation."""
    from .io import open_scan

    for channel, path in truth.items():
        with open_scan(path) as t:
            if len(t.channels) != 1:
                raise ConfigError(f"{path}: truth mask for channel {channel} has {len(t.channels)} channels "
                                  f"({', '.join(t.channels)}); expected one (a mask, not a scan)")
            if t.shape != tuple(scan.shape):
                raise ConfigError(f"{path}: truth mask has shape {t.shape}, expected {tuple(scan.shape)} "
                                  f"(the scan's channel {channel})")
            _check_truth_values(path, t.read_slice(t.channels[0], t.shape[0] // 2), t.shape[0] // 2)


# a label stack may number its classes or vessels (every nonzero value is vessel), but an image of intensities
# has hundreds of values in a slice: one slice is read to tell them apart before the run
_TRUTH_MAX_VALUES = 16


def _check_truth_values(path, plane: np.ndarray, z: int) -> None:
    values = np.unique(plane)
    fractions = plane.dtype.kind == "f" and not np.array_equal(values, np.round(values))
    if fractions or len(values) > _TRUTH_MAX_VALUES:
        shown = ", ".join(f"{v:g}" for v in values[:4].astype(float))
        raise ConfigError(f"{path}: truth mask holds {len(values)} different values in slice {z} ({shown}, ...), "
                          f"an image of intensities or probabilities, not a mask; expected 0 for background and "
                          f"nonzero for vessel (e.g. 0/255 or 0/1)")


def _load_model(cfg: PipelineConfig):
    from . import unet

    w = cfg.segment.weights
    if w and Path(w).is_dir():
        raise ConfigError(f"segment.weights: {w} is a folder without best.pt; expected a weights file (.pt) or "
                          f"the run folder of gpuheart train, which holds best.pt")
    if w and not Path(w).is_file():
        raise ConfigError(f"segment.weights: {w} is not a file")
    return unet.load_weights(w) if w else unet.load_default()


def _write_default_input(folder: Path, preset: str, progress: bool):
    from .phantom import PhantomConfig, write_phantom

    want = PhantomConfig.preset(preset)
    if not (folder / "scan").is_dir() or not _same_phantom(folder, want):
        # reuse a phantom written by an earlier run of the same command, never one of another preset;
        # replace only a scan a run wrote (phantom.json), never a folder of the user's that happens to be there
        if folder.exists() and any(folder.iterdir()) and not (folder / "phantom.json").is_file():
            raise ConfigError(f"{folder} exists and is not a synthetic scan gpuheart wrote (no phantom.json); "
                              f"a run without INPUT writes its synthetic scan there: choose another -o")
        if folder.exists():
            shutil.rmtree(folder)
        write_phantom(want, folder, progress=progress)
    truth = {p.stem: str(p) for p in sorted((folder / "truth").glob("*.tif"))}
    return folder / "scan", truth


def _same_phantom(folder: Path, want) -> bool:
    """Whether ``folder/phantom.json`` records the configuration ``want``."""
    try:
        have = json.loads((folder / "phantom.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return json.loads(json.dumps(asdict(want), default=_jsonable)) == have


def _run_channel(scan, channel, cfg: PipelineConfig, out: Path, timer: _Timer, truth_path, model,
                 ck: "_Checkpoint", client=None, graphs: "_TreeGraphs | None" = None):
    """One channel's passes and outputs. Its tree graph goes to ``graphs`` (computed inline without one),
    which finishes the channel's checkpoint once the graph is in; the returned paths and summary get the
    graph's entries then."""
    from . import exposure

    if ck.done:
        return ck.result()
    out.mkdir(parents=True, exist_ok=True)
    stats = ck.load_stats()
    if stats is None:
        # pass 1 reads every slice: a bad one (NaN, cut short) stops the run here, before the earlier
        # run's outputs are removed
        with timer("stats (pass 1)"):
            stats = _slice_stats(scan, channel, cfg)
    if not ck.next_z and ck.earlier:  # a fresh start: nothing of an earlier run may pass for this one's
        _remove_earlier_outputs(out)
    if not ck.manifest.get("stats"):
        ck.save_stats(stats)
    znorm = exposure.ZNorm.from_stats(stats, dark_ratio=cfg.exposure.dark_ratio,
                                      dark_neighbour_ratio=cfg.exposure.dark_neighbour_ratio)
    acc = _ChannelAccumulator(scan.shape, truth_path, channel, znorm.dark)
    voxel = tuple(cfg.voxel_size) or scan.voxel_size
    with _open_writers(out, scan.shape, voxel, cfg, ck, acc) as writers:
        if client is None:
            _pass2(scan, channel, cfg, timer, znorm, acc, model, writers, ck)
        else:
            _pass2_distributed(client, scan, channel, cfg, timer, znorm, acc, model, writers, ck)
    paths = dict(writers.paths)
    if ck.rescore:
        with timer("truth scores (pass 2 reused)"):
            _rescore(acc, paths, cfg)
        ck.save(scan.shape[0], acc)
    ck.pass2_complete(scan.shape[0])
    if cfg.segment.method == "otsu":
        with timer("global otsu"):
            paths["otsu_mask"] = _global_otsu(paths["preprocessed"], out, voxel, cfg, acc)
    seg = paths.get("otsu_mask") or paths.get("mask_raw") or paths.get("unet_mask") or paths.get("dom_mask")
    if seg is not None:
        paths["mask"] = _postprocess(seg, out, voxel, cfg, timer, acc) if cfg.postprocess.enabled else seg
    bg = cfg.graph.background and graphs is not None  # without a _TreeGraphs to wait for it: inline
    graphs = graphs or _TreeGraphs()
    tree_paths: dict = {}  # its own dict: the worker must not add keys to one this thread iterates
    tree = None
    if cfg.graph.enabled and "mask" in paths:  # first, so that it overlaps the mesh
        mask_path = paths["mask"]
        tree = graphs.start(lambda stop: _tree_graph(mask_path, out, voxel, cfg, tree_paths, timer,
                                                     BACKGROUND if bg else "", stop), bg, channel)
    if cfg.output.tiff:
        with timer("write"):
            _write_tiffs(paths, voxel)
    summary = acc.summary(stats)
    summary["normalization"] = _normalization_record(znorm, cfg.exposure.normalize)
    if model is not None:   # which model cut where: a mask is not reproducible without both
        from .unet import default_weights_path

        summary["unet"] = {"weights": str(Path(cfg.segment.weights or default_weights_path()).resolve()),
                           "threshold": float(cfg.segment.threshold or model.meta.get("threshold", 0.5))}
    if cfg.mesh.enabled and "mask" in paths:
        with timer("mesh"):
            summary["mesh"] = _mesh(paths["mask"], out, voxel, cfg, paths)
    with timer("report figures"):
        acc.save_figures(out / "figures.npz")

    def finish(tree_summary):
        if tree is not None:
            summary["tree"] = tree_summary
            paths.update(tree_paths)
        ck.finish(paths, summary)

    graphs.then(tree, finish)
    return paths, summary


# marks the seconds of a stage run in a worker thread, overlapped with the others: they are not added to the
# run's total (what they cost it is their "wait" stage)
BACKGROUND = " (background)"


class _GraphStopped(Exception):
    """A background tree graph told to stop: its channel cannot be finished (the run was interrupted)."""


class _GraphWorker:
    """One daemon thread running what is submitted to it, in order (a one-thread ThreadPoolExecutor, whose
    thread Python 3.13 joins at exit: after a second Ctrl-C ``gpuheart run`` then hung until the thinning
    ended, and a third printed a traceback; a daemon thread does not keep the process alive)."""

    def __init__(self, name: str):
        import queue

        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if future.set_running_or_notify_cancel():   # False: cancelled while queued
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # noqa: BLE001 - the future carries it to the main thread
                    future.set_exception(err)
            del item, future, fn, args   # nothing of a finished graph is held while the queue waits

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        self._queue.put(None)
        if wait:
            self._thread.join()


class _TreeGraphs:
    """Tree graphs computed in one worker thread while this thread goes on with the channel's mesh and the
    next channel's passes.

    A tree graph is CPU work (SciPy's labelling, skimage's thinning, which releases the GIL): in a GPU run
    the CPU would otherwise wait for the device there, and on the CPU the two share the cores. One worker,
    so graphs run one at a time and at most one tree's box (``graph.max_voxels``) is held beside the next
    channel's slabs. A channel's checkpoint says done only once its graph is in.
    """

    def __init__(self, timer: "_Timer | None" = None):
        self._timer = timer or _Timer()
        self._pool: _GraphWorker | None = None
        self._pending: list[tuple[Future, Any]] = []  # (graph, what finishes its channel), in channel order
        # every graph given to the worker, (graph, its stop event, channel): from start() on, before its
        # channel's mesh, so that an interrupt there still reaches it
        self._submitted: list[tuple[Future, threading.Event, str]] = []

    def start(self, fn, background: bool = True, channel: str = "") -> Future:
        """``fn(stop)`` in the worker, or here (as a completed future) when not ``background``. ``stop`` is
        a :class:`threading.Event`, set when the graph's channel can no longer be finished: the graph then
        raises :class:`_GraphStopped` at its next slab."""
        stop = threading.Event()
        if background:
            if self._pool is None:
                self._pool = _GraphWorker("gpuheart-tree-graph")
            graph = self._pool.submit(fn, stop)
            self._submitted.append((graph, stop, channel))
            return graph
        done: Future = Future()
        done.set_result(fn(stop))   # an error is raised here, as before there was a worker
        return done

    def then(self, graph: Future | None, finish) -> None:
        """``finish(graph's result)`` in this thread once ``graph`` is in (None: no graph, at once)."""
        if graph is None:
            graph = Future()
            graph.set_result(None)
        self._pending.append((graph, finish))
        self.settle(wait=False)

    def settle(self, wait: bool) -> None:
        """Finish the channels whose graph is in, in order; with ``wait``, all of them (a graph's error is
        raised here)."""
        while self._pending and (wait or self._pending[0][0].done()):
            graph, finish = self._pending[0]
            if not graph.done():  # what the background graphs cost the run: the time it waits for them
                with self._timer("tree graph: wait"):
                    futures_wait([graph])
            # taken off only now: interrupted while waiting, the channel is still close()'s to finish
            self._pending.pop(0)
            try:
                result = graph.result()
            except Exception as err:   # raised maybe a channel later: say whose it was
                channel = next((c for g, _, c in self._submitted if g is graph), None)
                if channel:
                    err.__notes__ = [*getattr(err, "__notes__", []),
                                     f"in {channel}'s tree graph (computed in the background while the run went on)"]
                raise
            finish(result)

    def close(self, ok: bool) -> None:
        """Stop the worker. After an error or an interrupt, no queued graph starts; a running graph whose
        channel is otherwise finished is waited for (the thinning cannot be stopped), so that a rerun reuses
        the channel instead of redoing its closings and mesh; one whose channel was cut short (its mesh, say)
        is of no use and stops at its next slab. The channels whose graph is in are still finished."""
        stops = [stop for _, stop, _ in self._submitted]
        try:
            if not ok:
                wanted = {id(graph) for graph, _ in self._pending}
                running = []
                for graph, stop, channel in self._submitted:
                    if graph.cancel() or graph.done():
                        continue
                    if id(graph) not in wanted:
                        stop.set()
                    running.append((graph, channel, id(graph) in wanted))
                if running and futures_wait([g for g, _, _ in running], timeout=0.5).not_done:
                    import sys

                    print("gpuheart: " + "; ".join(
                        f"waiting for {channel}'s tree graph, so that a rerun reuses {channel}" if keep else
                        f"stopping {channel}'s tree graph" for _, channel, keep in running)
                        + " (Ctrl-C to stop now)", file=sys.stderr, flush=True)
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        finally:
            for stop in stops:   # a second interrupt while waiting: the graph stops at its next slab
                stop.set()
        if not ok:
            for graph, finish in self._pending:
                if graph.done() and not graph.cancelled() and graph.exception() is None:
                    with suppress(Exception):  # the error being raised matters more than this one
                        finish(graph.result())
            self._pending.clear()


def _slice_stats(scan, channel: str, cfg: PipelineConfig) -> list:
    """Pass 1: every slice's statistics, read a slab at a time (so a folder's slices decode in parallel),
    one slab in memory."""
    from . import exposure

    stats, nz, step = [], scan.shape[0], cfg.slab_size
    for z0 in _progress(range(0, nz, step), cfg.progress, f"{channel} stats slabs", total=-(-nz // step)):
        slab = scan.read_slab(channel, z0, min(z0 + step, nz))
        try:
            stats += [exposure.slice_stats(s, z=z0 + i) for i, s in enumerate(slab)]
        except ValueError as err:  # NaN/Inf pixels: say in which file and channel
            from .io import ScanError

            bad = next((z0 + i for i, s in enumerate(slab) if not np.isfinite(s).all()), z0)
            raise ScanError(f"{scan.slice_file(channel, bad)} (channel {channel}): {err}") from err
    return stats


def _open_writers(out, shape, voxel, cfg, ck: "_Checkpoint", acc) -> "_Writers":
    """Pass-2 writers, reopened at the checkpoint when every partial store survived, else fresh."""
    names = _pass2_outputs(cfg)
    start = ck.restore(acc)
    if start:
        writers = _Writers(out, shape, voxel, names, cfg.slab_size, resume_slices=start, channel=acc.channel)
        if writers.resumed == start:
            return writers
        ck.why = writers.mismatch
        writers.discard()
    # from slice 0: nothing of a checkpoint's state may stay (restore() may have loaded part of it before
    # failing), but the dark slices stay known: they are the z-normalization's, not the checkpoint's
    acc.__init__(shape, acc.truth_path, acc.channel, acc.dark)
    ck.reset()
    if ck.earlier:
        _remove_earlier_outputs(out)
    return _Writers(out, shape, voxel, names, cfg.slab_size, channel=acc.channel)


# what a channel's run may write ([mesh] format may be any of these)
_MESH_FORMATS = ("glb", "ply", "obj", "stl")
_CHANNEL_OUTPUTS = (
    [f"{n}.ome.zarr" for n in ("preprocessed", "dom_mask", "unet_mask", "mask_raw", "otsu_mask", "mask")]
    + [f"{n}.tif" for n in ("dom_mask", "unet_mask", "mask_raw", "otsu_mask", "mask")]
    + [f"{n}.{f}" for n in ("mesh", "largest_tree") for f in _MESH_FORMATS]
    + ["components.csv", "voxel_components.csv", "tree_branches.csv", "tree.graphml", "figures.npz"])


# what the stages after pass 2 write: removed when a run takes over an earlier run's pass 2
_PASS2_STORES = tuple(f"{n}.ome.zarr" for n in ("preprocessed", "dom_mask", "unet_mask", "mask_raw"))
_LATER_OUTPUTS = tuple(n for n in _CHANNEL_OUTPUTS if n not in _PASS2_STORES)


def _remove_earlier_outputs(out: Path) -> None:
    """A channel computed afresh first removes what an earlier run (other settings or input) left in its
    folder: an output this run does not write (say unet_mask after a switch to method "dom"), or one it
    fails before replacing, would otherwise look like part of this run; also what a killed run left of
    them (``.partial`` stores, an ``.old-<pid>`` copy from a kill while committing)."""
    _remove_outputs(out, _CHANNEL_OUTPUTS)


def _remove_outputs(out: Path, names) -> None:
    from .io import _remove

    for name in names:
        for path in [out / name, out / f"{name}.partial", *out.glob(f"{glob.escape(name)}.old-*")]:
            if path.exists() or path.is_symlink():
                _remove(path)


def _pass2(scan, channel, cfg, timer, znorm, acc, model, writers, ck):
    device = backend.resolve_device(cfg.device)
    nz, step = scan.shape[0], cfg.slab_size
    starts = range(ck.next_z, nz, step)
    # planned from free device memory, and shrunk for good after a device out-of-memory error
    budget = {"slices": plan_slices(step, scan.shape, backend.device_free_bytes() if device == "cuda" else None)}
    # read in a background thread (its time is "read", overlapped) and, on CUDA, copied to the device on
    # a second stream from pinned buffers while this slab is computed; "input wait" is what that leaves
    c = _context(model)
    # a 2.5-D U-Net needs c neighbouring slices beyond each end of the slab (read with it: a z-halo)
    reads = _timed(((z0, scan.read_slab(channel, *_read_range(z0, step, nz, c))) for z0 in starts), timer, "read")
    last = time.monotonic()
    # closed on the way out, whatever the way: its reader thread reads the scan, which the caller closes next
    # (left to the garbage collector, an error or Ctrl-C here kept it reading a closed file)
    with closing(backend.prefetch(reads, device)) as prefetched:
        for z0, x in _progress(_timed(prefetched, timer, "input wait"), cfg.progress, f"{channel} slabs",
                               total=len(starts)):
            halo = _halo(z0, x.shape[0], min(step, nz - z0), c)
            acc.add_raw(z0, x[halo[0]:x.shape[0] - halo[1]])
            for z, products in _pieces_with_retry(x, z0, znorm, cfg, timer, acc, model, budget, halo):
                with timer("write"):
                    writers.write(z, products)
                acc.add(z, products)
                del products   # a piece's device arrays go before the next piece is computed
            if time.monotonic() - last >= cfg.checkpoint_seconds:
                with timer("checkpoint"):
                    ck.save(z0 + min(step, nz - z0), acc)
                last = time.monotonic()
    if ck.next_z < nz:  # pass 2 is complete: a run killed in the closings or the mesh does not redo it
        with timer("checkpoint"):
            ck.save(nz, acc)


def _context(model) -> int:
    """Slices of z-halo the U-Net needs on each side of a slab (0 without a model or for a 2-D one)."""
    if model is None:
        return 0
    from .unet import context_slices
    return context_slices(model)


def _read_range(z0: int, step: int, nz: int, c: int) -> tuple[int, int]:
    """The slices to read for the slab at ``z0``: its own and up to ``c`` more on each side."""
    return max(z0 - c, 0), min(z0 + step + c, nz)


def _halo(z0: int, n_read: int, n_core: int, c: int) -> tuple[int, int]:
    """(before, after) halo slices of a slab of ``n_core`` slices at ``z0`` read as ``n_read`` with up to
    ``c`` more on each side (fewer at the ends of the stack)."""
    lo = min(c, z0)
    return lo, n_read - lo - n_core


# device bytes one slice needs at the peak of pass 2, per pixel: the raw slice, float32 copies for
# z-normalization, asinh and CLAHE, the uint8 result, the signed difference of medians, masks, and the
# U-Net's probability map; the U-Net's own activations are sized separately by its batch planner
BYTES_PER_PIXEL = 40


def plan_slices(slab_size: int, shape, free_bytes: int | None, fraction: float = 0.5) -> int:
    """How many slices of a slab to put on the device at once: the slab, unless ``fraction`` of the free
    device memory holds fewer (never less than one). Without a device (``free_bytes`` None), the slab."""
    if free_bytes is None:
        return slab_size
    per_slice = BYTES_PER_PIXEL * shape[1] * shape[2]
    return int(max(1, min(slab_size, fraction * free_bytes // per_slice)))


def _pieces_with_retry(x, z0, znorm, cfg, timer, acc, model, budget: dict, halo=(0, 0)):
    """``_process_slab`` in pieces of at most ``budget["slices"]`` slices, yielded as ``(first z, products)``;
    a CUDA out-of-memory error halves the pieces (for the rest of the run, with a warning) and retries, down
    to one slice. Every stage of pass 2 works slice by slice (a 2.5-D U-Net with its neighbours, which every
    piece gets as its own halo), so the pieces give exactly the whole slab's result. The caller writes and
    accumulates each piece before asking for the next: pieces are never concatenated, which would need the
    whole slab's products on the device at once, the memory the split was made to save. ``x`` holds
    ``halo`` extra slices before and after z0's."""
    import warnings

    lo, hi = halo
    n_core, c = x.shape[0] - lo - hi, _context(model)
    i = 0
    while i < n_core:
        n = min(budget["slices"], n_core - i)
        a, b = lo + i, lo + i + n
        piece_halo = (min(c, a), min(c, x.shape[0] - b))
        try:
            products = _process_slab(x[a - piece_halo[0]:b + piece_halo[1]], z0 + i, znorm, cfg, timer, acc,
                                     model, piece_halo)
        except Exception as err:
            if not backend.is_device_oom(err) or n == 1:
                raise
            backend.free_device_memory()
            budget["slices"] = max(1, n // 2)
            warnings.warn(f"out of device memory on slices {z0 + i}..{z0 + i + n}: continuing with "
                          f"{budget['slices']}-slice pieces", RuntimeWarning, stacklevel=2)
            continue
        yield z0 + i, products
        del products
        i += n


def _pass2_distributed(client, scan, channel, cfg, timer, znorm, acc, model, writers, ck):
    """Pass 2 with every slab a Dask task: workers read their slab, process it, write it into the partial
    stores, and return their measurements, which are merged here in slab order (identical to a local run)."""
    nz, step = scan.shape[0], cfg.slab_size
    starts = list(range(ck.next_z, nz, step))
    stores = {name: str(w.partial) for name, w in writers._w.items()}
    job = dict(src=str(scan.path), channel=channel, shape=scan.shape, step=step, cfg=cfg, znorm=znorm,
               model=model, stores=stores, truth=acc.truth_path)
    futures = client.map(_slab_task, starts, **job, pure=False)
    last = time.monotonic()
    for z0, fut in _progress(zip(starts, futures), cfg.progress, f"{channel} slabs (dask)", total=len(starts)):
        arrays, plain, seconds = fut.result()
        acc.merge_state(arrays, plain)
        for stage, sec in seconds.items():
            timer.seconds[stage] += sec
        for w in writers._w.values():
            w.mark_written(z0, min(z0 + step, nz))
        if time.monotonic() - last >= cfg.checkpoint_seconds:
            ck.save(min(z0 + step, nz), acc)
            last = time.monotonic()
    if ck.next_z < nz:
        ck.save(nz, acc)


def _slab_task(z0, src, channel, shape, step, cfg, znorm, model, stores, truth):
    """One slab of pass 2 on a worker (see _pass2_distributed)."""
    from .io import open_scan, write_partial_slab

    timer = _Timer(backend.resolve_device(cfg.device))
    c, n_core = _context(model), min(step, shape[0] - z0)
    with timer("read"), open_scan(src, channels=[channel]) as scan:
        data = scan.read_slab(channel, *_read_range(z0, step, shape[0], c))
    halo = _halo(z0, data.shape[0], n_core, c)
    acc = _ChannelAccumulator(shape, truth, channel, znorm.dark)
    device = backend.resolve_device(cfg.device)
    x = backend.to_device(data, device)
    acc.add_raw(z0, x[halo[0]:halo[0] + n_core])
    budget = {"slices": plan_slices(step, shape, backend.device_free_bytes() if device == "cuda" else None)}
    for z, products in _pieces_with_retry(x, z0, znorm, cfg, timer, acc, model, budget, halo):
        with timer("write"):
            for name, partial in stores.items():
                a = backend.to_host(products[name])
                write_partial_slab(partial, z, a.astype(np.uint8) * 255 if a.dtype == bool else a)
        acc.add(z, products)
        del products
    if acc.truth is not None:
        acc.truth.close()
    arrays, plain = acc.state()
    return arrays, plain, dict(timer.seconds)


def _tree_graph(mask_path: Path, out: Path, voxel, cfg: PipelineConfig, paths: dict, timer: "_Timer",
                stage_suffix: str = "", stop: "threading.Event | None" = None) -> dict:
    """The largest connected vascular tree as a skeleton graph (branches CSV + GraphML).

    Components are found by streamed labelling (one slab in memory); only the tree's bounding box is
    then held, downsampled in (y, x) when it would exceed ``graph.max_voxels``. ``stage_suffix`` marks
    the stages' seconds as overlapped with others (:data:`BACKGROUND`); once ``stop`` is set, the graph
    raises :class:`_GraphStopped` at its next slab (or before its skeleton).
    """
    from . import graph
    from .io import open_scan, usable_cores
    from .morphology import label_slabs

    vs = np.asarray(voxel or (1.0, 1.0, 1.0), float)
    # two stages, because they scale differently: the labelling with the scan, the skeleton with the
    # tree's (pooled, capped) box
    with timer("tree graph: labelling" + stage_suffix), open_scan(mask_path) as m:
        read_mask = mask_reader(m)

        def read(z0, z1):
            if stop is not None and stop.is_set():
                raise _GraphStopped
            return read_mask(z0, z1)

        # slabs labelled side by side: in a GPU run the cores are otherwise idle here. At most 4, each
        # holding a slab and its int64 labels (9 bytes a voxel: 0.6 GB for 16 slices of 2048 x 2048)
        workers = min(4, usable_cores())
        labels = label_slabs(read, m.shape, cfg.slab_size, connectivity=3, workers=workers)
        lo, hi = labels.box_lo, labels.box_hi
        paths["voxel_components"] = _write_voxel_components(out / "voxel_components.csv", labels.sizes, lo, hi,
                                                            voxel)
        if labels.n_components == 0:
            # every table is written (empty) and the summary has its usual keys, for scripts reading either
            g = graph.skeleton_graph(np.zeros((1, 1, 1), bool), tuple(vs))
            _write_tree_graph(g, out, paths)
            return {**graph.summarize(g), "tree_voxels": 0, "components": 0, "downsample_yx": 1,
                    "note": "empty mask"}
        tree = int(np.argmax(labels.sizes))
        (z0, y0, x0), (z1, y1, x1) = lo[tree - 1], hi[tree - 1]
        # pool each slab as it arrives, so the full-resolution box is never held
        k = max(1, int(np.ceil(np.sqrt((z1 - z0) * (y1 - y0) * (x1 - x0) / cfg.graph.max_voxels))))
        parts = []
        for a, b, lab in labels.relabel(read, (z0, z1), workers):  # only the slabs the tree's box spans
            lo, hi = max(a, z0), min(b, z1)
            if lo < hi:
                parts.append(graph.downsample_yx(lab[lo - a:hi - a, y0:y1, x0:x1] == tree, k))
        sub = np.concatenate(parts)
    if stop is not None and stop.is_set():
        raise _GraphStopped
    with timer("tree graph: skeleton" + stage_suffix):
        origin = np.array([z0, y0, x0]) * vs + graph.pooled_offset_um(vs, k)
        g = graph.skeleton_graph(sub, tuple(vs * [1, k, k]), origin_um=tuple(origin))
        _write_tree_graph(g, out, paths)
    return {**graph.summarize(g), "tree_voxels": int(labels.sizes[tree]), "components": labels.n_components,
            "downsample_yx": k}


def _write_tree_graph(g, out: Path, paths: dict) -> None:
    from . import graph

    paths["tree_branches"], paths["tree_graphml"] = out / "tree_branches.csv", out / "tree.graphml"
    graph.write_branches_csv(g, paths["tree_branches"])
    graph.write_graphml(g, paths["tree_graphml"])


def _write_voxel_components(path: Path, sizes, lo, hi, voxel) -> Path:
    """One row per 26-connected component of the final mask, largest first (``component`` is that rank, 1 the
    largest, as in the mesh's components.csv): voxels, volume, bounding box."""
    vs = np.asarray(voxel or (1.0, 1.0, 1.0), float)
    order = np.argsort(-sizes[1:], kind="stable")
    rows = ["component,voxels,volume_um3,z_min_index,y_min_index,x_min_index,z_max_index,y_max_index,x_max_index"]
    for rank, i in enumerate(order, 1):
        rows.append(",".join(map(str, [rank, int(sizes[i + 1]), float(sizes[i + 1] * vs.prod()),
                                       *lo[i].tolist(), *(hi[i] - 1).tolist()])))
    _atomic_write_bytes(path, ("\n".join(rows) + "\n").encode())
    return path


def mask_reader(scan):
    """``read_slab(z0, z1)`` -> bool slab of a one-channel mask scan (nonzero = inside), for the streamed stages."""
    def read(z0, z1):
        a = scan.read_slab(scan.channels[0], z0, z1)   # a fresh array (Scan.read_slab): ours to overwrite
        if a.dtype == np.uint8 and a.flags.c_contiguous and a.flags.writeable:
            # in place: pass 3 reads slabs several times the slab size deep, and "a > 0" held two of them
            return np.not_equal(a, 0, out=a.view(bool))
        return a > 0

    return read


def _zarr_to_tiff(src: Path, dst: Path, voxel) -> Path:
    """Copy a one-channel OME-Zarr volume into a multi-page TIFF, slice by slice (atomic, see io.write_tiff)."""
    from .io import open_scan, write_tiff

    with open_scan(src) as m:
        return write_tiff(dst, (m.read_slice(m.channels[0], z) for z in range(m.shape[0])),
                          voxel_size=voxel, shape=m.shape, dtype=np.uint8)


def _write_tiffs(paths: dict, voxel) -> None:
    """A multi-page TIFF beside every OME-Zarr mask (streamed slice by slice, atomic), for tools without Zarr."""
    for name in [n for n in paths if n.endswith("mask") or n == "mask_raw"]:
        paths[f"{name}_tiff"] = _zarr_to_tiff(paths[name], paths[name].with_name(f"{name}.tif"), voxel)


def _pass2_outputs(cfg: PipelineConfig) -> list[str]:
    names = ["preprocessed"] if cfg.output.write_preprocessed else []
    if cfg.dom.enabled:
        names.append("dom_mask")
    if cfg.uses_unet:
        names.append("unet_mask")
    if cfg.segment.method == "union":
        names.append("mask_raw")
    return names


def _compile_pays(cfg: PipelineConfig, nz: int, yx) -> bool:
    """Whether this channel is large enough for torch.compile of the U-Net to pay back (CUDA only, where
    ``predict`` turns it on by default)."""
    from .unet import COMPILE_MIN_VOXELS

    return cfg.segment.compile and nz * int(yx[0]) * int(yx[1]) >= COMPILE_MIN_VOXELS


def _process_slab(x, z0, znorm, cfg: PipelineConfig, timer: _Timer, acc, model, halo=(0, 0)) -> dict:
    """Paper steps 1-5 on one slab: preprocessing, difference of medians, U-Net, union. ``x`` starts at
    slice ``z0 - halo[0]``; the halo slices are preprocessed for a 2.5-D U-Net only, not returned."""
    from . import exposure, filters, segment

    lo, hi = halo
    core = slice(lo, x.shape[0] - hi)
    pre_halo = exposure.preprocess(x, znorm, z0 - lo, cfg.exposure, timer,
                                   lambda n: acc.add_normalized(z0, n[core]))
    pre = pre_halo[core]
    out = {"preprocessed": pre}
    if cfg.dom.enabled:
        with timer("difference of medians"):
            out["dom"] = filters.difference_of_medians(pre, cfg.dom.small, cfg.dom.large)
        with timer("threshold"):
            thr = _threshold_arg(cfg.dom.threshold)
            # per slice, so the mask does not depend on how the stack was cut into slabs
            out["dom_mask"] = out["dom"] > segment.dom_thresholds(out["dom"], thr, cfg.dom.k)
    if model is not None:
        from .unet import predict

        with timer("u-net"):
            tile, overlap = _tile_args(cfg.segment)
            prob = predict(model, pre_halo, tile=tile, overlap=overlap, device=cfg.device,
                           amp=True if cfg.segment.cpu_bf16 else None, halo=halo,
                           compile=None if _compile_pays(cfg, znorm.nz, pre.shape[-2:]) else False)
            out["unet_mask"] = prob > (cfg.segment.threshold or getattr(model, "meta", {}).get("threshold", 0.5))
    # a dark slice (laser dropout) holds no signal, and a U-Net shown a blank tile may still answer
    # vessel; leaving it empty lets the closing along z bridge it from its neighbours
    for i in np.flatnonzero(znorm.dark[z0:z0 + pre.shape[0]]):
        for name in ("dom_mask", "unet_mask"):
            if name in out:
                out[name][int(i)] = False
    if cfg.segment.method == "union":
        with timer("union"):
            out["mask_raw"] = segment.union(out["dom_mask"], out["unet_mask"])
    return out


def _global_otsu(pre_path: Path, out: Path, voxel, cfg: PipelineConfig, acc) -> Path:
    """One Otsu threshold for the whole preprocessed stack, from the histogram pass 2 gathered, applied
    in a streamed pass: the global threshold a whole-volume ``pre > threshold_otsu(pre)`` gives."""
    from skimage.filters import threshold_otsu

    from .io import ZarrWriter, open_scan

    hist = acc.histogram
    used = np.flatnonzero(hist)
    # skimage's integer-image Otsu histogram spans [min, max] of the image; do the same
    thr = threshold_otsu(hist=(hist[used[0]:used[-1] + 1], np.arange(used[0], used[-1] + 1))) if len(used) > 1 \
        else 255
    acc.otsu_threshold = float(thr)
    path = out / "otsu_mask.ome.zarr"
    # pass 2 drew the DoM mask as "mask" (the only one it had); the segmentation is this one
    acc.fig.pop("mip_mask", None), acc.fig.pop("mid_mask", None)
    with open_scan(pre_path) as p, ZarrWriter(path, p.shape, np.uint8, voxel_size=voxel, binary=True,
                                              channel=acc.channel,
                                              chunks=(cfg.slab_size, min(p.shape[1], 256), min(p.shape[2], 256))) as w:
        for z0 in range(0, p.shape[0], cfg.slab_size):
            mask = p.read_slab(p.channels[0], z0, min(z0 + cfg.slab_size, p.shape[0])) > thr
            w.write(z0, mask.astype(np.uint8) * 255)
            acc.score("otsu", z0, mask)
            acc.add_mask("mask", z0, mask)
    return path


def _rescore(acc, paths: dict, cfg: PipelineConfig) -> None:
    """Score pass 2's masks, read back from their stores, against this run's truth mask (or forget the
    earlier one's scores): what pass 2 would have measured, at the cost of reading the masks."""
    from .io import open_scan

    acc.forget_truth_scores()
    if acc.truth is None:
        return
    for kind, name in (("dom", "dom_mask"), ("unet", "unet_mask"), ("union", "mask_raw")):
        if name in paths:
            with open_scan(paths[name]) as m:
                read = mask_reader(m)
                for z0 in range(0, m.shape[0], cfg.slab_size):
                    acc.score(kind, z0, read(z0, min(z0 + cfg.slab_size, m.shape[0])))


def _postprocess(mask_path: Path, out: Path, voxel, cfg: PipelineConfig, timer: _Timer, acc) -> Path:
    """Paper step 6, streamed from the pass-2 mask with the halo the closings need (pass 3)."""
    from .io import ZarrWriter, open_scan
    from .morphology import postprocess_slabs, reach

    p = cfg.postprocess
    # twice the halo: thick enough that re-reading the halo costs at most as much as the slab, thin
    # enough that memory does not depend on the scan's depth
    slab = max(cfg.slab_size, 2 * reach(p.z_size, p.z_iterations, p.size3d))
    with open_scan(mask_path) as m, \
            ZarrWriter(out / "mask.ome.zarr", m.shape, np.uint8, voxel_size=voxel, binary=True,
                       channel=acc.channel,
                       chunks=(min(slab, m.shape[0]), min(m.shape[1], 256), min(m.shape[2], 256))) as w:
        read = mask_reader(m)  # one z-chunk per slab written: no chunk is read back and merged
        slabs = _timed(postprocess_slabs(read, m.shape, slab, p.z_size, p.z_iterations, p.size3d,
                                         device=backend.resolve_device(cfg.device)), timer, "closing")
        bar = _progress(slabs, cfg.progress, f"{out.name} closing slabs", total=-(-m.shape[0] // slab))
        for z0, z1, closed in bar:
            with timer("write"):
                w.write(z0, closed.view(np.uint8) * 255)   # a bool is one byte, 0 or 1
            acc.score("final", z0, closed)
            acc.add_mask("final", z0, closed)  # the report's figures of mask.ome.zarr, not of the mask before
    return out / "mask.ome.zarr"


def _mesh(mask_path: Path, out: Path, voxel, cfg: PipelineConfig, paths: dict) -> dict:
    """Paper step 7 from the final mask; also the component table and the largest tree."""
    from dataclasses import asdict as _asdict

    from .io import open_scan
    from .mesh import mesh_from_mask

    mc = cfg.mesh
    with open_scan(mask_path) as m:
        stats = mesh_from_mask(
            mask_reader(m), m.shape, out / f"mesh.{mc.format}",
            voxel or (1.0, 1.0, 1.0), slab_size=mc.slab_size, min_faces=mc.min_faces,
            max_faces=mc.max_faces or None, max_bytes=mc.max_bytes, max_memory_faces=mc.max_memory_faces or None,
            table_path=out / "components.csv" if mc.component_table else None,
            largest_path=out / f"largest_tree.{mc.format}" if mc.largest else None,
            device=backend.resolve_device(cfg.device), progress=cfg.progress)
    paths["mesh"] = out / f"mesh.{mc.format}"
    if mc.component_table:
        paths["components"] = out / "components.csv"
    if mc.largest:
        paths["largest_tree"] = out / f"largest_tree.{mc.format}"
    return _asdict(stats)


class _Writers:
    """The OME-Zarr outputs of pass 2 for one channel; each is committed only when fully written."""

    def __init__(self, out: Path, shape, voxel, names: list[str], slab_size: int, resume_slices: int = 0,
                 channel: str | None = None):
        from .io import ZarrWriter

        # one z-chunk per slab: a slab rewritten after a crash replaces whole chunks, never half of one (a slab
        # split into pieces after a device out-of-memory error writes parts of a chunk, the whole slab before
        # its checkpoint, so a resume still rewrites whole chunks)
        chunks = (slab_size, min(shape[1], 256), min(shape[2], 256))
        self.paths = {n: out / f"{n}.ome.zarr" for n in names}
        self._w = {n: ZarrWriter(p, shape, np.uint8, chunks=chunks, voxel_size=voxel, resume_slices=resume_slices,
                                 binary=n in MASK_OUTPUTS, channel=channel)
                   for n, p in self.paths.items()}
        self.resumed = min((w.resumed for w in self._w.values()), default=resume_slices)
        # why a store could not be reopened at the checkpoint (the first one's reason)
        self.mismatch = next((f"its partial store {w.partial.name} {w.mismatch}" for w in self._w.values()
                              if w.resumed < resume_slices and w.mismatch), None)

    def discard(self):
        for w in self._w.values():
            w.abort()

    def write(self, z0, products: dict):
        for name, w in self._w.items():
            a = backend.to_host(products[name])
            w.write(z0, a.astype(np.uint8) * 255 if a.dtype == bool else a)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for w in self._w.values():
            w.__exit__(exc_type, exc, tb)
        return False


def _hash(key: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint_key(cfg: PipelineConfig, scan, channel: str, truth, stamps: dict | None = None,
                     desc: dict | None = None) -> dict:
    """What must match for a resumed run to continue an earlier one: settings, input and channel, and the
    size and modification time of the files read (the scan, the truth mask, the U-Net weights), so a scan
    re-exported under the same name, or weights retrained in place, are processed again, not reused.
    ``stamps`` caches the files' stamps for one run (every channel reads the same scan), ``desc`` is the
    scan's ``describe()`` if the caller has it. Plain JSON data: the manifest keeps it, to say what differs."""
    from .io import source_stamp

    stamps = {} if stamps is None else stamps

    def stamp(path):
        key = str(path)
        if key not in stamps:
            stamps[key] = source_stamp(path)
        return stamps[key]

    d = cfg.to_dict()
    # none of these changes a channel's outputs (the report is drawn from them afterwards); nor do the
    # channels chosen and other channels' overrides (``cfg`` is this channel's, its overrides applied), so
    # `--channels C00` after a run of every channel reuses C00; "auto" counts as the device it resolves to
    d.pop("progress"), d.pop("checkpoint_seconds"), d["output"].pop("report"), d.pop("channels"), d.pop("channel")
    d["graph"].pop("background")
    d["device"] = backend.resolve_device(cfg.device)
    if d["segment"].get("weights"):   # the file, not how it was spelled (config.toml saves it absolute)
        d["segment"]["weights"] = _absolute(d["segment"]["weights"])
    desc = desc or scan.describe()
    weights = None
    if cfg.uses_unet:
        from .unet import default_weights_path

        weights = stamp(cfg.segment.weights or default_weights_path())
    # not the scan's "channels": a run of fewer channels opens the scan with only those
    inp = {k: desc.get(k) for k in ("path", "shape", "dtype", "voxel_size")}
    # the files, not how they were spelled: `run scan -o out` and `run /data/scan -o /data/out` are one run
    inp["path"] = _absolute(inp["path"])
    key = {"config": d, "input": inp,
           "channel": channel, "truth": _absolute(truth) if truth else None,
           "files": {"input": stamp(scan.path), "truth": stamp(truth) if truth else None, "weights": weights}}
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _absolute(path) -> str | None:
    return None if path is None else str(Path(path).resolve())


# settings that act only after pass 2 (on its stores): a run differing from an earlier one in these alone
# takes over that run's pass 2 (the slow part) and redoes the closings, mesh and measurements; the slab size
# changes how pass 2 is cut, not what it computes (a pass 2 left unfinished is continued at its own only);
# the voxel size enters pass 2 only as its stores' metadata, rewritten when they are taken over
_LATER_SETTINGS = ("postprocess", "mesh", "graph", "slab_size", "voxel_size")


def _pass2_key(key: dict) -> dict:
    """The part of a fingerprint key (:func:`_fingerprint_key`) that pass 2's stores and measurements depend on."""
    config = {k: v for k, v in key.get("config", {}).items() if k not in _LATER_SETTINGS}
    if isinstance(config.get("output"), dict):   # the TIFF copies are written at the end, from the stores
        config["output"] = {k: v for k, v in config["output"].items() if k != "tiff"}
    inp = key.get("input")
    if isinstance(inp, dict):   # the scan's own voxel size: as --voxel-size above
        inp = {k: v for k, v in inp.items() if k != "voxel_size"}
    # the truth mask is only scored against pass 2's masks: another one is scored from the stores (_rescore)
    files = {k: v for k, v in (key.get("files") or {}).items() if k != "truth"}
    return {**key, "config": config, "input": inp, "truth": None, "files": files}


def _truth_id(key: dict) -> str:
    """Which truth mask (file and stamp) a pass-2 measurement state was scored against."""
    return _hash({"truth": key.get("truth"), "stamp": (key.get("files") or {}).get("truth")})


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _output_stamp(path: Path) -> list[int]:
    """[files, bytes] of an output, every chunk of a store included (no dates: OUT copied without them is the
    same output; a deleted or cut-short chunk changes the count or the size; unlike
    io.source_stamp, which must not walk a large input store on every run: outputs are checked only when a
    finished run is reused, and a damaged chunk there is what the check is for)."""
    if path.is_file():
        return [1, path.stat().st_size]
    n = size = 0
    for root, _, files in os.walk(path):
        for name in files:
            n, size = n + 1, size + os.stat(os.path.join(root, name)).st_size
    return [n, size]


def _stamp_change(what: str, old, new) -> str:
    """``source_stamp`` [files, bytes, newest mtime] before and now, in words."""
    try:
        (n0, b0, t0), (n1, b1, t1) = old, new
    except (TypeError, ValueError):
        return f"{what} changed since"
    said = [f"{n0} -> {n1} files"] * (n0 != n1) + [f"{b0} -> {b1} bytes"] * (b0 != b1)
    if t0 != t1:
        said.append("modified since" if t1 > t0 else "an older modification time")
    return f"{what} changed ({', '.join(said) or 'stamp differs'})"


def _why_not_the_same(old, new) -> str:
    """One line: what differs between an earlier run's fingerprint key (from its manifest) and this run's."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "the earlier run had other settings or input (its checkpoint does not record which)"
    why = []
    oi, ni = old.get("input") or {}, new.get("input") or {}
    if oi.get("path") != ni.get("path"):
        why.append(f"another input ({oi.get('path')} -> {ni.get('path')})")
    else:
        # a --voxel-size given is the input's voxel size too: said once, as a setting, below
        set_voxel = (old.get("config") or {}).get("voxel_size") != (new.get("config") or {}).get("voxel_size")
        why += [f"the input's {k} changed ({oi.get(k)} -> {ni.get(k)})" for k in ni
                if oi.get(k) != ni.get(k) and not (k == "voxel_size" and set_voxel)]
        of, nf = old.get("files") or {}, new.get("files") or {}
        if not why and of.get("input") != nf.get("input"):
            why.append(_stamp_change(f"the input {ni.get('path')}", of.get("input"), nf.get("input")))
    if old.get("channel") != new.get("channel"):
        why.append(f"another channel ({old.get('channel')} -> {new.get('channel')})")
    if old.get("truth") != new.get("truth"):
        why.append(f"another truth mask ({old.get('truth') or 'none'} -> {new.get('truth') or 'none'})")
    elif new.get("truth") and (old.get("files") or {}).get("truth") != new["files"].get("truth"):
        why.append(_stamp_change(f"the truth mask {new['truth']}", old["files"].get("truth"), new["files"]["truth"]))
    oc, nc = _flat(old.get("config") or {}), _flat(new.get("config") or {})
    diff = [k for k in sorted(oc.keys() | nc.keys()) if oc.get(k) != nc.get(k)]
    if "segment.method" in diff:   # `segment` keeps the preprocessed volume for global Otsu only: not the user's
        diff = [k for k in diff if k != "output.write_preprocessed"]
    if diff:
        shown = ", ".join(f"{k} {_setting_text(k, oc.get(k))} -> {_setting_text(k, nc.get(k))}" for k in diff[:4])
        why.append(f"other settings ({shown}{f', and {len(diff) - 4} more' if len(diff) > 4 else ''})")
    elif (old.get("files") or {}).get("weights") != (new.get("files") or {}).get("weights"):
        why.append(_stamp_change("the U-Net weights", old["files"].get("weights"), new["files"].get("weights")))
    return "; ".join(why) or "the earlier run had other settings or input"


def _setting_text(key: str, value) -> str:
    """A setting's value as the console says it: the empty lists that mean "from the scan" said so, not as []."""
    if value == [] and key in ("voxel_size", "channels"):
        return "from the scan's files" if key == "voxel_size" else "all of the scan's"
    return repr(value)


class _Checkpoint:
    """The resume manifest of one channel in ``out/.resume/``: pass-1 statistics, how far pass 2 got
    (with the measurement state at that point), and, once the channel is complete, its result.

    Files are written then renamed, so a kill at any moment leaves the previous checkpoint intact: the
    measurement state of a checkpoint goes to files named after its slice (``acc-<next_z>.npz/.json``), and
    the manifest, written last, names that slice, so it never pairs with another checkpoint's state.
    A manifest whose fingerprint differs (other settings or input) is ignored and replaced.
    """

    def __init__(self, out: Path, key: dict, enabled: bool = True):
        self.dir, self.fp, self.key = out / ".resume", _hash(key), key
        self.fp2 = _hash(_pass2_key(key))
        self.truth = _truth_id(key)
        # a finished pass 2 taken over was scored against another truth mask (or none): its masks are
        # scored again from the stores (_rescore) before its state is this run's
        self.rescore = False
        self.manifest = {}
        # why an earlier run's checkpoint here is neither continued nor reused (None: there is none, or it is)
        self.why: str | None = None
        # what differed from an earlier run whose pass 2 this one takes over (only later stages' settings)
        self.later: str | None = None
        # a gpuheart run has worked in this channel folder (it makes .resume before pass 2 writes anything):
        # only then are outputs of an earlier run there to remove; otherwise the files are someone else's
        self.earlier = self.dir.is_dir()
        if enabled:
            path = self.dir / "manifest.json"
            try:
                m = json.loads(path.read_text())
                if not isinstance(m, dict):
                    raise ValueError(f"a JSON {type(m).__name__}, not an object")
            except FileNotFoundError:
                if self.earlier:   # killed in pass 1, before the manifest: said, as a restart for any reason is
                    self.why = "it was stopped before its first checkpoint, so there was nothing to continue from"
            except (OSError, ValueError) as err:
                self.why = f"its checkpoint {path} is unreadable ({err})"
            else:
                if m.get("fingerprint") == self.fp:
                    self.manifest = m
                elif self._has_pass2(m):
                    self._take_over_pass2(m)
                elif self._unfinished_pass2(m):
                    self._take_over_unfinished(m)
                else:
                    self.why = _why_not_the_same(m.get("key"), key)
            if self.done:
                self._check_results()
        elif self.dir.exists():
            shutil.rmtree(self.dir)
        self.next_z = int(self.manifest.get("next_z", 0))
        self.restarted = False  # set when a resume had to start pass 2 again from slice 0

    @property
    def done(self) -> bool:
        return bool(self.manifest.get("done"))

    def _pass2_acc_files(self) -> tuple[Path, Path]:
        return self.dir / "pass2-acc.npz", self.dir / "pass2-acc.json"

    def _has_pass2(self, m: dict) -> bool:
        """Whether ``m`` (an earlier run's manifest) kept a finished pass 2 this run's settings would repeat."""
        p2 = m.get("pass2")
        return (isinstance(p2, dict) and p2.get("fingerprint") == self.fp2 and bool(m.get("stats"))
                and all(f.is_file() for f in self._pass2_acc_files()))

    def _take_over_pass2(self, m: dict) -> None:
        """Continue from the end of an earlier run's pass 2, as a run killed in its closings would: only the
        settings of later stages differ, so its stores and measurement state are this run's too. Its later
        outputs go first (a mesh this run does not write must not stay as if it had), then the manifest that
        points at the end of pass 2 is written: a kill in between leaves the earlier manifest, taken over again."""
        nz = int(m["pass2"]["next_z"])
        self.rescore = m["pass2"].get("truth") != self.truth
        _remove_outputs(self.dir.parent, _LATER_OUTPUTS)
        self._remove_acc()
        for src, dst in zip(self._pass2_acc_files(), self._acc_files(nz)):
            _copy_atomic(src, dst)
        self._adopt(m, {"stats": True, "next_z": nz, "pass2": m["pass2"]})

    def _unfinished_pass2(self, m: dict) -> bool:
        """Whether ``m`` is an interrupted run's manifest (after pass 1, in or after pass 2) whose pass 2 this
        run would repeat, slab for slab: a changed closing or mesh setting must not cost the slices done."""
        slab = lambda k: ((k or {}).get("config") or {}).get("slab_size")   # noqa: E731
        # its confusion counts so far are of its truth mask: continued only with the same one
        return (not m.get("done") and m.get("fp2") == self.fp2 and bool(m.get("stats"))
                and slab(m.get("key")) == slab(self.key) and _truth_id(m.get("key") or {}) == self.truth)

    def _take_over_unfinished(self, m: dict) -> None:
        _remove_outputs(self.dir.parent, _LATER_OUTPUTS)
        self._adopt(m, {k: m[k] for k in ("stats", "next_z", "pass2") if k in m})

    def _adopt(self, m: dict, manifest: dict) -> None:
        """Make ``manifest`` (from the earlier run's ``m``) this run's, written under this run's fingerprint."""
        self.manifest = manifest
        self._write_manifest()
        self.later = _why_not_the_same(m.get("key"), self.key)

    def pass2_complete(self, nz: int) -> None:
        """Pass 2 has written every slice: keep its measurement state beside the stats, so that a later run
        whose settings differ only in the closings, mesh or graph starts from here instead of slice 0."""
        p2 = self.manifest.get("pass2") or {}
        if self.next_z != nz or (p2.get("fingerprint") == self.fp2 and p2.get("truth") == self.truth):
            return
        for src, dst in zip(self._acc_files(nz), self._pass2_acc_files()):
            _copy_atomic(src, dst)
        self._write_manifest(pass2={"fingerprint": self.fp2, "next_z": nz, "truth": self.truth})

    def _result_paths(self) -> dict:
        # kept relative to the channel folder, so OUT given as another path to the same folder (from
        # another working directory, absolute, through a link) still finds them; older manifests kept
        # the paths as that run was given them
        r = self.manifest["result"]
        base = self.dir.parent if r.get("relative_to_channel") else Path()
        return {k: base / v for k, v in r["paths"].items()}

    def result(self):
        paths, summary = self._result_paths(), self.manifest["result"]["summary"]
        if isinstance(summary.get("mesh"), dict) and "path" in summary["mesh"] and "mesh" in paths:
            summary["mesh"]["path"] = str(paths["mesh"])
        return paths, summary

    def _write_manifest(self, **fields):
        # the key too, what the fingerprint is of: a later run with another one says what differs
        self.manifest = {**self.manifest, **fields, "fingerprint": self.fp, "key": self.key, "fp2": self.fp2}
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.dir / "manifest.json", json.dumps(self.manifest, default=_jsonable).encode())

    def load_stats(self):
        from .exposure import SliceStats

        if not self.manifest.get("stats"):
            return None
        return [SliceStats(**d) for d in json.loads((self.dir / "stats.json").read_text())]

    def save_stats(self, stats) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.dir / "stats.json", json.dumps([asdict(st) for st in stats], default=_jsonable).encode())
        self._write_manifest(stats=True, next_z=0)

    def _acc_files(self, next_z: int) -> tuple[Path, Path]:
        return self.dir / f"acc-{next_z}.npz", self.dir / f"acc-{next_z}.json"

    def _remove_acc(self, keep: int | None = None) -> None:
        """Remove the measurement states of other checkpoints than ``keep`` (all without it)."""
        kept = {f.name for f in self._acc_files(keep)} if keep is not None else set()
        for f in [*self.dir.glob("acc-*"), self.dir / "acc.npz", self.dir / "acc.json"]:
            if f.name not in kept:
                f.unlink(missing_ok=True)

    def restore(self, acc) -> int:
        """Load the measurement state of the last checkpoint into ``acc``; returns the slice to continue at."""
        if self.next_z <= 0:
            return 0
        npz, plain = self._acc_files(self.next_z)
        try:
            with np.load(npz) as f:
                arrays = {k: f[k] for k in f.files}
            acc.load_state(arrays, json.loads(plain.read_text()))
        except (OSError, ValueError, KeyError) as err:
            self.why = f"the checkpoint's measurement state at slice {self.next_z} ({npz.name}) is unreadable ({err})"
            self.next_z = 0
        return self.next_z

    def save(self, next_z: int, acc) -> None:
        """Checkpoint: the state after slices ``[0, next_z)``. Its files are complete before the manifest
        names them; the previous checkpoint's files go only after that."""
        arrays, plain = acc.state()
        npz, plain_path = self._acc_files(next_z)
        tmp = self.dir / "acc.partial.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, npz)
        _atomic_write_bytes(plain_path, json.dumps(plain, default=_jsonable).encode())
        self.next_z = next_z
        self._write_manifest(next_z=next_z)
        self._remove_acc(keep=next_z)

    def reset(self) -> None:
        """Pass 2 starts again from slice 0, in the manifest too: a kill before the next checkpoint must not
        leave it vouching for slices the fresh stores do not hold."""
        # the manifest's next_z too: restore() zeroes next_z when the checkpoint's state files cannot be read
        self.restarted = self.restarted or self.next_z > 0 or bool(self.manifest.get("next_z"))
        self.next_z = 0
        if self.manifest.pop("pass2", None) is not None:
            self._write_manifest()
        if self.manifest.get("next_z"):
            self._write_manifest(next_z=0)
        if self.dir.is_dir():
            self._remove_acc()

    def finish(self, paths: dict, summary: dict) -> None:
        rel = {k: os.path.relpath(v, self.dir.parent) for k, v in paths.items()}
        stamps = {k: _output_stamp(Path(v)) for k, v in paths.items()}
        self._write_manifest(done=True, result={"paths": rel, "relative_to_channel": True, "summary": summary,
                                                "stamps": stamps})
        self._remove_acc()

    def _check_results(self) -> None:
        """Forget a finished run whose outputs were deleted, moved, or changed on disk since (a chunk of a
        store deleted or cut short, a mesh truncated): reusing them would hand on damage as results."""
        stamps = self.manifest["result"].get("stamps") or {}   # manifests before 2026-11-28 have none
        for name, path in self._result_paths().items():
            if not path.exists():
                why = f"the finished run's {path} was deleted or moved since"
            elif name in stamps and _output_stamp(path) != stamps[name][:2]:
                (n0, b0), (n1, b1) = stamps[name][:2], _output_stamp(path)
                why = f"the finished run's {path} changed since ({n0} -> {n1} files, {b0} -> {b1} bytes)"
            else:
                continue
            self.manifest, self.why = {}, why
            return


class _ChannelAccumulator:
    """What pass 2 keeps for the summary and the report: a few floats per slice and a few 2D images
    (maximum projections, one line profile, the middle slice), never the volume."""

    def __init__(self, shape, truth_path, channel, dark=None):
        self.shape, self.truth_path, self.channel = tuple(shape), truth_path, channel
        # dark slices (ZNorm) are blank: counted, a scan's empty ends would pile up at 0 in the global
        # Otsu histogram and dilute the SNR's mean
        self.dark = np.zeros(shape[0], bool) if dark is None else np.asarray(dark, bool)
        self.n, self.mid = shape[0], shape[0] // 2
        self.norm_means = np.full(self.n, np.nan)
        self.histogram = np.zeros(256, np.int64)  # of the preprocessed uint8 volume, for a global Otsu
        self.otsu_threshold = None
        self.sums = defaultdict(float)
        self.fig: dict[str, Any] = {}
        self.truth = None
        self._truth_z: set[int] = set()
        if truth_path:
            from .io import open_scan
            from .metrics import Confusion

            self.truth = open_scan(truth_path)
            if self.truth.shape != tuple(shape):
                raise ValueError(f"{truth_path}: truth mask has shape {self.truth.shape}, expected {tuple(shape)} "
                                 f"(the scan's channel {channel})")
            self.confusion = defaultdict(Confusion)  # one per mask kind: dom, unet, union, final

    def _mip(self, name, slab):
        m = slab.max(axis=0).astype(np.float32)
        prev = self.fig.get("mip_" + name)
        self.fig["mip_" + name] = m if prev is None else array_max(prev, m)

    def _middle(self, name, z0, slab, row=True):
        if z0 <= self.mid < z0 + slab.shape[0]:
            sl = slab[self.mid - z0].copy()  # a copy, so the slab itself can be freed
            if row:
                self.fig["profile_" + name] = sl[sl.shape[0] // 2].astype(np.float32)
            return sl
        return None

    def add_raw(self, z0, raw):
        self._mip("raw", raw)
        self._middle("raw", z0, raw)

    def add_normalized(self, z0, norm):
        m = backend.to_host(norm.reshape(norm.shape[0], -1).mean(axis=1))
        self.norm_means[z0:z0 + len(m)] = m
        self._mip("normalized", norm)

    def add(self, z0, products: dict):
        pre = products["preprocessed"]
        xp = backend.array_module(pre)
        s = self.sums
        lit = ~self.dark[z0:z0 + pre.shape[0]]
        counted = pre if lit.all() else pre[xp.asarray(np.flatnonzero(lit))]
        s["pixels"] += counted.size
        s["pre_sum"] += float(counted.sum(dtype=xp.float64))
        # slice by slice: bincount widens its input to 8-byte integers (a whole slab was pass 2's largest array)
        if len(counted):
            self.histogram += backend.to_host(sum(xp.bincount(sl.ravel(), minlength=256) for sl in counted))
        self._mip("preprocessed", pre)
        self._keep_mid("preprocessed", z0, pre, row=True)
        mask = products.get("mask_raw", products.get("unet_mask", products.get("dom_mask")))
        if mask is not None:
            self._mip("mask", mask)
            self._keep_mid("mask", z0, mask)
        for kind, name in (("dom", "dom_mask"), ("unet", "unet_mask"), ("union", "mask_raw")):
            if name in products:
                self.score(kind, z0, products[name])
        if "dom" not in products:
            return
        dom, dmask = products["dom"], products["dom_mask"]
        dom_pos = xp.maximum(dom, 0)  # the DoM image as displayed: negative responses are background
        self._mip("dom", dom_pos)
        self._middle("dom", z0, dom_pos)
        # the paper's SNR of the difference-of-medians stage: signal = the DoM mask
        s["signal_pixels"] += float(dmask.sum())
        s["pre_signal_sum"] += float(pre[dmask].sum(dtype=xp.float64))
        s["dom_sum"] += float(dom_pos.sum(dtype=xp.float64))
        s["dom_signal_sum"] += float(dom_pos[dmask].sum(dtype=xp.float64))

    def add_mask(self, name, z0, mask):
        """A slab of a mask made after pass 2 (the global Otsu mask, the closed mask), for the report."""
        self._mip(name, mask)
        self._keep_mid(name, z0, mask)

    def _keep_mid(self, name, z0, slab, row=False):
        mid = self._middle(name, z0, slab, row=row)
        if mid is not None:
            self.fig["mid_" + name] = mid

    def forget_truth_scores(self) -> None:
        """Drop the confusion counts and truth figures (a pass 2 taken over was scored against another truth)."""
        from .metrics import Confusion

        self.fig.pop("mip_truth", None), self.fig.pop("mid_truth", None)
        self._truth_z = set()
        if self.truth is not None:
            self.confusion = defaultdict(Confusion)

    def score(self, kind: str, z0: int, mask):
        """Add a slab of a mask to the confusion counts of ``kind`` (when a truth mask was given)."""
        if self.truth is None:
            return
        t = self.truth.read_slab(self.truth.channels[0], z0, z0 + mask.shape[0]) > 0
        self.confusion[kind].update(backend.to_host(mask), t)
        if z0 not in self._truth_z:
            self._truth_z.add(z0)
            self._mip("truth", t)
            self._keep_mid("truth", z0, t)

    def state(self) -> tuple[dict, dict]:
        """(arrays, plain values) that :meth:`load_state` restores exactly, for resuming a killed run."""
        arrays = {"norm_means": self.norm_means, "histogram": self.histogram,
                  **{"fig__" + k: backend.to_host(v) for k, v in self.fig.items()}}
        plain = {"sums": dict(self.sums), "truth_z": sorted(self._truth_z),
                 "confusion": {k: asdict(c) for k, c in getattr(self, "confusion", {}).items()}}
        return arrays, plain

    def load_state(self, arrays, plain) -> None:
        from .metrics import Confusion

        self.norm_means = np.array(arrays["norm_means"])
        self.histogram = np.array(arrays["histogram"])
        self.fig = {k[5:]: np.array(arrays[k]) for k in arrays if k.startswith("fig__")}
        self.sums = defaultdict(float, plain["sums"])
        self._truth_z = set(plain["truth_z"])
        if self.truth is not None:
            self.confusion = defaultdict(Confusion, {k: Confusion(**v) for k, v in plain["confusion"].items()})

    def merge_state(self, arrays, plain) -> None:
        """Add the state of an accumulator that saw other slabs (a Dask worker's). Called in slab order,
        so sums add in the same order as a local run adds them and the results are identical."""
        done = np.isfinite(arrays["norm_means"])
        self.norm_means[done] = arrays["norm_means"][done]
        self.histogram += arrays["histogram"]
        for key in (k for k in arrays if k.startswith("fig__")):
            name, v = key[5:], arrays[key]
            prev = self.fig.get(name)
            self.fig[name] = np.maximum(prev, v) if name.startswith("mip_") and prev is not None else v
        for k, v in plain["sums"].items():
            self.sums[k] += v
        self._truth_z |= set(plain["truth_z"])
        for k, c in plain["confusion"].items():
            mine = self.confusion[k]
            for f in ("tp", "fp", "fn", "tn"):
                setattr(mine, f, getattr(mine, f) + c[f])

    def save_figures(self, path: Path, max_side: int = 1024):
        """The arrays the report draws (see gpuheart.report): tiny next to the volume.

        Images are max-pooled to at most ``max_side`` pixels a side (a thin vessel stays visible in
        a pooled projection; a 2048² float image per stage would only slow the run and the page)."""
        arrays = {k: _as_small(_pool_max(backend.to_host(v).astype(np.float32), max_side) if v.ndim == 2 else
                            backend.to_host(v).astype(np.float32)) for k, v in self.fig.items()}
        arrays.update(profile_z=np.int64(self.mid), profile_y=np.int64(self.shape[1] // 2))
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    def summary(self, stats) -> dict:
        from .metrics import detrended_cv

        s = self.sums
        raw_means = np.array([st.mean for st in stats], dtype=np.float64)
        out = {"slices": len(stats),
               "detrended_cv_raw": detrended_cv(raw_means),
               "detrended_cv_normalized": detrended_cv(self.norm_means),
               "preprocessed_mean": s["pre_sum"] / s["pixels"] if s["pixels"] else float("nan")}
        if s["signal_pixels"]:
            n = s["signal_pixels"]
            out.update({
                "dom_mask_fraction": n / s["pixels"],
                "dom_mean": s["dom_sum"] / s["pixels"],
                "snr_preprocessed": (s["pre_signal_sum"] / n) / (s["pre_sum"] / s["pixels"]),
                "snr_dom": (s["dom_signal_sum"] / n) / (s["dom_sum"] / s["pixels"]) if s["dom_sum"] else float("nan"),
            })
        if self.truth is not None:
            out["truth_path"] = str(Path(self.truth_path).resolve())   # which mask the scores below are against
            for kind, c in self.confusion.items():
                out[f"{kind}_vs_truth"] = c.scores()
            self.truth.close()
        if self.otsu_threshold is not None:
            out["otsu_threshold"] = self.otsu_threshold
        out["slice_means_raw"] = raw_means.tolist()
        out["slice_means_normalized"] = self.norm_means.tolist()
        return out


def _normalization_record(znorm, applied: bool) -> dict:
    """summary.json's record of the z-normalization: without ``[exposure] normalize`` no gain was applied, so
    none is reported (gains of 0.47-2.4 were, beside identical raw and normalized slice means); the dark
    slices are blanked either way."""
    d = znorm.describe()
    if not applied:
        d = {"method": "none", **{k: v for k, v in d.items() if k.startswith("dark")}}
    return {"applied": bool(applied), **d}


def _as_small(a: np.ndarray) -> np.ndarray:
    """``a`` as uint8 where that loses nothing (masks, 0-255 images): a quarter of the bytes to compress."""
    if a.size and a.dtype.kind == "f" and 0 <= a.min() and a.max() <= 255:   # NaN fails these too
        u = a.astype(np.uint8)
        if np.array_equal(u, a):
            return u
    return a


def _pool_max(img: np.ndarray, max_side: int) -> np.ndarray:
    k = -(-max(img.shape) // max_side)
    if k <= 1:
        return img
    h, w = -(-img.shape[0] // k) * k, -(-img.shape[1] // k) * k
    padded = np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1])), mode="edge")
    return padded.reshape(h // k, k, w // k, k).max(axis=(1, 3))


def array_max(a, b):
    if backend.is_device_array(a) != backend.is_device_array(b):  # one side restored from a checkpoint
        a, b = backend.to_host(a), backend.to_host(b)
    return backend.array_module(a).maximum(a, b)


def _timed(iterator, timer: _Timer, stage: str):
    """Yield from ``iterator``, charging the time spent producing each item to ``stage``."""
    it = iter(iterator)
    while True:
        with timer(stage):
            item = next(it, _END)
        if item is _END:
            return
        yield item


_END = object()


def _progress(it, enabled: bool, desc: str, total=None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit="slab" if "slab" in desc else "slice", leave=False)


def _atomic_write_bytes(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_summary(out_dir: Path, result: RunResult) -> None:
    # without "report": the page is written after (it reads this file), as out_dir/report.html
    record = {k: v for k, v in result.to_dict().items() if k != "report"}
    _atomic_write_bytes(out_dir / "summary.json", json.dumps(_strict_json(record), indent=2, allow_nan=False).encode())


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _strict_json(o):
    """``o`` as plain JSON data with undefined numbers (a one-slice stack's CV, an empty mask's radius) as
    null: Python writes NaN, which JavaScript, jq and most JSON readers refuse."""
    if isinstance(o, dict):
        return {str(k): _strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict_json(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if o is None or isinstance(o, (str, bool, int)):
        return o
    return _strict_json(_jsonable(o))


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (Path, np.dtype)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
