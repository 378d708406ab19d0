"""Engine cost of splitting, measured in one run (no timed assertions; always exits 0).

Targets (SmolLM2-135M, bf16 autocast, one sequence of exactly --seq-len tokens, batch 1, grad_accum 1):

  1. split overhead:  an ``sl`` round with ONE client   <= 1.05 x  the same ``centralized`` LoRA step
  2. LESFT overhead:  a ``lesft`` round with ONE client <= 1.5  x  an ``sl`` round
  3. wire bf16:       client->server hidden-state payload at wire_dtype=bf16 is exactly 0.5 x fp32
                      (the total client->server bytes, which also carry int64 mask/positions/labels
                      and a JSON header, are printed too: slightly above 0.5)

Every party gets the same batch: the data is ONE synthetic row repeated, truncated to --seq-len
tokens and right-padded to exactly --seq-len tokens (``max_length = pad_to_multiple = seq_len``).
Each method has its own Run (a fresh model each). After --warmup untimed rounds, --reps timed rounds
are taken per method, interleaved (the order rotates every repetition, so slow drift and a busy
neighbour hit every method alike); a round during which other processes used noticeable CPU is
re-taken (at most --retries times) and counted. Reported: medians.

    .venv/bin/python bench/bench_split.py [--reps 15] [--dtype bf16] [--seq-len 256] [--json out.json]
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

from lesft import methods  # noqa: E402
from lesft.config import TrainConfig  # noqa: E402
from lesft.data.rows import load_rows  # noqa: E402
from lesft.model.load import load_model  # noqa: E402
from lesft.train import Run  # noqa: E402

SPLIT_TARGET = 1.05
LESFT_TARGET = 1.5
from timing import parse_with_timing_args, BUSY, disturbed, interleaved, med, timed, verdict  # noqa: E402  (bench/ is on sys.path when run as a script)

def make_cfg(args: argparse.Namespace, method: str, **over) -> TrainConfig:
    kw = dict(
        method=method, model=args.model, clients=1, batch_size=1, grad_accum=1,
        max_length=args.seq_len, pad_to_multiple=args.seq_len, dtype=args.dtype,
        wire_dtype=getattr(args, "wire_dtype", "fp32"),
        client_layers=args.client_layers, device="cpu", progress=False, seed=args.seed, rounds=10**6,
        samples=args.rows,
    )
    kw.update(over)
    return methods.resolve(TrainConfig(**kw))


def make_run(args: argparse.Namespace, method: str, rows, **over) -> Run:
    model, tok = load_model(args.model)  # fresh: a Run consumes the model it is given
    return Run(make_cfg(args, method, **over), model, tok, rows)


class Rounds:
    """Steps each of several Runs (by key) through its rounds in order, and keeps the every-I-rounds adapter
    aggregation out of the timed ones (it is timed on its own)."""

    def __init__(self, runs: dict, start: int = 0):
        self.runs = runs
        self.next = dict.fromkeys(runs, start)

    def __call__(self, k) -> None:
        """Run the next round of run ``k``."""
        self.runs[k].round(self.next[k])
        self.next[k] += 1

    def skip_aggregation(self, k) -> None:
        """Run (untimed) the rounds of ``k`` that would aggregate, so that the next one does not."""
        run = self.runs[k]
        while run.aggregator is not None and (self.next[k] + 1) % run.cfg.aggregate_every == 0:
            self(k)


# ----------------------------------------------------------------------------- the benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (exact, after padding)")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds per method (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per method first")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="compute precision (autocast)")
    ap.add_argument("--wire-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="wire dtype of the TIMED runs (the wire test always compares fp32 with bf16)")
    ap.add_argument("--client-layers", default="1/4")
    ap.add_argument("--rows", type=int, default=8, help="copies of the one synthetic row")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_with_timing_args(ap, retries=3, retry_budget=200.0)
    t_start = time.perf_counter()

    spec = TrainConfig().synthetic
    rows = load_rows("synthetic", 1, args.seed, spec) * args.rows  # every batch is the same sequence

    # ---------------------------------------------------------------- timing: centralized / sl / lesft
    names = ("centralized", "sl", "lesft")
    runs = {m: make_run(args, m, rows) for m in names}
    seq = {m: (runs[m].clients[0]._batch().ids.shape) for m in names}
    assert all(tuple(s) == (1, args.seq_len) for s in seq.values()), f"batch shapes differ: {seq}"
    one_round = Rounds(runs)

    for m in names:
        for _ in range(args.warmup):
            one_round(m)

    def snap(m: str) -> tuple[float, float]:
        run = runs[m]
        return (run.server.meter.seconds if run.server else 0.0, run.clients[0].meter.seconds)

    got = interleaved({m: (lambda m=m: one_round(m)) for m in names}, args.reps, args.retries,
                      prepare=one_round.skip_aggregation, snap=snap, deadline=t_start + args.retry_budget,
                      quiet_wait=args.quiet_wait)
    wall, foreign, retried = got.wall, got.foreign, got.retried
    server_s = {m: [d[0] for d in got.deltas[m]] for m in names}
    client_s = {m: [d[1] for d in got.deltas[m]] for m in names}

    # aggregation of the lesft run (1 client: upload, |D_i|-weighted average, broadcast), timed alone
    agg_s = med([timed(lambda: runs["lesft"].aggregate(runs["lesft"].clients), 0)[0] for _ in range(3)])

    t = {m: med(wall[m]) for m in names}
    ratio_split = t["sl"] / t["centralized"]
    ratio_lesft = t["lesft"] / t["sl"]
    paired_split = med([a / b for a, b in zip(wall["sl"], wall["centralized"])])
    paired_lesft = med([a / b for a, b in zip(wall["lesft"], wall["sl"])])
    # a ratio is unreliable when other processes disturbed over a quarter of the rounds behind it
    bad = {m: disturbed(foreign[m]) for m in names}
    shaky = {m: bad[m] * 4 > len(foreign[m]) for m in names}
    unreliable_split = shaky["sl"] or shaky["centralized"]
    unreliable_lesft = shaky["lesft"] or shaky["sl"]
    k = runs["sl"].k
    n_layers = k + len(runs["sl"].server.top.layers)
    runs.clear()  # free the models before the wire runs

    # ---------------------------------------------------------------- wire: one sl round per wire dtype
    wire = {}
    for wd in ("fp32", "bf16"):
        run = make_run(args, "sl", rows, wire_dtype=wd)
        run.round(0)
        d = run.transport.meter.to_dict()
        c2s = d["client_to_server"]["activations"]
        s2c = d["server_to_client"]["activation_grad"]
        n = c2s["messages"]
        b, tt = 1, args.seq_len
        int64_bytes = 3 * b * tt * 8  # attention_mask, position_ids, labels (int64) of the base path
        hidden_expect = b * tt * run.server.top.config.hidden_size * (4 if wd == "fp32" else 2)
        wire[wd] = {
            "messages": n,
            "payload": c2s["payload_bytes"] / n,
            "header": c2s["header_bytes"] / n,
            "total": (c2s["payload_bytes"] + c2s["header_bytes"]) / n,
            "hidden": c2s["payload_bytes"] / n - int64_bytes,
            "hidden_expected": hidden_expect,
            "int64": int64_bytes,
            "grad_payload": s2c["payload_bytes"] / s2c["messages"],
            "grad_total": (s2c["payload_bytes"] + s2c["header_bytes"]) / s2c["messages"],
        }
        del run
    hidden_ratio = wire["bf16"]["hidden"] / wire["fp32"]["hidden"]
    total_ratio = wire["bf16"]["total"] / wire["fp32"]["total"]
    grad_ratio = wire["bf16"]["grad_payload"] / wire["fp32"]["grad_payload"]
    grad_total_ratio = wire["bf16"]["grad_total"] / wire["fp32"]["grad_total"]
    hidden_exact = all(wire[w]["hidden"] == wire[w]["hidden_expected"] for w in wire)

    # ---------------------------------------------------------------- report
    print(f"bench_split  model={args.model}  layers={n_layers} (client {k} / server {n_layers - k})  "
          f"seq_len={args.seq_len}  batch=1  dtype={args.dtype}  wire(timed)={args.wire_dtype}  "
          f"threads={torch.get_num_threads()}  cpu_count={os.cpu_count()}  "
          f"torch={torch.__version__}  {platform.machine()}")
    print(f"warmup={args.warmup}  reps={args.reps} (interleaved)  re-taken rounds (busy machine)={retried}  "
          f"'disturbed' = kept rounds during which other processes used > {BUSY} core")
    print()
    print(f"{'method (1 client)':<18}{'round s (median)':>17}{'min':>8}{'max':>8}{'server s':>10}{'client s':>10}"
          f"{'disturbed':>11}")
    for m in names:
        print(f"{m:<18}{t[m]:>17.3f}{min(wall[m]):>8.3f}{max(wall[m]):>8.3f}"
              f"{(f'{med(server_s[m]):.3f}' if m != 'centralized' else '-'):>10}{med(client_s[m]):>10.3f}"
              f"{f'{bad[m]}/{len(foreign[m])}':>11}")
    print(f"(centralized: the one party holds the whole model; its time is all 'client'. "
          f"lesft aggregation, every {make_cfg(args, 'lesft').aggregate_every} rounds, timed alone: {agg_s:.4f} s)")
    print()
    print(f"{'ratio':<34}{'median ratio':>13}{'paired':>9}{'target':>9}  result")
    print(f"{'sl / centralized':<34}{ratio_split:>13.3f}{paired_split:>9.3f}{'<= ' + str(SPLIT_TARGET):>9}  "
          f"{'PASS' if ratio_split <= SPLIT_TARGET else 'FAIL'}")
    print(f"{'lesft / sl':<34}{ratio_lesft:>13.3f}{paired_lesft:>9.3f}{'<= ' + str(LESFT_TARGET):>9}  "
          f"{'PASS' if ratio_lesft <= LESFT_TARGET else 'FAIL'}")
    print()
    print(f"{'client->server per message (B)':<34}{'fp32':>10}{'bf16':>10}{'bf16/fp32':>11}")
    for key, label in (("hidden", "hidden-state payload"), ("int64", "int64 mask+positions+labels"),
                       ("header", "header (8 B + JSON)"), ("total", "total")):
        a, b = wire["fp32"][key], wire["bf16"][key]
        print(f"{label:<34}{a:>10.0f}{b:>10.0f}{b / a:>11.4f}")
    print(f"{'server->client grad payload':<34}{wire['fp32']['grad_payload']:>10.0f}"
          f"{wire['bf16']['grad_payload']:>10.0f}{grad_ratio:>11.4f}")
    print(f"(hidden = payload - int64 bytes; equals B*T*H*elem exactly: {hidden_exact})")
    print()
    wire_pass = hidden_ratio == 0.5 and hidden_exact
    print(verdict(f"split overhead     sl/centralized = {ratio_split:.3f} (<= {SPLIT_TARGET})",
                  ratio_split <= SPLIT_TARGET, unreliable_split))
    print(verdict(f"lesft overhead     lesft/sl = {ratio_lesft:.3f} (<= {LESFT_TARGET})",
                  ratio_lesft <= LESFT_TARGET, unreliable_lesft))
    print(verdict(f"wire bf16 hidden   bf16/fp32 = {hidden_ratio:.4f} (== 0.5; total c->s {total_ratio:.4f})", wire_pass))
    elapsed = time.perf_counter() - t_start
    print(f"(bench wall time {elapsed:.0f} s)")

    if args.json:
        out = {
            "bench": "split", "model": args.model, "seq_len": args.seq_len, "dtype": args.dtype,
            "wire_dtype_timed": args.wire_dtype, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "client_layers": k, "layers": n_layers, "warmup": args.warmup, "reps": args.reps, "retried": retried,
            "round_s": {m: {"median": t[m], "all": wall[m], "server_median": med(server_s[m]),
                            "client_median": med(client_s[m]), "foreign_cpu_cores": foreign[m],
                            "disturbed": bad[m]} for m in names},
            "lesft_aggregation_s": agg_s,
            "ratios": {"sl_over_centralized": ratio_split, "sl_over_centralized_paired": paired_split,
                       "lesft_over_sl": ratio_lesft, "lesft_over_sl_paired": paired_lesft,
                       "wire_hidden_bf16_over_fp32": hidden_ratio, "wire_total_c2s_bf16_over_fp32": total_ratio,
                       "wire_grad_payload_bf16_over_fp32": grad_ratio,
                       "wire_grad_total_bf16_over_fp32": grad_total_ratio},
            "wire_bytes_per_message": wire,
            "targets": {"sl_over_centralized": SPLIT_TARGET, "lesft_over_sl": LESFT_TARGET, "wire_hidden": 0.5},
            "pass": {"split": ratio_split <= SPLIT_TARGET, "lesft": ratio_lesft <= LESFT_TARGET, "wire": wire_pass},
            "unreliable": {"split": unreliable_split, "lesft": unreliable_lesft},
            "wall_s": elapsed,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
