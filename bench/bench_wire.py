"""The wire formats: bytes per message (counted, exact for the data drawn) and what encoding plus decoding costs,
as a share of a round, measured in one run on one thread (no timed assertions; always exits 0).

Target (issue 28): encode + decode <= 5 % of a SmolLM2 round on one thread, for every format.

Setting: the demo's (SmolLM2-135M, synthetic data, 4 clients, batch 1, grad_accum 2; --samples rows), one Run per
method and format, --rounds rounds each. Every message crosses the in-process transport, which encodes it to bytes and
decodes a fresh copy; the time inside those two calls is the codec time. Formats: ``fp32`` is the wire without any
option (int64 integers), every other format also packs the integer tensors (``--pack_ints``). A row per method and
format: bytes per message of each kind and direction (payload + header), MB per round each way, codec seconds per
round, round seconds, and their ratio. The byte counts are what the meter counted: exact for the rows drawn (they
depend on the rows' lengths); the README's table is this script's output.

    .venv/bin/python bench/bench_wire.py [--rounds 2] [--methods sl splitlora splitfrozen lesft] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesft import methods  # noqa: E402
from lesft.config import TrainConfig  # noqa: E402
from lesft.data.rows import load_rows  # noqa: E402
from lesft.messages import Message, WireFormat, decode, encode  # noqa: E402
from lesft.meters import MB  # noqa: E402
from lesft.model.load import load_model  # noqa: E402
from lesft.train import Run  # noqa: E402
from lesft.transport import Loopback  # noqa: E402

TARGET = 0.05
FORMATS = {  # name -> TrainConfig fields
    "fp32": {},
    "fp32-packed": {"pack_ints": True},
    "bf16": {"wire_dtype": "bf16", "pack_ints": True},
    "int8": {"wire_dtype": "int8", "pack_ints": True},
    "int4": {"wire_dtype": "int4", "pack_ints": True},
    "bf16+ref-int4": {"wire_dtype": "bf16", "reference_wire": "int4", "pack_ints": True},
}


class TimedLoopback(Loopback):
    """The in-process transport, adding up the seconds spent in encode and decode."""

    seconds = 0.0

    def send(self, msg: Message, direction: str) -> Message:
        t0 = time.perf_counter()
        data, payload = encode(msg, self.wire)
        out = decode(data)
        self.seconds += time.perf_counter() - t0
        self.meter.add(direction, msg.kind, payload, len(data))
        return out


def measure(args: argparse.Namespace, method: str, fmt: str, rows) -> dict:
    cfg = methods.resolve(TrainConfig(method=method, model=args.model, data="synthetic", samples=args.samples,
                                      clients=4, batch_size=1, grad_accum=2, lr=2e-4, device="cpu", progress=False,
                                      rounds=args.rounds, seed=0, **FORMATS[fmt]))
    model, tok = load_model(args.model)
    transport = TimedLoopback(WireFormat.of(cfg))
    run = Run(cfg, model, tok, rows, transport=transport)
    t0 = time.perf_counter()
    for r in range(args.rounds):
        run.round(r)  # aggregation rounds included, as in training
    wall = time.perf_counter() - t0
    per_msg = {f"{d}/{k}": (v["payload_bytes"] + v["header_bytes"]) / v["messages"]
               for d, kinds in transport.meter.to_dict().items() for k, v in kinds.items() if v["messages"]}
    totals = transport.meter.totals()
    return {"method": method, "format": fmt, "bytes_per_message": per_msg,
            "mb_per_round": {d: totals[d] / MB / args.rounds for d in totals},
            "codec_s_per_round": transport.seconds / args.rounds, "round_s": wall / args.rounds,
            "codec_share": transport.seconds / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["sl", "splitlora", "splitfrozen", "lesft"])
    ap.add_argument("--formats", nargs="+", default=[f for f in FORMATS if f != "fp32-packed"], choices=list(FORMATS))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = load_rows("synthetic", args.samples, 0, TrainConfig().synthetic)
    t0 = time.perf_counter()
    results = []
    for m in args.methods:
        for f in args.formats:
            if f == "bf16+ref-int4" and m != "lesft":
                continue
            results.append(measure(args, m, f, rows))
            r = results[-1]
            print(f"{m:12s} {f:14s} up {r['mb_per_round']['client_to_server']:8.3f} MB/round  "
                  f"down {r['mb_per_round']['server_to_client']:8.3f}  codec {r['codec_s_per_round']:.3f} s "
                  f"of {r['round_s']:.2f} s = {100 * r['codec_share']:.2f} %", flush=True)
    print("\n| method | wire | activations up, bytes/message | gradients down, bytes/message | up MB/round "
          "| down MB/round | codec share of a round |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        b = r["bytes_per_message"]
        print(f"| {r['method']} | {r['format']} | {b.get('client_to_server/activations', 0):,.0f} | "
              f"{b.get('server_to_client/activation_grad', 0):,.0f} | {r['mb_per_round']['client_to_server']:.3f} | "
              f"{r['mb_per_round']['server_to_client']:.3f} | {100 * r['codec_share']:.2f} % |")
    worst = max(results, key=lambda r: r["codec_share"])
    print(f"\nRESULT  worst codec share {100 * worst['codec_share']:.2f} % ({worst['method']}, {worst['format']}); "
          f"target <= {100 * TARGET:.0f} %: {'met' if worst['codec_share'] <= TARGET else 'MISSED'}; "
          f"one thread, {args.rounds} rounds per cell, {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "rounds": args.rounds, "samples": args.samples,
                                               "model": args.model, "cpu": platform.processor() or platform.machine()},
                                              indent=2))


if __name__ == "__main__":
    main()
