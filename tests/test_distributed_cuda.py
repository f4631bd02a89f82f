"""Pass 2 on dask-cuda's LocalCUDACluster (one worker per GPU) gives exactly the outputs of a local GPU run.

Needs a real GPU and dask-cuda (not a dependency: `pip install dask-cuda`); it skips otherwise, with the reason.
benchmarks/gpu_session.sh runs it on the lent GPU machine, where the dask wheels travel in .gpu-carry.
"""
import importlib

import numpy as np
import pytest

from gpuheart import Pipeline, PipelineConfig
from gpuheart.io import open_scan

pytestmark = [pytest.mark.gpu, pytest.mark.real_gpu(reason="dask-cuda workers need a real CUDA device")]
distributed = pytest.importorskip("distributed")
dask_cuda = pytest.importorskip("dask_cuda")

# where each module records a kernel that failed and fell back to the host (warned once)
FALLBACK_RECORDS = {"gpuheart.filters": "_CUDA_FAILED", "gpuheart.exposure": "_warned", "gpuheart.morphology": "_warned"}


def test_dask_cuda_run_equals_a_local_gpu_run(tmp_path):
    from gpuheart.phantom import PhantomConfig, write_phantom

    ph = write_phantom(PhantomConfig.preset("tiny"), tmp_path / "ph")
    cfg = PipelineConfig.from_dict({"progress": False, "slab_size": 4, "channels": ["C00", "C01"],
                                    "segment": {"method": "dom"}, "output": {"report": False}})
    records = FALLBACK_RECORDS

    def worker_state():  # nested, so it travels to the workers by value (they cannot import this test module)
        from gpuheart import backend

        failed = {m: sorted(map(str, getattr(importlib.import_module(m), name))) for m, name in records.items()}
        return {"device": backend.resolve_device("auto"), "fell_back": {m: f for m, f in failed.items() if f}}

    local = Pipeline(cfg).run(ph / "scan", tmp_path / "local")
    assert local.summary["device"] == "cuda"
    with dask_cuda.LocalCUDACluster(dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        dist = Pipeline(cfg).run(ph / "scan", tmp_path / "dask", client=client)
        states = list(client.run(worker_state).values())
    assert states and all(s == {"device": "cuda", "fell_back": {}} for s in states), states
    for ch in ("C00", "C01"):
        for kind in ("preprocessed", "dom_mask", "mask"):
            with open_scan(local.outputs[ch][kind]) as a, open_scan(dist.outputs[ch][kind]) as b:
                np.testing.assert_array_equal(a.read_slab(0, 0, a.shape[0]), b.read_slab(0, 0, b.shape[0]))
