"""How messages travel between parties, and the meter that counts every byte by direction and kind.

``Loopback`` is the in-process transport: it encodes each message to bytes and decodes a fresh
copy on the other side, so the receiver never shares a tensor (or a graph) with the sender, exactly
as over a network. A network transport implements the same ``send``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

from lesft.messages import Message, WireFormat, decode, encode, wire_format
from lesft.units import DIRECTIONS


class Meter:
    """Messages, payload bytes and header bytes per (direction, message kind)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: {"messages": 0, "payload_bytes": 0, "header_bytes": 0})
        )

    def add(self, direction: str, kind: str, payload: int, total: int) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
        c = self.counts[direction][kind]
        c["messages"] += 1
        c["payload_bytes"] += payload
        c["header_bytes"] += total - payload

    def totals(self) -> dict[str, int]:
        """Total bytes (payload + headers) per direction; every direction present."""
        return {d: sum(c["payload_bytes"] + c["header_bytes"] for c in self.counts[d].values()) for d in DIRECTIONS}

    def to_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        return {d: {k: dict(v) for k, v in kinds.items()} for d, kinds in self.counts.items()}

    def load(self, data: dict[str, dict[str, dict[str, int]]]) -> None:
        for d, kinds in data.items():
            for k, v in kinds.items():
                self.counts[d][k].update(v)


class Transport(Protocol):
    meter: Meter

    def send(self, msg: Message, direction: str) -> Message:
        """Deliver ``msg``; return what the receiver gets."""
        ...


class Loopback:
    """In-process transport: encode -> count -> decode. ``wire``: the format of activations and gradients
    (a :class:`~lesft.messages.WireFormat`, or one format name for all of them)."""

    def __init__(self, wire: WireFormat | str = "fp32") -> None:
        self.wire = wire_format(wire)
        self.meter = Meter()

    def send(self, msg: Message, direction: str) -> Message:
        data, payload = encode(msg, self.wire)
        self.meter.add(direction, msg.kind, payload, len(data))
        return decode(data)
