"""One micro-step of split training between clients and the split server, over some link.

The training loop (``train.Run.round``) calls ``link.micro_step(clients, step)`` and never knows where
the server is:

- :class:`LocalSplit` -- the server in this process, every message through a :class:`Transport`
  (``Loopback`` encodes, counts and decodes each one, exactly as a network would).
- ``lesft.deploy.remote.RemoteSplit`` -- the server behind gRPC; the same ``Client`` methods run here.

Standard split: ``Activations`` up, ``ActivationGrad`` down. Label-private (U-shaped) split:
``Activations`` without labels up, last-layer ``Activations`` down, ``ActivationGrad`` for them up,
``ActivationGrad`` at the cut down.
"""

from __future__ import annotations

from typing import Protocol

from lesft.messages import Activations, CachedActivations, Resend
from lesft.roles import Client, SliceLoss, SplitServer
from lesft.transport import Transport


class Resync(Exception):
    """The split server has moved on without this client: continue from round ``round``."""

    def __init__(self, round: int) -> None:
        super().__init__(f"resync at round {round}")
        self.round = round


class SplitLink(Protocol):
    def micro_step(self, clients: list[Client], step: int) -> list[SliceLoss]:
        """Forward and backward of one micro-batch per client; the clients' loss slices, in client order."""
        ...

    def round_end(self) -> None:
        """After the last micro-step of a round (the server steps its optimizer)."""
        ...


class LocalSplit:
    """The split server in this process; every message crosses ``transport``."""

    def __init__(self, server: SplitServer, transport: Transport, label_private: bool = False) -> None:
        self.server, self.transport, self.label_private = server, transport, label_private

    def micro_step(self, clients: list[Client], step: int) -> list[SliceLoss]:
        """Algorithm 1's exchange, for groups of clients whose rows fill one server chunk at a time (all clients
        at once when they fit): the same update, but only one group's graphs exist at a time in this process."""
        rows = [c.draw() for c in clients]
        parts = []
        for group in self._groups(clients):
            parts += self._exchange(group, step, sum(rows) if len(group) < len(clients) else None)
        return parts

    def _exchange(self, clients: list[Client], step: int, batch_rows: int | None) -> list[SliceLoss]:
        send, server = self.transport.send, self.server
        by_id = {c.cid: c for c in clients}
        msgs = [self._arrive(c, step) for c in clients]
        if not self.label_private:
            grads, parts = server.forward_backward(msgs, server.cfg.client_trainable, batch_rows)
        else:
            parts, top_grads = [], []
            for top in server.forward_middle(msgs, batch_rows):
                g, part = by_id[top.client].head_backward(send(top, "server_to_client"))
                top_grads.append(send(g, "client_to_server"))
                parts.append(part)
            grads = server.backward_middle(top_grads)
        for g in grads:
            by_id[g.client].backward(send(g, "server_to_client"))
        return parts

    def _groups(self, clients: list[Client]) -> list[list[Client]]:
        """Consecutive clients whose micro-batches together hold at most ``server_chunk_rows`` rows (one client
        a group at least; 0: all of them)."""
        size, per = self.server.cfg.server_chunk_rows, self.server.cfg.batch_size
        k = max(1, size // per) if size else len(clients)
        return [clients[i:i + k] for i in range(0, len(clients), k)]

    def round_end(self) -> None:
        self.server.step()

    def _arrive(self, client: Client, step: int) -> Activations:
        """Client ``client``'s activations for ``step`` as the server holds them: sent now, or (frozen cache)
        named by reference and found in the server's cache, or asked for again when it is not there."""
        send, cache = self.transport.send, self.server.cache
        msg = send(client.forward(step), "client_to_server")
        if isinstance(msg, CachedActivations):
            hit = cache.get(msg) if cache is not None else None
            if hit is not None:
                return hit
            msg = send(client.resend(send(Resend(msg.client, step), "server_to_client")), "client_to_server")
        if cache is not None and msg.rows is not None:
            cache.put(msg)
        return msg
