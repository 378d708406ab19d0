"""What a run will send, and how long its rounds will take on a link, from the config alone (``lesft plan``).

    lesft plan CONFIG --link 4g [--link 3g ...] [--compute RUN_DIR | --client-s-per-row S --server-s-per-row S]

**Bytes** are exact: every message a round sends is built with the shapes the config implies (the rows each
client draws, in the order it draws them, padded as the engine pads them; the model's hidden size; the wire
format) and encoded by the same encoder the run uses, with zeros in place of the values. Nothing is trained.
Only the standard split is modelled (not ``label_privacy``'s second round trip).

**Round time** follows the link model of ``lesft.deploy.netem`` (a message of S bytes one way takes
RTT/2 + 8 S / rate, the rate being min(bandwidth, the TCP loss bound), plus the expected jitter and loss delay:
:func:`one_way`) and the step barrier of Algorithm 1:
in each micro-step every device computes its forward and uploads; the server starts when the last
activation has arrived, computes, and sends each device its gradient, which it back-propagates. So

    step = max_i(fwd_i + up_i) + server + max_i(down_i + bwd_i),   round = grad_accum x step,

with compute times taken per row from a measured run (``--compute``: a run's ``summary.json``
``latency_s``, per device and for the server) and a device's forward taken as 1/3 of its compute (backward
costs about twice the forward). An aggregation round adds the client adapter up and down (the same link
model) and a fixed Flower overhead (``--flower-overhead-s``, measured with ``bench/bench_flower.py``).
HTTP/2 and TLS framing (about 0.2 %) and TCP's own dynamics are left out, as the emulated link leaves them out.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lesft.config import TrainConfig
from lesft.deploy.netem import CHUNK, MSS, PROFILES, Profile, parse_profile

FWD_SHARE = 1 / 3  # a device's forward as a share of its forward + backward


@dataclass
class Traffic:
    """Bytes of one planned run (each list: per client, per micro-step of the planned rounds)."""

    up: list[list[int]]  # client -> server, encoded (length prefix + JSON header + tensors)
    down: list[list[int]]  # server -> client, encoded
    rows: list[list[int]]  # rows in the micro-batch
    adapter: int  # one client adapter upload (= one broadcast), 0 when the run never aggregates
    grad_accum: int
    rounds: int
    aggregate_every: int

    def per_round(self, direction: str) -> float:
        """Mean bytes per round over all clients, one direction."""
        return sum(map(sum, getattr(self, direction))) / self.rounds


def traffic(cfg: TrainConfig) -> Traffic:
    """The bytes each message of ``cfg``'s run will take, from its data, tokenizer and model config."""
    from transformers import AutoConfig, AutoTokenizer

    from lesft import methods
    from lesft.data.rows import load_rows
    from lesft.data.samples import build_sample, collate
    from lesft.messages import ActivationGrad, Activations, CachedActivations, WireFormat, encode
    from lesft.model.load import resolve
    from lesft.roles import DataStream
    from lesft.train import num_rounds, split_clients

    cfg = methods.resolve(cfg)
    if not cfg.split:
        raise ValueError(f"method {cfg.method!r} does not split the model: nothing crosses a split link")
    if cfg.label_privacy:
        raise ValueError("lesft plan models the standard split only; label_privacy adds a second round trip "
                         "per micro-step that it does not predict yet")
    path = resolve(cfg.model)
    hidden = AutoConfig.from_pretrained(path).hidden_size
    tok = AutoTokenizer.from_pretrained(path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = load_rows(cfg.data, cfg.samples, cfg.data_seed, cfg.synthetic, data_dir=cfg.data_dir, target=cfg.target,
                     rationale=cfg.rationale)
    ref_rows = rows if cfg.reference == "solution" else [{**r, "reference": r["target"]} for r in rows]
    samples = [build_sample(tok, r, cfg.paths, cfg.max_length, cfg.chat_template) for r in ref_rows]
    parts = split_clients(cfg, rows)
    rounds = num_rounds(cfg, [len(p) for p in parts])
    wire = WireFormat.of(cfg)
    up, down, nrows = [], [], []
    for cid, idx in enumerate(parts):
        stream = DataStream([samples[j] for j in idx], cfg.batch_size, seed=cfg.seed * 1000 + cid)
        sent: set[tuple[int, ...]] = set()
        u, d, n = [], [], []
        for step in range(rounds * cfg.grad_accum):
            picked = stream.next_rows()
            n.append(len(picked))
            b = collate([stream.samples[i] for i in picked], pad_id, cfg.pad_to_multiple)
            if cfg.frozen_cache_mb and tuple(picked) in sent:  # named by reference (assumes the cache holds it)
                u.append(len(encode(CachedActivations(cid, step, picked), wire)[0]))
            else:
                sent.add(tuple(picked))
                msg = Activations(cid, step, _path(b.ids, b.mask, b.labels, hidden),
                                  _path(b.ref_ids, b.ref_mask, b.ref_labels, hidden) if b.ref_ids is not None else None)
                msg.rows = picked if cfg.frozen_cache_mb else None  # the key the server caches it under
                u.append(len(encode(msg, wire)[0]))
            if cfg.client_trainable:
                d.append(len(encode(ActivationGrad(cid, step, torch.zeros(*b.ids.shape, hidden)), wire)[0]))
            else:
                d.append(0)
        up.append(u)
        down.append(d)
        nrows.append(n)
    return Traffic(up, down, nrows, _adapter_bytes(cfg, path, wire) if cfg.aggregate_every else 0,
                   cfg.grad_accum, rounds, cfg.aggregate_every)


def _path(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, hidden: int):
    from lesft.messages import PathBatch

    pos = torch.arange(ids.shape[1]).expand_as(ids)  # what the client layers return (ClientPart.forward)
    return PathBatch(torch.zeros(*ids.shape, hidden), mask, pos, labels)


def _adapter_bytes(cfg: TrainConfig, path: str, wire: Any) -> int:
    """One encoded client adapter upload: the LoRA tensors of the client layers (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lesft.lora import lora_state
    from lesft.messages import AdapterUpload, encode
    from lesft.train import build_parts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        bottom = build_parts(cfg, model)[1]
    tensors = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in lora_state(bottom).items()}
    return len(encode(AdapterUpload(0, 0, tensors), wire)[0])


@dataclass
class Compute:
    """Measured busy seconds per row: one device's forward + backward, and the server's."""

    client_s_per_row: float
    server_s_per_row: float
    source: str = ""

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Compute":
        """From a finished run's ``summary.json`` (``latency_s``: mean busy seconds per client, and the
        server's) and the rows it trained: rounds x grad_accum x batch_size per client."""
        from lesft.typed import load_yaml

        s = json.loads((Path(run_dir) / "summary.json").read_text())
        cfg = load_yaml(Path(run_dir) / "config.yaml")
        per_client = s["rounds"] * int(cfg["grad_accum"]) * int(cfg["batch_size"])
        clients = len(s["samples_per_client"])
        if not s["latency_s"].get("server"):
            raise ValueError(f"{run_dir}: the run has no split server time (latency_s.server); pass "
                             "--server-s-per-row")
        return cls(s["latency_s"]["client"] / per_client, s["latency_s"]["server"] / (per_client * clients),
                   f"measured in {run_dir}")


def one_way(nbytes: float, prof: Profile, direction: str) -> float:
    """Expected seconds for one message of ``nbytes`` bytes to cross ``prof`` in ``direction`` ('up' or 'down'),
    as the emulated link carries it (``lesft.deploy.netem``): the one-way delay RTT/2; every byte at the rate,
    min(bandwidth, the TCP loss bound) (a flow held to the bound's window sends a short message no faster);
    the latest of its chunks' jitter, E[max of n uniform draws] = jitter/2 (n-1)/(n+1); and one RTT when its
    first 64 KiB chunk loses a segment (probability 1 - (1-p)^segments: later chunks wait behind it)."""
    if not nbytes:
        return 0.0
    wire = nbytes * 8 / (prof.expected_mbit(direction) * 1e6)
    n = math.ceil(nbytes / CHUNK)
    jitter = prof.jitter_ms / 2e3 * (n - 1) / (n + 1)
    hol = prof.rtt_ms / 1e3 * (1 - (1 - prof.loss_pct / 100) ** math.ceil(min(nbytes, CHUNK) / MSS))
    return prof.rtt_ms / 2e3 + wire + jitter + hol


def round_time(t: Traffic, prof: Profile, compute: Compute | None, flower_overhead_s: float = 0.0,
               step_overhead_s: float = 0.0) -> dict[str, float]:
    """Mean seconds per round on ``prof`` (every device on that link), split into the parts of the round as
    the slowest device sees them; ``aggregation``: the mean per round of the aggregation rounds' extra;
    ``step_overhead_s``: a fixed cost per micro-step outside compute and the link (encoding, gRPC, the
    optimizer; measure it on a fast link), under ``other``."""
    n = len(t.up)
    parts = dict(device_compute=0.0, upload=0.0, server_compute=0.0, download=0.0, waiting=0.0, other=0.0)
    steps = len(t.up[0])
    for s in range(steps):
        cs = [t.rows[i][s] * (compute.client_s_per_row if compute else 0.0) for i in range(n)]
        ups = [one_way(t.up[i][s], prof, "up") for i in range(n)]
        downs = [one_way(t.down[i][s], prof, "down") for i in range(n)]
        server = sum(t.rows[i][s] for i in range(n)) * (compute.server_s_per_row if compute else 0.0)
        first = [c * FWD_SHARE + u for c, u in zip(cs, ups)]
        second = [dn + c * (1 - FWD_SHARE) for c, dn in zip(cs, downs)]
        slow = max(range(n), key=lambda i: first[i] + second[i])
        parts["device_compute"] += cs[slow]
        parts["upload"] += ups[slow]
        parts["download"] += downs[slow]
        parts["server_compute"] += server
        parts["waiting"] += max(first) - first[slow] + max(second) - second[slow]
        parts["other"] += step_overhead_s
    out = {k: v / t.rounds for k, v in parts.items()}
    out["split_round"] = sum(out.values())
    aggs = -(-t.rounds // t.aggregate_every) if t.aggregate_every else 0  # the last round aggregates too
    per_agg = (one_way(t.adapter, prof, "up") + one_way(t.adapter, prof, "down") + flower_overhead_s) if aggs else 0.0
    out["aggregation"] = per_agg * aggs / t.rounds
    out["round"] = out["split_round"] + out["aggregation"]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML config (the same file every party uses)")
    p.add_argument("--link", action="append", default=[], metavar="PROFILE",
                   help=f"a link profile ({', '.join(PROFILES)}) or a key=value spec (e.g. 'up=5mbit,down=20mbit,"
                        "rtt=80ms,loss=0.5'); repeatable; default: every named profile")
    p.add_argument("--compute", metavar="RUN_DIR", help="take compute seconds per row from this finished run "
                                                       "(its summary.json), measured on the hardware you will use")
    p.add_argument("--client-s-per-row", type=float, help="a device's forward + backward seconds per row")
    p.add_argument("--server-s-per-row", type=float, help="the split server's seconds per row")
    p.add_argument("--flower-overhead-s", type=float, default=0.0,
                   help="Flower's own seconds per aggregation round beyond the adapter transfer "
                        "(bench/bench_flower.py measures it)")
    p.add_argument("--step-overhead-s", type=float, default=0.0,
                   help="a fixed cost per micro-step outside compute and the link (encoding, gRPC, optimizer), "
                        "measured on a fast link")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace, cfg: TrainConfig) -> int:
    compute = None
    if args.compute:
        compute = Compute.from_run(args.compute)
    if args.client_s_per_row is not None or args.server_s_per_row is not None:
        if args.client_s_per_row is None or args.server_s_per_row is None:
            raise ValueError("give both --client-s-per-row and --server-s-per-row (or --compute RUN_DIR)")
        compute = Compute(args.client_s_per_row, args.server_s_per_row, "given")
    profiles = [parse_profile(s) for s in args.link] or list(PROFILES.values())
    t = traffic(cfg)
    plans = {p.name: round_time(t, p, compute, args.flower_overhead_s, args.step_overhead_s) for p in profiles}
    if args.json:
        print(json.dumps({"bytes_per_round": {"up": t.per_round("up"), "down": t.per_round("down"),
                                              "adapter": t.adapter}, "rounds": t.rounds,
                          "compute": vars(compute) if compute else None, "plans": plans}, indent=2))
        return 0
    n = len(t.up)
    print(f"{cfg.method} on {cfg.model}: {n} devices, {t.rounds} rounds of {t.grad_accum} micro-steps "
          f"(one request and reply each), wire {cfg.wire_dtype}")
    print(f"bytes per round, all devices: up {t.per_round('up') / 1e6:.2f} MB, down {t.per_round('down') / 1e6:.2f} MB"
          + (f"; each aggregation: {t.adapter / 1e6:.2f} MB per device each way, every {t.aggregate_every} rounds"
             if t.aggregate_every else ""))
    print(f"compute: {compute.source}: device {compute.client_s_per_row:.3f} s/row, server "
          f"{compute.server_s_per_row:.3f} s/row" if compute else
          "compute: not included (give --compute RUN_DIR): link time only")
    print("| link | round (s) | device compute | upload | server compute | download | waiting | other | aggregation |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in profiles:
        r = plans[p.name]
        print(f"| {p.describe()} | {r['round']:.2f} | " + " | ".join(
            f"{r[k]:.2f}" for k in ("device_compute", "upload", "server_compute", "download", "waiting",
                                    "other", "aggregation")) + " |")
    return 0
