"""The client's side of the gRPC split server: a :class:`~lesft.exchange.SplitLink` over the network.

``RemoteSplit.micro_step`` runs the very same ``Client`` methods as the in-process ``LocalSplit``; only
the way the server's reply arrives differs. Calls are retried with exponential backoff while the server
is unreachable (a restarting server), and a reply lost in transit is fetched again (the server keeps
the last reply per client). When the server has moved on without this client (it stalled past the
server's timeout, the server restarted from its last round, or a step failed on the server for a reason
that no client's message explains), :class:`~lesft.exchange.Resync` tells the training loop where to continue.
"""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import torch

from lesft.config import TrainConfig
from lesft.typed import to_dict
from lesft.deploy.wire import (EXCHANGE, EXCHANGE_ONE, HELLO, NetArgs, RemoteError, call_with_retries, channel,
                              metadata, send_message)
from lesft.exchange import Resync
from lesft.messages import Message, Resend, WireFormat
from lesft.roles import Client, SliceLoss
from lesft.transport import Meter

RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def retryable(e: grpc.RpcError) -> bool:
    """Worth another try: the server unreachable or slow, or refusing a call only because this client already
    had too many open (RESOURCE_EXHAUSTED 'calls open': nothing of the call was taken)."""
    return e.code() in RETRY or (e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "calls open" in (e.details() or ""))


class RemoteSplit:
    """One client's link to ``lesft server``; bytes are counted in ``meter`` per direction and kind."""

    def __init__(self, address: str, token: str, cfg: TrainConfig, net: NetArgs, meter: Meter | None = None) -> None:
        self.address, self.cfg, self.net = address, cfg, net
        self.meter = meter or Meter()
        self.metadata = metadata(token)
        self.channel = channel(address, net)
        self._hello = self.channel.unary_unary(HELLO)
        self._exchange = self.channel.stream_stream(EXCHANGE)
        self._exchange_one = self.channel.unary_stream(EXCHANGE_ONE)

    # ------------------------------------------------------------------ calls with retries

    def _retry(self, what: str, fn):
        try:
            return call_with_retries(fn, self.net, retryable)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION and "resync" in (e.details() or ""):
                raise Resync(self.join()) from None
            if code == grpc.StatusCode.INTERNAL and "failed on the server" in (e.details() or ""):
                # the step failed for a reason no client's message explains: the server went on without
                # it, so does this client (the round is recorded as skipped)
                print(f"lesft client: {e.details()}; continuing at the next round", flush=True)
                raise Resync(self.join()) from None
            raise RemoteError(f"split server {self.address} refused {what}: {code.name}: {e.details()}") from None

    def hello(self, leaving: bool = False) -> dict[str, Any]:
        info = json.dumps({"config": to_dict(self.cfg), "leaving": leaving}).encode()
        reply = self._retry("hello", lambda: self._hello(info, metadata=self.metadata, timeout=self.net.timeout_s))
        return json.loads(reply)

    def join(self) -> int:
        """(Re)join; return the first round this client can take part in (the server's, rounded up)."""
        state = self.hello()
        return math.ceil(state["step"] / self.cfg.grad_accum)

    def call(self, msg: Message) -> Message:
        """Send one message, return the server's reply (decoded)."""
        return send_message(msg, WireFormat.of(self.cfg), self.net, self._exchange_one, self._exchange, self.metadata,
                            self.net.timeout_s * 3, lambda fn: self._retry(f"{msg.kind} for step {msg.step}", fn),
                            self.meter)

    # ------------------------------------------------------------------ SplitLink

    def micro_step(self, clients: list[Client], step: int) -> list[SliceLoss]:
        parts = []
        for c in clients:
            reply = self.call(c.forward(step))
            if isinstance(reply, Resend):  # frozen cache: the server no longer holds the batch this client named
                reply = self.call(c.resend(reply))
            if self.cfg.label_privacy:
                g, part = c.head_backward(reply)
                reply = self.call(g)
            else:
                info = reply.loss or {}
                stats = {k: v for k, v in info.items() if k not in ("loss", "n_samples", "n_tokens")}
                part = SliceLoss(torch.tensor(info.get("loss", float("nan"))), int(info.get("n_samples", 0)),
                                 int(info.get("n_tokens", 0)), stats)
            if reply.grad.numel():
                c.backward(reply)
            parts.append(part)
        return parts

    def round_end(self) -> None:
        """The server steps on its own after the round's last micro-step."""

    def close(self, leave: bool = True) -> None:
        """Close the channel; with ``leave`` tell the server not to wait for this client any more."""
        try:
            if leave:
                self.hello(leaving=True)
        except (RemoteError, Resync):
            pass
        self.channel.close()
