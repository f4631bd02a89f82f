"""A whole ``gpuheart run`` on the fake GPU (tests/fake_device.py) equals the same run on the CPU.

Every device branch of the pipeline runs: slabs uploaded through the pinned ring, z-normalization + asinh,
CLAHE fused with robust scaling, both medians and the threshold, the U-Net fed by DLPack, the union, both
closings, labelling and writing from device slabs. The kernels are the host builds of kernels/*.cu, device
arrays refuse to be taken by NumPy implicitly, and any kernel that fails (and would fall back to the host
on a real GPU) fails the test instead.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import cuda_emulator as emu
import fake_device
from gpuheart import Pipeline, PipelineConfig, backend
from gpuheart.io import open_scan

pytestmark = pytest.mark.skipif(not emu.available(), reason="g++ is not on PATH: no host emulator")


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    return fake_device.build_modules(tmp_path_factory.mktemp("emu"), range(3, 16, 2))


def _cfg(device: str, method: str) -> PipelineConfig:
    cfg = PipelineConfig(progress=False, device=device, slab_size=5)
    cfg.segment.method = method
    return cfg


def _run(cfg, out, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Pipeline(cfg).run(None, out, phantom_preset="tiny", **kw)
    return result, [str(w.message) for w in caught]


def _same_run(gpu, cpu) -> None:
    """Every volume, every summary value and every report figure of two runs equal."""
    got, want = _volumes(gpu), _volumes(cpu)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
    assert _measurements(gpu.summary) == _measurements(cpu.summary)
    for channel in cpu.outputs:
        with np.load(gpu.out_dir / channel / "figures.npz") as fa, np.load(cpu.out_dir / channel / "figures.npz") as fb:
            assert set(fa.files) == set(fb.files)
            for k in fb.files:
                np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{channel} {k}")


def _measurements(d):
    """The summary without what differs between any two runs: paths, times (wall_s), the device."""
    if isinstance(d, dict):
        return {k: _measurements(v) for k, v in d.items()
                if not any(w in str(k) for w in ("path", "seconds", "device", "timings", "wall_s"))}
    return d


def _volumes(result) -> dict:
    vols = {}
    for channel, paths in result.outputs.items():
        for kind, path in paths.items():
            if path.name.endswith(".ome.zarr"):
                with open_scan(path) as s:
                    vols[channel, kind] = s.read_slab(0, 0, s.shape[0])
    return vols


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    return {m: _run(_cfg("cpu", m), tmp_path_factory.mktemp(f"cpu-{m}"))[0] for m in ("dom", "union")}


@pytest.mark.parametrize("method", ["dom", "union"])
def test_a_run_on_the_fake_gpu_equals_the_cpu_run(modules, cpu_runs, method, tmp_path, monkeypatch):
    for m in modules.values():
        m.launches.clear()
    with fake_device.fake_gpu(modules, monkeypatch):
        assert backend.resolve_device("auto") == "cuda"
        gpu, said = _run(_cfg("cuda", method), tmp_path / "gpu")
    failed = [w for w in said if "CUDA" in w or "kernel" in w or "device memory" in w]
    assert not failed, failed
    launched = {name.split("<")[0] for m in modules.values() for name, *_ in m.launches}
    assert {"znorm_asinh_u16", "clahe_final_u8", "close_z_line", "close_cube", "otsu_hist_i16",
            "otsu_threshold_i16"} <= launched, launched
    assert any(n.startswith("median_") for n in launched), launched
    _same_run(gpu, cpu_runs[method])


# -- the GPU-only tests of test_resume.py, on the fake GPU ------------------------------------------

from test_resume import small_scan  # noqa: E402,F401 - the fixture those tests take


def test_capped_pool_retries_smaller_slabs_on_the_fake_gpu(modules, small_scan, tmp_path, monkeypatch):  # noqa: F811
    """test_resume's capped-pool test, with the fake pool counting live device buffers: the slab plan
    sees the cap, a slab that does not fit raises the pool's OutOfMemoryError from inside the kernels'
    wrappers, it is not swallowed by a host fallback, and the smaller pieces give the uncapped result."""
    import test_resume

    with fake_device.fake_gpu(modules, monkeypatch):
        test_resume.capped_pool_completes(small_scan, tmp_path, monkeypatch)


def test_checkpointed_accumulator_takes_device_slabs_on_the_fake_gpu(modules, monkeypatch):
    import test_resume

    with fake_device.fake_gpu(modules, monkeypatch):
        test_resume.test_accumulator_restored_from_a_checkpoint_accepts_device_slabs()


def test_device_arrays_refuse_what_cupy_refuses(modules, monkeypatch):
    with fake_device.fake_gpu(modules, monkeypatch) as cp:
        x = cp.arange(6, dtype=np.float32).reshape(2, 3)
        with pytest.raises(TypeError, match="Implicit conversion"):
            np.asarray(x)
        with pytest.raises(TypeError, match="mixed"):
            x + np.ones(3, np.float32)
        with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
            x[0] = np.zeros(3, np.float32)
        with pytest.raises(ValueError):
            x.set(np.zeros((2, 3), np.float64))
        assert isinstance(x.sum(), cp.ndarray) and float(x.sum()) == 15
        assert isinstance(x + 1, cp.ndarray) and (cp.asnumpy(x * 2) == np.arange(6).reshape(2, 3) * 2).all()
        cp.get_default_memory_pool().set_limit(size=x.nbytes + 8)
        with pytest.raises(cp.cuda.memory.OutOfMemoryError):
            cp.empty(4, np.float32)
        del x
        cp.empty(4, np.float32)  # the freed buffer is back in the budget


def test_dask_run_on_the_fake_gpu_equals_the_cpu_run(modules, cpu_runs, tmp_path, monkeypatch):
    """Pass 2 as Dask tasks on two in-process workers (threads, so they share the fake GPU): what a
    dask-cuda cluster runs, slab by slab, with the tasks' device results merged on the client."""
    distributed = pytest.importorskip("distributed")
    with fake_device.fake_gpu(modules, monkeypatch):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                           dashboard_address=None)
        with cluster, distributed.Client(cluster) as client:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gpu = Pipeline(_cfg("cuda", "dom")).run(None, tmp_path / "gpu", phantom_preset="tiny", client=client)
    failed = [str(w.message) for w in caught if "CUDA" in str(w.message) or "kernel" in str(w.message)]
    assert not failed, failed
    _same_run(gpu, cpu_runs["dom"])
