"""lesft.stats: McNemar against binomial sums written out by hand, the paired bootstrap against closed forms,
brute-force enumeration and the earlier pure-Python loop, the sign-flip test against enumeration of every
flip, the seed-level t interval against hand-computed quantiles, and the report's paired comparison on small
made-up prediction files."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from lesft.report import ReportError, write_report
from lesft.stats import (mcnemar_exact, paired_bootstrap, paired_comparison, seed_spread, seed_t_interval,
                         sign_flip_exact, t_cdf, t_quantile)


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
    assert pc.per_seed == [pytest.approx(0.0), pytest.approx(0.25)]
    assert pc.seed_t == pytest.approx(seed_t_interval([0.0, 0.25]))
    # per question summed over seeds: (0, +2, -1, 0) -> T = 1; flips of (+-2, +-1): |T| >= 1 always
    assert pc.p_sign_flip == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison([[True, False]], [[True]])


def _python_bootstrap(a: list[list[bool]], b: list[list[bool]], resamples: int, seed: int,
                      level: float = 0.95) -> tuple[float, float, float]:
    """The pure-Python loop the report used before it was vectorised (the reference to reproduce)."""
    n, k = len(a[0]), len(a)
    d = [sum(int(a[s][q]) - int(b[s][q]) for s in range(k)) / k for q in range(n)]
    rng = random.Random(seed)
    stats = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = stats[int(math.floor((1 - level) / 2 * resamples))]
    hi = stats[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return sum(d) / n, lo, hi


@pytest.mark.parametrize("n, k, seed", [(37, 3, 0), (5, 1, 7), (1, 2, 1), (130, 2, 3)])
def test_paired_bootstrap_reproduces_the_pure_python_loop(n: int, k: int, seed: int) -> None:
    """Vectorised, the bootstrap draws the same questions as ``random.Random(seed).randrange`` did, so the
    intervals of earlier reports come out digit for digit."""
    r = random.Random(n + k)
    a = [[r.random() < 0.4 for _ in range(n)] for _ in range(k)]
    b = [[r.random() < 0.5 for _ in range(n)] for _ in range(k)]
    got = paired_bootstrap(a, b, resamples=3000, seed=seed)
    want = _python_bootstrap(a, b, 3000, seed)
    assert got == pytest.approx(want, abs=1e-12)
    assert paired_bootstrap(a, b, resamples=3000, seed=seed) == got  # fixed seed: the same every call


def _quantile(dist: dict[float, float], q: float) -> float:
    """Smallest value whose cumulative probability reaches q (asserting q is not at an atom's edge)."""
    cum = 0.0
    for v in sorted(dist):
        cum += dist[v]
        assert abs(cum - q) > 0.01, "pick data whose quantile is not on a step"
        if cum >= q:
            return v
    raise AssertionError


def test_cluster_bootstrap_keeps_each_questions_seeds_together() -> None:
    """3 questions x 2 seeds. Per question, the difference averaged over seeds is (+1, 0, -1/2): question 0
    only the method got right on both seeds, question 2 only the baseline on seed 1. A resample draws 3
    questions with replacement, both seeds of each together: 27 equally likely draws, enumerated here.
    P(mean = -1/2) = 1/27 = 3.7 % > 2.5 %, so the 95 % interval's low end is -1/2; a bootstrap drawing the
    seeds' questions independently would put that value at 1/27 x (2/3)^3 = 1.1 % and the low end higher,
    and one resampling the 6 question x seed pairs at (1/6)^6."""
    a = [[True, False, False], [True, False, False]]
    b = [[False, False, False], [False, False, True]]
    dq = [1.0, 0.0, -0.5]
    dist: dict[float, float] = {}
    for idx in itertools.product(range(3), repeat=3):
        v = round(sum(dq[i] for i in idx) / 3, 12)
        dist[v] = dist.get(v, 0.0) + 1 / 27
    d, lo, hi = paired_bootstrap(a, b, resamples=40_000, seed=1)
    assert d == pytest.approx(sum(dq) / 3)
    assert lo == pytest.approx(-0.5) and hi == pytest.approx(1.0)  # P(+1) = 1/27 too
    d, lo, hi = paired_bootstrap(a, b, resamples=40_000, seed=1, level=0.6)  # the 20 % and 80 % points
    assert lo == pytest.approx(_quantile(dist, 0.2)) and hi == pytest.approx(_quantile(dist, 0.8))
    assert (lo, hi) == (pytest.approx(-1 / 6), pytest.approx(0.5))  # cumulative 4/27 < 0.2 < 7/27, 20/27 < 0.8 < 23/27


def test_sign_flip_by_hand() -> None:
    """Per question the difference summed over 2 seeds: (+2, +1, +1, 0); the 0 question has no sign to flip.
    T = 4; over the 8 flips of (+-2, +-1, +-1), |T| = 4 in 2 (all +, all -): p = 2/8."""
    a = [[True, True, False, True], [True, False, True, False]]
    b = [[False, False, False, True], [False, False, False, False]]
    assert sign_flip_exact(a, b) == pytest.approx(0.25)
    assert sign_flip_exact(b, a) == pytest.approx(0.25)            # two-sided
    assert sign_flip_exact(a, a) == 1.0                            # nothing to flip
    # the pooled McNemar on the same data counts 4 pairs only the method got right and none the other way
    assert mcnemar_exact(4, 0) == pytest.approx(2 / 16)


def test_sign_flip_against_enumeration_of_every_flip() -> None:
    r = random.Random(11)
    for n, k in [(9, 3), (12, 2), (14, 1)]:
        a = [[r.random() < 0.6 for _ in range(n)] for _ in range(k)]
        b = [[r.random() < 0.3 for _ in range(n)] for _ in range(k)]
        dq = [sum(int(a[s][q]) - int(b[s][q]) for s in range(k)) for q in range(n)]
        t_obs = abs(sum(dq))
        hits = sum(abs(sum(e * x for e, x in zip(signs, dq))) >= t_obs
                   for signs in itertools.product((1, -1), repeat=n))
        assert sign_flip_exact(a, b) == pytest.approx(hits / 2 ** n, rel=1e-12)


def test_sign_flip_tail_far_below_any_resampling_floor() -> None:
    # 200 questions each won by the method on all 3 seeds: the one flip as extreme each way -> p = 2 / 2^200
    a, b = [[True] * 200] * 3, [[False] * 200] * 3
    assert sign_flip_exact(a, b) == pytest.approx(2.0 ** -199, rel=1e-9)


def test_t_distribution_against_closed_forms() -> None:
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.025, 2) == pytest.approx(-4.302653, abs=1e-6)
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)        # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_cdf(1.96, 10_000) == pytest.approx(0.975, abs=1e-4)                             # -> normal


def test_seed_t_interval_by_hand() -> None:
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, se 0.1 / sqrt 3; t_{0.975,2} = 4.302653;
    # t = 0.2 / se = 2 sqrt 3, and for df 2 the two-sided p is 1 - |t| / sqrt(2 + t^2) = 1 - sqrt(12 / 14)
    mean, lo, hi, p = seed_t_interval([0.1, 0.2, 0.3])
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.2)
    assert (lo, hi) == (pytest.approx(0.2 - half, abs=1e-6), pytest.approx(0.2 + half, abs=1e-6))
    assert p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    # the reviewer's 100-step cell: per seed -5.2, -25.8, -21.2 points -> -17.4 [-44.3, +9.5], p = 0.11
    mean, lo, hi, p = seed_t_interval([-0.052, -0.258, -0.212])
    assert (round(100 * mean, 1), round(100 * lo, 1), round(100 * hi, 1), round(p, 2)) == (-17.4, -44.3, 9.5, 0.11)
    assert seed_t_interval([0.3]) is None
    assert seed_t_interval([0.1, 0.1]) is None  # sd 0: undefined, not a point with p = 0
    assert seed_t_interval([0.0, 0.0]) is None


def test_no_seed_t_mark() -> None:
    # one seed: "–"; two seeds with the same difference (+1 of 2 questions each): "sd 0"; else a t interval
    one = paired_comparison([[True, False]], [[False, False]])
    same = paired_comparison([[True, False], [True, False]], [[False, False], [False, False]])
    assert (one.seed_t, one.no_seed_t) == (None, "–")
    assert (same.seed_t, same.no_seed_t) == (None, "sd 0")


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
    # sign flip per question, summed over seeds: (0, -1, -1, +1, 0) -> every flip has |T| >= 1: p = 1
    assert cells[9] == "1"
    # over the seeds: -40 and +20 points, mean -10, sd 30 sqrt 2, se 30; t_{0.975,1} = 12.706205;
    # t = -1/3 and for df 1 the p is 1 - 2 atan(1/3) / pi
    half = 12.706205 * 30
    assert cells[10] == f"-10.0 [{-10 - half:+.1f}, {-10 + half:+.1f}]"
    assert cells[11] == f"{1 - 2 * math.atan(1 / 3) / math.pi:.2g}"
    head = next(ln for ln in paired.splitlines() if ln.startswith("| method |"))
    assert "question × seed pairs" in head and "sign-flip p" in head and "df = seeds − 1" in head
    assert "cluster bootstrap" in paired and "optimistic" in paired
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
    assert cells[9] == "0.5"  # per question (q0 +2, q1 +1): T = 3; the flips give 3, 1, -1, -3: p = 2/4
    assert cells[10].startswith("+30.0 [")


def test_seed_t_interval_undefined_when_every_seed_differs_alike() -> None:
    # two seeds, 300 questions, both 4 points behind (12 more right by the baseline) but with other counts:
    # in floats the two per-seed differences need not be bit-equal; a t interval must still not be reported
    a = [[i < 100 for i in range(300)], [i < 87 for i in range(300)]]
    b = [[i < 112 for i in range(300)], [i < 99 for i in range(300)]]
    pc = paired_comparison(a, b, resamples=200)
    assert [round(d, 12) for d in pc.per_seed] == [-0.04, -0.04]
    assert pc.seed_t is None
