"""Splitting a training set across federated clients.

* :func:`partition_iid`: a seeded shuffle cut into near-equal contiguous parts.
* :func:`partition_dirichlet`: non-IID label skew, each label's rows spread over the clients by
  proportions drawn from ``Dirichlet(alpha)`` (small ``alpha`` = strong skew). Labels are the answer
  letters for multiple choice; for numeric tasks use :func:`length_buckets` (problem-length quantiles).
* :func:`per_client_sample`: disjoint few-shot samples, the paper's 10..50 rows per client.

Each function returns one sorted list of row indices per client and is fully determined by its arguments.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import numpy as np

__all__ = ["length_buckets", "partition_dirichlet", "partition_iid", "per_client_sample"]

_DIRICHLET_ATTEMPTS = 100  # redraws before the size constraint is repaired by moving indices


def _check_clients(clients: int) -> None:
    if not isinstance(clients, int) or isinstance(clients, bool) or clients < 1:
        raise ValueError(f"clients must be an int >= 1, got {clients!r}")


def partition_iid(n: int, clients: int, seed: int) -> list[list[int]]:
    """IID partition of ``range(n)``: ``random.Random(seed).shuffle``, then ``clients`` contiguous chunks,
    the first ``n % clients`` one larger, each sorted."""
    _check_clients(clients)
    if n < clients:
        raise ValueError(f"{n} samples cannot be split across {clients} clients")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    size, extra = divmod(n, clients)
    parts, start = [], 0
    for i in range(clients):
        end = start + size + (1 if i < extra else 0)
        parts.append(sorted(order[start:end]))
        start = end
    return parts


def partition_dirichlet(
    labels: Sequence[str], clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Non-IID partition of ``range(len(labels))`` by label skew.

    For each distinct label (in sorted order) its indices are shuffled and cut into ``clients`` pieces with
    proportions ``p ~ Dirichlet(alpha, ..., alpha)`` (``numpy.random.default_rng(seed)``). Every index goes
    to exactly one client. If a client ends up with fewer than ``min_size`` indices the whole draw is
    repeated (up to 100 times, continuing the same generator); if that never succeeds, indices are moved one
    at a time, each drawn at random from the currently largest client, to the smallest client until all
    have ``min_size``. Small ``alpha`` (e.g. 0.1) gives clients few labels each; large ``alpha`` (e.g. 100)
    approaches the IID label mix.
    """
    _check_clients(clients)
    n = len(labels)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if n < clients * min_size:
        raise ValueError(f"{n} samples cannot give {clients} clients at least {min_size} each")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    classes = sorted(by_label)

    parts: list[list[int]] = []
    for _ in range(_DIRICHLET_ATTEMPTS):
        parts = [[] for _ in range(clients)]
        for c in classes:
            idx = np.array(by_label[c])
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in piece)
        if min(len(part) for part in parts) >= min_size:
            break
    else:
        while True:
            sizes = [len(part) for part in parts]
            small = int(np.argmin(sizes))
            if sizes[small] >= min_size:
                break
            big = int(np.argmax(sizes))
            parts[small].append(parts[big].pop(int(rng.integers(len(parts[big])))))
    return [sorted(part) for part in parts]


def length_buckets(rows: Sequence[dict[str, str]], k: int = 4, key: str = "prompt") -> list[str]:
    """A label per row for :func:`partition_dirichlet` on numeric tasks: the ``k``-quantile of the row's
    ``key`` text length in characters, ``"len0"`` (shortest) .. ``"len{k-1}"``. Rows of equal length share
    a bucket, so with many ties some buckets can be larger than ``len(rows) / k`` (or empty)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    lengths = [len(r[key]) for r in rows]
    ordered = sorted(lengths)
    n = len(ordered)
    thresholds = [ordered[(j * n) // k] for j in range(1, k)] if n else []
    return [f"len{bisect.bisect_right(thresholds, x)}" for x in lengths]


def per_client_sample(
    n_rows: int, clients: int, per_client: int | tuple[int, int], seed: int
) -> list[list[int]]:
    """Disjoint few-shot samples of ``range(n_rows)``: ``per_client`` indices for each client (or, given a
    ``(lo, hi)`` pair, a size drawn uniformly from ``[lo, hi]`` per client), drawn with
    ``random.Random(seed)`` without replacement across all clients; each list sorted. Unlike the
    partitions, indices not drawn belong to no client."""
    _check_clients(clients)
    rng = random.Random(seed)
    if isinstance(per_client, tuple):
        lo, hi = per_client
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"per_client range must be (lo, hi) with 1 <= lo <= hi, got {per_client!r}")
        sizes = [rng.randint(lo, hi) for _ in range(clients)]
    else:
        if not isinstance(per_client, int) or isinstance(per_client, bool) or per_client < 1:
            raise ValueError(f"per_client must be an int >= 1, got {per_client!r}")
        sizes = [per_client] * clients
    total = sum(sizes)
    if total > n_rows:
        raise ValueError(f"{clients} clients x {per_client} samples need {total} rows, only {n_rows} available")
    drawn = rng.sample(range(n_rows), total)
    parts, start = [], 0
    for size in sizes:
        parts.append(sorted(drawn[start:start + size]))
        start += size
    return parts
