import numpy as np
import pytest
import torch

from gpuheart import backend


def test_resolve_device_auto_and_cpu():
    assert backend.resolve_device("cpu") == "cpu"
    assert backend.resolve_device("auto") == ("cuda" if backend.cuda_available() else "cpu")


def test_unknown_device_is_an_error():
    with pytest.raises(backend.DeviceError, match="unknown device 'tpu'"):
        backend.resolve_device("tpu")


@pytest.mark.skipif(backend.cuda_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(backend.DeviceError, match="device 'cuda' was requested"):
        backend.resolve_device("cuda")


def test_array_module_and_moves_on_cpu():
    x = np.arange(6, dtype=np.uint16).reshape(2, 3)
    assert backend.array_module(x) is np
    assert backend.to_device(x, "cpu") is x or np.shares_memory(backend.to_device(x, "cpu"), x)
    assert backend.to_host(x) is x
    assert backend.device_of(x) == "cpu"


def test_numpy_torch_roundtrip_shares_memory():
    x = np.zeros((4, 5), dtype=np.float32)
    t = backend.as_torch(x)
    assert t.data_ptr() == x.__array_interface__["data"][0]
    t[1, 2] = 7.0                      # write through torch, see it in numpy
    assert x[1, 2] == 7.0
    y = backend.from_torch(t)
    assert np.shares_memory(x, y)
    y[0, 0] = 3.0                      # and back
    assert t[0, 0].item() == 3.0


def test_from_torch_of_a_grad_tensor_shares_memory():
    t = torch.ones(3, requires_grad=True)
    a = backend.from_torch(t)
    assert a.__array_interface__["data"][0] == t.data_ptr()


def test_torch_out_of_memory_is_a_device_oom_and_other_errors_are_not():
    """The pipeline shrinks its slabs on PyTorch's CUDA out-of-memory error too (the U-Net's); it is named
    torch.cuda.OutOfMemoryError, which older torch has where it lacks the top-level alias."""
    import torch

    assert backend.is_device_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not backend.is_device_oom(RuntimeError("CUDA out of memory"))
    assert not backend.is_device_oom(MemoryError())


def test_kernel_dir_exists():
    assert backend.kernel_dir().is_dir()


@pytest.mark.gpu
@pytest.mark.real_gpu(reason="needs PyTorch with CUDA: the fake GPU's tensors are CPU tensors")
def test_cupy_torch_roundtrip_shares_device_memory():
    import cupy as cp

    x = cp.zeros((8, 8), dtype=cp.float32)
    t = backend.as_torch(x)
    assert t.is_cuda and t.data_ptr() == x.data.ptr
    t += 1
    assert float(x.sum()) == 64.0
    y = backend.from_torch(t)
    assert y.data.ptr == x.data.ptr


def _repeat_cases():
    rng = np.random.default_rng(3)
    return [(np.arange(0), np.zeros(0, np.int64)), (np.arange(5), np.zeros(5, np.int64)),
            (np.arange(6) * 10, np.array([0, 3, 0, 0, 9, 1])), (rng.random(50), rng.integers(0, 4, 50))]


def test_repeat_is_np_repeat_with_per_element_counts():
    for x, k in _repeat_cases():
        np.testing.assert_array_equal(backend.repeat(x, k), np.repeat(x, k))


@pytest.mark.gpu
def test_repeat_on_the_device_is_np_repeat():
    import cupy as cp

    for x, k in _repeat_cases():
        got = backend.repeat(cp.asarray(x), cp.asarray(k))
        assert backend.is_device_array(got)
        np.testing.assert_array_equal(cp.asnumpy(got), np.repeat(x, k))


# -- prefetch: background reads, overlapped uploads ----------------------------------------------

def _slabs(n, shape=(3, 16, 16), dtype=np.uint16):
    rng = np.random.default_rng(0)
    return [(i, rng.integers(0, 4000, shape).astype(dtype)) for i in range(n)]


def test_prefetch_keeps_order_and_data_on_the_cpu():
    items = _slabs(7)
    got = list(backend.prefetch(iter(items), "cpu"))
    assert [k for k, _ in got] == list(range(7))
    for (_, a), (_, b) in zip(got, items):
        assert a is b   # no copy on the CPU


def test_prefetch_reads_ahead_but_boundedly():
    import threading
    import time

    produced = []

    def gen():
        for i in range(20):
            produced.append(i)
            yield i, np.zeros(4)

    it = backend.prefetch(gen(), "cpu", depth=2)
    next(it)
    time.sleep(0.3)   # the reader runs ahead while the consumer "computes"...
    assert 2 <= len(produced) <= 5   # ...but never more than the queue (2), one in hand and one being put
    it.close()   # stops the reader thread
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "gpuheart-prefetch"]


def test_prefetch_raises_the_readers_error_in_the_caller():
    from gpuheart.io import ScanError

    def gen():
        yield 0, np.zeros(2)
        raise ScanError("slice_0001.tif: truncated")

    it = backend.prefetch(gen(), "cpu")
    assert next(it)[0] == 0
    with pytest.raises(ScanError, match="slice_0001.tif"):
        next(it)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_prefetch_to_cuda_equals_the_host_data(dtype):
    import cupy as cp

    items = _slabs(6, (4, 256, 300), dtype) + [(6, np.ones((2, 256, 300), dtype))]  # a short last slab
    seen = []
    for key, x in backend.prefetch(iter(items), "cuda"):
        assert isinstance(x, cp.ndarray) and x.dtype == dtype
        y = x * 2  # work queued on the current stream must see the copied data
        seen.append((key, cp.asnumpy(y)))
    assert [k for k, _ in seen] == list(range(7))
    for (_, got), (_, host) in zip(seen, items):
        np.testing.assert_array_equal(got, host * 2)


def test_prefetch_cuda_path_logic_with_a_stand_in_cupy(monkeypatch):
    """The CUDA half run against a stand-in for CuPy that records what was asked of it: every slab goes
    through a pinned staging buffer (a ring of two, reused), is copied on the side stream, and the
    current stream waits on that copy's event before the slab is handed over."""
    import sys
    import types

    log = []

    class Event:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            log.append(("sync", self.name))

    class Stream:
        count = 0

        def __init__(self, non_blocking=False, name="copy"):
            self.name = name

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def record(self):
            Stream.count += 1
            return Event(f"{self.name}{Stream.count}")

        def wait_event(self, ev):
            log.append((f"{self.name} waits", ev.name))

    class Dev(np.ndarray):
        def set(self, arr, stream=None):
            assert arr.base is not None  # a view of the pinned staging buffer, not the caller's array
            self[...] = arr
            log.append(("copy", stream.name))

    current = Stream(name="current")
    pinned = []

    def empty_pinned(n, dtype):
        pinned.append(np.empty(n, dtype))
        return pinned[-1]

    fake_cp = types.SimpleNamespace(
        cuda=types.SimpleNamespace(get_current_stream=lambda: current, Stream=Stream),
        empty=lambda shape, dtype: np.empty(shape, dtype).view(Dev))
    monkeypatch.setattr(backend, "_cupy", lambda: fake_cp)
    monkeypatch.setattr(backend, "resolve_device", lambda device="auto": "cuda")
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(empty_pinned=empty_pinned))
    items = _slabs(5)
    got = [(k, np.array(x)) for k, x in backend.prefetch(iter(items), "cuda")]
    assert [k for k, _ in got] == list(range(5))
    for (_, a), (_, b) in zip(got, items):
        np.testing.assert_array_equal(a, b)
    assert len(pinned) == 2   # the ring: two staging buffers for five slabs
    assert sum(1 for e in log if e == ("copy", "copy")) == 5
    assert sum(1 for e in log if e[0] == "current waits") == 5   # one per slab handed over
    assert sum(1 for e in log if e[0] == "sync") == 3   # slabs 3..5 wait for the DMA that used their buffer


@pytest.mark.parametrize("out", [np.zeros((3, 4), np.uint16),     # broadcastable shape
                                 np.zeros((2, 3, 4), np.float32),  # castable dtype
                                 [0] * 24])                        # not an ndarray
def test_to_host_out_must_match_like_cupy_get(out):
    x = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    with pytest.raises(TypeError, match=r"uint16\[2, 3, 4\]"):
        backend.to_host(x, out=out)


def test_to_host_out_fills_and_returns_the_given_array():
    x = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    out = np.zeros_like(x)
    assert backend.to_host(x, out=out) is out
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("shape", [(3, 4096 * 64), (2, 2048 * 2048 // 64), (4, 2000), (1, 64 * 64 + 7)])
@pytest.mark.parametrize("op", ["min", "max", "all", "any"])
def test_reduce_rows_equals_the_axis_reduction(shape, op):
    from gpuheart.backend import reduce_rows

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    if op in ("all", "any"):
        x = x > (2.5 if op == "any" else -2.5)
    got = reduce_rows(x, op)
    np.testing.assert_array_equal(got, getattr(x, op)(axis=1))


def test_reduce_rows_propagates_nan_like_the_axis_reduction():
    from gpuheart.backend import reduce_rows

    x = np.ones((2, 4096 * 64), np.float32)
    x[1, 12345] = np.nan
    for op in ("min", "max"):
        np.testing.assert_array_equal(reduce_rows(x, op), getattr(x, op)(axis=1))
