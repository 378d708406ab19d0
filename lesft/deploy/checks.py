"""What the split server accepts: the config fields a client must agree on, the bounds on what it sends, the check of
one path of an incoming message, and the error a refused call gets."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch

from lesft.messages import PathBatch, bounded

# Config fields that client and server must agree on (a client with others is refused at hello).
AGREE = ("client_layers", "split", "client_trainable", "paths", "loss", "label_privacy", "grad_accum",
         "dtype", "seed", "lora", "lesft")  # the wire formats may differ: each message names its own


class ServiceError(Exception):
    """An error answered to one call; ``code`` is a ``grpc.StatusCode``, ``step`` the micro-step if known."""

    def __init__(self, code: grpc.StatusCode, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.code, self.step = code, step


@dataclass
class Limits:
    max_batch: int = 64      # rows per client message
    max_seq: int = 8192      # tokens per row; position ids must lie in [0, max_seq)
    max_abs: float = 1e6     # largest |value| of activations and gradients, in and out, and of the adapter


def check_path(pb: PathBatch | None, name: str, hidden: int, vocab: int, limits: Limits,
                labels: bool | None) -> None:
    """Raise ValueError naming what is wrong with one path of an incoming message."""
    if pb is None:
        raise ValueError(f"{name}: missing")
    h = pb.hidden
    if h.dim() != 3 or h.shape[2] != hidden:
        raise ValueError(f"{name}.hidden: shape {list(h.shape)}, expected [B, T, {hidden}]")
    b, t = h.shape[:2]
    if not 1 <= b <= limits.max_batch or not 1 <= t <= limits.max_seq:
        raise ValueError(f"{name}.hidden: batch {b} x sequence {t} outside the limits "
                         f"[1, {limits.max_batch}] x [1, {limits.max_seq}]")
    if not h.is_floating_point():
        raise ValueError(f"{name}.hidden: dtype {h.dtype}, expected a float")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}.hidden: contains NaN or infinite values")
    if not bounded(h, limits.max_abs):
        raise ValueError(f"{name}.hidden: values beyond the magnitude limit {limits.max_abs:g}")
    for key in ("attention_mask", "position_ids") + (("labels",) if labels else ()):
        v = getattr(pb, key)
        if v is None or tuple(v.shape) != (b, t) or v.dtype != torch.int64:
            raise ValueError(f"{name}.{key}: expected int64 [{b}, {t}], got "
                             f"{None if v is None else f'{v.dtype} {list(v.shape)}'}")
    m, pos = pb.attention_mask, pb.position_ids
    if ((m != 0) & (m != 1)).any() or not (m == 1).any(dim=1).all():
        raise ValueError(f"{name}.attention_mask: values must be 0 or 1, with at least one 1 per row")
    if ((pos < 0) | (pos >= limits.max_seq)).any():
        raise ValueError(f"{name}.position_ids: outside [0, {limits.max_seq})")
    if labels is False and pb.labels is not None:
        raise ValueError(f"{name}.labels: the server is label-private and refuses target ids")
    if labels and ((pb.labels != -100) & ((pb.labels < 0) | (pb.labels >= vocab))).any():
        raise ValueError(f"{name}.labels: ids outside [0, {vocab}) other than -100")
