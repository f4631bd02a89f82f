#!/usr/bin/env bash
# Leave-one-stack-out training on a lent GPU. Each recipe of RECIPES ("NAME:ARGS", ARGS being
# benchmarks/accuracy.py flags with commas for spaces) runs its five folds one after another in a background
# job, the recipes side by side; give each --workers N so tile drawing and augmentation (CPU) keep the GPU fed.
#   run(carry=[".gpu-carry"], command="RECIPES='w16:--workers,7' LIMIT=300 bash benchmarks/gpu_accuracy.sh")
# A fold's result is written as soon as it is scored ($OUT/acc-NAME-STACK.json), so folds finished before
# LIMIT seconds come back even if the others do not; $OUT/acc-logs.txt has every fold's output and epoch log.
# Merge with: python benchmarks/accuracy.py --merge OUT/acc-NAME-*.json --out benchmarks/results/....json
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-accuracy}
LIMIT=${LIMIT:-300}                      # seconds for everything
mkdir -p "$OUT"
export PYTHONPATH=. GPUHEART_DATA=${GPUHEART_DATA:-.gpu-carry/data} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export GPUHEART_UNET_COMPILE=0           # small held-out stacks: compiling would not pay back
PY=${PY:-python3}
if ls .gpu-carry/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps .gpu-carry/wheels/*.whl 2>&1 | grep -v -i "warning" | tail -3
fi
STACKS=$(cd "$GPUHEART_DATA" && ls */*_image.tif | sed 's#.*/##; s#_image.tif##')
runs=$(mktemp -d)
deadline=$((SECONDS + LIMIT))
for recipe in ${RECIPES:?give RECIPES}; do
  name=${recipe%%:*}; args=${recipe#*:}; args=${args//,/ }
  (
    for s in $STACKS; do
      left=$((deadline - SECONDS)); [ "$left" -gt 5 ] || break
      echo "== $(date -u +%T) $name $s start, ${left}s left" >> "$runs/$name-$s.log"
      # shellcheck disable=SC2086
      timeout "$left" $PY benchmarks/accuracy.py --only "$s" --threads 2 $args --runs "$runs/$name-$s" \
        --out "$OUT/acc-$name-$s.json" >> "$runs/$name-$s.log" 2>&1
      echo "== $(date -u +%T) $name $s exit $?" >> "$runs/$name-$s.log"
    done
  ) &
done
wait
for f in "$runs"/*.log; do
  echo "=== $f"; cat "$f"
  for d in "${f%.log}"/*/; do cat "$d/log.csv" 2>/dev/null; done
done > "$OUT/acc-logs.txt"
ls "$OUT"
