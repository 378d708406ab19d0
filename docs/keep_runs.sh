# The one copy loop of each way a study's finished runs travel between runs/ and the repository; sourced by
# docs/evidence/keep.sh and docs/wire/keep.sh, which say which files and which runs.

# keep_finished SWEEP_DIR KEEP_DIR GLOB FILE...: for each finished run (it has eval/eval.json) in SWEEP_DIR whose
# name matches GLOB, copy those of FILE... it has (paths inside the run) to KEEP_DIR/<run>/; print how many runs.
keep_finished() {
  local dir=$1 keep=$2 glob=$3 n=0 run f
  shift 3
  for run in "$dir"/*/; do
    run=$(basename "$run")
    [[ $run == $glob ]] || continue
    [ -f "$dir/$run/eval/eval.json" ] || continue   # not finished: nothing to keep yet
    for f in "$@"; do
      [ -f "$dir/$run/$f" ] || continue
      mkdir -p "$keep/$run/$(dirname "$f")"
      cp "$dir/$run/$f" "$keep/$run/$f"
    done
    n=$((n + 1))
  done
  echo "$n"
}

# restore_kept KEEP_DIR SWEEP_DIR: copy each kept run into SWEEP_DIR, never over a run directory already there, so
# that `lesft sweep` counts it as done (its config.input.yaml equals the spec's point); print how many are kept.
restore_kept() {
  local keep=$1 dir=$2 n=0 run
  mkdir -p "$dir"
  [ -d "$keep" ] || { echo 0; return; }
  for run in "$keep"/*/; do
    run=$(basename "$run")
    [ -e "$dir/$run" ] || cp -r "$keep/$run" "$dir/$run"
    n=$((n + 1))
  done
  echo "$n"
}
