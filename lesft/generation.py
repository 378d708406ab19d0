"""Split generation: use a tuned model the way it was trained, the client's layers on the device, the rest
on the server, each side with its own KV cache.

One session = one left-padded batch of prompts. The client embeds and runs layers ``[0, k)``; the server runs
``[k, L)``, the final norm and the head and picks the next token of every row. Per step:

- step 0 (prefill): ``GenStep`` with the whole prompt's cut activations [B, T, H] and its bool mask [B, T] up;
- every later step: ``GenStep`` with one cut-layer hidden vector per row [B, 1, H] up;
- down: ``GenReply`` with one token id per row [B] -- or, label-private (U-shaped, the client holds the
  final norm and head and picks the tokens), the last position's last-layer hidden states [B, 1, H]: the
  server then never sees a token id, neither of the prompt nor of the answer.

Both sides keep HF ``generate``'s bookkeeping (positions from the mask's cumulative sum, an all-ones mask
dropped, mask and positions extended by one per step), so greedy split generation equals greedy generation
of the merged unsplit model token for token. :class:`SplitGenerator` offers the subset of HF's
``model.generate`` that :func:`lesft.evaluate.generate` uses: evaluation, stop strings and EOS handling
run through the split unchanged. :class:`GenerationServer` is the server side (sessions with limits),
transport-free; ``lesft.deploy.generation`` puts gRPC around it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from transformers import DynamicCache, StoppingCriteriaList, TemperatureLogitsWarper, TopPLogitsWarper

from lesft.lora import adapter_args, merge_lora, part_state
from lesft.messages import GenReply, GenStep, bounded
from lesft.model.split import ClientPart, HeadPart, ServerPart
from lesft.transport import Loopback, Meter, Transport


# ----------------------------------------------------------------------------------------------
# Shared by both sides
# ----------------------------------------------------------------------------------------------


class Positions:
    """Attention mask and position ids of a left-padded batch as HF ``generate`` keeps them: positions
    from the mask's cumulative sum (0 on padding), an all-ones mask dropped (None), both extended by one
    token per decode step."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        m = attention_mask.long()
        self.mask: torch.Tensor | None = None if bool((m == 1).all()) else m
        self.pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        self.fresh = True

    def next(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mask [B, T_seen + T_new] or None, positions [B, T_new]) of the next forward."""
        if self.fresh:
            self.fresh = False
        else:
            if self.mask is not None:
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
            self.pos = self.pos[:, -1:] + 1
        return self.mask, self.pos


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: argmax when ``temperature`` is 0, else sampled
    after transformers' temperature and top-p warpers (the ones ``generate`` applies)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(int(seed)) if seed is not None else None


# ----------------------------------------------------------------------------------------------
# Server side: sessions
# ----------------------------------------------------------------------------------------------


class SessionError(ValueError):
    """A refused generation call; ``code`` names the gRPC status it maps to (``NOT_FOUND``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class SessionLimits:
    """Bounds on the server's generation sessions."""

    max_sessions: int = field(default=64, metadata={"help": "Generation sessions open at once."})
    max_tokens: int = field(default=4096, metadata={"help": "Positions per session: prompt + generated."})
    max_batch: int = field(default=64, metadata={"help": "Rows per generation session."})
    idle_s: float = field(default=60.0, metadata={"help": "A session unused this long (seconds) is dropped and "
                                                          "its KV cache freed."})
    max_abs: float = field(default=1e6, metadata={"help": "Largest |value| of a hidden state a client may send (the "
                                                          "training service's bound)."})
    prefill_chunk_tokens: int = field(default=512, metadata={
        "help": "A prompt's positions go through the server's layers this many at a time, the KV cache growing "
                "chunk by chunk, so a long prompt's activations are bounded (0: all at once). The tokens are "
                "the same either way."})


@dataclass
class _Session:
    owner: int
    batch: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    cache: DynamicCache
    positions: Positions | None = None
    step: int = 0
    length: int = 0
    last_used: float = 0.0
    busy_s: float = 0.0
    last_reply: GenReply | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class GenerationServer:
    """The server's part of split generation: layers ``[k, L)`` (and, unless label-private, the final norm and
    head), merged LoRA, one KV cache per session. Every incoming step is checked (owner, order, dtype, shape,
    finiteness, limits) and refused with a :class:`SessionError`; the other sessions are not affected."""

    def __init__(self, top: ServerPart, hidden_size: int, limits: SessionLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.top = top.eval()
        self.dtype = next(top.parameters()).dtype
        self.label_private = top.head is None
        self.hidden, self.limits, self.clock = hidden_size, limits or SessionLimits(), clock
        self.sessions: dict[str, _Session] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()  # set by shutdown(): background reapers end
        self.log: list[str] = []

    def open(self, owner: int, params: dict[str, Any]) -> dict[str, Any]:
        """A new session for ``params`` {``batch``, ``temperature``, ``top_p``, ``seed``, ``label_private``}."""
        batch = int(params.get("batch", 0))
        if not 1 <= batch <= self.limits.max_batch:
            raise SessionError("INVALID_ARGUMENT", f"batch {batch} outside [1, {self.limits.max_batch}]")
        if bool(params.get("label_private", False)) != self.label_private:
            raise SessionError("FAILED_PRECONDITION", "client and server disagree on label privacy: the server "
                               f"{'holds no' if self.label_private else 'holds the'} head")
        temperature, top_p = float(params.get("temperature", 0.0)), float(params.get("top_p", 1.0))
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise SessionError("INVALID_ARGUMENT", f"temperature {temperature} / top_p {top_p} out of range")
        self.reap()
        with self.lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise SessionError("RESOURCE_EXHAUSTED", f"{len(self.sessions)} sessions open, the limit is "
                                   f"{self.limits.max_sessions}: close one or wait for idle ones to expire")
            sid = secrets.token_hex(8)
            self.sessions[sid] = _Session(owner, batch, temperature, top_p, _generator(params.get("seed")),
                                          DynamicCache(config=self.top.config), last_used=self.clock())
        return {"session": sid, "max_tokens": self.limits.max_tokens, "idle_s": self.limits.idle_s}

    def _get(self, owner: int, sid: str) -> _Session:
        with self.lock:
            s = self.sessions.get(sid)
        if s is None:
            raise SessionError("NOT_FOUND", f"unknown or expired generation session {sid!r}")
        if s.owner != owner:
            raise SessionError("PERMISSION_DENIED", f"session {sid!r} belongs to another client")
        return s

    @torch.inference_mode()
    def step(self, owner: int, msg: GenStep) -> GenReply:
        """One step of session ``msg.session``: run the layers on ``msg.hidden``, append to the cache, answer
        the next tokens (or label-private: the last position's hidden states). A repeated step (a retry after
        a lost reply) gets the same reply again."""
        s = self._get(owner, msg.session)
        with s.lock:
            if msg.step == s.step - 1 and s.last_reply is not None:
                return s.last_reply
            if msg.step != s.step:
                raise SessionError("FAILED_PRECONDITION", f"session {msg.session!r} expects step {s.step}, got {msg.step}")
            t = self._check(s, msg)
            if s.length + t > self.limits.max_tokens:
                self.drop(msg.session, "token limit")
                raise SessionError("RESOURCE_EXHAUSTED", f"session {msg.session!r} would hold {s.length + t} "
                                   f"positions, the limit is {self.limits.max_tokens}; the session is closed")
            t0 = time.perf_counter()
            try:
                if s.positions is None:
                    s.positions = Positions(msg.attention_mask)
                mask, pos = s.positions.next()
                out = self._middle(msg.hidden.to(self.dtype), mask, pos, s.cache)
                if self.label_private:
                    reply = GenReply(msg.session, msg.step, hidden=out)
                else:
                    logits, _ = self.top.head(out)
                    reply = GenReply(msg.session, msg.step, tokens=pick(logits[:, -1], s.temperature, s.top_p,
                                                                        s.generator))
            except Exception as e:  # noqa: BLE001 -- the cache may be half-updated: this session ends, others go on
                self.drop(msg.session, f"step {msg.step} failed: {type(e).__name__}: {e}")
                raise SessionError("INTERNAL", f"step {msg.step} of session {msg.session!r} failed on the server "
                                   f"({type(e).__name__}: {e}); the session is closed") from None
            s.busy_s += time.perf_counter() - t0
            s.step, s.length, s.last_used, s.last_reply = s.step + 1, s.length + t, self.clock(), reply
        return reply

    def _middle(self, hidden: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
        """The server's layers on the step's new positions [B, T, H], ``prefill_chunk_tokens`` at a time (each
        chunk attends to the cache the chunks before it filled); the last position's output [B, 1, H]."""
        t = hidden.shape[1]
        c = self.limits.prefill_chunk_tokens or t
        past = mask.shape[1] - t if mask is not None else 0  # the mask covers the cached positions and the new
        for a in range(0, t, c):
            b = min(a + c, t)
            out = self.top.middle(hidden[:, a:b], mask[:, :past + b] if mask is not None else None, pos[:, a:b], cache)
        return out[:, -1:]

    def _check(self, s: _Session, msg: GenStep) -> int:
        """The number of new positions in ``msg``; raise INVALID_ARGUMENT naming what is wrong."""
        h = msg.hidden
        try:
            if not isinstance(h, torch.Tensor) or not h.is_floating_point():
                raise ValueError(f"hidden: expected a float tensor, got {getattr(h, 'dtype', type(h).__name__)}")
            if h.dim() != 3 or h.shape[0] != s.batch or h.shape[2] != self.hidden or h.shape[1] < 1:
                raise ValueError(f"hidden: shape {list(h.shape)}, expected [{s.batch}, T, {self.hidden}]")
            if msg.step > 0 and (h.shape[1] != 1 or msg.attention_mask is not None):
                raise ValueError(f"hidden: a decode step carries [{s.batch}, 1, {self.hidden}] and no mask, got "
                                 f"{list(h.shape)}{' and a mask' if msg.attention_mask is not None else ''}")
            if not torch.isfinite(h).all():
                raise ValueError("hidden: contains NaN or infinite values")
            if not bounded(h, self.limits.max_abs):
                raise ValueError(f"hidden: values beyond the magnitude limit {self.limits.max_abs:g}")
            m = msg.attention_mask
            if msg.step == 0:
                if m is None or m.dtype != torch.bool or tuple(m.shape) != tuple(h.shape[:2]):
                    raise ValueError(f"attention_mask: expected bool {list(h.shape[:2])}, got "
                                     f"{None if m is None else f'{m.dtype} {list(m.shape)}'}")
                if not bool(m.any(dim=-1).all()):
                    raise ValueError("attention_mask: every row needs at least one token")
        except ValueError as e:
            raise SessionError("INVALID_ARGUMENT", f"rejected step {msg.step} of session {msg.session!r}: {e}") from None
        return int(h.shape[1])

    def close(self, owner: int, sid: str) -> dict[str, Any]:
        """Drop the session and free its cache; its server-side numbers."""
        s = self._get(owner, sid)
        self.drop(sid, None)
        return {"steps": s.step, "positions": s.length, "server_s": s.busy_s}

    def drop(self, sid: str, why: str | None) -> None:
        with self.lock:
            s = self.sessions.pop(sid, None)
        if s is not None:
            s.cache = s.positions = s.last_reply = None  # type: ignore[assignment]  # free now, not at the next gc
            if why:
                self._note(f"dropped generation session {sid} ({why})")

    def reap(self) -> int:
        """Drop the sessions idle for more than ``idle_s``; how many were dropped."""
        now = self.clock()
        with self.lock:
            idle = [sid for sid, s in self.sessions.items() if now - s.last_used > self.limits.idle_s
                    and not s.lock.locked()]
        for sid in idle:
            self.drop(sid, f"idle for more than {self.limits.idle_s:g} s")
        return len(idle)

    def shutdown(self) -> None:
        """Drop every session and stop the reapers."""
        self.stopped.set()
        for sid in list(self.sessions):
            self.drop(sid, None)

    def held_bytes(self) -> int:
        """Bytes of the KV caches of the open sessions."""
        with self.lock:
            caches = [s.cache for s in self.sessions.values()]
        return sum(t.numel() * t.element_size() for c in caches for layer in c.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))

    def _note(self, line: str) -> None:
        self.log.append(line)
        del self.log[:-100]
        print(f"lesft server: {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Links: how the client reaches the server side
# ----------------------------------------------------------------------------------------------


class GenLink(Protocol):
    meter: Meter

    def open(self, params: dict[str, Any]) -> str:
        """A new session; its id."""
        ...

    def step(self, msg: GenStep) -> GenReply:
        ...

    def close(self, session: str) -> dict[str, Any]:
        """Free the session; the server's numbers (``server_s``, ``steps``)."""
        ...


class LocalGen:
    """The generation server in this process; every message crosses ``transport`` (encoded, counted, decoded)."""

    def __init__(self, server: GenerationServer, transport: Transport, owner: int = 0) -> None:
        self.server, self.transport, self.owner = server, transport, owner
        self.meter = transport.meter

    def open(self, params: dict[str, Any]) -> str:
        return self.server.open(self.owner, params)["session"]

    def step(self, msg: GenStep) -> GenReply:
        send = self.transport.send
        return send(self.server.step(self.owner, send(msg, "client_to_server")), "server_to_client")

    def close(self, session: str) -> dict[str, Any]:
        return self.server.close(self.owner, session)


# ----------------------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------------------


def _sent(meter: Meter) -> tuple[int, int]:
    t = meter.totals()
    return t["client_to_server"], t["server_to_client"]


class SplitGenerator(nn.Module):
    """The client's side of split generation: embedding + layers ``[0, k)`` (+ final norm and head when
    label-private) and a :class:`GenLink` to the server's side.

    :meth:`generate` takes the arguments :func:`lesft.evaluate.generate` passes to HF's ``model.generate``
    and returns the same ``[B, T + new]`` ids (finished rows padded with ``pad_token_id``), so evaluation
    runs through the split unchanged. :meth:`inference_stats` reports what inference cost, measured."""

    def __init__(self, bottom: ClientPart, link: GenLink, generation_config: Any = None,
                 head: HeadPart | None = None, seed: int | None = 0) -> None:
        super().__init__()
        self.bottom, self.head = bottom.eval(), head.eval() if head is not None else None
        self.link, self.generation_config, self.seed = link, generation_config, seed
        self._calls = itertools.count()
        self.totals: dict[str, float] = dict.fromkeys(
            ("batches", "sequences", "new_tokens", "decode_steps", "decode_rows", "client_s", "server_s", "wall_s",
             "first_token_s", "prefill_up", "prefill_down", "decode_up", "decode_down"), 0)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
                 eos_token_id: list[int] | int | None = None, pad_token_id: int = 0,
                 stopping_criteria: StoppingCriteriaList | None = None, **_: Any) -> torch.Tensor:
        """Ids [B, T + n] of the prompts [B, T] (left-padded) followed by up to ``max_new_tokens`` new ones."""
        temp = float(temperature or 1.0) if do_sample else 0.0
        top_p = float(top_p or 1.0) if do_sample else 1.0
        seed = None if self.seed is None else self.seed + next(self._calls)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long)
        stop = stopping_criteria or StoppingCriteriaList()
        b = input_ids.shape[0]
        t_start, client_s = time.perf_counter(), 0.0
        up0, down0 = _sent(self.link.meter)
        sid = self.link.open({"batch": b, "temperature": temp, "top_p": top_p, "seed": seed,
                              "label_private": self.head is not None})
        generator = _generator(seed)
        try:
            positions, cache = Positions(attention_mask), DynamicCache(config=self.bottom.config)
            ids, unfinished, step, tok = input_ids, torch.ones(b, dtype=torch.bool), 0, input_ids
            n_new = 0  # tokens generated while their row was unfinished (the EOS included)
            while True:
                t0 = time.perf_counter()
                mask, pos = positions.next()
                hidden, _ = self.bottom(tok, mask, pos, cache)
                client_s += time.perf_counter() - t0
                reply = self.link.step(GenStep(sid, step, hidden, attention_mask.bool() if step == 0 else None))
                t0 = time.perf_counter()
                if self.head is not None:  # label-private: the tokens are picked here
                    logits, _ = self.head(reply.hidden.to(self.head.lm_head.weight.dtype))
                    nxt = pick(logits[:, -1], temp, top_p, generator)
                else:
                    nxt = reply.tokens.long()
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
                n_new += int(unfinished.sum())
                ids = torch.cat([ids, nxt[:, None]], dim=-1)
                unfinished &= ~torch.isin(nxt, eos)
                unfinished &= ~stop(ids, None)
                client_s += time.perf_counter() - t0
                if step == 0:
                    self.totals["first_token_s"] += time.perf_counter() - t_start
                    up1, down1 = _sent(self.link.meter)
                    self.totals["prefill_up"] += up1 - up0
                    self.totals["prefill_down"] += down1 - down0
                step += 1
                if step >= max_new_tokens or not bool(unfinished.any()):
                    break
                tok = nxt[:, None]
        except BaseException:
            with contextlib.suppress(Exception):  # the server may have closed it already: keep the first error
                self.link.close(sid)
            raise
        server = self.link.close(sid)
        up2, down2 = _sent(self.link.meter)
        tt = self.totals
        tt["batches"] += 1
        tt["sequences"] += b
        tt["new_tokens"] += n_new
        tt["decode_steps"] += step - 1
        tt["decode_rows"] += (step - 1) * b
        tt["decode_up"] += up2 - up1
        tt["decode_down"] += down2 - down1
        tt["client_s"] += client_s
        tt["server_s"] += float(server.get("server_s", 0.0))
        tt["wall_s"] += time.perf_counter() - t_start
        return ids

    def inference_stats(self) -> dict[str, Any]:
        """Measured cost of every :meth:`generate` call so far: bytes each way (prefill, and per decoded token
        = per row per decode step, payload + header), time per decode step per side, first-token latency."""
        t = self.totals
        steps, rows, batches = max(t["decode_steps"], 1), max(t["decode_rows"], 1), max(t["batches"], 1)
        steps_all = t["decode_steps"] + t["batches"]
        return {
            "batches": int(t["batches"]), "sequences": int(t["sequences"]), "new_tokens": int(t["new_tokens"]),
            "decode_steps": int(t["decode_steps"]),
            "label_private": self.head is not None,
            "bytes": {"client_to_server": {"prefill": int(t["prefill_up"]), "decode": int(t["decode_up"])},
                      "server_to_client": {"prefill": int(t["prefill_down"]), "decode": int(t["decode_down"])}},
            "bytes_per_decoded_token": {"client_to_server": t["decode_up"] / rows,
                                        "server_to_client": t["decode_down"] / rows},
            "bytes_per_generated_token": {
                "client_to_server": (t["prefill_up"] + t["decode_up"]) / max(t["new_tokens"], 1),
                "server_to_client": (t["prefill_down"] + t["decode_down"]) / max(t["new_tokens"], 1)},
            "s_per_step": {"client": t["client_s"] / max(steps_all, 1), "server": t["server_s"] / max(steps_all, 1),
                           "wall": t["wall_s"] / max(steps_all, 1)},
            "s_per_decode_step_wall": (t["wall_s"] - t["first_token_s"]) / steps,
            "first_token_s": t["first_token_s"] / batches,
            "client_s": t["client_s"], "server_s": t["server_s"], "wall_s": t["wall_s"],
        }


# ----------------------------------------------------------------------------------------------
# Building both sides from a trained run
# ----------------------------------------------------------------------------------------------


@dataclass
class SplitSpec:
    """What a trained run says about its split: model, client layers, label privacy, wire dtype."""

    model: str
    client_layers: str
    label_privacy: bool = False
    wire_dtype: str = "fp32"
    chat_template: bool = True

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "SplitSpec":
        from lesft.typed import load_yaml

        p = Path(run_dir) / "config.yaml"
        if not p.is_file():
            raise FileNotFoundError(f"{run_dir} is not a training run directory (no config.yaml)")
        c = load_yaml(p)
        if c.get("split") is False or c.get("method") in ("centralized", "fedavg"):
            raise ValueError(f"{run_dir} trained {c.get('method')!r}, an unsplit method: there is no split to use")
        return cls(str(c["model"]), str(c.get("client_layers", "1/4")), bool(c.get("label_privacy", False)),
                   str(c.get("wire_dtype", "fp32")), c.get("chat_template", True) is not False)


def cut(model: nn.Module, k: int, adapter: str | Path | None, label_private: bool, client: bool = True,
        server: bool = True) -> tuple[ClientPart | None, HeadPart | None, ServerPart | None]:
    """Cut ``model`` after ``k`` layers and fold the adapter's LoRA into the sides asked for: layers ``[0, k)``
    into the client part, ``[k, L)`` into the server part; each side reads only its own layers' tensors, so a
    networked run's client adapter or server adapter serves as well as a whole-model one. Returns (client
    part, its final norm + head when label-private, server part -- without norm and head when label-private);
    a side not asked for is None."""
    from lesft.model.split import client_head, split_model

    bottom, top, layout = split_model(model, k, label_private=label_private)
    args, tensors = adapter_args(adapter) if adapter is not None else (None, {})
    if client and args is not None:
        merge_lora(bottom, part_state(tensors, 0, k, layout.layers_path), args)
    if server and args is not None:
        merge_lora(top, part_state(tensors, k, len(layout.layers) - k, layout.layers_path), args)
    head = client_head(layout) if label_private and client else None
    return bottom if client else None, head, top if server else None


def in_process(run_dir: str | Path, adapter: str | Path | None = None, label_privacy: bool | None = None,
               wire_dtype: str | None = None, limits: SessionLimits | None = None, seed: int | None = 0):
    """Both sides of a trained run in this process, linked by a counting :class:`Loopback`: (generator,
    tokenizer, spec). ``adapter`` defaults to ``RUN/adapter``; ``label_privacy``/``wire_dtype`` to the run's."""
    from lesft.model.load import load_model
    from lesft.model.split import inspect_decoder, resolve_client_layers

    spec = SplitSpec.from_run(run_dir)
    if label_privacy is not None:
        spec.label_privacy = label_privacy
    if wire_dtype is not None:
        spec.wire_dtype = wire_dtype
    adapter = adapter or Path(run_dir) / "adapter"
    model, tokenizer = load_model(spec.model, device="cpu")
    k = resolve_client_layers(spec.client_layers, len(inspect_decoder(model).layers))
    bottom, head, top = cut(model, k, adapter, spec.label_privacy)
    server = GenerationServer(top, model.config.hidden_size, limits)
    gen = SplitGenerator(bottom, LocalGen(server, Loopback(spec.wire_dtype)), model.generation_config, head, seed)
    return gen, tokenizer, spec


# ----------------------------------------------------------------------------------------------
# lesft generate
# ----------------------------------------------------------------------------------------------


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class GenerateConfig:
    """``lesft generate`` / ``lesft client generate``: prompts through the split."""

    prompt: list[str] = _help("Prompt(s) to complete.", default_factory=list)
    file: str | None = _help("JSONL file of prompts: one {\"prompt\": ...} object (or a JSON string) per line.",
                             default=None)
    output: str | None = _help("Write {prompt, completion} JSON lines here (default: print them).", default=None)
    max_new_tokens: int = _help("Most tokens generated per prompt.", default=256)
    gen_batch_size: int = _help("Prompts per generation batch (one session each).", default=16)
    temperature: float = _help("0: greedy; > 0: sampling at this temperature.", default=0.0)
    top_p: float = _help("Sampling: nucleus mass kept.", default=1.0)
    gen_seed: int = _help("Seed of sampling.", default=0)
    stop: list[str] | None = _help("Stop strings (default: lesft eval's).", default=None)

    def prompts(self) -> list[str]:
        out = list(self.prompt)
        if self.file:
            for n, line in enumerate(Path(self.file).read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out.append(row if isinstance(row, str) else str(row["prompt"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.file}:{n}: expected {{\"prompt\": ...}} or a JSON string ({e})") from None
        if not out:
            raise ValueError("nothing to generate: give --prompt or --file")
        return out


def complete(gen: SplitGenerator, tokenizer: Any, cfg: GenerateConfig, chat_template: bool) -> list[dict[str, str]]:
    """Completions of ``cfg``'s prompts through ``gen``, written to ``cfg.output`` or printed, then one line
    of measured cost (JSON, prefixed ``lesft generate:``) on stderr."""
    from lesft.data.prompts import render_prompt
    from lesft.decoding import DEFAULT_STOP, generate

    prompts = cfg.prompts()
    texts = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    stop = list(DEFAULT_STOP) if cfg.stop is None else cfg.stop
    outs = generate(gen, tokenizer, texts, cfg.max_new_tokens, cfg.gen_batch_size, stop, cfg.temperature, cfg.top_p)
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, outs)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if cfg.output:
        Path(cfg.output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    print("lesft generate: " + json.dumps(gen.inference_stats()), file=sys.stderr, flush=True)
    return records


def run_generate(cfg: GenerateConfig, run_dir: str, adapter: str | None = None, label_privacy: bool | None = None,
                 chat_template: bool | None = None) -> list[dict[str, str]]:
    """``lesft generate --run DIR``: both sides of the run in this process (``label_privacy``/``chat_template``:
    None = as the run trained)."""
    gen, tokenizer, spec = in_process(run_dir, adapter, label_privacy, seed=cfg.gen_seed)
    return complete(gen, tokenizer, cfg, spec.chat_template if chat_template is None else chat_template)
