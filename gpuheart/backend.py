"""Device choice, array modules, host<->device moves and zero-copy torch interop.

This is the only module that asks whether CUDA is present. Every stage calls
:func:`array_module` (or :func:`resolve_device`) and stays agnostic otherwise.

CuPy is optional: ``import cupy`` may fail (not installed) or succeed on a machine
without a GPU, where ``cupy.is_available()`` is False. Both mean "CPU".
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

DEVICES = ("auto", "cpu", "cuda")
# CUDA's limit on gridDim.y and gridDim.z: kernels that put slices or row tiles there launch in chunks
MAX_GRID_YZ = 65535


class DeviceError(RuntimeError):
    """Raised when a device is requested that this machine cannot provide."""


@functools.lru_cache(maxsize=1)
def _cupy():
    """The cupy module, or None when it is missing or broken (never raises)."""
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when CuPy is importable and sees at least one CUDA device."""
    cp = _cupy()
    if cp is None:
        return False
    try:
        return bool(cp.is_available())
    except Exception:
        return False


def resolve_device(device: str = "auto") -> str:
    """Map ``"auto" | "cpu" | "cuda"`` to ``"cpu"`` or ``"cuda"``.

    ``"auto"`` picks CUDA when ``cupy.is_available()``; ``"cuda"`` without a GPU is an error,
    never a silent fallback, so a user who asked for speed knows they are not getting it.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not cuda_available():
            why = ("CuPy is not installed (pip install 'gpuheart[cuda13]', or 'gpuheart[cuda12]' with CUDA 12 "
                   "drivers)" if _cupy() is None else "CuPy found no CUDA device")
            raise DeviceError(f"device 'cuda' was requested but {why}; use device 'cpu' or 'auto' "
                              f"(--device cpu)")
        return "cuda"
    return "cuda" if cuda_available() else "cpu"


def is_device_array(x: Any) -> bool:
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def native_byte_order(x: np.ndarray) -> np.ndarray:
    """A host array in native byte order: a big-endian ('>u2') array, e.g. from a TIFF read without
    conversion, is not of dtype np.uint16, so every dtype dispatch would miss it."""
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def array_module(x: Any):
    """numpy or cupy, whichever owns ``x`` (the CuPy ``get_array_module`` idea without needing CuPy)."""
    return _cupy() if is_device_array(x) else np


def device_of(x: Any) -> str:
    return "cuda" if is_device_array(x) else "cpu"


def to_device(x: Any, device: str = "auto", stream=None):
    """Move ``x`` to ``device`` ("cpu" gives NumPy, "cuda" CuPy); no copy when it is already there."""
    device = resolve_device(device)
    if device == "cpu":
        return to_host(x)
    cp = _cupy()
    if isinstance(x, cp.ndarray):
        return x
    if stream is None:
        return cp.asarray(x)
    with stream:
        out = cp.empty(np.shape(x), dtype=np.asarray(x).dtype)
        out.set(np.ascontiguousarray(x), stream=stream)
        return out


def prefetch(items, device: str = "auto", depth: int = 2):
    """Yield ``(key, array)`` for every ``(key, host array)`` of ``items``, with ``array`` on ``device``,
    while the next items are already being produced and moved.

    * ``items`` is drained by a background thread into a queue of ``depth`` items, so reading and
      decoding the next slab's files overlaps the work on this one (tifffile and zarr release the GIL).
    * On CUDA, slab i+1 is copied host->device on its own stream, from a ring of two pinned (page-locked)
      staging buffers, while the caller's kernels for slab i run on the current stream; the current stream
      waits on the copy's event (not the host), so nothing blocks until the data is needed. The copy of
      slab i+1 is ordered after everything the caller had queued before it asked for slab i, which is
      what makes it safe for the memory pool to hand the copy a block that an earlier slab used.
    * On the CPU the arrays come through as they are (no copy).

    Errors raised while producing an item are raised here, in the caller's thread, with their own type.
    Closing the generator early stops the thread.
    """
    import queue
    import threading

    device = resolve_device(device)
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        # every put gives up once the consumer has gone, so the thread never blocks on a full queue
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def fill():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, raised there
            put(_Raised(err))

    thread = threading.Thread(target=fill, name="gpuheart-prefetch", daemon=True)
    thread.start()

    def produced():
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.err
            yield item

    try:
        if device == "cpu":
            for key, x in produced():
                yield key, to_host(x)
        else:
            yield from _upload_overlapped(produced())
    finally:
        stop.set()
        thread.join(timeout=5)


class _Raised:
    def __init__(self, err: BaseException):
        self.err = err


def _upload_overlapped(pairs):
    """``prefetch``'s CUDA half: pinned staging ring + copy stream + events (see there)."""
    cp = _cupy()
    import cupyx

    current = cp.cuda.get_current_stream()
    copy = cp.cuda.Stream(non_blocking=True)
    ring: list = [None, None]
    ring_done: list = [None, None]
    n = 0

    def upload(key, host):
        nonlocal n
        host = np.ascontiguousarray(host)
        slot = n % 2
        n += 1
        if ring_done[slot] is not None:
            ring_done[slot].synchronize()  # the DMA that last read this staging buffer is finished
        buf = ring[slot]
        if buf is None or buf.nbytes < host.nbytes:
            buf = ring[slot] = cupyx.empty_pinned(host.nbytes, dtype=np.uint8)
        staged = buf[:host.nbytes].view(host.dtype).reshape(host.shape)
        np.copyto(staged, host)
        copy.wait_event(current.record())  # after the caller's queued work: pool blocks may be reused
        with copy:
            dev = cp.empty(host.shape, dtype=host.dtype)
            dev.set(staged, stream=copy)
            ready = copy.record()
        ring_done[slot] = ready
        return key, dev, ready

    pending = None
    for key, host in pairs:
        nxt = upload(key, host)
        if pending is not None:
            current.wait_event(pending[2])
            yield pending[0], pending[1]
        pending = nxt
    if pending is not None:
        current.wait_event(pending[2])
        yield pending[0], pending[1]


def synchronizer(device: str):
    """A function that waits for the work queued on the current CUDA stream, or None on the CPU."""
    if resolve_device(device) != "cuda":
        return None
    cp = _cupy()
    return lambda: cp.cuda.get_current_stream().synchronize()


def reduce_rows(flat, op: str):
    """``flat.<op>(axis=1)`` for ``op`` in min, max, all, any, of a (rows, n) NumPy or CuPy array.

    CuPy reduces each row of an axis reduction in one thread block (CUB's segmented reduce): on an H200
    that took 0.8 ms for one 2048 x 2048 float32 slice, a quarter of the preprocessing. Cut into k
    chunks, the rows become rows x k segments reduced in parallel, then k per row. These operations
    are exact in any order, so the result is the same (NaN propagates through min/max as before).
    """
    import math

    rows, n = flat.shape
    k = math.gcd(n, 4096)
    if k < 64 or n // k < 64:
        return getattr(flat, op)(axis=1)
    return getattr(getattr(flat.reshape(rows, k, n // k), op)(axis=2), op)(axis=1)


def repeat(x: Any, counts: Any):
    """``np.repeat(x, counts)`` of a 1-D array with a count per element, on either array module: CuPy's
    ``repeat`` takes one count or a host sequence only, so on the device the output positions are searched in
    the counts' running sum."""
    xp = array_module(x)
    if xp is np:
        return np.repeat(x, counts)
    ends = xp.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return x[xp.searchsorted(ends, xp.arange(total), side="right")]


def to_host(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """A NumPy array for ``x`` (a device->host copy for CuPy arrays, none for NumPy)."""
    if is_device_array(x):
        return x.get(out=out)
    arr = np.asarray(x)
    if out is not None:
        # the same contract as CuPy's get(out=): no broadcasting, no casting, so code tested on the
        # CPU does not break (or silently differ) once it runs on a GPU
        if not isinstance(out, np.ndarray) or out.shape != arr.shape or out.dtype != arr.dtype:
            raise TypeError(f"to_host(out=...) needs a numpy.ndarray of {arr.dtype}{list(arr.shape)}, got "
                            f"{getattr(out, 'dtype', type(out).__name__)}{list(getattr(out, 'shape', ()))}")
        out[...] = arr
        return out
    return arr


def as_torch(x: Any):
    """A torch tensor sharing memory with ``x`` (NumPy -> CPU tensor, CuPy -> CUDA tensor) via DLPack.

    No copy is made: writing through the tensor changes ``x``. Arrays that DLPack cannot
    describe (e.g. negative strides) are rejected rather than silently copied.
    """
    import torch

    if not (x.flags.c_contiguous or x.flags.f_contiguous) and any(s < 0 for s in x.strides):
        raise ValueError("as_torch needs non-negative strides; call xp.ascontiguousarray first")
    return torch.from_dlpack(x)


def from_torch(t: Any):
    """The NumPy (CPU tensor) or CuPy (CUDA tensor) array sharing memory with ``t``."""
    t = t.detach()
    if t.device.type == "cuda":
        cp = _cupy()
        if cp is None:
            raise DeviceError("a CUDA tensor needs CuPy to be viewed as an array")
        return cp.from_dlpack(t)
    if t.device.type != "cpu":
        raise DeviceError(f"tensors on {t.device.type!r} are not supported; move them to cpu or cuda")
    # Tensor.numpy() shares memory as DLPack does, and stays writable on NumPy < 1.25, whose
    # np.from_dlpack gives read-only views.
    return t.numpy()


def try_cuda(what: str, warned: set, fn, *args):
    """``fn(*args)`` for a CUDA path; a ValueError (bad input) and a device out-of-memory error (the
    pipeline shrinks its slabs and retries) propagate; any other failure (NVRTC compile error, launch
    failure) warns once per ``what`` (remembered in ``warned``) and returns None: the caller takes the
    host path."""
    try:
        return fn(*args)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - any CUDA failure must degrade to the host path
        if is_device_oom(err):
            raise
        if what not in warned:
            warned.add(what)
            warnings.warn(f"{what}: the CUDA kernel failed ({type(err).__name__}: {err}); "
                          "using the host path from now on for such calls", RuntimeWarning, stacklevel=4)
        return None


def is_device_oom(err: BaseException) -> bool:
    """True for a CUDA out-of-memory error from CuPy or PyTorch (the ones worth retrying smaller)."""
    cp = _cupy()
    if cp is not None and isinstance(err, cp.cuda.memory.OutOfMemoryError):
        return True
    try:
        import torch

        # by torch.cuda's name: the top-level torch.OutOfMemoryError (the same class) is missing in older torch (2.1)
        return isinstance(err, torch.cuda.OutOfMemoryError)
    except (ImportError, AttributeError):
        return False


def device_free_bytes() -> int | None:
    """Free memory on the current CUDA device plus what CuPy's pool holds for reuse; None without CUDA."""
    if not cuda_available():
        return None
    cp = _cupy()
    free, _ = cp.cuda.runtime.memGetInfo()
    pool = cp.get_default_memory_pool()
    avail = free + pool.total_bytes() - pool.used_bytes()
    limit = pool.get_limit()  # a capped pool (set_limit, CUPY_GPU_MEMORY_LIMIT) is what we may use
    if limit:
        avail = min(avail, limit - pool.used_bytes())
    return int(max(0, avail))


def free_device_memory() -> None:
    """Give cached device blocks back (CuPy's pool and PyTorch's cache) before retrying after an OOM."""
    cp = _cupy()
    if cp is not None and cuda_available():
        cp.get_default_memory_pool().free_all_blocks()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# -- CUDA kernels --------------------------------------------------------------------------------

def kernel_dir() -> Path:
    """Where the ``.cu`` sources are: ``gpuheart/kernels`` in an installed wheel, ``kernels/`` in a checkout
    (an editable install included)."""
    # Not importlib.resources: gpuheart.kernels has no __init__.py, so files() gives a MultiplexedPath whose
    # str() is not a path, and an installed wheel then found no kernel at all.
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "kernels"):
        if any(d.glob("*.cu")):
            return d
    return here / "kernels"


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)".*$', re.M)


def kernel_source(name: str) -> str:
    """The source of ``kernels/<name>`` with its local ``#include "x.cuh"`` lines replaced by the
    header's text: NVRTC gets no include path, and CuPy keys its kernel cache on the source it is
    given, so a header edited later must be part of that source to trigger a rebuild."""
    path = kernel_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"CUDA kernel source {path} is missing from the installation")
    return _LOCAL_INCLUDE.sub(lambda m: kernel_source(m.group(1)).replace("#pragma once\n", ""), path.read_text())


# --fmad=false: no multiply-add contraction, so plain float arithmetic in a kernel rounds as the host
# reference (and the host emulator, tests/cuda_emulator.py) does; the kernels' arithmetic is not their cost.
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false")
# What CuPy appends to every RawModule compile after the options it is given (cupy.cuda.compiler.
# _compile_with_cache_cuda, CuPy 13 and 14), so these win over ours: -ftz=true makes float32
# arithmetic, __f*_rn intrinsics included, flush subnormals to zero. The kernels write the float32
# operations whose subnormals matter as explicit non-.ftz PTX; nvrtc_ptx compiles with these too.
CUPY_APPENDED_OPTIONS = ("-ftz=true",)


def nvrtc_ptx(name: str, name_expressions: tuple[str, ...] = (), options: tuple[str, ...] = (),
              arch: str = "sm_90") -> tuple[str, dict]:
    """Compile ``kernels/<name>`` with NVRTC exactly as ``load_module`` does, but for a named ``arch``
    and without a GPU: (PTX text, {name expression: mangled name}). CuPy's public compile entry
    points ask the driver for the device's architecture, so this goes one level down, to the
    NVRTC program CuPy itself uses; it exists so CI can prove every kernel builds under NVRTC."""
    from cupy.cuda import compiler

    prog = compiler._NVRTCProgram(kernel_source(name), name, name_expressions=list(name_expressions) or None)
    ptx, mapping = prog.compile(NVRTC_OPTIONS + tuple(options) + CUPY_APPENDED_OPTIONS + (f"-arch={arch}",))
    return (ptx.decode() if isinstance(ptx, bytes) else ptx), dict(mapping or {})


@functools.lru_cache(maxsize=None)
def load_module(name: str, name_expressions: tuple[str, ...] = (), options: tuple[str, ...] = ()):
    """Compile ``kernels/<name>`` once per process with NVRTC and cache the ``cupy.RawModule``."""
    cp = _cupy()
    if cp is None or not cuda_available():
        raise DeviceError(f"kernel {name} needs CUDA")
    return cp.RawModule(code=kernel_source(name), options=NVRTC_OPTIONS + tuple(options),
                        name_expressions=list(name_expressions) or None)
