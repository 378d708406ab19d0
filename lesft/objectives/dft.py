"""DFT, dynamic fine-tuning (Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective
with Reward Rectification", arXiv 2508.05629): each target token's cross-entropy scaled by the token's own
probability, held constant (stop-gradient):

    L_DFT = mean over target tokens of  -sg(p_t) * log p_t,      p_t = pi_theta(y_t | y_<t, x)

The paper's code (verl, token-mean loss aggregation) averages over target tokens; here the mean is taken the
way the project's ``ce`` takes it (per-sample token mean, averaged over samples, :func:`lesft.loss.ce_loss`),
so ``dft`` and ``ce`` differ only by the weight sg(p_t); with one row per micro-batch the two means agree.
Base path only (``--paths base``), no extra forward, nothing extra on the wire: ``--loss dft`` or
``--method dft`` (splitlora with this loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lesft.loss import IGNORE_INDEX, _sample_mean, target_logprobs
from lesft.objectives.registry import ObjectiveBatch, register_objective

if TYPE_CHECKING:
    from lesft.config import TrainConfig

__all__ = ["dft_from_logprobs"]


def dft_from_logprobs(logp: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
    """DFT loss from the target tokens' log-probabilities ``logp`` ``[M]`` (row-major over
    ``labels[:, 1:] != -100``); statistics: ``mean_p`` (mean sg(p_t), the mean token weight)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    rows, _ = mask.nonzero(as_tuple=True)
    weight = logp.detach().float().exp()
    loss = _sample_mean(-weight * logp.float(), rows.to(logp.device), mask.sum(1).to(logp.device))
    return loss, {"mean_p": float(weight.mean()) if weight.numel() else 0.0}


@register_objective("dft", logprobs=True)
def dft(batch: ObjectiveBatch, cfg: "TrainConfig") -> tuple[Tensor, dict[str, float]]:
    if batch.logits is None:
        return dft_from_logprobs(batch.logprobs, batch.labels)
    logp, mask = target_logprobs(batch.logits, batch.labels)
    return dft_from_logprobs(logp[mask], batch.labels)
