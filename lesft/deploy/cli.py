"""``lesft server`` and ``lesft client``: split training across processes and machines over gRPC.

    lesft server --config run.yaml --listen 127.0.0.1:50051 --tokens tokens.json --out runs/server
    lesft client --config run.yaml --server 127.0.0.1:50051 --token-file tokens.json --client-id 0 \\
                 --data my_rows.jsonl --out runs/client0

Both take the training config (``--config`` and the ``lesft train`` flags): the fields that shape the
split (client layers, method switches, LoRA, loss, wire dtype, seed, grad_accum) must agree, and the
server refuses a client whose config differs. The server loads the model without a tokenizer and
keeps only its part (and never receives token ids of the input; with ``--label_privacy`` no targets).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from lesft.config import TrainConfig
from lesft.flags import add_dataclass_args
from lesft.typed import apply_overrides, from_dict, load_yaml
from lesft.deploy import generation
from lesft.deploy.wire import NetArgs, channel
from lesft.generation import GenerateConfig, SessionLimits

_OWN = ("command", "config", "listen", "tokens", "server", "token", "token_file", "client_id", "take_share",
        "max_rounds")


def _split_args(args: argparse.Namespace) -> tuple[TrainConfig, NetArgs]:
    net_keys = {f.name for f in fields(NetArgs)}
    given = {k: v for k, v in vars(args).items() if k not in _OWN}
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    net_data = {k: data.pop(k) for k in list(data) if k in net_keys}
    net = from_dict(NetArgs, {**net_data, **{k: v for k, v in given.items() if k in net_keys}})
    cfg = from_dict(TrainConfig, apply_overrides(data, {k: v for k, v in given.items() if k not in net_keys}))
    return cfg, net


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of TrainConfig (and network) fields")
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve on (port 0: any free port)")
    p.add_argument("--tokens", required=True, help="JSON {client id: token}; created with --clients random "
                                                   "tokens if missing (hand each client its own)")
    p.add_argument("--max-rounds", dest="max_rounds", type=int, default=0,
                   help="stop after this many finished rounds (0: serve until interrupted)")
    add_dataclass_args(p, TrainConfig)
    add_dataclass_args(p, NetArgs)
    add_generation_server_arguments(p)


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of TrainConfig (and network) fields")
    p.add_argument("--server", required=True, help="HOST:PORT of `lesft server`")
    p.add_argument("--token", help="this client's token")
    p.add_argument("--token-file", dest="token_file", help="JSON {client id: token}: take this client's")
    p.add_argument("--client-id", dest="client_id", type=int, required=True, help="this client's id (0..N-1)")
    p.add_argument("--take-share", dest="take_share", action="store_true",
                   help="use the share of --data that the in-process simulation gives this client among --clients "
                        "(experiments on one machine); default: every row of --data is this device's")
    add_dataclass_args(p, TrainConfig)
    add_dataclass_args(p, NetArgs)
    add_generation_client_arguments(p)


def build_service(cfg: TrainConfig, net: NetArgs, clients: list[int], out: Path | None):
    """Load the server's part of the model (no tokenizer) and wrap it in a SplitService."""
    from lesft import methods
    from lesft.deploy.service import SplitService
    from lesft.model.load import load_model, resolve_device
    from lesft.roles import SplitServer
    from lesft.train import build_parts

    cfg = methods.resolve(cfg)
    if not cfg.split:
        raise ValueError(f"method {cfg.method!r} does not split the model: there is nothing to serve")
    model, _ = load_model(cfg.model, device="cpu", tokenizer=False)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    k, bottom, top, head, layers_path = build_parts(cfg, model)
    del bottom, head, model  # the server keeps its layers only
    device = resolve_device(cfg.device)
    return SplitService(SplitServer(top.to(device), cfg, device), cfg, clients, net, hidden, vocab, out,
                        layout=(k, layers_path))


def run_server(args: argparse.Namespace) -> int:
    from lesft.deploy.endpoint import serve
    from lesft.deploy.wire import load_tokens, server_credentials

    mode, adapter, limits = pop_generation_server_args(args)
    cfg, net = _split_args(args)
    server_credentials(args.listen, net)  # refuse plaintext on a public address before loading anything
    tokens = load_tokens(args.tokens, cfg.clients)
    if mode == "only":
        return run_generation_only(cfg, net, tokens, args.listen, adapter, limits)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    service = build_service(cfg, net, sorted(set(tokens.values())), out)
    gen = generation.build_generation(cfg, server_adapter(adapter, cfg.out), limits) if mode == "on" else None
    handlers = (generation.generation_handler(gen, tokens, net, cfg.wire_dtype),) if gen is not None else ()
    server, port = serve(service, args.listen, net, tokens, handlers=handlers)
    host = args.listen.rsplit(":", 1)[0]
    print(f"lesft server: serving {cfg.method} ({len(tokens)} clients) on {host}:{port}, state in {out}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if args.max_rounds and service.step >= args.max_rounds * service.cfg.grad_accum:
            break
    server.stop(grace=2).wait()
    (out / "server_summary.json").write_text(json.dumps(service.summary(), indent=2))
    c = service.counts
    print(f"lesft server: stopped at round {service.step // service.cfg.grad_accum} ({c['rounds_applied']} updates "
          f"applied, {c['rounds_rejected']} rejected; {c['steps_failed']} failed steps)", flush=True)
    return 0


def train_remote(cfg: TrainConfig, net: NetArgs, server: str, token: str, client_id: int, take_share: bool,
                 start_adapter: dict | None = None, leave: bool = True, model: Any = None,
                 tokenizer: Any = None) -> tuple[dict[str, Any], int]:
    """Load this client's rows and train ``cfg`` against the split server at ``server``; return (the run's
    summary, |D_i|). ``leave``: tell the server afterwards not to wait for this client any more.
    ``model``/``tokenizer``: a loaded copy to train (consumed), instead of loading ``cfg.model``."""
    from lesft.data.rows import load_rows
    from lesft.deploy.remote import RemoteSplit
    from lesft.train import split_clients, train

    rows = load_rows(cfg.data, cfg.samples, cfg.data_seed, cfg.synthetic, data_dir=cfg.data_dir, target=cfg.target,
                     rationale=cfg.rationale)
    if take_share:
        rows = [rows[i] for i in split_clients(cfg, rows)[client_id]]
    link = RemoteSplit(server, token, cfg, net)
    try:
        summary = train(cfg, model, tokenizer, rows=rows, link=link, client_id=client_id,
                        start_adapter=start_adapter)
    finally:
        link.close(leave=leave)
    return summary, len(rows)


def run_client(args: argparse.Namespace) -> int:
    from lesft import methods
    from lesft.deploy.wire import channel, client_token

    action, flags = pop_client_action(args)
    if action == "generate":
        return run_client_generate(args, flags)
    cfg, net = _split_args(args)
    cfg = methods.resolve(cfg)
    channel(args.server, net).close()  # refuse plaintext to a public address before loading anything
    if cfg.aggregate_every:
        print(f"lesft client: {cfg.method} aggregates every {cfg.aggregate_every} rounds; a standalone client "
              "trains without aggregation (use the Flower apps, docs/deploy.md, to aggregate)", flush=True)
    token = client_token(args.client_id, args.token, args.token_file)
    summary, _ = train_remote(cfg, net, args.server, token, args.client_id, args.take_share)
    if summary.get("rounds_skipped"):  # rc 3: the run is not the one planned; a script must not take it as done
        spans = ", ".join(f"{s['from']}..{s['to']} ({s['reason']})" for s in summary["rounds_skipped"])
        print(f"lesft client {args.client_id}: trained {summary['rounds']} of {summary['rounds_planned']} rounds; "
              f"skipped {spans}; see {cfg.out}/summary.json", file=sys.stderr, flush=True)
        return 3
    print(f"lesft client {args.client_id}: done, {summary['rounds']} rounds, final loss {summary['final_loss']:.4f}, "
          f"bytes {summary['comm_bytes']} -> {cfg.out}", flush=True)
    return 0


# ---------------------------------------------------------------- lesft server flags

_SERVER_FLAGS = ("generation", "adapter") + tuple(f"gen.{f.name}" for f in fields(SessionLimits))


def add_generation_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generation", choices=("off", "on", "only"), default="off",
                   help="serve split generation too (on) or only (only: no training service)")
    p.add_argument("--adapter", default=None, help="generation: peft adapter holding the server layers' LoRA "
                                                   "(SERVER_OUT/adapter or a whole-model RUN/adapter; default: "
                                                   "OUT/adapter if it exists)")
    add_dataclass_args(p, SessionLimits, prefix="gen.")


def pop_generation_server_args(args: argparse.Namespace) -> tuple[str, str | None, SessionLimits]:
    """Take the generation flags off ``args`` (the rest is the training config): (mode, adapter, limits)."""
    got = {k: vars(args).pop(k) for k in _SERVER_FLAGS if k in vars(args)}
    limits = from_dict(SessionLimits, {k[4:]: v for k, v in got.items() if k.startswith("gen.")})
    return got.get("generation", "off"), got.get("adapter"), limits


def server_adapter(adapter: str | None, out: str) -> str | None:
    if adapter is None and (Path(out) / "adapter" / "adapter_config.json").is_file():
        return str(Path(out) / "adapter")
    return adapter


def run_generation_only(cfg: Any, net: NetArgs, tokens: dict[str, int], listen: str, adapter: str | None,
                        limits: SessionLimits) -> int:
    """``lesft server --generation only``: serve generation until interrupted."""
    import signal

    gen = generation.build_generation(cfg, server_adapter(adapter, cfg.out), limits)
    server, port = generation.serve_generation(gen, listen, net, tokens, cfg.wire_dtype)
    print(f"lesft server: serving generation ({len(tokens)} clients) on {listen.rsplit(':', 1)[0]}:{port}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    gen.shutdown()
    return 0


# ---------------------------------------------------------------- lesft client generate

_CLIENT_FLAGS = ("action", "run") + tuple(f.name for f in fields(GenerateConfig))


def add_generation_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("train", "generate"), default="train",
                   help="train (default): split training; generate: complete prompts through the split server")
    p.add_argument("--run", help="generate: this client's run directory (config.yaml + adapter/: the client "
                                 "layers' LoRA are read from it)")
    add_dataclass_args(p, GenerateConfig)


def pop_client_action(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Take the generation flags off ``args``: (action, those flags)."""
    got = {k: vars(args).pop(k) for k in _CLIENT_FLAGS if k in vars(args)}
    return got.pop("action", "train"), got


def run_client_generate(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    """``lesft client generate --run DIR --server HOST:PORT``: this device's layers, the server's rest."""
    from lesft.deploy.wire import client_token
    from lesft.generation import SplitGenerator, SplitSpec, complete, cut
    from lesft.model.load import load_model
    from lesft.model.split import inspect_decoder, resolve_client_layers

    run = flags.pop("run", None)
    if not run:
        raise ValueError("lesft client generate needs --run DIR (this client's run directory)")
    cfg_gen = from_dict(GenerateConfig, flags)
    typed = {k for k in ("label_privacy", "chat_template", "wire_dtype") if k in vars(args)}
    _, net = _split_args(args)
    channel(args.server, net).close()  # refuse plaintext to a public address before loading anything
    spec = SplitSpec.from_run(run)
    for k in typed:
        setattr(spec, k, getattr(args, k))
    token = client_token(args.client_id, args.token, args.token_file)
    model, tokenizer = load_model(spec.model, device="cpu")
    k = resolve_client_layers(spec.client_layers, len(inspect_decoder(model).layers))
    bottom, head, _ = cut(model, k, Path(run) / "adapter", spec.label_privacy, server=False)
    link = generation.RemoteGen(args.server, token, net, spec.wire_dtype)
    try:
        complete(SplitGenerator(bottom, link, model.generation_config, head, cfg_gen.gen_seed), tokenizer, cfg_gen,
                 spec.chat_template)
    finally:
        link.shutdown()
    return 0
