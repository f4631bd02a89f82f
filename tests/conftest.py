import os
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


def pytest_collection_modifyitems(config, items):
    from gpuheart.backend import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (cupy.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
