import contextlib
import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path | None:
    """The real labelled stacks: $GPUHEART_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("GPUHEART_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if d is None:
        pytest.skip("real data not found: set GPUHEART_DATA or place it at ../shared/data")
    return d


def pytest_addoption(parser):
    parser.addoption("--fake-gpu", action="store_true",
                     help="run with the fake GPU of tests/fake_device.py (NumPy posing as CuPy, kernels on the host "
                          "emulator), so the gpu tests run without one: `pytest -m gpu --fake-gpu`")


def pytest_configure(config):
    if not config.getoption("--fake-gpu"):
        return
    import tempfile

    import fake_device

    workdir = Path(tempfile.mkdtemp(prefix="gpuheart-fake-gpu-"))
    config._fake_gpu_patch = pytest.MonkeyPatch()
    config._fake_gpu = fake_device.fake_gpu(fake_device.build_modules(workdir), config._fake_gpu_patch)
    config._fake_gpu.__enter__()


def pytest_unconfigure(config):
    if getattr(config, "_fake_gpu", None) is not None:
        config._fake_gpu.__exit__(None, None, None)
        config._fake_gpu_patch.undo()


def pytest_collection_modifyitems(config, items):
    from gpuheart.backend import cuda_available

    if config.getoption("--fake-gpu"):
        for item in items:
            mark = item.get_closest_marker("real_gpu")
            if mark is not None:
                item.add_marker(pytest.mark.skip(reason="not on the fake GPU: " + mark.kwargs.get("reason", "")))
        return
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (cupy.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def no_device_sync():
    """``cupyx.allow_synchronize(False)``: a device->host read raises ``cupyx.DeviceSynchronized`` (CuPy
    deprecates it, with a warning on entry, but keeps it; the fake GPU implements it)."""
    import cupyx

    cm = cupyx.allow_synchronize(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm.__enter__()
    try:
        yield
    finally:
        cm.__exit__(None, None, None)


def cupy_checking_fallbacks(module):
    """A ``cp`` fixture (the cupy module) that also checks the kernels of ``module`` really ran: a failing
    kernel degrades to the host path with a one-time warning recorded in ``module._warned``, which would
    let a parity test pass without any kernel. Tests named ``*falls_back*`` provoke that on purpose."""

    @pytest.fixture
    def cp(request):
        import cupy

        deliberate = "falls_back" in request.node.name
        if not deliberate:
            module._warned.clear()
        yield cupy
        if not deliberate:
            assert not module._warned, f"a CUDA kernel fell back to the host: {sorted(module._warned)}"

    return cp
