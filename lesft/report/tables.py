"""The report's grouping of runs into rows and columns, and its tables (accuracy, overhead, paired, contamination,
tokens, answers, CSV)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

from lesft.config import FREE_FIELDS
from lesft.data.contamination import TRAIN_KEYS_FILE, overlap, read_train_keys
from lesft.errors import ERROR_KINDS, describe
from lesft.stats import Paired, paired_comparison, seed_spread
from lesft.units import DIRECTIONS, MB
from lesft.report.runs import MEMORY_SIDES, Run, _num

FIGURE_KEYS = (("client_layers", "split point (client layers)"), ("per_client", "samples per client"),
               ("clients", "number of clients"))
ABLATION_KEYS = ("paths", "lesft.weighting")
ABLATION_IMPLIES = {"paths": ("loss",)}  # keys an ablation must change with it: the LESFT loss needs paths=dual
ARROWS = {"client_to_server": "client→server", "server_to_client": "server→client",
          "client_to_aggregator": "client→aggregator", "aggregator_to_client": "aggregator→client"}
TOKEN_STATS = ("frac_salient", "frac_subsalient", "frac_irrelevant", "mean_weight_salient",
               "mean_weight_subsalient", "mean_weight_irrelevant", "mean_weight")


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
        no_t = p.pc.no_seed_t
        body.append([
            p.row, _col_header(lay, p.col) if lay.col_keys else "", str(p.pc.seeds), str(p.pc.questions),
            f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else ""),
            f"{100 * p.pc.diff:+.1f} [{100 * p.pc.low:+.1f}, {100 * p.pc.high:+.1f}]",
            ", ".join(f"{100 * d:+.1f}" for d in p.per_seed),
            f"{p.pc.only_method} / {p.pc.only_baseline}", f"{p.pc.p_value:.2g}", f"{p.pc.p_sign_flip:.2g}",
            (f"{100 * t[0]:+.1f} [{100 * t[1]:+.1f}, {100 * t[2]:+.1f}]" if (t := p.pc.seed_t) else no_t),
            f"{t[3]:.2g}" if t else no_t,
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


