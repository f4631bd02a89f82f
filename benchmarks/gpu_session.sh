#!/usr/bin/env bash
# Every device check in one call, for a session that is lent a GPU (device time is short: 15 minutes, one
# command at most 10). From this machine, first (the GPU machine has no package registry and lacks these):
#   ../shared/tools/gpu-carry tomli-w fast-simplification
# then: run(carry=[".gpu-carry"], timeout_s=580, command="bash benchmarks/gpu_session.sh")
# It writes at most 8 files to $OUT (the device tool's folder that comes back; benchmarks/results/gpu-session
# when unset): device.txt, gpu-tests.log, the benchmark JSON + markdown named after the GPU, unet.json,
# pipeline.json, session.log. Each step has its own time limit so one slow step cannot eat the others; copy
# the JSON into benchmarks/results/ and regenerate docs/benchmarks.md (python benchmarks/summarize.py).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONPATH=. GPUHEART_DATA=${GPUHEART_DATA:-.gpu-carry/data} GPUHEART_BENCH_RESULTS="$OUT"
PY=${PY:-python3}
step() { local limit=$1; shift; echo "== $(date -u +%T) [$limit s] $*"; timeout "$limit" "$@"; local rc=$?
         echo "== exit $rc"; return $rc; }

if ls .gpu-carry/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps .gpu-carry/wheels/*.whl 2>&1 | grep -v -i "warning" | tail -3
fi
{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"; } > "$OUT/device.txt" 2>&1
# fail fast on what would break every later step (a missing carried wheel, numba vs NumPy)
$PY -c "import tomli_w, zarr, numba, numpy, cupy, torch, trimesh; import gpuheart.filters, gpuheart.exposure, gpuheart.pipeline
print('preflight ok: numba', numba.__version__, 'numpy', numpy.__version__)" >> "$OUT/device.txt" 2>&1 \
  || { echo "PREFLIGHT FAILED"; cat "$OUT/device.txt"; exit 1; }
cat "$OUT/device.txt"

# 1. parity and device tests: every kernel equal to its CPU reference, OOM retry under a capped pool, DLPack
step 220 $PY -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu-tests.log" 2>&1
tail -5 "$OUT/gpu-tests.log"
# 2. kernels against cupyx / cuCIM on 2048x2048 slices, closings against cupyx on a 48x1024x1024 mask
#    (writes <gpu>-<date>.json/.md into $OUT)
step 100 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_gpu_baselines.py \
  benchmarks/bench_morphology.py::test_closings_gpu --benchmark-only \
  --benchmark-min-rounds=5 --benchmark-max-time=0.5
# 3. U-Net inference tiles/s (bf16, automatic batch size)
step 90 $PY benchmarks/bench_unet.py && cp benchmarks/results/cuda-unet.json "$OUT/unet.json"
# 4. end to end: 3 channels of 2048x2048 slices, TIFF in to mesh out, per stage, with the full-scan projection
step 150 $PY benchmarks/bench_pipeline.py --slices 32 --device cuda --mesh --no-tracemalloc --out "$OUT/pipeline.json"
echo "== done $(date -u +%T)"
