"""Emulated links: named profiles, bandwidth shaping with ``tc``, and a user-space relay for delay, jitter and
loss where the kernel has no ``netem`` (or in addition to it).

A link has a bandwidth each way, a round-trip time, a jitter and a loss rate.

* **Bandwidth**: ``tc`` ``tbf`` on each end's egress: the device's interface (upload) and the switch side of
  its veth (download). The kernel does this; nothing in user space is on the byte path for it.
* **Delay and jitter**: the kernel here lacks ``netem``, so a relay in the device's network namespace holds
  every chunk of bytes for a one-way delay of RTT/2 + U(-jitter/2, +jitter/2) in each direction (so the RTT
  spans RTT ± jitter, with mean RTT). A TCP byte stream cannot be reordered, so a chunk is never delivered
  before the one ahead of it. The relay is transparent: the device dials the server's real address, the
  relay answers it locally and forwards from the device's own address (see ``lesft.deploy.hosts``).
* **Loss**: TCP never loses bytes; loss shows up as time. The relay models it with two stated effects, as
  TCP with SACK (Linux's default) experiences random segment loss p:

  - *head-of-line delay*: each 1448-byte segment of a chunk is lost with probability p; a chunk with a loss
    is delivered one RTT late (fast retransmit), and the chunks behind it wait for it. A lost last segment
    costs real TCP more (a tail-loss probe, about 2 RTT, or a 200 ms retransmission timeout), so this is a
    lower bound on loss latency;
  - *throughput*: congestion control halves its window on each loss, which bounds a long transfer at
    MSS / RTT * 1.22 / sqrt(p) (Mathis et al., "The macroscopic behavior of the TCP congestion avoidance
    algorithm", CCR 1997). The relay paces each direction at min(bandwidth, that bound).

  ``loss_model = "arq"`` keeps the head-of-line delay and drops the throughput bound, for a link whose own
  layer 2 retransmits (as LTE's HARQ/RLC does) so TCP rarely sees the loss.

Where the kernel has ``netem`` (``tc qdisc add ... netem`` works), ``--netem kernel`` uses it for delay,
jitter and loss instead of the relay.

``python -m lesft.deploy.netem relay|sink|probe|profiles ...``: see ``main``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, replace

MSS = 1448  # TCP payload of a 1500-byte Ethernet frame with timestamps
CHUNK = 64 * 1024
MARK = 0x27  # SO_MARK of the relay's upstream sockets (routed past the local interception)


@dataclass(frozen=True)
class Profile:
    """One link, as the device sees it."""

    name: str
    down_mbit: float  # server -> device
    up_mbit: float  # device -> server
    rtt_ms: float
    jitter_ms: float = 0.0  # the RTT spans rtt_ms ± jitter_ms
    loss_pct: float = 0.0  # per 1448-byte segment, each direction
    loss_model: str = "tcp"  # "tcp": HOL delay + Mathis throughput bound; "arq": HOL delay only
    source: str = ""

    @property
    def needs_relay(self) -> bool:
        return self.rtt_ms > 0 or self.jitter_ms > 0 or self.loss_pct > 0

    def tcp_bound_mbit(self) -> float | None:
        """Mathis et al.'s bound on one TCP flow's throughput, MSS / RTT * 1.22 / sqrt(p); None without loss."""
        if self.loss_pct <= 0 or self.loss_model != "tcp" or self.rtt_ms <= 0:
            return None
        return MSS * 8 / (self.rtt_ms / 1e3) * 1.22 / math.sqrt(self.loss_pct / 100) / 1e6

    def expected_mbit(self, direction: str) -> float:
        """The throughput one long TCP transfer should reach: min(bandwidth, the loss bound)."""
        bw = self.down_mbit if direction == "down" else self.up_mbit
        bound = self.tcp_bound_mbit()
        return bw if bound is None else min(bw, bound)

    def describe(self) -> str:
        s = f"{self.name}: down {self.down_mbit:g} / up {self.up_mbit:g} Mbit/s, RTT {self.rtt_ms:g}"
        s += f" ± {self.jitter_ms:g} ms" if self.jitter_ms else " ms"
        if self.loss_pct:
            s += f", loss {self.loss_pct:g} %"
            b = self.tcp_bound_mbit()
            s += f" (TCP bound {b:.2f} Mbit/s)" if b is not None else f" ({self.loss_model})"
        return s


ISSUE = "issue 27's set (the common 4G/3G emulation numbers it names)"
WPT = ("for comparison, WebPageTest's connectivity.ini.sample: 'LTE' 12 Mbit/s, 70 ms RTT; '3G Fast' 1.6 Mbit/s "
       "down, 150 ms RTT; no jitter or loss")
PROFILES: dict[str, Profile] = {
    "lan": Profile("lan", 1000, 1000, 0.5, 0, 0,
                   source="switched Gigabit Ethernet, one segment: 1 Gbit/s nominal, RTT well under 1 ms "
                          "(our round numbers, no external source)"),
    "wifi": Profile("wifi", 50, 20, 10, 5, 0.1,
                    source="a home 802.11n/ac link a few metres from the access point (our round numbers, no "
                           "external source; measure yours and pass a custom spec)"),
    "4g": Profile("4g", 20, 20, 50, 10, 1.0, source=f"{ISSUE}; {WPT}"),
    "3g": Profile("3g", 2, 2, 100, 30, 3.0, source=f"{ISSUE}; {WPT}"),
}

_UNITS = {"gbit": 1e3, "mbit": 1.0, "kbit": 1e-3, "bit": 1e-6}


def _num(v: str, units: dict[str, float], default: float = 1.0) -> float:
    v = v.strip().lower()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if v.endswith(u):
            return float(v[: -len(u)]) * f
    return float(v) * default


def parse_profile(spec: str) -> Profile:
    """A profile name (``4g``), or a name followed by changes, or changes alone (a custom link from ``lan``):
    ``4g,loss=0``, ``bw=10mbit,rtt=40ms,jitter=5ms,loss=0.5%``, ``down=50mbit,up=5mbit,rtt=30``. Keys: ``bw``
    (both ways), ``down``, ``up`` (Mbit/s unless a unit: gbit, mbit, kbit), ``rtt``, ``jitter`` (ms unless
    ``s``), ``loss`` (percent), ``model`` (tcp or arq)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty link profile")
    if "=" not in parts[0]:
        name = parts.pop(0).lower()
        if name not in PROFILES:
            raise ValueError(f"unknown link profile {name!r}; known: {', '.join(PROFILES)} (or key=value changes)")
        prof = PROFILES[name]
    else:
        prof = replace(PROFILES["lan"], name="custom", source="custom")
    ms = {"ms": 1.0, "s": 1e3}
    changes: dict = {}
    for p in parts:
        if "=" not in p:
            raise ValueError(f"link profile {spec!r}: {p!r} is not key=value")
        k, v = (s.strip().lower() for s in p.split("=", 1))
        if k == "bw":
            changes["down_mbit"] = changes["up_mbit"] = _num(v, _UNITS)
        elif k in ("down", "up"):
            changes[f"{k}_mbit"] = _num(v, _UNITS)
        elif k in ("rtt", "jitter"):
            changes[f"{k}_ms"] = _num(v, ms)
        elif k == "loss":
            changes["loss_pct"] = float(v.rstrip("%"))
        elif k == "model":
            if v not in ("tcp", "arq"):
                raise ValueError(f"loss model {v!r}: tcp or arq")
            changes["loss_model"] = v
        else:
            raise ValueError(f"link profile {spec!r}: unknown key {k!r} (bw, down, up, rtt, jitter, loss, model)")
    if changes:
        label = prof.name if prof.name == "custom" else f"{prof.name}+"
        prof = replace(prof, name=label if prof.name != "custom" else "custom", **changes,
                       source=(prof.source if prof.name == "custom" else f"{prof.name} ({prof.source}), changed: "
                               + ", ".join(parts[-len(changes):])))
    if min(prof.down_mbit, prof.up_mbit) <= 0 or prof.rtt_ms < 0 or prof.jitter_ms < 0 or prof.jitter_ms > 2 * prof.rtt_ms \
            or not 0 <= prof.loss_pct < 50:
        raise ValueError(f"link profile {spec!r}: bandwidths > 0, rtt >= 0, 0 <= jitter <= 2 rtt, 0 <= loss < 50 %")
    return prof


# ---------------------------------------------------------------------------------------------- tc (bandwidth)

def tbf_args(mbit: float) -> list[str]:
    """``tc`` arguments of a token bucket at ``mbit`` Mbit/s: a burst of 5 ms of traffic (at least 16 KiB) and
    at most 100 ms of queue."""
    rate = mbit * 1e6
    burst = max(16 * 1024, int(rate / 8 * 0.005))
    return ["tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "latency", "100ms"]


def shape(netns: str, dev: str, mbit: float) -> list[str]:
    """Limit ``dev``'s egress in ``netns`` to ``mbit`` Mbit/s (tbf); returns the command run."""
    cmd = ["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", *tbf_args(mbit)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return cmd


def kernel_netem_available() -> bool:
    """Whether this kernel has the netem qdisc (tried on a throwaway namespace's loopback)."""
    ns = f"lesft-netem-probe-{random.randrange(1 << 30):x}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return False
    try:
        return subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def netem_args(p: Profile) -> list[str]:
    """Kernel netem for one direction: half the RTT, half the jitter, the loss (where the kernel has netem)."""
    args = ["netem", "delay", f"{p.rtt_ms / 2:g}ms"]
    if p.jitter_ms:
        args += [f"{p.jitter_ms / 2:g}ms"]
    if p.loss_pct:
        args += ["loss", f"{p.loss_pct:g}%"]
    return args


# ---------------------------------------------------------------------------------------------- the relay

class _Pipe:
    """One direction of one connection: delay, head-of-line loss delay, pacing; bounded buffer."""

    def __init__(self, prof: Profile, direction: str, rng: random.Random) -> None:
        self.prof, self.rng = prof, rng
        self.one_way = prof.rtt_ms / 2e3
        self.half_jitter = prof.jitter_ms / 2e3
        self.p = prof.loss_pct / 100
        bound = prof.tcp_bound_mbit()
        bw = prof.down_mbit if direction == "down" else prof.up_mbit
        # the kernel's tbf shapes the bandwidth; the relay paces only at the loss bound, when that is lower
        self.pace_bps = bound * 1e6 if bound is not None and bound < bw else None
        # enough buffer for the bytes in flight (bandwidth x the longest delay), plus slack
        self.limit = int(bw * 1e6 / 8 * (self.one_way + self.half_jitter + 2 * prof.rtt_ms / 1e3)) + 4 * CHUNK
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.last = 0.0
        self.next_free = 0.0
        self.more = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    def delay_for(self, n: int) -> float:
        d = self.one_way + (self.rng.uniform(-self.half_jitter, self.half_jitter) if self.half_jitter else 0.0)
        if self.p:
            segs = max(1, math.ceil(n / MSS))
            if self.rng.random() < 1 - (1 - self.p) ** segs:
                d += self.prof.rtt_ms / 1e3
        return max(0.0, d)

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.room.wait()
            data = await reader.read(CHUNK)
            now = loop.time()
            at = max(now + self.delay_for(len(data)), self.last) if data else self.last
            self.last = at
            self.queue.append((at, data))
            self.queued += len(data)
            if self.queued > self.limit:
                self.room.clear()
            self.more.set()
            if not data:
                return

    async def pump_out(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.more.clear()
                await self.more.wait()
            at, data = self.queue.popleft()
            if self.pace_bps and data:  # every byte at the bound, the first chunk's too: a flow held to the
                at = max(at, self.next_free) + len(data) * 8 / self.pace_bps  # bound's window (about bound x RTT)
                self.next_free = at  # sends a short message no faster than a long one
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            self.queued -= len(data)
            if self.queued <= self.limit:
                self.room.set()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _connect_upstream(target: tuple[str, int], source: str | None, mark: int | None):
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if source:
            s.bind((source, 0))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        await loop.sock_connect(s, target)
    except BaseException:
        s.close()
        raise
    return await asyncio.open_connection(sock=s)


async def serve_relay(forwards: list[tuple[tuple[str, int], tuple[str, int]]], prof: Profile,
                      source: str | None, mark: int | None, seed: int = 0, ready=None) -> None:
    """Relay each (listen, target) pair through the emulated link until cancelled."""
    rng = random.Random(seed)
    servers = []

    async def handle(target, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        _nodelay(cw)
        try:
            ur, uw = await _connect_upstream(target, source, mark)
        except OSError:
            cw.close()
            return
        up, down = _Pipe(prof, "up", rng), _Pipe(prof, "down", rng)
        tasks = [asyncio.ensure_future(t) for t in (up.pump_in(cr), up.pump_out(uw), down.pump_in(ur),
                                                   down.pump_out(cw))]
        try:
            # a connection ends when both directions have delivered their end of stream, or on any error
            pending = set(tasks)
            while not (tasks[1].done() and tasks[3].done()):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.exception() for t in done if not t.cancelled()):
                    raise ConnectionError
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (cw, uw):
                w.close()

    for listen, target in forwards:
        srv = await asyncio.start_server(lambda r, w, t=target: handle(t, r, w), listen[0], listen[1],
                                         reuse_address=True)
        servers.append(srv)
    if ready is not None:
        ready()
    await asyncio.gather(*(s.serve_forever() for s in servers))


# ---------------------------------------------------------------------------------------------- verification

async def _sink_client(reader, writer) -> None:
    _nodelay(writer)
    try:
        while True:
            op = await reader.readexactly(1)
            if op == b"p":
                writer.write(b"P")
            elif op in (b"u", b"d"):
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
                if op == b"u":
                    left = n
                    while left:
                        got = await reader.read(min(left, 1 << 20))
                        if not got:
                            raise ConnectionError("probe closed early")
                        left -= len(got)
                    writer.write(b"k")
                else:
                    block = b"\0" * (1 << 16)
                    left = n
                    while left:
                        writer.write(block[: min(left, len(block))])
                        left -= min(left, len(block))
                        await writer.drain()
            else:
                break
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_sink(listen: tuple[str, int], ready=None) -> None:
    srv = await asyncio.start_server(_sink_client, listen[0], listen[1], reuse_address=True)
    if ready is not None:
        ready()
    await srv.serve_forever()


def probe(target: tuple[str, int], pings: int = 20, up_bytes: int = 1 << 20, down_bytes: int = 1 << 20,
          timeout: float = 120.0) -> dict:
    """Measure the link to a sink: RTT of ``pings`` 1-byte round trips (one connection), then the time to
    send ``up_bytes`` until the sink acknowledges them, and to receive ``down_bytes``. Throughputs count the
    whole exchange, request and final round trip included."""
    s = socket.create_connection(target, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            s.sendall(b"p")
            if s.recv(1) != b"P":
                raise ConnectionError("sink answered wrongly")
            rtts.append((time.perf_counter() - t) * 1e3)
        out = {"rtt_ms": {"median": statistics.median(rtts), "mean": statistics.fmean(rtts), "min": min(rtts),
                          "max": max(rtts), "n": len(rtts)}}
        payload = b"\0" * (1 << 16)
        if up_bytes:
            t = time.perf_counter()
            s.sendall(b"u" + struct.pack("!Q", up_bytes))
            left = up_bytes
            while left:
                k = min(left, len(payload))
                s.sendall(payload[:k])
                left -= k
            if s.recv(1) != b"k":
                raise ConnectionError("sink did not acknowledge the upload")
            out["up_mbit"] = up_bytes * 8 / (time.perf_counter() - t) / 1e6
        if down_bytes:
            t = time.perf_counter()
            s.sendall(b"d" + struct.pack("!Q", down_bytes))
            left = down_bytes
            while left:
                got = s.recv(min(left, 1 << 20))
                if not got:
                    raise ConnectionError("sink closed early")
                left -= len(got)
            out["down_mbit"] = down_bytes * 8 / (time.perf_counter() - t) / 1e6
        out["up_bytes"], out["down_bytes"] = up_bytes, down_bytes
        return out
    finally:
        s.close()


def probe_bytes(prof: Profile, seconds: float) -> tuple[int, int]:
    """Transfer sizes that take about ``seconds`` at the profile's expected throughput (at least 64 KiB)."""
    return tuple(max(1 << 16, int(prof.expected_mbit(d) * 1e6 / 8 * seconds)) for d in ("up", "down"))


def compare(prof: Profile, measured: dict) -> str:
    """One line: the measured RTT and throughputs next to the profile's numbers."""
    r = measured["rtt_ms"]
    want_rtt = f"{prof.rtt_ms:g} ± {prof.jitter_ms:g}" if prof.jitter_ms else f"{prof.rtt_ms:g}"
    s = (f"{prof.name}: RTT median {r['median']:.1f} ms (min {r['min']:.1f}, max {r['max']:.1f}; profile "
         f"{want_rtt} ms)")
    for d in ("up", "down"):
        if f"{d}_mbit" in measured:
            bw = prof.up_mbit if d == "up" else prof.down_mbit
            exp = prof.expected_mbit(d)
            extra = f", expected {exp:.2f} with loss" if abs(exp - bw) > 1e-9 else ""
            s += f"; {d} {measured[f'{d}_mbit']:.2f} Mbit/s (profile {bw:g}{extra})"
    return s


# ---------------------------------------------------------------------------------------------- CLI

def _addr(s: str) -> tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lesft.deploy.netem", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="relay TCP through an emulated link (run it on the device's side)")
    r.add_argument("--profile", required=True, help="a profile name or spec (see `profiles`)")
    r.add_argument("--forward", action="append", required=True, metavar="LISTEN[=TARGET]",
                   help="HOST:PORT to listen on, and where to forward (default: the same address: transparent "
                        "mode, for a namespace that answers the server's address locally)")
    r.add_argument("--source", help="source address of the forwarded connections (the device's own)")
    r.add_argument("--mark", type=lambda v: int(v, 0), default=None,
                   help=f"SO_MARK of the forwarded connections (transparent mode routes marked ones out; {MARK:#x})")
    r.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("sink", help="answer probes (run it on the server's side)")
    k.add_argument("--listen", required=True)
    p = sub.add_parser("probe", help="measure RTT and throughput to a sink through the link")
    p.add_argument("--to", required=True)
    p.add_argument("--profile", help="print the measurement next to this profile's numbers")
    p.add_argument("--seconds", type=float, default=2.0, help="transfer time per direction at the expected rate")
    p.add_argument("--pings", type=int, default=20)
    sub.add_parser("profiles", help="list the named profiles and their sources")
    a = ap.parse_args(argv)
    if a.cmd == "profiles":
        for prof in PROFILES.values():
            print(prof.describe())
            print(f"    source: {prof.source}")
        return 0
    if a.cmd == "relay":
        prof = parse_profile(a.profile)
        fw = []
        for f in a.forward:
            listen, _, target = f.partition("=")
            fw.append((_addr(listen), _addr(target or listen)))
        print(f"relay: {prof.describe()}; " + ", ".join(f"{l[0]}:{l[1]} -> {t[0]}:{t[1]}" for l, t in fw),
              flush=True)
        try:
            asyncio.run(serve_relay(fw, prof, a.source, a.mark, a.seed,
                                    ready=lambda: print("relay: ready", flush=True)))
        except KeyboardInterrupt:
            pass
        return 0
    if a.cmd == "sink":
        try:
            asyncio.run(serve_sink(_addr(a.listen), ready=lambda: print("sink: ready", flush=True)))
        except KeyboardInterrupt:
            pass
        return 0
    prof = parse_profile(a.profile) if a.profile else None
    up, down = probe_bytes(prof, a.seconds) if prof else (1 << 20, 1 << 20)
    m = probe(_addr(a.to), a.pings, up, down)
    if prof is not None:
        m["profile"] = asdict(prof)
        m["summary"] = compare(prof, m)
    print(json.dumps(m), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
