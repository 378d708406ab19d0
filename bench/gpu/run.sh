#!/usr/bin/env bash
# Issue 10 on a GPU machine that has the Python stack (torch with CUDA, transformers, peft, safetensors,
# gguf, pyyaml, tqdm, matplotlib) but no network and no model weights. Two device calls, back to back on a
# warm machine, because one call carries at most 64 MiB and the SmolLM2 GGUF is 98 MB:
#
#   here:      bash bench/gpu/run.sh split        # .gpu/: the GGUF in two parts + sha256, the Qwen2.5 tokenizer
#   device 1:  carry [.gpu/part0, .gpu/qwen-tokenizer]   command: bash bench/gpu/run.sh stage
#   device 2:  carry [.gpu/part1]                        command: bash bench/gpu/run.sh all
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
EVIDENCE_S=${EVIDENCE_S:-270}
MEMORY_S=${MEMORY_S:-120}
TABLE2_S=${TABLE2_S:-150}
JOBS=${JOBS:-8}
OUT=${OUT:-$G/out}

collect() {  # collect SWEEP_DIR NAME: reports + small per-run files into $OUT/NAME
  local src=$1 dst=$OUT/$2
  mkdir -p "$dst"
  $PY -m lesft.report "$src" --baseline splitlora >/dev/null 2>&1 || $PY -m lesft.report "$src" || true
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

sweep() {  # sweep SPEC DIR SECONDS JOBS: stop after SECONDS (resumable), never fail the script
  timeout --signal=INT --kill-after=20 "$3" $PY -m lesft.sweep "$1" --out "$2" --jobs "$4" || echo "sweep $1 stopped (rc $?)"
}

case "$STEP" in
  split)
    gguf=$($PY -c 'from lesft.model.load import smollm2_gguf; print(smollm2_gguf())')
    mkdir -p $G/qwen-tokenizer
    head -c 50000000 "$gguf" > $G/part0
    tail -c +50000001 "$gguf" > $G/part1
    sha256sum < "$gguf" | cut -d' ' -f1 > $G/part0.sha256
    cp "$G/part0.sha256" "$G/part1.sha256"
    cp ../shared/models/qwen2.5-tokenizer/* $G/qwen-tokenizer/   # transport only: .gpu/ is ignored, never committed
    ls -l $G ;;
  stage)
    test -s $G/part0 && echo "part0 staged ($(stat -c %s $G/part0) bytes)"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true ;;
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
      if [ -f $G/part1 ]; then cat $G/part0 $G/part1 > $G/smollm2.gguf && rm -f $G/part0 $G/part1; fi
      test "$(sha256sum < $G/smollm2.gguf | cut -d' ' -f1)" = "$(cat $G/part1.sha256)" \
        || { echo "SmolLM2 GGUF: checksum mismatch (re-run split here and both device calls)"; exit 1; }
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
  *) echo "usage: bench/gpu/run.sh split|stage|all|smoke"; exit 2 ;;
esac
