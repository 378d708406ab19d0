"""The report itself: ``write_report`` assembles the tables, figures and prose into ``DIR/report.md``, and the
``lesft report`` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lesft.report.figures import _figures
from lesft.report.runs import RUN_FILES, Run, _collect, _num
from lesft.report.tables import (ReportError, _accuracy_table, _answers_table, _contamination, _layout, _md_table,
                                 _overhead_table, _paired_rows, _paired_table, _sort_key, _token_table, _write_csv)


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
                "seed-to-seed variation is in it; with 3 seeds it is wide (t₀.₉₇₅,₂ = 4.30); – with one seed; 'sd 0' "
                "where every seed differs by the same amount (a t interval is then undefined, not a point).",
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

