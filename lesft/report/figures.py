"""The report's matplotlib figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from lesft.units import DIRECTIONS, MB
from lesft.report.runs import Run
from lesft.report.tables import (ABLATION_IMPLIES, ABLATION_KEYS, Cell, FIGURE_KEYS, Layout, PairedRow, _cell,
                                 _col_header, _fmt_value, _hashable, _members, _set_keys, _sort_key)


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
        from lesft.sweep.spec import _slug  # the run directories' slug

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

def _yerr(cells: list["Cell"]) -> list[list[float]]:
    """Asymmetric error bars in percent: from each cell's accuracy down to its interval's low end and up to its high end."""
    return [[100 * max(0.0, c.acc - c.lo) for c in cells], [100 * max(0.0, c.hi - c.acc) for c in cells]]
