"""The project's statistics, one implementation each: the Wilson interval of an accuracy, and the paired
comparison of two methods on the same questions (paired bootstrap interval of the accuracy difference,
exact McNemar test on the discordant pairs).

Paired data: ``a[s][q]`` / ``b[s][q]`` are booleans (question ``q`` answered correctly) for seed ``s`` of
the method and of the baseline; seed ``s`` of both was trained on the same rows, and every seed answers
the same questions in the same order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Paired", "wilson_ci", "mcnemar_exact", "paired_bootstrap", "paired_comparison", "seed_spread"]


def wilson_ci(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``correct / n`` ((0, 1) when ``n`` is 0)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: ``P(|X - m/2| >= |only_a - m/2|)`` for ``X ~ Binomial(m, 1/2)``,
    ``m = only_a + only_b`` discordant pairs (1.0 when there are none)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / (1 << m)  # exact ints: 2.0 ** m overflows past m = 1023
    return min(1.0, 2.0 * tail)


def _check(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> int:
    if not a or len(a) != len(b):
        raise ValueError(f"need the same number (>= 1) of seeds for both methods, got {len(a)} and {len(b)}")
    n = len(a[0])
    if n == 0 or any(len(x) != n for x in list(a) + list(b)):
        raise ValueError("every seed of both methods must answer the same questions (same, non-zero count)")
    return n


def paired_bootstrap(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], resamples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(difference, low, high)``: mean over seeds of accuracy(a) - accuracy(b), and its percentile
    interval from resampling the questions with replacement (one draw of questions serves every seed)."""
    n = _check(a, b)
    k = len(a)
    d = [sum(int(a[s][q]) - int(b[s][q]) for s in range(k)) / k for q in range(n)]  # per-question mean diff
    rng = random.Random(seed)
    stats = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = stats[int(math.floor((1 - level) / 2 * resamples))]
    hi = stats[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return sum(d) / n, lo, hi


@dataclass
class Paired:
    """A method against a baseline on the same questions (all rates in [0, 1])."""

    seeds: int
    questions: int
    diff: float  # mean over seeds of acc(method) - acc(baseline)
    low: float  # 95% paired-bootstrap interval of diff
    high: float
    only_method: int  # discordant (seed, question) pairs, summed over seeds
    only_baseline: int
    p_value: float  # exact McNemar on the summed discordant pairs


def paired_comparison(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], resamples: int = 10_000,
                      seed: int = 0) -> Paired:
    """Everything the report prints for one method (``a``) against the baseline (``b``)."""
    diff, lo, hi = paired_bootstrap(a, b, resamples, seed)
    only_a = sum(x and not y for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    only_b = sum(y and not x for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    return Paired(len(a), len(a[0]), diff, lo, hi, only_a, only_b, mcnemar_exact(only_a, only_b))


def seed_spread(accs: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, sample standard deviation)`` of per-seed accuracies (sd None for one seed)."""
    if not accs:
        raise ValueError("no accuracies")
    mean = sum(accs) / len(accs)
    if len(accs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in accs) / (len(accs) - 1))
