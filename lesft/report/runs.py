"""Reading a sweep directory: every run's files, checked (what is malformed or missing becomes a Problem)."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from lesft.typed import declared_defaults, flatten
from lesft.stats import wilson_ci
from lesft.units import DIRECTIONS

RUN_FILES = ("summary.json", "config.yaml", "config.input.yaml", "eval", "error.json", "sweep_point.json",
             "metrics.jsonl")
SUMMARY_REQUIRED = {"method": str, "rounds": int, "comm_bytes": dict, "peak_memory_mb": dict, "latency_s": dict}
MEMORY_SIDES = ("client", "server", "simulation")  # summary.json peak_memory_mb keys; simulation = the process RSS

try:
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    dir: Path
    overrides: dict[str, Any] | None
    sweep_status: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # flat, dotted keys
    summary: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    eval_dir: str = "eval"  # the sub-directory its evaluation is read from (``lesft report --eval``)
    # filled by the analysis
    method: str = "?"
    row: str = "?"

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    def value(self, key: str, resolved: bool = False) -> Any:
        """The run's value of ``key``: its override, else (a base run: None = any) its config's."""
        if self.overrides is not None and key in self.overrides:
            return self.overrides[key]
        if self.is_base and not resolved:
            return None
        v = self.config.get(key)
        if v is None and self.summary and key in (self.summary.get("switches") or {}):
            v = self.summary["switches"][key]
        return v

    @property
    def accuracy(self) -> tuple[float, float, float, int] | None:
        """(accuracy, low, high of the Wilson 95% interval, n) or None."""
        e = self.eval
        if not e:
            return None
        return e["accuracy"], e["ci95"][0], e["ci95"][1], e["n"]


    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """The lines of ``EVAL_DIR/predictions.jsonl`` (empty without one), read once per report."""
        p = self.dir / self.eval_dir / "predictions.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    @cached_property
    def predictions(self) -> dict[str, tuple[bool, list[str]]]:
        """``{question id: (correct, problem keys)}`` (the paired comparison and the contamination check)."""
        return {str(rec["id"]): (bool(rec["correct"]), list(rec.get("keys") or [])) for rec in self.records}

    @property
    def seed_key(self) -> tuple[Any, Any]:
        """(seed, data_seed): runs of two methods with the same key trained on the same rows."""
        return self.config.get("seed"), self.config.get("data_seed", self.config.get("seed"))


@functools.cache
def config_defaults() -> dict[str, Any]:
    """Every ``TrainConfig`` field's declared default, flat (dotted keys); not the fields whose default is None
    (unset: derived from other fields, as ``data_seed`` from ``seed``)."""
    from lesft.config import TrainConfig

    return {k: v for k, v in flatten(declared_defaults(TrainConfig)).items() if v is not None}


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_summary(s: Any) -> str | None:
    if not isinstance(s, dict):
        return "not a JSON object"
    missing = [k for k in SUMMARY_REQUIRED if k not in s]
    if missing:
        return f"missing key(s) {missing}"
    bad = [k for k, tp in SUMMARY_REQUIRED.items() if not isinstance(s[k], tp) or isinstance(s[k], bool)]
    if bad:
        return f"wrong type for {bad}"
    cb = s["comm_bytes"]
    if not all(_num(cb.get(d, 0)) for d in DIRECTIONS):
        return "comm_bytes values are not numbers"
    for grp in ("peak_memory_mb", "latency_s"):
        if not all(v is None or _num(v) for v in s[grp].values()):
            return f"{grp} values are not numbers"
    return None


def _check_eval(e: Any) -> tuple[dict[str, Any] | None, str | None]:
    if not isinstance(e, dict):
        return None, "not a JSON object"
    n, acc = e.get("n"), e.get("accuracy")
    if not (isinstance(n, int) and n > 0 and _num(acc) and 0 <= acc <= 1):
        return None, f"needs n > 0 and accuracy in [0, 1], got n={n!r}, accuracy={acc!r}"
    ci = e.get("ci95")
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(x) for x in ci) and ci[0] <= ci[1]):
        correct = e.get("correct")
        ci = wilson_ci(correct if isinstance(correct, int) else round(acc * n), n)
    return dict(e, ci95=list(ci)), None


def _read_run(run: Run, problems: list[str], want_eval: bool) -> None:
    d = run.dir
    meta = None
    if (d / "sweep_point.json").is_file():
        try:
            meta = _load_json(d / "sweep_point.json")
        except ValueError:
            meta = None
    if run.overrides is None and isinstance(meta, dict) and isinstance(meta.get("overrides"), dict):
        run.overrides = meta["overrides"]
    for name in ("config.yaml", "config.input.yaml"):  # the resolved one (switches filled) first
        p = d / name
        if p.is_file():
            try:
                cfg = yaml.load(p.read_text(), Loader=_Loader)
                if isinstance(cfg, dict):
                    # a field missing from an older run's config had its default's behaviour (a new field's
                    # default is what the code did before it): without it, such a run would look like "any
                    # value" and be pooled with runs that set the field
                    run.config = {**config_defaults(), **flatten(cfg)}
                    break
            except yaml.YAMLError as e:
                problems.append(f"`{run.name}`: {name} is not valid YAML ({str(e).splitlines()[0]})")
    if (d / "error.json").is_file():
        try:
            run.error = _load_json(d / "error.json")
        except ValueError:
            run.error = {"type": "?", "message": "error.json unreadable"}
    run.method = str((run.overrides or {}).get("method") or run.config.get("method") or "?")
    if run.sweep_status == "stale":
        problems.append(f"`{run.name}`: stale: made with another config than the spec now has; its numbers "
                        "below are from that older config (delete the directory and sweep again)")
    sp = d / "summary.json"
    if sp.is_file():
        try:
            s = _load_json(sp)
            why = _check_summary(s)
        except (ValueError, UnicodeDecodeError) as e:
            s, why = None, f"not valid JSON ({e})"
        if why:
            problems.append(f"`{run.name}`: malformed summary.json: {why}")
        else:
            run.summary = s
            if run.method == "?":
                run.method = s["method"]
    elif run.method != "base":
        problems.append(f"`{run.name}`: summary.json missing" + _why_missing(run))
    mp = d / "metrics.jsonl"
    if run.summary is not None and mp.is_file():
        bad = 0
        for line in mp.read_text().splitlines():
            if not line.strip():
                continue
            try:
                m = json.loads(line)
                if isinstance(m, dict) and _num(m.get("loss")) and isinstance(m.get("round"), int):
                    run.metrics.append(m)
                else:
                    bad += 1
            except ValueError:
                bad += 1
        if bad:
            problems.append(f"`{run.name}`: {bad} malformed line(s) in metrics.jsonl (skipped)")
    ep = d / run.eval_dir / "eval.json"
    if ep.is_file():
        try:
            e, why = _check_eval(_load_json(ep))
        except ValueError as ex:
            e, why = None, f"not valid JSON ({ex})"
        if why:
            problems.append(f"`{run.name}`: malformed {run.eval_dir}/eval.json: {why}")
        run.eval = e
    elif want_eval and (run.summary is not None or run.method == "base"):
        problems.append(f"`{run.name}`: {run.eval_dir}/eval.json missing" + _why_missing(run))


def _why_missing(run: Run) -> str:
    if run.error:
        e = run.error
        msg = str(e.get("message", "")).strip().splitlines()
        return f" (failed in {e.get('stage', '?')}: {e.get('type', '?')}: {msg[0][:200] if msg else ''})"
    if not run.dir.is_dir():
        return " (no run directory)"
    if run.sweep_status and run.sweep_status != "done":
        return f" (status: {run.sweep_status})"
    return ""


def _collect(root: Path, problems: list[str], eval_dir: str = "eval") -> tuple[dict[str, Any] | None, list[Run]]:
    sweep = None
    sp = root / "sweep.json"
    if sp.is_file():
        try:
            sweep = _load_json(sp)
            if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list):
                raise ValueError("no 'runs' list")
        except ValueError as e:
            problems.append(f"sweep.json unreadable ({e}); reading the run directories instead")
            sweep = None
    runs: list[Run] = []
    if sweep is not None:
        for r in sweep["runs"]:
            if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                problems.append(f"sweep.json: a run entry without a name: {str(r)[:100]}")
                continue
            ov = r.get("overrides") if isinstance(r.get("overrides"), dict) else None
            runs.append(Run(r["name"], root / r["name"], ov, r.get("status"), eval_dir=eval_dir))
    else:
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("figures")):
            if any((d / f).exists() for f in RUN_FILES):
                runs.append(Run(d.name, d, None, eval_dir=eval_dir))
    extra = eval_dir != "eval"  # a report of one extra evaluation: only the runs that have it
    want_eval = not extra and bool(sweep and isinstance(sweep.get("spec"), dict)
                                   and sweep["spec"].get("eval") is not None)
    kept, left = [], []
    for run in runs:
        mine: list[str] = []
        try:
            _read_run(run, mine, want_eval)
        except Exception as e:  # never crash on one run's files
            mine.append(f"`{run.name}`: unreadable ({type(e).__name__}: {e})")
        if extra and run.eval is None:
            left.append(run.name)
        else:
            kept.append(run)
            problems += mine
    if left:
        problems.append(f"{len(left)} run(s) without {eval_dir}/eval.json left out: {', '.join(left[:8])}"
                        + (" …" if len(left) > 8 else ""))
    return sweep, kept


