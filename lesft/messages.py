"""The typed messages that cross a party boundary, and their wire format.

Wire format (the same for the in-process and any network transport; never pickle)::

    [8-byte little-endian header length][UTF-8 JSON header][raw tensor buffers, back to back]

The header names the message kind, its scalar fields, and for every tensor its name, dtype, shape
and byte count. Payload bytes = sum of tensor ``numel * element_size`` at the wire dtype; header
bytes = 8 + the JSON length. A tensor sent through a codec of :mod:`lesft.codecs` (8- or 4-bit
activations and gradients, packed masks, positions and labels) also names its ``codec``: its shape and
dtype are those it decodes to, and its byte count is the codec's (:func:`lesft.codecs.wire_bytes`).
Which format each tensor takes is a :class:`WireFormat`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from lesft import codecs

WIRE_DTYPES = codecs.CASTS
_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


@dataclass
class PathBatch:
    """One input path of a client's micro-batch at the cut layer."""

    hidden: torch.Tensor                        # [B, T, H] cut-layer activations
    attention_mask: torch.Tensor | None = None  # [B, T] 1 = token, 0 = padding (None: server -> client)
    position_ids: torch.Tensor | None = None    # [B, T] rotary positions (None: server -> client)
    labels: torch.Tensor | None = None  # [B, T] target ids, -100 on prompt and padding; None: label-private


@dataclass
class Activations:
    """client -> server: cut-layer activations of the base path and, for ``paths=dual``, the reference path.

    Label-private mode (U-shaped split): the client sends no labels, and the server answers with an
    ``Activations`` of its last layer's hidden states; ``batch_rows`` then carries the number of rows
    with targets in the step's batch over all clients, so that each client can weight its loss."""

    kind: ClassVar[str] = "activations"
    client: int
    step: int
    base: PathBatch
    reference: PathBatch | None = None
    batch_rows: int | None = None
    rows: list[int] | None = field(default=None, metadata={"omit": True})  # frozen cache: the batch's row ids


@dataclass
class CachedActivations:
    """client -> server, frozen client layers with a frozen cache: "the activations of rows ``rows`` that I sent
    before" (a few bytes of header instead of the tensors)."""

    kind: ClassVar[str] = "cached_activations"
    client: int
    step: int
    rows: list[int]


@dataclass
class Resend:
    """server -> client: the server does not hold the batch a :class:`CachedActivations` named; send it again."""

    kind: ClassVar[str] = "resend"
    client: int
    step: int


@dataclass
class ActivationGrad:
    """dL/d(base hidden) [B, T, H]; nothing for the reference path. server -> client at the cut; in
    label-private mode also client -> server, for the hidden states the server returned.

    ``loss`` (JSON scalars, optional): the client's share of the step's loss as the server computed it
    (``loss``, ``n_samples``, ``n_tokens`` and token-class stats)."""

    kind: ClassVar[str] = "activation_grad"
    client: int
    step: int
    grad: torch.Tensor
    loss: dict[str, float] | None = None


@dataclass
class AdapterUpload:
    """client -> aggregator: the client's LoRA tensors and its data size |D_i|."""

    kind: ClassVar[str] = "adapter_upload"
    client: int
    n_samples: int
    tensors: dict[str, torch.Tensor]


@dataclass
class AdapterBroadcast:
    """aggregator -> client: the |D_i|-weighted average of the client adapters."""

    kind: ClassVar[str] = "adapter_broadcast"
    round: int
    tensors: dict[str, torch.Tensor]


@dataclass
class GenStep:
    """client -> server, split generation: the cut-layer hidden states of one step of session ``session``.
    Step 0 (prefill): the whole left-padded prompt [B, T, H] and its ``attention_mask`` [B, T] (bool: True = token,
    so that no integer tensor ever reaches the server); every later
    step: [B, 1, H] for the token just picked, nothing else (the server extends mask and positions itself)."""

    kind: ClassVar[str] = "gen_step"
    session: str
    step: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None


@dataclass
class GenReply:
    """server -> client, split generation: the next token id of every row, ``tokens`` [B] (int64), or in
    label-private mode the last position's last-layer hidden states, ``hidden`` [B, 1, H], and no token."""

    kind: ClassVar[str] = "gen_reply"
    session: str
    step: int
    tokens: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class WireFormat:
    """The format of each floating tensor on the wire (fp32, bf16, fp16, int8 or int4; see :mod:`lesft.codecs`)
    and whether the batch's integer tensors are packed. ``WireFormat()`` is today's plain fp32 wire."""

    hidden: str = "fp32"     # activations: the base path's up, the label-private last layer's down, generation's
    reference: str = ""      # the reference path's activations (forward-only); "" = as ``hidden``
    grad: str = ""           # gradients, both directions; "" = as ``hidden``
    pack_ints: bool = False  # masks as lengths, positions 0..T-1 as nothing, labels as target spans (lossless)

    def __post_init__(self) -> None:
        for name in ("hidden", "reference", "grad"):
            value = getattr(self, name)
            if value not in codecs.FLOAT_CODECS and not (value == "" and name != "hidden"):
                raise ValueError(f"wire format for {name}: {value!r}; expected one of {list(codecs.FLOAT_CODECS)}")

    @classmethod
    def of(cls, cfg: Any) -> "WireFormat":
        """The format a TrainConfig asks for (``wire_dtype``, ``reference_wire``, ``grad_wire``, ``pack_ints``)."""
        return cls(cfg.wire_dtype, cfg.reference_wire, cfg.grad_wire, cfg.pack_ints)

    def codec(self, name: str) -> str:
        """The format of the floating tensor called ``name`` in a message ('reference.hidden', 'grad', ...)."""
        if name.startswith("reference."):
            return self.reference or self.hidden
        if name.rsplit(".", 1)[-1] == "grad":
            return self.grad or self.hidden
        return self.hidden


def wire_format(wire: "WireFormat | str") -> WireFormat:
    """A :class:`WireFormat` from itself or from one format name for every floating tensor."""
    return wire if isinstance(wire, WireFormat) else WireFormat(wire)


Message = (Activations | ActivationGrad | AdapterUpload | AdapterBroadcast | GenStep | GenReply | CachedActivations
           | Resend)
_KINDS = {c.kind: c for c in (Activations, ActivationGrad, AdapterUpload, AdapterBroadcast, GenStep, GenReply,
                              CachedActivations, Resend)}
# Floating tensors of these fields travel at the wire dtype; adapters always travel as they are.
_WIRE_CAST = {"hidden", "grad"}
# Integer tensors of a training batch that ``pack_ints`` packs (see lesft.codecs)
_PACKED = {"attention_mask", "position_ids", "labels"}


def codec_field(codec: str) -> str:
    """The batch field that an integer codec packs."""
    return {"lengths": "attention_mask", "arange": "position_ids", "spans": "labels"}[codec]


def _flatten(msg: Message) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    scalars: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for f in fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, torch.Tensor):
            tensors[f.name] = v
        elif isinstance(v, PathBatch):
            for g in fields(v):
                if getattr(v, g.name) is not None:
                    tensors[f"{f.name}.{g.name}"] = getattr(v, g.name)
        elif f.name == "tensors":
            for k, t in v.items():
                tensors[f"{f.name}.{k}"] = t
        elif v is not None or not f.metadata.get("omit"):  # an unset optional field of a newer option: no bytes
            scalars[f.name] = v
    return scalars, tensors


def encode_parts(msg: Message, wire: WireFormat | str = "fp32") -> tuple[list[bytes | memoryview], int]:
    """The encoded message as pieces, without copying tensor data: ``[length + header, buffer, ...]``
    (their concatenation is :func:`encode`'s bytes), and the payload byte count. The header is padded
    with spaces to a multiple of 8 bytes so that a receiver can view tensors in place. ``wire``: the
    :class:`WireFormat`, or one format name for every activation and gradient."""
    wire = wire_format(wire)
    scalars, tensors = _flatten(msg)
    specs, buffers = [], []
    for name, t in tensors.items():
        field = name.rsplit(".", 1)[-1]
        packed = codecs.encode_int(t, field) if wire.pack_ints and field in _PACKED and "." in name else None
        if field in _WIRE_CAST and t.is_floating_point():
            raw, keys = codecs.encode_float(t, wire.codec(name))
        elif packed is not None:
            raw, keys = packed[0], {"dtype": str(t.dtype).removeprefix("torch."), **packed[1]}
        else:
            t = t.detach().contiguous().cpu()
            raw = t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            keys = {"dtype": str(t.dtype).removeprefix("torch.")}
        spec = {"name": name, "dtype": keys.pop("dtype"), "shape": list(t.shape), "nbytes": raw.numel(), **keys}
        specs.append(spec)
        buffers.append(memoryview(raw.numpy()))
    header = json.dumps({"kind": msg.kind, "fields": scalars, "tensors": specs}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % 8)
    payload = sum(s["nbytes"] for s in specs)
    return [len(header).to_bytes(8, "little") + header, *buffers], payload


def encode(msg: Message, wire: WireFormat | str = "fp32") -> tuple[bytes, int]:
    """Serialise ``msg``; returns (bytes, payload byte count). Activations/gradients take ``wire``'s formats."""
    parts, payload = encode_parts(msg, wire)
    return b"".join(parts), payload


def bounded(t: torch.Tensor, limit: float) -> bool:
    """True when every value of ``t`` is finite and within [-limit, limit] (what a server accepts of a float tensor
    it is sent, and lets out of a step)."""
    return t.numel() == 0 or bool(torch.isfinite(t).all() and t.abs().max() <= limit)


def payload_size(data: bytes | bytearray | memoryview) -> int:
    """Tensor bytes of an encoded message: its length minus the length prefix and the header."""
    return len(data) - 8 - int.from_bytes(bytes(data[:8]), "little")


MAX_HEADER = 1 << 20  # bytes of JSON header a receiver accepts (a real one is a few hundred)
MAX_BRACKETS = 1 << 14  # '[' and '{' in a header: 3 per tensor and a few more in a real one (adapters: ~140 tensors)
_INTS = {"client", "step", "n_samples", "round"}  # scalar fields that must be JSON integers (bool is not one)


def _check_fields(cls: type, fields_: dict[str, Any]) -> None:
    """Refuse header fields of the wrong JSON type, naming the field, the type and the message kind."""
    for name, v in fields_.items():
        ok = (type(v) is int if name in _INTS
              else v is None or type(v) is int if name == "batch_rows"
              else v is None or isinstance(v, list) and all(type(x) is int for x in v) if name == "rows"
              else type(v) is str if name == "session"
              else v is None or isinstance(v, dict) if name == "loss"
              else True)
        if not ok:
            want = {"batch_rows": "an integer or null", "rows": "a list of integers or null", "session": "a string",
                    "loss": "an object or null"}.get(name, "an integer")
            raise ValueError(f"field {name!r} of a {cls.kind!r} message must be {want}, got {type(v).__name__} "
                             f"{json.dumps(v)[:40]}")


def _header(prefix: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """The checked JSON header at the start of an encoded message (None until it is complete). Raises
    ValueError, in words of its own, for a header that is too long, not JSON, or describes tensors that
    cannot be (unknown dtype, a negative dimension, a byte count that is not ``numel * itemsize``)."""
    if len(prefix) < 8:
        return None
    n = int.from_bytes(bytes(prefix[:8]), "little")
    if n > MAX_HEADER:
        raise ValueError(f"header of {n} bytes exceeds the {MAX_HEADER}-byte limit")
    if len(prefix) < 8 + n:
        return None
    raw = bytes(prefix[8:8 + n])
    if raw.count(b"[") + raw.count(b"{") > MAX_BRACKETS:  # before parsing: json recurses once per level
        raise ValueError(f"header has more than {MAX_BRACKETS} brackets (a real one has a few per tensor)")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("header is not valid UTF-8 JSON") from None
    except RecursionError:
        raise ValueError("header is nested too deeply (a real one is 4 levels deep)") from None
    if (not isinstance(header, dict) or not isinstance(header.get("fields"), dict)
            or not isinstance(header.get("tensors"), list)):
        raise ValueError("header must be a JSON object with 'kind', 'fields' and 'tensors'")
    for s in header["tensors"]:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise ValueError("every tensor spec needs a 'name'")
        name, shape, nbytes = s["name"], s.get("shape"), s.get("nbytes")
        if s.get("dtype") not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {s.get('dtype')!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        numel = 1
        for d in shape:
            numel *= d
        if "codec" in s:
            field, codec = name.rsplit(".", 1)[-1], s["codec"]
            if codec in codecs.INT_CODECS and (field != codec_field(codec) or _DTYPES[s["dtype"]].is_floating_point):
                raise ValueError(f"tensor {name!r}: codec {codec!r} carries an integer {codec_field(codec)}")
            if codec not in codecs.INT_CODECS and (field not in _WIRE_CAST or s["dtype"] != "float32"):
                raise ValueError(f"tensor {name!r}: codec {codec!r} carries float32 activations or gradients")
            want = codecs.wire_bytes(s)
            if type(nbytes) is not int or nbytes != want:
                raise ValueError(f"tensor {name!r}: {nbytes!r} bytes do not match codec {s['codec']!r} {shape}")
            continue
        if type(nbytes) is not int or nbytes != numel * _DTYPES[s["dtype"]].itemsize:
            raise ValueError(f"tensor {name!r}: {nbytes!r} bytes do not match {s['dtype']} {shape}")
    return header


def message_size(prefix: bytes | bytearray | memoryview) -> int | None:
    """Total encoded size announced by the first bytes of a message (None until the header is complete)."""
    header = _header(prefix)
    if header is None:
        return None
    return 8 + int.from_bytes(bytes(prefix[:8]), "little") + sum(s["nbytes"] for s in header["tensors"])


def decode(data: bytes | bytearray | memoryview, float_dtype: torch.dtype | None = torch.float32) -> Message:
    """Inverse of :func:`encode`. Wire-cast tensors come back as ``float_dtype`` (None: as sent). From a
    ``bytearray`` (what the network receives) tensors are views into it, not copies."""
    buf = memoryview(data)
    zero_copy = isinstance(data, bytearray)
    header = _header(buf)
    if header is None:
        raise ValueError(f"message truncated in its header ({len(buf)} bytes)")
    cls = _KINDS.get(header.get("kind"))
    if cls is None:
        raise ValueError(f"unknown message kind {header.get('kind')!r}")
    offset = 8 + int.from_bytes(buf[:8], "little")
    tensors: dict[str, torch.Tensor] = {}
    for s in header["tensors"]:
        dtype, nbytes = _DTYPES[s["dtype"]], s["nbytes"]
        if s["name"] in tensors:
            raise ValueError(f"tensor {s['name']!r} appears twice")
        if s["name"].rsplit(".", 1)[-1] in _WIRE_CAST and not dtype.is_floating_point:
            raise ValueError(f"tensor {s['name']!r}: dtype {s['dtype']}, expected a float")
        if offset + nbytes > len(buf):
            raise ValueError(f"message truncated in tensor {s['name']!r}")
        if "codec" in s:
            t = codecs.decode(torch.frombuffer(bytearray(buf[offset:offset + nbytes]), dtype=torch.uint8)
                              if nbytes else torch.empty(0, dtype=torch.uint8), s)
            offset += nbytes
            if float_dtype is not None and s["name"].rsplit(".", 1)[-1] in _WIRE_CAST:
                t = t.to(float_dtype)
            tensors[s["name"]] = t
            continue
        if not nbytes:
            t = torch.empty(0, dtype=torch.uint8)
        elif zero_copy and offset % dtype.itemsize == 0:  # a view into the received buffer: no copy
            t = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=offset)
        else:
            t = torch.frombuffer(bytearray(buf[offset:offset + nbytes]), dtype=torch.uint8)
        offset += nbytes
        t = t.view(dtype).reshape(s["shape"])
        if float_dtype is not None and s["name"].rsplit(".", 1)[-1] in _WIRE_CAST:
            t = t.to(float_dtype)
        tensors[s["name"]] = t
    if offset != len(buf):
        raise ValueError(f"message length mismatch: header describes {offset} bytes, got {len(buf)}")
    kwargs: dict[str, Any] = dict(header["fields"])
    _check_fields(cls, kwargs)
    names = {f.name for f in fields(cls)}
    extra = sorted(k for k in [*kwargs, *tensors] if k.split(".", 1)[0] not in names)
    if extra:
        raise ValueError(f"fields or tensors that a {cls.kind} message does not have: {extra}")
    for f in fields(cls):
        if f.name in kwargs:
            continue
        if f.name in tensors:
            kwargs[f.name] = tensors[f.name]
            continue
        prefix = f"{f.name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if f.name in ("base", "reference"):
            if not set(sub) <= {g.name for g in fields(PathBatch)} or (sub and "hidden" not in sub):
                raise ValueError(f"{f.name}: tensors {sorted(sub)}, expected hidden and optional "
                                 "attention_mask, position_ids, labels")
            kwargs[f.name] = PathBatch(**sub) if sub else None
        elif f.name == "tensors":
            kwargs[f.name] = sub
    try:
        return cls(**kwargs)
    except TypeError:
        raise ValueError(f"a {cls.kind} message needs the fields {sorted(names)}") from None
