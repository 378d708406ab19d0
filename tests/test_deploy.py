"""The split server over gRPC, on loopback: processes started and stopped here, every wait bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import self_signed
from safetensors.torch import load_file

from lesft import methods
from lesft.config import TrainConfig
from lesft.deploy.cli import build_service
from lesft.deploy.remote import RemoteError, RemoteSplit
from lesft.deploy.endpoint import serve
from lesft.deploy.wire import NetArgs, channel, server_credentials
from lesft.lora import LoraArgs
from lesft.messages import Activations, PathBatch
from lesft.train import train

H = 32
T0, T1 = "token-of-client-0-" + "a" * 16, "token-of-client-1-" + "b" * 16  # >= 22 characters
TIMEOUT = 120  # seconds any one test may wait on a process


def base_flags(assets: Path, out: Path, **kw) -> list[str]:
    flags = dict(method="lesft", aggregate_every=0, model=str(assets / "model"), data=str(assets / "rows.jsonl"),
                 clients=2, rounds=2, grad_accum=2, client_layers="1", max_length=256, pad_to_multiple=16,
                 device="cpu", progress="false", **{"lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0})
    flags.update(kw)
    return [f"--{k}={v}" for k, v in flags.items()] + ["--out", str(out)]


def cfg_from(flags: list[str]) -> TrainConfig:
    from lesft.cli import _config, build_parser

    return _config(build_parser().parse_args(["train", *flags]))


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Server:
    """``lesft server`` in a subprocess on a free port."""

    def __init__(self, flags: list[str], tokens: Path, extra: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "lesft.cli", "server", "--listen", "127.0.0.1:0",
                                      "--tokens", str(tokens), *flags, *extra], env=env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if "serving" in line and self.port is None:
                    self.port = int(line.split(" on ")[1].split(",")[0].rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(TIMEOUT) or self.port is None:
            self.stop()
            raise AssertionError("server did not start:\n" + "".join(self.lines))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def client(address: str, tokens: Path, cid: int, flags: list[str], out: Path, **kw) -> subprocess.Popen:
    """``lesft client`` ``cid`` in a subprocess; ``flags`` without ``--out``."""
    return subprocess.Popen([sys.executable, "-m", "lesft.cli", "client", "--server", address, "--token-file",
                             str(tokens), "--client-id", str(cid), "--take-share", *flags, "--out", str(out),
                             *[f"--{k}={v}" for k, v in kw.items()]],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def strip_out(flags: list[str]) -> list[str]:
    i = flags.index("--out")
    return flags[:i] + flags[i + 2:]


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, out
    return out


def test_networked_run_equals_in_process_simulation(assets, server_model, tmp_path) -> None:
    flags = base_flags(assets, tmp_path / "sim")
    sim = train(cfg_from(flags))
    server = Server(base_flags(assets, tmp_path / "server", model=str(server_model)), tmp_path / "tok.json")
    try:
        procs = [client(server.address, tmp_path / "tok.json", i, strip_out(flags), tmp_path / f"c{i}")
                 for i in range(2)]
        for p in procs:
            finish(p)
    finally:
        server.stop()
    ref = load_file(str(tmp_path / "sim" / "checkpoint" / "tensors.safetensors"))
    for i in range(2):
        net = load_file(str(tmp_path / f"c{i}" / "checkpoint" / "tensors.safetensors"))
        keys = [k for k in ref if k.startswith(f"client{i}.lora.")]
        assert keys
        for k in keys:
            torch.testing.assert_close(net[k], ref[k], atol=1e-5, rtol=1e-4)
    srv = load_file(str(tmp_path / "server" / "server_checkpoint" / "tensors.safetensors"))
    keys = [k for k in ref if k.startswith("server.lora.")]
    assert keys
    for k in keys:
        torch.testing.assert_close(srv[k.removeprefix("server.")], ref[k], atol=1e-5, rtol=1e-4)
    # client part + server part = the simulation's adapter for client 1 (no aggregation: per client)
    from lesft.lora import merge_adapters

    merged = load_file(str(merge_adapters([tmp_path / "c1" / "adapter", tmp_path / "server" / "adapter"],
                                          tmp_path / "merged") / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "sim" / "client_adapters" / "client_1" / "adapter_model.safetensors"))
    assert merged.keys() == want.keys()
    joined_cfg, want_cfg = (json.loads((d / "adapter_config.json").read_text())
                            for d in (tmp_path / "merged", tmp_path / "sim" / "client_adapters" / "client_1"))
    assert joined_cfg["layers_to_transform"] == want_cfg["layers_to_transform"]
    for k in want:
        torch.testing.assert_close(merged[k], want[k], atol=1e-5, rtol=1e-4)
    # identical tensor payloads: activations up (both paths), gradients down
    sums: dict[str, int] = {}
    for i in range(2):
        detail = json.loads((tmp_path / f"c{i}" / "summary.json").read_text())["comm_detail"]
        for d, kinds in detail.items():
            for k, v in kinds.items():
                sums[f"{d}.{k}"] = sums.get(f"{d}.{k}", 0) + v["payload_bytes"]
    ref_detail = sim["comm_detail"]
    assert sums["client_to_server.activations"] == ref_detail["client_to_server"]["activations"]["payload_bytes"]
    assert sums["server_to_client.activation_grad"] == ref_detail["server_to_client"]["activation_grad"][
        "payload_bytes"]
    # the server computed the same loss for each client as the simulation
    sim_losses = [json.loads(ln)["loss_per_client"] for ln in (tmp_path / "sim" / "metrics.jsonl").open()]
    for i in range(2):
        net_losses = [json.loads(ln)["loss"] for ln in (tmp_path / f"c{i}" / "metrics.jsonl").open()]
        assert net_losses == pytest.approx([m[str(i)] for m in sim_losses], abs=1e-5)


def rounds_done(run_dir: Path) -> int:
    m = run_dir / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


def wait_for(cond, what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_killed_client_does_not_stall_the_others(assets, server_model, tmp_path) -> None:
    flags = strip_out(base_flags(assets, tmp_path, rounds=6, method="sl", timeout_s=3))
    server = Server(base_flags(assets, tmp_path / "server", model=str(server_model), method="sl", timeout_s=3),
                    tmp_path / "tok.json")
    try:
        a = client(server.address, tmp_path / "tok.json", 0, flags, tmp_path / "c0")
        b = client(server.address, tmp_path / "tok.json", 1, flags, tmp_path / "c1")
        wait_for(lambda: rounds_done(tmp_path / "c1") >= 1, "client 1's first round")
        b.kill()  # mid-run, typically mid-round
        b.wait(30)
        t0 = time.monotonic()
        finish(a)
        assert time.monotonic() - t0 < 60
    finally:
        server.stop()
    assert rounds_done(tmp_path / "c0") == 6
    assert any("left out clients [1]" in line for line in server.lines), "".join(server.lines)


def test_killed_server_restarts_from_its_checkpoint_and_the_client_continues(assets, server_model, tmp_path) -> None:
    flags = strip_out(base_flags(assets, tmp_path, rounds=6, method="sl", clients=1, retries=40, backoff_s=0.25))
    sflags = base_flags(assets, tmp_path / "server", model=str(server_model), method="sl", clients=1)
    server = Server(sflags, tmp_path / "tok.json")
    try:
        c = client(server.address, tmp_path / "tok.json", 0, flags, tmp_path / "c0")
        wait_for(lambda: (tmp_path / "server" / "server_checkpoint" / "state.json").exists(), "a server checkpoint")
        server.proc.kill()
        server.proc.wait(30)
        saved = json.loads((tmp_path / "server" / "server_checkpoint" / "state.json").read_text())["step"]
        assert saved >= 2 and saved % 2 == 0  # whole rounds only
        port = server.port
        server = Server(sflags, tmp_path / "tok.json", extra=("--listen", f"127.0.0.1:{port}"))
        finish(c)
    finally:
        server.stop()
    assert any("resumed from" in line for line in server.lines), "".join(server.lines)
    assert rounds_done(tmp_path / "c0") == 6
    final = json.loads((tmp_path / "server" / "server_checkpoint" / "state.json").read_text())["step"]
    assert final == 6 * 2


# ---------------------------------------------------------------- in-process gRPC server (threads)


@pytest.fixture()
def live(assets, server_model, tmp_path):
    """A SplitService on a free loopback port in this process; yields (address, tokens, cfg, service)."""
    tokens = {T0: 0, T1: 1}
    cfg = methods.resolve(TrainConfig(method="sl", model=str(server_model), clients=2, client_layers="1",
                                      grad_accum=1, device="cpu", lora=LoraArgs(r=4, alpha=8, dropout=0.0)))
    net = NetArgs(timeout_s=1.0, retries=1, backoff_s=0.05)
    service = build_service(cfg, net, [0, 1], None)
    server, port = serve(service, "127.0.0.1:0", net, tokens)
    yield f"127.0.0.1:{port}", cfg, net, service
    server.stop(grace=0)


def act(cid: int, step: int = 0, b: int = 1, t: int = 5, h: int = H, value: float = 0.1) -> Activations:
    ids = torch.arange(t).expand(b, t).clone()
    labels = torch.full((b, t), -100)
    labels[:, -2:] = 7
    return Activations(cid, step, PathBatch(torch.full((b, t, h), value), torch.ones(b, t, dtype=torch.long),
                                            ids, labels))


def test_wrong_token_is_refused(live) -> None:
    address, cfg, net, _ = live
    with pytest.raises(RemoteError, match="UNAUTHENTICATED"):
        RemoteSplit(address, "not-a-token", cfg, net).hello()


def test_client_cannot_speak_for_another(live) -> None:
    address, cfg, net, _ = live
    with pytest.raises(RemoteError, match="PERMISSION_DENIED"):
        RemoteSplit(address, T0, cfg, net).call(act(cid=1))


def test_bad_tensors_are_rejected_and_the_server_keeps_serving(live) -> None:
    address, cfg, net, service = live
    link = RemoteSplit(address, T0, cfg, net)
    nan = act(0)
    nan.base.hidden[0, 1, 2] = float("nan")
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*NaN"):
        link.call(nan)
    with pytest.raises(RemoteError, match=r"INVALID_ARGUMENT.*shape \[1, 5, 16\]"):
        link.call(act(0, h=16))
    bad = act(0)
    bad.base.attention_mask = bad.base.attention_mask[:, :3]
    with pytest.raises(RemoteError, match="attention_mask"):
        link.call(bad)
    with pytest.raises(RemoteError, match="batch 99"):
        link.call(act(0, b=99))
    # still serving: client 1 is expected too; after the 1 s timeout the step runs with client 0 alone
    service.expected = {0, 1}
    service.benched.clear(), service.misses.clear()  # client 0 forgiven its refused messages, for this part
    reply = link.call(act(0))
    assert reply.grad.shape == (1, 5, H) and torch.isfinite(reply.grad).all()
    assert reply.loss["n_tokens"] == 2  # labels at positions 3 and 4, each predicted from the one before
    assert service.step == 1 and service.expected == {0} and service.benched == {1: 1}
    assert any("left out clients [1]" in line for line in service.log)


def test_stalled_client_is_told_to_resync(live) -> None:
    address, cfg, net, service = live
    a, b = RemoteSplit(address, T0, cfg, net), RemoteSplit(address, T1, cfg, net)
    a.call(act(0))          # client 1 never sends step 0: the step closes without it after 1 s
    from lesft.exchange import Resync

    with pytest.raises(Resync) as e:
        b.call(act(1))      # its late step 0 is refused; it learns where the server is
    assert e.value.round == 1
    # it missed step 0: benched until the next round start, which it rejoins by sending, not by its hello
    assert service.expected == {0} and service.benched == {1: 1}


def test_large_messages_travel_in_chunks_and_oversized_ones_are_refused(live) -> None:
    address, cfg, net, service = live
    service.expected = {0}
    link = RemoteSplit(address, T0, cfg, NetArgs(chunk_mb=0.01, retries=0))  # 10 KiB chunks
    reply = link.call(act(0, t=200))  # 200 x 32 fp32 = 25.6 KB of hidden states: three chunks
    assert reply.grad.shape == (1, 200, H)
    net.max_message_mb = 0.01  # the server's limit
    with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED.*0.01 MiB limit"):
        link.call(act(0, step=1, t=200))


def test_plaintext_only_on_loopback() -> None:
    with pytest.raises(ValueError, match="without TLS"):
        server_credentials("0.0.0.0:50051", NetArgs())
    with pytest.raises(ValueError, match="without TLS"):
        channel("10.1.2.3:50051", NetArgs())
    assert server_credentials("0.0.0.0:50051", NetArgs(insecure=True)) is None
    assert server_credentials("[::1]:50051", NetArgs()) is None


def test_server_never_loads_a_tokenizer(server_model, monkeypatch) -> None:
    import transformers

    def boom(*a, **k):
        raise AssertionError("the server loaded a tokenizer")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__init__", boom)
    cfg = TrainConfig(method="sl", model=str(server_model), client_layers="1", device="cpu")
    service = build_service(cfg, NetArgs(), [0], None)
    assert service.server.top.head is not None and len(service.server.top.layers) == 3


def test_label_private_networked_run_never_sends_target_ids(assets, server_model, tmp_path) -> None:
    """Clients in threads against an in-process gRPC server: same adapters as the in-process U-shaped run,
    and the server, which refuses any labels in this mode, saw none (so it served every step)."""
    from lesft.data.rows import load_jsonl
    from lesft.train import split_clients

    flags = base_flags(assets, tmp_path / "sim", label_privacy="true")
    cfg = methods.resolve(cfg_from(flags))
    sim = train(cfg)
    net = NetArgs(timeout_s=30)
    service = build_service(methods.resolve(cfg_from(base_flags(assets, tmp_path / "srv", label_privacy="true",
                                                                model=str(server_model)))),
                            net, [0, 1], tmp_path / "srv")
    server, port = serve(service, "127.0.0.1:0", net, {T0: 0, T1: 1})
    rows = load_jsonl(str(assets / "rows.jsonl"))
    shares = split_clients(cfg, rows)
    results: dict[int, dict] = {}

    def run(i: int) -> None:
        from dataclasses import replace

        link = RemoteSplit(f"127.0.0.1:{port}", (T0, T1)[i], cfg, net)
        results[i] = train(replace(cfg, out=str(tmp_path / f"c{i}")), rows=[rows[j] for j in shares[i]],
                           link=link, client_id=i)
        link.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        server.stop(grace=0)
    assert set(results) == {0, 1} and service.step == 2 * 2
    assert not [line for line in service.log if "left out" in line]
    ref = load_file(str(tmp_path / "sim" / "checkpoint" / "tensors.safetensors"))
    for i in range(2):
        net_t = load_file(str(tmp_path / f"c{i}" / "checkpoint" / "tensors.safetensors"))
        for k in (k for k in ref if k.startswith(f"client{i}.lora.")):
            torch.testing.assert_close(net_t[k], ref[k], atol=1e-5, rtol=1e-4)
    srv = load_file(str(tmp_path / "srv" / "server_checkpoint" / "tensors.safetensors"))
    for k in (k for k in ref if k.startswith("server.lora.")):
        torch.testing.assert_close(srv[k.removeprefix("server.")], ref[k], atol=1e-5, rtol=1e-4)
    # the server received activations (no labels), and the clients' dL/d(last hidden)
    got = service.meter.to_dict()["client_to_server"]
    assert set(got) == {"activations", "activation_grad"}
    assert sum(r["comm_detail"]["client_to_server"]["activations"]["payload_bytes"] for r in results.values()) == \
        sim["comm_detail"]["client_to_server"]["activations"]["payload_bytes"]


def test_label_private_server_refuses_labels(live) -> None:
    address, cfg, net, service = live
    service.cfg.label_privacy = True
    with pytest.raises(RemoteError, match="refuses target ids"):
        RemoteSplit(address, T0, cfg, net).call(act(0))


def test_tls_on_loopback_with_a_self_signed_certificate(live, tmp_path, assets, server_model) -> None:
    """A TLS server (certificate for localhost) accepts a client that trusts its CA and refuses one that does not."""
    self_signed(tmp_path)
    _, cfg, _, service = live
    tls = NetArgs(tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem"), retries=0, timeout_s=5)
    server, port = serve(service, "localhost:0", tls, {T0: 0})
    try:
        ok = RemoteSplit(f"localhost:{port}", T0, cfg, NetArgs(tls_ca=str(tmp_path / "cert.pem"), retries=0))
        assert ok.hello()["step"] == 0
        with pytest.raises(RemoteError, match="UNAVAILABLE"):  # plaintext client against the TLS port
            RemoteSplit(f"localhost:{port}", T0, cfg, NetArgs(retries=0, timeout_s=5)).hello()
    finally:
        server.stop(grace=0)


def test_mutual_tls_refuses_a_client_without_a_certificate(live, tmp_path, assets, server_model) -> None:
    """A server given --tls_ca requires client certificates signed by it: a client presenting one is served, a
    client with only the CA (no certificate) is refused, and half a client certificate is a clear error."""
    self_signed(tmp_path)
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    _, cfg, _, service = live
    server, port = serve(service, "localhost:0", NetArgs(tls_cert=cert, tls_key=key, tls_ca=cert, retries=0,
                                                         timeout_s=5), {T0: 0})
    try:
        ok = RemoteSplit(f"localhost:{port}", T0, cfg, NetArgs(tls_ca=cert, tls_cert=cert, tls_key=key, retries=0))
        assert ok.hello()["step"] == 0
        with pytest.raises(RemoteError, match="UNAVAILABLE"):
            RemoteSplit(f"localhost:{port}", T0, cfg, NetArgs(tls_ca=cert, retries=0, timeout_s=5)).hello()
        with pytest.raises(ValueError, match="a client certificate needs --tls_cert, --tls_key and --tls_ca"):
            RemoteSplit(f"localhost:{port}", T0, cfg, NetArgs(tls_ca=cert, tls_cert=cert, retries=0))
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1000, 10**6])
def test_chunks_and_join_round_trip_any_chunk_size(chunk_bytes) -> None:
    from lesft.deploy.wire import MB, chunks, join
    from lesft.messages import decode, encode, encode_parts

    msg = act(0, t=9, h=5)
    parts, _ = encode_parts(msg)
    whole = encode(msg)[0]
    assert b"".join(parts) == whole and (len(parts[0]) % 8 == 0)
    pieces = list(chunks(parts, chunk_bytes / MB))
    assert all(len(p) <= max(chunk_bytes, 1) for p in pieces) and b"".join(pieces) == whole
    back = decode(join(iter(pieces), 1.0))
    torch.testing.assert_close(back.base.hidden, msg.base.hidden)
    assert torch.equal(back.base.labels, msg.base.labels)
    with pytest.raises(ValueError, match="truncated"):
        join(iter(pieces[:-1] if len(pieces) > 1 else [whole[:-3]]), 1.0)


def test_a_step_that_fails_on_the_server_is_an_error_reply_and_serving_goes_on(live) -> None:
    address, cfg, net, service = live
    service.expected = {0}
    link = RemoteSplit(address, T0, cfg, net)
    service.limits.max_abs = float("inf")  # past the magnitude check: the step itself must catch it
    huge = act(0, value=3e38)  # finite, but NaN once squared in the norm: the server's loss refuses the step
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*step 0: the message of client 0 breaks"):
        link.call(huge)
    reply = link.call(act(0, step=1))
    assert torch.isfinite(reply.grad).all() and service.step == 2
    assert service.counts["steps_failed"] == 1 and service.counts["steps_completed"] == 1


def test_a_restarted_server_answers_the_last_step_again(server_model, tmp_path) -> None:
    """The reply to a round's last micro-step is in the checkpoint: a client whose reply was lost when the
    server died gets the same gradient from the restarted server, instead of losing its half of the round."""
    from lesft.messages import encode

    cfg = methods.resolve(TrainConfig(method="sl", model=str(server_model), client_layers="1", grad_accum=1,
                                      device="cpu", lora=LoraArgs(r=4, alpha=8, dropout=0.0)))
    data = encode(act(0))[0]
    first = build_service(cfg, NetArgs(), [0], tmp_path)
    reply = b"".join(first.exchange(0, bytearray(data)))
    assert first.step == 1
    again = build_service(cfg, NetArgs(), [0], tmp_path)  # a new process, from the checkpoint
    assert again.step == 1 and any("resumed from" in line for line in again.log)
    assert b"".join(again.exchange(0, bytearray(data))) == reply
    assert again.step == 1  # answered from the checkpoint, not trained twice


def test_cli_refuses_plaintext_on_a_public_address_before_loading_anything(tmp_path, capsys) -> None:
    from lesft.cli import main

    rc = main(["server", "--listen", "0.0.0.0:50099", "--tokens", str(tmp_path / "t.json"), "--model", "nowhere"])
    assert rc == 2 and "refusing to serve 0.0.0.0:50099 without TLS" in capsys.readouterr().err
    rc = main(["client", "--server", "10.9.8.7:50051", "--token", "x", "--client-id", "0", "--model", "nowhere"])
    assert rc == 2 and "refusing to connect to 10.9.8.7:50051 without TLS" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_a_client_that_skipped_rounds_says_so(assets, server_model, tmp_path, capsys) -> None:
    """Client 1 joins after the server trained 4 rounds with client 0: it trains 2 of its 6 rounds, its
    summary says which it skipped and why, and `lesft client` exits 3."""
    from lesft.cli import main

    cfg = cfg_from(base_flags(assets, tmp_path / "srv", method="sl", grad_accum=1, model=str(server_model)))
    net = NetArgs(timeout_s=1.0)
    service = build_service(cfg, net, [0, 1], None)
    server, port = serve(service, "127.0.0.1:0", net, {T0: 0, T1: 1})

    def lesft_client(cid: int, rounds: int) -> int:
        flags = strip_out(base_flags(assets, tmp_path, method="sl", grad_accum=1, rounds=rounds, timeout_s=1))
        return main(["client", "--server", f"127.0.0.1:{port}", "--token", (T0, T1)[cid], "--client-id", str(cid),
                     "--take-share", *flags, "--out", str(tmp_path / f"c{cid}")])

    try:
        assert lesft_client(0, 4) == 0
        capsys.readouterr()
        assert lesft_client(1, 6) == 3
    finally:
        server.stop(grace=0)
    err = capsys.readouterr().err
    assert "lesft client 1: trained 2 of 6 rounds; skipped 1..4" in err
    summary = json.loads((tmp_path / "c1" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rounds_planned"] == 6
    assert [(s["from"], s["to"]) for s in summary["rounds_skipped"]] == [(1, 4)]
    assert rounds_done(tmp_path / "c1") == 2
    assert json.loads((tmp_path / "c0" / "summary.json").read_text())["rounds_skipped"] == []
    assert service.counts["rounds_applied"] == 6 and service.counts["steps_failed"] == 0


def test_a_mid_round_server_restart_gives_the_uninterrupted_run(tokenizer, tmp_path) -> None:
    """The server "restarts" in the second micro-step of round 2 (its partial round lost, the client told to
    resync at round 2): the client rewinds its data and RNG, so adapters and losses equal an uninterrupted run."""
    from lesft.exchange import LocalSplit, Resync
    from lesft.roles import SplitServer
    from lesft.train import build_parts
    from lesft.transport import Loopback

    from conftest import make_model, rows

    cfg = methods.resolve(TrainConfig(method="lesft", aggregate_every=0, clients=1, rounds=3, grad_accum=2,
                                      client_layers="1", max_length=256, device="cpu", progress=False,
                                      lora=LoraArgs(r=4, alpha=8, dropout=0.1)))

    class Restarting(LocalSplit):
        def __init__(self, at: int | None) -> None:
            server = SplitServer(build_parts(cfg, make_model())[2], cfg, torch.device("cpu"))
            super().__init__(server, Loopback(cfg.wire_dtype))
            self.meter, self.at = self.transport.meter, at

        def join(self) -> int:
            return 0

        def micro_step(self, clients, step):
            if self.at is not None and step == self.at * cfg.grad_accum + 1:
                for c in clients:
                    c.forward(step)  # the batch is drawn and sent; the reply never comes
                self.server.optimizer.zero_grad(set_to_none=True)  # restarted from its round-start checkpoint
                self.at = None
                raise Resync(1)
            return super().micro_step(clients, step)

        def close(self, leave: bool = True) -> None:
            pass

    results = {}
    for name, at in (("plain", None), ("restarted", 1)):
        link = Restarting(at)
        summary = train(replace_out(cfg, tmp_path / name), make_model(), tokenizer, rows(8), link=link)
        results[name] = (summary, load_file(str(tmp_path / name / "checkpoint" / "tensors.safetensors")),
                         {k: v.clone() for k, v in link.server.top.state_dict().items() if "lora_" in k})
    (_, c0, v0), (s1, c1, v1) = results["plain"], results["restarted"]
    assert s1["rounds"] == 3 and s1["rounds_skipped"] == []
    assert [json.loads(x)["loss"] for x in (tmp_path / "plain" / "metrics.jsonl").open()] == \
        [json.loads(x)["loss"] for x in (tmp_path / "restarted" / "metrics.jsonl").open()]
    assert all(torch.equal(c0[k], c1[k]) for k in c0 if ".lora." in k)
    assert all(torch.equal(v0[k], v1[k]) for k in v0)


def replace_out(cfg: TrainConfig, out: Path) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, out=str(out))


def test_resume_after_a_kill_tells_one_story(tokenizer, tmp_path) -> None:
    """A client killed after writing round 3's metrics but before its next checkpoint (round 2) resumes; the server
    had gone on, so round 3 is skipped: metrics.jsonl no longer lists the dead process's round 3 (issue 31)."""
    from dataclasses import replace

    from lesft.exchange import LocalSplit
    from lesft.roles import SplitServer
    from lesft.train import build_parts
    from lesft.transport import Loopback

    from conftest import make_model, rows

    cfg = methods.resolve(TrainConfig(method="sl", clients=1, rounds=4, grad_accum=1, client_layers="1",
                                      max_length=128, device="cpu", progress=False, checkpoint_every=2,
                                      out=str(tmp_path / "c"), lora=LoraArgs(r=4, alpha=8, dropout=0.0)))

    class Link(LocalSplit):
        def __init__(self, joined: int, die_at: int | None) -> None:
            server = SplitServer(build_parts(cfg, make_model())[2], cfg, torch.device("cpu"))
            super().__init__(server, Loopback())
            self.meter, self.joined, self.die_at = self.transport.meter, joined, die_at

        def join(self) -> int:
            return self.joined

        def micro_step(self, clients, step):
            if step == self.die_at:
                raise SystemExit("killed")  # after round 3's metrics line, before a checkpoint
            return super().micro_step(clients, step)

        def close(self, leave: bool = True) -> None:
            pass

    with pytest.raises(SystemExit):
        train(cfg, make_model(), tokenizer, rows(8), link=Link(0, die_at=3))
    lines = [json.loads(x)["round"] for x in (tmp_path / "c" / "metrics.jsonl").open()]
    assert lines == [1, 2, 3]
    summary = train(replace(cfg, resume=True), make_model(), tokenizer, rows(8), link=Link(3, die_at=None))
    assert [(s["from"], s["to"]) for s in summary["rounds_skipped"]] == [(3, 3)]
    assert [json.loads(x)["round"] for x in (tmp_path / "c" / "metrics.jsonl").open()] == [1, 2, 4]


@pytest.mark.parametrize("server_mb", [64.0, 0.001], ids=["held", "evicted"])
def test_frozen_cache_over_grpc_equals_the_simulation(tokenizer, server_model, tmp_path, server_mb) -> None:
    """splitfrozen over gRPC with --frozen_cache_mb: epochs 2-3 send references; a server that holds nothing
    (0.001 MiB: every batch evicted at once, as after a restart) asks for every tensor again. Either way the
    server's adapter and the losses equal the in-process run that resends every batch."""
    from dataclasses import replace

    from lesft.deploy.cli import build_service
    from lesft.deploy.endpoint import serve
    from lesft.lora import lora_state

    from conftest import make_model, rows

    cfg = methods.resolve(TrainConfig(method="splitfrozen", model=str(server_model), clients=1, epochs=3,
                                      grad_accum=2, client_layers="1", max_length=128, device="cpu", progress=False,
                                      lora=LoraArgs(r=4, alpha=8, dropout=0.0), out=str(tmp_path / "sim")))
    sim = train(cfg, make_model(), tokenizer, rows(4))
    tok = "token-of-client-0-" + "c" * 16
    net = NetArgs(timeout_s=5.0, retries=0)
    service = build_service(replace(cfg, frozen_cache_mb=server_mb), net, [0], None)
    server, port = serve(service, "127.0.0.1:0", net, {tok: 0})
    try:
        link = RemoteSplit(f"127.0.0.1:{port}", tok, replace(cfg, frozen_cache_mb=8.0), net)
        got = train(replace(cfg, frozen_cache_mb=8.0, out=str(tmp_path / "net")), make_model(), tokenizer, rows(4),
                    link=link, client_id=0)
    finally:
        server.stop(grace=0)
    assert got["rounds"] == sim["rounds"] == 6
    sim_losses = [json.loads(x)["loss"] for x in (tmp_path / "sim" / "metrics.jsonl").open()]
    net_losses = [json.loads(x)["loss"] for x in (tmp_path / "net" / "metrics.jsonl").open()]
    assert net_losses == pytest.approx(sim_losses, rel=1e-6)
    want = {k: v for k, v in load_file(str(tmp_path / "sim" / "checkpoint" / "tensors.safetensors")).items()
            if k.startswith("server.lora.")}
    have = lora_state(service.server.top)
    assert len(have) == len(want) > 0
    for k, v in want.items():
        torch.testing.assert_close(have[k.removeprefix("server.lora.")], v, atol=1e-6, rtol=1e-5)
    up = got["comm_detail"]["client_to_server"]
    full = sim["comm_detail"]["client_to_server"]["activations"]["payload_bytes"]
    if server_mb > 1:  # epoch 1 in full (4 rows, batch 1), epochs 2-3 by reference
        assert up["activations"]["messages"] == 4 and up["cached_activations"]["messages"] == 8
        assert up["activations"]["payload_bytes"] * 3 == pytest.approx(full, rel=0.05)
    else:  # every reference missed: sent again in full
        assert up["cached_activations"]["messages"] == 8 and up["activations"]["messages"] == 12
        assert got["comm_detail"]["server_to_client"]["resend"]["messages"] == 8
