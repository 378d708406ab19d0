"""Admission control of the split server: each client's open calls and bytes in flight, and giving memory back
after a large call that failed."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from collections import defaultdict
from typing import Callable, Iterator

import grpc

from lesft.deploy.checks import ServiceError
from lesft.units import MB

TRIM_BYTES = 16 * MB  # a refused or cancelled call that had received this much hands freed memory back


def release_memory() -> None:
    """Give the allocator's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere). Without it
    the chunks of a large message that was cut off stay in the C allocator's per-thread arenas: freed, reusable
    by this process, but still resident (measured: bench/bench_cancel.py)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Admission:
    """Per-client caps: open calls (``max_streams``) and bytes held by calls still receiving (``max_bytes``)."""

    def __init__(self, max_streams: int, max_bytes: int) -> None:
        self.max_streams, self.max_bytes = max_streams, max_bytes
        self.lock = threading.Lock()
        self.streams: dict[int, int] = defaultdict(int)
        self.bytes: dict[int, int] = defaultdict(int)
        self.dropped: dict[int, int] = {}  # bytes received by a client's last call that failed

    def trim_after_failure(self, cid: int) -> None:
        """If client ``cid``'s last call failed holding >= TRIM_BYTES, give the freed memory back (call it after
        the exception is handled: until then its traceback keeps the received buffer alive)."""
        with self.lock:
            held = self.dropped.pop(cid, 0)
        if held >= TRIM_BYTES:
            release_memory()

    @contextlib.contextmanager
    def enter(self, cid: int) -> Iterator[Callable[[int], None]]:
        """One call of client ``cid``; yields ``take(n)``, which reserves ``n`` more received bytes."""
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        with self.lock:
            if self.streams[cid] >= self.max_streams:
                raise ServiceError(exhausted, f"client {cid} already has {self.streams[cid]} calls open "
                                              f"(--max_streams {self.max_streams})")
            self.streams[cid] += 1
        held = 0

        def take(n: int) -> None:
            nonlocal held
            with self.lock:
                if self.bytes[cid] + n > self.max_bytes:
                    raise ServiceError(exhausted, f"client {cid} has {self.bytes[cid] / MB:.1f} MiB in flight "
                                                  f"(--max_inflight_mb {self.max_bytes / MB:g})")
                self.bytes[cid] += n
                held += n

        ok = False
        try:
            yield take
            ok = True
        finally:
            with self.lock:
                self.streams[cid] -= 1
                self.bytes[cid] -= held
                if not ok:
                    self.dropped[cid] = held  # the caller trims once the exception (and its buffers) is gone
