#!/usr/bin/env bash
# Leave-one-stack-out training on a lent GPU: every (recipe, held-out stack) fold as its own process, all side
# by side (tile sampling and augmentation run on the CPU, one core a fold; the GPU trains them all). Recipes
# are "NAME:ARGS" entries of RECIPES, ARGS being benchmarks/accuracy.py flags with commas for spaces.
#   run(carry=[".gpu-carry"], command="RECIPES='w16:--width,16' LIMIT=300 bash benchmarks/gpu_accuracy.sh")
# Writes $OUT/acc-NAME-STACK.json per fold and $OUT/acc-logs.txt (each fold's stdout and per-epoch log);
# merge with: python benchmarks/accuracy.py --merge OUT/acc-NAME-*.json --out benchmarks/results/....json
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-accuracy}
LIMIT=${LIMIT:-300}                      # seconds for every fold (they run at once)
mkdir -p "$OUT"
export PYTHONPATH=. GPUHEART_DATA=${GPUHEART_DATA:-.gpu-carry/data} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export GPUHEART_UNET_COMPILE=0           # small held-out stacks: compiling would not pay back
PY=${PY:-python3}
if ls .gpu-carry/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps .gpu-carry/wheels/*.whl 2>&1 | grep -v -i "warning" | tail -3
fi
STACKS=$(cd "$GPUHEART_DATA" && ls */*_image.tif | sed 's#.*/##; s#_image.tif##')
runs=$(mktemp -d)
for recipe in ${RECIPES:?give RECIPES}; do
  name=${recipe%%:*}; args=${recipe#*:}; args=${args//,/ }
  for s in $STACKS; do
    # shellcheck disable=SC2086
    timeout "$LIMIT" $PY benchmarks/accuracy.py --only "$s" --threads 1 $args --runs "$runs/$name-$s" \
      --out "$OUT/acc-$name-$s.json" > "$runs/$name-$s.log" 2>&1 &
  done
done
wait
for f in "$runs"/*.log; do
  echo "=== $f"; cat "$f"; cat "${f%.log}/log.csv" 2>/dev/null
  for d in "${f%.log}"/*/; do cat "$d/log.csv" 2>/dev/null; done
done > "$OUT/acc-logs.txt"
ls "$OUT"; nvidia-smi --query-gpu=name --format=csv,noheader
