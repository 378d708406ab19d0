"""Training objectives: the loss of one client's rows, which input paths it needs, and how its per-slice
statistics merge. The server's step, an unsplit client's step and a label-private client's head all call
:func:`get_objective` (``--loss NAME``), so a new loss is one function and one registration.

Built in: ``ce`` (token-mean cross-entropy, base path only), ``lesft`` (the LESFT token-weighted loss,
base + reference paths, see :mod:`lesft.loss`), and two token-weighting baselines on the base path, each in
its own module: ``dft`` (:mod:`lesft.objectives_dft`) and ``rho1`` (:mod:`lesft.objectives_rho1`).

Add one from outside the package (trl-style: a function of the logits and labels)::

    from lesft.objectives import register_objective

    @register_objective("focal", needs_reference=False)
    def focal(batch, cfg):
        ...  # batch.logits [B, T, V], batch.labels [B, T] (-100 = ignored)
        return loss, {"mean_p": ...}      # a scalar and per-slice statistics (floats)

and train with ``--loss focal`` (with ``--paths base``, or ``dual`` when ``needs_reference=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import Tensor

from lesft.loss import ce_from_logprobs, ce_loss, lesft_from_logprobs, lesft_loss

if TYPE_CHECKING:
    from lesft.config import TrainConfig
    from lesft.roles import SliceLoss

__all__ = ["OBJECTIVES", "Objective", "ObjectiveBatch", "get_objective", "register_objective", "token_mean_stats"]


@dataclass
class ObjectiveBatch:
    """One client's rows, as the loss sees them. Shapes: ``[B, T, V]`` logits, ``[B, T]`` labels (Hugging
    Face alignment, -100 ignored), ``[B, T, H]`` final hidden states (detached); ``ref_*`` None unless
    the objective needs the reference path. An objective registered with ``logprobs=True`` may instead get
    ``logits=None`` and the target tokens' log-probabilities (``--head_chunk_tokens``: the LM head then runs
    on chunks of target positions and the ``[B, T, V]`` logits never exist)."""

    logits: Tensor | None
    labels: Tensor
    hidden: Tensor
    ref_logits: Tensor | None = None
    ref_labels: Tensor | None = None
    logprobs: Tensor | None = None      # [M] log p of each target token (row-major), when logits is None
    ref_logprobs: Tensor | None = None  # [M] the same on the reference path (no graph)
    # () -> [M] log p of each target token under the frozen base (adapters off, no graph), computed only when
    # called (Rho-1's reference model); None where this party cannot compute it (label-private client head)
    frozen_logprobs: Callable[[], Tensor] | None = None


LossFn = Callable[[ObjectiveBatch, "TrainConfig"], "tuple[Tensor, dict[str, float]]"]
MergeFn = Callable[[list["SliceLoss"]], dict[str, float]]


def token_mean_stats(parts: list["SliceLoss"]) -> dict[str, float]:
    """Each statistic averaged over the slices, weighted by their target tokens."""
    tokens = sum(p.n_tokens for p in parts)
    return {k: sum(p.stats[k] * p.n_tokens for p in parts) / tokens for k in parts[0].stats} if tokens else {}


@dataclass(frozen=True)
class Objective:
    name: str
    fn: LossFn
    needs_reference: bool  # True: paths=dual (the reference path's logits reach fn)
    merge_stats: MergeFn = token_mean_stats
    logprobs: bool = False  # True: fn also accepts logits=None with the target log-probs (chunked head)


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, needs_reference: bool = False, merge_stats: MergeFn = token_mean_stats,
                       logprobs: bool = False) -> Callable[[LossFn], LossFn]:
    """Function decorator: make ``fn(batch, cfg) -> (loss, stats)`` reachable as ``--loss NAME``. With
    ``logprobs=True`` ``fn`` must also take a batch whose ``logits`` is None and whose ``logprobs`` holds the
    target tokens' log-probabilities (what a chunked LM head gives)."""
    def add(fn: LossFn) -> LossFn:
        OBJECTIVES[name] = Objective(name, fn, needs_reference, merge_stats, logprobs)
        return fn
    return add


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(OBJECTIVES)} "
                         "(add one with lesft.objectives.register_objective)")
    return OBJECTIVES[name]


@register_objective("ce", logprobs=True)
def _ce(batch: ObjectiveBatch, cfg: "TrainConfig") -> tuple[Tensor, dict[str, float]]:
    if batch.logits is None:
        return ce_from_logprobs(batch.logprobs, batch.labels), {}
    return ce_loss(batch.logits, batch.labels), {}


LESFT_CLASSES = ("salient", "subsalient", "irrelevant")


def _lesft_stats(parts: list["SliceLoss"]) -> dict[str, float]:
    """Class shares weighted by tokens; each class's mean weight weighted by that class's tokens."""
    tokens = sum(p.n_tokens for p in parts)
    stats: dict[str, float] = {}
    for k in LESFT_CLASSES:
        cls_tok = sum(p.stats[f"frac_{k}"] * p.n_tokens for p in parts)
        stats[f"frac_{k}"] = cls_tok / tokens
        stats[f"mean_weight_{k}"] = (sum(p.stats[f"mean_weight_{k}"] * p.stats[f"frac_{k}"] * p.n_tokens
                                         for p in parts) / cls_tok if cls_tok else 0.0)
    stats["mean_weight"] = sum(p.stats["mean_weight"] * p.n_tokens for p in parts) / tokens
    return stats


@register_objective("lesft", needs_reference=True, merge_stats=_lesft_stats, logprobs=True)
def _lesft(batch: ObjectiveBatch, cfg: "TrainConfig") -> tuple[Tensor, dict[str, float]]:
    if batch.logits is None:
        return lesft_from_logprobs(batch.logprobs, batch.ref_logprobs, batch.labels, batch.ref_labels, batch.hidden,
                                   cfg.lesft)
    return lesft_loss(batch.logits, batch.labels, batch.ref_logits, batch.ref_labels, batch.hidden, cfg.lesft)


# the baselines, one module each (they register themselves on import)
from lesft import objectives_dft, objectives_rho1  # noqa: E402,F401
