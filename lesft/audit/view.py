"""The split server's view of a run, recorded at the transport, and the client's truth kept apart.

The view holds exactly what crossed the wire to the server: per received row the cut-layer hidden
states [T, H], the attention mask [T], the position ids [T] and, outside label-private mode, the labels
[T] (-100 on prompt and padding). The truth (input ids and target mask, [T] each) is recorded on the
client side of the same run and is read only by :func:`lesft.audit.attacks.score`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lesft.data.samples import IGNORE_INDEX, Sample
from lesft.messages import ActivationGrad, Activations, Message, WireFormat
from lesft.roles import DataStream
from lesft.train import Run
from lesft.transport import Loopback


@dataclass
class Received:
    """One row of one path as the server received it (padding included; ``mask`` says where)."""

    hidden: torch.Tensor            # [T, H] cut-layer activations (fp32 after decoding)
    mask: torch.Tensor              # [T] 1 = token, 0 = padding
    positions: torch.Tensor         # [T]
    labels: torch.Tensor | None     # [T] target ids, -100 elsewhere; None in label-private mode
    path: str = "base"              # "base" or "reference"
    # label-private training only (base path): the last-layer states the server computed and sent down
    # [T, H], and the gradient dL/d(them) [T, H] that the client sent back
    top: torch.Tensor | None = None
    grad: torch.Tensor | None = None


@dataclass
class Truth:
    """What the client really had in that row: read only to score an attack."""

    ids: torch.Tensor               # [n] input token ids (n = number of real tokens)
    target: torch.Tensor            # [n] bool, True where the token is a target (label) token


class Recorder(Loopback):
    """The in-process transport, keeping what the server receives: every ``Activations`` message and, in
    label-private mode, every ``ActivationGrad`` from a client, plus the last-layer ``Activations`` the
    server sent down (its own output), each keyed by (client, step)."""

    def __init__(self, wire: WireFormat | str = "fp32") -> None:
        super().__init__(wire)
        self.received: list[Activations] = []
        self.returned: dict[tuple[int, int], ActivationGrad] = {}
        self.tops: dict[tuple[int, int], Activations] = {}

    def send(self, msg: Message, direction: str) -> Message:
        out = super().send(msg, direction)
        if direction == "client_to_server" and isinstance(out, Activations):
            self.received.append(out)
        elif direction == "client_to_server" and isinstance(out, ActivationGrad):
            self.returned[(out.client, out.step)] = out
        elif direction == "server_to_client" and isinstance(out, Activations):
            self.tops[(out.client, out.step)] = out
        return out


class _Tap:
    """Wraps a client's data stream and records the samples it hands out (the client-side truth)."""

    def __init__(self, stream) -> None:
        self.stream, self.drawn = stream, []
        self.samples = stream.samples

    def next_rows(self) -> list[int]:
        rows = self.stream.next_rows()
        self.drawn.extend(self.samples[i] for i in rows)
        return rows

    def next(self) -> list[Sample]:
        return [self.samples[i] for i in self.next_rows()]


def _rows(msg: Activations, rec: Recorder) -> list[Received]:
    top, grad = rec.tops.get((msg.client, msg.step)), rec.returned.get((msg.client, msg.step))
    out = []
    for name in ("base", "reference"):
        p = getattr(msg, name)
        if p is None:
            continue
        for i in range(p.hidden.shape[0]):
            extra = {}
            if name == "base" and top is not None and grad is not None:
                t = p.hidden.shape[1]
                extra = {"top": top.base.hidden[i, :t].float(), "grad": grad.grad[i, :t].float()}
            out.append(Received(p.hidden[i].float(), p.attention_mask[i], p.position_ids[i],
                                p.labels[i] if p.labels is not None else None, name, **extra))
    return out


def _truth(s: Sample, path: str) -> Truth:
    ids, labels = (s.base_ids, s.base_labels) if path == "base" else (s.ref_ids, s.ref_labels)
    return Truth(torch.tensor(ids), torch.tensor(labels) != IGNORE_INDEX)


def _recorded(run: Run, taps: dict[int, _Tap], work) -> tuple[list[Received], list[Truth]]:
    """Run ``work()`` with each client reading through its tap; the view it produced, and its truth."""
    rec = run.transport
    if not isinstance(rec, Recorder) or run.cfg.batch_size != 1:
        raise ValueError("recording needs a Run built with transport=Recorder(...) and batch_size 1")
    streams = {c.cid: c.stream for c in run.clients}
    start = len(rec.received)
    try:
        for c in run.clients:
            c.stream = taps[c.cid]
        work()
    finally:
        for c in run.clients:
            c.stream = streams[c.cid]
    views, truths = [], []
    drawn = {cid: iter(t.drawn) for cid, t in taps.items()}
    for msg in rec.received[start:]:
        sample = next(drawn[msg.client])  # batch_size 1: one sample per message
        for r in _rows(msg, rec):
            views.append(r)
            truths.append(_truth(sample, r.path))
    return views, truths


def capture(run: Run) -> tuple[list[Received], list[Truth]]:
    """One forward-only pass of every client over each of its rows once (a fresh stream: the training
    stream's position is left as it was), each message through ``run.transport`` (a :class:`Recorder`);
    returns the server's view and, aligned with it, the client's truth. The clients' LoRA is as it is
    now (zero-initialised B: the base model; after training: fine-tuned)."""
    def work() -> None:
        for step in range(max(c.n_samples for c in run.clients)):
            for c in run.clients:
                if step < c.n_samples:
                    run.transport.send(c.forward(step), "client_to_server")
            run.discard_partial_round()  # forward only: drop the pending graphs

    taps = {c.cid: _Tap(DataStream(c.stream.samples, 1, seed=0)) for c in run.clients}  # each row once
    return _recorded(run, taps, work)


def record_training(run: Run, rounds: int, start: int = 0) -> tuple[list[Received], list[Truth]]:
    """Train rounds ``start .. start + rounds - 1`` and return what the server received meanwhile (in
    label-private mode with the returned gradients), and the truth of the rows the clients drew."""
    taps = {c.cid: _Tap(c.stream) for c in run.clients}
    return _recorded(run, taps, lambda: [run.round(r) for r in range(start, start + rounds)])
