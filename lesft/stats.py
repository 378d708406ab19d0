"""The project's statistics, one implementation each: the Wilson interval of an accuracy, and the paired
comparison of two methods on the same questions:

* the **cluster bootstrap** interval of the accuracy difference (resamples questions; a question's seeds
  stay together), :func:`paired_bootstrap`;
* the **sign-flip permutation test** at the question level (per question the difference summed over
  seeds; its exact two-sided p over all sign flips, counted by convolution), :func:`sign_flip_exact`;
* the **seed-level** mean difference with its Student t interval (df = seeds - 1) and p,
  :func:`seed_t_interval` (the only one whose interval includes seed-to-seed variation in training);
* the **exact McNemar** test on the discordant question x seed pairs, pooled over seeds
  (:func:`mcnemar_exact`): it treats each question's seeds as independent pairs, so with several seeds
  its p is optimistic; kept for comparison with earlier reports.

Paired data: ``a[s][q]`` / ``b[s][q]`` are booleans (question ``q`` answered correctly) for seed ``s`` of
the method and of the baseline; seed ``s`` of both was trained on the same rows, and every seed answers
the same questions in the same order. Differences are fractions (x 100 = points).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Paired", "wilson_ci", "mcnemar_exact", "paired_bootstrap", "sign_flip_exact", "t_cdf", "t_quantile",
           "seed_t_interval", "seed_differences", "paired_comparison", "seed_spread"]


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


def _check(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> np.ndarray:
    """``a - b`` as an int array of shape (seeds, questions), after checking the shapes agree."""
    if not a or len(a) != len(b):
        raise ValueError(f"need the same number (>= 1) of seeds for both methods, got {len(a)} and {len(b)}")
    n = len(a[0])
    if n == 0 or any(len(x) != n for x in list(a) + list(b)):
        raise ValueError("every seed of both methods must answer the same questions (same, non-zero count)")
    return np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)


def seed_differences(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> list[float]:
    """accuracy(a) - accuracy(b) of each seed (fractions)."""
    return [float(x) for x in _check(a, b).mean(axis=1)]


class _RandBelow:
    """The integers ``random.Random(seed).randrange(n)`` would return, call after call, drawn in bulk: the
    same Mersenne Twister stream (numpy's MT19937 set to ``random.Random(seed)``'s state) and the same
    rejection rule (``getrandbits(n.bit_length())``, i.e. a 32-bit output's top bits, retried while >= n).
    It keeps the bootstrap intervals of reports made with the earlier pure-Python loop, digit for digit."""

    def __init__(self, seed: int, n: int) -> None:
        if not 1 <= n < 2 ** 32:
            raise ValueError(f"need 1 <= n < 2^32, got {n}")
        state = random.Random(seed).getstate()[1]
        self.bits = np.random.MT19937()
        self.bits.state = {"bit_generator": "MT19937",
                           "state": {"key": np.asarray(state[:624], dtype=np.uint32), "pos": state[624]}}
        self.n, self.shift = n, 32 - n.bit_length()
        self.spare = np.empty(0, dtype=np.int64)

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` integers in [0, n)."""
        parts, have = [self.spare], self.spare.size
        while have < count:
            raw = (self.bits.random_raw(int((count - have) * 1.05) + 64) >> self.shift).astype(np.int64)
            raw = raw[raw < self.n]
            parts.append(raw)
            have += raw.size
        allv = np.concatenate(parts)
        self.spare = allv[count:]
        return allv[:count]


def paired_bootstrap(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], resamples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(difference, low, high)`` (fractions): mean over seeds of accuracy(a) - accuracy(b), and its
    percentile interval from a cluster bootstrap: each resample draws ``questions`` questions with
    replacement and keeps every seed of a drawn question (one draw of questions serves every seed).
    Seeds themselves are not resampled, so the interval holds the question-sampling noise given these
    trained models, not the seed-to-seed variation of training (see :func:`seed_t_interval`).
    Reproducible: the draws are ``random.Random(seed).randrange(questions)``'s (see :class:`_RandBelow`),
    vectorised with numpy, in blocks of at most ~2M draws."""
    dq = _check(a, b).sum(axis=0)  # per-question difference summed over seeds (integers)
    k, n = len(a), dq.size
    draw = _RandBelow(seed, n)
    block = max(1, 2_000_000 // n)
    sums = np.concatenate([dq[draw.take(m * n).reshape(m, n)].sum(axis=1)
                           for m in (min(block, resamples - i) for i in range(0, resamples, block))])
    stats = np.sort(sums) / (k * n)
    lo = stats[int(math.floor((1 - level) / 2 * resamples))]
    hi = stats[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return float(dq.sum() / (k * n)), float(lo), float(hi)


def sign_flip_exact(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> float:
    """Two-sided p of the paired sign-flip permutation test at the question level. Per question
    ``D_q = sum over seeds of (a - b)`` (an integer in [-seeds, seeds]); statistic ``T = sum_q D_q``; under
    the null each ``D_q`` is as likely to have either sign, so ``T`` is distributed as ``sum_q e_q |D_q|``
    with independent fair signs ``e_q``. p = ``P(|T| >= |T_obs|)`` counted over all ``2^m`` sign flips
    (m = questions with ``D_q != 0``) exactly, by convolving the per-question distributions (no Monte
    Carlo, so a tiny p is a real tail probability, not a resampling floor). 1.0 when every ``D_q`` is 0."""
    dq = _check(a, b).sum(axis=0)
    t_obs = int(abs(dq.sum()))
    d = np.abs(dq[dq != 0])
    if d.size == 0:
        return 1.0
    top = int(d.sum())
    dist = np.zeros(2 * top + 1)  # P(T = t) at index t + top
    dist[top] = 1.0
    for v in d.tolist():
        dist = 0.5 * (np.roll(dist, v) + np.roll(dist, -v))  # never wraps: |T| <= top at every step
    t = np.arange(-top, top + 1)
    return float(min(1.0, dist[np.abs(t) >= t_obs].sum()))


def _betacf(x: float, p: float, q: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (p + q) * x / (p + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (q - m) * x / ((p + 2 * m - 1) * (p + 2 * m)),
                    -(p + m) * (p + q + m) * x / ((p + 2 * m) * (p + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(x: float, p: float, q: float) -> float:
    """Regularised incomplete beta function ``I_x(p, q)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lead = math.exp(math.lgamma(p + q) - math.lgamma(p) - math.lgamma(q) + p * math.log(x) + q * math.log1p(-x))
    if x < (p + 1) / (p + q + 2):
        return lead * _betacf(x, p, q) / p
    return 1.0 - lead * _betacf(1.0 - x, q, p) / q


def t_cdf(t: float, df: float) -> float:
    """Student t cumulative distribution function with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"need df > 0, got {df}")
    tail = 0.5 * _betainc(df / (df + t * t), df / 2, 0.5)  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(prob: float, df: float) -> float:
    """The ``prob`` quantile of Student t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"need 0 < prob < 1, got {prob}")
    if prob < 0.5:
        return -t_quantile(1.0 - prob, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < prob:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < prob else (lo, mid)
    return 0.5 * (lo + hi)


def seed_t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float] | None:
    """``(mean, low, high, p)`` over seeds: the mean of the per-seed accuracy differences (fractions), its
    Student t interval ``mean +- t_{(1+level)/2, k-1} sd / sqrt(k)`` and the two-sided one-sample t-test p
    against 0, k = seeds; the unit resampled in thought is the seed (a training run), so seed-to-seed
    variation is in the interval. None for one seed, and None when every seed differs by the same amount
    (sd 0): the t interval is then undefined, not the point, and a p of 0 from two seeds would overclaim."""
    k = len(diffs)
    if k < 2:
        return None
    mean = sum(diffs) / k
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (k - 1))
    if max(diffs) - min(diffs) <= 1e-12:  # sd 0 up to rounding (k / n - j / n in floats)
        return None
    se = sd / math.sqrt(k)
    half = t_quantile((1 + level) / 2, k - 1) * se
    t = mean / se
    p = _betainc((k - 1) / (k - 1 + t * t), (k - 1) / 2, 0.5)  # = 2 P(T > |t|), without 1 - cdf's cancellation
    return mean, mean - half, mean + half, min(1.0, p)


@dataclass
class Paired:
    """A method against a baseline on the same questions (all differences are fractions)."""

    seeds: int
    questions: int
    diff: float  # mean over seeds of acc(method) - acc(baseline)
    low: float  # 95% cluster-bootstrap interval of diff (questions resampled, seeds kept together)
    high: float
    only_method: int  # discordant question x seed pairs, summed over seeds
    only_baseline: int
    p_value: float  # exact McNemar on the pooled discordant question x seed pairs (optimistic with seeds > 1)
    p_sign_flip: float = 1.0  # exact sign-flip permutation p, questions as the unit
    per_seed: list[float] | None = None  # acc(method) - acc(baseline) per seed
    seed_t: tuple[float, float, float, float] | None = None  # (mean, low, high, p) over seeds; None: 1 seed or sd 0

    @property
    def no_seed_t(self) -> str:
        """The mark a table prints where ``seed_t`` is None: "–" for one seed, "sd 0" when every seed's Δ is equal."""
        return "–" if self.seeds == 1 else "sd 0"


def paired_comparison(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], resamples: int = 10_000,
                      seed: int = 0) -> Paired:
    """Everything the report prints for one method (``a``) against the baseline (``b``)."""
    diff, lo, hi = paired_bootstrap(a, b, resamples, seed)
    only_a = sum(x and not y for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    only_b = sum(y and not x for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    per_seed = seed_differences(a, b)
    return Paired(len(a), len(a[0]), diff, lo, hi, only_a, only_b, mcnemar_exact(only_a, only_b),
                  sign_flip_exact(a, b), per_seed, seed_t_interval(per_seed))


def seed_spread(accs: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, sample standard deviation)`` of per-seed accuracies (sd None for one seed)."""
    if not accs:
        raise ValueError("no accuracies")
    mean = sum(accs) / len(accs)
    if len(accs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in accs) / (len(accs) - 1))
