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
from lesft.messages import Activations, Message
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


@dataclass
class Truth:
    """What the client really had in that row: read only to score an attack."""

    ids: torch.Tensor               # [n] input token ids (n = number of real tokens)
    target: torch.Tensor            # [n] bool, True where the token is a target (label) token


class Recorder(Loopback):
    """The in-process transport, keeping every ``Activations`` message that reaches the server."""

    def __init__(self, wire_dtype: str = "fp32") -> None:
        super().__init__(wire_dtype)
        self.received: list[Activations] = []

    def send(self, msg: Message, direction: str) -> Message:
        out = super().send(msg, direction)
        if direction == "client_to_server" and isinstance(out, Activations):
            self.received.append(out)
        return out


class _Tap:
    """Wraps a client's data stream and records the samples it hands out (the client-side truth)."""

    def __init__(self, stream) -> None:
        self.stream, self.drawn = stream, []

    def next(self) -> list[Sample]:
        samples = self.stream.next()
        self.drawn.extend(samples)
        return samples


def _rows(msg: Activations) -> list[Received]:
    out = []
    for name in ("base", "reference"):
        p = getattr(msg, name)
        if p is None:
            continue
        for i in range(p.hidden.shape[0]):
            out.append(Received(p.hidden[i].float(), p.attention_mask[i], p.position_ids[i],
                                p.labels[i] if p.labels is not None else None, name))
    return out


def _truth(s: Sample, path: str) -> Truth:
    ids, labels = (s.base_ids, s.base_labels) if path == "base" else (s.ref_ids, s.ref_labels)
    return Truth(torch.tensor(ids), torch.tensor(labels) != IGNORE_INDEX)


def capture(run: Run) -> tuple[list[Received], list[Truth]]:
    """One forward-only pass of every client over each of its rows once (a fresh stream: the training
    stream's position is left as it was), each message through ``run.transport`` (a :class:`Recorder`); returns the server's view and, aligned with it, the client's truth. The
    clients' LoRA is as it is now (zero-initialised B: the base model; after training: fine-tuned)."""
    rec = run.transport
    if not isinstance(rec, Recorder) or run.cfg.batch_size != 1:
        raise ValueError("capture needs a Run built with transport=Recorder(...) and batch_size 1")
    taps = {c.cid: _Tap(DataStream(c.stream.samples, 1, seed=0)) for c in run.clients}  # each row once
    streams = {c.cid: c.stream for c in run.clients}
    start = len(rec.received)
    try:
        for c in run.clients:
            c.stream = taps[c.cid]
        for step in range(max(c.n_samples for c in run.clients)):
            for c in run.clients:
                if step < c.n_samples:
                    rec.send(c.forward(step), "client_to_server")
            run.discard_partial_round()  # forward only: drop the pending graphs
    finally:
        for c in run.clients:
            c.stream = streams[c.cid]
    views, truths = [], []
    drawn = {cid: iter(t.drawn) for cid, t in taps.items()}
    for msg in rec.received[start:]:
        sample = next(drawn[msg.client])  # batch_size 1: one sample per message
        for r in _rows(msg):
            views.append(r)
            truths.append(_truth(sample, r.path))
    return views, truths
