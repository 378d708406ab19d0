"""Cut a decoder-only LM into a client part (embedding + first k layers) and a server part
(remaining layers + final norm + LM head).

Works for any model laid out as ``embedding -> decoder layers -> final norm -> LM head`` with
rotary positions (Llama, Qwen2/2.5, Mistral, ...): the structure is read from the modules, not
from the class name. The cut carries, per path, hidden states ``[B, T, H]``, the attention mask
``[B, T]`` and position ids ``[B, T]`` -- never the input token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from transformers import Cache, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only LM with the layout lesft can split."""


@dataclass
class DecoderLayout:
    """Where the pieces of a decoder-only LM live."""

    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    head: nn.Linear
    layers_path: str  # module path of ``layers`` in the full model, e.g. "model.layers"
    layer_types: list[str]


def inspect_decoder(model: nn.Module) -> DecoderLayout:
    """Find embedding, layers, norm, rotary embedding and head; refuse anything else by name."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{cls}: not a decoder-only causal LM (no config or encoder-decoder)")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    missing = []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    rotary = getattr(decoder, "rotary_emb", None)
    if not isinstance(embed, nn.Embedding):
        missing.append("input embedding (nn.Embedding)")
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        missing.append("decoder.layers (nn.ModuleList of >= 2 layers)")
    if norm is None:
        missing.append("decoder.norm (final norm)")
    if rotary is None:
        missing.append("decoder.rotary_emb (rotary position embedding)")
    if not isinstance(head, nn.Linear):
        missing.append("LM head (nn.Linear output embedding)")
    n = getattr(config, "num_hidden_layers", None)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * (n or 0))
    unknown = sorted(set(layer_types) - set(_MASKS))
    if unknown:
        missing.append(f"support for attention layer types {unknown}")
    if missing:
        raise UnsupportedModelError(
            f"{cls} cannot be split by lesft: missing {', '.join(missing)}. Supported: decoder-only LMs "
            "built as embedding -> decoder layers -> final norm -> LM head with rotary positions "
            "(e.g. LlamaForCausalLM, Qwen2ForCausalLM)."
        )
    layers_path = next(name for name, m in model.named_modules() if m is layers)
    return DecoderLayout(embed, layers, norm, rotary, head, layers_path, layer_types)


def resolve_client_layers(spec: str | int, num_layers: int) -> int:
    """Layer count from ``'7'``, ``7`` or a fraction ``'1/4'`` (floor of L * f). Must be in [1, L-1]."""
    s = str(spec).strip()
    try:
        f = Fraction(s)
        k = int(f) if "/" not in s and "." not in s else int(f * num_layers)  # a fraction: floor(L * f)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"client_layers must be a count like '7' or a fraction like '1/4', got {spec!r}") from None
    if not 1 <= k <= num_layers - 1:
        raise ValueError(
            f"client_layers={spec!r} gives k={k} client layers, but k must be in [1, {num_layers - 1}] "
            f"for a model with {num_layers} decoder layers"
        )
    return k


def _run_layers(
    layers: nn.ModuleList,
    first: int,
    layer_types: list[str],
    rotary: nn.Module,
    config,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None = None,
) -> torch.Tensor:
    """Apply ``layers`` (global indices ``first..``) the way the model's own forward does. With ``cache`` (a
    ``DynamicCache(config=...)`` indexed by global layer), keys and values are appended to it and the masks are
    sized against this part's own layers of each kind (the model's forward sizes them against its first)."""
    if len(layers) == 0:
        return hidden
    first_of = {}
    for i in range(first, first + len(layers)):
        first_of.setdefault(layer_types[i], i)
    masks = {kind: _MASKS[kind](config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                                position_ids=position_ids, layer_idx=idx if cache is not None else None)
             for kind, idx in first_of.items()}
    pos_emb = rotary(hidden, position_ids)
    for i, layer in enumerate(layers):
        hidden = layer(
            hidden,
            attention_mask=masks[layer_types[first + i]],
            position_embeddings=pos_emb,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
    return hidden


class ClientPart(nn.Module):
    """Embedding + decoder layers ``[0, k)``: token ids -> cut-layer hidden states."""

    def __init__(self, layout: DecoderLayout, k: int, config):
        super().__init__()
        self.embed_tokens = layout.embed
        self.layers = nn.ModuleList(layout.layers[:k])
        self.rotary_emb = layout.rotary
        self.config = config
        self.layer_types = layout.layer_types
        self.first_layer = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` [B, T], ``attention_mask`` [B, T(+cached)] -> (hidden [B, T, H], position_ids [B, T]).
        Positions default to the unsplit model's 0..T-1 (training batches are right-padded); generation passes
        its own, with a KV ``cache``."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.embed_tokens(input_ids)
        hidden = _run_layers(self.layers, 0, self.layer_types, self.rotary_emb, self.config, hidden,
                             attention_mask, position_ids, cache)
        return hidden, position_ids


def _own_head(layout: DecoderLayout, tied: bool) -> nn.Linear:
    """The LM head; for tied embeddings a frozen copy (the embedding itself stays with the client)."""
    if not tied:
        return layout.head
    head = nn.Linear(layout.head.in_features, layout.head.out_features, bias=False,
                     device=layout.head.weight.device, dtype=layout.head.weight.dtype)
    head.weight = nn.Parameter(layout.head.weight.detach().clone(), requires_grad=False)
    return head


class HeadPart(nn.Module):
    """Final norm + LM head: last-layer hidden states -> logits. Held by the server, or by the client in
    label-private (U-shaped) mode, where it shares a tied embedding's weight at no extra memory."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H] -> (logits [B, T, V], hidden after the norm [B, T, H]); mask/positions unused."""
        hidden = self.norm(hidden)
        return self.lm_head(hidden), hidden

    def normed(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] -> the LM head's input [B, T, H] (after the final norm), without the logits."""
        return self.norm(hidden)


class ServerPart(nn.Module):
    """Decoder layers ``[k, L)`` + final norm + LM head: hidden states -> logits. In label-private mode
    ``head`` is None and only :meth:`middle` is used."""

    def __init__(self, layout: DecoderLayout, k: int, config, tied: bool):
        super().__init__()
        self.layers = nn.ModuleList(layout.layers[k:])
        self.rotary_emb = layout.rotary  # buffers only (inv_freq); each client holds a deep copy
        self.head: HeadPart | None = HeadPart(layout.norm, _own_head(layout, tied))
        self.config = config
        self.layer_types = layout.layer_types
        self.first_layer = k

    def middle(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
               cache: Cache | None = None) -> torch.Tensor:
        """hidden [B, T, H] at the cut -> hidden [B, T, H] after the last decoder layer (before the norm);
        with a KV ``cache`` (generation) the keys and values are appended to it."""
        return _run_layers(self.layers, self.first_layer, self.layer_types, self.rotary_emb, self.config,
                           hidden, attention_mask, position_ids, cache)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H] -> (logits [B, T, V], final hidden after the norm [B, T, H])."""
        if self.head is None:
            raise RuntimeError("this server part has no head (label-private mode): use middle()")
        return self.head(self.middle(hidden, attention_mask, position_ids))

    def normed(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] at the cut -> the LM head's input [B, T, H], without the logits."""
        if self.head is None:
            raise RuntimeError("this server part has no head (label-private mode): use middle()")
        return self.head.norm(self.middle(hidden, attention_mask, position_ids))

    @property
    def lm_head(self) -> nn.Linear:
        return self.head.lm_head


def split_model(model: PreTrainedModel, k: int, label_private: bool = False
                ) -> tuple[ClientPart, ServerPart, DecoderLayout]:
    """Cut ``model`` after ``k`` layers (``k == L`` gives a server part with no layers, for unsplit
    methods). The parts reuse the model's modules; nothing is copied but a tied head. With
    ``label_private`` the server part has no norm and head: take them with :func:`client_head`."""
    layout = inspect_decoder(model)
    n = len(layout.layers)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut after {k} layers: the model has {n}")
    for p in model.parameters():
        p.requires_grad_(False)
    tied = layout.head.weight is layout.embed.weight
    server = ServerPart(layout, k, model.config, tied)
    if label_private:  # built, then dropped: both modes draw the same random numbers, so the same LoRA init
        server.head = None
    return ClientPart(layout, k, model.config), server, layout


def client_head(layout: DecoderLayout) -> HeadPart:
    """The final norm and LM head for the client of a U-shaped split (the model's own modules: a tied
    head shares the client's embedding weight)."""
    return HeadPart(layout.norm, layout.head)
