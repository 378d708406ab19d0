"""Start processes so that none outlives its owner: zombies, detached grandchildren and namespaces included.

Three things leak processes when a script starts daemons (Flower's SuperLink and SuperNode among them):

* a party that starts its own helpers in a new session (the SuperLink starts ``flower-superexec`` with
  ``start_new_session``), out of reach of a kill of the party's process group;
* orphans: a helper whose parent died is re-parented to PID 1, and a PID 1 that does not reap (a container's
  or a micro-VM's init) keeps every one of them as a zombie for good;
* a plain ``kill $pid`` of a backgrounded shell job, which leaves the job's own children running.

:class:`Supervisor` answers all three: it makes its process a *child subreaper*
(``prctl(PR_SET_CHILD_SUBREAPER)``), so every orphan among its descendants is re-parented to it, not to PID 1;
it starts each party in its own process group and stops a party by signalling the whole group; at the end it
kills every process still below it (walking ``/proc``) and every process inside the network namespaces it was
given (``ip netns pids``), then reaps them all.

``python -m lesft.deploy.procs -- CMD ...`` runs one command that way (``deploy/flower/run_local.sh`` re-runs
itself under it): SIGINT/SIGTERM are passed on to the command's process group, and when the command ends,
whatever it left behind is killed and reaped. The exit status is the command's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux >= 3.4); False where that fails."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        # the command name (2nd field) may hold spaces and parentheses: split after the last ')'
        rest = stat[stat.rfind(")") + 2:].split()
        out[int(d)] = int(rest[1])
    return out


def descendants(root: int | None = None) -> list[int]:
    """Every process below ``root`` (default: this one), zombies included, deepest first."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    order, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        order.append(pid)
        stack.extend(children.get(pid, []))
    return order[::-1]


def netns_pids(ns: str) -> list[int]:
    """The processes inside network namespace ``ns`` (``ip netns pids``); [] when it does not exist."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap() -> list[tuple[int, int]]:
    """Collect every exited child without blocking: [(pid, status)]."""
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, status))


@dataclass
class Party:
    name: str
    proc: subprocess.Popen
    log: Path | None
    netns: str | None = None
    started: float = field(default_factory=time.time)
    expected_exit: bool = False  # stopped on purpose (not a failure)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Supervisor:
    """Owns every process it starts, each in its own process group, and all their descendants."""

    def __init__(self, netns: Sequence[str] = ()) -> None:
        self.subreaper = become_subreaper()
        self.parties: dict[str, Party] = {}
        self.netns = list(netns)
        self._logs: list[IO] = []

    def start(self, name: str, argv: Sequence[str], log: Path | None = None, netns: str | None = None,
              env: dict[str, str] | None = None, cwd: str | Path | None = None, inherit: bool = False) -> Party:
        """Start ``argv`` (inside ``netns`` when given) in a new session and process group; stdout and
        stderr to ``log`` (or this process's with ``inherit``, else nowhere)."""
        if name in self.parties and self.parties[name].proc.poll() is None:
            raise ValueError(f"party {name!r} is already running")
        cmd = (["ip", "netns", "exec", netns] if netns else []) + [str(a) for a in argv]
        out: IO | int | None = None if inherit else subprocess.DEVNULL
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = log.open("ab")
            self._logs.append(out)
        proc = subprocess.Popen(cmd, stdin=None if inherit else subprocess.DEVNULL, stdout=out,
                                stderr=None if inherit else subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=cwd, preexec_fn=_default_signals)
        party = Party(name, proc, log, netns)
        self.parties[name] = party
        return party

    def exited(self) -> dict[str, int]:
        """{name: return code} of the parties that have ended."""
        return {n: p.proc.returncode for n, p in self.parties.items() if p.proc.poll() is not None}

    def stop(self, name: str, grace: float = 5.0) -> int | None:
        """SIGTERM the party's process group, SIGKILL it after ``grace`` s; its return code."""
        p = self.parties[name]
        p.expected_exit = True
        self._stop_group(p, grace)
        return p.proc.returncode

    def _stop_group(self, p: Party, grace: float) -> None:
        try:
            pgid = os.getpgid(p.pid)
        except ProcessLookupError:
            pgid = p.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def shutdown(self, grace: float = 5.0) -> list[int]:
        """Stop every party (SIGTERM to each group, then SIGKILL), then kill what is left below this process
        and inside the namespaces, and reap everything. Returns the pids that had to be killed after the
        parties' groups were gone (their helpers in other sessions, orphans)."""
        running = [p for p in self.parties.values() if p.proc.poll() is None]
        for p in running:
            p.expected_exit = True
            try:
                os.killpg(os.getpgid(p.pid), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(p.proc.poll() is None for p in running):
            time.sleep(0.1)
        for p in running:
            if p.proc.poll() is None:
                self._stop_group(p, 0.0)
        leftovers = self.kill_leftovers(grace=min(grace, 2.0))
        for f in self._logs:
            f.close()
        self._logs.clear()
        return leftovers

    def kill_leftovers(self, grace: float = 2.0) -> list[int]:
        """SIGTERM, then SIGKILL, every process below this one and in the namespaces; reap them."""
        me = os.getpid()

        def alive() -> list[int]:
            pids = set(descendants(me))
            for ns in self.netns:
                pids.update(netns_pids(ns))
            pids.discard(me)
            return [p for p in pids if not _is_zombie(p)]

        first = alive()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = alive()
            if not pids:
                break
            for pid in pids:
                _signal(pid, sig)
            deadline = time.time() + (grace if sig == signal.SIGTERM else 5.0)
            while time.time() < deadline and alive():
                reap()
                time.sleep(0.05)
        # zombies below us are ours to reap (as parent or subreaper)
        deadline = time.time() + 5.0
        while time.time() < deadline:
            reap()
            if not descendants(me):
                break
            time.sleep(0.05)
        for p in self.parties.values():
            p.proc.poll()
        return first


def _default_signals() -> None:
    """In the child, before exec: a party must be stoppable by SIGINT/SIGTERM/SIGHUP even when this process
    was started with them ignored (a background job of a non-interactive shell ignores SIGINT, and exec keeps
    ignored signals ignored; bash cannot even trap a signal ignored on entry)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X")


def run_guarded(argv: Sequence[str]) -> int:
    """Run ``argv`` in its own process group under a subreaper; pass SIGINT/SIGTERM/SIGHUP on to the group;
    when it ends, kill and reap whatever it left. Returns its exit status (128 + signal if signalled)."""
    sup = Supervisor()
    party = sup.start("cmd", argv, inherit=True)
    # the command runs in its own process group, so a terminal's Ctrl-C reaches only us: pass it on
    got: list[int] = []

    def forward(sig, _frame):
        got.append(sig)
        try:
            os.killpg(party.pid, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            rc = party.proc.wait()
            break
        except InterruptedError:
            continue
    left = sup.kill_leftovers()
    if left:
        print(f"lesft.deploy.procs: killed {len(left)} process(es) left behind by {argv[0]}: {left}",
              file=sys.stderr, flush=True)
    return rc if rc >= 0 else 128 - rc


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m lesft.deploy.procs -- CMD [ARGS...]", file=sys.stderr)
        return 2
    return run_guarded(args)


if __name__ == "__main__":
    sys.exit(main())
