"""How one tensor travels on the wire, and back: one implementation of each format.

Floating tensors (activations ``hidden``, gradients ``grad``), chosen by name (``--wire_dtype`` & co.):

- ``fp32`` / ``bf16`` / ``fp16``: a cast; the receiver casts back (bf16 and fp16 halve the bytes).
- ``int8``: symmetric int8 with one scale per block of :data:`BLOCK` consecutive values of the flattened
  tensor (the last block may be short): ``s = absmax / 127``, ``q = round(x / s)`` in [-127, 127],
  ``x' = q * s``, so ``|x - x'| <= s / 2``. Bytes: ``n + 4 * ceil(n / 64)``, 0.266 of fp32.
- ``int4``: the same with ``s = absmax / 7``, ``q`` in [-7, 7], two codes per byte (low nibble first,
  stored as ``q + 8``). Bytes: ``ceil(n / 2) + 4 * ceil(n / 64)``, 0.141 of fp32.

A block of zeros has ``s = 0`` and decodes to zeros. Non-finite values are refused when encoding; scales
that are negative or non-finite are refused when decoding. The buffer is ``[fp32 scales][codes]``.

Integer tensors of a training batch, with ``pack_ints`` (lossless; anything of another form travels as it is):

- ``lengths``: a right-padded attention mask ``[B, T]`` (each row ones, then zeros) as its row lengths, int32 ``[B]``;
- ``arange``: position ids equal to ``0..T-1`` on every row: no bytes at all;
- ``spans``: labels ``[B, T]`` that are -100 but for one run per row, as int32 ``(start, end)`` per row and the
  runs' ids back to back in the narrowest of uint8, uint16 and int32 that holds them.

Each encoder returns the bytes (a uint8 tensor) and the header keys that describe them (``codec`` and its
parameters); :func:`wire_bytes` recomputes the byte count from those keys, so that a receiver can check a
header before it reads a byte of the payload.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["BLOCK", "CASTS", "FLOAT_CODECS", "INT_CODECS", "decode", "encode_float", "encode_int", "wire_bytes"]

BLOCK = 64  # values per int8/int4 scale
CASTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LEVELS = {"int8": 127, "int4": 7}
FLOAT_CODECS = (*CASTS, *_LEVELS)
INT_CODECS = ("lengths", "arange", "spans")
IGNORE_INDEX = -100
_ID_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


def _code_bytes(codec: str, n: int) -> int:
    return n if codec == "int8" else (n + 1) // 2


def wire_bytes(spec: dict[str, Any]) -> int:
    """Payload bytes of a tensor sent with ``spec['codec']`` (``shape`` is the decoded shape). Raises
    ValueError for a codec or parameters that cannot be."""
    codec, shape = spec.get("codec"), spec["shape"]
    if codec in _LEVELS:
        n = _numel(shape)
        return 4 * -(-n // BLOCK) + _code_bytes(codec, n)
    if codec == "lengths":
        if len(shape) != 2:
            raise ValueError(f"tensor {spec['name']!r}: codec 'lengths' needs a [B, T] shape, got {shape}")
        return 4 * shape[0]
    if codec == "arange":
        if len(shape) != 2:
            raise ValueError(f"tensor {spec['name']!r}: codec 'arange' needs a [B, T] shape, got {shape}")
        return 0
    if codec == "spans":
        n, ids = spec.get("n"), spec.get("ids")
        if len(shape) != 2 or type(n) is not int or not 0 <= n <= _numel(shape) or ids not in _ID_DTYPES:
            raise ValueError(f"tensor {spec['name']!r}: codec 'spans' needs a [B, T] shape, 0 <= n <= B*T and ids "
                             f"in {sorted(_ID_DTYPES)}; got shape {shape}, n {n!r}, ids {ids!r}")
        return 8 * shape[0] + n * _ID_DTYPES[ids].itemsize
    raise ValueError(f"tensor {spec['name']!r}: unknown codec {codec!r} (known: {[*_LEVELS, *INT_CODECS]})")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """The flattened fp32 tensor as ``[ceil(n / BLOCK), BLOCK]``, zero-padded."""
    flat = x.detach().reshape(-1).float()
    pad = -flat.numel() % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales fp32 [blocks], codes int8 [blocks * BLOCK]) of ``x`` in ``codec`` ('int8' or 'int4')."""
    levels = _LEVELS[codec]
    blocks = _blocks(x)
    if not torch.isfinite(blocks).all():
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    scale = blocks.abs().amax(dim=1) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(blocks / safe[:, None]).clamp_(-levels, levels).to(torch.int8)
    return scale, codes.view(-1)


def encode_float(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """``x`` as ``codec``'s bytes and header keys: a cast keeps today's header (its dtype, no codec key)."""
    if codec in CASTS:
        t = x.detach().to(CASTS[codec]).contiguous().cpu()
        return _bytes(t), {"dtype": str(t.dtype).removeprefix("torch.")}
    if codec not in _LEVELS:
        raise ValueError(f"unknown wire format {codec!r}; expected one of {list(FLOAT_CODECS)}")
    n = x.numel()
    scale, codes = quantize(x.cpu(), codec)
    codes = codes[:n]
    if codec == "int4":
        u = (codes + 8).to(torch.uint8)
        if n % 2:
            u = torch.cat([u, u.new_zeros(1)])
        codes = u[0::2] | (u[1::2] << 4)
    raw = torch.cat([_bytes(scale), _bytes(codes)])
    return raw, {"dtype": "float32", "codec": codec}


def _dequantize(raw: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    codec, shape = spec["codec"], spec["shape"]
    n = _numel(shape)
    nb = -(-n // BLOCK)
    scale = raw[:4 * nb].clone().view(torch.float32)
    if not (torch.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError(f"tensor {spec['name']!r}: {codec} scales must be finite and >= 0")
    body = raw[4 * nb:]
    if codec == "int8":
        codes = body.clone().view(torch.int8)
    else:
        low, high = (body & 0xF).to(torch.int8), (body >> 4).to(torch.int8)
        codes = torch.stack([low, high], dim=1).view(-1)[:n] - 8
    if codes.numel() and int(codes.abs().max()) > _LEVELS[codec]:
        raise ValueError(f"tensor {spec['name']!r}: {codec} code out of range")
    pad = nb * BLOCK - n
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    x = codes.view(nb, BLOCK).float() * scale[:, None]
    return x.view(-1)[:n].view(shape)


def encode_int(t: torch.Tensor, role: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """A batch's ``attention_mask``, ``position_ids`` or ``labels`` [B, T] in its packed form, or None when
    it does not have that form (the caller then sends it as it is)."""
    t = t.detach().cpu()
    if t.dim() != 2 or t.dtype.is_floating_point:
        return None
    b, n = t.shape
    steps = torch.arange(n).expand(b, n)
    if role == "position_ids":
        return (torch.empty(0, dtype=torch.uint8), {"codec": "arange"}) if torch.equal(t, steps) else None
    if role == "attention_mask":
        lengths = (t != 0).sum(dim=1)
        if not torch.equal(t, (steps < lengths[:, None]).to(t.dtype)):
            return None
        return _bytes(lengths.to(torch.int32)), {"codec": "lengths"}
    if role == "labels":
        keep = t != IGNORE_INDEX
        count = keep.sum(dim=1)
        start = torch.where(count > 0, keep.to(torch.int8).argmax(dim=1), torch.zeros_like(count))
        end = start + count
        if not torch.equal(keep, (steps >= start[:, None]) & (steps < end[:, None])):
            return None
        ids = t[keep]
        if ids.numel() and int(ids.min()) < 0:
            return None
        top = int(ids.max()) if ids.numel() else 0
        kind = "uint8" if top < 1 << 8 else "uint16" if top < 1 << 16 else "int32" if top < 1 << 31 else None
        if kind is None:
            return None
        bounds = torch.stack([start, end], dim=1).to(torch.int32)
        return (torch.cat([_bytes(bounds), _bytes(ids.to(_ID_DTYPES[kind]))]),
                {"codec": "spans", "n": ids.numel(), "ids": kind})
    raise ValueError(f"no packed form for {role!r}")


def decode(raw: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """The tensor described by ``spec`` (a header entry with a ``codec``) from its bytes ``raw`` (uint8, of
    :func:`wire_bytes` length). Raises ValueError, naming the tensor, for contents that cannot be."""
    codec, shape = spec["codec"], spec["shape"]
    if codec in _LEVELS:
        return _dequantize(raw, spec)
    dtype = getattr(torch, spec["dtype"])
    b, n = shape if len(shape) == 2 else (0, 0)
    steps = torch.arange(n).expand(b, n)
    if codec == "arange":
        return steps.to(dtype).contiguous()
    if codec == "lengths":
        lengths = raw.clone().view(torch.int32).long()
        if ((lengths < 0) | (lengths > n)).any():
            raise ValueError(f"tensor {spec['name']!r}: row lengths outside [0, {n}]")
        return (steps < lengths[:, None]).to(dtype)
    bounds = raw[:8 * b].clone().view(torch.int32).view(b, 2).long()
    start, end = bounds[:, 0], bounds[:, 1]
    if ((start < 0) | (end < start) | (end > n)).any() or int((end - start).sum()) != spec["n"]:
        raise ValueError(f"tensor {spec['name']!r}: spans outside [0, {n}] or not summing to n = {spec['n']}")
    ids = raw[8 * b:].clone().view(_ID_DTYPES[spec["ids"]]).to(torch.int64)
    out = torch.full((b, n), IGNORE_INDEX, dtype=torch.int64)
    out[(steps >= start[:, None]) & (steps < end[:, None])] = ids
    return out.to(dtype)
