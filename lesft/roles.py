"""The three parties. They share no tensors and talk only through messages (see messages.py).

- :class:`Client` -- tokenised private data, the client part (embedding + first k layers) with its own
  LoRA and optimizer. Unsplit methods give it the whole model (k = L) and a local head instead.
- :class:`SplitServer` -- the remaining layers, final norm and LM head with the shared server LoRA.
  It never sees a tokenizer or token ids of the input: only hidden states, masks, positions and targets.
- :class:`Aggregator` -- averages client adapters weighted by |D_i|.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections import OrderedDict
from typing import Callable

import torch

from lesft.config import TrainConfig
from lesft.data.samples import Batch, Sample, collate
from lesft.frozen import frozen_hidden, frozen_target_logprobs
from lesft.lora import load_lora_state, lora_key, lora_state
from lesft.loss import IGNORE_INDEX, chunked_target_logprobs
from lesft.objectives import Objective, ObjectiveBatch, SliceLoss, get_objective, token_mean_stats
from lesft.messages import (Activations, ActivationGrad, AdapterBroadcast, AdapterUpload, CachedActivations, PathBatch,
                            Resend)
from lesft.meters import RoleMeter
from lesft.model.split import ClientPart, HeadPart, ServerPart
from lesft.strategies import Strategy, get_strategy



class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """No dropout and no graph: how the forward-only reference path runs."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)


def _optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW | None:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None


def _step(optimizer: torch.optim.Optimizer | None, meter: RoleMeter) -> None:
    """One AdamW step on the accumulated gradients, then clear them (a party with nothing to train: no-op)."""
    if optimizer is None:
        return
    with meter.measure():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def head_losses(
    top: ServerPart,
    base: PathBatch,
    ref: PathBatch | None,
    bounds: list[tuple[int, int]],
    cfg: TrainConfig,
    frozen_input: Callable[[], torch.Tensor] | None = None,
) -> list[SliceLoss]:
    """Run ``top`` on the base path (with graph) and the reference path (forward only), and compute the
    loss of each row range in ``bounds``: the server's step and an unsplit client's step share this.
    Each slice's objective may also call ``batch.frozen_logprobs()``: the frozen base's target log-probs
    (``top`` with its adapters off, no graph) on ``base.hidden``, or on ``frozen_input()`` (the input of
    ``top`` under the frozen base, where the layers below ``top`` have adapters too: an unsplit client)."""
    objective = get_objective(cfg.loss)
    chunk = cfg.head_chunk_tokens if objective.logprobs else 0  # > 0: no [B, T, V] logits, chunks of positions
    ref_logits = ref_final = None
    if chunk:
        final = top.normed(base.hidden, base.attention_mask, base.position_ids)
        if ref is not None:
            with _eval_mode(top):
                ref_final = top.normed(ref.hidden, ref.attention_mask, ref.position_ids)
    else:
        logits, final = top(base.hidden, base.attention_mask, base.position_ids)
        if ref is not None:
            with _eval_mode(top):
                ref_logits, ref_final = top(ref.hidden, ref.attention_mask, ref.position_ids)
    out = []
    for b0, b1 in bounds:
        labels = base.labels[b0:b1]
        targets = labels[:, 1:] != IGNORE_INDEX
        n_tokens = int(targets.sum())
        n_samples = int(targets.any(dim=1).sum())
        ref_labels = ref.labels[b0:b1] if ref is not None else None
        if chunk:
            ref_lp = None
            if ref_final is not None:
                with _eval_mode(top):
                    ref_lp = chunked_target_logprobs(top.lm_head, ref_final[b0:b1], ref_labels, chunk)
            batch = ObjectiveBatch(None, labels, final[b0:b1].detach(), None, ref_labels,
                                   chunked_target_logprobs(top.lm_head, final[b0:b1], labels, chunk), ref_lp)
        else:
            batch = ObjectiveBatch(logits[b0:b1], labels, final[b0:b1].detach(),
                                   ref_logits[b0:b1] if ref_logits is not None else None, ref_labels)
        batch.ref_hidden = ref_final[b0:b1].detach() if ref_final is not None else None
        if isinstance(top, ServerPart) and top.head is not None:
            batch.frozen_logprobs = functools.partial(_frozen_slice, top, base, b0, b1, cfg.head_chunk_tokens,
                                                      frozen_input)
        loss, stats = objective.fn(batch, cfg)
        out.append(SliceLoss(loss, n_samples, n_tokens, stats))
    return out


def _frozen_slice(top: ServerPart, base: PathBatch, b0: int, b1: int, chunk: int,
                  frozen_input: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    hidden = frozen_input() if frozen_input is not None else base.hidden
    return frozen_target_logprobs(top, hidden[b0:b1], base.attention_mask[b0:b1], base.position_ids[b0:b1],
                                  base.labels[b0:b1], chunk)


def merge_losses(parts: list[SliceLoss], objective: Objective | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over samples of all slices (so the batch mean of per-sample losses) and the slices' statistics
    merged by ``objective`` (token-weighted means by default)."""
    n = sum(p.n_samples for p in parts)
    if n == 0:
        raise ValueError("a batch has no target tokens (targets truncated away?)")
    total = sum(p.loss * p.n_samples for p in parts) / n
    merge = objective.merge_stats if objective is not None else token_mean_stats
    return total, (merge(parts) if parts[0].stats else {})


def merge_slices(pieces: list[SliceLoss], objective: Objective) -> SliceLoss:
    """One client's slice from the pieces that chunks of rows cut it into (a single piece: itself)."""
    if len(pieces) == 1:
        return pieces[0]
    n = sum(p.n_samples for p in pieces)
    loss = sum(p.loss.detach() * p.n_samples for p in pieces) / max(n, 1)
    counted = [p for p in pieces if p.n_tokens]
    stats = objective.merge_stats(counted) if counted and counted[0].stats else {}
    return SliceLoss(loss, n, sum(p.n_tokens for p in pieces), stats)


def row_chunks(rows: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of at most ``size`` rows covering ``rows`` (``size`` 0: one range)."""
    if size <= 0 or rows <= size:
        return [(0, rows)]
    return [(i, min(i + size, rows)) for i in range(0, rows, size)]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _rows_with_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).any(dim=1).sum())


def _rows(b: PathBatch | None, r0: int, r1: int) -> PathBatch | None:
    """Rows ``[r0, r1)`` of a batch (views; the whole batch itself when that is all of it)."""
    if b is None or (r0 == 0 and r1 == b.hidden.shape[0]):
        return b
    return PathBatch(*(t[r0:r1] if t is not None else None
                       for t in (b.hidden, b.attention_mask, b.position_ids, b.labels)))


def _check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} {where}; lower --lr, use --dtype fp32, or check the data")


def _pad_cat(batches: list[PathBatch]) -> tuple[PathBatch, list[tuple[int, int]]]:
    """Concatenate clients' batches on the batch axis, right-padding to the longest sequence."""
    t = max(b.hidden.shape[1] for b in batches)

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        extra = t - x.shape[1]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[1] = extra
        return torch.cat([x, x.new_full(shape, value)], dim=1)

    bounds, start = [], 0
    for b in batches:
        bounds.append((start, start + b.hidden.shape[0]))
        start += b.hidden.shape[0]
    positions = torch.arange(t).expand(start, t)
    return PathBatch(
        hidden=torch.cat([pad(b.hidden, 0.0) for b in batches]),
        attention_mask=torch.cat([pad(b.attention_mask, 0) for b in batches]),
        position_ids=positions.clone() if any(b.hidden.shape[1] != t for b in batches)
        else torch.cat([b.position_ids for b in batches]),
        labels=torch.cat([pad(b.labels, IGNORE_INDEX) for b in batches]) if batches[0].labels is not None else None,
    ), bounds


class DataStream:
    """Seeded mini-batches from one client's samples: a fresh shuffle every pass."""

    def __init__(self, samples: list[Sample], batch_size: int, seed: int) -> None:
        if not samples:
            raise ValueError("a client has no training samples")
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list[Sample]:
        return [self.samples[i] for i in self.next_rows()]

    def next_rows(self) -> list[int]:
        """The indices (into ``samples``) of the next micro-batch."""
        out = []
        while len(out) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out


class Client:
    """An edge device. Split methods: :meth:`forward` / :meth:`backward`; unsplit: :meth:`local_step`."""

    def __init__(
        self,
        cid: int,
        bottom: ClientPart,
        samples: list[Sample],
        cfg: TrainConfig,
        pad_id: int,
        device: torch.device,
        top: ServerPart | None = None,
        head: HeadPart | None = None,
    ) -> None:
        self.cid, self.bottom, self.top, self.cfg, self.pad_id, self.device = cid, bottom, top, cfg, pad_id, device
        self.head = head  # label-private mode: the final norm + LM head stay here
        self.n_samples = len(samples)
        self.stream = DataStream(samples, cfg.batch_size, seed=cfg.seed * 1000 + cid)
        self.strategy = get_strategy(cfg.aggregation)
        for name, p in bottom.named_parameters():  # e.g. FFA-LoRA: A stays at the common initialisation
            if p.requires_grad and not self.strategy.trains(lora_key(name)):
                p.requires_grad_(False)
        self.trainable = any(p.requires_grad for p in bottom.parameters())
        self.optimizer = _optimizer(bottom, cfg) if self.trainable else None
        self.meter = RoleMeter(device)
        self._pending: torch.Tensor | None = None  # base-path cut activations awaiting their gradient
        self._labels: tuple[PathBatch, PathBatch | None] | None = None  # label-private: the batch's targets
        self._sent: set[tuple[int, ...]] = set()  # frozen cache: batches (row ids) sent in full before
        self._rows: list[int] | None = None  # frozen cache: the batch just named by reference
        self._drawn: list[int] | None = None  # the next micro-batch, drawn ahead by :meth:`draw`

    def draw(self) -> int:
        """Draw the next micro-batch ahead of :meth:`forward` and return its rows with >= 1 target token (what
        the loss is averaged over): lets the simulation scale a group of clients' share of a step's loss."""
        self._drawn = self.stream.next_rows()
        return sum(any(t != IGNORE_INDEX for t in self.stream.samples[i].base_labels[1:]) for i in self._drawn)

    def _next_rows(self) -> list[int]:
        rows, self._drawn = self._drawn, None
        return rows if rows is not None else self.stream.next_rows()

    def _batch(self, rows: list[int] | None = None) -> Batch:
        rows = self._next_rows() if rows is None else rows
        b = collate([self.stream.samples[i] for i in rows], self.pad_id, self.cfg.pad_to_multiple)
        return Batch(*(t.to(self.device) if t is not None else None for t in vars(b).values()))

    def _paths(self, batch: Batch) -> tuple[PathBatch, PathBatch | None]:
        """Bottom forward on the base path (graph kept if trainable) and the reference path (forward only)."""
        with _autocast(self.cfg, self.device):
            grad = torch.enable_grad() if self.trainable else torch.no_grad()
            with grad:
                h, pos = self.bottom(batch.ids, batch.mask)
            ref = None
            if batch.ref_ids is not None:
                with _eval_mode(self.bottom):
                    rh, rpos = self.bottom(batch.ref_ids, batch.ref_mask)
                ref = PathBatch(rh, batch.ref_mask, rpos, batch.ref_labels)
        return PathBatch(h, batch.mask, pos, batch.labels), ref

    def forward(self, step: int) -> Activations | CachedActivations:
        """Draw a micro-batch, run the client layers, and package the cut-layer activations (label-private
        mode: without labels, which stay here for :meth:`head_backward`). With a frozen cache, a batch sent
        before goes as a reference to it, and the layers do not run (:meth:`resend` if the server lost it)."""
        if not self.cfg.frozen_cache_mb:
            return self._forward(step)
        rows = self._next_rows()
        if tuple(rows) in self._sent:
            self._rows = rows
            return CachedActivations(self.cid, step, rows)
        self._sent.add(tuple(rows))
        msg = self._forward(step, rows)
        msg.rows = rows
        return msg

    def resend(self, msg: Resend) -> Activations:
        """The batch last named by reference, computed and sent in full (the server did not hold it)."""
        if self._rows is None:
            raise RuntimeError(f"client {self.cid}: asked to resend step {msg.step}, but it named no batch")
        rows, self._rows = self._rows, None
        out = self._forward(msg.step, rows)
        out.rows = rows
        return out

    def _forward(self, step: int, rows: list[int] | None = None) -> Activations:
        with self.meter.measure():
            base, ref = self._paths(self._batch(rows))
            if self.trainable:
                self._pending = base.hidden
            sent, sent_ref = noised(base, self.cfg.cut_noise), noised(ref, self.cfg.cut_noise)  # the graph keeps clean h
            if self.head is None:
                return Activations(self.cid, step, sent, sent_ref)
            self._labels = (base, ref)
            rows = int((base.labels[:, 1:] != IGNORE_INDEX).any(dim=1).sum())
            return Activations(self.cid, step, _unlabelled(sent), _unlabelled(sent_ref) if ref else None,
                               batch_rows=rows)

    def head_backward(self, msg: Activations) -> tuple[ActivationGrad, SliceLoss]:
        """Label-private mode: the server's last-layer hidden states -> norm, head and loss here; return
        dL/d(those hidden states) for the server. The loss is weighted by this client's share of the
        step's rows (``msg.batch_rows``), so the sum over clients is the batch mean of the standard split."""
        if self._labels is None or self.head is None:
            raise RuntimeError(f"client {self.cid}: hidden states for step {msg.step} without a pending forward")
        base, ref = self._labels
        self._labels = None
        with self.meter.measure():
            h = msg.base.hidden.to(self.device).requires_grad_(True)
            top_base = PathBatch(h, base.attention_mask, base.position_ids, base.labels)
            top_ref = (PathBatch(msg.reference.hidden.to(self.device), ref.attention_mask, ref.position_ids,
                                 ref.labels) if ref is not None else None)
            with _autocast(self.cfg, self.device):
                part = head_losses(self.head, top_base, top_ref, [(0, h.shape[0])], self.cfg)[0]
            _check_finite(part.loss, f"on client {self.cid}")
            (part.loss * part.n_samples / max(msg.batch_rows or 1, 1) / self.cfg.grad_accum).backward()
        return ActivationGrad(self.cid, msg.step, h.grad), part

    def backward(self, msg: ActivationGrad) -> None:
        """Back-propagate the server's dL/dh through the client layers (gradients accumulate)."""
        if self._pending is None:
            raise RuntimeError(f"client {self.cid}: gradient for step {msg.step} without a pending forward")
        with self.meter.measure():
            self._pending.backward(msg.grad.to(self._pending.device, self._pending.dtype))  # a decoded grad is on the CPU
            self._pending = None

    def local_step(self) -> SliceLoss:
        """Unsplit methods: forward through the whole model, loss, backward -- no message leaves."""
        with self.meter.measure():
            batch = self._batch()
            base, ref = self._paths(batch)
            with _autocast(self.cfg, self.device):
                part = head_losses(self.top, base, ref, [(0, base.hidden.shape[0])], self.cfg,
                                   frozen_input=lambda: frozen_hidden(self.bottom, batch.ids, batch.mask))[0]
            _check_finite(part.loss, f"on client {self.cid}")
            (part.loss / self.cfg.grad_accum).backward()
        return part

    def step(self) -> None:
        """Optimizer step on the accumulated gradients."""
        _step(self.optimizer, self.meter)

    def upload(self) -> AdapterUpload:
        """The adapter tensors the aggregation strategy shares."""
        state = lora_state(self.bottom)
        return AdapterUpload(self.cid, self.n_samples, {k: v for k, v in state.items() if self.strategy.shares(k)})

    def receive(self, msg: AdapterBroadcast) -> None:
        """Overwrite the broadcast tensors (all, or the shared ones) with the aggregate; the rest and the
        local AdamW moments are kept (see README)."""
        with self.meter.measure():
            load_lora_state(self.bottom, msg.tensors, partial=True)


class SplitServer:
    """Runs the server part once per micro-step on all clients' activations, concatenated."""

    def __init__(self, top: ServerPart, cfg: TrainConfig, device: torch.device) -> None:
        self.top, self.cfg, self.device = top, cfg, device
        self.optimizer = _optimizer(top, cfg)
        self.meter = RoleMeter(device)
        self.cache = ActivationCache(int(cfg.frozen_cache_mb * 2**20)) if cfg.frozen_cache_mb else None
        self._pending: tuple | None = None  # label-private: (msgs, bounds, input batch, output hidden, chunks, RNG states)

    def _gather(self, msgs: list[Activations], requires_grad: bool
                ) -> tuple[PathBatch, PathBatch | None, list[tuple[int, int]]]:
        """The clients' paths concatenated on this device (base hidden as a leaf that collects dL/dh when
        ``requires_grad``), and each client's row range."""
        base, bounds = _pad_cat([m.base for m in msgs])
        ref = _to(_pad_cat([m.reference for m in msgs])[0], self.device) if msgs[0].reference is not None else None
        base = _to(base, self.device)
        base.hidden.requires_grad_(requires_grad)
        return base, ref, bounds

    def forward_backward(self, msgs: list[Activations], send_grads: bool, batch_rows: int | None = None
                         ) -> tuple[list[ActivationGrad], list[SliceLoss]]:
        """Loss over the concatenated batch (mean over samples), backward, and each client's slice of dL/dh. The
        rows go through in chunks of at most ``server_chunk_rows`` (each chunk's share of the batch loss is
        back-propagated before the next chunk runs), so at most one chunk's graph and logits exist at a time.
        ``batch_rows``: the step's rows with targets over all clients, when ``msgs`` are only some of them (the
        simulation's groups of clients); default: those of ``msgs``."""
        with self.meter.measure():
            base, ref, bounds = self._gather(msgs, requires_grad=send_grads)
            chunks = row_chunks(base.hidden.shape[0], self.cfg.server_chunk_rows)
            pieces: list[list[SliceLoss]] = [[] for _ in bounds]
            n = batch_rows if batch_rows is not None else _rows_with_targets(base.labels)
            if n == 0:
                raise ValueError("a batch has no target tokens (targets truncated away?)")
            for r0, r1 in chunks:
                inside = [(i, (max(b0, r0) - r0, min(b1, r1) - r0)) for i, (b0, b1) in enumerate(bounds)
                          if b0 < r1 and b1 > r0]
                with _autocast(self.cfg, self.device):
                    got = head_losses(self.top, _rows(base, r0, r1), _rows(ref, r0, r1), [b for _, b in inside],
                                      self.cfg)
                loss = sum(p.loss * p.n_samples for p in got) / n  # this chunk's share of the batch mean
                _check_finite(loss, f"on the server at step {msgs[0].step}")
                (loss / self.cfg.grad_accum).backward()
                for (i, _), p in zip(inside, got):
                    pieces[i].append(p)
            parts = [merge_slices(ps, get_objective(self.cfg.loss)) for ps in pieces]
            grads = []
            if send_grads:
                for m, (b0, b1) in zip(msgs, bounds):
                    t = m.base.hidden.shape[1]
                    grads.append(ActivationGrad(m.client, m.step, base.hidden.grad[b0:b1, :t]))
        return grads, parts

    def forward_middle(self, msgs: list[Activations], batch_rows: int | None = None) -> list[Activations]:
        """Label-private mode, first half: run the server layers on the concatenated batch (graph kept for
        the base path) and return each client its slice of the last-layer hidden states."""
        with self.meter.measure():
            base, ref, bounds = self._gather(msgs, requires_grad=self.cfg.client_trainable)
            chunks = row_chunks(base.hidden.shape[0], self.cfg.server_chunk_rows)
            states = []  # several chunks: run without a graph now, again with one in backward_middle
            with _autocast(self.cfg, self.device):
                if len(chunks) == 1:
                    out = self.top.middle(base.hidden, base.attention_mask, base.position_ids)
                else:
                    outs = []
                    for r0, r1 in chunks:
                        states.append(_rng_state(self.device))
                        b = _rows(base, r0, r1)
                        with torch.no_grad():
                            outs.append(self.top.middle(b.hidden, b.attention_mask, b.position_ids))
                    out = torch.cat(outs)
                ref_out = None
                if ref is not None:
                    with _eval_mode(self.top):
                        ref_out = torch.cat([self.top.middle(r.hidden, r.attention_mask, r.position_ids)
                                             for r in (_rows(ref, r0, r1) for r0, r1 in chunks)])
            rows = batch_rows if batch_rows is not None else sum(m.batch_rows or 0 for m in msgs)
            self._pending = (msgs, bounds, base, out, chunks, states)
            replies = []
            for m, (b0, b1) in zip(msgs, bounds):
                t, rt = m.base.hidden.shape[1], (m.reference.hidden.shape[1] if ref_out is not None else 0)
                replies.append(Activations(m.client, m.step, PathBatch(out[b0:b1, :t].detach()),
                                           PathBatch(ref_out[b0:b1, :rt]) if ref_out is not None else None,
                                           batch_rows=rows))
        return replies

    def backward_middle(self, grads: list[ActivationGrad]) -> list[ActivationGrad]:
        """Label-private mode, second half: back-propagate the clients' dL/d(last hidden) (a client that sent
        none contributes zero) and return each client its slice of dL/d(cut hidden) (none when frozen)."""
        if self._pending is None:
            raise RuntimeError("backward_middle without forward_middle")
        msgs, bounds, base, out, chunks, states = self._pending
        inp = base.hidden
        self._pending = None
        with self.meter.measure():
            by_client = {g.client: g for g in grads}
            g_out = torch.zeros_like(out)
            for m, (b0, b1) in zip(msgs, bounds):
                if m.client in by_client:
                    g = by_client[m.client].grad
                    g_out[b0:b1, :g.shape[1]] = g.to(g_out.dtype)
            if not states:
                out.backward(g_out)
            else:  # each chunk again, with its graph and the dropout masks of its first pass, then its backward
                after = _rng_state(self.device)
                for (r0, r1), state in zip(chunks, states):
                    _set_rng_state(state, self.device)
                    b = _rows(base, r0, r1)
                    with _autocast(self.cfg, self.device):
                        o = self.top.middle(b.hidden, b.attention_mask, b.position_ids)
                    o.backward(g_out[r0:r1])
                _set_rng_state(after, self.device)
            if not self.cfg.client_trainable:
                return []
            return [ActivationGrad(m.client, m.step, inp.grad[b0:b1, :m.base.hidden.shape[1]])
                    for m, (b0, b1) in zip(msgs, bounds)]

    def step(self) -> None:
        """Optimizer step on the accumulated gradients."""
        _step(self.optimizer, self.meter)


class ActivationCache:
    """Frozen client layers: the cut activations the server received, keyed by (client, row ids), at most
    ``capacity`` bytes of tensors, least recently used first out."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._items: OrderedDict[tuple[int, tuple[int, ...]], tuple[Activations, int]] = OrderedDict()

    @staticmethod
    def _nbytes(msg: Activations) -> int:
        return sum(t.numel() * t.element_size() for p in (msg.base, msg.reference) if p is not None
                   for t in vars(p).values() if t is not None)

    def put(self, msg: Activations) -> None:
        """Keep ``msg`` (an Activations with ``rows``) unless it alone exceeds the capacity."""
        key, size = (msg.client, tuple(msg.rows)), self._nbytes(msg)
        if key in self._items or size > self.capacity:
            return
        while self.used + size > self.capacity:
            self.used -= self._items.popitem(last=False)[1][1]
        self._items[key] = (msg, size)
        self.used += size

    def get(self, msg: CachedActivations) -> Activations | None:
        """The stored activations of the batch ``msg`` names, as of step ``msg.step``; None when not held."""
        hit = self._items.get((msg.client, tuple(msg.rows)))
        if hit is None:
            return None
        self._items.move_to_end((msg.client, tuple(msg.rows)))
        stored = hit[0]
        return Activations(msg.client, msg.step, stored.base, stored.reference, stored.batch_rows, stored.rows)

    def clear(self) -> None:
        """Forget everything (what a restarted server holds)."""
        self._items.clear()
        self.used = 0


def _to(b: PathBatch, device: torch.device) -> PathBatch:
    return PathBatch(*(t.to(device) if t is not None else None
                       for t in (b.hidden, b.attention_mask, b.position_ids, b.labels)))


def noised(b: PathBatch | None, sigma: float, generator: torch.Generator | None = None) -> PathBatch | None:
    """``b`` with Gaussian noise on its hidden states [B, T, H]: h_t + sigma * rms(h_t) * N(0, I) per token
    (the ``cut_noise`` defence; sigma = 0 returns ``b`` itself). The gradient that comes back for the noisy
    states is applied to the clean ones, so training sees the noise as a perturbation of the server's input."""
    if b is None or sigma == 0:
        return b
    h = b.hidden.detach()
    rms = h.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    eps = torch.randn(h.shape, generator=generator, device=h.device, dtype=torch.float32)
    return PathBatch((h.float() + sigma * rms * eps).to(h.dtype), b.attention_mask, b.position_ids, b.labels)


def _unlabelled(b: PathBatch) -> PathBatch:
    return PathBatch(b.hidden, b.attention_mask, b.position_ids, None)


class Aggregator:
    """Combines client adapter uploads by an aggregation strategy (default FedAvg: theta = sum_i |D_i| / |D|
    * theta_i, accumulated in float64); the broadcast holds the tensors the strategy shares."""

    def __init__(self, strategy: Strategy | None = None) -> None:
        self.strategy = strategy or get_strategy("fedavg")
        self.rounds = 0

    def aggregate(self, uploads: list[AdapterUpload]) -> AdapterBroadcast:
        shared = self.strategy.aggregate([(u.tensors, u.n_samples) for u in uploads])
        self.rounds += 1
        return AdapterBroadcast(self.rounds, shared)
