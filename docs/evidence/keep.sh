#!/usr/bin/env bash
# Keep the study's finished work in the repository, and bring it back on a fresh machine.
#   bash docs/evidence/keep.sh save [SWEEP_DIR]      # finished runs' small files -> docs/evidence/results/,
#                                                    # the report -> report_partial.md, its figures -> figures/
#   bash docs/evidence/keep.sh restore [SWEEP_DIR]   # docs/evidence/results/* -> SWEEP_DIR, so that
#                                                    # `lesft sweep` counts those runs as done and skips them
#   bash docs/evidence/keep.sh adopt RETRAIN_DIR     # the validation of runs trained again (issue 30 part 4:
#                                                    # configs/studies/cpu/evidence_validation.yaml) -> the kept
#                                                    # run's eval-validation/ where the retrained run's 500 test
#                                                    # completions equal the kept run's, every one of them; else
#                                                    # (it did not reproduce to the letter) the whole run ->
#                                                    # results-again/, a twin like a GPU run, never mixed with
#                                                    # the kept one
# A run's directory under runs/ is not tracked (adapters, checkpoints); what is kept is what the report reads:
# the configs, metrics, summary, training-row hashes and the evaluation with its predictions.
set -euo pipefail
source "$(dirname "$0")/../keep_runs.sh"
cmd=${1:?usage: keep.sh save|restore [SWEEP_DIR]}
dir=${2:-runs/evidence}
keep=docs/evidence/results
files=(config.input.yaml config.yaml metrics.jsonl summary.json train_keys.json eval/eval.json eval/predictions.jsonl
       eval-validation/eval.json eval-validation/predictions.jsonl)
case "$cmd" in
  save)
    n=$(keep_finished "$dir" "$keep" '*' "${files[@]}")
    [ -f "$dir/report.md" ] && cp "$dir/report.md" docs/evidence/report_partial.md
    [ -d "$dir/figures" ] && cp "$dir"/figures/*.png docs/evidence/figures/
    echo "kept $n finished runs of $dir in $keep" ;;
  restore)
    n=$(restore_kept "$keep" "$dir")
    echo "restored into $dir those of the $n kept runs in $keep not there already" ;;
  adopt)
    [ -n "${2:-}" ] || { echo "usage: keep.sh adopt RETRAIN_DIR" >&2; exit 2; }
    python3 - "$dir" "$keep" "${files[@]}" <<'PY'
import json, shutil, sys
from pathlib import Path

src, keep = Path(sys.argv[1]), Path(sys.argv[2])
again = keep.parent / "results-again"
small = sys.argv[3:]  # the files `save` keeps
by_keys = {frozenset(d.name.split("__")): d for d in keep.iterdir() if d.is_dir()}  # grid and runs name keys in other orders
answers = lambda f: [(r["id"], r["completion"]) for r in map(json.loads, f.open())]
for run in sorted(d for d in src.iterdir() if (d / "eval-validation" / "predictions.jsonl").is_file()):
    kept = by_keys.get(frozenset(run.name.split("__")))
    if kept is None or not (kept / "eval" / "predictions.jsonl").is_file():
        print(f"{run.name}: no kept run with these keys; not adopted")
    elif (kept / "eval-validation" / "predictions.jsonl").is_file():
        print(f"{run.name}: {kept.name} is validated already")
    elif (a := answers(run / "eval" / "predictions.jsonl")) != (b := answers(kept / "eval" / "predictions.jsonl")):
        for f in small:
            (again / kept.name / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / f, again / kept.name / f)
        n = sum(x != y for x, y in zip(a, b))
        print(f"{run.name}: {n} of its {len(a)} test completions differ from {kept.name}'s "
              f"(not reproduced to the letter): kept as a twin in {again / kept.name}, not adopted")
    else:
        (kept / "eval-validation").mkdir()
        for f in ("eval.json", "predictions.jsonl"):
            shutil.copy(run / "eval-validation" / f, kept / "eval-validation" / f)
        print(f"{run.name}: adopted into {kept.name} (its 500 test completions equal the kept run's)")
PY
    ;;
  *) echo "keep.sh: unknown command '$cmd' (save, restore or adopt)" >&2; exit 2 ;;
esac
