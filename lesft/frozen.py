"""The frozen base model's pass: the same modules with every LoRA adapter switched off, no graph, no
dropout. Rho-1's reference model (:mod:`lesft.objectives.rho1`) is this pass.

``adapters_disabled`` sets peft's per-layer switch (``_disable_adapters``, what ``PeftModel.disable_adapter()``
toggles) directly and restores each layer's own value afterwards; unlike ``enable_adapters(True)`` it never
touches ``requires_grad``, so adapter weights that an aggregation strategy keeps frozen (FFA-LoRA's A) stay
frozen.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lesft.loss import chunked_target_logprobs

__all__ = ["adapters_disabled", "frozen_hidden", "frozen_target_logprobs"]


@contextlib.contextmanager
def adapters_disabled(*modules: nn.Module) -> Iterator[None]:
    """Inside: every LoRA layer of ``modules`` computes the frozen base layer only."""
    layers = [m for mod in modules for m in mod.modules() if isinstance(m, BaseTunerLayer)]
    was = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, w in zip(layers, was):
            m._disable_adapters = w


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad(), adapters_disabled(*modules):
            yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)


def frozen_hidden(bottom: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The client layers' output ``[B, T, H]`` for ``ids`` under the frozen base (an unsplit client's part)."""
    with _frozen(bottom):
        return bottom(ids, mask)[0]


def frozen_target_logprobs(top: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                           position_ids: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[M]`` log-probabilities of the target tokens (row-major over ``labels[:, 1:] != -100``) under the
    frozen base: ``top`` (decoder layers, final norm, LM head) with its adapters off, on ``hidden`` (the
    input of ``top``), without a graph; ``chunk`` target positions through the LM head at a time (0: all)."""
    if getattr(top, "head", True) is None or not hasattr(top, "layers"):
        raise RuntimeError("the frozen base's log-probabilities need the model's layers, norm and head in one "
                           "party; with label_privacy the server holds the layers and the client the head")
    with _frozen(top):
        final = top.normed(hidden.detach(), attention_mask, position_ids)
        return chunked_target_logprobs(top.lm_head, final, labels, chunk)
