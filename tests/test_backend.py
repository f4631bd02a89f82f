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


def test_kernel_dir_exists():
    assert backend.kernel_dir().is_dir()


@pytest.mark.gpu
def test_cupy_torch_roundtrip_shares_device_memory():
    import cupy as cp

    x = cp.zeros((8, 8), dtype=cp.float32)
    t = backend.as_torch(x)
    assert t.is_cuda and t.data_ptr() == x.data.ptr
    t += 1
    assert float(x.sum()) == 64.0
    y = backend.from_torch(t)
    assert y.data.ptr == x.data.ptr
