"""Cost of the LESFT loss inside a training round, measured in one run (no timed assertions; exits 0).

Targets (SmolLM2-135M, sequence length 256, 4 clients, method lesft, bf16 autocast):

  (a) sub-salient clustering (``subsalient_mask``)                   <= 5 %  of a full lesft round
  (b) the whole loss (``lesft_loss``: weights + clustering + CE)     <= 10 % of a full lesft round

How:
  1. A ``lesft`` Run with 4 clients (batch 1 each, grad_accum 1, every sequence padded to exactly
     --seq-len tokens) runs --warmup untimed rounds, then --reps timed rounds (``Run.round``; rounds
     that would aggregate are run untimed, and one aggregation is timed on its own). Median reported.
  2. Realistic inputs, from the same Run: one more micro-step is run by hand the way ``Run.round`` and
     ``SplitServer.forward_backward`` do it -- every client's cut activations go through the transport,
     the server concatenates them and runs its part on the base path (with graph) and on the reference
     path (forward only). That gives the real logits [4, T, V], reference logits and final hidden
     states [4, T, 576].
  3. On those inputs, each piece timed over at least --inner calls and 1 s (median of the calls):
     - loss: the ``lesft_loss`` calls exactly as ``head_losses`` makes them (one call per client slice,
       under the same autocast, logits in the autograd graph) -- the sum over the 4 slices;
     - clustering: the ``subsalient_mask`` calls that those ``lesft_loss`` calls make (per slice: the
       packed final hidden states of the target slots [1, N, 576] and their salient mask), summed;
       also, for reference, one batched call on [4, N, 576] and one on the FULL sequence [4, T-1, 576]
       (every position a slot; the salient mask there is the base path's top-1 probability > p_sal --
       the cost of the mask does not depend on which tokens are salient);
     - token weights alone, and the loss forward+backward (to the logits), for information.

    .venv/bin/python bench/bench_loss.py [--reps 5] [--dtype bf16] [--seq-len 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesft.data.rows import load_rows  # noqa: E402
from lesft.data.synthetic import ArithmeticSpec  # noqa: E402
from lesft.loss import _pack, _rows_logprob, _shift, lesft_loss, subsalient_mask, token_weights  # noqa: E402
from lesft.roles import _eval_mode, _pad_cat, _to  # noqa: E402

CLUSTER_TARGET = 0.05
LOSS_TARGET = 0.10
from bench_split import Rounds, make_run  # noqa: E402  (the same config and round stepping as bench_split)
from timing import parse_with_timing_args, BUSY, _busy_jiffies, _foreign, _self_jiffies, disturbed, med, timed, verdict, wait_quiet  # noqa: E402  (bench/ is on sys.path when run as a script)
PIECE_FOREIGN: list[float] = []  # CPU other processes used while each loss piece was timed (cores)


def bench(fn, n: int, quiet_wait: float = 0.0, min_seconds: float = 1.0) -> float:
    """Median seconds of ``fn`` over at least ``n`` calls and ``min_seconds`` (after one untimed call);
    records the CPU other processes used meanwhile (the window is long enough for /proc/stat's 10 ms ticks)."""
    fn()
    if quiet_wait > 0:
        wait_quiet(quiet_wait)
    out = []
    b0, s0, t_all = _busy_jiffies(), _self_jiffies(), time.perf_counter()
    while len(out) < n or time.perf_counter() - t_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    PIECE_FOREIGN.append(_foreign(b0, s0, time.perf_counter() - t_all))
    return med(out)


# ----------------------------------------------------------------------------- the benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence and path (exact, after padding)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--inner", type=int, default=30,
                    help="timed calls of each loss piece, at least (and at least 1 s of them; median reported)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="compute precision (autocast)")
    ap.add_argument("--client-layers", default="1/4")
    ap.add_argument("--rows", type=int, default=64, help="synthetic rows (split across clients)")
    ap.add_argument("--steps", type=int, default=None,
                    help="operations per synthetic problem (longer targets); default: the project's spec")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_with_timing_args(ap, retries=2, retry_budget=150.0)
    t_start = time.perf_counter()

    spec = ArithmeticSpec() if args.steps is None else ArithmeticSpec(min_steps=args.steps, max_steps=args.steps)
    rows = load_rows("synthetic", args.rows, args.seed, spec)
    run = make_run(args, "lesft", rows, clients=args.clients, synthetic=spec)
    cfg = run.cfg

    # ---------------------------------------------------------------- 1. full rounds
    step = Rounds({"lesft": run})
    for _ in range(args.warmup):
        step("lesft")
    rounds, server_s, client_s, foreign, retried = [], [], [], [], 0
    box: dict = {}
    deadline = t_start + args.retry_budget

    def skip_aggregation() -> None:  # aggregation rounds run untimed; one aggregation is timed below
        step.skip_aggregation("lesft")

    def one() -> None:
        box["m"] = run.round(step.next["lesft"])
        step.next["lesft"] += 1

    def snap() -> tuple[float, float]:
        return run.server.meter.seconds, sum(c.meter.seconds for c in run.clients)

    for _ in range(args.reps):
        dt, fo, tries, (ds, dc) = timed(one, args.retries, prepare=skip_aggregation, snap=snap, deadline=deadline,
                                        quiet_wait=args.quiet_wait)
        retried += tries
        rounds.append(dt)
        foreign.append(fo)
        server_s.append(ds)
        client_s.append(dc)
    t_round = med(rounds)
    stats = box["m"].get("token_classes", {})
    agg_s = med([timed(lambda: run.aggregate(run.clients))[0] for _ in range(3)])

    # ---------------------------------------------------------------- 2. realistic inputs
    send = run.transport.send
    msgs = [send(c.forward(step.next["lesft"]), "client_to_server") for c in run.clients]
    server = run.server

    def autocast() -> contextlib.AbstractContextManager:  # the server's own: roles._autocast
        return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()

    base, bounds = _pad_cat([m.base for m in msgs])
    ref = _pad_cat([m.reference for m in msgs])[0]
    base, ref = _to(base, run.device), _to(ref, run.device)
    base.hidden.requires_grad_(True)
    with autocast():
        logits, final = server.top(base.hidden, base.attention_mask, base.position_ids)
        with _eval_mode(server.top):
            ref_logits, _ = server.top(ref.hidden, ref.attention_mask, ref.position_ids)
    lc = cfg.lesft

    def loss_calls(lg: torch.Tensor) -> list[torch.Tensor]:
        with autocast():  # exactly as head_losses: one lesft_loss call per client slice
            return [lesft_loss(lg[b0:b1], base.labels[b0:b1], ref_logits[b0:b1], ref.labels[b0:b1],
                               final[b0:b1].detach(), lc)[0] for b0, b1 in bounds]

    # the inputs lesft_loss hands to subsalient_mask / token_weights, per slice (same code path)
    cl_inputs, w_inputs = [], []
    all_h, all_sal, all_m = [], [], []
    with torch.no_grad():
        for b0, b1 in bounds:
            _, lab_b, m_b = _shift(logits[b0:b1], base.labels[b0:b1])
            sl_r, lab_r, m_r = _shift(ref_logits[b0:b1], ref.labels[b0:b1])
            ref_p = _rows_logprob(sl_r[m_r], lab_r[m_r]).exp()
            salient = ref_p > lc.p_sal
            h = final[b0:b1].detach()[:, :-1][m_b].float()
            h_packed, valid = _pack(h, m_b)
            sal_packed, _ = _pack(salient, m_b)
            cl_inputs.append((h_packed, sal_packed, valid))
            w_inputs.append((ref_p, torch.zeros_like(salient)))
            all_h.append(h)
            all_sal.append(salient)
            all_m.append(m_b)
        # the batched [B, N, H] version of the same slots
        m_all = torch.cat(all_m)
        hb, vb = _pack(torch.cat(all_h), m_all)
        sb, _ = _pack(torch.cat(all_sal), m_all)
        # the full sequence [B, T-1, H]: every position a slot
        full_h = final.detach()[:, :-1]
        full_valid = base.attention_mask[:, 1:].bool()
        full_sal = torch.softmax(logits.detach()[:, :-1].float(), dim=-1).amax(-1) > lc.p_sal
    n_slots = [int(v.sum()) for _, _, v in cl_inputs]

    def clustering() -> None:
        for h, s, v in cl_inputs:
            subsalient_mask(h, s, v, lc.tau, lc.window)

    def weights() -> None:
        for p, sub in w_inputs:
            token_weights(p, sub, lc.p_sal, lc.gammas)

    def loss_fwd() -> None:
        loss_calls(logits)

    leaf = logits.detach().requires_grad_(True)

    def loss_fwd_bwd() -> None:
        leaf.grad = None
        torch.stack(loss_calls(leaf)).sum().backward()

    n, qw = args.inner, args.quiet_wait
    t_cluster = bench(clustering, n, qw)
    t_cluster_batched = bench(lambda: subsalient_mask(hb, sb, vb, lc.tau, lc.window), n, qw)
    t_cluster_full = bench(lambda: subsalient_mask(full_h, full_sal, full_valid, lc.tau, lc.window), n, qw)
    t_weights = bench(weights, n, qw)
    t_loss = bench(loss_fwd, n, qw)
    t_loss_fb = bench(loss_fwd_bwd, max(5, n // 3), qw)  # ~0.2 s a call
    # unreliable: other processes disturbed over a quarter of the timed rounds, or a loss piece's timing
    n_bad = disturbed(foreign)
    unreliable = n_bad * 4 > len(foreign) or max(PIECE_FOREIGN) > BUSY

    # ---------------------------------------------------------------- report
    B, T, V = logits.shape
    H = final.shape[-1]
    r_cluster, r_loss = t_cluster / t_round, t_loss / t_round
    r_full = t_cluster_full / t_round
    print(f"bench_loss  model={args.model}  method=lesft  clients={args.clients} x batch 1  seq_len={T} (base and "
          f"reference path)  dtype={args.dtype}  client_layers={run.k}  threads={torch.get_num_threads()}  "
          f"cpu_count={os.cpu_count()}  torch={torch.__version__}  {platform.machine()}")
    print(f"logits [{B}, {T}, {V}] {str(logits.dtype).removeprefix('torch.')}  final hidden [{B}, {T}, {H}]  "
          f"target tokens per client {n_slots}  token classes (last timed round): "
          + ", ".join(f"{k.removeprefix('frac_')} {v:.0%}" for k, v in stats.items() if k.startswith("frac_")))
    print(f"warmup={args.warmup}  reps={args.reps}  inner={n}  re-taken rounds (busy machine)={retried}  "
          f"disturbed rounds (other processes > {BUSY} core)={n_bad}/{len(foreign)}  "
          f"max foreign CPU while timing the loss pieces={max(PIECE_FOREIGN):.2f} core")
    print()
    print(f"{'piece':<58}{'seconds':>10}{'/ round':>10}{'target':>9}  result")
    print(f"{'lesft round (median wall time)':<58}{t_round:>10.3f}{1:>10.1%}")
    print(f"{'  server meter (median)':<58}{med(server_s):>10.3f}{med(server_s) / t_round:>10.1%}")
    print(f"{'  client meters, 4 clients summed (median)':<58}{med(client_s):>10.3f}{med(client_s) / t_round:>10.1%}")
    print(f"{'(a) clustering as in the round: 4 x subsalient_mask [1,N,H]':<58}{t_cluster:>10.5f}{r_cluster:>10.2%}"
          f"{'<= 5%':>9}  {'PASS' if r_cluster <= CLUSTER_TARGET else 'FAIL'}")
    print(f"{f'    same slots batched: subsalient_mask [{B},{hb.shape[1]},{H}]':<58}{t_cluster_batched:>10.5f}"
          f"{t_cluster_batched / t_round:>10.2%}")
    print(f"{f'    full sequence: subsalient_mask [{B},{T - 1},{H}]':<58}{t_cluster_full:>10.5f}{r_full:>10.2%}"
          f"{'<= 5%':>9}  {'PASS' if r_full <= CLUSTER_TARGET else 'FAIL'}")
    print(f"{'    token weights (token_weights, 4 slices)':<58}{t_weights:>10.5f}{t_weights / t_round:>10.2%}")
    print(f"{'(b) whole loss: 4 x lesft_loss (forward, in the graph)':<58}{t_loss:>10.5f}{r_loss:>10.2%}"
          f"{'<= 10%':>9}  {'PASS' if r_loss <= LOSS_TARGET else 'FAIL'}")
    print(f"{'    loss forward + backward to the logits':<58}{t_loss_fb:>10.5f}{t_loss_fb / t_round:>10.2%}")
    print(f"{f'(aggregation, every {cfg.aggregate_every} rounds, not in the timed rounds)':<58}{agg_s:>10.5f}"
          f"{agg_s / t_round:>10.2%}")
    print()
    print(verdict(f"clustering / round = {r_cluster:.2%} (<= 5%; full-sequence [{B},{T - 1},{H}]: {r_full:.2%})",
                  r_cluster <= CLUSTER_TARGET and r_full <= CLUSTER_TARGET, unreliable))
    print(verdict(f"loss / round = {r_loss:.2%} (<= 10%; with its backward {t_loss_fb / t_round:.2%})",
                  r_loss <= LOSS_TARGET, unreliable))
    elapsed = time.perf_counter() - t_start
    print(f"(bench wall time {elapsed:.0f} s)")

    if args.json:
        out = {
            "bench": "loss", "model": args.model, "seq_len": T, "clients": args.clients, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "warmup": args.warmup,
            "reps": args.reps, "inner": n, "retried": retried, "target_tokens_per_client": n_slots,
            "token_classes": stats,
            "seconds": {"round_median": t_round, "rounds": rounds, "round_foreign_cpu": foreign,
                        "server_median": med(server_s), "clients_median": med(client_s),
                        "clustering": t_cluster, "clustering_batched": t_cluster_batched,
                        "clustering_full_sequence": t_cluster_full, "token_weights": t_weights,
                        "loss_forward": t_loss, "loss_forward_backward": t_loss_fb, "aggregation": agg_s},
            "ratios": {"clustering_over_round": r_cluster, "clustering_full_sequence_over_round": r_full,
                       "loss_over_round": r_loss, "loss_fwd_bwd_over_round": t_loss_fb / t_round},
            "targets": {"clustering_over_round": CLUSTER_TARGET, "loss_over_round": LOSS_TARGET},
            "unreliable": unreliable, "disturbed_rounds": n_bad, "piece_foreign_cpu": PIECE_FOREIGN,
            "pass": {"clustering": r_cluster <= CLUSTER_TARGET and r_full <= CLUSTER_TARGET,
                     "loss": r_loss <= LOSS_TARGET},
            "wall_s": elapsed,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
