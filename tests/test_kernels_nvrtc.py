"""Every kernel builds under NVRTC, the compiler ``backend.load_module`` uses at run time on a GPU, and
under nvcc (as .ci/run builds them).

nvcc (tests/test_kernels_*.py and .ci/run) accepts things NVRTC does not (host headers, for one),
so a kernel that only passes nvcc could still fail on the first GPU it meets. NVRTC runs without a
GPU; CuPy finds it in the ``nvidia-cuda-nvrtc`` wheel (in the ``dev`` extra) or a CUDA toolkit.
Each entry point the dispatch code asks for must be in the PTX, for sm_80 and sm_90.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from gpuheart import backend, exposure, filters, morphology, segment


def _nvrtc_or_skip():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no libnvrtc: say so instead of failing on a machine without it
        pytest.skip(f"NVRTC is not available ({type(exc).__name__}: {exc}); "
                    "install the dev extra (nvidia-cuda-nvrtc) to check the kernels compile")


def _entries(ptx: str) -> set[str]:
    return set(re.findall(r"\.entry\s+(\w+)", ptx))


ARCHS = ["sm_80", "sm_90"]

# the extern "C" entry points the dispatch in exposure.py / morphology.py builds names for
EXTERN_C = {
    "clahe.cu": [f"int_to_bins_{t}_{b}" for t in ("u8", "u16") for b in ("b8", "b16")]
    + [f"float_to_bins_{t}_{b}" for t in ("f32", "f64") for b in ("b8", "b16")]
    + [f"clahe_tile_maps_{b}" for b in ("b8", "b16")] + [f"clahe_interp_{b}" for b in ("b8", "b16")]
    + ["clahe_final", "clahe_level_counts", "clahe_final_u8"]
    + [f"clahe_bin_tables_{t}_{b}" for t in ("u8", "u16", "f32", "f64") for b in ("b8", "b16")]
    + [f"clahe_{k}_tables_{t}" for k in ("final", "robust") for t in ("f32", "f64")],
    "elementwise.cu": ["robust_scale_f32"] + [f"slice_extremes_{k}_{t}" for k in ("partial", "final")
                                              for t in ("u8", "i8", "u16", "i16", "i32", "f32", "f64")],
    "morphology.cu": ["close_z_line", "close_cube"],
    "threshold.cu": [f"otsu_{k}_{t}" for k in ("hist", "threshold") for t in ("u8", "i8", "u16", "i16")],
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(EXTERN_C))
def test_extern_c_kernels_build_under_nvrtc(name, arch):
    _nvrtc_or_skip()
    entries = _entries(backend.nvrtc_ptx(name, arch=arch)[0])
    wanted = list(EXTERN_C[name])
    if name == "elementwise.cu":
        from gpuheart.exposure import _ZNORM_SUFFIX

        wanted += [f"znorm_asinh_{s}" for s in _ZNORM_SUFFIX.values()]
    if name == "threshold.cu":
        from gpuheart.segment import THRESHOLD_ENTRIES

        wanted += list(THRESHOLD_ENTRIES)
    missing = [k for k in wanted if k not in entries]
    assert not missing, f"{name} under NVRTC for {arch} lacks {missing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_median_instantiations_build_under_nvrtc(arch):
    _nvrtc_or_skip()
    names = sorted({filters._cuda_plan((1, 64, 64), dt, size, hist)[0]
                    for dt in (np.uint8, np.uint16, np.float32) for size in range(3, 32, 2) for hist in (True, False)}
                   | {"median_hist16", "median_hist<unsigned short, 1>"})
    ptx, mapping = backend.nvrtc_ptx("median.cu", tuple(names), arch=arch)
    assert set(mapping) == set(names)
    assert set(mapping.values()) <= _entries(ptx)


# -- what only a device would show: CuPy's own compile options and the launch bounds --------------

def test_nvrtc_ptx_appends_what_cupy_appends(monkeypatch):
    """CuPy adds -ftz=true after the caller's options (the last one wins): ``nvrtc_ptx`` must too, or
    the PTX checked here is not the code a GPU runs."""
    import inspect

    compiler = pytest.importorskip("cupy.cuda.compiler", reason="CuPy (the dev extra) is not installed")

    src = inspect.getsource(compiler._compile_with_cache_cuda)
    for opt in ("-ftz=true",):
        assert (f"'{opt}'" in src or f'"{opt}"' in src) == (opt in backend.CUPY_APPENDED_OPTIONS), opt
    seen = []

    class Program:  # records the options nvrtc_ptx compiles with
        def __init__(self, *a, **k):
            pass

        def compile(self, options):
            seen.append(tuple(options))
            return "", {}

    monkeypatch.setattr(compiler, "_NVRTCProgram", Program)
    backend.nvrtc_ptx("elementwise.cu", options=("-ftz=false",))
    (opts,) = seen
    for opt in backend.CUPY_APPENDED_OPTIONS:  # present, and after the caller's, as CuPy puts them
        assert opt in opts and opts.index("-ftz=false") < opts.index(opt), opts


# float32 operations that flush subnormals under -ftz=true: the parity the kernels promise keeps them
_FTZ_F32 = re.compile(r"\b(?:add|sub|mul|div|fma)(?:\.rn)?\.ftz\.f32\b|\bcvt(?:\.rn)?\.ftz\.f(?:32\.f64|64\.f32)\b"
                      r"|\b(?:min|max)\.ftz\.f32\b")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["clahe.cu", "elementwise.cu", "median.cu", "morphology.cu", "threshold.cu"])
def test_float32_arithmetic_keeps_subnormals_under_cupys_ftz(name, arch):
    _nvrtc_or_skip()
    names = ()
    if name == "median.cu":
        names = tuple(sorted({filters._cuda_plan((1, 64, 64), dt, size, hist)[0] for dt in (np.uint8, np.uint16, np.float32)
                              for size in range(3, 32, 2) for hist in (True, False)}))
    ptx = backend.nvrtc_ptx(name, names, arch=arch)[0]
    bad = sorted(set(_FTZ_F32.findall(ptx)))
    assert not bad, f"{name}: float32 ops that flush subnormals under CuPy's -ftz=true: {bad}"


def _max_threads(ptx: str) -> dict[str, int]:
    """Entry -> the most threads per block its __launch_bounds__ allows (entries without none)."""
    out = {}
    for entry, body in re.findall(r"\.entry\s+(\w+)(.*?)\{", ptx, re.S):
        m = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", body)
        if m:
            out[entry] = int(m[1]) * int(m[2]) * int(m[3])
    return out


def test_median_blocks_fit_the_launch_bounds():
    """A block larger than a kernel's __launch_bounds__ fails to launch on a device ("too many
    resources requested"); the emulator ignores the attribute, so the plan is checked against the PTX."""
    _nvrtc_or_skip()
    plans = {}
    for dt in (np.uint8, np.uint16, np.float32):
        for size in range(3, 32, 2):
            for hist in (True, False):
                for h16 in (True, False):  # median_hist16, and the median_hist the benchmarks time beside it
                    filters._CUDA_H16, saved = h16, filters._CUDA_H16
                    try:
                        name, _, block, _ = filters._cuda_plan((1, 64, 64), dt, size, hist)
                    finally:
                        filters._CUDA_H16 = saved
                    plans[name] = block
    ptx, mapping = backend.nvrtc_ptx("median.cu", tuple(sorted(plans)))
    bounds = _max_threads(ptx)
    for name, block in plans.items():
        assert mapping[name] in bounds, f"{name} has no __launch_bounds__"
        assert int(np.prod(block)) <= bounds[mapping[name]], (name, block, bounds[mapping[name]])


def test_kernel_source_inlines_local_headers():
    """NVRTC gets no include path and CuPy's cache key is the source: headers must be inlined."""
    for cu in ("clahe.cu", "elementwise.cu", "threshold.cu"):
        text = backend.kernel_source(cu)
        assert '#include "' not in text and "gh_fsub" in text and "#pragma once" not in text


# -- nvcc: the same sources as files (the local header included by path), every dispatch entry in the PTX ----

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot check that the kernels compile")
NVCC_ENTRIES = {**exposure.KERNEL_ENTRIES, "morphology.cu": morphology.MORPHOLOGY_ENTRIES,
                "threshold.cu": segment.THRESHOLD_ENTRIES}


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(NVCC_ENTRIES))
def test_kernel_compiles_with_nvcc(name, arch, tmp_path):
    subprocess.run([NVCC, "-std=c++17", f"-arch={arch}", "--cubin", "-o", str(tmp_path / "k.cubin"),
                    str(backend.kernel_dir() / name)], check=True, capture_output=True, timeout=300)
    assert (tmp_path / "k.cubin").stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("name", sorted(NVCC_ENTRIES))
def test_nvcc_ptx_has_the_entry_points_the_dispatch_loads(name, tmp_path):
    ptx = tmp_path / "k.ptx"
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_80", "--ptx", "-o", str(ptx), str(backend.kernel_dir() / name)],
                   check=True, capture_output=True, timeout=300)
    assert set(NVCC_ENTRIES[name]) <= _entries(ptx.read_text())
