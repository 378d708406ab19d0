"""A deployment with every party on its own host (network namespace), TLS and authentication everywhere,
Flower aggregation and shaped links (``lesft.deploy.hosts``); the link emulation (``lesft.deploy.netem``);
and process hygiene (``lesft.deploy.procs``): nothing may be left running, zombies included.

The namespace tests need root and ``ip netns`` (CI runs as root); they skip with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from lesft.deploy import certs, netem
from lesft.deploy.procs import descendants, run_guarded

ROOT = Path(__file__).resolve().parents[1]


def _zombies() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rfind(")") + 2:].split()[0] == "Z":
                out.add(int(d))
    return out


def _mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a run's output folder)."""
    hits = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                hits.append(int(d))
    return hits


# ---------------------------------------------------------------------------------------------- no root needed

def test_profiles_parse_and_bounds() -> None:
    p = netem.parse_profile("4g")
    assert (p.down_mbit, p.up_mbit, p.rtt_ms, p.jitter_ms, p.loss_pct) == (20, 20, 50, 10, 1.0)
    assert p.source
    # Mathis: 1448 B * 8 / 50 ms * 1.22 / sqrt(0.01) = 2.83 Mbit/s, under the 20 Mbit/s of the link
    assert p.tcp_bound_mbit() == pytest.approx(2.826, abs=1e-3)
    assert p.expected_mbit("up") == pytest.approx(2.826, abs=1e-3)
    assert netem.parse_profile("4g,model=arq").expected_mbit("down") == 20
    c = netem.parse_profile("down=50mbit,up=500kbit,rtt=0.03s,jitter=4,loss=0.5%")
    assert (c.down_mbit, c.up_mbit, c.rtt_ms, c.jitter_ms, c.loss_pct) == (50, 0.5, 30, 4, 0.5)
    assert netem.parse_profile("3g,loss=0").tcp_bound_mbit() is None
    for bad in ("5g", "rtt=-1", "4g,jitter=200", "bw=0", "4g,colour=red", ""):
        with pytest.raises(ValueError):
            netem.parse_profile(bad)
    for name, prof in netem.PROFILES.items():
        assert netem.parse_profile(name) == prof


def test_link_specs_per_device() -> None:
    from lesft.deploy.hosts import parse_links

    links = parse_links(["4g", "1=3g,loss=0", "2=none"], 3)
    assert links[0] == netem.PROFILES["4g"] and links[2] is None
    assert links[1].rtt_ms == 100 and links[1].loss_pct == 0
    with pytest.raises(ValueError):
        parse_links(["5=4g"], 2)


def test_relay_delays_and_paces_on_loopback() -> None:
    """The relay between a probe and a sink on loopback: the RTT is the profile's, the loss bound paces."""
    import asyncio

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    sink, relay = free_port(), free_port()
    prof = netem.parse_profile("bw=100mbit,rtt=40ms,jitter=10ms,loss=1")  # bound: 2*2.83 = 3.53 Mbit/s
    loops: list[asyncio.AbstractEventLoop] = []
    ready = threading.Barrier(3, timeout=20)

    def serve(coro_fn) -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        task = loop.create_task(coro_fn(lambda: ready.wait()))
        try:
            loop.run_until_complete(task)
        except (asyncio.CancelledError, RuntimeError):
            pass

    threads = [threading.Thread(target=serve, daemon=True, args=(lambda r: netem.serve_sink(("127.0.0.1", sink), r),)),
               threading.Thread(target=serve, daemon=True, args=(lambda r: netem.serve_relay(
                   [(("127.0.0.1", relay), ("127.0.0.1", sink))], prof, None, None, seed=1, ready=r),))]
    for t in threads:
        t.start()
    ready.wait()
    try:
        up, down = netem.probe_bytes(prof, 1.0)
        m = netem.probe(("127.0.0.1", relay), pings=20, up_bytes=up, down_bytes=down)
    finally:
        for loop in loops:
            loop.call_soon_threadsafe(lambda lp=loop: [t.cancel() for t in asyncio.all_tasks(lp)])
    assert 30 <= m["rtt_ms"]["min"] and 35 <= m["rtt_ms"]["median"] <= 60, m
    bound = prof.expected_mbit("up")
    assert 0.5 * bound <= m["up_mbit"] <= 1.2 * bound and 0.5 * bound <= m["down_mbit"] <= 1.2 * bound, m
    assert "profile 40 ± 10 ms" in netem.compare(prof, m)


def test_certificates_carry_ip_sans(tmp_path) -> None:
    ca = certs.make_ca(tmp_path / "pki")
    cert, key = certs.make_cert(tmp_path / "h", "split", ca, ips=["10.77.0.2"], dns=["split.example"])
    assert "IP Address:10.77.0.2" in certs.cert_sans(cert) and "DNS:split.example" in certs.cert_sans(cert)
    assert subprocess.run(["openssl", "verify", "-CAfile", str(ca[0]), str(cert)], capture_output=True).returncode == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(ca[1].stat().st_mode & 0o777) == "0o600"
    tokens = certs.make_tokens(tmp_path / "tokens.json", 3)
    assert len(set(tokens.values())) == 3 and all(len(t) >= 22 for t in tokens.values())
    assert oct((tmp_path / "tokens.json").stat().st_mode & 0o777) == "0o600"
    priv, pub = certs.make_supernode_keys(tmp_path, "node")
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    assert load_ssh_private_key(priv.read_bytes(), password=None).curve.name == "secp384r1"


def test_guard_reaps_detached_and_orphaned_children() -> None:
    """A command that leaves a detached (setsid) child and an orphan behind: both are killed and reaped, not
    left running or as zombies of a PID 1 that does not reap."""
    marker = f"lesft-guard-test-{os.getpid()}"
    script = (f"setsid sh -c 'sleep 300' {marker} & (sh -c 'sleep 301' {marker} &) ; sleep 0.3; exit 7")
    before = _zombies()
    r = subprocess.run([sys.executable, "-m", "lesft.deploy.procs", "--", "sh", "-c", script], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 7
    assert "process(es) left behind by sh" in r.stderr, r.stderr  # the 2 sleeps and their shells
    time.sleep(0.2)
    assert not _mentioning(marker)
    assert not (_zombies() - before)


def test_guard_passes_sigterm_and_cleans_up() -> None:
    marker = f"lesft-guard-term-{os.getpid()}"
    before = _zombies()
    p = subprocess.Popen([sys.executable, "-m", "lesft.deploy.procs", "--", "sh", "-c",
                          f"setsid sh -c 'sleep 300' {marker} & sh -c 'sleep 302' {marker}"])
    deadline = time.time() + 20
    while len(_mentioning(marker)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) != 0
    time.sleep(0.2)
    assert not _mentioning(marker)
    assert not (_zombies() - before)
    assert run_guarded(["true"]) == 0 and not descendants()


# ---------------------------------------------------------------------------------------------- namespaces

def _skip_reason() -> str | None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return "needs flwr (pip install -e '.[flower]')"
    from lesft.deploy.hosts import requirements

    return requirements()


needs_hosts = pytest.mark.skipif(_skip_reason() is not None, reason=f"namespaced deployment: {_skip_reason()}")


def _config(assets, tmp_path, **over) -> Path:
    base = dict(method="lesft", model=str(assets / "model"), data=str(assets / "rows.jsonl"), clients=2, rounds=3,
                aggregate_every=2, grad_accum=2, client_layers="1", max_length=256, pad_to_multiple=16,
                device="cpu", progress=False, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    base.update(over)
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def _hosts(cfg: Path, out: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lesft.deploy.hosts", "run", str(cfg), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _assert_nothing_left(out: Path, report: dict, zombies_before: set[int]) -> None:
    from lesft.deploy.hosts import list_namespaces

    assert not set(report["namespaces"]) & set(list_namespaces())
    assert not _mentioning(str(out)), "a process of the run is still running"
    assert not (_zombies() - zombies_before), "the run left zombies"


@needs_hosts
def test_namespaced_deployment_equals_simulation(assets, tmp_path) -> None:
    """Split server, SuperLink (TLS + SuperNode auth) and 2 devices on 4g links, each on its own namespace host:
    the aggregated adapter equals the in-process simulation's, the link measures as its profile, nothing is
    left running."""
    from safetensors.torch import load_file

    from lesft.config import TrainConfig
    from lesft.typed import from_dict
    from lesft.train import train

    cfg = _config(assets, tmp_path)
    out = tmp_path / "hosts"
    zombies = _zombies()
    t0 = time.time()
    p = _hosts(cfg, out, "--link", "4g", "--verify-s", "0.5", "--timeout-s", "300", "--client-certs")
    log, _ = p.communicate(timeout=400)
    wall = time.time() - t0
    report = json.loads((out / "report.json").read_text())
    assert p.returncode == 0, log[-3000:]
    assert report["failures"] == [] and report["rc"] == 0
    print(f"namespaced deployment: {wall:.1f} s")
    _assert_nothing_left(out, report, zombies)
    # TLS: the split server and the SuperLink have certificates for their IPs, devices hold the CA only
    assert "IP Address:10.77.0.2" in certs.cert_sans(out / "hosts" / "split" / "split.pem")
    # mTLS (--client-certs): a device holds its own client key only, and the server requires a client certificate
    assert [p.name for p in (out / "hosts" / "dev0").glob("*.key")] == ["device.key"]
    assert not (out / "hosts" / "dev0" / "tokens.json").exists()
    assert "--tls_ca" in report["parties"]["split"]["argv"]
    assert report["parties"]["split"]["argv"][1] == "server"  # the command is recorded for a real host
    assert len(json.loads((out / "hosts" / "dev0" / "token.json").read_text())) == 1
    assert "registered dev1's SuperNode key" in (out / "logs" / "hosts.log").read_text()
    # the link checks, next to the profile's numbers
    prof = netem.PROFILES["4g"]
    for dev in ("dev0", "dev1"):
        m = report["link_checks"][dev]
        assert 40 <= m["rtt_ms"]["median"] <= 75, m
        for d in ("up", "down"):
            assert 0.4 * prof.expected_mbit(d) <= m[f"{d}_mbit"] <= 1.3 * prof.expected_mbit(d), m
    # the same adapters as the simulation
    sim = train(from_dict(TrainConfig, {**yaml.safe_load(cfg.read_text()), "out": str(tmp_path / "sim")}))
    assert sim["rounds"] == 3
    agg = load_file(str(out / "hosts" / "agg" / "out" / "aggregated_adapter.safetensors"))
    ref = load_file(str(tmp_path / "sim" / "checkpoint" / "tensors.safetensors"))
    assert agg
    for k, v in agg.items():
        torch.testing.assert_close(v, ref[f"client0.lora.{k}"], atol=1e-5, rtol=1e-4)
    srv = load_file(str(out / "hosts" / "split" / "out" / "server_checkpoint" / "tensors.safetensors"))
    for k in (k for k in ref if k.startswith("server.lora.")):
        torch.testing.assert_close(srv[k.removeprefix("server.")], ref[k], atol=1e-5, rtol=1e-4)


@needs_hosts
def test_split_learning_without_flower_across_namespaces(assets, tmp_path) -> None:
    """`sl` never aggregates: no aggregator host, each device runs `lesft client` on its own host over mutual TLS
    and a shaped link; every device's adapter and the server's equal the simulation's, and nothing is left."""
    from safetensors.torch import load_file

    from lesft.config import TrainConfig
    from lesft.typed import from_dict
    from lesft.train import train

    cfg = _config(assets, tmp_path, method="sl", aggregate_every=0, rounds=2)
    out = tmp_path / "hosts"
    zombies = _zombies()
    p = _hosts(cfg, out, "--link", "wifi", "--verify-s", "0", "--timeout-s", "300", "--client-certs")
    log, _ = p.communicate(timeout=400)
    report = json.loads((out / "report.json").read_text())
    assert p.returncode == 0, log[-3000:]
    assert not any(n.endswith("-agg") for n in report["namespaces"]) and "superlink" not in report["parties"]
    _assert_nothing_left(out, report, zombies)
    train(from_dict(TrainConfig, {**yaml.safe_load(cfg.read_text()), "out": str(tmp_path / "sim")}))
    ref = load_file(str(tmp_path / "sim" / "checkpoint" / "tensors.safetensors"))
    for i in range(2):
        dev = load_file(str(out / "hosts" / f"dev{i}" / "out" / "checkpoint" / "tensors.safetensors"))
        mine = {k: v for k, v in dev.items() if k.startswith(f"client{i}.lora.")}
        assert mine
        for k, v in mine.items():
            torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-4)
    srv = load_file(str(out / "hosts" / "split" / "out" / "server_checkpoint" / "tensors.safetensors"))
    for k in (k for k in ref if k.startswith("server.lora.")):
        torch.testing.assert_close(srv[k.removeprefix("server.")], ref[k], atol=1e-5, rtol=1e-4)


@needs_hosts
def test_a_device_dies_mid_run(assets, tmp_path) -> None:
    """Every process of device 1's host is SIGKILLed after the first round: the split server times it out,
    Flower aggregates device 0's reply, the run reports the failure (rc 1), and nothing is left."""
    cfg = _config(assets, tmp_path, rounds=2, aggregate_every=2)
    out = tmp_path / "hosts"
    zombies = _zombies()
    p = _hosts(cfg, out, "--link", "1=wifi", "--verify-s", "0", "--step-timeout-s", "4",
               "--round-timeout-s", "25", "--min-clients", "1", "--timeout-s", "300")
    ns = None
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if ns is None and (out / "report.json").exists():
            ns = [n for n in json.loads((out / "report.json").read_text())["namespaces"] if n.endswith("-dev1")][0]
        if ns and (out / "hosts" / "split" / "out" / "server_checkpoint").exists():
            break
        time.sleep(0.2)
    assert ns and p.poll() is None, "the run ended before its first round"
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    assert pids
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    log, _ = p.communicate(timeout=300)
    report = json.loads((out / "report.json").read_text())
    assert p.returncode == 1, log[-3000:]
    assert any("dev1" in f for f in report["failures"]), report["failures"]
    assert not any("dev0" in f or "split" in f.split(" on ")[0] for f in report["failures"]), report["failures"]
    assert (out / "hosts" / "agg" / "out" / "aggregated_adapter.safetensors").exists()
    done = json.loads((out / "hosts" / "dev0" / "out" / "summary.json").read_text())
    assert done["rounds"] == 2
    _assert_nothing_left(out, report, zombies)


@needs_hosts
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing(assets, tmp_path, sig) -> None:
    cfg = _config(assets, tmp_path)
    out = tmp_path / "hosts"
    zombies = _zombies()
    p = _hosts(cfg, out, "--link", "3g", "--verify-s", "0")
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "flwr run started" in line:
            break
    time.sleep(3)  # the parties are up and working
    assert p.poll() is None, "".join(lines)
    p.send_signal(sig)
    rest, _ = p.communicate(timeout=120)
    report = json.loads((out / "report.json").read_text())
    assert p.returncode == 130, "".join(lines) + rest
    assert any(f"interrupted by {signal.Signals(sig).name}" in f for f in report["failures"])
    _assert_nothing_left(out, report, zombies)
