"""The gRPC transport on loopback, measured in one run (no timed assertions; always exits 0).

Targets:
  1. throughput: an 8 MB activation message (Activations, hidden [1, 8192, 256] fp32) streamed to the
     server over loopback and acknowledged: >= 500 MB/s (bytes of the encoded message / median time,
     encode and decode included); the same with an 8 MB reply (the gradient coming back) is printed too.
  2. per-message overhead: a small message (hidden [1, 16, 8], ~1.3 KB) round trip over gRPC minus the
     same message through the in-process Loopback: <= 2 ms (median of 7 batches of 100 back-to-back calls).
  3. a networked ``sl`` round (SmolLM2-135M, one client, --seq-len tokens; the split server in a thread
     of this process on loopback, the client through RemoteSplit) <= 1.2 x the in-process round.

    .venv/bin/python bench/bench_transport.py [--reps 15] [--seq-len 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesft import methods  # noqa: E402
from lesft.config import TrainConfig  # noqa: E402
from lesft.data.rows import load_rows  # noqa: E402
from lesft.deploy.remote import RemoteSplit  # noqa: E402
from lesft.deploy.endpoint import serve  # noqa: E402
from lesft.deploy.wire import NetArgs  # noqa: E402
from lesft.messages import ActivationGrad, Activations, PathBatch, decode, encode  # noqa: E402
from lesft.model.load import load_model  # noqa: E402
from lesft.train import Run  # noqa: E402
from lesft.transport import Loopback  # noqa: E402
from timing import med, parse_with_timing_args, timed  # noqa: E402

THROUGHPUT_TARGET = 500.0  # MB/s
OVERHEAD_TARGET = 2.0      # ms
ROUND_TARGET = 1.2


TOKEN = "bench-token-" + "0" * 20  # >= 22 characters, as serve requires


class Echo:
    """A stand-in for SplitService: decodes what arrives (as the server does) and answers with a small
    acknowledgement, or with a gradient the size of the activations (``big_reply``)."""

    known = {0}

    def __init__(self) -> None:
        self.big_reply = False

    def hello(self, cid, info):
        return {"step": 0}

    def refused(self, cid, err) -> None:
        print(f"echo: refused client {cid}: {err}")

    def exchange(self, cid: int, data: bytes) -> bytes:
        msg = decode(data)
        grad = msg.base.hidden if self.big_reply else torch.empty(0)
        return encode(ActivationGrad(cid, msg.step, grad), "fp32")[0]


def per_call(fn, n: int = 100) -> float:
    """Mean seconds per call over ``n`` back-to-back calls (per-call timers would cost as much as a call)."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def activations(t: int, h: int) -> Activations:
    ones = torch.ones(1, t, dtype=torch.long)
    return Activations(0, 0, PathBatch(torch.randn(1, t, h), ones, ones, ones))


def sl_cfg(args: argparse.Namespace) -> TrainConfig:
    return methods.resolve(TrainConfig(
        method="sl", model=args.model, clients=1, batch_size=1, grad_accum=1, max_length=args.seq_len,
        pad_to_multiple=args.seq_len, dtype=args.dtype, device="cpu", progress=False, rounds=10**6, samples=8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--skip-round", action="store_true", help="only the transport numbers (no model)")
    args = parse_with_timing_args(ap, retries=3, retry_budget=300)
    out: dict[str, float] = {}
    net = NetArgs()
    tokens = {TOKEN: 0}

    # ---------------------------------------------------------------- 1 + 2: transport only
    echo = Echo()
    server, port = serve(echo, "127.0.0.1:0", net, tokens)  # type: ignore[arg-type]
    link = RemoteSplit(f"127.0.0.1:{port}", TOKEN, TrainConfig(), net)
    big = activations(8192, 256)  # 8 MiB of hidden states + 3 x 64 KiB of int64
    size = len(encode(big)[0])
    for big_reply in (False, True):
        echo.big_reply = big_reply
        link.call(big)  # warm-up
        ts = [timed(lambda: link.call(big), args.retries, quiet_wait=1.0)[0] for _ in range(args.reps)]
        mbps = size * (2 if big_reply else 1) / med(ts) / 1e6
        out["throughput_mb_s" + ("_both_ways" if big_reply else "")] = mbps
    small = activations(16, 8)
    small_size = len(encode(small)[0])
    loop = Loopback()
    echo.big_reply = False
    for _ in range(50):
        link.call(small)
    net_ts = [per_call(lambda: link.call(small)) for _ in range(7)]
    loop_ts = [per_call(lambda: Echo().exchange(0, encode(loop.send(small, "client_to_server"))[0]))
               for _ in range(7)]
    out["small_message_bytes"] = small_size
    out["small_grpc_ms"] = med(net_ts) * 1e3
    out["small_inprocess_ms"] = med(loop_ts) * 1e3
    out["small_overhead_ms"] = out["small_grpc_ms"] - out["small_inprocess_ms"]
    server.stop(grace=0)

    # ---------------------------------------------------------------- 3: a networked round
    if not args.skip_round:
        from lesft.deploy.cli import build_service

        cfg = sl_cfg(args)
        rows = load_rows("synthetic", 8, 0, cfg.synthetic)
        model, tok = load_model(cfg.model)
        local = Run(cfg, model, tok, rows)
        service = build_service(cfg, net, [0], None)
        server, port = serve(service, "127.0.0.1:0", net, tokens)
        remote_link = RemoteSplit(f"127.0.0.1:{port}", TOKEN, cfg, net)
        model, tok = load_model(cfg.model)
        remote = Run(cfg, model, tok, rows, link=remote_link, client_id=0)
        rounds = {"local": local, "remote": remote}
        times: dict[str, list[float]] = {k: [] for k in rounds}
        counters = {k: 0 for k in rounds}

        def one(name: str) -> None:
            rounds[name].round(counters[name])
            counters[name] += 1

        for name in rounds:
            for _ in range(2):
                one(name)
        for i in range(args.reps):
            for name in (list(rounds) if i % 2 == 0 else list(rounds)[::-1]):
                times[name].append(timed(lambda: one(name), args.retries, quiet_wait=args.quiet_wait)[0])
        server.stop(grace=0)
        out["round_inprocess_s"] = med(times["local"])
        out["round_networked_s"] = med(times["remote"])
        out["round_ratio"] = out["round_networked_s"] / out["round_inprocess_s"]

    print(f"encoded 8 MB message: {size / 1e6:.2f} MB; small message: {small_size} B; reps {args.reps}")
    for k, v in out.items():
        print(f"  {k:28s} {v:10.3f}")
    print(f"{'PASS' if out['throughput_mb_s'] >= THROUGHPUT_TARGET else 'FAIL'} throughput "
          f"{out['throughput_mb_s']:.0f} MB/s (target >= {THROUGHPUT_TARGET:.0f})")
    print(f"{'PASS' if out['small_overhead_ms'] <= OVERHEAD_TARGET else 'FAIL'} small-message overhead "
          f"{out['small_overhead_ms']:.2f} ms (target <= {OVERHEAD_TARGET})")
    if "round_ratio" in out:
        print(f"{'PASS' if out['round_ratio'] <= ROUND_TARGET else 'FAIL'} networked/in-process round "
              f"{out['round_ratio']:.3f} (target <= {ROUND_TARGET})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
