#!/usr/bin/env bash
# Keep the study's finished work in the repository, and bring it back on a fresh machine.
#   bash docs/evidence/keep.sh save [SWEEP_DIR]      # finished runs' small files -> docs/evidence/results/,
#                                                    # the report -> report_partial.md, its figures -> figures/
#   bash docs/evidence/keep.sh restore [SWEEP_DIR]   # docs/evidence/results/* -> SWEEP_DIR, so that
#                                                    # `lesft sweep` counts those runs as done and skips them
# A run's directory under runs/ is not tracked (adapters, checkpoints); what is kept is what the report reads:
# the configs, metrics, summary, training-row hashes and the evaluation with its predictions.
set -euo pipefail
cmd=${1:?usage: keep.sh save|restore [SWEEP_DIR]}
dir=${2:-runs/evidence}
keep=docs/evidence/results
files=(config.input.yaml config.yaml metrics.jsonl summary.json train_keys.json eval/eval.json eval/predictions.jsonl
       eval-validation/eval.json eval-validation/predictions.jsonl)
case "$cmd" in
  save)
    for run in "$dir"/*/; do
      run=$(basename "$run")
      [ -f "$dir/$run/eval/eval.json" ] || continue   # not finished: nothing to keep yet
      for f in "${files[@]}"; do
        [ -f "$dir/$run/$f" ] || continue
        mkdir -p "$keep/$run/$(dirname "$f")"
        cp "$dir/$run/$f" "$keep/$run/$f"
      done
    done
    [ -f "$dir/report.md" ] && cp "$dir/report.md" docs/evidence/report_partial.md
    [ -d "$dir/figures" ] && cp "$dir"/figures/*.png docs/evidence/figures/
    echo "kept $(ls "$keep" | wc -l) finished runs in $keep" ;;
  restore)
    mkdir -p "$dir"
    for run in "$keep"/*/; do
      run=$(basename "$run")
      [ -e "$dir/$run" ] && continue                 # never overwrite a run directory that is there
      cp -r "$keep/$run" "$dir/$run"
    done
    echo "restored $(ls "$keep" | wc -l) finished runs into $dir" ;;
  *) echo "keep.sh: unknown command '$cmd' (save or restore)" >&2; exit 2 ;;
esac
