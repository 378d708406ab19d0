"""The split server as a gRPC service: many clients, one batch per micro-step, nothing blocks forever.

Each client streams its ``Activations`` for micro-step ``s`` and waits for its reply. When every
expected client's message for ``s`` is in -- or ``timeout_s`` after the first arrived -- the server runs
once on the concatenation (in client-id order, as the in-process simulation does) and answers each
client with its own slice of dL/dh; a client that missed the step is left out of the following ones
until it says hello again. After every ``grad_accum`` micro-steps the server steps its optimizer and,
with an ``out`` directory, writes a checksummed checkpoint (``lesft.checkpoint``) before answering: a
restarted server resumes at the last finished round.

One client cannot poison, stall or exhaust the others:

- every field and tensor it sends is checked (kind, owner, dtype, shape, value ranges, magnitude
  ``Limits.max_abs``) and a bad one is refused with INVALID_ARGUMENT naming it;
- a step whose loss, gradients or replies come out non-finite or beyond ``max_abs`` is undone and rerun
  without the client(s) whose input alone breaks it (they are refused, the others go on);
- a round whose accumulated gradients or new adapter are not finite and bounded is not applied (the
  last good adapter stays, and the log says so);
- ``lesft.deploy.endpoint.serve`` (the gRPC binding) caps each client's open calls and in-flight bytes,
  gives every message a receive deadline, and answers every refusal with a status code and a one-line
  reason, logged as a line per refusal.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import grpc
import torch

from lesft.checkpoint import load_optimizer, optimizer_state, open_checkpoint, write_checkpoint
from lesft.config import TrainConfig
from lesft.deploy.admission import Admission
from lesft.deploy.checks import AGREE, Limits, ServiceError, check_path
from lesft.deploy.wire import NetArgs
from lesft.lora import export_adapter, load_lora_state, lora_state
from lesft.messages import (Activations, ActivationGrad, CachedActivations, Message, Resend, WireFormat,
                            bounded, decode, encode_parts, payload_size)
from lesft.roles import SplitServer
from lesft.transport import Meter
from lesft.typed import to_dict


Parts = list  # an encoded message as ``messages.encode_parts`` pieces


class StepRejected(FloatingPointError):
    """A step's gradients, replies or update came out non-finite or beyond ``Limits.max_abs``."""


# refusals that leave the step without the client's message (RESOURCE_EXHAUSTED too, unless 'calls open')
MISSES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.CANCELLED)


def stale(step: int, now: int, why: str = "") -> ServiceError:
    """FAILED_PRECONDITION 'resync: ...' (the client rejoins at the next round start), saying why."""
    why = why or (f"step {step} is closed" if step < now else f"step {step} is unknown")
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"resync: {why}; the server is at step {now}", step)


class SplitService:
    """The step barrier around a :class:`SplitServer`; transport-free (``serve`` puts gRPC around it)."""

    def __init__(self, server: SplitServer, cfg: TrainConfig, clients: list[int], net: NetArgs,
                 hidden_size: int, vocab_size: int, out: Path | None = None, limits: Limits | None = None,
                 layout: tuple[int, str] | None = None) -> None:
        self.server, self.cfg, self.net, self.out = server, cfg, net, out
        self.layout = layout  # (first server layer k, layers module path): to export OUT/adapter
        self.hidden, self.vocab, self.limits = hidden_size, vocab_size, limits or Limits()
        self.params = [p for p in server.top.parameters() if p.requires_grad]
        self.known = set(clients)
        self.expected = set(clients)
        self.meter = Meter()
        self.cv = threading.Condition()
        self.step, self.phase = 0, 1
        self.inbox: dict[int, Message] = {}
        self.batch: list[int] = []          # label-private: clients of the step's forward, owed a 2nd reply
        self.shapes: dict[int, tuple[int, ...]] = {}  # label-private: [B, T, H] each of them must send back
        self.deadline: float | None = None
        self.first: float | None = None     # when the step's first message arrived (monotonic s)
        self.delays: list[float] = []       # arrival delays of the step's messages after the first (s)
        self.misses: dict[int, int] = defaultdict(int)  # steps missed or refused, less the steps taken since
        self.benched: dict[int, int] = {}   # client -> the first step (a round start) it may send again
        self.busy = False
        self.computing: set[int] = set()    # the clients of the step being computed (while busy)
        self.replies: dict[int, tuple[int, int, Parts | ServiceError]] = {}  # cid -> (step, phase, reply)
        self.contributed = False            # some micro-step of the current round succeeded
        self.counts = {"steps_completed": 0, "steps_failed": 0, "rounds_applied": 0, "rounds_rejected": 0}
        self.log: deque[str] = deque(maxlen=1000)
        self.admission: Admission | None = None  # set by ``serve``
        self.started = time.perf_counter()
        if out is not None and any((out / d / "state.json").is_file()
                                   for d in ("server_checkpoint", "server_checkpoint.old")):
            self._load(out / "server_checkpoint")

    # ------------------------------------------------------------------ calls

    def hello(self, cid: int, info: Any) -> dict[str, Any]:
        """Join (or rejoin, or leave with ``{"leaving": true}``); returns the server's step and round."""
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"client {cid}: a hello must carry the run config ({{\"config\": {{...}}}})")
        mine, theirs = to_dict(self.cfg), info["config"]
        diff = [k for k in AGREE if theirs.get(k, "<missing>") != mine[k]]
        if diff:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"client {cid} and server disagree on {diff}: start both with the same config")
        with self.cv:
            if info.get("leaving"):
                self.expected.discard(cid)
                self._note(f"client {cid} left at step {self.step}")
            elif cid not in self.benched:  # a benched client rejoins by sending, not by saying hello
                self.expected.add(cid)
            self.cv.notify_all()
            step = max(self.step, self.benched.get(cid, 0))
            return {"step": step, "phase": self.phase, "grad_accum": self.cfg.grad_accum,
                    "rounds_done": self.step // self.cfg.grad_accum}

    def exchange(self, cid: int, data: bytes | bytearray) -> Parts:
        """One message in, the reply to it out (``encode_parts`` pieces). Raises :class:`ServiceError`."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        try:
            msg = decode(data)
        except ValueError as e:  # decode's own words
            raise ServiceError(bad, f"malformed message: {e}") from None
        except Exception as e:  # noqa: BLE001 -- anything else a crafted message provokes: no raw text out
            raise ServiceError(bad, f"malformed message ({type(e).__name__})") from None
        if isinstance(msg, CachedActivations):  # frozen client layers: a batch sent before, named by its rows
            if msg.client != cid:
                raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, f"client {cid} sent a message as client "
                                                                      f"{msg.client}")
            self.meter.add("client_to_server", msg.kind, payload_size(data), len(data))
            hit = self.server.cache.get(msg) if self.server.cache is not None else None
            if hit is None:  # evicted, never held, or this server restarted: ask for the tensors
                return self._out(encode_parts(Resend(cid, msg.step))[0])
            msg, data = hit, None
        try:
            return self._exchange(cid, msg, data)
        except ServiceError as e:  # for the log line
            step = getattr(msg, "step", None)
            e.step = step if type(step) is int else None
            raise

    def _refused(self, cid: int, what: str, step: int | None = None) -> None:
        """A client the step waits for sent ``what`` instead of its activations (for ``step``, if known): the
        step does not wait for it."""
        with self.cv:
            if self.phase == 1 and cid in self.expected and cid not in self.inbox:
                self._miss(cid, what, step if step is not None and 0 <= step <= self.step else self.step)
                self.cv.notify_all()

    def _miss(self, cid: int, why: str, step: int) -> None:
        """Bench client ``cid`` for missing ``step`` (lock held): out of the steps until a round start 1, 2, 4, ...
        (at most 64) rounds after that step's round, doubling with each miss not yet made good by a step taken;
        it comes back by sending for that step, not by a hello."""
        self.expected.discard(cid)
        self.misses[cid] += 1
        rounds = min(2 ** (self.misses[cid] - 1), 64)
        ga = self.cfg.grad_accum
        self.benched[cid] = (step // ga + rounds) * ga
        self._note(f"client {cid}: {why} at step {step}; benched until step {self.benched[cid]} "
                   f"({self.misses[cid]} miss{'es' if self.misses[cid] > 1 else ''} outstanding)")

    def _exchange(self, cid: int, msg: Message, data: bytes | bytearray | None) -> Parts:
        """``data``: the message's bytes as received (None: taken from the frozen cache, counted already)."""
        self._validate(cid, msg)
        phase = 1 if isinstance(msg, Activations) else 2
        if data is not None:
            self.meter.add("client_to_server", msg.kind, payload_size(data), len(data))
            if phase == 1 and self.server.cache is not None and msg.rows is not None:
                self.server.cache.put(msg)
        with self.cv:
            cached = self.replies.get(cid)
            if cached and cached[:2] == (msg.step, phase):  # a retry after a lost reply
                return self._out(cached[2])
            if phase == 1 and msg.step < self.benched.get(cid, 0):
                raise stale(msg.step, self.step, f"client {cid} is benched until step {self.benched[cid]} "
                                                 f"after {self.misses[cid]} missed or refused step(s)")
            if msg.step > self.step and (phase == 2 or msg.step % self.cfg.grad_accum
                                         or msg.step > self.step + self.cfg.grad_accum):
                raise stale(msg.step, self.step, f"step {msg.step} is ahead of the server (did it restart from "
                                                 "a checkpoint?)")
            if msg.step > self.step:  # rejoining at the next round start: wait for the others to get there
                if not self.cv.wait_for(lambda: self.step >= msg.step, timeout=2 * self.net.timeout_s):
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"server still at step {self.step}, client {cid} sent step {msg.step}")
            if msg.step != self.step:
                raise stale(msg.step, self.step)
            if phase != self.phase or (phase == 2 and cid not in self.batch):
                raise stale(msg.step, self.step, f"step {msg.step} is in its {('', 'first', 'second')[self.phase]} "
                                                 f"exchange and client {cid} has no part in it")
            if self.busy and cid not in self.computing:  # late: the step is being computed without it
                raise stale(msg.step, self.step, f"step {msg.step} is being computed without client {cid} (its "
                                                 "message came after the step started)")
            if phase == 2 and tuple(msg.grad.shape) != self.shapes[cid]:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"rejected message from client {cid} at step {msg.step}: grad: shape "
                                   f"{list(msg.grad.shape)}, expected {list(self.shapes[cid])} (its hidden states)")
            self.inbox[cid] = msg
            if phase == 1:
                self.expected.add(cid)
                self.benched.pop(cid, None)  # alive: back in the steps
            self._arrived()
            self.cv.notify_all()
            key = (msg.step, phase)
            give_up = time.monotonic() + 3 * self.net.timeout_s
            while not (cid in self.replies and self.replies[cid][:2] == key):
                if cid not in self.inbox and cid not in self.computing:  # dropped without an answer: resync
                    raise stale(msg.step, self.step, f"step {msg.step} went on without client {cid}'s message")
                if not self.busy and self._ready():
                    self._process()
                elif time.monotonic() > give_up:
                    if self.inbox.get(cid) is msg:
                        del self.inbox[cid]
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"step {msg.step} not computed within {3 * self.net.timeout_s:g} s")
                else:
                    left = (self.deadline - time.monotonic()) if self.deadline else 1.0
                    self.cv.wait(timeout=max(0.01, min(left, 1.0)))
            return self._out(self.replies[cid][2])

    # ------------------------------------------------------------------ the step

    def _arrived(self) -> None:
        """A message of the step came in (lock held): set or shorten the step's deadline."""
        now = time.monotonic()
        if self.deadline is None:
            self.first, self.delays, self.deadline = now, [], now + self.net.timeout_s
        self.delays.append(now - self.first)
        waiting_for = self.expected if self.phase == 1 else set(self.batch)
        f = self.net.adaptive_deadline
        if f > 0 and len(self.delays) * 2 >= len(waiting_for):
            median = sorted(self.delays)[len(self.delays) // 2]
            self.deadline = min(self.deadline, self.first + max(1.0, f * median))

    def _ready(self) -> bool:
        waiting_for = self.expected if self.phase == 1 else set(self.batch)
        return bool(self.inbox) and (waiting_for <= set(self.inbox) or time.monotonic() >= self.deadline)

    def _process(self) -> None:
        """Run the server on what arrived (called with the lock held; computes without it)."""
        step, phase, inbox = self.step, self.phase, dict(self.inbox)
        if phase == 1:
            missing = self.expected - set(inbox)
            waited = time.monotonic() - (self.first or time.monotonic())
            if missing:
                self._note(f"step {step}: left out clients {sorted(missing)} (no message in {waited:.1f} s)")
            for cid in sorted(missing):
                self._miss(cid, f"no message in {waited:.1f} s", step)
            for cid in inbox:  # a step taken makes good one miss
                self.misses[cid] = max(0, self.misses[cid] - 1)
        self.busy, self.computing = True, set(inbox)
        self.cv.release()
        try:
            replies = self._run(step, phase, [inbox[c] for c in sorted(inbox)])
        finally:
            self.cv.acquire()
            self.busy, self.computing = False, set()
        for c, r in replies.items():
            self.replies[c] = (step, phase, r)
        self.inbox.clear()
        ok = [m for c, m in sorted(inbox.items()) if not isinstance(replies[c], ServiceError)]
        if self.cfg.label_privacy and phase == 1 and ok:  # the clients' loss gradients come next
            self.phase, self.batch = 2, [m.client for m in ok]
            self.shapes = {m.client: tuple(m.base.hidden.shape) for m in ok}
            self.deadline = time.monotonic() + self.net.timeout_s
        else:
            self.counts["steps_completed" if ok else "steps_failed"] += 1
            self.contributed |= bool(ok)
            self._close_step()
        self.cv.notify_all()

    def _run(self, step: int, phase: int, msgs: list[Message]) -> dict[int, Parts | ServiceError]:
        """The replies of a step: computed on every message, or -- if that breaks -- without the clients
        whose message alone breaks it (they get an error naming them; the others' step goes on)."""
        try:
            return self._attempt(step, phase, msgs, keep=True)
        except Exception as e:  # noqa: BLE001 -- answered, logged; the server keeps serving
            first = e
        blamed: dict[int, Exception] = {}
        if len(msgs) == 1:
            blamed = {msgs[0].client: first}
        elif phase == 1:  # which messages break the step on their own (the forward can be rerun)
            for m in msgs:
                try:
                    self._attempt(step, phase, [m], keep=False)
                except Exception as e:  # noqa: BLE001
                    blamed[m.client] = e
        if not blamed:  # the step breaks, but no single message does: it fails for all
            return {m.client: self._failure(step, m.client, first, alone=False) for m in msgs}
        replies: dict[int, Parts | ServiceError] = {c: self._failure(step, c, e, alone=True)
                                                    for c, e in blamed.items()}
        good = [m for m in msgs if m.client not in blamed]
        if good:
            try:
                replies.update(self._attempt(step, phase, good, keep=True))
            except Exception as e:  # noqa: BLE001
                replies.update({m.client: self._failure(step, m.client, e, alone=False) for m in good})
        return replies

    def _failure(self, step: int, cid: int, e: Exception, alone: bool) -> ServiceError:
        """The error for client ``cid`` of a failed step, logged. ``alone``: its own input breaks the step."""
        ours = isinstance(e, (FloatingPointError, ValueError))  # non-finite loss/gradients, no targets
        reason = f"{type(e).__name__}: {e}" if ours else f"{type(e).__name__} (see the server log)"
        self._note(f"step {step}: client {cid}'s contribution dropped: {type(e).__name__}: {e}")
        if ours and alone:
            return ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"step {step}: the message of client {cid} breaks the server's step "
                                f"({reason.splitlines()[0]}); it was left out", step)
        return ServiceError(grpc.StatusCode.INTERNAL, f"step {step} failed on the server ({reason.splitlines()[0]})",
                            step)

    def _attempt(self, step: int, phase: int, msgs: list[Message], keep: bool) -> dict[int, Parts]:
        """:meth:`_compute`, checked: its gradients must be finite and within ``max_abs``, else (or on any
        error, or with ``keep=False``) the gradients are put back as they were."""
        saved = [p.grad.clone() if p.grad is not None else None for p in self.params]
        done = False
        try:
            replies = self._compute(step, phase, msgs)
            bad = self._unbounded(p.grad for p in self.params)
            if bad:
                raise StepRejected(f"server gradients {bad}")
            done = True
            return replies
        finally:
            if not (done and keep):
                for p, g in zip(self.params, saved):
                    p.grad = g

    def _unbounded(self, tensors) -> str | None:
        """'non-finite' or 'beyond max_abs' for the first offending tensor, else None."""
        for t in tensors:
            if t is not None and not bounded(t.detach(), self.limits.max_abs):
                return "non-finite" if not torch.isfinite(t).all() else f"beyond {self.limits.max_abs:g}"
        return None

    def _compute(self, step: int, phase: int, msgs: list[Message]) -> dict[int, Parts]:
        wire = WireFormat.of(self.cfg)
        s = self.server

        def encoded(m: Message, t: torch.Tensor) -> Parts:
            bad = self._unbounded([t])
            if bad:
                raise StepRejected(f"the reply to client {m.client} came out {bad}")
            return encode_parts(m, wire)[0]

        if phase == 2:
            grads = {g.client: g for g in s.backward_middle(msgs)}
            replies = {}
            for m in msgs:
                g = grads.get(m.client) or ActivationGrad(m.client, step, torch.empty(0))
                replies[m.client] = encoded(g, g.grad)
            return replies
        if self.cfg.label_privacy:
            return {t.client: encoded(t, t.base.hidden) for t in s.forward_middle(msgs)}
        grads, parts = s.forward_backward(msgs, send_grads=self.cfg.client_trainable)
        by_client = {g.client: g for g in grads}
        out = {}
        for m, p in zip(msgs, parts):
            loss = {"loss": p.loss.item(), "n_samples": p.n_samples, "n_tokens": p.n_tokens, **p.stats}
            g = by_client.get(m.client) or ActivationGrad(m.client, step, torch.empty(0))
            out[m.client] = encoded(ActivationGrad(m.client, step, g.grad, loss), g.grad)
        return out

    def _close_step(self) -> None:
        self.step += 1
        self.phase, self.batch, self.shapes, self.deadline = 1, [], {}, None
        if self.step % self.cfg.grad_accum == 0:
            self._apply_update()
            if self.out is not None:
                self._save(self.out)

    def _apply_update(self) -> None:
        """The round's optimizer step, only when its gradients and the new adapter are finite and within
        ``max_abs``; else the last good adapter and AdamW state stay (logged)."""
        s, r = self.server, self.step // self.cfg.grad_accum
        contributed, self.contributed = self.contributed, False
        if s.optimizer is None or not contributed:
            if s.optimizer is not None:
                s.optimizer.zero_grad(set_to_none=True)
            return
        bad = self._unbounded(p.grad for p in self.params)
        if bad is None:
            before = [p.detach().clone() for p in self.params], copy.deepcopy(s.optimizer.state_dict())
            s.step()
            bad = self._unbounded(self.params)
            if bad:
                with torch.no_grad():
                    for p, v in zip(self.params, before[0]):
                        p.copy_(v)
                s.optimizer.load_state_dict(before[1])
                bad = f"the new adapter came out {bad}"
        else:
            s.optimizer.zero_grad(set_to_none=True)
            bad = f"the round's gradients are {bad}"
        if bad:
            self.counts["rounds_rejected"] += 1
            self._note(f"round {r}: update not applied ({bad}); the adapter stays as it was")
        else:
            self.counts["rounds_applied"] += 1

    def _out(self, reply: Parts | ServiceError) -> Parts:
        if isinstance(reply, ServiceError):
            raise reply
        total = sum(memoryview(p).nbytes for p in reply)
        self.meter.add("server_to_client", "reply", total - len(reply[0]), total)
        return reply

    def _validate(self, cid: int, msg: Message) -> None:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not isinstance(msg, (Activations, ActivationGrad)):
            raise ServiceError(bad, f"rejected message from client {cid}: unexpected message kind {msg.kind!r}")
        if msg.client != cid:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"client {cid} sent a message as client {msg.client}")
        try:
            if type(msg.step) is not int or not 0 <= msg.step < 1 << 53:
                raise ValueError(f"step {msg.step!r} is not a non-negative integer")
            lp = self.cfg.label_privacy
            if isinstance(msg, Activations):
                check_path(msg.base, "base", self.hidden, self.vocab, self.limits, labels=not lp)
                if (self.cfg.paths == "dual") != (msg.reference is not None):
                    raise ValueError(f"reference path {'missing' if msg.reference is None else 'not expected'} "
                                     f"(server paths={self.cfg.paths})")
                if msg.reference is not None:
                    check_path(msg.reference, "reference", self.hidden, self.vocab, self.limits, labels=not lp)
                if not lp and not (msg.base.labels[:, 1:] != -100).any():
                    raise ValueError("base.labels: no target tokens (every label is -100)")
                rows = msg.batch_rows
                if lp and (type(rows) is not int or not 0 <= rows <= msg.base.hidden.shape[0]):
                    raise ValueError(f"batch_rows {rows!r}: expected an integer in [0, {msg.base.hidden.shape[0]}] "
                                     "(its rows with targets)")
                if not lp and rows is not None:
                    raise ValueError("batch_rows is only sent in label-private mode")
            elif isinstance(msg, ActivationGrad) and lp:
                g = msg.grad
                if g.dim() != 3 or g.shape[2] != self.hidden or not g.is_floating_point():
                    raise ValueError(f"grad: expected a float [B, T, {self.hidden}] tensor, got {g.dtype} "
                                     f"{list(g.shape)}")
                if not bounded(g, self.limits.max_abs):
                    raise ValueError(f"grad: NaN, infinite, or beyond the magnitude limit {self.limits.max_abs:g}")
                if msg.loss is not None:
                    raise ValueError("grad: a client sends no loss")
            else:
                raise ValueError(f"unexpected message kind {msg.kind!r}")
        except ValueError as e:
            raise ServiceError(bad, f"rejected message from client {cid} at step {msg.step}: {e}") from None

    def refused(self, cid: int | None, err: ServiceError) -> None:
        """The server's log line for one refused call; a client whose refused message the step was waiting for
        is benched (a message that cannot be taken costs the others no wait)."""
        step = "-" if err.step is None else err.step
        self._note(f"refused client {'?' if cid is None else cid} step {step}: {err.code.name}: {err}")
        if cid is not None and (err.code in MISSES or err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                and "calls open" not in str(err)):
            self._refused(cid, f"a refused message ({err.code.name})", err.step)

    def _note(self, line: str) -> None:
        self.log.append(line)
        print(f"lesft server: {line}", flush=True)

    # ------------------------------------------------------------------ state

    def summary(self) -> dict[str, Any]:
        s = self.server
        return {"step": self.step, "rounds_done": self.counts["rounds_applied"], **self.counts,
                "comm_bytes": self.meter.totals(), "comm_detail": self.meter.to_dict(),
                "server_busy_s": s.meter.seconds, "server_peak_transient_mb": s.meter.peak_transient / (1 << 20),
                "wall_s": time.perf_counter() - self.started, "log": list(self.log)[-50:]}

    def _save(self, out: Path) -> None:
        """Checkpoint: server LoRA, AdamW, step, meters, and the replies of the step just closed (a client
        whose reply was lost when the server died gets it from the restarted server)."""
        s = self.server
        tensors = {f"lora.{k}": v for k, v in lora_state(s.top).items()}
        opt = optimizer_state(s.optimizer, "opt", tensors)
        replies = {}
        for cid, (step, phase, reply) in self.replies.items():
            if not isinstance(reply, ServiceError):
                tensors[f"reply.{cid}"] = torch.frombuffer(bytearray(b"".join(reply)), dtype=torch.uint8)
                replies[str(cid)] = [step, phase]
        write_checkpoint(out / "server_checkpoint", tensors, {
            "step": self.step, "optimizer": opt, "meter": s.meter.state(), "bytes": self.meter.to_dict(),
            "replies": replies, "counts": self.counts})
        (out / "server_summary.json").write_text(json.dumps(self.summary(), indent=2))
        if self.layout is not None:  # the server's part as a peft adapter (merge with a client's: lesft merge)
            k, layers_path = self.layout
            export_adapter([(lora_state(s.top), k)], layers_path, self.cfg.lora, out / "adapter", self.cfg.model)

    def _load(self, path: Path) -> None:
        path, state, tensors = open_checkpoint(path)  # verified; falls back to .old, and says so
        load_lora_state(self.server.top, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        load_optimizer(self.server.optimizer, state["optimizer"], "opt", tensors)
        self.server.meter.load(state["meter"])
        self.meter.load(state["bytes"])
        self.step = state["step"]
        self.counts.update(state.get("counts", {}))
        for cid, (step, phase) in state.get("replies", {}).items():
            data = tensors[f"reply.{cid}"].numpy().tobytes()
            n = 8 + int.from_bytes(data[:8], "little")
            self.replies[int(cid)] = (step, phase, [data[:n], data[n:]])
        self._note(f"resumed from {path} at step {self.step} (round {self.step // self.cfg.grad_accum})")
