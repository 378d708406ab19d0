"""``lesft report DIR``: tables and figures of a sweep directory -> ``DIR/report.md`` + ``DIR/figures/*.png``.

Reads ``DIR/sweep.json`` (the grid keys and their order; without it every sub-directory holding a run is
read and the keys whose values differ between runs are used) and, for every run, ``summary.json``,
``metrics.jsonl``, ``eval/eval.json``, ``config.yaml`` / ``config.input.yaml`` and ``error.json``.

Tables:

* **Accuracy**: one row per method (plus, for points given in the spec's ``runs``, the keys they
  set, e.g. ``lesft (aggregate_every=0)``), one column per combination of the other grid keys that
  vary (seed excluded). A cell is ``acc% [lo, hi] (n=N)``: the run's Wilson 95% interval over its N
  questions. With several seeds the cell is the mean accuracy over the seeds and the mean of the seeds'
  bounds (every seed answers the same questions, so pooling them would overstate N) and
  the seeds' standard deviation is shown. The best cell of each column is in bold (ties too; with one
  row, the best cell of the row). A run without an evaluation leaves its cell empty, never 0. A
  ``base`` run (the untuned model) appears in every column whose keys it does not set.
* **Overhead** per method (and column): peak memory per side, total MB per direction over the whole
  run (MB = 2^20 bytes), client / server busy seconds per epoch, where epochs = rounds x batch_size x
  grad_accum / (largest client's samples), i.e. passes over the largest client's data (per round when
  the config is missing), and rows/step: the training rows one optimizer step of the LM head averages
  (split methods: the server's, over every client of the round; so the same epochs are fewer, larger
  steps than ``centralized``'s).
* **LESFT token classes**: the share and mean weight of salient / sub-salient / irrelevant target
  tokens in the last round (metrics.jsonl ``token_classes``), averaged over runs.
* **Answers**: per cell, the shares of correct answers, arithmetic slips, reasoning errors and answers
  without an equation (:mod:`lesft.errors`), with the answers' length and shape.

Figures (when the key varies): with ``--baseline``, a forest plot of each row's paired difference to
it (interval, seeds, p); accuracy vs split point (client_layers), vs samples per client (per_client),
vs number of clients (clients); ablation bars for ``paths`` and ``lesft.weighting`` (each bar holds
only runs that differ in that key: a run that also sets another key is its own bar group);
training-loss curves per method; accuracy vs total bytes communicated.

Malformed or missing files are listed in a "Problems" section (and on stderr); the report is still
written. A "Reproducibility" section lists versions, commit, device, dtype, seeds and wall times as
the runs recorded them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from lesft.config import FREE_FIELDS, flatten
from lesft.data.contamination import TRAIN_KEYS_FILE, overlap, read_train_keys
from lesft.errors import ERROR_KINDS, describe
from lesft.stats import Paired, paired_comparison, seed_spread, wilson_ci
from lesft.units import DIRECTIONS, MB

__all__ = ["write_report", "add_arguments", "command"]

RUN_FILES = ("summary.json", "config.yaml", "config.input.yaml", "eval", "error.json", "sweep_point.json",
             "metrics.jsonl")
FIGURE_KEYS = (("client_layers", "split point (client layers)"), ("per_client", "samples per client"),
               ("clients", "number of clients"))
ABLATION_KEYS = ("paths", "lesft.weighting")
ABLATION_IMPLIES = {"paths": ("loss",)}  # keys an ablation must change with it: the LESFT loss needs paths=dual
SUMMARY_REQUIRED = {"method": str, "rounds": int, "comm_bytes": dict, "peak_memory_mb": dict, "latency_s": dict}
MEMORY_SIDES = ("client", "server", "simulation")  # summary.json peak_memory_mb keys; simulation = the process RSS
ARROWS = {"client_to_server": "client→server", "server_to_client": "server→client",
          "client_to_aggregator": "client→aggregator", "aggregator_to_client": "aggregator→client"}
TOKEN_STATS = ("frac_salient", "frac_subsalient", "frac_irrelevant", "mean_weight_salient",
               "mean_weight_subsalient", "mean_weight_irrelevant", "mean_weight")

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


def _yerr(cells: list["Cell"]) -> list[list[float]]:
    """Asymmetric error bars in percent: from each cell's accuracy down to its interval's low end and up to its high end."""
    return [[100 * max(0.0, c.acc - c.lo) for c in cells], [100 * max(0.0, c.hi - c.acc) for c in cells]]


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
                    run.config = flatten(cfg)
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


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def _sort_key(v: Any) -> tuple:
    if isinstance(v, bool):
        return (1, float(v), "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    s = str(v)
    try:
        return (0, float(Fraction(s)), s)
    except (ValueError, ZeroDivisionError):
        return (2, 0.0, s)


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return str(v)


def _set_keys(r: Run, keys: Sequence[str]) -> list[str]:
    """``key=value`` for each of ``keys`` that the run sets explicitly (its row label's part)."""
    return [f"{k}={_fmt_value(r.overrides[k])}" for k in keys if r.overrides and k in r.overrides]


@dataclass
class Layout:
    col_keys: list[str]
    mod_keys: list[str]
    order: dict[str, list[Any]]  # value order per key
    cols: list[tuple]
    rows: list[str]


def _layout(sweep: dict[str, Any] | None, runs: list[Run]) -> Layout:
    if sweep and isinstance(sweep.get("keys"), dict):
        grid_keys = [k for k in sweep["keys"].get("grid", []) if isinstance(k, str)]
        run_keys = [k for k in sweep["keys"].get("runs", []) if isinstance(k, str) and k not in grid_keys]
        spec_order = {k: list(v) for k, v in (sweep.get("values") or {}).items() if isinstance(v, list)}
    else:  # no sweep.json: every key whose value differs between runs
        keys: list[str] = []
        for r in runs:
            for k in list(r.overrides or {}) + list(r.config):
                if k not in keys and k not in FREE_FIELDS:
                    keys.append(k)
        grid_keys = []
        for k in keys:  # varying, and not a function of the method (the switches a preset sets)
            by_method: dict[Any, set] = {}
            for r in runs:
                if r.value(k) is not None:
                    by_method.setdefault(r.method, set()).add(_hashable(r.value(k)))
            if k == "method" or any(len(v) > 1 for v in by_method.values()):
                grid_keys.append(k)
        run_keys, spec_order = [], {}
    order: dict[str, list[Any]] = {}
    for k in grid_keys + run_keys + list(ABLATION_KEYS):
        seen = [_hashable(v) for v in spec_order.get(k, [])]
        extra = sorted({_hashable(r.value(k, resolved=k in ABLATION_KEYS)) for r in runs} - set(seen) - {None},
                       key=_sort_key)
        order[k] = seen + extra
    varying = [k for k in grid_keys
               if len({_hashable(r.value(k)) for r in runs if r.value(k) is not None}) > 1]
    col_keys = [k for k in varying if k not in ("method", "seed")]
    mod_keys = sorted(k for k in run_keys if k not in ("method", "seed"))
    for r in runs:
        mods = _set_keys(r, mod_keys)
        r.row = r.method + (f" ({', '.join(mods)})" if mods else "")
    cols: list[tuple] = []
    for r in runs:
        c = tuple(_hashable(r.value(k)) for k in col_keys)
        if None not in c and c not in cols:
            cols.append(c)
    cols.sort(key=lambda c: tuple(order[k].index(v) if v in order[k] else len(order[k])
                                  for k, v in zip(col_keys, c)))
    if not cols:
        cols = [()]
    rows: list[str] = []  # first appearance = spec order (grid product, then explicit runs); base first
    for r in runs:
        if r.row not in rows:
            rows.append(r.row)
    rows.sort(key=lambda row: row.split(" (")[0] != "base")
    return Layout(col_keys, mod_keys, order, cols, rows)


def _members(runs: list[Run], lay: Layout, row: str, col: tuple) -> list[Run]:
    return [r for r in runs if r.row == row
            and all(r.value(k) is None or _hashable(r.value(k)) == c for k, c in zip(lay.col_keys, col))]


@dataclass
class Cell:
    acc: float  # mean over seeds
    lo: float  # Wilson 95% bounds (mean over seeds of each seed's bounds)
    hi: float
    ns: list[int]
    sd: float | None
    k: int


def _cell(members: Iterable[Run]) -> Cell | None:
    accs = [r.accuracy for r in members if r.accuracy is not None]
    if not accs:
        return None
    mean, sd = seed_spread([a for a, _, _, _ in accs])
    lo = sum(x[1] for x in accs) / len(accs)
    hi = sum(x[2] for x in accs) / len(accs)
    return Cell(mean, lo, hi, sorted({n for *_, n in accs}), sd, len(accs))


def _fmt_cell(c: Cell | None, bold: bool) -> str:
    if c is None:
        return ""
    n = str(c.ns[0]) if len(c.ns) == 1 else f"{c.ns[0]}–{c.ns[-1]}"
    extra = f", {c.k} seeds, sd {100 * c.sd:.1f}" if c.k > 1 and c.sd is not None else ""
    s = f"{100 * c.acc:.1f} [{100 * c.lo:.1f}, {100 * c.hi:.1f}] (n={n}{extra})"
    return f"**{s}**" if bold else s


def _col_header(lay: Layout, col: tuple) -> str:
    if not col:
        return "accuracy %"
    return " · ".join(_fmt_value(json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v) for v in col)


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in [head] + rows]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return out


def _accuracy_table(runs: list[Run], lay: Layout) -> tuple[list[str], dict[tuple[str, tuple], Cell]]:
    cells = {(row, col): _cell(_members(runs, lay, row, col)) for row in lay.rows for col in lay.cols}
    # best per column (as displayed, ties included) among 2+ cells; with a single row: the best of the row
    best: dict[tuple, float] = {}
    for col in lay.cols:
        vals = [round(100 * c.acc, 1) for (_, cc), c in cells.items() if cc == col and c is not None]
        if len(vals) > 1:
            best[col] = max(vals)
    if len(lay.rows) == 1:
        vals = [round(100 * c.acc, 1) for c in cells.values() if c is not None]
        best = {col: max(vals) for col in lay.cols} if len(vals) > 1 else {}
    body = []
    for row in lay.rows:
        line = [row]
        for col in lay.cols:
            c = cells[(row, col)]
            line.append(_fmt_cell(c, c is not None and round(100 * c.acc, 1) == best.get(col)))
        body.append(line)
    head = ["method"] + [_col_header(lay, c) for c in lay.cols]
    return _md_table(head, body), {k: v for k, v in cells.items() if v is not None}


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _epochs(r: Run) -> float | None:
    s = r.summary or {}
    sizes = s.get("samples_per_client")
    b, a = r.config.get("batch_size"), r.config.get("grad_accum")
    if isinstance(sizes, list) and sizes and all(_num(x) for x in sizes) and max(sizes) > 0 and _num(b) and _num(a):
        return s["rounds"] * b * a / max(sizes)
    return None


def _rows_per_step(r: Run) -> int | None:
    """Training rows behind one optimizer step of the LM head: batch_size × grad_accum, times the clients
    training each round in split methods, where the server steps once per round on all of them."""
    s, b, a = r.summary or {}, r.config.get("batch_size"), r.config.get("grad_accum")
    split, clients = (s.get("switches") or {}).get("split"), s.get("clients")
    if not (_num(b) and _num(a) and isinstance(split, bool) and _num(clients)):
        return None
    per_round = r.config.get("clients_per_round") or clients
    return int(b * a * (per_round if split else 1))


def _overhead_table(runs: list[Run], lay: Layout) -> list[str]:
    body = []
    per_round = False
    for row in lay.rows:
        for col in lay.cols:
            ms = [r for r in _members(runs, lay, row, col) if r.summary is not None]
            if not ms:
                continue
            mem = {side: _mean([r.summary["peak_memory_mb"].get(side) for r in ms]) for side in MEMORY_SIDES}
            comm = {d: _mean([r.summary["comm_bytes"].get(d, 0) / MB for r in ms]) for d in DIRECTIONS}
            lat: dict[str, str] = {}
            for side in ("client", "server"):
                vals, unit = [], ""
                for r in ms:
                    v, ep = r.summary["latency_s"].get(side), _epochs(r)
                    if v is None:
                        continue
                    if ep:
                        vals.append(v / ep)
                    else:
                        vals.append(v / max(1, r.summary["rounds"]))
                        unit, per_round = " /round", True
                m = _mean(vals)
                lat[side] = "–" if m is None else f"{m:.2f}{unit}"
            eps = _mean([_epochs(r) for r in ms])
            rows = sorted({str(n) for n in map(_rows_per_step, ms) if n is not None}) or ["–"]
            line = [row] + ([_col_header(lay, col)] if lay.col_keys else [])
            line += ["–" if mem[s] is None else f"{mem[s]:.1f}" for s in MEMORY_SIDES]
            line += [f"{comm[d]:.2f}" for d in DIRECTIONS] + [f"{sum(comm.values()):.2f}"]
            line += [lat["client"], lat["server"], "–" if eps is None else f"{eps:.2f}",
                     str(round(_mean([r.summary["rounds"] for r in ms]))), "/".join(rows), str(len(ms))]
            body.append(line)
    if not body:
        return []
    head = ["method"] + ([" · ".join(lay.col_keys)] if lay.col_keys else [])
    head += ["client peak MB", "server peak MB", "simulation peak MB"] + [f"{ARROWS[d]} MB" for d in DIRECTIONS]
    head += ["total MB"]
    head += ["client s/epoch", "server s/epoch", "epochs", "rounds", "rows/step", "runs"]
    out = _md_table(head, body)
    if per_round:
        out.append("\nValues marked /round are per round: those runs' configs do not say their epochs.")
    return out


class ReportError(ValueError):
    """A report that cannot be made as asked (the message names the cause and the fix)."""


def _aligned(run: Run, base: Run) -> tuple[list[bool], list[bool]]:
    """Per-question correctness of ``run`` and ``base`` in one question order; refuses different questions."""
    a, b = run.predictions, base.predictions
    if not a or not b:
        missing = run if not a else base
        raise ReportError(f"`{missing.name}` has no eval/predictions.jsonl: evaluate it (lesft sweep ... again) "
                          "before a paired comparison")
    if set(a) != set(b):
        raise ReportError(
            f"paired comparison needs the same questions: `{run.name}` answered {len(a)}, `{base.name}` "
            f"{len(b)}, {len(set(a) & set(b))} in common. Evaluate both with the same eval spec (dataset, "
            "split, limit, seed)")
    ids = sorted(a)
    return [a[q][0] for q in ids], [b[q][0] for q in ids]


@dataclass
class PairedRow:
    """One row (and column) of the paired comparison with the baseline."""
    row: str
    col: tuple
    pc: Paired
    accs: list[float]  # the method's accuracy per seed (fractions)
    per_seed: list[float]  # the difference to the baseline per seed (fractions)


def _paired_rows(runs: list[Run], lay: Layout, baseline: str) -> list[PairedRow]:
    """Each row against ``baseline`` per column, paired by (seed, data_seed) and question."""
    if baseline not in lay.rows:
        raise ReportError(f"--baseline {baseline!r} is not a row of this report; rows: {', '.join(lay.rows)}")
    out: list[PairedRow] = []
    for col in lay.cols:
        bases = {r.seed_key: r for r in _members(runs, lay, baseline, col) if r.eval}
        only = list(bases.values())
        one_base = only[0] if len(only) == 1 and only[0].is_base else None
        for row in lay.rows:
            if row == baseline:
                continue
            ms = [r for r in _members(runs, lay, row, col) if r.eval]
            if len(ms) == 1 and ms[0].is_base:  # one untuned model: paired with every seed of the baseline
                pairs = [(ms[0], b) for b in bases.values()]
            elif one_base is not None:  # the untuned model as the baseline: every seed of the method against it
                pairs = [(r, one_base) for r in ms]
            else:
                pairs = [(r, bases[r.seed_key]) for r in ms if r.seed_key in bases]
            if not pairs:
                continue
            aligned = [_aligned(r, b) for r, b in pairs]
            pc = paired_comparison([x for x, _ in aligned], [y for _, y in aligned])
            out.append(PairedRow(row, col, pc, [sum(x) / len(x) for x, _ in aligned], list(pc.per_seed or [])))
    return out


def _paired_table(rows: list[PairedRow], lay: Layout, baseline: str) -> list[str]:
    body = []
    for p in rows:
        mean, sd = seed_spread(p.accs)
        body.append([
            p.row, _col_header(lay, p.col) if lay.col_keys else "", str(p.pc.seeds), str(p.pc.questions),
            f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else ""),
            f"{100 * p.pc.diff:+.1f} [{100 * p.pc.low:+.1f}, {100 * p.pc.high:+.1f}]",
            ", ".join(f"{100 * d:+.1f}" for d in p.per_seed),
            f"{p.pc.only_method} / {p.pc.only_baseline}", f"{p.pc.p_value:.2g}", f"{p.pc.p_sign_flip:.2g}",
            (f"{100 * t[0]:+.1f} [{100 * t[1]:+.1f}, {100 * t[2]:+.1f}]" if (t := p.pc.seed_t) else "–"),
            f"{t[3]:.2g}" if t else "–",
        ])
    if not body:
        return []
    head = ["method", "column", "seeds", "questions", "accuracy % (mean ± sd over seeds)",
            f"Δ vs {baseline}, points [95% cluster bootstrap over questions]", "Δ per seed",
            "only method / only baseline (question × seed pairs)", "McNemar p (exact, pairs pooled)",
            "sign-flip p (exact, per question)", "Δ over seeds [95% t, df = seeds − 1]", "t-test p (seeds)"]
    return _md_table(head, body)


def _contamination(runs: list[Run], problems: list[str]) -> list[str]:
    """Does any evaluated problem occur among the training rows of any run of the report?"""
    train: dict[str, set[str]] = {}
    for r in runs:
        p = r.dir / TRAIN_KEYS_FILE
        if p.is_file():
            train[r.name] = read_train_keys(p)
    evaluated: dict[str, list[str]] = {}
    without_keys = 0
    for r in runs:
        for qid, (_, keys) in r.predictions.items():
            evaluated.setdefault(qid, keys)
            without_keys += not keys
    if not evaluated:
        return ["No evaluated question."]
    if not train:
        return [f"Not checked: no run has {TRAIN_KEYS_FILE} (runs made before it was written)."]
    every = set().union(*train.values())
    hits = overlap(evaluated.items(), every)
    line = (f"{len(evaluated)} distinct evaluated problems checked against the training rows of {len(train)} "
            f"runs (prompt text, and for synthetic problems their equations): ")
    if without_keys:
        problems.append(f"{without_keys} prediction(s) carry no problem keys (evaluated before they were recorded); "
                        "re-evaluate to check them for contamination")
    if not hits:
        return [line + "**no overlap**."]
    where = sorted(n for n, keys in train.items() if overlap(((q, evaluated[q]) for q in hits), keys))
    problems.append(f"contamination: {len(hits)} evaluated problem(s) occur in the training rows of {len(where)} run(s)")
    return [line + f"**{len(hits)} overlap** (e.g. {', '.join(hits[:5])}), in the training rows of "
            + ", ".join(f"`{n}`" for n in where[:10]) + "."]


CSV_FIELDS = ("name", "row", "method", "seed", "data_seed", "status", "accuracy", "ci_low", "ci_high", "n",
              "correct", "final_loss", "rounds", "wall_s", "eval_wall_s") + tuple(f"mb_{d}" for d in DIRECTIONS)


def _write_csv(runs: list[Run], path: Path) -> None:
    """``runs.csv``: one line per run, the numbers of the tables (empty where a run has none)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for r in runs:
            s, e = r.summary or {}, r.eval or {}
            acc = r.accuracy
            w.writerow([r.name, r.row, r.method, *r.seed_key, r.sweep_status or "",
                         *(acc[:3] if acc else ("", "", "")), e.get("n", ""), e.get("correct", ""),
                         s.get("final_loss", ""), s.get("rounds", ""), s.get("wall_s", ""), e.get("wall_s", ""),
                         *((s.get("comm_bytes") or {}).get(d, 0) / MB if s else "" for d in DIRECTIONS)])


def _token_table(runs: list[Run], lay: Layout) -> list[str]:
    body = []
    for row in lay.rows:
        for col in lay.cols:
            tcs = [r.metrics[-1]["token_classes"] for r in _members(runs, lay, row, col)
                   if r.metrics and isinstance(r.metrics[-1].get("token_classes"), dict)]
            if not tcs:
                continue
            line = [row] + ([_col_header(lay, col)] if lay.col_keys else [])
            for k in TOKEN_STATS:
                m = _mean([t.get(k) for t in tcs if _num(t.get(k))])
                line.append("–" if m is None else (f"{100 * m:.1f}" if k.startswith("frac_") else f"{m:.3f}"))
            line.append(str(len(tcs)))
            body.append(line)
    if not body:
        return []
    head = ["method"] + ([" · ".join(lay.col_keys)] if lay.col_keys else [])
    head += ["salient %", "sub-salient %", "irrelevant %", "mean w salient", "mean w sub-salient",
             "mean w irrelevant", "mean w (all)", "runs"]
    return _md_table(head, body)


def _answers_table(runs: list[Run], lay: Layout) -> list[str]:
    """Per cell, what the answers got wrong (:func:`lesft.errors.error_kind`) and their shape, pooled over the
    cell's runs (generated answers only)."""
    body = []
    for row in lay.rows:
        for col in lay.cols:
            recs = [rec for r in _members(runs, lay, row, col) for rec in r.records if "completion" in rec]
            if not recs:
                continue
            d = [describe(str(rec["completion"]), bool(rec["correct"])) for rec in recs]
            n = len(d)
            line = [row] + ([_col_header(lay, col)] if lay.col_keys else []) + [str(n)]
            line += [f"{100 * sum(x['kind'] == k for x in d) / n:.1f}" for k in ERROR_KINDS]
            line += [f"{sum(x['chars'] for x in d) / n:.0f}", f"{sum(x['equations'] for x in d) / n:.2f}",
                     f"{100 * sum(x['restates'] for x in d) / n:.0f}"]
            body.append(line)
    if not body:
        return []
    head = ["method"] + ([" · ".join(lay.col_keys)] if lay.col_keys else []) + ["answers"]
    head += [f"{k} %" for k in ERROR_KINDS] + ["mean chars", "equations / answer", "restates first %"]
    return _md_table(head, body)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _fig(w: float = 6.4, h: float = 4.2):
    from matplotlib.figure import Figure  # object API, Agg canvas: no pyplot state, no display needed

    fig = Figure(figsize=(w, h), dpi=110)
    return fig


def _colour(lay: Layout, row: str) -> str:
    """One colour per row (method) in every figure."""
    return f"C{lay.rows.index(row) % 10}" if row in lay.rows else "k"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _series(runs: list[Run], lay: Layout, x_key: str) -> dict[str, dict[Any, Cell]]:
    """label -> {x value: Cell}, label = row (+ the other column values)."""
    others = [k for k in lay.col_keys if k != x_key]
    groups: dict[str, dict[Any, list[Run]]] = {}
    for r in runs:
        if r.accuracy is None:
            continue
        x = r.value(x_key)
        xs = lay.order.get(x_key, []) if x is None else [_hashable(x)]  # a base run: every x
        label = r.row + "".join(f" · {_fmt_value(r.value(k))}" for k in others if r.value(k) is not None)
        for xv in xs:
            groups.setdefault(label, {}).setdefault(xv, []).append(r)
    return {lab: {x: c for x, ms in g.items() if (c := _cell(ms)) is not None} for lab, g in groups.items()}


def _fig_accuracy_vs(runs: list[Run], lay: Layout, key: str, label: str, path: Path) -> bool:
    series = _series(runs, lay, key)
    xs_all = [x for x in lay.order.get(key, []) if any(x in s for s in series.values())]
    if len(xs_all) < 2:
        return False
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    pos = {x: (float(x) if numeric else i) for i, x in enumerate(xs_all)}
    fig = _fig()
    ax = fig.add_subplot()
    for lab, pts in series.items():
        xs = [x for x in xs_all if x in pts]
        ax.errorbar([pos[x] for x in xs], [100 * pts[x].acc for x in xs], yerr=_yerr([pts[x] for x in xs]),
                    marker="o", capsize=3, label=lab)
    if not numeric:
        ax.set_xticks(list(pos.values()), [_fmt_value(x) for x in xs_all])
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy % (Wilson 95% interval)")
    ax.set_title(f"Accuracy vs {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _ablation_hue(r: Run, lay: Layout, key: str) -> str:
    """The group whose runs differ in ``key`` alone: the method, the other columns' values, and the other
    keys the run sets explicitly (as in its row label)."""
    skip = (key, *ABLATION_IMPLIES.get(key, ()))
    cols = [_fmt_value(r.value(k)) for k in lay.col_keys if k not in skip and r.value(k) is not None]
    mods = _set_keys(r, [k for k in lay.mod_keys if k not in skip])
    return " · ".join([r.method, *cols, *mods])


def _ablation_groups(runs: list[Run], lay: Layout, key: str) -> dict[Any, dict[str, list[Run]]]:
    """{value of ``key``: {hue: runs}} over the hues within which ``key`` takes two values or more.

    A run that also sets another key (NLFT mode, a reference form, a sample count) is its own hue, so it
    never pools with the runs it does not ablate."""
    by_hue: dict[str, dict[Any, list[Run]]] = {}
    for r in runs:
        v = r.value(key, resolved=True)
        if r.accuracy is not None and v is not None and not r.is_base:
            by_hue.setdefault(_ablation_hue(r, lay, key), {}).setdefault(_hashable(v), []).append(r)
    groups: dict[Any, dict[str, list[Run]]] = {}
    for hue, by_value in by_hue.items():
        if len(by_value) >= 2:
            for v, ms in by_value.items():
                groups.setdefault(v, {})[hue] = ms
    return groups


def _fig_ablation(groups: dict[Any, dict[str, list[Run]]], lay: Layout, key: str, path: Path) -> bool:
    """Bars of :func:`_ablation_groups`' groups: one x per value of ``key``, one bar per hue."""
    if len(groups) < 2:
        return False
    xs = [x for x in lay.order.get(key, sorted(groups, key=_sort_key)) if x in groups]
    hues = sorted({h for g in groups.values() for h in g})
    colours = {h: f"C{i % 10}" for i, h in enumerate(hues)}
    most = max(len(g) for g in groups.values())
    fig = _fig(max(6.4, 0.9 * len(xs) * max(1, most / 2)), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / most
    labelled: set[str] = set()
    for i, x in enumerate(xs):
        present = [h for h in hues if h in groups[x]]
        for j, hue in enumerate(present):  # the bars of one x value, centred on it
            c = _cell(groups[x][hue])
            if c is None:
                continue
            ax.bar(i + width * (j - (len(present) - 1) / 2), 100 * c.acc, width * 0.95, yerr=_yerr([c]),
                   capsize=3, color=colours[hue], label=None if hue in labelled else hue)
            labelled.add(hue)
    ax.set_xticks(range(len(xs)), [_fmt_value(x) for x in xs])
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy % (Wilson 95% interval)")
    ax.set_title(f"Ablation: {key}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _fig_paired(rows: list[PairedRow], lay: Layout, baseline: str, path: Path) -> bool:
    """Forest plot: each row's difference to the baseline, points, with its cluster-bootstrap interval
    (bar), each seed's difference (dots) and the question-level sign-flip p (right)."""
    if not rows:
        return False
    labels = [p.row + (f" · {_col_header(lay, p.col)}" if lay.col_keys else "") for p in rows]
    fig = _fig(7.2, 1.2 + 0.42 * len(rows))
    ax = fig.add_subplot()
    for i, p in enumerate(rows):
        y = len(rows) - 1 - i
        c = _colour(lay, p.row)
        ax.errorbar([100 * p.pc.diff], [y], xerr=[[100 * (p.pc.diff - p.pc.low)], [100 * (p.pc.high - p.pc.diff)]],
                    fmt="D", color=c, capsize=3)
        ax.plot([100 * d for d in p.per_seed], [y] * len(p.per_seed), "o", color=c, alpha=0.45, ms=4)
        ax.annotate(f"p={p.pc.p_sign_flip:.2g}  n={p.pc.seeds}×{p.pc.questions}", (1.01, y),
                    xycoords=("axes fraction", "data"), va="center", fontsize="x-small")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels[::-1], fontsize="small")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"accuracy − {baseline}'s, points\n◆ mean over seeds, 95% cluster bootstrap over questions; "
                  "● seeds;\nright: sign-flip p over questions", fontsize="small")
    ax.set_title(f"Paired difference to {baseline} on the same questions", fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def _fig_loss(runs: list[Run], lay: Layout, path: Path) -> bool:
    with_metrics = [r for r in runs if r.metrics]
    if not with_metrics:
        return False
    cols = [c for c in lay.cols if any(_members(with_metrics, lay, row, c) for row in lay.rows)][:9]
    if not cols:
        return False
    n = len(cols)
    ncol = 1 if n == 1 else (2 if n <= 4 else 3)
    nrow = math.ceil(n / ncol)
    fig = _fig(6.4 if ncol == 1 else 4.6 * ncol, 4.2 if nrow == 1 else 3.4 * nrow)
    drew = False
    for i, col in enumerate(cols):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for row in lay.rows:
            ms = [r for r in _members(with_metrics, lay, row, col)]
            if not ms:
                continue
            by_round: dict[int, list[float]] = {}
            for r in ms:
                for m in r.metrics:
                    by_round.setdefault(m["round"], []).append(m["loss"])
            rounds = sorted(by_round)
            ax.plot(rounds, [sum(by_round[k]) / len(by_round[k]) for k in rounds], marker="." if len(rounds) < 30
                    else None, color=_colour(lay, row), label=row + (f" ({len(ms)} seeds)" if len(ms) > 1 else ""))
            drew = True
        ax.set_xlabel("round")
        ax.set_ylabel("training loss")
        ax.set_title(_col_header(lay, col) if col else "Training loss", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    if not drew:
        return False
    fig.suptitle("Training loss per round (mean over seeds; LESFT loss is a weighted CE, not comparable to CE)",
                 fontsize="small")
    _save(fig, path)
    return True


def _fig_bytes(runs: list[Run], lay: Layout, path: Path) -> bool:
    pts = [r for r in runs if r.accuracy is not None and r.summary is not None]
    if not pts:
        return False
    fig = _fig()
    ax = fig.add_subplot()
    for row in lay.rows:
        rs = [r for r in pts if r.row == row]
        if not rs:
            continue
        total = [max(sum(r.summary["comm_bytes"].get(d, 0) for d in DIRECTIONS) / MB, 1e-6) for r in rs]
        ax.errorbar(total, [100 * r.accuracy[0] for r in rs], yerr=_yerr([_cell([r]) for r in rs]), fmt="o",
                    capsize=3, color=_colour(lay, row), label=row)
    if all(sum(r.summary["comm_bytes"].get(d, 0) for d in DIRECTIONS) > 0 for r in pts):
        ax.set_xscale("log")
    ax.set_xlabel("total MB communicated (all directions, whole run)")
    ax.set_ylabel("accuracy % (Wilson 95% interval)")
    ax.set_title("Accuracy vs communication (one point per run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _figures(runs: list[Run], lay: Layout, fig_dir: Path, problems: list[str], paired: Sequence[PairedRow] = (),
             baseline: str | None = None) -> list[tuple[str, str]]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # figures of a previous report that no longer apply
        old.unlink()
    made: list[tuple[str, str]] = []
    jobs: list[tuple[str, str, Any]] = []
    if paired and baseline:
        from lesft.sweep import _slug  # the run directories' slug

        jobs.append((f"paired_vs_{_slug(baseline)}.png", f"Paired difference to {baseline}",
                     lambda p: _fig_paired(list(paired), lay, baseline, p)))
    for key, label in FIGURE_KEYS:
        if key in lay.col_keys:
            jobs.append((f"accuracy_vs_{key}.png", f"Accuracy vs {label}",
                         lambda p, k=key, lab=label: _fig_accuracy_vs(runs, lay, k, lab, p)))
    for key in ABLATION_KEYS:  # when the key varies within a method (not just with it: that is the table)
        if groups := _ablation_groups(runs, lay, key):
            jobs.append((f"ablation_{key.replace('.', '_')}.png", f"Ablation: {key}",
                         lambda p, k=key, g=groups: _fig_ablation(g, lay, k, p)))
    jobs.append(("loss_curves.png", "Training loss per round", lambda p: _fig_loss(runs, lay, p)))
    jobs.append(("accuracy_vs_bytes.png", "Accuracy vs total bytes communicated", lambda p: _fig_bytes(runs, lay, p)))
    for fname, title, fn in jobs:
        try:
            if fn(fig_dir / fname):
                made.append((fname, title))
        except Exception as e:  # a figure never stops the report
            problems.append(f"figure {fname} failed: {type(e).__name__}: {e}")
    return made


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _repro(sweep: dict[str, Any] | None, runs: list[Run]) -> list[str]:
    lines: list[str] = []
    summaries = [r.summary for r in runs if r.summary is not None]
    versions: dict[str, dict[str, int]] = {}
    for s in summaries:
        for k, v in (s.get("versions") or {}).items() if isinstance(s.get("versions"), dict) else []:
            versions.setdefault(k, {}).setdefault(str(v), 0)
            versions[k][str(v)] += 1
    if versions:
        lines.append("Package versions (from summary.json `versions`; runs per value):\n")
        lines += _md_table(["package", "version"], [
            [k, ", ".join(f"{v} ({n} runs)" if len(vs) > 1 else v for v, n in vs.items())]
            for k, vs in versions.items()])
        lines.append("")
    else:
        lines.append("Package versions: not recorded.\n")

    def recorded(sources: list[Any]) -> str:
        vals: dict[str, int] = {}
        for v in sources:
            if v is not None:
                vals[str(v)] = vals.get(str(v), 0) + 1
        shown = [f"`{v}`" + (f" ({n} runs)" if len(vals) > 1 else "") for v, n in vals.items()]
        return ", ".join(shown) or "not recorded"

    commits = [s.get("git_commit") or (s.get("versions") or {}).get("git_commit") for s in summaries]
    env = (sweep or {}).get("environment") or {}
    items = [
        ("git commit (runs)", recorded(commits)),
        ("git commit (sweep, when it last ran)", f"`{env['git_commit']}`" if env.get("git_commit") else "not recorded"),
        ("device (measured)", recorded([s.get("device") for s in summaries])),
        ("device (configured)", recorded([r.config.get("device") for r in runs if r.config])),
        ("dtype", recorded([r.config.get("dtype") for r in runs if r.config])),
        ("wire dtype", recorded([r.config.get("wire_dtype") for r in runs if r.config])),
        ("seeds", ", ".join(str(s) for s in sorted({r.config.get("seed") for r in runs
                                                    if r.config.get("seed") is not None}, key=_sort_key))
         or "not recorded"),
        ("python", env.get("python") or "not recorded"),
    ]
    train_wall = sum(s.get("wall_s") or 0 for s in summaries if _num(s.get("wall_s")))
    eval_wall = sum(r.eval.get("wall_s") or 0 for r in runs if r.eval and _num(r.eval.get("wall_s")))
    items.append(("training wall time", f"{train_wall:.1f} s over {len(summaries)} runs"
                  + (f" (longest {max(s['wall_s'] for s in summaries if _num(s.get('wall_s'))):.1f} s)"
                     if any(_num(s.get("wall_s")) for s in summaries) else "")))
    items.append(("evaluation time (generation/scoring)", f"{eval_wall:.1f} s over "
                  f"{sum(r.eval is not None for r in runs)} runs"))
    if sweep and _num(sweep.get("sweep_wall_s")):
        w, o = sweep["sweep_wall_s"], sweep.get("overhead_s") or 0.0
        items.append(("last sweep call", f"{w:.1f} s, of which sweep overhead {o:.2f} s "
                                         f"({100 * o / w if w else 0:.1f}%)"))
    resumed = [r.name for r in runs if r.summary and r.summary.get("resumed_from_round") is not None]
    if resumed:
        items.append(("resumed from a checkpoint", ", ".join(f"`{n}`" for n in resumed)))
    lines += [f"- **{k}**: {v}" for k, v in items]
    if sweep and sweep.get("spec") is not None:
        lines += ["", "Spec" + (f" (`{sweep.get('spec_path')}`)" if sweep.get("spec_path") else "") + ":", "",
                  "```yaml", yaml.safe_dump(sweep["spec"], sort_keys=False).rstrip(), "```"]
    return lines


def _suffix(eval_dir: str) -> str:
    """What the names of the report's files get for ``eval_dir``: nothing for the sweep's own ``eval``."""
    return "" if eval_dir == "eval" else f"-{eval_dir}"


def write_report(sweep_dir: str, baseline: str | None = None, eval_dir: str = "eval") -> Path:
    """Write ``sweep_dir/report.md``, ``runs.csv`` and ``figures/*.png``; return the report's path.
    Problems with individual runs are listed in the report (and on stderr), never raised. ``baseline``: a
    row (method) to compare every other row with, paired by seed and question (:class:`ReportError` when
    the runs answered different questions). ``eval_dir``: each run's sub-directory holding the evaluation
    to report (another than ``eval``, e.g. ``eval-validation``, writes ``report-eval-validation.md``,
    ``runs-eval-validation.csv`` and ``figures-eval-validation/``, so the test report stays)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {root}")
    if not eval_dir or Path(eval_dir).name != eval_dir or eval_dir in (".", ".."):
        raise ReportError(f"--eval {eval_dir!r}: give the name of each run's evaluation sub-directory "
                          "(e.g. eval-validation, as written by `lesft eval --run RUN --out RUN/eval-validation`)")
    suffix = _suffix(eval_dir)
    t0 = time.perf_counter()
    problems: list[str] = []
    sweep, runs = _collect(root, problems, eval_dir)
    if not any(r.summary is not None or r.eval is not None for r in runs):  # refuse before writing anything
        single = any((root / f).exists() for f in RUN_FILES)
        raise ReportError(
            f"nothing to report in {root}: " + (
                f"it is one run's directory; point lesft report at the folder holding the runs ({root.parent})"
                if single else
                f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}, none finished (no summary.json or "
                f"{eval_dir}/eval.json); run `lesft sweep SPEC --out DIR` first, then `lesft report DIR`"))
    lay = _layout(sweep, runs)
    name = (sweep or {}).get("name") or root.name
    acc_lines, cells = _accuracy_table(runs, lay)
    paired_rows = _paired_rows(runs, lay, baseline) if baseline else []
    paired = _paired_table(paired_rows, lay, baseline)
    contamination = _contamination(runs, problems)
    over = _overhead_table(runs, lay)
    tok = _token_table(runs, lay)
    answers = _answers_table(runs, lay)
    figs = _figures(runs, lay, root / f"figures{suffix}", problems, paired_rows, baseline)

    n_sum = sum(r.summary is not None for r in runs)
    n_eval = sum(r.eval is not None for r in runs)
    md = [f"# Report: {name}" + (f" ({eval_dir})" if suffix else ""), ""]
    desc = ((sweep or {}).get("spec") or {}).get("description") if isinstance((sweep or {}).get("spec"), dict) else None
    if desc:
        md += [str(desc).strip(), ""]
    md += [f"{len(runs)} runs in `{root}`: {n_sum} with a training summary, {n_eval} evaluated"
           + (f", {len(problems)} problem(s) (see [Problems](#problems))" if problems else "") + ".", ""]
    md += ["## Accuracy", ""]
    if cells:
        evs = sorted({f"{r.eval.get('dataset', '?')}/{r.eval.get('split', '?')} ({r.eval.get('mode', '?')})"
                      for r in runs if r.eval})
        md.append("Rows: method" + (f" (+ the keys an explicit run sets: {', '.join(lay.mod_keys)})"
                                     if lay.mod_keys else "")
                  + (f". Columns: {' · '.join(lay.col_keys)}" if lay.col_keys else "")
                  + f". Evaluated on: {', '.join(evs)}.")
        md.append("Cell: accuracy % [Wilson 95% interval] (n = questions). With several seeds: "
                  "the mean over seeds [the mean of the seeds' bounds], and the seeds' standard deviation (sd); the seeds "
                  "answer the same questions, so they are not pooled. Best per column in **bold** (one row: best of the "
                  "row); an empty cell "
                  "is a run without an evaluation (see Problems), not 0.")
        md += [""] + acc_lines + [""]
    else:
        md += ["No evaluated run (no eval/eval.json).", ""]
    if baseline:
        md += [f"## Paired comparison with `{baseline}`", ""]
        md += (["Each method against the baseline on the same questions, seed s of one paired with seed s of the "
                "other (same training rows; the untuned model is paired with every seed). Δ: mean over seeds of "
                "the accuracy difference, in points, with a 95% percentile interval from a cluster bootstrap: "
                "10,000 resamples of the questions, each drawn question keeping all its seeds (the seeds "
                "themselves are not resampled, so this interval holds the question sampling, not the "
                "seed-to-seed variation of training). Discordant counts are question × seed pairs summed over "
                "seeds; the McNemar p (exact, two-sided) treats those pairs as independent although each "
                "question appears once per seed, so with several seeds it is optimistic, and is kept for "
                "comparison. Sign-flip p: the paired permutation test with the question as the unit (per "
                "question the difference summed over seeds; two-sided, exact over all sign flips, counted by "
                "convolution, not sampled). Δ over seeds: the mean of the per-seed differences with its Student "
                "t interval (df = seeds − 1) and one-sample t-test p: the seed (a training run) as the unit, so "
                "seed-to-seed variation is in it; with 3 seeds it is wide (t₀.₉₇₅,₂ = 4.30); – with one seed.",
                ""] + paired + [""]) if paired else \
            [f"No run shares a seed and a column with `{baseline}`.", ""]
    md += ["## Contamination", ""] + contamination + [""]
    md += ["## Overhead", ""]
    if over:
        md.append("Per method (mean over seeds). Memory: peak MB per side (the largest client's; server empty for "
                  "unsplit methods) and of the whole simulation process (every party, model loading included). Communication: MB per direction over the whole run (MB = 2^20 bytes). "
                  "Latency: busy seconds per epoch on the client (mean over clients) and on the server, where "
                  "epochs = rounds × batch_size × grad_accum / largest client's samples. Every party steps "
                  "its optimizer once per round; rows/step is how many training rows one step of the LM "
                  "head's holder averages (split methods: the server's, over every client of the round).")
        md += [""] + over + [""]
    else:
        md += ["No training summary.", ""]
    if tok:
        md += ["## LESFT token classes", "",
               "Share of target tokens (%) and their mean weight per class, last round of each run "
               "(metrics.jsonl `token_classes`), mean over runs.", ""] + tok + [""]
    if answers:
        md += ["## Answers", "",
               "What the generated answers got wrong, read from their own equations (`lesft.errors`): *slip*, a "
               "stated `a op b = c` is false; *reasoning*, every stated equation is true but the answer is wrong "
               "(a wrong operation, operand or step); *no equation*. Shares of all answers of the cell (seeds "
               "pooled), with the answers' mean length, equations per answer, and how often the first sentence "
               "restates the problem (holds no equation).", ""] + answers + [""]
    md += ["## Figures", ""]
    if figs:
        for fname, title in figs:
            md += [f"### {title}", "", f"![{title}](figures{suffix}/{fname})", ""]
    else:
        md += ["No figure (nothing to plot).", ""]
    md += ["## Problems", ""]
    md += [f"- {p}" for p in problems] if problems else ["None."]
    md += ["", "## Reproducibility", ""] + _repro(sweep, runs)
    md += ["", f"_Report generated in {time.perf_counter() - t0:.1f} s._", ""]
    out = root / f"report{suffix}.md"
    out.write_text("\n".join(md))
    _write_csv(runs, root / f"runs{suffix}.csv")
    for p in problems:
        print(f"lesft report: {p.replace('`', '')}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lesft report`` (for :mod:`lesft.cli`)."""
    parser.add_argument("dir", help="sweep directory (written by `lesft sweep`, or any folder of run directories)")
    parser.add_argument("--baseline", default=None, metavar="METHOD",
                        help="compare every method with this one (a row of the accuracy table, e.g. splitlora): "
                             "cluster-bootstrap interval of the accuracy difference, question-level sign-flip test, "
                             "seed-level t interval, and the pooled exact McNemar test")
    parser.add_argument("--eval", default="eval", metavar="NAME", dest="eval_dir",
                        help="each run's evaluation sub-directory to report (default eval, the sweep's own); e.g. "
                             "eval-validation after `lesft eval --run RUN --split validation --out RUN/eval-validation`"
                             ": writes report-NAME.md beside report.md")


def command(args: argparse.Namespace) -> int:
    path = write_report(args.dir, baseline=args.baseline, eval_dir=args.eval_dir)
    print(f"report -> {path} (figures in {path.parent / ('figures' + _suffix(args.eval_dir))})")
    return 0
