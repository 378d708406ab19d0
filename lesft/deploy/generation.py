"""Split generation over gRPC: ``lesft server --generation on|only`` serves a :class:`GenerationServer`,
``lesft client generate --server HOST:PORT`` drives it with the same :class:`SplitGenerator` as in process.

Service ``lesft.Generation`` (no protobuf, no pickle; the same tokens, TLS and chunking as training):

- ``Open``  (unary, JSON -> JSON): a new session {batch, temperature, top_p, seed, label_private} -> {session, ...}
- ``Step``  (unary request -> chunked reply): one ``GenStep`` message -> its ``GenReply``
- ``StepStream`` (chunked both ways): the same, for a prefill larger than one chunk
- ``Close`` (unary, JSON -> JSON): free the session's cache -> the server's numbers for it

A session belongs to the client whose token opened it. Sessions are bounded (``SessionLimits``: open sessions,
positions per session, rows, idle time); a reaper thread drops idle ones, so a client that vanishes
mid-generation costs its cache for at most ``idle_s``. Every refusal is a gRPC status naming the reason, and
the other sessions go on.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc

from lesft.config import add_dataclass_args, from_dict
from lesft.deploy.wire import (MB, MessageTooLarge, NetArgs, bearer, call_with_retries, channel, check_tokens, chunks,
                              join, metadata, start_server)
from lesft.generation import GenerateConfig, GenerationServer, SessionError, SessionLimits, cut
from lesft.messages import GenReply, GenStep, decode, encode_parts, payload_size
from lesft.transport import Meter

SERVICE = "lesft.Generation"
RETRY = {grpc.StatusCode.UNAVAILABLE}


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------


def generation_handler(gen: GenerationServer, tokens: dict[str, int], net: NetArgs,
                       wire_dtype: str = "fp32") -> grpc.GenericRpcHandler:
    """The ``lesft.Generation`` handlers around ``gen`` (start a reaper thread for its idle sessions)."""

    check_tokens(tokens)

    def who(context: grpc.ServicerContext) -> int:
        cid = bearer(context.invocation_metadata(), tokens)
        if cid is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "unknown or missing client token (expected authorization: Bearer <token>)")
        return cid

    def guarded(context: grpc.ServicerContext, fn):
        try:
            return fn()
        except SessionError as e:
            context.abort(grpc.StatusCode[e.code], str(e))
        except MessageTooLarge as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # a malformed message or JSON
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {type(e).__name__}: {e}")

    def step(cid: int, data: bytearray) -> list:
        msg = decode(data)
        if not isinstance(msg, GenStep):
            raise SessionError("INVALID_ARGUMENT", f"expected a gen_step message, got {msg.kind!r}")
        return encode_parts(gen.step(cid, msg), wire_dtype)[0]

    def open_(request: bytes, context: grpc.ServicerContext) -> bytes:
        cid = who(context)
        return guarded(context, lambda: json.dumps(gen.open(cid, json.loads(request or b"{}"))).encode())

    def close(request: bytes, context: grpc.ServicerContext) -> bytes:
        cid = who(context)
        return guarded(context, lambda: json.dumps(gen.close(cid, json.loads(request)["session"])).encode())

    def step_one(request: bytes, context: grpc.ServicerContext):
        cid = who(context)
        yield from chunks(guarded(context, lambda: step(cid, join([request], net.max_message_mb))), net.chunk_mb)

    def step_stream(request_iterator, context: grpc.ServicerContext):
        cid = who(context)
        yield from chunks(guarded(context, lambda: step(cid, join(request_iterator, net.max_message_mb))),
                          net.chunk_mb)

    def reaper() -> None:
        while not gen.stopped.wait(max(0.05, min(gen.limits.idle_s / 4, 1.0))):
            gen.reap()

    threading.Thread(target=reaper, daemon=True, name="lesft-gen-reaper").start()
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Open": grpc.unary_unary_rpc_method_handler(open_),
        "Close": grpc.unary_unary_rpc_method_handler(close),
        "Step": grpc.unary_stream_rpc_method_handler(step_one),
        "StepStream": grpc.stream_stream_rpc_method_handler(step_stream),
    })


def serve_generation(gen: GenerationServer, address: str, net: NetArgs, tokens: dict[str, int],
                     wire_dtype: str = "fp32", workers: int = 16) -> tuple[grpc.Server, int]:
    """A gRPC server with the generation service only, started on ``address``; returns (server, port)."""
    return start_server((generation_handler(gen, tokens, net, wire_dtype),), address, net, workers)


def build_generation(cfg: Any, adapter: str | None, limits: SessionLimits) -> GenerationServer:
    """The server's part of ``cfg``'s split (no tokenizer) with the server LoRA of ``adapter`` folded in."""
    from lesft.model.load import load_model
    from lesft.model.split import inspect_decoder, resolve_client_layers

    model, _ = load_model(cfg.model, device="cpu", tokenizer=False)
    k = resolve_client_layers(cfg.client_layers, len(inspect_decoder(model).layers))
    if adapter is None:
        print("lesft server: generation serves the base model's server layers (no --adapter)", flush=True)
    _, _, top = cut(model, k, adapter, cfg.label_privacy, client=False)
    return GenerationServer(top, model.config.hidden_size, limits)


# ---------------------------------------------------------------- lesft server flags

_SERVER_FLAGS = ("generation", "adapter") + tuple(f"gen.{f.name}" for f in fields(SessionLimits))


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generation", choices=("off", "on", "only"), default="off",
                   help="serve split generation too (on) or only (only: no training service)")
    p.add_argument("--adapter", default=None, help="generation: peft adapter holding the server layers' LoRA "
                                                   "(SERVER_OUT/adapter or a whole-model RUN/adapter; default: "
                                                   "OUT/adapter if it exists)")
    add_dataclass_args(p, SessionLimits, prefix="gen.")


def pop_server_args(args: argparse.Namespace) -> tuple[str, str | None, SessionLimits]:
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

    gen = build_generation(cfg, server_adapter(adapter, cfg.out), limits)
    server, port = serve_generation(gen, listen, net, tokens, cfg.wire_dtype)
    print(f"lesft server: serving generation ({len(tokens)} clients) on {listen.rsplit(':', 1)[0]}:{port}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    gen.shutdown()
    return 0


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------


class RemoteError(ConnectionError):
    """The generation server refused a call (the message names why)."""


class RemoteGen:
    """A :class:`~lesft.generation.GenLink` to ``lesft server --generation``; bytes counted in ``meter``
    exactly as :class:`~lesft.transport.Loopback` counts them in process."""

    def __init__(self, address: str, token: str, net: NetArgs, wire_dtype: str = "fp32",
                 meter: Meter | None = None) -> None:
        self.address, self.net, self.wire_dtype = address, net, wire_dtype
        self.meter = meter or Meter()
        self.metadata = metadata(token)
        self.channel = channel(address, net)
        self._open = self.channel.unary_unary(f"/{SERVICE}/Open")
        self._close = self.channel.unary_unary(f"/{SERVICE}/Close")
        self._step = self.channel.unary_stream(f"/{SERVICE}/Step")
        self._stream = self.channel.stream_stream(f"/{SERVICE}/StepStream")

    def _call(self, what: str, fn):
        try:
            return call_with_retries(fn, self.net, RETRY)
        except grpc.RpcError as e:
            raise RemoteError(f"generation server {self.address} refused {what}: {e.code().name}: "
                              f"{e.details()}") from None

    def open(self, params: dict[str, Any]) -> str:
        reply = self._call("open", lambda: self._open(json.dumps(params).encode(), metadata=self.metadata,
                                                      timeout=self.net.timeout_s))
        return json.loads(reply)["session"]

    def step(self, msg: GenStep) -> GenReply:
        parts, payload = encode_parts(msg, self.wire_dtype)
        size = len(parts[0]) + payload
        one = size <= self.net.chunk_mb * MB

        def once() -> bytearray:
            if one:
                replies = self._step(b"".join(parts), metadata=self.metadata, timeout=self.net.timeout_s)
            else:
                replies = self._stream(chunks(parts, self.net.chunk_mb), metadata=self.metadata,
                                       timeout=self.net.timeout_s)
            return join(replies, self.net.max_message_mb)

        reply = self._call(f"step {msg.step} of session {msg.session}", once)  # a retried step gets the same reply
        self.meter.add("client_to_server", msg.kind, payload, size)
        out = decode(reply)
        self.meter.add("server_to_client", out.kind, payload_size(reply), len(reply))
        return out

    def close(self, session: str) -> dict[str, Any]:
        reply = self._call("close", lambda: self._close(json.dumps({"session": session}).encode(),
                                                        metadata=self.metadata, timeout=self.net.timeout_s))
        return json.loads(reply)

    def shutdown(self) -> None:
        self.channel.close()


# ---------------------------------------------------------------- lesft client generate

_CLIENT_FLAGS = ("action", "run") + tuple(f.name for f in fields(GenerateConfig))


def add_client_arguments(p: argparse.ArgumentParser) -> None:
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
    from lesft.deploy.cli import _split_args
    from lesft.deploy.wire import client_token
    from lesft.generation import SplitGenerator, SplitSpec, complete
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
    link = RemoteGen(args.server, token, net, spec.wire_dtype)
    try:
        complete(SplitGenerator(bottom, link, model.generation_config, head, cfg_gen.gen_seed), tokenizer, cfg_gen,
                 spec.chat_template)
    finally:
        link.shutdown()
    return 0
