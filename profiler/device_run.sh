#!/usr/bin/env bash
# Profiling run on a lent GPU machine (no network): install carried wheels, then
#   device_run.sh smoke   - imports, MPS on/off check, lenet at shares 20/100
#   device_run.sh fp32    - the nine zoo models, fp32, into $OUT/profiles/<slug>/latency.csv
#   device_run.sh one     - time one model's full table (resnet50) into a scratch CSV
#   device_run.sh fp16    - fp16 tables (appended; resumable)
#   device_run.sh pairs   - interference pairs + fit
# Several steps may be given; the CSVs already in profiles/ are copied to $OUT first (resume).
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/profiles/h100"
for f in latency.csv interference_pairs.csv; do
  [ -f "profiles/h100/$f" ] && [ ! -f "$OUT/profiles/h100/$f" ] && cp "profiles/h100/$f" "$OUT/profiles/h100/$f"
done
export CONTROLPLANE_MPS_DIR=/tmp/gpulet-mps
P="python3 -m profiler.cli --device gpu --out $OUT/profiles --no-plots"
for step in "$@"; do
  echo "=== step $step $(date -u +%FT%TZ)"
  case $step in
    smoke)
      nvidia-smi --query-gpu=name,driver_version,compute_mode,mig.mode.current --format=csv
      python3 -c "import torch, torchvision, numpy, pydantic, typer, pynvml; print(torch.__version__, torchvision.__version__, numpy.__version__, torch.cuda.get_device_name(0))" || exit 1
      # MPS refusal without a daemon (expect exit 2), then a run with it.
      python3 -m profiler.cli --device gpu --models lenet --shares 50 --batches 1 --no-start-mps --out /tmp/smoke --no-plots; echo "no-mps rc=$? (expect 2)"
      python3 -m profiler.cli --device gpu --models lenet,resnet50 --shares 20,100 --batches 1,32 --out /tmp/smoke --no-plots --runs 30 || exit 1
      cat /tmp/smoke/h100/latency.csv ;;
    one)
      /usr/bin/time -f "one-model wall %e s" $P --models resnet50 --csv /tmp/one/latency.csv --runs 100 --min-runs 20 --point-budget-s 0.5 --json $OUT/one_resnet50.json 2>&1 | grep -v "^  "
      /usr/bin/time -f "one-model wall %e s" $P --models densenet161 --csv /tmp/one2/latency.csv --runs 100 --min-runs 20 --point-budget-s 0.5 --json $OUT/one_densenet161.json 2>&1 | grep -v "^  " ;;
    fp32) $P --precisions fp32 --runs 100 --min-runs 20 --point-budget-s 0.5 --json $OUT/fp32.json ;;
    fp16) $P --precisions fp16 --no-parallel-start --runs 100 --min-runs 20 --point-budget-s 0.5 --json $OUT/fp16.json ;;
    pairs) $P --skip-latency --interference --pairs-per-split ${PAIRS:-40} --pair-duration-s ${PAIR_S:-0.4} --json $OUT/pairs.json ;;
  esac
done
echo "=== end $(date -u +%FT%TZ)"
