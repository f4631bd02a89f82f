"""Training data from files: labelled stacks (and synthetic scans) -> preprocessed volumes -> unet.train.

``unet`` never reads files; this module finds image/label pairs and synthetic scans written by
``gpuheart phantom``, reads them through ``io``, runs them through the pipeline's own preprocessing
(``exposure.preprocess_volume``), so the model is trained on exactly the distribution it sees at inference,
and hands arrays to ``unet.train``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .io import ScanError, open_scan

IMAGE_SUFFIX, LABEL_SUFFIX = "_image.tif", "_label.tif"


@dataclass
class LabelledStack:
    name: str
    image: Path
    label: Path
    # the image's channel to train on: a synthetic scan's vessel channel (``image`` is then its per-slice scan
    # folder and ``label`` that channel's truth); None: an image/label pair, one channel each
    channel: str | None = None


def _image_stem(name: str) -> str | None:
    """NAME of ``NAME_image.tif`` or ``NAME_image.tiff`` (extension in any case), else None."""
    m = re.fullmatch(r"(.+)_image\.(tiff?)", name, re.IGNORECASE)
    return m and m.group(1)


def find_pairs(paths) -> list[LabelledStack]:
    """``NAME_image.tif`` files (or ``.tiff``, any case), or folders searched recursively for them, each with
    its ``NAME_label.tif`` beside it, and synthetic scans written by ``gpuheart phantom`` (a folder of
    ``scan/``, ``truth/`` and ``phantom.json``; its vessel channel with its truth is a stack named after the
    folder); ``paths`` is one path or a list of them. A file given twice is one stack; stacks that share a
    NAME in different folders are named with as many of their folders as tell them apart (``s1/a``,
    ``s2/a``), so that ``--exclude`` can name one."""
    if isinstance(paths, (str, os.PathLike)):   # a string would be taken a character at a time
        paths = [paths]
    found, seen = [], set()
    for p in map(Path, paths):
        for st in _stacks_in(p):
            if st.label.resolve() not in seen:   # a pair's label, or a synthetic scan's channel truth
                seen.add(st.label.resolve())
                found.append(st)
    return _unique_names(found)


def _stacks_in(p: Path) -> list[LabelledStack]:
    if _is_phantom_folder(p):
        return phantom_folder_stacks(p)
    if not p.is_dir():
        return [LabelledStack(_image_stem(im.name), im, _label_of(im)) for im in _images(p)]
    phantoms = sorted(f.parent for f in p.rglob("phantom.json") if _is_phantom_folder(f.parent))
    # every name, not a glob: "*_image.*" would miss A_IMAGE.TIF on a case-sensitive file system
    images = sorted(f for f in p.rglob("*") if _image_stem(f.name) and f.is_file()
                    and not any(ph in f.parents for ph in phantoms))
    if not images and not phantoms:
        raise ScanError(_no_pairs_message(p))
    return ([LabelledStack(_image_stem(im.name), im, _label_of(im)) for im in images]
            + [st for ph in phantoms for st in phantom_folder_stacks(ph)])


def _no_pairs_message(p: Path) -> str:
    msg = (f"{p}: no *{IMAGE_SUFFIX} files and no synthetic scan (a folder gpuheart phantom wrote); training "
           f"reads NAME{IMAGE_SUFFIX} + NAME{LABEL_SUFFIX} pairs of multi-page TIFFs (0 background, nonzero vessel)")
    if _is_phantom_folder(p.parent):
        msg += f"; {p} is the scan of a synthetic scan's folder: give that folder, {p.parent}, to train on it"
    elif any(f.suffix.lower() in (".tif", ".tiff") for f in p.iterdir()):
        msg += (f"; {p} holds TIFFs of another kind, such as a scan's per-slice files, which training does not read: "
                f"to train on such a scan, save it as one multi-page NAME{IMAGE_SUFFIX} (Fiji: File > Import > Image "
                f"Sequence, then File > Save As > Tiff) with its vessel mask as NAME{LABEL_SUFFIX} beside it")
    return msg + "; or train on generated synthetic scans with --phantom N"


def _is_phantom_folder(p: Path) -> bool:
    return (p / "phantom.json").is_file() and (p / "scan").is_dir() and (p / "truth").is_dir()


def phantom_folder_stacks(folder) -> list[LabelledStack]:
    """The vessel channel(s) of a synthetic scan ``gpuheart phantom`` wrote to ``folder``, each with its truth
    (``truth/CNN.tif``), named after the folder (and the channel, where there are several). Its other channels
    are not vessels (nerves, autofluorescence), so they are not training data for the vessel model."""
    folder = Path(folder)
    info_path = folder / "phantom.json"
    try:
        channels = json.loads(info_path.read_text())["channels"]
        vessels = sorted(ch for ch, kind in channels.items() if kind == "vessels")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ScanError(f"{info_path}: unreadable ({type(err).__name__}: {err}); expected the phantom.json that "
                        f"gpuheart phantom writes, naming the channels "
                        f"(\"channels\": {{\"C00\": \"vessels\", ...}})") from err
    if not vessels:
        kinds = ", ".join(f"{k}: {v}" for k, v in channels.items())
        raise ScanError(f"{info_path}: names no vessels channel ({kinds}); expected one, whose truth/CNN.tif to "
                        f"train on")
    stacks = []
    for ch in vessels:
        truth = folder / "truth" / f"{ch}.tif"
        if not truth.is_file():
            raise ScanError(f"{truth}: missing; expected the truth of the synthetic scan's vessel channel {ch} there "
                            f"(write the scan again with gpuheart phantom)")
        name = folder.name if len(vessels) == 1 else f"{folder.name}/{ch}"
        stacks.append(LabelledStack(name, folder / "scan", truth, channel=ch))
    return stacks


def _images(p: Path) -> list[Path]:
    if p.is_file():
        if not _image_stem(p.name):
            raise ScanError(f"{p}: expected a file named NAME{IMAGE_SUFFIX} (with NAME{LABEL_SUFFIX} beside it)")
        return [p]
    raise ScanError(f"{p}: no such file or folder")


def _label_of(im: Path) -> Path:
    """The label beside an image, spelt as the image is (A_IMAGE.TIF: A_LABEL.TIF) or else in any case and
    either extension."""
    name = _image_stem(im.name)
    token = im.name[len(name):len(name) + len("_image")]
    label = "_LABEL" if token[1:].isupper() else "_Label" if token[1].isupper() else "_label"
    if im.with_name(name + label + im.suffix).is_file():
        return im.with_name(name + label + im.suffix)
    pattern = re.compile(re.escape(name) + r"_label\.tiff?", re.IGNORECASE)
    others = sorted(f for f in im.parent.iterdir() if pattern.fullmatch(f.name) and f.is_file())
    if not others:
        raise ScanError(f"{im}: its label {name}{label}{im.suffix} is missing (expected beside it, .tif or .tiff)")
    return others[0]


def _unique_names(stacks: list[LabelledStack]) -> list[LabelledStack]:
    by_name: dict[str, list[LabelledStack]] = {}
    for st in stacks:
        by_name.setdefault(st.name, []).append(st)
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        names = _qualified(group)
        warnings.warn(f"{len(group)} stacks are named {name} ({', '.join(str(st.image) for st in group)}): they "
                      f"are called {', '.join(names)} (in --exclude, too)", UserWarning, stacklevel=3)
        for st, qualified in zip(group, names):
            st.name = qualified
    return stacks


def _qualified(group: list[LabelledStack]) -> list[str]:
    """Names of same-named stacks with as many of their folders as tell them apart."""
    parents = [Path(os.path.abspath(st.image)).parent.parts for st in group]
    if len(set(parents)) < len(parents):   # NAME_image.tif beside NAME_image.tiff: which one is meant?
        twins = [str(st.image) for st, p in zip(group, parents) if parents.count(p) > 1]
        raise ScanError(f"{' and '.join(twins)}: two images of one stack in one folder; expected one "
                        f"NAME_image.tif per NAME: remove or rename one")
    for k in range(1, max(map(len, parents)) + 1):
        names = ["/".join(p[-k:] + (st.name,)) for p, st in zip(parents, group)]
        if len(set(names)) == len(names):
            return names
    return [str(st.image) for st in group]   # not reached: distinct folders differ in some part


SLAB = 16  # slices read at a time: memory holds the slices returned, not the stack


def _bar(enabled: bool, desc: str, total: int, unit: str = "slice"):
    """A progress bar (tqdm, on stderr) that is a silent no-op when not ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)


def load_stack(stack: LabelledStack, sparse: bool = False, progress: bool = False, where: str = ""):
    """(preprocessed uint8 image, bool label) volumes of a stack ``find_pairs`` found: ``load_pair`` of an
    image/label pair, ``load_phantom`` of a synthetic scan's channel. ``where``: added to the bars' text."""
    if stack.channel is not None:
        return load_phantom(stack, progress, where)
    return load_pair(stack, sparse, progress, where)


def load_phantom(stack: LabelledStack, progress: bool = False, where: str = ""):
    """A synthetic scan's channel and its truth, read from the files ``gpuheart phantom`` wrote and preprocessed
    as ``--phantom N`` preprocesses the scans it generates (``phantom_pairs``). Its truth is complete, so every
    slice is training data (``sparse`` does not apply)."""
    import numpy as np

    with open_scan(stack.image, channels=[stack.channel]) as si, open_scan(stack.label) as sl:
        if sl.shape != si.shape or len(sl.channels) != 1:
            raise ScanError(f"{stack.label}: truth of shape {sl.shape} with {len(sl.channels)} channel(s); expected "
                            f"one channel of the scan's shape {si.shape} (write the scan again with gpuheart phantom)")
        nz = si.shape[0]
        with _bar(progress, f"read {stack.name}{where}", nz) as bar:
            vol, truth = [], []
            for z0 in range(0, nz, SLAB):
                z1 = min(nz, z0 + SLAB)
                vol.append(si.read_slab(stack.channel, z0, z1))
                truth.append(sl.read_slab(sl.channels[0], z0, z1) != 0)
                bar.update(z1 - z0)
    return _preprocess_synthetic(np.concatenate(vol), np.concatenate(truth))


def load_pair(stack: LabelledStack, sparse: bool = False, progress: bool = False, where: str = ""):
    """(preprocessed uint8 image, bool label) volumes of one labelled stack, checked to match.

    The z-normalization comes from every slice of the image, as in a pipeline run over it (equal to
    ``preprocess_volume`` of the whole image). ``sparse``: only slices with at least one labelled pixel
    are returned, so a few completely labelled slices of a large scan are training data and the slices
    nobody labelled are left out instead of being taught as background. The stack is read slab by slab,
    twice (statistics, then preprocessing), each pass with a progress bar when ``progress``.
    """
    with _bar(progress, f"read {stack.name}{where}", 0) as bar:
        return _load_pair(stack, sparse, bar, where)


def _load_pair(stack: LabelledStack, sparse: bool, bar, where: str):
    import numpy as np

    from .exposure import ZNorm, preprocess, slice_stats
    from .metrics import has_fractions

    with open_scan(stack.image) as si, open_scan(stack.label) as sl:
        for scan, path in ((si, stack.image), (sl, stack.label)):   # a channel axis makes the shapes differ too
            _check_one_channel(scan, path, si.shape[0])
        if si.shape != sl.shape:
            raise ScanError(f"{stack.label}: label shape {sl.shape} differs from image shape {si.shape}")
        ci, cl, nz = si.channels[0], sl.channels[0], si.shape[0]
        bar.reset(total=nz)
        stats, keep, labels, values = [], [], [], set()
        for z0 in range(0, nz, SLAB):
            z1 = min(nz, z0 + SLAB)
            try:
                stats += [slice_stats(s, z=z0 + k) for k, s in enumerate(si.read_slab(ci, z0, z1))]
            except ValueError as err:  # NaN/Inf pixels: say in which file
                raise ScanError(f"{stack.image}: {err}") from err
            lab = sl.read_slab(cl, z0, z1)
            if has_fractions(lab):   # > 0 would make every pixel of a probability map vessel
                raise ScanError(f"{stack.label}: holds float values between 0 and 1 (or NaN), a probability map; "
                                f"expected a vessel mask (0 background, nonzero vessel): threshold it first")
            values |= nonzero_values(lab, values)
            lab = lab != 0   # an int8 0/255 mask reads as 0/-1: any nonzero value is vessel, as documented
            used = [k for k in range(z1 - z0) if not sparse or lab[k].any()]
            keep += [z0 + k for k in used]
            labels.append(lab[used])
            bar.update(z1 - z0)
        _warn_label_values(stack, values)
        if not keep:
            raise ScanError(f"{stack.label}: no slice has a labelled (nonzero) pixel, so there is nothing to train on")
        share = float(np.mean([lab.mean() for lab in labels if lab.size])) if labels else 0.0
        if share > 0.5:   # vessels are a minority of the voxels: this is likely the image, or inverted labels
            warnings.warn(f"{stack.label}: {share:.0%} of the voxels are labelled (nonzero); expected a vessel "
                          f"mask (0 background, nonzero vessel) - is it the image or an inverted mask?",
                          RuntimeWarning, stacklevel=2)
        znorm = ZNorm.from_stats(stats)
        labels = np.concatenate(labels)
        if not sparse:
            _warn_unlabelled_slices(stack, labels.any(axis=(1, 2)))
        dark = znorm.dark[keep]
        drawn = [int(z) for z in np.asarray(keep)[dark & labels.any(axis=(1, 2))]]
        if drawn:
            warnings.warn(f"{stack.image}: slice(s) {drawn} are dark (laser dropout or empty; spread <= "
                          f"{znorm.dark_ratio:g} of the stack's) but labelled: they are preprocessed to 0 as in a "
                          f"run, and their labels are not used",
                          RuntimeWarning, stacklevel=2)
        had = bool(labels.any())
        labels[dark] = False   # vessels drawn on a blank image would teach the model to see them in the dark
        if had and not labels.any():
            raise ScanError(f"{stack.label}: every labelled slice is dark (no signal), so there is nothing to train on")
        bar.reset(total=len(keep))
        bar.set_description(f"preprocess {stack.name}{where}")
        images = []
        for z0, z1 in _runs(keep, SLAB):
            images.append(preprocess(si.read_slab(ci, z0, z1), znorm, z0))
            bar.update(z1 - z0)
    return np.concatenate(images), labels


def _check_one_channel(scan, path: Path, image_slices: int) -> None:
    """Which channel the labels trace is not ours to guess; a label whose channels are as many as the image's
    slices is most likely the slices, saved as channels."""
    n = len(scan.channels)
    if n == 1:
        return
    if scan.shape[0] == 1 and n == image_slices > 1:
        fix = (f"if its {n} channels are the image's {n} z-slices, save it as slices (in Fiji set Image > "
               f"Properties to Channels (c) 1, Slices (z) {n}; tifffile: imwrite(path, stack, imagej=True, "
               f"metadata={{'axes': 'ZYX'}})), else save the labelled channel on its own")
    else:
        fix = "save the labelled channel on its own"
    raise ScanError(f"{path}: has {n} channels ({', '.join(scan.channels)}); training expects one-channel image "
                    f"and label stacks: {fix}")


def nonzero_values(lab, seen=(), most: int = 8) -> set:
    """The distinct nonzero values of a label array (stops adding once more than ``most`` are in ``seen``:
    enough to name them)."""
    import numpy as np

    if len(seen) > most:
        return set()
    return set(np.unique(lab[lab != 0]).tolist())


def describe_values(values: set, most: int = 8) -> str:
    shown = sorted(values)[:most]
    return ", ".join(f"{v:g}" for v in shown) + (", ..." if len(values) > most else "")


def _warn_label_values(stack: LabelledStack, values: set) -> None:
    """Several vessel values suggest a multi-class or instance mask, whose classes would all become vessel."""
    if len(values) > 1:
        count = "more than 8" if len(values) > 8 else len(values)
        warnings.warn(f"{stack.label}: holds {count} distinct nonzero values ({describe_values(values)}); "
                      f"expected a vessel mask (0 background, nonzero vessel): all nonzero values are taken as "
                      f"vessel - if it is a multi-class or instance mask, save the vessel class alone",
                      RuntimeWarning, stacklevel=3)


def _warn_unlabelled_slices(stack: LabelledStack, labelled) -> None:
    """Empty label slices are taught as background. In a vessel stack most slices hold vessels, so many empty
    ones more likely mean slices nobody labelled (--sparse-labels) or a label file that is not this stack's.
    A stack with no labelled pixel at all is train_from_files's to judge: beside others it is a background
    example, alone it is nothing to train on."""
    n, k = len(labelled), int(labelled.sum())
    if 0 < k <= n // 2:
        warnings.warn(f"{stack.label}: only {k} of {n} slices have a labelled pixel, and the others are taught as "
                      f"background; if they were simply not labelled, give --sparse-labels (Python: sparse=True) "
                      f"to train on the labelled slices only", RuntimeWarning, stacklevel=3)


def _runs(zs: list[int], most: int) -> list[tuple[int, int]]:
    """Sorted slice indices as [z0, z1) runs of consecutive slices, each at most ``most`` long."""
    runs: list[tuple[int, int]] = []
    for z in zs:
        if runs and runs[-1][1] == z and z - runs[-1][0] < most:
            runs[-1] = (runs[-1][0], z + 1)
        else:
            runs.append((z, z + 1))
    return runs


def phantom_pairs(n: int, preset: str = "default", progress: bool = False):
    """``n`` synthetic vessel-channel volumes (seeds 1..n) with their exact truth, preprocessed
    (``_preprocess_synthetic``)."""
    from .phantom import Phantom, PhantomConfig

    with _bar(progress and n > 0, "generate synthetic scans", n, unit="scan") as bar:
        for seed in range(1, n + 1):
            ph = Phantom(PhantomConfig.preset(preset, seed=seed))
            z = ph.shape[0]
            image, truth = _preprocess_synthetic(ph.slab("C00", 0, z), ph.truth("C00", 0, z))
            bar.update()
            yield f"phantom_seed{seed}", image, truth


def _preprocess_synthetic(vol, truth):
    """A synthetic scan's channel, preprocessed as in a run, and its truth with the dark (laser-dropout) slices
    cleared, since they are preprocessed to 0 (silently: the truth of a synthetic scan is exact, so unlike a
    label drawn on a dark slice it is no mistake to warn about)."""
    from .exposure import ZNorm, preprocess, slice_stats

    znorm = ZNorm.from_stats([slice_stats(s, z=i) for i, s in enumerate(vol)])   # as preprocess_volume
    truth[znorm.dark] = False   # the slices preprocess blanks, whatever made them dark
    return preprocess(vol, znorm), truth


def train_from_files(paths, out_dir, phantoms: int = 0, exclude=(), progress: bool = True,
                     resume: bool = False, sparse: bool = False, overwrite: bool = False, **train_kw):
    """Train the U-Net on labelled stacks (and ``phantoms`` synthetic scans); returns ``unet.TrainResult``.
    ``sparse``: train only on the labelled slices of each stack (see ``load_pair``); ``resume``, ``overwrite``:
    see ``unet.train``. Everything that can be checked without the data is, before any is read."""
    from . import unet

    if sparse and train_kw.get("context"):
        raise ValueError("sparse labels leave gaps between the slices trained on, so a 2.5-D model (context > 0) "
                         "would see the wrong neighbours; use a 2-D model (context 0)")
    train_kw.setdefault("num_threads", os.cpu_count())
    cfg = unet.TrainConfig(**train_kw)
    unet.check_training_setup(cfg, out_dir, resume, overwrite)
    found = find_pairs(paths)
    _check_exclude(exclude, [s.name for s in found])
    stacks = [s for s in found if s.name not in set(exclude)]
    images, labels, names = [], [], []
    for i, s in enumerate(stacks, 1):
        im, lab = load_stack(s, sparse=sparse, progress=progress, where=f" ({i}/{len(stacks)})")
        images.append(im)
        labels.append(lab)
        names.append(s.name)
    _check_empty_stacks(stacks, labels, phantoms)
    for name, im, lab in phantom_pairs(phantoms, progress=progress):
        images.append(im)
        labels.append(lab)
        names.append(name)
    if not images:
        raise ScanError("no training data: give NAME_image.tif files or folders, a folder gpuheart phantom wrote, "
                        "or --phantom N")
    _check_split(stacks, labels, cfg, sparse)
    return unet.train(images, labels, cfg, Path(out_dir), progress=progress, resume=resume, overwrite=overwrite,
                      names=names)


def _check_split(stacks: list[LabelledStack], labels: list, cfg, sparse: bool) -> None:
    """unet.train's split in the terms of the files and flags that made it: a run needs a slice to train on and
    one to validate on, which only a single slice in all cannot give."""
    from .unet import split_slices

    train_sl, val_sl = split_slices([len(lab) for lab in labels], cfg.val_fraction, cfg.split)
    if (train_sl and val_sl) or len(labels) != len(stacks):   # phantoms are many slices: unet.train says it
        return
    files = ", ".join(str(s.label if sparse else s.image) for s in stacks)
    what = ("1 labelled slice in all (--sparse-labels trains on the labelled slices only)" if sparse
            else "1 slice in all (a 2-D image)")
    raise ScanError(f"{files}: {what}, and training needs at least two, one to train on and one to validate on "
                    f"(validation takes the last --val-fraction, {cfg.val_fraction:g}, of every stack's slices, at "
                    f"least one, and leaves at least one to train on, so no --val-fraction splits one slice); "
                    f"{'label another slice' if sparse else 'give a stack or another image/label pair'}, or add "
                    f"labelled stacks or --phantom N")


def _check_exclude(exclude, names: list[str]) -> None:
    """A misspelt held-out stack would silently be trained on."""
    for e in sorted(set(exclude) - set(names)):
        alike = [n for n in names if n.endswith("/" + e)]
        if alike:
            raise ValueError(f"--exclude {e}: {len(alike)} stacks in different folders are named {e}: "
                             f"{', '.join(alike)}; give the one(s) to leave out by those names")
        raise ValueError(f"--exclude {e}: no labelled stack of that name; stacks: {', '.join(names)}")


def _check_empty_stacks(stacks: list[LabelledStack], labels: list, phantoms: int) -> None:
    """A stack without a labelled pixel: a background example beside labelled data, an error without any."""
    empty = [s for s, lab in zip(stacks, labels) if not lab.any()]
    if empty and len(empty) == len(stacks) and not phantoms:
        raise ScanError(f"{', '.join(str(s.label) for s in stacks)}: no labelled (nonzero) pixel, so there is "
                        f"nothing to train on; expected vessel masks (0 background, nonzero vessel)")
    for s in empty:
        warnings.warn(f"{s.label}: no labelled (nonzero) pixel: the whole stack is taught as background; if its "
                      f"vessels were not labelled, leave it out (--exclude {s.name})", RuntimeWarning, stacklevel=3)


def stack_names(paths) -> list[str]:
    return [s.name for s in find_pairs(paths)]


__all__ = ["LabelledStack", "find_pairs", "load_pair", "load_phantom", "load_stack", "phantom_folder_stacks",
           "phantom_pairs", "train_from_files", "stack_names"]
