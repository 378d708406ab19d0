"""The objectives registry: what a loss sees (:class:`ObjectiveBatch`), what it returns per slice of rows
(:class:`SliceLoss`), and the names ``--loss`` takes (:func:`register_objective`, :func:`get_objective`)."""


from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import Tensor

if TYPE_CHECKING:
    from lesft.config import TrainConfig

__all__ = ["OBJECTIVES", "Objective", "ObjectiveBatch", "SliceLoss", "get_objective", "register_objective",
           "token_mean_stats"]


@dataclass
class SliceLoss:
    """Loss of one client's rows of a batch, with what is needed to merge it with others."""

    loss: Tensor
    n_samples: int  # rows with >= 1 target token
    n_tokens: int
    stats: dict[str, float]


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
    ref_hidden: Tensor | None = None    # [B, T_ref, H] the reference path's final hidden states (detached)
    # () -> [M] log p of each target token under the frozen base (adapters off, no graph), computed only when
    # called (Rho-1's reference model); None where this party cannot compute it (label-private client head)
    frozen_logprobs: Callable[[], Tensor] | None = None


LossFn = Callable[[ObjectiveBatch, "TrainConfig"], "tuple[Tensor, dict[str, float]]"]
MergeFn = Callable[[list[SliceLoss]], dict[str, float]]


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
                       logprobs: bool = False, replace: bool = False) -> Callable[[LossFn], LossFn]:
    """Function decorator: make ``fn(batch, cfg) -> (loss, stats)`` reachable as ``--loss NAME``. With
    ``logprobs=True`` ``fn`` must also take a batch whose ``logits`` is None and whose ``logprobs`` holds the
    target tokens' log-probabilities (what a chunked LM head gives). A name another function took is refused
    unless ``replace``."""
    def add(fn: LossFn) -> LossFn:
        from lesft.plugins import claim

        claim(OBJECTIVES, name, Objective(name, fn, needs_reference, merge_stats, logprobs), fn, "loss", replace)
        return fn
    return add


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(OBJECTIVES)} "
                         "(add one with lesft.objectives.register_objective)")
    return OBJECTIVES[name]
