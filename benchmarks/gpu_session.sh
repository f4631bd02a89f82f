#!/usr/bin/env bash
# Every device check in one call, for a session that is lent a GPU (device time is short: 15 minutes, one
# command at most 10). From this machine, first (the GPU machine has no package registry and lacks these):
#   ../shared/tools/gpu-carry tomli-w fast-simplification
#   optional, for step 5 (dask-cuda): python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-carry/dask-wheels \
#     dask==2026.8.0 distributed==2026.8.0 dask-cuda partd locket tblib zict tornado
# then: run(carry=[".gpu-carry"], timeout_s=580, command="bash benchmarks/gpu_session.sh")
# It writes at most 8 files to $OUT (the device tool's folder that comes back; benchmarks/results/gpu-session
# when unset): device.txt, gpu-tests.log, the benchmark JSON + markdown named after the GPU, unet.json,
# chain-profile.json, pipeline.json, session.log. Each step has its own time limit so one slow step cannot eat
# the others, and
# the last steps get what is left of BUDGET seconds; copy the JSON into benchmarks/results/ and regenerate
# docs/benchmarks.md (python benchmarks/summarize.py).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONPATH=. GPUHEART_DATA=${GPUHEART_DATA:-.gpu-carry/data} GPUHEART_BENCH_RESULTS="$OUT" PYTHONUNBUFFERED=1
PY=${PY:-python3}
# STEPS picks steps by name (default all): tests baselines unet profile pipeline dask
STEPS=${STEPS:-"tests baselines unet profile pipeline dask"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
worst=0   # the script's exit code: the worst step's, so a failed step is not a green session
step() { local limit=$1; shift; echo "== $(date -u +%T) t=${SECONDS}s [$limit s] $*"; timeout "$limit" "$@"
         local rc=$?; echo "== exit $rc t=${SECONDS}s"; (( rc > worst )) && worst=$rc; return $rc; }
left() { echo $(( BUDGET - SECONDS - ${1:-0} )); }   # seconds of the budget left, less a reserve

if ls .gpu-carry/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps .gpu-carry/wheels/*.whl 2>&1 | grep -v -i "warning" | tail -3
fi
{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc; $PY -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"; } > "$OUT/device.txt" 2>&1
# fail fast on what would break every later step (a missing carried wheel, numba vs NumPy)
$PY -c "import tomli_w, zarr, numba, numpy, cupy, torch, trimesh; import gpuheart.filters, gpuheart.exposure, gpuheart.pipeline
print('preflight ok: numba', numba.__version__, 'numpy', numpy.__version__)" >> "$OUT/device.txt" 2>&1 \
  || { echo "PREFLIGHT FAILED"; cat "$OUT/device.txt"; exit 1; }
cat "$OUT/device.txt"
# every step needs the GPU: without one, say so and stop (the steps would skip, or fail with tracebacks)
$PY -c "import cupy, sys; sys.exit(0 if cupy.is_available() else 1)" 2>/dev/null \
  || { echo "gpu_session.sh: no CUDA device (cupy.is_available() is False); run it on a machine with a GPU"; exit 2; }

# 1. parity and device tests: every kernel equal to its CPU reference, OOM retry under a capped pool, DLPack.
#    Spread over 6 processes when pytest-xdist is there (the CPU references dominate); 2 threads each. The
#    U-Net runs uncompiled here (six processes compiling at once would crowd the CPUs) except in the test of
#    torch.compile itself, which asks for it.
xdist=(); $PY -c "import xdist" 2>/dev/null && xdist=(-n 6 --dist load)
want tests && step 150 env OMP_NUM_THREADS=2 GPUHEART_UNET_COMPILE=0 $PY -m pytest -q -rfEs -m gpu -p no:cacheprovider "${xdist[@]}" tests/ \
  > "$OUT/gpu-tests.log" 2>&1
want tests && tail -15 "$OUT/gpu-tests.log"
# 2. kernels against cupyx / cuCIM on 2048x2048 slices and 16-slice slabs, closings against cupyx on a
#    48x1024x1024 mask (writes <gpu>-<date>.json/.md into $OUT after every entry: 29 entries took over 80 s on
#    an H200 on 2026-11-27, cuCIM's CLAHE and preprocessing ~0.65 s a call, so it has 150 s)
want baselines && step 150 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_gpu_baselines.py \
  benchmarks/bench_morphology.py::test_closings_gpu --benchmark-only \
  --benchmark-min-rounds=5 --benchmark-max-time=0.25
# 3. U-Net inference tiles/s (bf16, automatic batch size, compiled and not, and a sweep of batch sizes; ~40 s)
# (the newest *-unet.json is this run's: results of other GPUs are committed beside it)
want unet && step 90 $PY benchmarks/bench_unet.py && cp "$(ls -t "$OUT"/*-unet.json | head -1)" "$OUT/unet.json"
# 3b. where the per-slice chain's GPU time goes, by step and by kernel (diagnostics, not a benchmark of record)
want profile && step 60 $PY benchmarks/gpu_profile.py "$OUT/chain-profile.json" --only chain
# 4. end to end: 3 channels of 2048x2048 slices, TIFF in to mesh and tree graph out, per stage, with the
#    full-scan projection and the device memory peaks (keeps 40 s for step 5). It needs ~150 s: writing the
#    scan ~40 s, the warm-up ~25 s (compiling the U-Net), the run ~70 s (H200, 2026-11-27).
want pipeline && step "$(left 40)" $PY benchmarks/bench_pipeline.py --slices 16 --device cuda --mesh --no-tracemalloc \
  --out "$OUT/pipeline.json"
# 5. dask-cuda's LocalCUDACluster against a local GPU run (wheels in .gpu-carry/dask-wheels, if carried)
if want dask && ls .gpu-carry/dask-wheels/*.whl >/dev/null 2>&1 && [ "$(left)" -gt 25 ]; then
  $PY -m pip install -q --no-deps .gpu-carry/dask-wheels/*.whl 2>&1 | grep -v -i "warning" | tail -3
  step "$(left)" $PY -m pytest -q -rfEs -p no:cacheprovider tests/test_distributed_cuda.py
fi
echo "== done $(date -u +%T) t=${SECONDS}s, worst step exit $worst"
exit "$worst"
