"""Rho-1-style selective language modelling (Lin et al., "Rho-1: Not All Tokens Are What You Need",
arXiv 2404.07965, NeurIPS 2024): train only on the target tokens whose loss most exceeds a reference model's.

    excess_t = L_theta(t) - L_ref(t)          (signed; L = -log p of the target token)
    L_SLM    = 1 / (N * k%) * sum_t I_k%(t) * L_theta(t)

``I_k%`` keeps the top ``k%`` of the N target tokens by excess loss (``--rho1.ratio``, default 0.6: the
paper's selection ratio for its 1B math model; its 7B used 0.7). Here the reference model is the frozen base
(the same layers with their LoRA adapters off), which the party holding the LM head computes in one more
forward pass without a graph (:func:`lesft.frozen.frozen_target_logprobs`):

* split server: its own layers with adapters off, on the cut activations the client already sent (the
  client's layers, with their adapters, stay as they ran: the reference is frozen from the cut on). No extra
  bytes on the wire; the extra forward runs inside the server's measured step, so it is counted in its time.
* unsplit client (``--split false``): the whole model again with every adapter off (bottom and top).
* label-private mode: refused at start (the server holds the layers, the client the head; neither can run
  the frozen model alone, and doing it across the cut would cost one more exchange per step).

The selection is made within each loss slice (one client's rows of a micro-batch; a chunk of them when
``--server_chunk_rows`` cuts a client's rows). ``k = ceil(ratio * N)`` tokens are kept (at least one); ties
are broken by ``torch.topk``. ``--loss rho1`` (with ``--paths base``) or ``--method rho1`` (splitlora with
this loss).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lesft.loss import target_logprobs
from lesft.objectives.registry import ObjectiveBatch, register_objective

if TYPE_CHECKING:
    from lesft.config import TrainConfig

__all__ = ["rho1_from_logprobs", "rho1_keep"]


def rho1_keep(logp: Tensor, frozen_logp: Tensor, ratio: float) -> Tensor:
    """Boolean ``[M]``: the ``ceil(ratio * M)`` tokens (>= 1 when M > 0) of largest excess loss
    ``(-logp) - (-frozen_logp)``. No gradient flows through the selection."""
    m = logp.numel()
    keep = torch.zeros(m, dtype=torch.bool, device=logp.device)
    if m == 0:
        return keep
    k = min(m, max(1, math.ceil(ratio * m - 1e-9)))
    excess = frozen_logp.detach().float().to(logp.device) - logp.detach().float()
    keep[excess.topk(k).indices] = True
    return keep


def rho1_from_logprobs(logp: Tensor, frozen_logp: Tensor, ratio: float) -> tuple[Tensor, dict[str, float]]:
    """The selective loss from the current and frozen log-probabilities of the same ``[M]`` target tokens;
    statistics: ``kept`` (share of tokens trained on) and ``mean_excess_kept`` (their mean excess loss)."""
    if frozen_logp.shape != logp.shape:
        raise ValueError(f"current and frozen log-probs differ in shape: {tuple(logp.shape)} vs "
                         f"{tuple(frozen_logp.shape)}")
    keep = rho1_keep(logp, frozen_logp, ratio)
    if not bool(keep.any()):
        return logp.sum() * 0.0, {"kept": 0.0, "mean_excess_kept": 0.0}
    excess = (frozen_logp.float().to(logp.device) - logp.detach().float())[keep]
    loss = -logp.float()[keep].mean()
    return loss, {"kept": float(keep.float().mean()), "mean_excess_kept": float(excess.mean())}


def rho1(batch: ObjectiveBatch, cfg: "TrainConfig") -> tuple[Tensor, dict[str, float]]:
    if batch.frozen_logprobs is None:
        raise RuntimeError("loss rho1 needs the frozen base's log-probabilities, which this party cannot compute "
                           "(label-private mode, or a caller that gives no frozen pass)")
    if batch.logits is None:
        logp = batch.logprobs
    else:
        full, mask = target_logprobs(batch.logits, batch.labels)
        logp = full[mask]
    return rho1_from_logprobs(logp, batch.frozen_logprobs(), cfg.rho1.ratio)


rho1.needs_frozen_model = True  # type: ignore[attr-defined]  # methods.resolve refuses label_privacy
register_objective("rho1", logprobs=True)(rho1)
