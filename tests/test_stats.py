"""lesft.stats: McNemar against binomial sums written out by hand, the paired bootstrap against closed forms,
and the report's paired comparison on small made-up prediction files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lesft.report import ReportError, write_report
from lesft.stats import mcnemar_exact, paired_bootstrap, paired_comparison, seed_spread


@pytest.mark.parametrize("only_a, only_b, expect", [
    (1, 5, 2 * (1 + 6) / 64),            # m = 6: P(X <= 1) = (C(6,0) + C(6,1)) / 2^6
    (0, 3, 2 * 1 / 8),                   # m = 3: P(X = 0) = 1/8
    (5, 1, 2 * (1 + 6) / 64),            # symmetric
    (2, 2, 1.0),                         # 2 * 11/16 > 1: capped
    (0, 0, 1.0),                         # no discordant pair
    (0, 10, 2 / 1024),
])
def test_mcnemar_exact_by_hand(only_a: int, only_b: int, expect: float) -> None:
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expect, rel=1e-12)


def test_mcnemar_matches_the_issue_numbers() -> None:
    # issue 10: 20 answered only by lesft, 68 only by splitlora -> p = 3e-7
    p = mcnemar_exact(20, 68)
    assert p == pytest.approx(2 * sum(math.comb(88, i) for i in range(21)) / 2 ** 88)
    assert 2e-7 < p < 4e-7


def test_mcnemar_past_a_thousand_discordant_pairs() -> None:
    # 3 seeds x 500 questions against the untuned model: over 1,023 discordant pairs, where 2.0 ** m overflows.
    # Second method: the same tail summed in log space with lgamma.
    def log_tail(k: int, m: int) -> float:
        terms = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2) for i in range(k + 1)]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))
    for k, m in [(520, 1100), (560, 1200), (40, 1090)]:
        p = mcnemar_exact(k, m - k)
        assert math.log(p) == pytest.approx(math.log(2) + log_tail(k, m), rel=1e-9)
    assert mcnemar_exact(700, 700) == 1.0


def test_paired_bootstrap_degenerate_and_normal_approximation() -> None:
    a = [[True] * 30 + [False] * 20]
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    # 200 questions: 40 answered only by a, 10 only by b, 150 by both or neither -> d = 0.15,
    # sd of the mean difference = sqrt((0.2 + 0.05 - 0.15^2) / 200)
    a = [[True] * 40 + [False] * 10 + [True] * 50 + [False] * 100]
    b = [[False] * 40 + [True] * 10 + [True] * 50 + [False] * 100]
    d, lo, hi = paired_bootstrap(a, b, resamples=20_000)
    half = 1.96 * math.sqrt((0.25 - 0.15 ** 2) / 200)
    assert d == pytest.approx(0.15)
    assert lo == pytest.approx(0.15 - half, abs=0.008)
    assert hi == pytest.approx(0.15 + half, abs=0.008)


def test_paired_comparison_counts_pairs_over_seeds() -> None:
    a = [[True, True, False, False], [True, False, True, False]]
    b = [[True, False, True, False], [False, False, True, False]]
    pc = paired_comparison(a, b, resamples=200)
    assert (pc.seeds, pc.questions) == (2, 4)
    assert pc.diff == pytest.approx(((2 - 2) / 4 + (2 - 1) / 4) / 2)
    assert (pc.only_method, pc.only_baseline) == (2, 1)   # seed 0: q1 / q2; seed 1: q1
    assert pc.p_value == pytest.approx(mcnemar_exact(2, 1))
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison([[True, False]], [[True]])


def test_seed_spread() -> None:
    assert seed_spread([0.1, 0.2, 0.3]) == (pytest.approx(0.2), pytest.approx(0.1))
    assert seed_spread([0.5]) == (0.5, None)


# ------------------------------------------------------------------- the report's paired section


def _run(root: Path, method: str, seed: int, correct: list[bool], ids: list[str] | None = None,
         eval_dir: str = "eval", split: str = "test") -> str:
    name = f"method={method}__seed={seed}"
    d = root / name
    (d / eval_dir).mkdir(parents=True)
    (d / "config.yaml").write_text(json.dumps({"method": method, "seed": seed, "data_seed": seed}))
    n, k = len(correct), sum(correct)
    (d / eval_dir / "eval.json").write_text(json.dumps(
        {"dataset": "synthetic", "split": split, "mode": "generate", "n": n, "correct": k, "accuracy": k / n}))
    ids = ids or [f"q{i}" for i in range(n)]
    (d / eval_dir / "predictions.jsonl").write_text("".join(
        json.dumps({"id": q, "correct": c, "keys": [f"p:{q}"]}) + "\n" for q, c in zip(ids, correct)))
    return name


def _sweep(root: Path, names: list[tuple[str, dict]]) -> None:
    grid = {"method": ["splitlora", "lesft"], "seed": [0, 1]}
    (root / "sweep.json").write_text(json.dumps({
        "name": "paired", "spec": {"base": {}, "grid": grid, "eval": {"limit": 5}}, "keys": {"grid": list(grid)},
        "values": grid, "runs": [{"name": n, "overrides": ov, "status": "done"} for n, ov in names]}))


def test_report_paired_section_by_hand(tmp_path: Path) -> None:
    T, F = True, False
    preds = {("splitlora", 0): [T, T, T, F, F], ("splitlora", 1): [T, T, F, F, F],
             ("lesft", 0): [T, F, F, F, F], ("lesft", 1): [T, T, F, T, F]}
    names = [(_run(tmp_path, m, s, c), {"method": m, "seed": s}) for (m, s), c in preds.items()]
    _sweep(tmp_path, names)
    text = write_report(str(tmp_path), baseline="splitlora").read_text()
    # seed 0: 1/5 - 3/5 = -40 points; seed 1: 3/5 - 2/5 = +20 points; mean -10
    # discordant: seed 0: only splitlora q1, q2; seed 1: only lesft q3 -> 1 / 2, p = 2 * (1 + 3) / 8 = 1.0
    paired = text.split("## Paired comparison", 1)[1]
    line = next(ln for ln in paired.splitlines() if ln.startswith("| lesft |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:5] == ["2", "5", f"{100 * (0.2 + 0.6) / 2:.1f} ± {100 * math.sqrt(0.08):.1f}"]
    assert cells[5].startswith("-10.0 [")
    assert cells[6] == "-40.0, +20.0"
    assert cells[7] == "1 / 2"
    assert cells[8] == "1"
    # the same numbers drawn: one forest plot of the differences, linked from the report
    assert (tmp_path / "figures" / "paired_vs_splitlora.png").stat().st_size > 1024
    assert "](figures/paired_vs_splitlora.png)" in text
    csv_lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("name,row,method,seed,data_seed")


def test_report_refuses_runs_that_answered_different_questions(tmp_path: Path) -> None:
    names = [(_run(tmp_path, "splitlora", 0, [True, False]), {"method": "splitlora", "seed": 0}),
             (_run(tmp_path, "lesft", 0, [True, False], ids=["q0", "other"]), {"method": "lesft", "seed": 0})]
    _sweep(tmp_path, names)
    with pytest.raises(ReportError, match="same questions.*1 in common"):
        write_report(str(tmp_path), baseline="splitlora")
    with pytest.raises(ReportError, match="not a row"):
        write_report(str(tmp_path), baseline="sl")


def test_report_of_another_evaluation_directory(tmp_path: Path) -> None:
    """``--eval eval-validation`` reports each run's validation evaluation beside the test report, leaving
    report.md alone and leaving out the runs that have no such evaluation."""
    T, F = True, False
    names = [(_run(tmp_path, "splitlora", 0, [T, F, F, F]), {"method": "splitlora", "seed": 0}),
             (_run(tmp_path, "lesft", 0, [F, F, F, F]), {"method": "lesft", "seed": 0}),
             (_run(tmp_path, "lesft", 1, [T, T]), {"method": "lesft", "seed": 1})]
    _sweep(tmp_path, names)
    for (m, s), c in {("splitlora", 0): [T, T, F, F, F], ("lesft", 0): [T, T, T, T, F]}.items():
        _run(tmp_path, m, s, c, eval_dir="eval-validation", split="validation")  # into the same run directory
    test_md = write_report(str(tmp_path), baseline="splitlora").read_text()
    out = write_report(str(tmp_path), baseline="splitlora", eval_dir="eval-validation")
    assert out.name == "report-eval-validation.md" and (tmp_path / "runs-eval-validation.csv").is_file()
    assert (tmp_path / "report.md").read_text() == test_md
    text = out.read_text()
    assert "synthetic/validation" in text and "synthetic/test" not in text
    line = next(ln for ln in text.split("## Paired comparison", 1)[1].splitlines() if ln.startswith("| lesft |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5].startswith("+40.0 [")  # 4/5 - 2/5
    assert cells[7] == "2 / 0"              # q2, q3 only lesft
    assert "1 run(s) without eval-validation/eval.json left out: method=lesft__seed=1" in text
    with pytest.raises(ReportError, match="name of each run's evaluation sub-directory"):
        write_report(str(tmp_path), eval_dir="../x")


def test_the_untuned_model_as_baseline_pairs_with_every_seed(tmp_path: Path) -> None:
    """``--baseline base``: the one untuned model is the baseline of each seed of every method."""
    T, F = True, False
    names = [(_run(tmp_path, "base", 0, [F, F, F, F, F]), {"method": "base"}),
             (_run(tmp_path, "lesft", 0, [T, F, F, F, F]), {"method": "lesft", "seed": 0}),
             (_run(tmp_path, "lesft", 1, [T, T, F, F, F]), {"method": "lesft", "seed": 1})]
    _sweep(tmp_path, names)
    text = write_report(str(tmp_path), baseline="base").read_text()
    line = next(ln for ln in text.split("## Paired comparison", 1)[1].splitlines() if ln.startswith("| lesft |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "2"                      # both seeds paired, not only seed 0
    assert cells[5].startswith("+30.0 [")       # (+20 + +40) / 2
    assert cells[6] == "+20.0, +40.0"
    assert cells[7] == "3 / 0" and cells[8] == "0.25"  # exact McNemar: 2 * (1/2)^3
