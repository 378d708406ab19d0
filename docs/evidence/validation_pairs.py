"""Every validated cell of the evidence study against plain CE (`splitlora`), recomputed from the kept predictions.

    .venv/bin/python docs/evidence/validation_pairs.py   # the table and the count, as docs/evidence.md prints them

A cell is a method and its settings, at the seeds whose adapter was evaluated on the 300 validation problems
(`eval-validation/predictions.jsonl` of a run in docs/evidence/results, the CPU study, or docs/evidence/results-gpu,
the GPU round). The baseline is the CPU `splitlora` of the same seed in the cell's column: with the cell's other
settings where `splitlora` has them (`lesft epochs=8` against `splitlora epochs=8`), plain `splitlora` otherwise
(seed 0 from issue 10's validation check, seeds 1-2 trained again in session 15 with the same test completions as
the kept runs). A GPU cell's pairs cross
hardware; on the test split a seed's GPU run answers as its CPU run on 99.5 % of the questions (session 15).
CPU cells whose runs were trained again for their validation (configs/studies/cpu/evidence_validation.yaml) were
adopted only where the 500 test completions equal the kept run's (`keep.sh adopt`), so they are the kept runs;
the others (not reproduced to the letter: `sl` seed 2, one completion apart) are twins in results-again/.
Per cell: the seeds' accuracies, the paired difference in points with its cluster-bootstrap interval over
questions, discordant question x seed pairs, the pooled McNemar p, the sign-flip p (question as the unit) and
the mean over seeds with its t interval (lesft.stats).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lesft.stats import paired_comparison  # noqa: E402

SOURCES = {"CPU": ROOT / "docs/evidence/results",               # the study's kept runs (retrained ones adopted)
           "CPU again": ROOT / "docs/evidence/results-again",   # retrained on another CPU: a twin, like a GPU run
           "GPU": ROOT / "docs/evidence/results-gpu"}
BASELINE = frozenset({"method=splitlora"})
UNTUNED = SOURCES["CPU"] / "method=base/eval-validation/predictions.jsonl"  # the untuned model: no seed, no training
TWINS = {"lesft.weighting=boost": "lesft.weighting=uniform-1"}  # a named weighting = the ablation it was named from


@functools.cache  # a baseline's predictions are read once, not once per cell it is paired with
def load(path: Path) -> dict[str, bool]:
    """Question id -> correct, from one run's predictions.jsonl (never mutated: callers share the cached dict)."""
    return {str(r["id"]): bool(r["correct"]) for r in map(json.loads, path.open())}


def cells(root: Path, pattern: str) -> dict[frozenset, dict[int, Path]]:
    """cell (its run-name keys without the seed) -> seed -> the file ``pattern`` matches in that run's directory.
    The untuned model (no seed) is left out."""
    out: dict[frozenset, dict[int, Path]] = {}
    for f in sorted(root.glob(f"*/{pattern}")):
        keys = f.relative_to(root).parts[0].split("__")  # the sweep names a run by its keys, in grid or runs order
        seeds = [int(k.split("=")[1]) for k in keys if k.startswith("seed=")]
        if seeds:
            out.setdefault(frozenset(k for k in keys if not k.startswith("seed=")), {})[seeds[0]] = f
    return out


def validated(root: Path) -> dict[frozenset, dict[int, Path]]:
    """cell -> seed -> validation predictions, for every validated run."""
    return cells(root, "eval-validation/predictions.jsonl")


def coverage() -> None:
    """Issue 30 part 4: which of the CPU study's cell x seed runs are validated (on the CPU, or by the GPU round)."""
    def twin(c: frozenset) -> frozenset:
        return frozenset(TWINS.get(k, k) for k in c)

    study = {twin(c): v for c, v in cells(SOURCES["CPU"], "eval/predictions.jsonl").items()}
    done = {hw: {twin(c): v for c, v in validated(root).items()} for hw, root in SOURCES.items()}
    n = sum(len(v) for v in study.values())
    have, missing = 0, []
    for cell, seeds in sorted(study.items(), key=lambda c: name(c[0])):
        got = {s for s in seeds if any(s in done[hw].get(cell, {}) for hw in SOURCES)}
        have += len(got)
        if got != set(seeds):
            missing.append(f"`{name(cell)}` ({', '.join(str(s) for s in sorted(set(seeds) - got))})")
    untuned = "is" if UNTUNED.is_file() else "is not yet"
    print(f"\nValidated: {have} of the CPU study's {n} trained cell \u00d7 seed runs (on the CPU, or their GPU twin). "
          f"Not yet: {'; '.join(missing) or 'none'}. The untuned model (no training) {untuned} evaluated on validation.")


def interval(mid: float, low: float, high: float) -> str:
    """A difference with its interval, fractions as points the way docs/evidence.md prints them (true minus)."""
    m, lo, hi = (f"{100 * x:+.1f}".replace("-", "\u2212") for x in (mid, low, high))
    return f"{m} [{lo}, {hi}]"


def name(cell: frozenset) -> str:
    rest = sorted(k for k in cell if not k.startswith("method="))
    return " ".join([next(k for k in cell if k.startswith("method=")).split("=", 1)[1], *rest])


def baseline_of(cell: frozenset, cpu: dict[frozenset, dict[int, Path]]) -> frozenset:
    """`splitlora` with the cell's settings (its column) where such a CPU cell is validated, else plain `splitlora`."""
    same = BASELINE | {k for k in cell if not k.startswith("method=")}
    return same if same in cpu and same != cell else BASELINE


def row(label: str, hw: str, seeds: str, a: list[list[bool]], b: list[list[bool]], ref: str,
        one_run: bool = False) -> None:
    """One table line: ``a`` against ``b``, seed by seed (lists of per-question correctness, the same questions);
    ``one_run``: ``a`` is one run repeated against each of ``b``'s seeds, its accuracy printed once."""
    def accuracies(runs: list[list[bool]]) -> str:
        return ", ".join(f"{100 * sum(x) / len(x):.1f}" for x in runs)

    p = paired_comparison(a, b)
    acc, accb = accuracies(a[:1] if one_run else a), accuracies(b)
    over = p.no_seed_t if p.seed_t is None else f"{interval(*p.seed_t[:3])}, {p.seed_t[3]:.2g}"
    print(f"| {label} | {hw} | {seeds} | {acc} | {ref} | {accb} | {interval(p.diff, p.low, p.high)} "
          f"| {p.only_method} / {p.only_baseline} | {p.p_value:.2g} | {p.p_sign_flip:.2g} | {over} |")


def main() -> None:
    cpu = validated(SOURCES["CPU"])
    ids = sorted(load(cpu[BASELINE][0]))
    print("| cell, 300 validation problems | trained on | seeds | accuracy by seed | baseline (CPU) | baseline by seed "
          "| Δ, points [95 %, questions] | discordant | McNemar p | sign-flip p | over seeds [95 % t], p |")
    print("|" + " --- |" * 11)
    for hw, root in SOURCES.items():
        for cell, seeds in sorted(validated(root).items(), key=lambda c: name(c[0])):
            if hw == "CPU" and cell == BASELINE:
                continue
            ref = baseline_of(cell, cpu)
            used = [s for s in sorted(seeds) if s in cpu[ref]]  # the seeds whose baseline is validated
            a, b = [], []
            for s in used:
                mine, base = load(seeds[s]), load(cpu[ref][s])
                assert sorted(mine) == ids == sorted(base), f"{name(cell)} seed {s}: not the same questions"
                a.append([mine[k] for k in ids])
                b.append([base[k] for k in ids])
            if used:
                row(f"`{name(cell)}`", hw, ", ".join(map(str, used)), a, b, f"`{name(ref)}`")
    if UNTUNED.is_file():  # no seed: paired with every seed of the baseline, as `lesft report` pairs it
        mine = load(UNTUNED)
        assert sorted(mine) == ids, "the untuned model: not the same questions"
        b = [[base[k] for k in ids] for base in (load(f) for _, f in sorted(cpu[BASELINE].items()))]
        row("the untuned model", "none", "– (each baseline seed)", [[mine[k] for k in ids]] * len(b), b,
            f"`{name(BASELINE)}`", one_run=True)
    coverage()


if __name__ == "__main__":
    main()
