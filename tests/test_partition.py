"""Tests for the client partitions (lesft.data.partition)."""

from __future__ import annotations

from collections import Counter

import pytest

from lesft.data.partition import length_buckets, partition_dirichlet, partition_iid, per_client_sample


def _is_partition(parts: list[list[int]], n: int) -> bool:
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n)) and all(p == sorted(p) for p in parts)


# Pinned: every committed study's rows per client depend on these exact partitions (random.Random(seed).shuffle,
# then contiguous chunks, the first n % clients one larger); a change here would silently re-deal them.
PINNED = {(10, 3, 4): [[0, 2, 7, 8], [5, 6, 9], [1, 3, 4]],
          (7, 7, 0): [[4], [2], [1], [0], [5], [3], [6]],
          (5, 1, 9): [[0, 1, 2, 3, 4]],
          (12, 5, 123): [[5, 7, 9], [2, 3, 8], [10, 11], [1, 6], [0, 4]]}


@pytest.mark.parametrize("n, clients, seed", [(10, 3, 4), (7, 7, 0), (100, 6, 123), (1000, 10, 2), (5, 1, 9),
                                              (12, 5, 123)])
def test_partition_iid_is_a_balanced_seeded_partition(n, clients, seed) -> None:
    parts = partition_iid(n, clients, seed)
    if (n, clients, seed) in PINNED:
        assert parts == PINNED[n, clients, seed]
    assert _is_partition(parts, n) and parts == partition_iid(n, clients, seed)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        partition_iid(2, 3, 0)


def _skew(labels: list[str], parts: list[list[int]]) -> float:
    """Size-weighted mean total-variation distance of each client's label mix from the global mix."""
    n = len(labels)
    overall = Counter(labels)
    total = 0.0
    for part in parts:
        local = Counter(labels[i] for i in part)
        tv = 0.5 * sum(abs(local[c] / len(part) - overall[c] / n) for c in overall)
        total += len(part) / n * tv
    return total


def test_dirichlet_is_complete_reproducible_and_skewed_by_alpha() -> None:
    labels = [c for _ in range(200) for c in "ABCDE"]
    n = len(labels)
    parts = partition_dirichlet(labels, clients=10, alpha=0.5, seed=0)
    assert _is_partition(parts, n) and sum(len(p) for p in parts) == n
    assert all(len(p) >= 1 for p in parts)
    assert parts == partition_dirichlet(labels, clients=10, alpha=0.5, seed=0)
    assert parts != partition_dirichlet(labels, clients=10, alpha=0.5, seed=1)
    skewed = [_skew(labels, partition_dirichlet(labels, 10, 0.1, seed)) for seed in range(3)]
    mixed = [_skew(labels, partition_dirichlet(labels, 10, 100.0, seed)) for seed in range(3)]
    assert min(skewed) > 0.4 and max(mixed) < 0.1


def test_dirichlet_min_size_is_repaired() -> None:
    labels = list("AB" * 15)
    for seed in range(5):
        parts = partition_dirichlet(labels, clients=6, alpha=0.01, seed=seed, min_size=4)
        assert _is_partition(parts, 30) and min(len(p) for p in parts) >= 4
        assert parts == partition_dirichlet(labels, clients=6, alpha=0.01, seed=seed, min_size=4)
    with pytest.raises(ValueError, match="at least"):
        partition_dirichlet(labels, clients=8, alpha=1.0, seed=0, min_size=4)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(labels, clients=2, alpha=0.0, seed=0)


def test_length_buckets() -> None:
    rows = [{"prompt": "x" * k} for k in [5, 1, 8, 3, 2, 7, 4, 6]]
    assert length_buckets(rows, k=4) == ["len2", "len0", "len3", "len1", "len0", "len3", "len1", "len2"]
    assert set(length_buckets([{"prompt": "same"}] * 5, k=4)) == {"len3"}  # ties share one bucket
    labels = length_buckets(rows, k=2)
    parts = partition_dirichlet(labels, clients=2, alpha=1.0, seed=0)
    assert _is_partition(parts, 8)


def test_per_client_sample() -> None:
    parts = per_client_sample(1000, clients=10, per_client=50, seed=0)
    assert [len(p) for p in parts] == [50] * 10
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == 500 and all(0 <= i < 1000 for i in flat) and all(p == sorted(p) for p in parts)
    assert parts == per_client_sample(1000, clients=10, per_client=50, seed=0)
    assert parts != per_client_sample(1000, clients=10, per_client=50, seed=1)
    ranged = per_client_sample(1000, clients=20, per_client=(10, 50), seed=3)
    assert all(10 <= len(p) <= 50 for p in ranged) and len({len(p) for p in ranged}) > 1
    assert len({i for p in ranged for i in p}) == sum(len(p) for p in ranged)
    with pytest.raises(ValueError, match="only 40"):
        per_client_sample(40, clients=5, per_client=10, seed=0)
