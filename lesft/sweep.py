"""Sweeps: many training runs (and their evaluations) from one YAML spec, resumable and fault-tolerant.

``lesft sweep SPEC.yaml --out DIR [--dry-run] [--jobs N]``.

Spec format
-----------

.. code-block:: yaml

    name: fig3-split-point
    description: free text (optional)
    base: {model: smollm2-135m, data: synthetic, samples: 64, clients: 4, epochs: 1}
    grid:                        # cartesian product of these values
      method: [sl, lesft]
      client_layers: ["1/2", "1/4"]
      seed: [0, 1]
    runs:                        # optional extra points, each a dict of overrides of `base`
      - {method: base}           # the untuned model (no training, evaluation only)
      - {method: lesft, aggregate_every: 0, seed: [0, 1]}   # a list value expands within this entry
    eval: {split: test, limit: 100, max_new_tokens: 96}   # optional: evaluate every finished run

* ``base``: :class:`lesft.config.TrainConfig` fields, nested (``lora: {r: 8}``) or dotted
  (``lora.r: 8``). ``dataset`` is accepted for ``data``. ``out``, ``resume`` and ``overwrite`` belong
  to the sweep and are refused here.
* ``grid``: ``key: [values]``; keys are TrainConfig fields, dotted for nested ones
  (``lesft.weighting``, ``lora.r``). Every combination is one run.
* ``runs``: extra points, each a dict of overrides of ``base`` (not crossed with the grid). A list
  value expands into one run per element (a small grid inside that entry); for a list-typed field
  (``lora.target_modules``, ``synthetic.operations``) a plain list is the value itself and a list of
  lists expands.
* ``eval``: :class:`lesft.evaluate.EvalConfig` fields (dataset, split, limit, batch_size,
  max_new_tokens, mode, seed, ...). Without ``dataset`` each run is evaluated on its own training
  benchmark (``data``), on the ``split`` given (default ``test``; CommonsenseQA uses
  ``validation``). The evaluation ``seed`` is the same for every run, so every run answers the same
  questions. Runs without an aggregation step (``sl``, ``splitfrozen``) are evaluated with client
  0's adapter (``RUN/adapter``). Leave ``eval`` out to train only.
* ``method: base`` (in the grid or in ``runs``) is the untuned model: nothing is trained, the model
  is evaluated without an adapter (needs ``eval``). Its run name keeps only the keys that can change
  an untuned model's answers (method, model, data, data_dir, rationale, chat_template,
  synthetic.*), so one base run serves every seed / split point / client count of the grid, and the
  report shows it in every column it does not pin.

Run directories
---------------

One directory per point, ``DIR/<name>``, the name made of the point's own keys and values in spec
order, filesystem-safe and stable: ``method=lesft__client_layers=1-4__seed=0`` (``/`` and ``=`` in a
value become ``-``, any other unsafe character ``_``; two points that would get the same name get a
short hash of their values appended, and very long names are shortened the same way). A directory
holds what ``lesft train`` writes (config.yaml, metrics.jsonl, summary.json, adapter/, checkpoint/)
plus ``config.input.yaml`` (the full TrainConfig of the point: ``lesft train --config
RUN/config.input.yaml`` reruns it by hand), ``sweep_point.json`` (name, overrides, eval spec),
``eval/`` (eval.json, predictions.jsonl), ``error.json`` when it failed, ``log.txt`` with ``--jobs``.

Status of a run, checked from its files on every call:

* ``done``: summary.json (and, when ``eval`` is asked, eval/eval.json made with the same eval spec)
  exists: skipped.
* ``pending``: nothing yet, or rounds logged before any checkpoint: trained from the start, then
  evaluated.
* ``interrupted``: a checkpoint but no summary: training continues from the checkpoint
  (``resume=True``), ending exactly as an uninterrupted run would. A run in progress reads the same;
  the detail column says how far it got (the checkpoint's round, the rounds logged).
* ``needs-eval``: trained, evaluation missing or made with another eval spec: evaluated only.
* ``failed``: ``error.json`` (type, message, stage, traceback tail, attempts): retried on the next
  call, from its checkpoint when it has one.
* ``stale``: the directory was made with another configuration (``config.input.yaml`` differs from
  the spec now): refused, never overwritten. Delete the directory (or use another ``--out``) to redo it.

A failed run never stops the sweep. ``DIR/sweep.json`` holds the spec, each run's overrides, status,
what this call did and its wall time, plus the sweep's own overhead (wall time not spent inside runs).

Execution
---------

By default runs go one after another in this process (the cheapest: torch and transformers are
imported once, a finished model is freed before the next is loaded). ``--jobs N`` runs N child
processes at a time (``python -m lesft.sweep --one RUN``, output in ``RUN/log.txt``). Memory caveat:
every child loads its own copy of the model and data, so peak memory is about N times one run's
(on one GPU, N CUDA contexts of ~0.5 GB each plus N models and activations share its memory), each
child pays the torch/transformers import (seconds), and the CPU threads are split between the
children (``OMP_NUM_THREADS`` = cores / N unless set). Measured memory and latency per run
(summary.json) are also perturbed by the neighbours: use ``--jobs 1`` for overhead tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from lesft.config import (FREE_FIELDS, TrainConfig, _base_type, apply_overrides, flatten, from_dict, load_yaml,
                          normalised, to_dict)
from lesft.data.registry import BENCHMARKS
from lesft.plugins import load_plugins
from lesft.provenance import git_commit

__all__ = ["BASE_METHOD", "expand", "load_spec", "run_sweep", "add_arguments", "command"]

BASE_METHOD = "base"
SPEC_KEYS = ("name", "description", "base", "grid", "runs", "eval")
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
    ev = spec.get("eval")
    if ev is not None:
        if not isinstance(ev, dict):
            raise ValueError(f"{where}: 'eval' must be a mapping of EvalConfig fields")
        if "out" in ev:
            raise ValueError(f"{where}: eval.out is set by the sweep (RUN/eval)")
        from lesft.evaluate import EvalConfig  # lazily: only specs that evaluate need it

        known = {f.name for f in fields(EvalConfig)}
        bad = set(ev) - known
        if bad:
            raise ValueError(f"{where}: unknown eval key(s) {sorted(bad)}; known: {sorted(known)}")


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
            if spec.get("eval") is None:
                raise ValueError("method 'base' trains nothing: the spec needs an 'eval' section to evaluate it")
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
    eval: dict[str, Any] | None

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
        pts.append(Point(name, ov, d, cfg, err, spec.get("eval")))
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
    evaluated = True
    if p.eval is not None:
        meta = _read_json(d / "sweep_point.json") or {}
        evaluated = _evaluated_as(d / "eval" / "eval.json", p.eval, meta)
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


def _evaluated_as(path: Path, spec: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Whether ``path`` (a run's eval.json) holds an evaluation made with ``spec``: every key the spec sets agrees
    with the settings the evaluation recorded itself (so a later ``lesft eval --run`` with other settings is
    noticed). An eval.json too old to record its settings is judged by the sweep's ``evaluated_with`` marker."""
    ev = _read_json(path) if path.is_file() else None
    if ev is None:
        return False
    done = ev.get("config")
    if not isinstance(done, dict):
        return meta.get("evaluated_with") == spec
    return all(done.get(k) == v for k, v in spec.items() if k not in ("out", "progress"))


def _rounds_logged(d: Path) -> int:
    """Rounds in the run's metrics.jsonl (training progress, whether checkpointed or not)."""
    f = d / "metrics.jsonl"
    return sum(1 for line in f.read_text().splitlines() if line.strip()) if f.is_file() else 0


# ----------------------------------------------------------------------------------------------
# Running one point
# ----------------------------------------------------------------------------------------------


def _prepare(p: Point) -> None:
    """Write the point's inputs to its directory (what ``--one`` reads back)."""
    p.dir.mkdir(parents=True, exist_ok=True)
    meta = _read_json(p.dir / "sweep_point.json") or {}
    meta.update(name=p.name, overrides=p.overrides, eval=p.eval)
    if p.config_error:
        meta["config_error"] = p.config_error
    else:
        meta.pop("config_error", None)
    _write_json(p.dir / "sweep_point.json", meta)
    if p.config is not None:
        _atomic_write(p.dir / "config.input.yaml", yaml.safe_dump(p.config, sort_keys=False))


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def execute(run_dir: str | Path) -> dict[str, Any]:
    """Train (or continue) and evaluate the point prepared in ``run_dir``; on failure write
    ``run_dir/error.json`` and return ``{"ok": False, ...}``. Never raises (except KeyboardInterrupt)."""
    d = Path(run_dir)
    t0 = time.perf_counter()
    meta = _read_json(d / "sweep_point.json") or {}
    old = _read_json(d / "error.json") or {}
    (d / "error.json").unlink(missing_ok=True)
    stage, action = "config", "run"
    try:
        if meta.get("config_error"):
            raise ValueError(meta["config_error"])
        cfg = from_dict(TrainConfig, load_yaml(d / "config.input.yaml"))
        if cfg.method != BASE_METHOD and not (d / "summary.json").is_file():
            stage = "train"
            from lesft.checkpoint import find_checkpoint
            from lesft.train import train

            ckpt = find_checkpoint(d) is not None
            action = "resume" if ckpt else "run"
            # no checkpoint: whatever a failed attempt left (an empty metrics.jsonl) is replaced
            train(dataclasses.replace(cfg, out=str(d), resume=ckpt, overwrite=not ckpt))
        elif cfg.method != BASE_METHOD:
            action = "eval"
        if meta.get("eval") is not None:
            stage = "eval"
            _evaluate(d, cfg, meta["eval"])
            meta = _read_json(d / "sweep_point.json") or meta
            meta["evaluated_with"] = meta.get("eval")
            _write_json(d / "sweep_point.json", meta)
        return {"ok": True, "action": action, "wall_s": time.perf_counter() - t0}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 -- a failed run is recorded, the sweep goes on
        err = {
            "type": type(e).__name__,
            "message": str(e),
            "stage": stage,
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)[-12:])[-4000:],
            "attempts": int(old.get("attempts", 0)) + 1,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(d / "error.json", err)
        return {"ok": False, "action": action, "wall_s": time.perf_counter() - t0, "error": err}
    finally:
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate(d: Path, cfg: TrainConfig, spec: dict[str, Any]) -> dict[str, Any]:
    from lesft import evaluate as ev  # lazily: only sweeps that evaluate import it

    known = BENCHMARKS
    kw = dict(spec)
    if "dataset" not in kw:
        if cfg.data not in known:
            raise ValueError(f"eval: the run trains on {cfg.data!r}, not a benchmark: set eval.dataset in the spec")
        kw["dataset"] = cfg.data
    kw.setdefault("chat_template", cfg.chat_template)
    kw["out"] = str(d / "eval")
    ecfg = ev.EvalConfig(**kw)
    if cfg.method != BASE_METHOD:
        return ev.run_eval(ecfg, cfg.model, run_dir=str(d))  # adapter: RUN/adapter
    from lesft.data.synthetic import ArithmeticSpec

    if ecfg.dataset == "synthetic" and cfg.data == "synthetic" and cfg.synthetic != ArithmeticSpec() and not ecfg.file:
        # the same questions as the trained runs (run_eval passes a run's difficulty only with a run_dir)
        from lesft.data.benchmarks import load_benchmark

        rows = load_benchmark("synthetic", ecfg.split, ecfg.data_dir, n=ecfg.limit or None, seed=ecfg.seed,
                              spec=cfg.synthetic)
        lm, tok = ev.load_for_eval(cfg.model, None)
        meta = {"model": cfg.model, "adapter": None, "run_dir": str(d)}
        return dict(ev.evaluate_rows(lm, tok, rows, "synthetic", ecfg, meta=meta), **meta)
    return ev.run_eval(ecfg, model=cfg.model, adapter=None)


def _signal_cause(signum: int) -> str:
    """Why a child killed by signal ``signum`` died, in words (SIGKILL is what the out-of-memory killer sends)."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"killed by signal {signum}"
    if signum == getattr(signal, "SIGKILL", None):
        return f"killed by {name}: out of memory, or killed by hand"
    if signum in (signal.SIGINT, signal.SIGTERM):
        return f"stopped by {name} before it could checkpoint; the next sweep retries it"
    return f"killed by {name}"


def _spawn(p: Point, threads: int) -> dict[str, Any]:
    """Run one prepared point in a child process (``--jobs``)."""
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    log = p.dir / "log.txt"
    before = _read_json(p.dir / "error.json")  # the last attempt's (the child reads it to count attempts)
    prior = int((before or {}).get("attempts", 0))
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-m", "lesft.sweep", "--one", str(p.dir)], stdout=fh,
                            stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    err = _read_json(p.dir / "error.json")
    if err is not None and err == before:  # not this attempt's: the child died before it removed it
        err = None
    if rc == 0 and err is None:
        return {"ok": True, "action": "run", "wall_s": wall}
    if rc == 130 and err is None:  # Ctrl-C: the child checkpointed; the next sweep resumes it
        return {"ok": False, "action": "run", "wall_s": wall,
                "error": {"stage": "interrupted", "type": "KeyboardInterrupt", "message": "resumes from its checkpoint"}}
    if err is None:  # killed before it could write one (out of memory, signal)
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        why = f" ({_signal_cause(-rc)})" if rc < 0 else ""
        err = {"type": "ChildProcessError", "message": f"exit code {rc}{why}; see {log}", "stage": "process",
               "traceback": tail, "attempts": prior + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(p.dir / "error.json", err)
    return {"ok": False, "action": "run", "wall_s": wall, "error": err}


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------

_ACTIONS = {"done": "skip", "pending": "run", "interrupted": "resume", "needs-eval": "eval", "failed": "retry",
            "stale": "refuse"}


def _record(p: Point, status: str, detail: str, action: str, wall: float | None = None) -> dict[str, Any]:
    return {"name": p.name, "dir": str(p.dir), "overrides": p.overrides, "method": p.method, "status": status,
            "action": action, "wall_s": wall, "detail": detail}


def _sweep_json(spec: dict[str, Any], spec_path: str, records: list[dict[str, Any]], t0: float,
                env: dict[str, Any]) -> dict[str, Any]:
    grid = spec.get("grid") or {}
    run_keys: list[str] = []
    for i, entry in enumerate(spec.get("runs") or []):
        for k in _flatten(entry, f"runs[{i}]"):
            if k not in run_keys:
                run_keys.append(k)
    wall = time.perf_counter() - t0
    inside = sum(r["wall_s"] or 0.0 for r in records if r["action"] not in ("skip", "refuse"))
    return {
        "name": spec.get("name"),
        "spec_path": str(spec_path),
        "spec": spec,
        "keys": {"grid": [_norm_key(k, "grid") for k in grid], "runs": run_keys},
        "values": {_norm_key(k, "grid"): v for k, v in grid.items()},
        "environment": env,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": {s: sum(r["status"] == s for r in records) for s in sorted({r["status"] for r in records})},
        "sweep_wall_s": wall,
        "runs_wall_s": inside,
        "overhead_s": max(0.0, wall - inside),
        "runs": records,
    }


def run_sweep(spec_path: str, out: str, dry_run: bool = False, jobs: int = 1) -> list[dict]:
    """Run (or, with ``dry_run``, list) every point of the spec under ``out``; return one record per run:
    ``name, dir, overrides, method, status`` (after this call), ``action`` (skip, run, resume, eval,
    retry, refuse; with ``dry_run`` what would be done), ``wall_s``, ``detail`` (error or staleness)."""
    t0 = time.perf_counter()
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    spec = load_spec(spec_path)
    root = Path(out)
    points = _points(spec, root)
    states = [_status(p) for p in points]
    records = [_record(p, s, det, _ACTIONS[s]) for p, (s, det) in zip(points, states)]
    name = spec.get("name") or Path(spec_path).stem
    if dry_run:
        _print_table(name, root, records)
        return records

    root.mkdir(parents=True, exist_ok=True)
    env = {"git_commit": git_commit(), "python": sys.version.split()[0], "argv": sys.argv,
           "platform": sys.platform, "jobs": jobs}
    lock = threading.Lock()

    def save() -> None:
        with lock:
            _write_json(root / "sweep.json", _sweep_json(spec, spec_path, records, t0, env))

    todo = [i for i, (s, _) in enumerate(states) if s in RUNNABLE]
    for r in records:
        if r["status"] == "stale":
            print(f"lesft sweep: refusing {r['name']}: {r['detail']}", file=sys.stderr)
    print(f"sweep {name}: {len(points)} runs in {root}, {len(todo)} to do "
          f"({len(points) - len(todo)} done or refused)", flush=True)
    save()
    counter = itertools.count(1)

    def one(i: int) -> None:
        p = points[i]
        _prepare(p)
        k = next(counter)
        print(f"[{k}/{len(todo)}] {records[i]['action']} {p.name}", flush=True)
        res = execute(p.dir) if jobs == 1 else _spawn(p, max(1, (os.cpu_count() or 1) // jobs))
        status, detail = _status(p)
        with lock:
            records[i].update(status=status, detail=detail, wall_s=res["wall_s"])
        if not res["ok"]:
            e = res["error"]
            print(f"  FAILED {p.name} ({e['stage']}): {e['type']}: {e['message'][:300]}", file=sys.stderr, flush=True)
        else:
            print(f"  {status} {p.name} in {res['wall_s']:.1f} s", flush=True)
        save()

    try:
        if jobs == 1:
            for i in todo:
                one(i)
        else:
            pool = ThreadPoolExecutor(max_workers=jobs)
            try:
                list(pool.map(one, todo))
            finally:  # on Ctrl-C: start no further run, wait for the ones in flight to checkpoint
                pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt as e:  # the run in flight checkpointed its last finished round (lesft.interrupt)
        from lesft.interrupt import Interrupted

        raise Interrupted(f"sweep {name} stopped{' (' + str(e).split(' Resume with')[0] + ')' if str(e) else ''}. "
                          f"Resume with: lesft sweep {spec_path} --out {out}") from None
    finally:
        save()
    done = sum(r["status"] == "done" for r in records)
    bad = [r for r in records if r["status"] != "done"]
    summary = _read_json(root / "sweep.json") or {}
    wall, over = summary.get("sweep_wall_s", 0.0), summary.get("overhead_s", 0.0)
    print(f"sweep {name}: {done}/{len(records)} done, {len(bad)} not done"
          + (f" ({', '.join(sorted({r['status'] for r in bad}))})" if bad else "")
          + (f"; {wall:.1f} s, sweep overhead {over:.2f} s ({100 * over / wall:.1f}%)"
             if summary.get("runs_wall_s") else f"; nothing to run ({wall:.2f} s)")
          + f" -> {root / 'sweep.json'}", flush=True)
    return records


def _print_table(name: str, root: Path, records: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"sweep {name}: {len(records)} runs in {root} ("
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
    w = max([len(r["status"]) for r in records] + [6])
    print(f"  {'status':<{w}}  {'action':<7} run")
    for r in records:
        print(f"  {r['status']:<{w}}  {r['action']:<7} {r['name']}" + (f"  [{r['detail']}]" if r["detail"] else ""))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lesft sweep`` (for :mod:`lesft.cli`)."""
    parser.add_argument("spec", help="sweep spec (YAML): name, base, grid, runs, eval (see configs/README.md)")
    parser.add_argument("--out", required=True, help="sweep directory: one sub-directory per run + sweep.json")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="list the runs and their status (done, pending, interrupted, failed, ...) and exit")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process (default 1: one after another in this "
                             "process). N processes hold N models in memory at once")


def command(args: argparse.Namespace) -> int:
    """``lesft sweep``: 0 when every run is done (or a dry run), 1 when some failed or were refused."""
    records = run_sweep(args.spec, args.out, dry_run=args.dry_run, jobs=args.jobs)
    return 0 if args.dry_run or all(r["status"] == "done" for r in records) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lesft.sweep --one RUN_DIR``: one prepared run, in a child process of ``lesft sweep --jobs N``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["--one"] or len(argv) != 2:
        print("usage: python -m lesft.sweep --one RUN_DIR (a child of `lesft sweep --jobs N`; run sweeps with "
              "`lesft sweep`)", file=sys.stderr)
        return 2
    load_plugins()  # $LESFT_PLUGINS: the parent's --plugin extensions
    try:
        return 0 if execute(argv[1])["ok"] else 1
    except KeyboardInterrupt as e:
        print(f"lesft sweep: interrupted: {e}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
