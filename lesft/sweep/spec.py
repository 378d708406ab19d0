"""A sweep spec: reading and checking it, expanding it into points, and naming their run directories."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any


from lesft.config import TrainConfig
from lesft.typed import _base_type, load_yaml


BASE_METHOD = "base"
SPEC_KEYS = ("name", "description", "base", "grid", "runs", "eval", "validation")
#: Where a run keeps each evaluation: ``eval`` (the spec's ``eval``) and ``eval-validation`` (its ``validation``).
EVAL_DIRS = {"eval": "eval", "validation": "eval-validation"}
#: For ``method: base`` (no training), the only keys that can change the evaluation.
BASE_KEYS = ("method", "model", "data", "data_dir", "rationale", "chat_template")
BASE_PREFIXES = ("synthetic.",)
RUNNABLE = ("pending", "interrupted", "failed", "needs-eval")
MAX_NAME = 150


# ----------------------------------------------------------------------------------------------
# Spec: keys, validation, expansion
# ----------------------------------------------------------------------------------------------


def _aliases(cls: type = TrainConfig) -> dict[str, str]:
    return {a: f.name for f in fields(cls) for a in f.metadata.get("aliases", ())}


def _field_type(key: str, where: str) -> Any:
    """The type hint of dotted TrainConfig field ``key``; ValueError naming ``where`` if unknown."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if not is_dataclass(cls) or part not in hints:
            known = sorted(f.name for f in fields(cls)) if is_dataclass(cls) else []
            raise ValueError(f"{where}: unknown config key {key!r}" + (f"; known here: {known}" if known else ""))
        tp, _ = _base_type(hints[part])
        if i < len(parts) - 1:
            cls = tp
    return tp


def _norm_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: keys must be non-empty strings, got {key!r}")
    head, _, rest = key.partition(".")
    head = _aliases().get(head, head)
    key = f"{head}.{rest}" if rest else head
    if head in ("out", "resume", "overwrite"):
        raise ValueError(f"{where}: {head!r} is set by the sweep (one directory per run under --out)")
    _field_type(key, where)
    return key


def _flatten(d: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """Nested or dotted TrainConfig values as ``{dotted_key: value}`` (keys checked)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = _norm_key(f"{prefix}{k}" if prefix else k, where)
        if isinstance(v, dict) and is_dataclass(_field_type(key, where)):
            out.update(_flatten(v, where, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def _is_listy(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple) or tp in (list, tuple)


def _expand_entry(entry: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """One ``runs`` entry -> its points (list values expand, see the module docstring)."""
    flat = _flatten(entry, where)
    axes: list[tuple[str, list[Any]]] = []
    for key, v in flat.items():
        listy = _is_listy(_field_type(key, where))
        expands = isinstance(v, list) and (not listy or (v and all(isinstance(x, list) for x in v)))
        if expands and not v:
            raise ValueError(f"{where}: {key!r} has an empty list of values")
        axes.append((key, v if expands else [v]))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[vs for _, vs in axes])]


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep spec (YAML); errors name the file and the offending key."""
    spec = load_yaml(path, "sweep spec", f"the keys {', '.join(SPEC_KEYS)}")
    _check(spec, str(path))
    return spec


def _check(spec: dict[str, Any], where: str = "spec") -> None:
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {sorted(unknown)}; known: {list(SPEC_KEYS)}")
    if not isinstance(spec.get("base") or {}, dict):
        raise ValueError(f"{where}: 'base' must be a mapping of TrainConfig fields")
    if not isinstance(spec.get("grid") or {}, dict):
        raise ValueError(f"{where}: 'grid' must be a mapping of key: [values]")
    for k, v in (spec.get("grid") or {}).items():
        if not isinstance(v, list) or not v:
            raise ValueError(f"{where}: grid[{k!r}] must be a non-empty list of values, got {v!r}")
        if any(isinstance(x, dict) for x in v):
            raise ValueError(f"{where}: grid[{k!r}]: use dotted keys for nested fields (e.g. 'lora.r'), not dicts")
    runs = spec.get("runs") or []
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError(f"{where}: 'runs' must be a list of mappings of overrides")
    for key, sub in EVAL_DIRS.items():
        ev = spec.get(key)
        if ev is None:
            continue
        if not isinstance(ev, dict):
            raise ValueError(f"{where}: '{key}' must be a mapping of EvalConfig fields")
        if "out" in ev:
            raise ValueError(f"{where}: {key}.out is set by the sweep (RUN/{sub})")
        from lesft.evaluate import EvalConfig  # lazily: only specs that evaluate need it

        known = {f.name for f in fields(EvalConfig)}
        bad = set(ev) - known
        if bad:
            raise ValueError(f"{where}: unknown {key} key(s) {sorted(bad)}; known: {sorted(known)}")


def evaluations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The evaluations a spec asks of every finished run, by run sub-directory: ``eval`` as written, and
    ``eval-validation``: ``eval``'s settings with ``split: validation``, then ``validation``'s own on top
    (e.g. another ``limit``). Empty: train only."""
    out: dict[str, dict[str, Any]] = {}
    if spec.get("eval") is not None:
        out[EVAL_DIRS["eval"]] = dict(spec["eval"])
    if spec.get("validation") is not None:
        out[EVAL_DIRS["validation"]] = {**(spec.get("eval") or {}), "split": "validation", **spec["validation"]}
    return out


def _slug(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        s = str(v).lower()
    elif isinstance(v, (list, tuple)):
        s = "+".join(_slug(x) for x in v) or "empty"
    elif isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        s = repr(v)
    else:
        s = str(v)
    s = s.replace("/", "-").replace("=", "-").replace(" ", "")
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("._")
    return s or "_"


def _hash(overrides: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _name(overrides: dict[str, Any]) -> str:
    name = "__".join(f"{k}={_slug(v)}" for k, v in overrides.items()) or "default"
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 10].rstrip("_.-") + "~" + _hash(overrides)
    return name


def _base_only(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if k in BASE_KEYS or k.startswith(BASE_PREFIXES)}


def _method_of(base: dict[str, Any], overrides: dict[str, Any]) -> str:
    return overrides.get("method", base.get("method", TrainConfig.__dataclass_fields__["method"].default))


def expand(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The sweep's points as ``(run name, {dotted_key: value})``: the grid's cartesian product, then the
    ``runs`` entries; names unique and filesystem-safe; duplicate points kept once (the first)."""
    _check(spec)
    base = _flatten(spec.get("base") or {}, "base")
    grid = spec.get("grid") or {}
    keys = [_norm_key(k, "grid") for k in grid]
    points: list[dict[str, Any]] = []
    if grid:
        points += [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    for i, entry in enumerate(spec.get("runs") or []):
        points += _expand_entry(entry, f"runs[{i}]")
    if not points:
        points = [{}]
    seen: set[str] = set()
    unique: list[dict[str, Any]] = []
    for ov in points:
        if _method_of(base, ov) == BASE_METHOD:
            ov = _base_only(ov)
            if not evaluations(spec):
                raise ValueError("method 'base' trains nothing: the spec needs an 'eval' section (or a "
                                 "'validation' one) to evaluate it")
        key = json.dumps(ov, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(ov)
    names = [_name(ov) for ov in unique]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    names = [f"{n}~{_hash(ov)}" if counts[n] > 1 else n for n, ov in zip(names, unique)]
    return list(zip(names, unique))


