"""A whole deployment on one Linux machine, each party on its own host: one network namespace per party, its
own IP, all joined by a bridge; TLS and authentication everywhere; each device's link shaped by a profile.

    python -m lesft.deploy.hosts run CONFIG --out DIR [--link 4g | --link 0=4g,1=wifi | --link 'bw=5mbit,rtt=80']
    deploy/netns/run.sh CONFIG [DIR] [--link 4g ...]                     # the same
    python -m lesft.deploy.hosts clean                                    # namespaces left by a killed run

The hosts (``10.77.0.0/24`` on a bridge that lives in its own namespace, so nothing touches the root one):

| host | address | runs |
| --- | --- | --- |
| ``split`` | 10.77.0.2 | ``lesft server`` on :50051, TLS (its certificate's SAN is its IP), a token per client |
| ``agg`` | 10.77.0.3 | ``flower-superlink`` on :9093 with TLS and SuperNode authentication; ``flwr run`` |
| | | (a method that never aggregates, such as ``sl``, has no ``agg``: each device runs ``lesft client``) |
| ``dev<i>`` | 10.77.0.(10+i) | ``flower-supernode`` (its own key, registered with ``flwr supernode register``), |
| | | ``lesft device`` (keeps the model loaded; the ClientApp Flower starts per message hands it |
| | | each round), its own rows, token and CA; the link relay when the link has delay |

Every party's log goes to ``DIR/logs/``, every host's files (its certificates, keys, data, outputs) to
``DIR/hosts/<host>/``, and ``DIR/report.json`` says how each party ended, what the link checks measured, and
where the aggregated adapter is. The run stops every process it started and deletes its namespaces after
success, after a party fails and on SIGINT/SIGTERM (see ``lesft.deploy.procs``). The split server and the
SuperLink are essential: if either dies, the run stops. A device that dies is reported, and the others go on
(the split server times it out after ``--step-timeout-s``; Flower aggregates the replies it got after
``--round-timeout-s``); the run then exits 1.

Needs root, ``ip`` (iproute2), ``tc``, ``openssl`` and lesft with the flower extra in this Python's
environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lesft.deploy import certs, netem
from lesft.deploy.procs import Supervisor, netns_pids

SUBNET = "10.77.0"
SPLIT_IP, AGG_IP = f"{SUBNET}.2", f"{SUBNET}.3"
SPLIT_PORT, LINK_PORT, SINK_PORT = 50051, 9093, 50999
NS_PREFIX = "lesft-"
REPO = Path(__file__).resolve().parents[2]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived."""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def requirements() -> str | None:
    """Why this machine cannot run a namespaced deployment, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc", "openssl"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    ns = f"{NS_PREFIX}check-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return None


@dataclass
class Host:
    name: str
    ip: str
    ns: str
    port: str  # the switch side of its veth
    profile: netem.Profile | None = None


@dataclass
class Topology:
    """Namespaces ``<prefix>-<host>`` and a switch namespace with the bridge; nothing in the root namespace."""

    prefix: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

    def namespaces(self) -> list[str]:
        return [self.switch] + [h.ns for h in self.hosts.values()]

    def add(self, name: str, ip: str) -> Host:
        h = Host(name, ip, f"{self.prefix}-{name}", f"p{len(self.hosts)}")
        self.hosts[name] = h
        return h

    def up(self) -> None:
        subprocess.run(["ip", "netns", "add", self.switch], check=True, capture_output=True)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for h in self.hosts.values():
            subprocess.run(["ip", "netns", "add", h.ns], check=True, capture_output=True)
            # created inside the switch namespace, the peer inside the host's: never in the root namespace
            _ip("link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.ns, ns=self.switch)
            _ip("link", "set", h.port, "master", "br0", "up", ns=self.switch)
            _ip("link", "set", "lo", "up", ns=h.ns)
            _ip("addr", "add", f"{h.ip}/24", "dev", "eth0", ns=h.ns)
            _ip("link", "set", "eth0", "up", ns=h.ns)

    def intercept(self, h: Host, addresses: list[str]) -> None:
        """Let a relay inside ``h`` answer connections to ``addresses`` (the servers' real IPs) and forward
        them, marked, from ``h``'s own address: the servers' IPs go on ``h``'s loopback; marked packets are
        routed out by a rule placed before the local table; ARP never answers for the borrowed addresses, and
        replies from them are accepted (accept_local)."""
        for a in addresses:
            _ip("addr", "add", f"{a}/32", "dev", "lo", ns=h.ns)
        subprocess.run(["ip", "netns", "exec", h.ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=1",
                        "net.ipv4.conf.all.arp_announce=2", "net.ipv4.conf.all.rp_filter=0",
                        "net.ipv4.conf.eth0.rp_filter=0", "net.ipv4.conf.eth0.accept_local=1"],
                       check=True, capture_output=True)
        _ip("route", "add", f"{SUBNET}.0/24", "dev", "eth0", "src", h.ip, "table", "127", ns=h.ns)
        _ip("rule", "add", "pref", "10", "fwmark", hex(netem.MARK), "lookup", "127", ns=h.ns)
        _ip("rule", "add", "pref", "200", "lookup", "local", ns=h.ns)
        _ip("rule", "del", "pref", "0", ns=h.ns)

    def shape(self, h: Host, prof: netem.Profile) -> list[list[str]]:
        """Bandwidth each way: tbf on the host's egress (upload) and on the switch port's egress (download)."""
        return [netem.shape(h.ns, "eth0", prof.up_mbit), netem.shape(self.switch, h.port, prof.down_mbit)]

    def down(self) -> list[str]:
        """Delete the namespaces (their veths and the bridge go with them); returns those that would not go."""
        left = []
        for ns in self.namespaces():
            if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode != 0 \
                    and ns in list_namespaces():
                left.append(ns)
        return left


def list_namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]


def clean(prefix: str = NS_PREFIX) -> list[str]:
    """Kill every process inside namespaces named ``prefix*`` and delete them (after a run was SIGKILLed)."""
    gone = []
    for ns in list_namespaces():
        if not ns.startswith(prefix):
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in netns_pids(ns):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        gone.append(ns)
    return gone


def parse_links(specs: list[str], clients: int) -> dict[int, netem.Profile | None]:
    """``--link`` values: ``4g`` (every device), ``1=3g`` (device 1), ``none``; later ones win."""
    links: dict[int, netem.Profile | None] = {i: None for i in range(clients)}
    for spec in specs:
        m = re.fullmatch(r"(\d+(?:,\d+)*)=(.+)", spec.strip())
        ids, prof = ([int(x) for x in m.group(1).split(",")], m.group(2)) if m else (list(range(clients)), spec)
        for i in ids:
            if not 0 <= i < clients:
                raise ValueError(f"--link {spec}: no device {i} among {clients}")
            links[i] = None if prof.strip().lower() == "none" else netem.parse_profile(prof)
    return links


def _bin(name: str) -> str:
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def _toml_str(s: str) -> str:
    return json.dumps(str(s))


class Deployment:
    """One run: hosts up, credentials, link checks, parties, teardown. ``run()`` returns the exit status."""

    def __init__(self, config: Path, out: Path, links: list[str], verify_s: float = 2.0,
                 step_timeout_s: float = 120.0, round_timeout_s: float = 3600.0, min_clients: int = 0,
                 timeout_s: float = 0.0, verbose: bool = True, worker: bool = True,
                 client_certs: bool = False) -> None:
        import yaml

        from lesft import methods
        from lesft.config import TrainConfig
        from lesft.typed import from_dict, load_yaml

        self.config_path = config.resolve()
        self.out = out.resolve()
        raw = load_yaml(str(self.config_path))
        self.cfg = methods.resolve(from_dict(TrainConfig, raw))
        if not self.cfg.split:
            raise ValueError(f"method {self.cfg.method!r} does not split the model: no split server to deploy")
        self.flower = bool(self.cfg.aggregate_every)  # without aggregation (sl): devices run `lesft client`
        self.n = int(self.cfg.clients)
        self.links = parse_links(links, self.n)
        self.verify_s, self.step_timeout_s = verify_s, step_timeout_s
        self.round_timeout_s, self.min_clients, self.timeout_s = round_timeout_s, min_clients, timeout_s
        self.verbose, self.worker, self.client_certs = verbose, worker, client_certs
        self.yaml = yaml
        self.topo = Topology(f"{NS_PREFIX}{secrets.token_hex(3)}")
        self.topo.add("split", SPLIT_IP)
        if self.flower:
            self.topo.add("agg", AGG_IP)
        for i in range(self.n):
            self.topo.add(f"dev{i}", f"{SUBNET}.{10 + i}").profile = self.links[i]
        self.sup: Supervisor | None = None
        self.report: dict = {"config": str(self.config_path), "out": str(self.out), "clients": self.n,
                             "namespaces": self.topo.namespaces(), "parties": {}, "failures": []}
        self._t0 = time.time()

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        line = f"[hosts {time.time() - self._t0:6.1f}s] {msg}"
        if self.verbose:
            print(line, flush=True)
        with (self.out / "logs" / "hosts.log").open("a") as fh:
            fh.write(line + "\n")

    def hdir(self, name: str) -> Path:
        d = self.out / "hosts" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def env(self, host: str) -> dict[str, str]:
        e = dict(os.environ)
        e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '/usr/bin:/bin')}"
        e.update(OMP_NUM_THREADS=e.get("OMP_NUM_THREADS", "1"), FLWR_TELEMETRY_ENABLED="0",
                 FLWR_DISABLE_UPDATE_CHECK="1", FLWR_HOME=str(self.hdir(host) / "flwr_home"),
                 FLWR_SUPEREXEC_TASK_POLL_INTERVAL=e.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"),
                 PYTHONUNBUFFERED="1")
        return e

    def start(self, party: str, host: str, argv: list[str], cwd: Path | None = None):
        assert self.sup is not None
        h = self.topo.hosts[host]
        p = self.sup.start(party, argv, self.out / "logs" / f"{party}.log", netns=h.ns, env=self.env(host),
                           cwd=cwd)
        self.report["parties"][party] = {"host": host, "ip": h.ip, "pid": p.pid, "log": f"logs/{party}.log",
                                         "argv": [str(a) for a in argv]}
        self.log(f"{party} on {host} ({h.ip}): {' '.join(map(str, argv))}")  # the command a real host would run
        return p

    def capture_in(self, host: str, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Like run_in, with the output captured (via a file, so the process is still supervised)."""
        assert self.sup is not None
        name = f"{host}:{Path(argv[0]).name}:{secrets.token_hex(2)}"
        log = self.out / "logs" / "commands" / f"{name.replace(':', '_')}.log"
        p = self.sup.start(name, argv, log, netns=self.topo.hosts[host].ns, env=self.env(host))
        try:
            p.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.sup.stop(name, grace=1)
            raise RuntimeError(f"{' '.join(map(str, argv))} in {host}: no answer in {timeout:g} s (log {log})")
        finally:
            self.sup.parties.pop(name, None)
        return subprocess.CompletedProcess(argv, p.proc.returncode, log.read_text(errors="replace"), "")

    def wait_for(self, what: str, ok, timeout: float, party: str | None = None) -> None:
        deadline = time.time() + timeout
        while not ok():
            if party is not None and self.sup.parties[party].proc.poll() is not None:
                raise RuntimeError(f"{party} exited (rc {self.sup.parties[party].proc.returncode}) before "
                                   f"{what}; see {self.sup.parties[party].log}")
            if time.time() > deadline:
                raise RuntimeError(f"no {what} after {timeout:g} s")
            time.sleep(0.25)

    # ------------------------------------------------------------------ steps
    def credentials(self) -> None:
        pki = self.out / "pki"
        ca = certs.make_ca(pki)
        self.ca = ca
        split = self.hdir("split")
        shutil.copy(ca[0], split / "ca.pem")
        certs.make_cert(split, "split", ca, ips=[SPLIT_IP])
        certs.make_tokens(split / "tokens.json", self.n)
        tokens = json.loads((split / "tokens.json").read_text())
        for i in range(self.n):
            d = self.hdir(f"dev{i}")
            shutil.copy(ca[0], d / "ca.pem")
            certs.write_private(d / "token.json", json.dumps({str(i): tokens[str(i)]}))  # its own token only
            if self.client_certs:  # mTLS: the split server accepts only devices with a certificate from the CA
                certs.make_cert(d, "device", ca, ips=[self.topo.hosts[f"dev{i}"].ip], client=True)
        if self.flower:
            self.flower_credentials(ca)

    def flower_credentials(self, ca: tuple[Path, Path]) -> None:
        agg = self.hdir("agg")
        shutil.copy(ca[0], agg / "ca.pem")
        certs.make_cert(agg, "link", ca, ips=[AGG_IP])
        home = agg / "flwr_home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "lesft"\n\n[superlink.lesft]\n'
            f'address = "{AGG_IP}:{LINK_PORT}"\nroot-certificates = {_toml_str(agg / "ca.pem")}\n')
        for i in range(self.n):
            d = self.hdir(f"dev{i}")
            certs.make_supernode_keys(d, "supernode")
            shutil.copy(d / "supernode.pub", agg / f"dev{i}.pub")  # the aggregator registers public keys only

    def split_data(self) -> None:
        """Each device's own rows: the share the in-process simulation would give it, in its own file."""
        from lesft.data.rows import load_rows
        from lesft.train import split_clients

        cfg = self.cfg
        rows = load_rows(cfg.data, cfg.samples, cfg.data_seed, cfg.synthetic, data_dir=cfg.data_dir,
                         target=cfg.target, rationale=cfg.rationale)
        for i, idx in enumerate(split_clients(cfg, rows)):
            (self.hdir(f"dev{i}") / "data.jsonl").write_text("".join(json.dumps(rows[j]) + "\n" for j in idx))
        self.report["rows"] = [len(idx) for idx in split_clients(cfg, rows)]

    def links_up(self) -> None:
        self.report["links"] = {}
        for i in range(self.n):
            h = self.topo.hosts[f"dev{i}"]
            prof = h.profile
            if prof is None:
                continue
            cmds = self.topo.shape(h, prof)
            entry = {"profile": asdict(prof), "tc": [" ".join(c) for c in cmds]}
            if prof.needs_relay:
                self.topo.intercept(h, [SPLIT_IP, AGG_IP] if self.flower else [SPLIT_IP])
                fw = [f"{SPLIT_IP}:{SPLIT_PORT}", f"{SPLIT_IP}:{SINK_PORT}"] + ([f"{AGG_IP}:{LINK_PORT}"]
                                                                              if self.flower else [])
                argv = [sys.executable, "-m", "lesft.deploy.netem", "relay", "--profile", _spec(prof),
                        "--source", h.ip, "--mark", hex(netem.MARK), "--seed", str(i)]
                for f in fw:
                    argv += ["--forward", f]
                self.start(f"relay{i}", h.name, argv)
                entry["relay"] = fw
            self.report["links"][h.name] = entry
        for i in range(self.n):
            if self.topo.hosts[f"dev{i}"].profile is not None and self.topo.hosts[f"dev{i}"].profile.needs_relay:
                self.wait_for(f"relay{i} ready", lambda i=i: "relay: ready" in _read(self.out / "logs" /
                                                                                       f"relay{i}.log"),
                              30, party=f"relay{i}")
            if self.topo.hosts[f"dev{i}"].profile is not None:
                self.log(f"dev{i} link: {self.topo.hosts[f'dev{i}'].profile.describe()}")

    def verify_links(self) -> None:
        """Measure RTT and throughput from every shaped device to a sink on the split host, all at once."""
        shaped = [i for i in range(self.n) if self.topo.hosts[f"dev{i}"].profile is not None]
        if not shaped or self.verify_s <= 0:
            return
        self.start("sink", "split", [sys.executable, "-m", "lesft.deploy.netem", "sink", "--listen",
                                     f"{SPLIT_IP}:{SINK_PORT}"])
        self.wait_for("sink ready", lambda: "sink: ready" in _read(self.out / "logs" / "sink.log"), 30, "sink")
        for i in shaped:
            prof = self.topo.hosts[f"dev{i}"].profile
            self.start(f"probe{i}", f"dev{i}", [sys.executable, "-m", "lesft.deploy.netem", "probe", "--to",
                                                f"{SPLIT_IP}:{SINK_PORT}", "--profile", _spec(prof),
                                                "--seconds", str(self.verify_s)])
        checks = {}
        for i in shaped:
            p = self.sup.parties[f"probe{i}"]
            try:
                p.proc.wait(timeout=60 + 10 * self.verify_s)
            except subprocess.TimeoutExpired:
                self.sup.stop(f"probe{i}", 1)
            out = _read(self.out / "logs" / f"probe{i}.log").strip().splitlines()
            try:
                m = json.loads(out[-1])
            except (IndexError, json.JSONDecodeError):
                raise RuntimeError(f"link check of dev{i} failed; see logs/probe{i}.log")
            checks[f"dev{i}"] = m
            self.log(f"dev{i} measured: {m['summary']}")
        self.sup.stop("sink", 1)
        self.report["link_checks"] = checks
        (self.out / "link_check.json").write_text(json.dumps(checks, indent=2))

    def start_split(self) -> None:
        d = self.hdir("split")
        self.start("split", "split", [
            _bin("lesft"), "server", "--config", str(self.out / "run.yaml"), "--listen", f"{SPLIT_IP}:{SPLIT_PORT}",
            "--tokens", str(d / "tokens.json"), "--out", str(d / "out"), "--tls_cert", str(d / "split.pem"),
            "--tls_key", str(d / "split.key"), "--timeout_s", f"{self.step_timeout_s:g}"]
            + (["--tls_ca", str(d / "ca.pem")] if self.client_certs else []))

    def start_link(self) -> None:
        d = self.hdir("agg")
        self.start("superlink", "agg", [
            _bin("flower-superlink"), "--ssl-ca-certfile", str(d / "ca.pem"), "--ssl-certfile", str(d / "link.pem"),
            "--ssl-keyfile", str(d / "link.key"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", AGG_IP, "--port", str(LINK_PORT),
            "--database", str(d / "state.db")])

    def link_healthy(self) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.topo.hosts["agg"].ns, "curl", "-sf", "--max-time", "2",
                            "--cacert", str(self.hdir("agg") / "ca.pem"), f"https://{AGG_IP}:{LINK_PORT}/health"],
                           capture_output=True)
        return r.returncode == 0

    def register_supernodes(self) -> None:
        agg = self.hdir("agg")
        for i in range(self.n):
            r = self.capture_in("agg", [_bin("flwr"), "supernode", "register", str(agg / f"dev{i}.pub"), "lesft",
                                        "--name", f"dev{i}"], timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"flwr supernode register dev{i} failed: {r.stdout[-600:]}")
            self.log(f"registered dev{i}'s SuperNode key ({r.stdout.strip().splitlines()[-1][:80]})")

    def start_devices(self) -> None:
        """Each device's long-lived trainer, which loads the model once (before the first round)."""
        if not self.worker:
            return
        for i in range(self.n):
            self.start(f"device{i}", f"dev{i}", [_bin("lesft"), "device", "--socket",
                                                 str(self.hdir(f"dev{i}") / "device.sock"), "--model", self.cfg.model])
        for i in range(self.n):
            self.wait_for(f"device{i} ready", lambda i=i: "ready on" in _read(self.out / "logs" / f"device{i}.log"),
                          300, party=f"device{i}")

    def start_supernodes(self) -> None:
        for i in range(self.n):
            d = self.hdir(f"dev{i}")
            node = (f'config={_toml_str(self.out / "run.yaml")} server="{SPLIT_IP}:{SPLIT_PORT}" client-id={i} '
                    f'token-file={_toml_str(d / "token.json")} tls-ca={_toml_str(d / "ca.pem")} '
                    f'data={_toml_str(d / "data.jsonl")} out={_toml_str(d / "out")}')
            if self.worker:
                node += f' worker={_toml_str(d / "device.sock")}'
            if self.client_certs:
                node += f' tls-cert={_toml_str(d / "device.pem")} tls-key={_toml_str(d / "device.key")}'
            self.start(f"supernode{i}", f"dev{i}", [
                _bin("flower-supernode"), "--superlink", f"{AGG_IP}:{LINK_PORT}", "--root-certificates",
                str(d / "ca.pem"), "--auth-supernode-private-key", str(d / "supernode"),
                "--node-config", node, "--host", "127.0.0.1", "--port", "9094"])

    def start_clients(self) -> None:
        """Split learning without aggregation: each device runs `lesft client` against the split server."""
        for i in range(self.n):
            d = self.hdir(f"dev{i}")
            self.start(f"client{i}", f"dev{i}", [
                _bin("lesft"), "client", "--config", str(self.out / "run.yaml"), "--server",
                f"{SPLIT_IP}:{SPLIT_PORT}", "--client-id", str(i), "--token-file", str(d / "token.json"),
                "--tls_ca", str(d / "ca.pem"), "--data", str(d / "data.jsonl"), "--out", str(d / "out")]
                + (["--tls_cert", str(d / "device.pem"), "--tls_key", str(d / "device.key")] if self.client_certs
                   else []))

    def start_run(self) -> None:
        agg = self.hdir("agg")
        rc = (f'config={_toml_str(self.out / "run.yaml")} out={_toml_str(agg / "out")} clients={self.n} '
              f'min-clients={self.min_clients} round-timeout={float(self.round_timeout_s)}')
        self.start("flwr_run", "agg", [_bin("flwr"), "run", str(REPO / "deploy" / "flower"), "lesft", "--stream",
                                       "--run-config", rc], cwd=REPO / "deploy" / "flower")

    def watch(self, finishers: list[str], essential: set[str]) -> dict[str, int] | None:
        """Until every party in ``finishers`` has ended; return their exit codes. Any other party that ends
        meanwhile is reported as a failure; when it is ``essential``, or at the --timeout-s deadline, the run
        stops at once and None is returned."""
        seen: set[str] = set()
        deadline = self._t0 + self.timeout_s if self.timeout_s else None
        while True:
            for name, rc in self.sup.exited().items():
                if name in seen or name in finishers or name.startswith(("probe", "sink")) or ":" in name:
                    continue
                seen.add(name)
                self.ended(name, rc, during_run=True)
                if name in essential:
                    self.log(f"{name} is essential: stopping the run")
                    return None
            codes = {f: self.sup.parties[f].proc.poll() for f in finishers}
            if all(c is not None for c in codes.values()):
                return codes
            if deadline and time.time() > deadline:
                self.fail(f"the run took longer than --timeout-s {self.timeout_s:g}: stopped")
                return None
            time.sleep(0.5)

    def ended(self, name: str, rc: int, during_run: bool) -> None:
        """Record party ``name``'s exit code; a failure if it ended during the run or with rc != 0."""
        party = self.report["parties"][name]
        party["rc"] = rc
        if during_run or rc != 0:
            self.fail(f"{name} on {party['host']} exited (rc {rc}){' during the run' if during_run else ''}; "
                      f"see {party['log']}")

    def fail(self, msg: str) -> None:
        self.report["failures"].append(msg)
        self.log(f"FAILURE: {msg}")

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        why = requirements()
        if why:
            raise RuntimeError(f"cannot deploy on namespaces: {why}")
        raw = self.yaml.safe_load(self.config_path.read_text())
        (self.out / "run.yaml").write_text(self.yaml.safe_dump(raw))
        rc = 1
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(sig, _frame):
            for s in old:  # a second signal must not cut the teardown short
                signal.signal(s, signal.SIG_IGN)
            raise Interrupted(signal.Signals(sig).name)

        for s in old:
            signal.signal(s, on_signal)
        self.sup = Supervisor(self.topo.namespaces())
        try:
            self.log(f"namespaces {self.topo.prefix}-*: split {SPLIT_IP}, {f'agg {AGG_IP}, ' if self.flower else ''}devices "
                     f"{SUBNET}.10-{10 + self.n - 1}; out {self.out}")
            self.write_report()
            self.credentials()
            self.split_data()
            self.topo.up()
            self.links_up()
            self.verify_links()
            self.start_split()
            if self.flower:
                self.start_link()
            self.wait_for("split server serving", lambda: "serving" in _read(self.out / "logs" / "split.log"), 120,
                          "split")
            if self.flower:
                self.run_flower()
            else:
                self.start_clients()
                self.log(f"{self.n} `lesft client` started ({self.cfg.method} does not aggregate: no Flower)")
                codes = self.watch([f"client{i}" for i in range(self.n)], {"split"}) or {}
                for name, c in codes.items():
                    self.ended(name, c, during_run=False)
            rc = 0 if not self.report["failures"] else 1
        except Interrupted as e:
            self.fail(f"interrupted by {e}")
            rc = 130
        except Exception as e:  # noqa: BLE001  (reported, then everything is torn down)
            self.fail(f"{type(e).__name__}: {e}")
            rc = 1
        finally:
            try:
                self.teardown()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        self.report["rc"] = rc
        self.report["wall_s"] = round(time.time() - self._t0, 1)
        self.write_report()
        self.log(f"done: rc {rc} in {self.report['wall_s']} s; report {self.out / 'report.json'}")
        return rc

    def run_flower(self) -> None:
        self.wait_for("SuperLink health", self.link_healthy, 60, "superlink")
        self.register_supernodes()
        self.start_devices()
        self.start_supernodes()
        self.start_run()
        self.log(f"flwr run started ({self.n} devices)")
        codes = self.watch(["flwr_run"], {"split", "superlink"})
        run_rc = 1 if codes is None else codes["flwr_run"]
        self.report["flwr_run_rc"] = run_rc
        adapter = self.hdir("agg") / "out" / "aggregated_adapter.safetensors"
        if run_rc != 0:
            self.fail(f"flwr run exited {run_rc}; see logs/flwr_run.log")
        if not adapter.exists():
            self.fail("no aggregated adapter was written")
        else:
            self.report["aggregated_adapter"] = str(adapter)

    def teardown(self) -> None:
        if self.sup is not None and "split" in self.sup.parties:  # the split server's peak RSS, before it stops
            hwm = _read(Path(f"/proc/{self.sup.parties['split'].pid}/status"))
            m = re.search(r"VmHWM:\s+(\d+) kB", hwm)
            if m:
                self.report["split_peak_rss_mb"] = int(m.group(1)) / 1024
        if self.sup is not None:
            for name, p in self.sup.parties.items():
                if p.proc.poll() is not None and name in self.report["parties"]:
                    self.report["parties"][name].setdefault("rc", p.proc.returncode)
            left = self.sup.shutdown(grace=5.0)
            for name, p in self.sup.parties.items():
                if name in self.report["parties"]:
                    self.report["parties"][name].setdefault("rc", p.proc.returncode)
                    self.report["parties"][name]["stopped_by_teardown"] = p.expected_exit
            if left:
                self.log(f"teardown: killed {len(left)} process(es) outside the parties' groups: {left}")
            self.report["killed_leftovers"] = left
        self.report["namespaces_left"] = self.topo.down()
        if self.report["namespaces_left"]:
            self.fail(f"namespaces not deleted: {self.report['namespaces_left']}")
        self.log("teardown: every process stopped, namespaces deleted")

    def write_report(self) -> None:
        (self.out / "report.json").write_text(json.dumps(self.report, indent=2, default=str))


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def _spec(p: netem.Profile) -> str:
    """A spec that ``netem.parse_profile`` turns back into ``p``: its name when it is a named profile."""
    if netem.PROFILES.get(p.name) == p:
        return p.name
    return (f"down={p.down_mbit}mbit,up={p.up_mbit}mbit,rtt={p.rtt_ms}ms,jitter={p.jitter_ms}ms,"
            f"loss={p.loss_pct},model={p.loss_model}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lesft.deploy.hosts", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="stand up every party on its own namespace host, run CONFIG, tear down")
    r.add_argument("config", type=Path)
    r.add_argument("--out", type=Path, default=Path("runs/hosts"))
    r.add_argument("--link", action="append", default=[], metavar="[IDS=]PROFILE",
                   help="shape device links: a profile (lan, wifi, 4g, 3g) or key=value spec for every device, or "
                        "IDS=PROFILE for some (e.g. 0=4g, 1,2=3g,loss=0); repeatable")
    r.add_argument("--verify-s", type=float, default=2.0,
                   help="before training, measure each shaped link for about this many seconds per direction "
                        "(0: skip)")
    r.add_argument("--step-timeout-s", type=float, default=120.0,
                   help="the split server's wait for a missing device (lesft server --timeout_s)")
    r.add_argument("--round-timeout-s", type=float, default=3600.0,
                   help="Flower's wait for a device's reply in a round")
    r.add_argument("--min-clients", type=int, default=0,
                   help="Flower rounds start with this many devices online (0: all)")
    r.add_argument("--timeout-s", type=float, default=0.0, help="stop the whole run after this long (0: never)")
    r.add_argument("--client-certs", action="store_true",
                   help="mutual TLS: each device gets a client certificate from the run's CA, and the split server "
                        "refuses any caller without one (on top of the per-device tokens)")
    r.add_argument("--no-worker", dest="worker", action="store_false",
                   help="no `lesft device` worker: the ClientApp Flower starts per message trains, loading the "
                        "model each round (slower; for comparison)")
    c = sub.add_parser("clean", help="kill the processes in, and delete, namespaces left by a killed run")
    c.add_argument("--prefix", default=NS_PREFIX)
    sub.add_parser("check", help="say whether this machine can run a namespaced deployment")
    a = ap.parse_args(argv)
    if a.cmd == "clean":
        gone = clean(a.prefix)
        print(f"deleted {len(gone)} namespace(s): {' '.join(gone)}" if gone else "nothing to clean")
        return 0
    if a.cmd == "check":
        why = requirements()
        print(why or "ok")
        return 1 if why else 0
    dep = Deployment(a.config, a.out, a.link, verify_s=a.verify_s, step_timeout_s=a.step_timeout_s,
                     round_timeout_s=a.round_timeout_s, min_clients=a.min_clients, timeout_s=a.timeout_s,
                     worker=a.worker, client_certs=a.client_certs)
    return dep.run()


if __name__ == "__main__":
    sys.exit(main())
