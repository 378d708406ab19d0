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

import json
import threading
from typing import Any

import grpc

from lesft.deploy.wire import (MessageTooLarge, NetArgs, RemoteError, bearer, call_with_retries, channel,
                              check_tokens, chunks, join, metadata, send_message, start_server)
from lesft.generation import GenerationServer, SessionError, SessionLimits, cut
from lesft.messages import GenReply, GenStep, decode, encode_parts
from lesft.transport import Meter

__all__ = ["RemoteError", "RemoteGen", "build_generation", "generation_handler", "serve_generation"]

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


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------


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
        return send_message(msg, self.wire_dtype, self.net, self._step, self._stream, self.metadata, self.net.timeout_s,
                            lambda fn: self._call(f"step {msg.step} of session {msg.session}", fn), self.meter)
        # a retried step gets the same reply (the server keeps its last one)

    def close(self, session: str) -> dict[str, Any]:
        reply = self._call("close", lambda: self._close(json.dumps({"session": session}).encode(),
                                                        metadata=self.metadata, timeout=self.net.timeout_s))
        return json.loads(reply)

    def shutdown(self) -> None:
        self.channel.close()
