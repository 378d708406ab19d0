"""The split server as a gRPC service: many clients, one batch per micro-step, nothing blocks forever.

Each client streams its ``Activations`` for micro-step ``s`` and waits for its reply. When every
expected client's message for ``s`` is in -- or ``timeout_s`` after the first arrived -- the server runs
once on the concatenation (in client-id order, as the in-process simulation does) and answers each
client with its own slice of dL/dh; a client that missed the step is left out of the following ones
until it says hello again. After every ``grad_accum`` micro-steps the server steps its optimizer and,
with an ``out`` directory, writes a checkpoint (safetensors + JSON) before answering: a restarted
server resumes at the last finished round. Every incoming tensor is checked (kind, owner, dtype,
shape, finiteness, batch/sequence limits) and a bad one is answered with an error, not a crash.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import load_file, save_file

from lesft.checkpoint import _load_optimizer, _optimizer_state
from lesft.config import TrainConfig, to_dict
from lesft.deploy.wire import EXCHANGE, EXCHANGE_ONE, HELLO, MessageTooLarge, NetArgs, chunks, join, server_credentials
from lesft.lora import export_adapter, load_lora_state, lora_state
from lesft.messages import Activations, ActivationGrad, Message, PathBatch, decode, encode_parts, payload_size
from lesft.roles import SplitServer
from lesft.transport import Meter

# Config fields that client and server must agree on (a client with others is refused at hello).
AGREE = ("client_layers", "split", "client_trainable", "paths", "loss", "label_privacy", "grad_accum",
         "wire_dtype", "dtype", "seed", "lora", "lesft")


Parts = list  # an encoded message as ``messages.encode_parts`` pieces


class ServiceError(Exception):
    """An error answered to one call; ``code`` is a ``grpc.StatusCode``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def stale(step: int, now: int) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                        f"resync: step {step} is closed or unknown, the server is at step {now}")


@dataclass
class Limits:
    max_batch: int = 64      # rows per client message
    max_seq: int = 8192      # tokens per row


def _check_path(pb: PathBatch | None, name: str, hidden: int, vocab: int, limits: Limits,
                labels: bool | None) -> None:
    """Raise ValueError naming what is wrong with one path of an incoming message."""
    if pb is None:
        raise ValueError(f"{name}: missing")
    h = pb.hidden
    if h.dim() != 3 or h.shape[2] != hidden:
        raise ValueError(f"{name}.hidden: shape {list(h.shape)}, expected [B, T, {hidden}]")
    b, t = h.shape[:2]
    if not 1 <= b <= limits.max_batch or not 1 <= t <= limits.max_seq:
        raise ValueError(f"{name}.hidden: batch {b} x sequence {t} outside the limits "
                         f"[1, {limits.max_batch}] x [1, {limits.max_seq}]")
    if not h.is_floating_point():
        raise ValueError(f"{name}.hidden: dtype {h.dtype}, expected a float")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}.hidden: contains NaN or infinite values")
    for key in ("attention_mask", "position_ids") + (("labels",) if labels else ()):
        v = getattr(pb, key)
        if v is None or tuple(v.shape) != (b, t) or v.is_floating_point():
            raise ValueError(f"{name}.{key}: expected integer [{b}, {t}], got "
                             f"{None if v is None else f'{v.dtype} {list(v.shape)}'}")
    if labels is False and pb.labels is not None:
        raise ValueError(f"{name}.labels: the server is label-private and refuses target ids")
    if labels and ((pb.labels != -100) & ((pb.labels < 0) | (pb.labels >= vocab))).any():
        raise ValueError(f"{name}.labels: ids outside [0, {vocab}) other than -100")


class SplitService:
    """The step barrier around a :class:`SplitServer`; transport-free (``serve`` puts gRPC around it)."""

    def __init__(self, server: SplitServer, cfg: TrainConfig, clients: list[int], net: NetArgs,
                 hidden_size: int, vocab_size: int, out: Path | None = None, limits: Limits | None = None,
                 layout: tuple[int, str] | None = None) -> None:
        self.server, self.cfg, self.net, self.out = server, cfg, net, out
        self.layout = layout  # (first server layer k, layers module path): to export OUT/adapter
        self.hidden, self.vocab, self.limits = hidden_size, vocab_size, limits or Limits()
        self.known = set(clients)
        self.expected = set(clients)
        self.meter = Meter()
        self.cv = threading.Condition()
        self.step, self.phase = 0, 1
        self.inbox: dict[int, Message] = {}
        self.batch: list[int] = []          # label-private: clients of the step's forward, owed a 2nd reply
        self.deadline: float | None = None
        self.busy = False
        self.replies: dict[int, tuple[int, int, Parts | ServiceError]] = {}  # cid -> (step, phase, reply)
        self.log: list[str] = []
        self.started = time.perf_counter()
        if out is not None and (out / "server_checkpoint" / "state.json").is_file():
            self._load(out / "server_checkpoint")

    # ------------------------------------------------------------------ calls

    def hello(self, cid: int, info: dict[str, Any]) -> dict[str, Any]:
        """Join (or rejoin, or leave with ``{"leaving": true}``); returns the server's step and round."""
        mine, theirs = to_dict(self.cfg), info.get("config", {})
        diff = [k for k in AGREE if k in theirs and theirs[k] != mine[k]]
        if diff:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"client {cid} and server disagree on {diff}: start both with the same config")
        with self.cv:
            if info.get("leaving"):
                self.expected.discard(cid)
                self._note(f"client {cid} left at step {self.step}")
            else:
                self.expected.add(cid)
            self.cv.notify_all()
            return {"step": self.step, "phase": self.phase, "grad_accum": self.cfg.grad_accum,
                    "rounds_done": self.step // self.cfg.grad_accum}

    def exchange(self, cid: int, data: bytes | bytearray) -> Parts:
        """One message in, the reply to it out (``encode_parts`` pieces). Raises :class:`ServiceError`."""
        try:
            msg = decode(data)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}") from None
        self._validate(cid, msg)
        phase = 1 if isinstance(msg, Activations) else 2
        self.meter.add("client_to_server", msg.kind, payload_size(data), len(data))
        with self.cv:
            cached = self.replies.get(cid)
            if cached and cached[:2] == (msg.step, phase):  # a retry after a lost reply
                return self._out(cached[2])
            if msg.step > self.step and (phase == 2 or msg.step % self.cfg.grad_accum):
                raise stale(msg.step, self.step)  # ahead mid-round: this server restarted from its last round
            if msg.step > self.step:  # rejoining at the next round start: wait for the others to get there
                if not self.cv.wait_for(lambda: self.step >= msg.step, timeout=2 * self.net.timeout_s):
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"server still at step {self.step}, client {cid} sent step {msg.step}")
            if msg.step != self.step or phase != self.phase or (phase == 2 and cid not in self.batch):
                raise stale(msg.step, self.step)
            self.inbox[cid] = msg
            if phase == 1:
                self.expected.add(cid)
            if self.deadline is None:
                self.deadline = time.monotonic() + self.net.timeout_s
            self.cv.notify_all()
            key = (msg.step, phase)
            while not (cid in self.replies and self.replies[cid][:2] == key):
                if not self.busy and self._ready():
                    self._process()
                else:
                    left = (self.deadline - time.monotonic()) if self.deadline else 1.0
                    self.cv.wait(timeout=max(0.01, min(left, 1.0)))
            return self._out(self.replies[cid][2])

    # ------------------------------------------------------------------ the step

    def _ready(self) -> bool:
        waiting_for = self.expected if self.phase == 1 else set(self.batch)
        return bool(self.inbox) and (waiting_for <= set(self.inbox) or time.monotonic() >= self.deadline)

    def _process(self) -> None:
        """Run the server on what arrived (called with the lock held; computes without it)."""
        step, phase, inbox = self.step, self.phase, dict(self.inbox)
        if phase == 1:
            missing = self.expected - set(inbox)
            if missing:
                self.expected -= missing
                self._note(f"step {step}: left out clients {sorted(missing)} (no message in {self.net.timeout_s} s)")
        self.busy = True
        self.cv.release()
        failed = False
        try:
            replies = self._compute(step, phase, [inbox[c] for c in sorted(inbox)])
        except Exception as e:  # noqa: BLE001 -- answered to every participant, the server keeps serving
            err = ServiceError(grpc.StatusCode.INTERNAL, f"step {step} failed on the server: {type(e).__name__}: {e}")
            self._note(str(err))
            if self.server.optimizer is not None:
                self.server.optimizer.zero_grad(set_to_none=True)
            replies, failed = {c: err for c in inbox}, True
        finally:
            self.cv.acquire()
            self.busy = False
        for c, r in replies.items():
            self.replies[c] = (step, phase, r)
        self.inbox.clear()
        if self.cfg.label_privacy and phase == 1 and not failed:  # the clients' loss gradients come next
            self.phase, self.batch = 2, sorted(replies)
            self.deadline = time.monotonic() + self.net.timeout_s
        else:
            self._close_step()
        self.cv.notify_all()

    def _compute(self, step: int, phase: int, msgs: list[Message]) -> dict[int, Parts]:
        wire = self.cfg.wire_dtype
        s = self.server
        if phase == 2:
            out = s.backward_middle(msgs)
            grads = {g.client: g for g in out}
            return {m.client: encode_parts(grads.get(m.client) or ActivationGrad(m.client, step, torch.empty(0)), wire)[0]
                    for m in msgs}
        if self.cfg.label_privacy:
            return {t.client: encode_parts(t, wire)[0] for t in s.forward_middle(msgs)}
        grads, parts = s.forward_backward(msgs, send_grads=self.cfg.client_trainable)
        by_client = {g.client: g for g in grads}
        out = {}
        for m, p in zip(msgs, parts):
            loss = {"loss": p.loss.item(), "n_samples": p.n_samples, "n_tokens": p.n_tokens, **p.stats}
            g = by_client.get(m.client) or ActivationGrad(m.client, step, torch.empty(0))
            out[m.client] = encode_parts(ActivationGrad(m.client, step, g.grad, loss), wire)[0]
        return out

    def _close_step(self) -> None:
        self.step += 1
        self.phase, self.batch, self.deadline = 1, [], None
        if self.step % self.cfg.grad_accum == 0:
            self.server.step()
            if self.out is not None:
                self._save(self.out)

    def _out(self, reply: Parts | ServiceError) -> Parts:
        if isinstance(reply, ServiceError):
            raise reply
        total = sum(memoryview(p).nbytes for p in reply)
        self.meter.add("server_to_client", "reply", total - len(reply[0]), total)
        return reply

    def _validate(self, cid: int, msg: Message) -> None:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if msg.client != cid:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"client {cid} sent a message as client {msg.client}")
        try:
            if isinstance(msg, Activations):
                lp = self.cfg.label_privacy
                _check_path(msg.base, "base", self.hidden, self.vocab, self.limits, labels=not lp)
                if (self.cfg.paths == "dual") != (msg.reference is not None):
                    raise ValueError(f"reference path {'missing' if msg.reference is None else 'not expected'} "
                                     f"(server paths={self.cfg.paths})")
                if msg.reference is not None:
                    _check_path(msg.reference, "reference", self.hidden, self.vocab, self.limits, labels=not lp)
            elif isinstance(msg, ActivationGrad) and self.cfg.label_privacy:
                g = msg.grad
                if g.dim() != 3 or g.shape[2] != self.hidden or not torch.isfinite(g).all():
                    raise ValueError(f"grad: expected a finite [B, T, {self.hidden}] tensor, got {list(g.shape)}")
            else:
                raise ValueError(f"unexpected message kind {msg.kind!r}")
        except ValueError as e:
            raise ServiceError(bad, f"rejected message from client {cid} at step {msg.step}: {e}") from None

    def _note(self, line: str) -> None:
        self.log.append(line)
        print(f"lesft server: {line}", flush=True)

    # ------------------------------------------------------------------ state

    def summary(self) -> dict[str, Any]:
        s = self.server
        return {"step": self.step, "rounds_done": self.step // self.cfg.grad_accum,
                "comm_bytes": self.meter.totals(), "comm_detail": self.meter.to_dict(),
                "server_busy_s": s.meter.seconds, "server_peak_transient_mb": s.meter.peak_transient / (1 << 20),
                "wall_s": time.perf_counter() - self.started, "log": self.log[-50:]}

    def _save(self, out: Path) -> None:
        """Checkpoint: server LoRA, AdamW, step, meters, and the replies of the step just closed (a client
        whose reply was lost when the server died gets it from the restarted server)."""
        s = self.server
        tensors = {f"lora.{k}": v for k, v in lora_state(s.top).items()}
        opt = _optimizer_state(s.optimizer, "opt", tensors)
        replies = {}
        for cid, (step, phase, reply) in self.replies.items():
            if not isinstance(reply, ServiceError):
                tensors[f"reply.{cid}"] = torch.frombuffer(bytearray(b"".join(reply)), dtype=torch.uint8)
                replies[str(cid)] = [step, phase]
        tmp, final = out / "server_checkpoint.tmp", out / "server_checkpoint"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "optimizer": opt, "meter": s.meter.state(),
                                                    "bytes": self.meter.to_dict(), "replies": replies}))
        old = out / "server_checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        (out / "server_summary.json").write_text(json.dumps(self.summary(), indent=2))
        if self.layout is not None:  # the server's part as a peft adapter (merge with a client's: lesft merge)
            k, layers_path = self.layout
            export_adapter([(lora_state(s.top), k)], layers_path, self.cfg.lora, out / "adapter", self.cfg.model)

    def _load(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "tensors.safetensors"))
        load_lora_state(self.server.top, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        _load_optimizer(self.server.optimizer, state["optimizer"], "opt", tensors)
        self.server.meter.load(state["meter"])
        self.meter.load(state["bytes"])
        self.step = state["step"]
        for cid, (step, phase) in state.get("replies", {}).items():
            data = tensors[f"reply.{cid}"].numpy().tobytes()
            n = 8 + int.from_bytes(data[:8], "little")
            self.replies[int(cid)] = (step, phase, [data[:n], data[n:]])
        self._note(f"resumed from {path} at step {self.step} (round {self.step // self.cfg.grad_accum})")


def serve(service: SplitService, address: str, net: NetArgs, tokens: dict[str, int],
          workers: int | None = None, handlers: tuple = ()) -> tuple[grpc.Server, int]:
    """Start the gRPC server on ``address`` (``HOST:PORT``, port 0 = any free one); returns (server, port).
    ``handlers``: more services on the same port (``lesft.deploy.generation.generation_handler``)."""

    def who(context: grpc.ServicerContext) -> int:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        cid = tokens.get(auth.removeprefix("Bearer "))
        if cid is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or missing client token")
        return cid

    def guarded(context: grpc.ServicerContext, fn):
        try:
            return fn()
        except MessageTooLarge as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ServiceError as e:
            context.abort(e.code, str(e))

    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        cid = who(context)
        return guarded(context, lambda: json.dumps(service.hello(cid, json.loads(request or b"{}"))).encode())

    def exchange(request_iterator, context: grpc.ServicerContext):
        cid = who(context)
        reply = guarded(context, lambda: service.exchange(cid, join(request_iterator, net.max_message_mb)))
        yield from chunks(reply, net.chunk_mb)

    def exchange_one(request: bytes, context: grpc.ServicerContext):
        cid = who(context)
        reply = guarded(context, lambda: service.exchange(cid, join([request], net.max_message_mb)))
        yield from chunks(reply, net.chunk_mb)

    handler = grpc.method_handlers_generic_handler("lesft.SplitServer", {
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Exchange": grpc.stream_stream_rpc_method_handler(exchange),
        "ExchangeOne": grpc.unary_stream_rpc_method_handler(exchange_one),
    })
    assert HELLO.endswith("/Hello") and EXCHANGE.endswith("/Exchange") and EXCHANGE_ONE.endswith("/ExchangeOne")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers or 2 * len(service.known) + 4),
                         options=net.grpc_options())
    server.add_generic_rpc_handlers((handler, *handlers))
    creds = server_credentials(address, net)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not listen on {address}")
    server.start()
    return server, port
