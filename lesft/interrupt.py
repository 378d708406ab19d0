"""Ctrl-C that loses no finished work: the first SIGINT lets the round in flight finish (the caller then
writes a checkpoint and raises :class:`Interrupted`, whose message is the command that resumes); a second
SIGINT stops at once."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C after a checkpoint was written; ``str()`` says where and how to resume."""


class StopFlag:
    """Set by the first Ctrl-C inside :func:`finish_round_on_sigint`."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def finish_round_on_sigint() -> Iterator[StopFlag]:
    """While inside, the first SIGINT only sets the yielded flag; a second raises KeyboardInterrupt. Outside
    the main thread (no signal handlers there) the flag is never set."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame) -> None:
        if flag.requested:
            raise KeyboardInterrupt("stopped at once (second Ctrl-C); the rounds since the last checkpoint are lost")
        flag.requested = True
        print("\nlesft: Ctrl-C: finishing the round in flight, then writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)
