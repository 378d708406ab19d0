"""The aggregator as a Flower ServerApp: Flower's FedAvg for sampling and replies, the client adapters combined
by the run's aggregation strategy (``aggregation``: lesft.strategies; FedAvg by default, weighted by |D_i|).

Every Flower round, each ClientApp (``client_app.py``) receives the current client adapter, runs
``aggregate_every`` rounds of split training against ``lesft server`` and replies with its adapter and
``num-examples`` = |D_i|; FedAvg averages the replies it got (weights renormalised over the clients that
reported). The aggregator never sees activations, only adapters and |D_i|, as in the paper.

Run config (``flwr run ... --run-config`` or ``deploy/flower/pyproject.toml``):
  ``config``  the lesft training YAML (model, method, rounds, aggregate_every, LoRA, ...)
  ``out``     where ``aggregated_adapter.safetensors``, ``adapter/`` (peft, client layers) and
              ``aggregation.json`` are written
  ``clients`` how many ClientApps must take part in every round
  ``min-clients``   start a round once this many are online (0, the default: ``clients``); a device that died
                    is then left out instead of waited for
  ``round-timeout`` seconds a round waits for the replies (default 3600); the replies that came are aggregated
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable

import torch  # noqa: F401  (ArrayRecord <-> torch needs torch imported)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import save_file

from lesft import methods
from lesft.config import TrainConfig
from lesft.typed import from_dict, load_yaml
from lesft.lora import export_adapter, lora_state
from lesft.strategies import Strategy, get_strategy

app = ServerApp()


def aggregate_records(strategy: Strategy, contents: list[RecordDict]) -> ArrayRecord:
    """The replies' adapters (``arrays``) and |D_i| (``metrics["num-examples"]``) combined by ``strategy``:
    the same :meth:`Strategy.aggregate` the in-process aggregator calls."""
    uploads = [(dict(c["arrays"].to_torch_state_dict()), int(c["metrics"]["num-examples"])) for c in contents]
    return ArrayRecord(strategy.aggregate(uploads))


class LesftStrategy(FedAvg):
    """Flower's FedAvg for sampling, replies and metrics; the adapters are combined by a lesft strategy."""

    def __init__(self, strategy: Strategy, **kw) -> None:
        super().__init__(weighted_by_key="num-examples", **kw)
        self.lesft_strategy = strategy
        self.started: dict[int, float] = {}  # Flower round -> perf_counter() when its messages were made
        self.round_s: dict[int, float] = {}  # Flower round -> seconds from its messages to its aggregate
        self.wall: dict[int, list[float]] = {}  # Flower round -> [messages made, replies in] (wall clock)

    def configure_train(self, server_round: int, *args, **kw):
        self.started[server_round] = time.perf_counter()
        self.wall[server_round] = [time.time()]
        return super().configure_train(server_round, *args, **kw)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        if server_round in self.started:
            self.round_s[server_round] = time.perf_counter() - self.started[server_round]
            self.wall[server_round].append(time.time())
        return aggregate_records(self.lesft_strategy, contents), self.train_metrics_aggr_fn(contents, "num-examples")


def initial_client_adapter(cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], str]:
    """The clients' common initial adapter (the same seeded init every party draws), and the module
    path of the decoder layers (for exporting the result as a peft adapter)."""
    from lesft.model.load import load_model
    from lesft.train import build_parts

    model, _ = load_model(cfg.model, device="cpu", tokenizer=False)
    _, bottom, _, _, layers_path = build_parts(cfg, model)
    return lora_state(bottom), layers_path


def flower_rounds(cfg: TrainConfig) -> int:
    """Flower rounds = training rounds / aggregate_every (the last one may be shorter)."""
    if not cfg.rounds:
        raise ValueError("a Flower run needs an explicit `rounds` in the lesft config")
    if not cfg.aggregate_every:
        raise ValueError(f"method {cfg.method!r} never aggregates: run `lesft client` without Flower")
    return math.ceil(cfg.rounds / cfg.aggregate_every)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = methods.resolve(from_dict(TrainConfig, load_yaml(str(rc["config"]))))
    clients = int(rc.get("clients", cfg.clients))
    out = Path(str(rc.get("out", "runs/aggregator")))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    least = int(rc.get("min-clients", 0)) or clients
    strategy = LesftStrategy(get_strategy(cfg.aggregation), fraction_train=1.0, fraction_evaluate=0.0,
                             min_train_nodes=least, min_available_nodes=least)
    init, layers_path = initial_client_adapter(cfg)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init),
                            num_rounds=flower_rounds(cfg), train_config=ConfigRecord({}),
                            timeout=float(rc.get("round-timeout", 3600.0)))
    if len(result.arrays) == 0:
        raise RuntimeError("no Flower round succeeded: no aggregated adapter (see the ClientApps' logs)")
    final = result.arrays.to_torch_state_dict()
    save_file({k: v.contiguous() for k, v in final.items()}, str(out / "aggregated_adapter.safetensors"))
    # the clients' part as a peft adapter: `lesft merge OUT/adapter SERVER_OUT/adapter` gives the whole model's
    # (a personalised strategy has no common adapter: each client's run directory holds its own)
    if not strategy.lesft_strategy.personalised:
        export_adapter([({**init, **final}, 0)], layers_path, cfg.lora, out / "adapter", cfg.model)
    (out / "aggregation.json").write_text(json.dumps({
        "flower_rounds": flower_rounds(cfg), "clients": clients, "wall_s": time.perf_counter() - t0,
        "round_s": {str(r): s for r, s in strategy.round_s.items()},
        "round_wall": {str(r): w for r, w in strategy.wall.items()},
        "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
    }, indent=2, default=str))
