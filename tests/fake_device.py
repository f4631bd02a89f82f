"""A GPU that is not there: NumPy dressed as CuPy, strictly enough to run gpuheart's device paths end to end.

``cuda_emulator`` runs each kernel's logic through its dispatch function. What it cannot show is the glue
around the kernels on a device run: a device slab handed to NumPy, SciPy or a writer (CuPy refuses the
implicit conversion), a device array mixed with a host one in arithmetic, a result left on the wrong side,
a stream or pool call that does not exist. ``fake_gpu()`` installs stand-ins for ``cupy`` and ``cupyx`` in
which

* device arrays are ``DeviceArray``: NumPy memory behind an object that, like ``cupy.ndarray``, refuses
  ``np.asarray``/``__array__`` and ufuncs or NumPy functions mixing it with a host array (``TypeError``),
  moves to the host only through ``.get()`` / ``cupy.asnumpy``, and returns 0-d device arrays from
  reductions and scalar indexing;
* ``RawModule`` kernels are the host builds of ``cuda_emulator`` (every argument checked against the
  kernel's parameters), fed with the arrays' own memory;
* streams, events, devices and the memory pool are no-ops that keep CuPy's call signatures;
* ``cupyx.allow_synchronize(False)`` makes every device->host read (``.get()``, ``cupy.asnumpy``, ``int()``,
  ``bool()``, ``.item()`` ...) raise ``cupyx.DeviceSynchronized``, so a test can demand that a device path
  never waits for the device;
* DLPack hands torch the array's memory as a CPU tensor (this torch has no CUDA), and a tensor comes back
  through ``cupy.from_dlpack`` as a device array again.

So a ``Pipeline`` with ``device = "cuda"`` runs every device branch on the CPU. It proves the glue and the
kernels' logic, not speed, and not what only a real GPU does (asynchrony, real memory limits, cuDNN, bf16
U-Net inference: the fake runs the U-Net in fp32 on the CPU). Arithmetic follows this NumPy's type
promotion, so a dtype that CuPy promotes differently (CuPy 13 follows NumPy 1's rules) cannot show here.
"""
from __future__ import annotations

import contextlib
import sys
import types
import weakref
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

import cuda_emulator as emu

_REFUSED = ("Implicit conversion to a NumPy array is not allowed (a device array on the fake GPU; "
            "use .get() or cupy.asnumpy)")


class DeviceSynchronized(RuntimeError):
    """``cupyx.DeviceSynchronized``: a device->host read inside ``cupyx.allow_synchronize(False)``."""


_SYNC = {"allowed": True}   # cupyx.allow_synchronize's switch (one flag: the fake has no threads of its own)


def _host_read(what: str) -> None:
    """Every way a device array's values reach the host passes here (``get``, ``int()``, ``bool()`` ...)."""
    if not _SYNC["allowed"]:
        raise DeviceSynchronized(f"{what}: a device->host read inside cupyx.allow_synchronize(False) (fake GPU)")


@contextlib.contextmanager
def allow_synchronize(allow: bool):
    """``cupyx.allow_synchronize``: with ``False``, a device->host read raises ``DeviceSynchronized``."""
    old, _SYNC["allowed"] = _SYNC["allowed"], bool(allow)
    try:
        yield
    finally:
        _SYNC["allowed"] = old


class DeviceArray(NDArrayOperatorsMixin):
    """``cupy.ndarray`` on the fake GPU: host memory that NumPy may not take implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a: np.ndarray):
        object.__setattr__(self, "_a", a)
        _POOL.account(a)

    # -- what CuPy refuses -----------------------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError(_REFUSED)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = tuple(_strict(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*(_strict(x) for x in inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        # CuPy implements NumPy functions on device arrays (NEP 18), but not with host arrays mixed in
        return _wrap(func(*_tree(_strict, args), **_tree(_strict, kwargs)))

    # -- what CuPy offers ------------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None):
        _host_read("get")
        if out is not None:   # as CuPy: a host array of this shape and dtype, no casting
            if not isinstance(out, np.ndarray) or out.shape != self._a.shape or out.dtype != self._a.dtype:
                raise TypeError(f"get(out=...) needs a numpy.ndarray of {self._a.dtype}{list(self._a.shape)}")
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def set(self, arr, stream=None):   # as CuPy: a host ndarray of the same dtype and shape, contiguous target
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"set() takes a numpy.ndarray, got {type(arr).__name__}")
        if arr.dtype != self._a.dtype or arr.shape != self._a.shape:
            raise ValueError(f"set(): {arr.dtype}{list(arr.shape)} into {self._a.dtype}{list(self._a.shape)}")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("set() into a non-contiguous device array")
        self._a[...] = arr

    @property
    def __cuda_array_interface__(self):   # what code that tells CuPy-like arrays apart looks for
        return {"shape": self._a.shape, "typestr": self._a.dtype.str, "version": 3,
                "data": (self._a.__array_interface__["data"][0], False), "strides": None}

    @property
    def device(self):
        return _DEVICE

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self._a.__array_interface__["data"][0])

    def __dlpack__(self, *, stream=None, **kwargs):   # no streams on the host
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()

    @property
    def flags(self):   # CuPy's flags: no ``writeable``, ``aligned``...
        f = self._a.flags
        return types.SimpleNamespace(c_contiguous=f.c_contiguous, f_contiguous=f.f_contiguous, owndata=f.owndata)

    def __getattr__(self, name):
        if name.startswith("__") or name in _NUMPY_ONLY:   # __array_interface__ etc.: NumPy's other ways in
            raise AttributeError(f"'cupy.ndarray' (fake) has no attribute {name!r}")
        if name in _HOST_READS:
            _host_read(name)
        v = getattr(self._a, name)
        if callable(v):
            return lambda *a, **k: _wrap(v(*_tree(_loose, a), **_tree(_loose, k)))
        return _wrap(v) if isinstance(v, np.ndarray) else v

    def __getitem__(self, key):
        return _wrap(self._a[_tree(_loose, key)], scalars=True)

    def __setitem__(self, key, value):
        if isinstance(value, (np.ndarray, list, tuple)) and np.ndim(value):   # CuPy's own error
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill (a host array assigned into a "
                             "device array on the fake GPU: move it with cupy.asarray first)")
        self._a[_tree(_loose, key)] = _loose(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v, scalars=True) for v in self._a)

    def __bool__(self):
        _host_read("__bool__")
        return bool(self._a)

    def __int__(self):
        _host_read("__int__")
        return int(self._a)

    def __float__(self):
        _host_read("__float__")
        return float(self._a)

    def __index__(self):
        _host_read("__index__")
        return self._a.__index__()

    def __repr__(self):
        return f"fake_device_array({self._a!r})"


# numpy.ndarray attributes that cupy.ndarray does not have (the fake forwards the rest)
_NUMPY_ONLY = frozenset({"ctypes", "setflags", "resize", "byteswap", "getfield", "setfield", "itemset", "tostring",
                         "newbyteorder"})


# forwarded numpy.ndarray methods that hand the values to the host
_HOST_READS = frozenset({"item", "tolist", "tobytes"})


def _wrap(v, scalars: bool = True):
    if isinstance(v, np.ndarray):
        return DeviceArray(v)
    if scalars and isinstance(v, np.generic):  # CuPy reductions and scalar indexing give 0-d arrays
        return DeviceArray(np.asarray(v))
    if isinstance(v, tuple):
        return tuple(_wrap(x, scalars) for x in v)
    if isinstance(v, list):
        return [_wrap(x, scalars) for x in v]
    return v


def _strict(x):
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, np.ndarray) and x.ndim:
        raise TypeError(f"a host array ({x.dtype}{list(x.shape)}) mixed with device arrays")
    return x


def _loose(x):
    return x._a if isinstance(x, DeviceArray) else x


def _tree(f, x):
    """``f`` applied to every leaf of nested tuples, lists and dicts (call arguments, index tuples)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_tree(f, v) for v in x)
    if isinstance(x, dict):
        return {k: _tree(f, v) for k, v in x.items()}
    return f(x)


class _NoOp:
    """A context manager that synchronizes instantly: what devices and streams are on the host."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class _Device(_NoOp):
    id = 0
    compute_capability = "90"

    def use(self):
        pass


_DEVICE = _Device()


class _Event:
    def synchronize(self):
        pass

    def record(self, stream=None):
        pass

    @property
    def done(self):
        return True


class _Stream(_NoOp):
    def __init__(self, null=False, non_blocking=False, ptds=False):
        pass

    def record(self, event=None):
        return event or _Event()

    def wait_event(self, event):
        if not isinstance(event, _Event):
            raise TypeError(f"wait_event takes an Event, got {type(event).__name__}")


class _Pool:
    """CuPy's memory pool as far as gpuheart sees it: the bytes of live device arrays (each buffer counted
    once, released when NumPy frees it), and a limit (``set_limit``) beyond which an allocation raises
    ``OutOfMemoryError``, as a capped pool does."""

    def __init__(self):
        self.limit, self.used, self.live = 0, 0, set()

    def account(self, a: np.ndarray) -> None:
        while isinstance(a.base, np.ndarray):   # a view: its memory is its owner's (some NumPy results are
            a = a.base                          # views of a fresh buffer: nonzero, fancy indexing, reshape)
        if not a.nbytes or id(a) in self.live:
            return   # empty, or a buffer already counted
        if a.base is not None and not isinstance(a.base, np.ndarray):
            return   # memory owned outside NumPy (a torch tensor through DLPack): not the pool's
        if self.limit and self.used + a.nbytes > self.limit:
            raise OutOfMemoryError(a.nbytes, self.used, self.limit)
        self.used += a.nbytes
        self.live.add(id(a))
        weakref.finalize(a, self._release, id(a), a.nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.used -= nbytes

    def used_bytes(self):
        return self.used

    def total_bytes(self):
        return self.used

    def get_limit(self):
        return self.limit

    def set_limit(self, size=None, fraction=None):
        self.limit = int(size or 0)

    def free_all_blocks(self, stream=None):
        pass

    def n_free_blocks(self):
        return 0


class OutOfMemoryError(MemoryError):
    def __init__(self, size=0, total=0, limit=0):
        super().__init__(f"Out of memory allocating {size:,} bytes ({total:,} in use, limit {limit:,}; fake GPU)")


_POOL = _Pool()


class _ModuleShim:
    """``cupy.RawModule``: the emulator's host build, given the arrays' memory."""

    def __init__(self, module):
        self.module = module

    def get_function(self, name):
        kern = self.module.get_function(name)

        def launch(grid, block, args, shared_mem=0):   # a host array among the arguments is refused
            return kern(grid, block, tuple(_strict(a) for a in args), shared_mem=shared_mem)

        return launch


def _module_function(name: str):
    fn = getattr(np, name)
    if isinstance(fn, type) or not callable(fn):   # dtypes (cp.float32, cp.bool_) and constants
        return fn
    return lambda *a, **k: _wrap(fn(*_tree(_strict, a), **_tree(_strict, k)))


def _asarray(x, dtype=None, order=None, copy=None, blocking=False):
    if isinstance(x, DeviceArray):
        a = x._a if dtype is None else x._a.astype(dtype, copy=False)
        return DeviceArray(np.array(a, order=order or "K", copy=True) if copy else a)
    return DeviceArray(np.array(x, dtype=dtype, order=order or "K", copy=True))  # a host->device copy


def _empty(shape, dtype=float, order="C"):
    a = np.empty(shape, dtype, order)
    a.reshape(-1).view(np.uint8)[:] = 0xCD   # garbage, as a fresh device allocation holds
    return DeviceArray(a)


def make_cupy(modules: dict) -> tuple[types.ModuleType, types.ModuleType]:
    """(cupy, cupyx) stand-ins whose RawModules come from ``modules`` ({file name: emulated module})."""
    cp = types.ModuleType("cupy")
    cp.__getattr__ = _module_function
    cp.__version__ = "fake"
    cp.ndarray = DeviceArray
    cp.is_available = lambda: True
    cp.asarray = _asarray
    cp.array = lambda x, dtype=None, copy=True, order="K": _asarray(x, dtype, order, copy)
    cp.ascontiguousarray = lambda x, dtype=None: _asarray(x, dtype, "C", copy=False) \
        if isinstance(x, DeviceArray) and x._a.flags.c_contiguous and dtype in (None, x._a.dtype) \
        else DeviceArray(np.ascontiguousarray(_strict(x), dtype=dtype))
    cp.asnumpy = lambda x, stream=None, order="C", out=None: x.get(out=out) if isinstance(x, DeviceArray) \
        else np.asarray(x)
    cp.empty = _empty
    cp.from_dlpack = lambda t: DeviceArray(np.from_dlpack(t))
    cp.get_array_module = lambda *args: cp if any(isinstance(a, DeviceArray) for a in args) else np
    cp.get_default_memory_pool = lambda: _POOL
    cp.get_default_pinned_memory_pool = lambda: _Pool()
    current = _Stream()
    cp.cuda = types.SimpleNamespace(
        Device=lambda i=0: _DEVICE, Stream=_Stream, Event=_Event, get_current_stream=lambda: current,
        runtime=types.SimpleNamespace(memGetInfo=lambda: (8 << 30, 16 << 30), getDeviceCount=lambda: 1),
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))
    cp.RawModule = lambda code=None, options=(), name_expressions=None, **kw: (_ for _ in ()).throw(
        RuntimeError("the fake GPU loads modules through gpuheart.backend.load_module only"))
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype=float, order="C": np.empty(shape, dtype, order)
    cupyx.zeros_pinned = lambda shape, dtype=float, order="C": np.zeros(shape, dtype, order)
    cupyx.allow_synchronize = allow_synchronize
    cupyx.DeviceSynchronized = DeviceSynchronized
    return cp, cupyx


def build_modules(workdir: Path, median_sizes=range(3, 32, 2)) -> dict:
    """Host builds of every kernels/*.cu file the device paths load (the median for ``median_sizes``)."""
    from gpuheart import filters
    from test_kernels_emulated import _kernel_names

    names = sorted({filters._cuda_plan((1, 64, 64), np.dtype(dt), size, hist)[0]
                    for dt in (np.uint8, np.uint16, np.float32) for size in median_sizes for hist in (True, False)})
    mods = {cu: emu.build(cu, _kernel_names(cu), workdir)
            for cu in ("clahe.cu", "elementwise.cu", "morphology.cu", "threshold.cu")}
    mods["median.cu"] = emu.build("median.cu", names, workdir)
    return mods


@contextlib.contextmanager
def fake_gpu(modules: dict, monkeypatch):
    """Inside: ``cupy`` is the fake, ``backend.cuda_available()`` is True and every kernel module comes
    from ``modules``. Caches that remember the real CuPy are cleared on the way in and out."""
    from gpuheart import backend, exposure, filters, mesh, morphology, segment, unet

    cp, cupyx = make_cupy(modules)
    load = lambda name, *a, **k: _ModuleShim(modules[name])  # noqa: E731
    caches = [backend._cupy, backend.cuda_available, filters._device_border_maps, exposure._device_reflect_maps,
              mesh._case_tables]
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "cupy", cp)
        mp.setitem(sys.modules, "cupyx", cupyx)
        for m in (exposure, filters, morphology, segment):
            mp.setattr(m, "load_module", load)
        # the torch here has no CUDA: its CPU tensors stand for the device tensors a DLPack handover makes
        mp.setattr(unet, "from_torch", lambda t: DeviceArray(np.from_dlpack(t.detach())))
        mp.setattr(unet, "_torch_cuda", lambda: True)   # ... so torch counts as having CUDA, as on a GPU machine
        mp.setattr(filters, "_CUDA_FAILED", {})
        mp.setattr(exposure, "_warned", set())
        mp.setattr(morphology, "_warned", set())
        mp.setattr(segment, "_warned", set())
        mp.setattr(mesh, "_warned", set())
        for c in caches:
            getattr(c, "cache_clear", lambda: None)()
        _POOL.limit = 0
        try:
            yield cp
        finally:
            _POOL.limit = 0
            for c in caches:
                getattr(c, "cache_clear", lambda: None)()


def main(argv=None) -> int:
    """``python tests/fake_device.py SCRIPT [ARGS...]`` or ``python tests/fake_device.py -m MODULE [ARGS...]``:
    run a script (a benchmark, say) or a module (``-m gpuheart run ... --device cuda``) on the fake GPU, as a
    dry run of what a GPU session will execute."""
    import runpy
    import tempfile

    import pytest

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(main.__doc__)
        return 2
    mods = build_modules(Path(tempfile.mkdtemp(prefix="gpuheart-fake-gpu-")))
    mp = pytest.MonkeyPatch()
    try:
        with fake_gpu(mods, mp):
            module = argv[1] if argv[0] == "-m" and len(argv) > 1 else None
            sys.argv = argv[1:] if module else argv
            try:
                if module:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as e:
                return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        mp.undo()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
