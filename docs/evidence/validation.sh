#!/usr/bin/env bash
# The validation check of issue 10: adapters evaluated on 300 problems of the synthetic *validation* split
# (disjoint from the test split and from every training row at the level of the equations), then reported
# paired with splitlora. Settings are picked here, never on the test set.
#   bash docs/evidence/validation.sh [SWEEP_DIR] [RUN ...]   # the runs named (default: the seed-0 trio of issue 10)
#   bash docs/evidence/validation.sh [SWEEP_DIR] --all       # every trained run that still has its adapter
# Only runs trained on this machine have an adapter (docs/evidence/results keeps no adapters): `keep.sh save`
# keeps each run's eval-validation/ beside its test evaluation. New sweeps need none of this: a spec's
# `validation:` section evaluates each run on the validation split as it finishes (configs/README.md).
set -euo pipefail
dir=${1:-runs/evidence}; shift || true
runs=("$@")
if [ "${runs[0]:-}" = "--all" ]; then
  runs=()
  for d in "$dir"/*/; do
    [ -f "$d/adapter/adapter_config.json" ] && [ -f "$d/summary.json" ] && runs+=("$(basename "$d")")
  done
fi
[ ${#runs[@]} -gt 0 ] || runs=("seed=0__method=splitlora" "seed=0__method=lesft" "method=lesft__lesft.weighting=uniform-1__seed=0")
lesft=${LESFT:-.venv/bin/lesft}
for r in "${runs[@]}"; do
  [ -f "$dir/$r/eval-validation/eval.json" ] && { echo "done: $r"; continue; }
  echo "evaluating $r on the validation split"; t0=$(date +%s)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$lesft" eval --run "$dir/$r" --split validation --limit 300 --seed 0 \
    --batch_size 32 --max_new_tokens 128 --progress false --out "$dir/$r/eval-validation.part"
  mv "$dir/$r/eval-validation.part" "$dir/$r/eval-validation"
  echo "$r: $(( $(date +%s) - t0 )) s"
done
"$lesft" report "$dir" --baseline splitlora --eval eval-validation ||
  echo "validation.sh: no report with splitlora as the baseline (is a plain splitlora run among those evaluated?)"
