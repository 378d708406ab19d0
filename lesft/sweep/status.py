"""What a point's run directory says about it: done, pending, interrupted, failed, stale or needing an
evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


from lesft.config import FREE_FIELDS, TrainConfig
from lesft.typed import apply_overrides, flatten, from_dict, load_yaml, normalised, to_dict
from lesft.sweep.spec import BASE_KEYS, BASE_METHOD, BASE_PREFIXES, _flatten, evaluations, expand


# ----------------------------------------------------------------------------------------------
# Points and their status
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    name: str
    overrides: dict[str, Any]
    dir: Path
    config: dict[str, Any] | None  # nested TrainConfig as plain values (None: invalid)
    config_error: str | None
    evals: dict[str, dict[str, Any]]  # run sub-directory (eval, eval-validation) -> EvalConfig fields

    @property
    def method(self) -> str:
        return (self.config or {}).get("method") or self.overrides.get("method", "?")


def _points(spec: dict[str, Any], out: Path) -> list[Point]:
    base = _flatten(spec.get("base") or {}, "base")
    pts = []
    for name, ov in expand(spec):
        d = out / name
        cfg, err = None, None
        try:
            flat = {**base, **ov, "out": str(d)}
            tc = from_dict(TrainConfig, apply_overrides({}, flat))
            if tc.method != BASE_METHOD:
                from lesft.methods import resolve

                resolve(tc)  # a bad switch combination fails here, before any model is loaded
            cfg = to_dict(tc)
        except Exception as e:  # reported as this run's failure, the others go on
            err = f"{type(e).__name__}: {e}"
        pts.append(Point(name, ov, d, cfg, err, evaluations(spec)))
    return pts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config_diff(saved: dict[str, Any], now: dict[str, Any], base_only: bool = False) -> list[str]:
    """Dotted keys whose values differ (ignoring the sweep's own fields; for a base run, only the keys
    that can change an untuned model's evaluation). A key one side lacks (a field added to lesft since)
    counts as its default."""
    defaults = flatten(to_dict(TrainConfig()))
    a, b = {**defaults, **flatten(saved)}, {**defaults, **flatten(now)}
    keys = set(a) | set(b)
    if base_only:
        keys = {k for k in keys if k in BASE_KEYS or k.startswith(BASE_PREFIXES)}
    return sorted(k for k in keys if k not in FREE_FIELDS and a.get(k) != b.get(k))


def _status(p: Point) -> tuple[str, str]:
    """(status, detail) of a point from its files; see the module docstring."""
    d = p.dir
    if not d.is_dir():
        return "pending", ""
    if p.config is not None and (d / "config.input.yaml").is_file():
        try:
            saved = normalised(TrainConfig, load_yaml(d / "config.input.yaml"))
        except Exception as e:  # unreadable: do not guess, do not overwrite
            return "stale", f"config.input.yaml unreadable: {e}"
        diff = _config_diff(saved, p.config, base_only=p.method == BASE_METHOD)
        if diff:
            return "stale", f"made with another config (differs in {diff}); delete {d} or use another --out"
    trained = p.method == BASE_METHOD or (d / "summary.json").is_file()
    meta = (_read_json(d / "sweep_point.json") or {}) if p.evals else {}
    evaluated = all(_evaluated_as(d, sub, spec, meta) for sub, spec in p.evals.items())
    if trained and evaluated:
        return "done", ""
    if (d / "error.json").is_file():
        err = _read_json(d / "error.json") or {}
        return "failed", f"{err.get('stage', '?')}: {err.get('type', '?')}: {err.get('message', '')}"[:300]
    if trained:
        return "needs-eval", ""
    from lesft.checkpoint import find_checkpoint

    ckpt, logged = find_checkpoint(d), _rounds_logged(d)
    if ckpt is not None:  # interrupted, or running now: the dry run cannot tell
        done = (_read_json(ckpt / "state.json") or {}).get("rounds_done", "?")
        return "interrupted", f"checkpoint after round {done}, {logged} rounds logged"
    # started but stopped (or still going) before its first checkpoint: it restarts
    return "pending", f"{logged} rounds logged, no checkpoint yet" if logged else ""


def _evaluated_as(d: Path, sub: str, spec: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Whether run ``d``'s ``sub/eval.json`` holds an evaluation made with ``spec``: every key the spec sets agrees
    with the settings the evaluation recorded itself (so a later ``lesft eval --run`` with other settings is
    noticed). An eval/eval.json too old to record its settings is judged by the sweep's ``evaluated_with`` marker."""
    path = d / sub / "eval.json"
    ev = _read_json(path) if path.is_file() else None
    if ev is None:
        return False
    done = ev.get("config")
    if not isinstance(done, dict):
        return sub == "eval" and meta.get("evaluated_with") == spec
    return all(done.get(k) == v for k, v in spec.items() if k not in ("out", "progress"))


def _rounds_logged(d: Path) -> int:
    """Rounds in the run's metrics.jsonl (training progress, whether checkpointed or not)."""
    f = d / "metrics.jsonl"
    return sum(1 for line in f.read_text().splitlines() if line.strip()) if f.is_file() else 0


