#!/usr/bin/env bash
# Issue 10 on a GPU machine that has the Python stack (torch with CUDA, transformers, peft, safetensors,
# gguf, pyyaml, tqdm, matplotlib) but no network and no model weights. Two device calls, back to back on a
# warm machine, because one call carries at most 64 MiB and the SmolLM2 GGUF is 98 MB:
#
#   here:      bash bench/gpu/run.sh split        # .gpu/: the GGUF in two parts + sha256, the Qwen2.5 tokenizer
#   device 1:  carry [.gpu/part0, .gpu/qwen-tokenizer]   command: bash bench/gpu/run.sh stage
#   device 2:  carry [.gpu/part1, .gpu/part1.sha256]     command: bash bench/gpu/run.sh all
#
# Issue 30's second round (configs/studies/gpu/evidence_round2.yaml): the same two calls with `round2` in place of
# `all`; `stage` also installs the wheels that `split` put in .gpu/wheels (this project's transformers, peft and gguf)
# and runs the round2 pipeline on a tiny random model on the GPU (`round2-smoke` does that on this CPU):
#
#   device 1:  carry [.gpu/part0, .gpu/wheels]           command: bash bench/gpu/run.sh stage
#   device 2:  carry [.gpu/part1, .gpu/part1.sha256]     command: TOTAL_S=480 JOBS=12 bash bench/gpu/run.sh round2
#
# A call carries at most 64 MiB with the tracked tree (28 MB, most of it docs/evidence and docs/wire): session 15 took those
# two folders out of the index for its calls (git rm --cached + .git/info/exclude, undone after) so that part0 + wheels fit.
# SPEC=configs/studies/gpu/evidence_validation.yaml runs the CPU study's other cells the same way, for their validation.
# `round2` trains and tests (sweep, stopped after TOTAL_S - VALID_S - 40 s), evaluates every finished run on 300
# validation problems (stopped VALID_S later), and returns one tarball of reports and per-run results (no adapters).
#
# `all` joins and checks the weights, runs the evidence study (configs/studies/gpu/evidence.yaml, stopped
# after $EVIDENCE_S seconds: the sweep resumes where it stopped on a later call) and the Table 2 overhead
# sweep on a random Qwen2.5-0.5B-shaped model (configs/studies/gpu/table2_random.yaml), then issue 29's memory
# points (bench/bench_memory.py --device cuda: torch.cuda.max_memory_allocated per side, with and without chunks,
# stopped after $MEMORY_S seconds), then copies reports and per-run results (no adapters) to $OUT. `smoke` runs
# the same pipeline here on the CPU at tiny size.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEP=${1:-all}
G=.gpu
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export LESFT_CACHE=$PWD/$G/cache
if [ -d $G/site ]; then export PYTHONPATH=$PWD/$G/site:$PYTHONPATH; fi   # the wheels `stage` installed
EVIDENCE_S=${EVIDENCE_S:-270}
MEMORY_S=${MEMORY_S:-120}
TABLE2_S=${TABLE2_S:-150}
JOBS=${JOBS:-8}
OUT=${OUT:-$G/out}

collect() {  # collect SWEEP_DIR NAME: reports + small per-run files into $OUT/NAME
  local src=$1 dst=$OUT/$2
  mkdir -p "$dst"
  $PY -m lesft.cli report "$src" --baseline splitlora >/dev/null 2>&1 || $PY -m lesft.cli report "$src" || true
  cp "$src"/report.md "$src"/runs.csv "$src"/sweep.json "$dst"/ 2>/dev/null || true
  cp -r "$src"/figures "$dst"/ 2>/dev/null || true
  for run in "$src"/*/; do
    local r; r=$(basename "$run"); if [ "$r" = figures ]; then continue; fi
    mkdir -p "$dst/$r"
    for f in summary.json metrics.jsonl config.yaml train_keys.json error.json eval/eval.json eval/predictions.jsonl; do
      if [ -f "$run/$f" ]; then install -D -m 644 "$run/$f" "$dst/$r/$f"; fi
    done
  done
}

join_weights() {  # the two parts carried in two calls -> .gpu/smollm2.gguf, checked against the checksum `split` wrote
  test -s $G/part1.sha256 || { echo "no $G/part1.sha256: carry it with $G/part1"; exit 1; }
  if [ -f $G/part1 ]; then cat $G/part0 $G/part1 > $G/smollm2.gguf; fi
  test "$(sha256sum < $G/smollm2.gguf | cut -d' ' -f1)" = "$(cat $G/part1.sha256)" \
    || { echo "SmolLM2 GGUF: checksum mismatch (re-run split here and both device calls)"; exit 1; }
  rm -f $G/part0 $G/part1
}

sweep() {  # sweep SPEC DIR SECONDS JOBS: stop after SECONDS (resumable), never fail the script
  timeout --signal=INT --kill-after=20 "$3" $PY -m lesft.cli sweep "$1" --out "$2" --jobs "$4" || echo "sweep $1 stopped (rc $?)"
}

case "$STEP" in
  split)
    gguf=$($PY -c 'from lesft.model.load import smollm2_gguf; print(smollm2_gguf())')
    mkdir -p $G/qwen-tokenizer
    head -c 44000000 "$gguf" > $G/part0
    tail -c +44000001 "$gguf" > $G/part1
    sha256sum < "$gguf" | cut -d' ' -f1 > $G/part0.sha256
    cp "$G/part0.sha256" "$G/part1.sha256"
    cp ../shared/models/qwen2.5-tokenizer/* $G/qwen-tokenizer/   # transport only: .gpu/ is ignored, never committed
    mkdir -p $G/wheels   # this project's versions of the pure-Python packages whose APIs it depends on
    $PY -m pip download -q --no-deps --only-binary=:all: -d $G/wheels \
      $($PY -m pip list --format=freeze 2>/dev/null | grep -E '^(transformers|peft|gguf)==')
    ls -l $G $G/wheels ;;
  stage)
    test -s $G/part0 && echo "part0 staged ($(stat -c %s $G/part0) bytes)"
    if ls $G/wheels/*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $G/site $G/wheels/*.whl
      export PYTHONPATH=$PWD/$G/site:$PYTHONPATH
    fi
    $PY -c 'import torch, transformers, peft, gguf; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    timeout 150 bash "$0" round2-smoke || echo "round2-smoke failed (rc $?)" ;;
  round2|round2-smoke)
    TOTAL_S=${TOTAL_S:-480}; VALID_S=${VALID_S:-90}; t0=$(date +%s)
    spec=${SPEC:-configs/studies/gpu/evidence_round2.yaml}; runs=runs/gpu/$(basename "$spec" .yaml); model=smollm2-135m; limit=300
    if [ "$STEP" = round2-smoke ]; then  # the same pipeline at tiny size: a random 4-layer model, 2 runs, 4 questions
      $PY - <<'PYEOF'
import pathlib, sys, yaml
sys.path.insert(0, "tests")
from conftest import make_model, make_tokenizer
out = pathlib.Path(".gpu/tiny-char"); make_model().save_pretrained(out); make_tokenizer().save_pretrained(out)
spec = yaml.safe_load(open("configs/studies/gpu/evidence_round2.yaml"))
spec["base"].update(model=str(out), samples=8, max_length=96, device="auto", chat_template=False)
spec["runs"] = [{"method": ["splitlora", "lesft"], "seed": 0}, {"method": "splitlora", "loss": "rho1", "seed": 0}]
spec["eval"].update(limit=4, max_new_tokens=8, batch_size=4, device="auto")
pathlib.Path(".gpu/smoke_round2.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
PYEOF
      spec=$G/smoke_round2.yaml; runs=$G/smoke_runs/round2; model=$G/tiny-char; limit=4; JOBS=2
    else
      join_weights
      export LESFT_SMOLLM2_GGUF=$PWD/$G/smollm2.gguf
      $PY -c 'from lesft.model.load import load_model; load_model("smollm2-135m")' >/dev/null  # convert once, not per job
      nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    fi
    sweep "$spec" "$runs" $((TOTAL_S - VALID_S - 40 - ($(date +%s) - t0))) "$JOBS"
    t1=$(date +%s)
    # in the spec's order (seed by seed, baselines first), so that a stopped validation still holds whole pairs
    $PY -c 'import sys; from lesft.sweep.spec import expand, load_spec; print(*(n for n, _ in expand(load_spec(sys.argv[1]))), sep="\n")' \
      "$spec" | while read -r name; do if [ -d "$runs/$name/adapter" ]; then echo "$runs/$name"; fi; done | timeout --signal=INT --kill-after=10 "$VALID_S" \
      xargs -r -P "$JOBS" -I{} sh -c "test -f {}/eval-validation/eval.json || { $PY -m lesft.cli eval --run {} \
        --split validation --limit $limit --seed 0 --batch_size 150 --max_new_tokens 128 --device auto \
        --progress false --out {}/eval-validation.part >{}/validation.log 2>&1 && mv {}/eval-validation.part {}/eval-validation; }" \
      || echo "validation stopped (rc $?)"
    t2=$(date +%s)
    mkdir -p "$OUT"
    $PY -m lesft.cli report "$runs" --baseline splitlora > "$runs/report.txt" 2>&1 || true
    (cd "$runs" && find . \( -name summary.json -o -name metrics.jsonl -o -name config.yaml -o -name train_keys.json \
      -o -name error.json -o -name log.txt -o -name validation.log -o -path '*eval*/eval.json' \
      -o -path '*eval*/predictions.jsonl' -o -name 'report*' -o -name sweep.json -o -name runs.csv \) -print0 \
      | tar czf - --null -T -) > "$OUT/round2.tar.gz"
    echo "sweep $((t1 - t0)) s, validation $((t2 - t1)) s, $(ls -d "$runs"/*/summary.json 2>/dev/null | wc -l) runs trained, $(ls "$runs"/*/eval-validation/eval.json 2>/dev/null | wc -l) validated -> $OUT/round2.tar.gz ($(stat -c %s "$OUT/round2.tar.gz") bytes)" | tee "$OUT/timing.txt" ;;
  all|smoke)
    if [ "$STEP" = smoke ]; then  # the same pipeline on this CPU: tiny random model, tiny versions of both specs
      $PY bench/random_model.py --shape tiny-llama --tokenizer ../shared/models/qwen2.5-tokenizer --out $G/tiny >/dev/null
      $PY - <<'PYEOF'
import yaml, pathlib
for name, keep in (("evidence", ["base", "lesft", "splitlora"]), ("table2_random", ["splitlora", "lesft"])):
    spec = yaml.safe_load(open(f"configs/studies/gpu/{name}.yaml"))
    spec["base"].update(model=".gpu/tiny", device="cpu", dtype="fp32", samples=8, max_length=128,
                        **({"epochs": 1} if "epochs" in spec["base"] else {"rounds": 2}))
    spec["grid"]["method"] = keep
    if "seed" in spec["grid"]:
        spec["grid"]["seed"] = [0]
    spec["runs"] = spec.get("runs", [])[:1]
    if "eval" in spec:
        spec["eval"].update(limit=4, max_new_tokens=8, batch_size=4)
    pathlib.Path(f".gpu/smoke_{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
PYEOF
      ev_spec=$G/smoke_evidence.yaml; t2_spec=$G/smoke_table2_random.yaml; JOBS=2; runs=$G/smoke_runs
      memory_args=(--device cpu --model $G/tiny --clients 2 4 --skip-qwen)
    else
      join_weights
      export LESFT_SMOLLM2_GGUF=$PWD/$G/smollm2.gguf
      $PY bench/random_model.py --shape qwen2.5-0.5b --tokenizer $G/qwen-tokenizer --out $G/qwen2.5-0.5b-random
      ev_spec=configs/studies/gpu/evidence.yaml; t2_spec=configs/studies/gpu/table2_random.yaml; runs=runs/gpu
      memory_args=(--device cuda --qwen-tokenizer $G/qwen-tokenizer)
      nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    fi
    t0=$(date +%s)
    sweep "$ev_spec" "$runs/evidence" "$EVIDENCE_S" "$JOBS"
    t1=$(date +%s)
    sweep "$t2_spec" "$runs/table2" "$TABLE2_S" 1
    t2=$(date +%s)
    mkdir -p "$OUT"
    timeout --signal=INT --kill-after=20 "$MEMORY_S" $PY bench/bench_memory.py "${memory_args[@]}" \
      --json "$OUT/memory.json" > "$OUT/memory.txt" 2>&1 || echo "memory points stopped (rc $?)"
    collect "$runs/evidence" evidence
    collect "$runs/table2" table2
    echo "evidence $((t1 - t0)) s, table2 $((t2 - t1)) s, memory $(($(date +%s) - t2)) s -> $OUT" | tee "$OUT/timing.txt" ;;
  *) echo "usage: bench/gpu/run.sh split|stage|all|smoke|round2|round2-smoke"; exit 2 ;;
esac
