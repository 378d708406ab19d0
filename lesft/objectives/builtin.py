"""The built-in objectives: ``ce`` (token-mean cross-entropy, base path only) and ``lesft`` (the LESFT
token-weighted loss, base + reference paths; see :mod:`lesft.loss`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lesft.loss import ce_from_logprobs, ce_loss, lesft_from_logprobs, lesft_loss
from lesft.objectives.registry import ObjectiveBatch, SliceLoss, register_objective

if TYPE_CHECKING:
    from lesft.config import TrainConfig


@register_objective("ce", logprobs=True)
def _ce(batch: ObjectiveBatch, cfg: "TrainConfig") -> tuple[Tensor, dict[str, float]]:
    if batch.logits is None:
        return ce_from_logprobs(batch.logprobs, batch.labels), {}
    return ce_loss(batch.logits, batch.labels), {}


LESFT_CLASSES = ("salient", "subsalient", "irrelevant")


def _lesft_stats(parts: list[SliceLoss]) -> dict[str, float]:
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
                                   cfg.lesft, ref_hidden=batch.ref_hidden)
    return lesft_loss(batch.logits, batch.labels, batch.ref_logits, batch.ref_labels, batch.hidden, cfg.lesft,
                      ref_hidden=batch.ref_hidden)
