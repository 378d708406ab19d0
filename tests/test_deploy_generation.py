"""Split generation over gRPC on loopback: the same tokens as the merged model and as in process (standard
and label-private), the same bytes, TLS and tokens as training, bounded sessions, and bad input refused while
the server goes on serving."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import weakref

import pytest
import torch

from lesft.deploy.generation import RemoteError, RemoteGen, serve_generation
from lesft.deploy.wire import NetArgs
from lesft.evaluate import DEFAULT_STOP, generate
from lesft.generation import GenerationServer, SessionLimits, SplitGenerator, in_process
from lesft.messages import GenStep
from test_deploy import T0, T1, TIMEOUT, Server, env
from conftest import self_signed
from test_generation import PROMPTS, batch, make_run, merged



TOKENS = {T0: 0, T1: 1}
NET = NetArgs(timeout_s=10, retries=0)


@pytest.fixture()
def live(request, tokenizer, tmp_path):
    """A generation server in a thread of this process on a free loopback port; yields (address, run, local
    generator, server). ``request.param``: label-private or not; limits small enough to test."""
    lp = getattr(request, "param", False)
    run = make_run(tmp_path, tokenizer, "qwen2", 2, label_privacy=lp)
    local, _, _ = in_process(run)
    gen = GenerationServer(local.link.server.top, 32, SessionLimits(max_sessions=60, max_tokens=200, idle_s=1.0))
    server, port = serve_generation(gen, "127.0.0.1:0", NET, TOKENS)
    yield f"127.0.0.1:{port}", run, local, gen
    server.stop(grace=0)
    gen.shutdown()


def remote(address: str, local: SplitGenerator, token: str = T0, net: NetArgs = NET) -> SplitGenerator:
    return SplitGenerator(local.bottom, RemoteGen(address, token, net), local.generation_config, local.head)


@pytest.mark.parametrize("live", [False, True], indirect=True, ids=["standard", "label_private"])
def test_grpc_generation_equals_the_merged_model_and_in_process(live, tokenizer):
    address, run, local, gen = live
    got: list[torch.dtype] = []  # the dtype of every tensor the server receives over gRPC
    real = gen.step
    gen.step = lambda owner, msg: (got.extend(v.dtype for v in vars(msg).values() if isinstance(v, torch.Tensor)),
                                   real(owner, msg))[1]
    net = remote(address, local)
    ids, mask = batch(tokenizer, PROMPTS)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    want = merged(run).generate(**kw, do_sample=False, top_k=None, temperature=None, top_p=None)
    assert torch.equal(net.generate(**kw), want)
    assert torch.equal(local.generate(**kw), want)
    assert net.link.meter.to_dict() == local.link.meter.to_dict()  # the same bytes, message for message
    assert not gen.sessions  # closed at the end
    assert got and all(d.is_floating_point or d == torch.bool for d in got)  # never an integer tensor
    assert generate(net, tokenizer, PROMPTS, 12, 2, list(DEFAULT_STOP)) == generate(local, tokenizer, PROMPTS, 12, 2,
                                                                                       list(DEFAULT_STOP))


def test_bad_input_gets_a_clear_error_and_the_server_goes_on(live):
    address, _, local, gen = live
    link = RemoteGen(address, T0, NET)
    with pytest.raises(RemoteError, match="UNAUTHENTICATED"):
        RemoteGen(address, "not-a-token", NET).open({"batch": 1})
    sid = link.open({"batch": 1})
    h, m = torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(RemoteError, match="NOT_FOUND.*unknown or expired"):
        link.step(GenStep("no-such-session", 0, h, m))
    with pytest.raises(RemoteError, match="PERMISSION_DENIED"):
        RemoteGen(address, T1, NET).step(GenStep(sid, 0, h, m))
    with pytest.raises(RemoteError, match=r"INVALID_ARGUMENT.*shape \[1, 4, 16\]"):
        link.step(GenStep(sid, 0, torch.randn(1, 4, 16), m))
    nan = h.clone()
    nan[0, 2, 3] = float("inf")
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*NaN or infinite"):
        link.step(GenStep(sid, 0, nan, m))
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*batch 0"):
        link.open({"batch": 0})
    with pytest.raises(RemoteError, match="FAILED_PRECONDITION.*label privacy"):
        link.open({"batch": 1, "label_private": True})
    assert link.step(GenStep(sid, 0, h, m)).tokens.shape == (1,)  # the session itself is still fine
    with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED.*limit is 200"):  # past its positions
        link.step(GenStep(link.open({"batch": 1}), 0, torch.randn(1, 201, 32), torch.ones(1, 201, dtype=torch.bool)))
    gen.limits.max_sessions = len(gen.sessions)
    with pytest.raises(RemoteError, match="RESOURCE_EXHAUSTED.*sessions open"):  # past the open sessions
        link.open({"batch": 1})
    gen.limits.max_sessions = 60
    # a bad message body
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*malformed"):
        link._call("raw", lambda: b"".join(link._step(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", metadata=link.metadata,
                                                      timeout=5)))
    # and other sessions are served as before
    ids = torch.tensor([[5, 6, 7]])
    out = remote(address, local).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                          pad_token_id=0)
    assert torch.equal(out, local.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                           pad_token_id=0))


def test_vanished_clients_sessions_are_dropped_and_their_memory_returns(live):
    address, _, local, gen = live
    link = RemoteGen(address, T0, NET)
    gen.limits.idle_s = 600.0  # none expires while they are being opened on a busy machine
    for _ in range(50):  # 50 clients open a session, prefill 64 positions and vanish without closing
        sid = link.open({"batch": 2})
        link.step(GenStep(sid, 0, torch.randn(2, 64, 32), torch.ones(2, 64, dtype=torch.bool)))
    # Qwen2's server layers slide over 6 positions: each cache keeps the last 5 of 2 rows, keys and values
    per_session = 2 * 2 * 2 * 2 * 5 * 8 * 4  # layers x (k + v) x rows x kv heads x positions x head dim x fp32
    assert len(gen.sessions) == 50 and gen.held_bytes() == 50 * per_session
    caches = [weakref.ref(s.cache) for s in gen.sessions.values()]
    link.shutdown()
    gen.limits.idle_s = 0.2
    deadline = time.monotonic() + 10
    while gen.sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not gen.sessions and gen.held_bytes() == 0  # the reaper dropped them
    gc.collect()
    assert all(r() is None for r in caches)  # and nothing holds their caches any more
    with pytest.raises(RemoteError, match="NOT_FOUND"):
        RemoteGen(address, T0, NET).step(GenStep(sid, 1, torch.randn(2, 1, 32)))
    ids = torch.tensor([[5, 6, 7]])  # and a new client is served
    assert remote(address, local).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=3, pad_token_id=0).shape == (1, 6)


def test_generation_over_tls(live, tmp_path):
    _, _, local, gen = live
    cert, key = self_signed(tmp_path)
    server, port = serve_generation(gen, "localhost:0", NetArgs(tls_cert=cert, tls_key=key), TOKENS)
    try:
        ids = torch.tensor([[5, 6, 7]])
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0)
        ok = remote(f"localhost:{port}", local, net=NetArgs(tls_ca=cert, retries=0, timeout_s=10))
        assert torch.equal(ok.generate(**kw), local.generate(**kw))
        with pytest.raises(RemoteError, match="UNAVAILABLE"):  # a plaintext client against the TLS port
            RemoteGen(f"localhost:{port}", T0, NetArgs(retries=0, timeout_s=5)).open({"batch": 1})
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("mode", ["only", "on"])
def test_lesft_server_and_lesft_client_generate_across_processes(tokenizer, tmp_path, mode):
    """``--generation only``: the generation service alone; ``on``: next to the training service, one port."""
    run = make_run(tmp_path, tokenizer, "llama", 2)
    (tmp_path / "tok.json").write_text(json.dumps({"0": T0}))
    (tmp_path / "tok.json").chmod(0o600)
    server = Server(["--config", str(run / "config.yaml"), "--generation", mode, "--adapter", str(run / "adapter"),
                     "--device", "cpu", "--out", str(tmp_path / "srv")], tmp_path / "tok.json")
    try:
        prompts = ["What is 2 + 3?", "Hi"]
        p = subprocess.run([sys.executable, "-m", "lesft.cli", "client", "generate", "--run", str(run), "--server",
                            server.address, "--token-file", str(tmp_path / "tok.json"), "--client-id", "0",
                            "--prompt", *prompts, "--max-new-tokens", "8"],
                           env=env(), capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        server.stop()
    got = [json.loads(x)["completion"] for x in p.stdout.splitlines()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in prompts]
    assert got == generate(merged(run), tokenizer, texts, 8, 16, list(DEFAULT_STOP))
    cost = json.loads(p.stderr.split("lesft generate: ")[-1].splitlines()[0])
    assert cost["sequences"] == 2 and cost["bytes_per_decoded_token"]["client_to_server"] > 32 * 4
