"""Timing helpers shared by the bench scripts: medians, and re-taking rounds that a busy neighbour
disturbed (on 2 cores with 2 torch threads, one busy neighbour core slows a round many times over)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

HZ = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- helpers


def _busy_jiffies() -> int:
    """CPU time (all cores, all processes) spent not idle, from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def _self_jiffies() -> int:
    with open("/proc/self/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime of all threads


BUSY = 0.15  # other processes using more than this many cores' worth of CPU = a disturbed measurement


def _foreign(b0: int, s0: int, seconds: float) -> float:
    """CPU used by other processes since (b0, s0), in cores (1.0 = one core busy the whole time)."""
    return max(0, (_busy_jiffies() - b0) - (_self_jiffies() - s0)) / HZ / seconds


def wait_quiet(max_wait: float, window: float = 0.5) -> None:
    """Wait (at most ``max_wait`` s) for a ``window`` in which other processes leave the CPU alone."""
    end = time.perf_counter() + max_wait
    while time.perf_counter() < end:
        b0, s0 = _busy_jiffies(), _self_jiffies()
        time.sleep(window)
        if _foreign(b0, s0, window) <= BUSY:
            return


def timed(fn, retries: int = 0, *, prepare=None, snap=None, deadline: float = float("inf"),
          quiet_wait: float = 0.0) -> tuple[float, float, int, list[float]]:
    """Time one call of ``fn``. Returns (seconds, foreign, retries used, deltas of ``snap()`` over the call).

    ``foreign`` is the CPU other processes used during the call, in cores. Above ``BUSY`` (a busy
    neighbour: with 2 cores and 2 torch threads it can slow a round many times over) the call is
    re-taken, at most ``retries`` times and not after ``deadline`` (perf_counter); the last attempt is
    kept. Before each attempt: ``prepare()`` (untimed), then up to ``quiet_wait`` s waiting for a quiet CPU."""
    for attempt in range(retries + 1):
        if prepare is not None:
            prepare()
        if quiet_wait > 0 and time.perf_counter() < deadline:
            wait_quiet(min(quiet_wait, deadline - time.perf_counter()))
        m0 = snap() if snap is not None else ()
        b0, s0 = _busy_jiffies(), _self_jiffies()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        foreign = _foreign(b0, s0, dt)
        m1 = snap() if snap is not None else ()
        if foreign <= BUSY or time.perf_counter() > deadline:
            break
    return dt, foreign, attempt, [y - x for x, y in zip(m0, m1)]


def disturbed(foreign: list[float]) -> int:
    """How many of the kept measurements other processes disturbed."""
    return sum(f > BUSY for f in foreign)


def rotated(items, rep: int) -> list:
    """``items`` rotated left by ``rep``: the order of repetition ``rep`` of an interleaved timing, so that
    every item takes every position in turn (slow drift and a busy neighbour hit all alike)."""
    items = list(items)
    k = rep % len(items)
    return items[k:] + items[:k]


@dataclass
class Interleaved:
    """What :func:`interleaved` measured, per key, in the order the repetitions ran."""
    wall: dict      # key -> seconds per kept call
    foreign: dict   # key -> other processes' CPU during it, in cores
    deltas: dict    # key -> snap(key) deltas over each kept call
    retried: int = 0  # re-takes of disturbed calls, all keys together


def interleaved(fns: dict, reps: int, retries: int = 0, *, prepare=None, before=None, after=None, snap=None,
                deadline: float = float("inf"), quiet_wait: float = 0.0) -> Interleaved:
    """Time ``fns[key]()`` ``reps`` times per key, the keys in :func:`rotated` order each repetition, each
    call through :func:`timed`. ``prepare(key)`` runs before every attempt (untimed), ``before(key)`` and
    ``after(key)`` once around a key's timed call (e.g. to reset its counters, then read them), ``snap(key)``
    gives the counters whose deltas over the call are kept."""
    out = Interleaved({k: [] for k in fns}, {k: [] for k in fns}, {k: [] for k in fns})
    for rep in range(reps):
        for k in rotated(fns, rep):
            if before is not None:
                before(k)
            dt, fo, tries, d = timed(fns[k], retries, prepare=None if prepare is None else lambda k=k: prepare(k),
                                     snap=None if snap is None else lambda k=k: snap(k), deadline=deadline,
                                     quiet_wait=quiet_wait)
            out.wall[k].append(dt)
            out.foreign[k].append(fo)
            out.deltas[k].append(d)
            out.retried += tries
            if after is not None:
                after(k)
    return out


BUSY_NOTE = "  -- UNRELIABLE: the machine was busy (see 'disturbed'); rerun on an idle machine"


def verdict(claim: str, ok: bool, unreliable: bool = False) -> str:
    """The line a bench prints for one target: ``PASS/FAIL  <claim>: PASS`` (or FAIL), marked when the
    measurement behind it was disturbed by other processes."""
    return f"PASS/FAIL  {claim}: {'PASS' if ok else 'FAIL'}{BUSY_NOTE if unreliable else ''}"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def parse_with_timing_args(ap: argparse.ArgumentParser, retries: int, retry_budget: float) -> argparse.Namespace:
    """Add the flags every bench shares (re-takes, quiet wait, threads, --json), parse, apply --threads."""
    ap.add_argument("--retries", type=int, default=retries, help="re-takes of a round disturbed by other processes")
    ap.add_argument("--retry-budget", type=float, default=retry_budget,
                    help="no re-takes (and no waiting for a quiet CPU) once the bench has run this many seconds")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each timed round, wait up to this many seconds for other processes to idle")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
