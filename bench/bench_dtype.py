"""What bf16 autocast buys on this CPU, measured in one run (no timed assertions; always exits 0).

Issue 10 asks what fixed shapes with bf16 buy the study. Whether bf16 helps on a CPU depends on its
matrix units: with AMX (``amx_bf16``) or AVX-512 BF16 torch runs bf16 matmuls natively, without them it
emulates them and is slower than fp32. This script says which units the CPU reports and measures:

  1. training: ``Run.round`` of ``lesft`` and of ``sl`` (1 client, batch 1, grad_accum 1, one synthetic row
     padded to exactly --seq-len tokens), each in fp32 and in bf16 autocast (weights stay fp32), rounds
     interleaved in a rotating order, a disturbed round re-taken; median seconds and bf16/fp32 ratios.
  2. the first round's loss in both dtypes, from the same initialisation on the same batch (how far bf16
     moves the number being optimised);
  3. evaluation: ``lesft.evaluate.generate`` (greedy, KV cache, batches of --gen-batch) on --gen-n synthetic
     problems (the chat template, as the study evaluates them), fp32 and under bf16 autocast, alternating --gen-reps times; questions/s and how many
     completions the two dtypes share. ``lesft eval`` itself runs in fp32 (this measures what bf16 would buy).

Default one torch thread, as each run of the evidence study has (``OMP_NUM_THREADS=1``).

    .venv/bin/python bench/bench_dtype.py [--reps 7] [--seq-len 192] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_split import Rounds, make_run  # noqa: E402  (bench/ is on sys.path when run as a script)
from lesft.config import TrainConfig  # noqa: E402
from lesft.data.prompts import render_prompt  # noqa: E402
from lesft.data.rows import load_rows  # noqa: E402
from lesft.evaluate import DEFAULT_STOP, generate  # noqa: E402
from lesft.model.load import load_model  # noqa: E402
from timing import BUSY, BUSY_NOTE, disturbed, interleaved, med, parse_with_timing_args, timed  # noqa: E402

DTYPES = ("fp32", "bf16")


def cpu_info() -> tuple[str, list[str]]:
    """This CPU's model name and the bf16/int8 matrix-unit flags it reports in /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "?", []
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:40]) if v}
    units = {"amx_bf16", "amx_tile", "amx_int8", "avx512_bf16"}
    return field.get("model name", "?"), sorted(f for f in field.get("flags", "").split() if f in units)


def time_generation(args: argparse.Namespace) -> dict:
    """Seconds of ``generate`` on the same prompts in fp32 and under bf16 autocast (alternating), with the
    foreign CPU during each, and how many completions the two dtypes share. Empty when --gen-n is 0."""
    if args.gen_n <= 0:
        return {}
    spec = TrainConfig().synthetic
    model, tok = load_model(args.model)
    model.eval()
    prompts = [render_prompt(tok, r["prompt"], True) for r in load_rows("synthetic", args.gen_n, args.seed + 1, spec)]
    out: dict = {d: [] for d in DTYPES} | {d + "_foreign": [] for d in DTYPES}
    texts = {}
    generate(model, tok, prompts[:2], 4, 2)  # warm-up (untimed)
    for _ in range(args.gen_reps):
        for d in DTYPES:
            def run(d: str = d) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=d == "bf16"):
                    texts[d] = generate(model, tok, prompts, args.gen_tokens, args.gen_batch, list(DEFAULT_STOP))

            dt, fo, _, _ = timed(run, 0, quiet_wait=args.quiet_wait)
            out[d].append(dt)
            out[d + "_foreign"].append(fo)
    out["same"] = sum(a == b for a, b in zip(texts["fp32"], texts["bf16"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=192, help="tokens per sequence (exact, after padding)")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds per method and dtype (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per method and dtype first")
    ap.add_argument("--methods", nargs="+", default=["lesft", "sl"])
    ap.add_argument("--client-layers", default="1/4")
    ap.add_argument("--rows", type=int, default=8, help="copies of the one synthetic row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-n", type=int, default=32, help="synthetic problems generated per timing (0: skip)")
    ap.add_argument("--gen-batch", type=int, default=32, help="prompts per generation batch (the study's eval: 32)")
    ap.add_argument("--gen-tokens", type=int, default=128, help="most new tokens (the study's eval: 128)")
    ap.add_argument("--gen-reps", type=int, default=2, help="timings per dtype, alternating")
    ap.set_defaults(threads=1)
    args = parse_with_timing_args(ap, retries=3, retry_budget=300.0)
    args.wire_dtype = "fp32"
    t_start = time.perf_counter()

    rows = load_rows("synthetic", 1, args.seed, TrainConfig().synthetic) * args.rows
    keys = [(m, d) for m in args.methods for d in DTYPES]
    runs = {}
    for m, d in keys:
        args.dtype = d
        runs[m, d] = make_run(args, m, rows)
    first_loss = {k: runs[k].round(0)["loss"] for k in keys}  # same init, same batch: fp32 vs bf16
    one_round = Rounds(runs, start=1)  # round 0 gave first_loss

    for k in keys:
        for _ in range(args.warmup):
            one_round(k)

    got = interleaved({k: (lambda k=k: one_round(k)) for k in keys}, args.reps, args.retries,
                      prepare=one_round.skip_aggregation, deadline=t_start + args.retry_budget,
                      quiet_wait=args.quiet_wait)
    wall, foreign, retried = got.wall, got.foreign, got.retried
    runs.clear()  # free the models (one_round holds the same dict) before the generation timing

    gen = time_generation(args)

    t = {k: med(wall[k]) for k in keys}
    bad = {k: disturbed(foreign[k]) for k in keys}
    ratio = {m: t[m, "bf16"] / t[m, "fp32"] for m in args.methods}
    paired = {m: med([b / a for a, b in zip(wall[m, "fp32"], wall[m, "bf16"])]) for m in args.methods}
    cpu, units = cpu_info()

    print(f"bench_dtype  model={args.model}  seq_len={args.seq_len}  batch=1  threads={torch.get_num_threads()}  "
          f"cpu_count={os.cpu_count()}  torch={torch.__version__}  {platform.machine()}  "
          f"cpu={cpu}")
    print(f"bf16 matrix units reported by the CPU: {', '.join(units) or 'none'}  "
          f"(mkldnn bf16 supported: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()})")
    print(f"warmup={args.warmup}  reps={args.reps} (interleaved)  re-taken rounds={retried}  "
          f"'disturbed' = kept rounds during which other processes used > {BUSY} core")
    print()
    print(f"{'method':<10}{'dtype':<7}{'round s (median)':>17}{'min':>8}{'max':>8}{'first loss':>12}{'disturbed':>11}")
    for m, d in keys:
        k = (m, d)
        print(f"{m:<10}{d:<7}{t[k]:>17.3f}{min(wall[k]):>8.3f}{max(wall[k]):>8.3f}{first_loss[k]:>12.5f}"
              f"{f'{bad[k]}/{len(foreign[k])}':>11}")
    print()
    for m in args.methods:
        shaky = any(bad[m, d] * 4 > len(foreign[m, d]) for d in DTYPES)
        gap = abs(first_loss[m, "bf16"] - first_loss[m, "fp32"]) / abs(first_loss[m, "fp32"])
        print(f"RESULT  {m}: bf16/fp32 round time = {ratio[m]:.3f} (paired {paired[m]:.3f}); "
              f"{1 / ratio[m]:.2f}x {'faster' if ratio[m] < 1 else 'slower'} in bf16; first-round loss differs "
              f"by {100 * gap:.2f} %{BUSY_NOTE if shaky else ''}")
    if gen:
        print()
        print(f"evaluation: generate, {args.gen_n} synthetic problems, batch {args.gen_batch}, "
              f"<= {args.gen_tokens} new tokens, greedy")
        for d in DTYPES:
            print(f"  {d:<5} questions/s {args.gen_n / med(gen[d]):.3f}  (wall s {', '.join(f'{x:.1f}' for x in gen[d])}; "
                  f"disturbed {disturbed(gen[d + '_foreign'])}/{len(gen[d])})")
        g = med(gen["bf16"]) / med(gen["fp32"])
        print(f"RESULT  generate: bf16/fp32 time = {g:.3f}; {1 / g:.2f}x {'faster' if g < 1 else 'slower'} in bf16; "
              f"completions identical in both dtypes: {gen['same']}/{args.gen_n}")
    elapsed = time.perf_counter() - t_start
    print(f"(bench wall time {elapsed:.0f} s)")

    if args.json:
        out = {
            "bench": "dtype", "model": args.model, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": cpu, "cpu_units": units, "warmup": args.warmup, "reps": args.reps,
            "retried": retried,
            "round_s": {f"{m}/{d}": {"median": t[m, d], "all": wall[m, d], "foreign_cpu_cores": foreign[m, d],
                                     "disturbed": bad[m, d], "first_loss": first_loss[m, d]} for m, d in keys},
            "bf16_over_fp32": ratio, "bf16_over_fp32_paired": paired, "generate": gen, "wall_s": elapsed,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
