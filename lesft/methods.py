"""Methods are presets over five orthogonal switches; the trainer only ever reads the switches.

| method      | split | client trains | aggregate every I | paths | loss  |
|-------------|-------|---------------|-------------------|-------|-------|
| centralized | no (one party holds all data)     | yes | never | base | ce    |
| fedavg      | no (each client the full model)   | yes | I     | base | ce    |
| sl          | yes   | yes           | never             | base  | ce    |
| splitlora   | yes   | yes           | I                 | base  | ce    |
| splitfrozen | yes   | no            | never             | base  | ce    |
| lesft       | yes   | yes           | I                 | dual  | lesft |
| dft         | yes   | yes           | I                 | base  | dft   |
| rho1        | yes   | yes           | I                 | base  | rho1  |

``dft`` and ``rho1`` are splitlora with a token-weighting baseline's loss (DFT, Rho-1; docs/loss.md).

Any switch set explicitly in the config wins over the preset, so the paper's ablations are one flag
away: "SL framework" = ``--method lesft --aggregate_every 0``; "FL framework" = ``--method fedavg
--paths dual --loss lesft``; "base input only" = ``--method lesft --paths base --loss ce``.
"""

from __future__ import annotations

from dataclasses import replace

from lesft.config import TrainConfig
from lesft.objectives import get_objective
from lesft.strategies import get_strategy

DEFAULT_AGGREGATE_EVERY = 5

PRESETS: dict[str, dict[str, object]] = {
    "centralized": dict(split=False, client_trainable=True, aggregate_every=0, paths="base", loss="ce"),
    "fedavg": dict(split=False, client_trainable=True, aggregate_every=DEFAULT_AGGREGATE_EVERY, paths="base", loss="ce"),
    "sl": dict(split=True, client_trainable=True, aggregate_every=0, paths="base", loss="ce"),
    "splitlora": dict(split=True, client_trainable=True, aggregate_every=DEFAULT_AGGREGATE_EVERY, paths="base", loss="ce"),
    "splitfrozen": dict(split=True, client_trainable=False, aggregate_every=0, paths="base", loss="ce"),
    "lesft": dict(split=True, client_trainable=True, aggregate_every=DEFAULT_AGGREGATE_EVERY, paths="dual", loss="lesft"),
    "dft": dict(split=True, client_trainable=True, aggregate_every=DEFAULT_AGGREGATE_EVERY, paths="base", loss="dft"),
    "rho1": dict(split=True, client_trainable=True, aggregate_every=DEFAULT_AGGREGATE_EVERY, paths="base", loss="rho1"),
}
SWITCHES = ("split", "client_trainable", "aggregate_every", "paths", "loss")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every switch left at None from the method's preset and check the combination."""
    if cfg.method not in PRESETS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[cfg.method]
    cfg = replace(cfg, **{k: preset[k] for k in SWITCHES if getattr(cfg, k) is None})
    if cfg.method == "centralized":
        cfg = replace(cfg, clients=1)
    if cfg.paths not in ("base", "dual", "reference"):
        raise ValueError(f"paths must be base, dual or reference, got {cfg.paths!r}")
    objective = get_objective(cfg.loss)
    if objective.needs_reference and cfg.paths != "dual":
        raise ValueError(f"loss={cfg.loss} weights tokens by the reference path: it needs paths=dual, got {cfg.paths!r}")
    if not objective.needs_reference and cfg.paths == "dual":
        raise ValueError(f"paths=dual with loss={cfg.loss} would compute the reference path and ignore it; "
                         "use paths=base")
    get_strategy(cfg.aggregation)  # refuses an unknown name before anything loads
    if cfg.aggregate_every < 0:
        raise ValueError(f"aggregate_every must be >= 0, got {cfg.aggregate_every}")
    if not cfg.client_trainable and cfg.aggregate_every:
        raise ValueError("client_trainable=False leaves nothing to aggregate: set aggregate_every=0")
    if cfg.label_privacy and not cfg.split:
        raise ValueError("label_privacy keeps the labels on the client of a split model: it needs split=True "
                         f"(method {cfg.method!r} does not split; its clients never send labels anyway)")
    if cfg.label_privacy and getattr(objective.fn, "needs_frozen_model", False):
        raise ValueError(f"loss={cfg.loss} compares each token's loss with the frozen base model's, which needs the "
                         "layers and the LM head in one party; with label_privacy the server holds the layers and "
                         "the client the head (use label_privacy=False, or another loss)")
    if cfg.frozen_cache_mb and (cfg.client_trainable or not cfg.split or cfg.label_privacy):
        raise ValueError("frozen_cache_mb caches the cut activations of frozen client layers: it needs split=True, "
                         "client_trainable=False and no label_privacy (method splitfrozen)")
    if not cfg.split and not cfg.client_trainable:
        raise ValueError("split=False with client_trainable=False trains nothing")
    return cfg
