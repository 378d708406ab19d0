"""Aggregation strategies: the one home of each rule for combining client adapters. The in-process
aggregator (:class:`lesft.roles.Aggregator`) and the Flower ServerApp (``lesft.deploy.server_app``) both
call :meth:`Strategy.aggregate`, so a rule is written once.

A strategy says which adapter tensors are **shared** (uploaded, averaged, broadcast) and which are
**trained** (the rest stay at their common initialisation), and how shared tensors are **combined**.
Adapter keys look like ``layers.3.mlp.up_proj.lora_A.weight``.

Built in:

* ``fedavg``: every tensor shared and trained; the |D_i|-weighted mean (McMahan et al., 2017).
* ``ffa``: FFA-LoRA (Sun et al., 2024): A frozen at its shared initialisation, only B trained and
  averaged (the average of B_i A equals the average of the products, so aggregation is exact).
* ``fedsa``: FedSA-LoRA (Guo et al., 2025): A averaged, B kept per client (personalised): each client
  keeps its own B, and the run exports one adapter per client.

Add one from outside the package::

    from lesft.strategies import Strategy, register_strategy

    @register_strategy("median")
    class Median(Strategy):
        def combine(self, states, weights):
            return {k: torch.stack([s[k] for s in states]).median(dim=0).values for k in states[0]}

and train with ``--aggregation median`` (in process and through the Flower ServerApp).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["STRATEGIES", "Strategy", "FedAvg", "FFALoRA", "FedSALoRA", "register_strategy", "get_strategy"]

STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(name: str, replace: bool = False) -> Callable[[type["Strategy"]], type["Strategy"]]:
    """Class decorator: make ``cls`` reachable as ``--aggregation NAME`` (a name another class took is refused
    unless ``replace``)."""
    def add(cls: type[Strategy]) -> type[Strategy]:
        from lesft.plugins import claim

        claim(STRATEGIES, name, cls, cls, "aggregation strategy", replace)
        cls.name = name
        return cls
    return add


def get_strategy(name: str) -> "Strategy":
    if name not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {name!r}; known: {', '.join(STRATEGIES)} "
                         "(add one with lesft.strategies.register_strategy)")
    return STRATEGIES[name]()


class Strategy:
    """FedAvg unless overridden. Subclasses override :meth:`shares`, :meth:`trains` or :meth:`combine`."""

    name = "base"

    def shares(self, key: str) -> bool:
        """Is adapter tensor ``key`` uploaded, combined and broadcast?"""
        return True

    def trains(self, key: str) -> bool:
        """Is adapter tensor ``key`` trained (else frozen at the common initialisation)?"""
        return True

    @property
    def personalised(self) -> bool:
        """Do trained tensors stay on each client (then every client exports its own adapter)?"""
        probe = ("x.lora_A.weight", "x.lora_B.weight")
        return any(self.trains(k) and not self.shares(k) for k in probe)

    def combine(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        """The weighted mean (``weights`` sum to 1), accumulated in float64, returned in the input dtype."""
        return {k: sum(s[k].double() * w for s, w in zip(states, weights)).to(states[0][k].dtype)
                for k in states[0]}

    def aggregate(self, uploads: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
        """``uploads``: (adapter tensors, |D_i|) per client -> the shared tensors to broadcast."""
        if not uploads:
            raise ValueError("nothing to aggregate")
        total = sum(n for _, n in uploads)
        if total <= 0:
            raise ValueError("clients reported no samples")
        states = [{k: v for k, v in s.items() if self.shares(k)} for s, _ in uploads]
        return self.combine(states, [n / total for _, n in uploads])


@register_strategy("fedavg")
class FedAvg(Strategy):
    """theta = sum_i |D_i| / |D| * theta_i over every adapter tensor."""


@register_strategy("ffa")
class FFALoRA(Strategy):
    """A frozen at its shared initialisation; only B trained, uploaded and averaged."""

    def shares(self, key: str) -> bool:
        return ".lora_B." in key

    def trains(self, key: str) -> bool:
        return ".lora_A." not in key


@register_strategy("fedsa")
class FedSALoRA(Strategy):
    """A uploaded and averaged; B trained and kept on each client."""

    def shares(self, key: str) -> bool:
        return ".lora_A." in key
