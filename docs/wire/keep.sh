#!/usr/bin/env bash
# The wire study's finished work kept in the repository (issue 28), and brought back on a fresh machine.
#   bash docs/wire/keep.sh restore [SWEEP_DIR]   # the uncompressed pairs from docs/evidence/results/ (renamed to this
#                                                # spec's run names) and this study's kept runs -> SWEEP_DIR
#   bash docs/wire/keep.sh save [SWEEP_DIR]      # finished compressed runs' small files -> docs/wire/results/
# `lesft sweep` then counts the restored runs as done: their config.input.yaml equals the spec's point.
set -euo pipefail
source "$(dirname "$0")/../keep_runs.sh"
cmd=${1:?usage: keep.sh save|restore [SWEEP_DIR]}
dir=${2:-runs/wire}
keep=docs/wire/results
evidence=docs/evidence/results
files=(config.input.yaml config.yaml metrics.jsonl summary.json train_keys.json eval/eval.json eval/predictions.jsonl)
case "$cmd" in
  restore)
    mkdir -p "$dir"
    for s in 0 1 2; do
      for m in splitlora lesft; do
        src="$evidence/seed=${s}__method=$m" dst="$dir/method=${m}__seed=$s"
        [ -e "$dst" ] || cp -r "$src" "$dst"
      done
    done
    echo "restored the 6 uncompressed pairs and $(restore_kept "$keep" "$dir") kept runs into $dir" ;;
  save)
    n=$(keep_finished "$dir" "$keep" '*wire*' "${files[@]}")   # the pairs are kept in docs/evidence/results
    [ -f "$dir/report.md" ] && cp "$dir/report.md" docs/wire/report.md
    echo "kept $n finished runs in $keep" ;;
  *) echo "keep.sh: unknown command '$cmd' (save or restore)" >&2; exit 2 ;;
esac
