"""A hostile or broken client against the split server: every bad input refused with the right status code,
nothing poisoned, stalled or exhausted; on loopback, in this process, every wait bounded.

``HOSTILE`` is the table of inputs tried, with the status code each must get (docs/deploy.md refers here)."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import threading
import time
from dataclasses import replace

import grpc
import pytest
import torch

from lesft import methods
from lesft.config import TrainConfig
from lesft.typed import to_dict
from lesft.deploy.cli import build_service
from lesft.deploy.remote import RemoteError, RemoteSplit
from lesft.deploy.checks import Limits
from lesft.deploy.endpoint import serve
from lesft.deploy.service import SplitService
from lesft.deploy.wire import EXCHANGE, EXCHANGE_ONE, HELLO, NetArgs, load_tokens
from lesft.lora import LoraArgs, lora_state
from lesft.messages import Activations, ActivationGrad, AdapterUpload, PathBatch, encode

H, V = 32, 104  # the tiny model's hidden size and vocabulary (conftest.make_model)
T0, T1 = "token-of-client-0-" + "a" * 16, "token-of-client-1-" + "b" * 16
OK, INV, AUTH = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED
PRE, PERM = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED
EXH = grpc.StatusCode.RESOURCE_EXHAUSTED


def make_cfg(server_model, **kw) -> TrainConfig:
    return methods.resolve(TrainConfig(method="sl", model=str(server_model), clients=2, client_layers="1",
                                       grad_accum=1, device="cpu", lora=LoraArgs(r=4, alpha=8, dropout=0.0), **kw))


def start(server_model, net: NetArgs | None = None, limits: Limits | None = None, out=None, **kw):
    cfg = make_cfg(server_model, **kw)
    net = net or NetArgs(timeout_s=1.0, retries=0, backoff_s=0.05)
    service = build_service(cfg, net, [0, 1], out)
    if limits is not None:
        service.limits = limits
    server, port = serve(service, "127.0.0.1:0", net, {T0: 0, T1: 1})
    return service, server, f"127.0.0.1:{port}", cfg, net


@pytest.fixture()
def live(server_model):
    service, server, address, cfg, net = start(server_model)
    service.expected = {0}  # a valid message is computed at once
    yield address, cfg, net, service
    server.stop(grace=0)


@pytest.fixture()
def live_lp(server_model):
    service, server, address, cfg, net = start(server_model, label_privacy=True)
    service.expected = {0}
    yield address, cfg, net, service
    server.stop(grace=0)


def act(cid: int = 0, step: int = 0, b: int = 1, t: int = 5, value: float = 0.1, **over) -> Activations:
    """A valid message (2 target tokens); ``over`` replaces base tensors (``hidden=``, ``labels=``, ...)."""
    labels = torch.full((b, t), -100)
    labels[:, -2:] = 7
    base = dict(hidden=torch.full((b, t, H), value), attention_mask=torch.ones(b, t, dtype=torch.long),
                position_ids=torch.arange(t).expand(b, t).clone(), labels=labels)
    base.update(over)
    return Activations(cid, step, PathBatch(**base))


def wire(msg) -> bytes:
    return encode(msg)[0]


def forge(header: dict | bytes | list, payload: bytes = b"", length: int | None = None) -> bytes:
    """Raw bytes: [8-byte length][header][payload]; ``length`` overrides the announced header length."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(h) if length is None else length).to_bytes(8, "little") + h + payload


def edit(msg, fn, extra: bytes = b"") -> bytes:
    """``msg`` encoded, with ``fn(header)`` applied to its JSON header (the payload kept, ``extra`` appended)."""
    data = wire(msg)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    fn(header)
    return forge(header, data[8 + n:] + extra)


def spec(header: dict, name: str) -> dict:
    return next(s for s in header["tensors"] if s["name"] == name)


def msg_with(field: str, value):
    m = act()
    setattr(m, field, value)
    return m


HID = {"name": "base.hidden", "dtype": "float32", "shape": [1, 5, H], "nbytes": 5 * H * 4}
HEAD = {"kind": "activations", "fields": {"client": 0, "step": 0}, "tensors": [HID]}

# name -> (what is sent, the status code it must get, words the reason must contain)
# what is sent: bytes for ExchangeOne as client 0; ("hello", bytes) for Hello as client 0;
# ("auth", metadata value) for a valid hello with that authorization metadata.
HOSTILE: dict[str, tuple] = {
    # -- authentication
    "no authorization metadata": (("auth", None), AUTH, "token"),
    "token without the Bearer scheme": (("auth", T0), AUTH, "Bearer"),
    "lower-case bearer": (("auth", f"bearer {T0}"), AUTH, "token"),
    "Basic scheme": (("auth", f"Basic {T0}"), AUTH, "token"),
    "empty bearer token": (("auth", "Bearer "), AUTH, "token"),
    "unknown token": (("auth", "Bearer " + "z" * 32), AUTH, "token"),
    "token with a trailing space": (("auth", f"Bearer {T0} "), AUTH, "token"),
    "two spaces after Bearer": (("auth", f"Bearer  {T0}"), AUTH, "token"),
    "a prefix of a valid token": (("auth", f"Bearer {T0[:-1]}"), AUTH, "token"),
    # -- hello
    "hello: not JSON": (("hello", b"\xff\x00{"), INV, "not JSON"),
    "hello: a JSON list": (("hello", b"[1, 2]"), INV, "run config"),
    "hello: without a config": (("hello", b"{}"), INV, "run config"),
    "hello: config is a string": (("hello", b'{"config": "sl"}'), INV, "run config"),
    "hello: empty config": (("hello", b'{"config": {}}'), PRE, "disagree"),
    "hello: another seed": ("hello-seed", PRE, "seed"),
    # -- framing and header
    "empty message": (b"", INV, "truncated"),
    "7 bytes": (b"\x01" * 7, INV, "truncated"),
    "header length 2^62": (forge(HEAD, length=1 << 62), INV, "header"),
    "header length just over 1 MiB": (forge(HEAD, length=(1 << 20) + 1), INV, "header"),
    "header longer than the message": (forge(HEAD, length=4000), INV, "truncated"),
    "header not JSON": (forge(b"{not json"), INV, "JSON"),
    "header nested 100,000 deep": (forge(b"[" * 100_000 + b"]" * 100_000), INV, "brackets"),
    "header nested 10,000 deep": (forge(b"[" * 10_000 + b"]" * 10_000), INV, "nested too deeply"),
    "header not UTF-8": (forge(b"\xff\xfe\xfd"), INV, "JSON"),
    "header a JSON list": (forge([1, 2, 3]), INV, "JSON object"),
    "header without tensors": (forge({"kind": "activations", "fields": {}}), INV, "JSON object"),
    "header fields a list": (forge({"kind": "activations", "fields": [], "tensors": []}), INV, "JSON object"),
    "tensor spec a string": (forge({**HEAD, "tensors": ["x"]}), INV, "name"),
    "tensor spec without a name": (forge({**HEAD, "tensors": [{"dtype": "float32"}]}), INV, "name"),
    "unknown dtype": (forge({**HEAD, "tensors": [{**HID, "dtype": "complex64"}]}), INV, "dtype"),
    "shape [-1, 5, H]": (forge({**HEAD, "tensors": [{**HID, "shape": [-1, 5, H]}]}, b"\0" * HID["nbytes"]),
                         INV, "non-negative"),
    "shape with a float": (forge({**HEAD, "tensors": [{**HID, "shape": [1.0, 5, H]}]}), INV, "non-negative"),
    "shape a string": (forge({**HEAD, "tensors": [{**HID, "shape": "1,5,32"}]}), INV, "non-negative"),
    "shape of 9 dimensions": (forge({**HEAD, "tensors": [{**HID, "shape": [1] * 9}]}), INV, "non-negative"),
    "nbytes not numel*itemsize": (forge({**HEAD, "tensors": [{**HID, "nbytes": 7}]}, b"\0" * 7), INV, "bytes"),
    "nbytes negative": (forge({**HEAD, "tensors": [{**HID, "nbytes": -640}]}), INV, "bytes"),
    "payload truncated": (wire(act())[:-3], INV, "truncated"),
    "payload with extra bytes": (wire(act()) + b"\0" * 8, INV, "longer"),
    "unknown kind": (edit(act(), lambda h: h.update(kind="rootkit")), INV, "kind"),
    "kind missing": (edit(act(), lambda h: h.pop("kind")), INV, "kind"),
    "duplicate tensor": (edit(act(), lambda h: h["tensors"].append(dict(spec(h, "base.labels"))), b"\0" * 40),
                         INV, "twice"),
    "unknown field": (edit(act(), lambda h: h["fields"].update(evil=1)), INV, "does not have"),
    "unknown tensor": (edit(act(), lambda h: spec(h, "base.labels").update(name="weights.x")), INV, "does not have"),
    "unknown path tensor": (edit(act(), lambda h: spec(h, "base.labels").update(name="base.evil")), INV, "expected"),
    "client field missing": (edit(act(), lambda h: h["fields"].pop("client")), INV, "needs the fields"),
    "adapter upload to the split server": (wire(AdapterUpload(0, 3, {"a": torch.ones(2)})), INV, "unexpected"),
    "activation_grad outside label-private mode": (wire(ActivationGrad(0, 0, torch.ones(1, 5, H))), INV, "unexpected"),
    "over --max_message_mb": (forge({**HEAD, "tensors": [{**HID, "shape": [1 << 20, 1024], "nbytes": 1 << 32}]}),
                              EXH, "MiB limit"),
    # -- scalar fields
    "step negative": (wire(act(step=-1)), INV, "step"),
    "step a string": (wire(msg_with("step", "0")), INV, "step"),
    "step a float": (wire(msg_with("step", 0.0)), INV, "step"),
    "step a bool": (wire(msg_with("step", False)), INV, "step"),
    "step far ahead": (wire(act(step=1 << 40)), PRE, "resync"),
    "client id of another client": (wire(act(cid=1)), PERM, "as client 1"),
    "client id a string": (wire(msg_with("client", "0")), INV, "'client' of a 'activations' message must be an integer"),
    "batch_rows outside label-private mode": (wire(msg_with("batch_rows", 1)), INV, "batch_rows"),
    # -- hidden states
    "hidden int64": (wire(act(hidden=torch.ones(1, 5, H, dtype=torch.long))), INV, "expected a float"),
    "hidden int32": (wire(act(hidden=torch.ones(1, 5, H, dtype=torch.int32))), INV, "expected a float"),
    "hidden bool": (wire(act(hidden=torch.ones(1, 5, H, dtype=torch.bool))), INV, "expected a float"),
    "hidden 2-D": (wire(act(hidden=torch.ones(5, H))), INV, "shape"),
    "hidden of the wrong width": (wire(act(hidden=torch.ones(1, 5, 16))), INV, "shape"),
    "hidden batch 0": (wire(act(b=0)), INV, "batch 0"),
    "hidden batch 99": (wire(act(b=99)), INV, "batch 99"),
    "hidden sequence 0": (wire(act(t=0)), INV, "sequence 0"),
    "hidden NaN": (wire(act(value=float("nan"))), INV, "NaN"),
    "hidden +inf": (wire(act(value=float("inf"))), INV, "NaN or infinite"),
    "hidden -inf": (wire(act(value=float("-inf"))), INV, "NaN or infinite"),
    "hidden 3e38": (wire(act(value=3e38)), INV, "magnitude"),
    "hidden 1e7": (wire(act(value=-1e7)), INV, "magnitude"),
    # -- attention mask
    "mask value 7": (wire(act(attention_mask=torch.full((1, 5), 7))), INV, "0 or 1"),
    "mask value -1": (wire(act(attention_mask=torch.full((1, 5), -1))), INV, "0 or 1"),
    "mask all zeros": (wire(act(attention_mask=torch.zeros(1, 5, dtype=torch.long))), INV, "at least one"),
    "mask one row all zeros": (wire(act(b=2, attention_mask=torch.tensor([[1] * 5, [0] * 5]))), INV, "at least one"),
    "mask float": (wire(act(attention_mask=torch.ones(1, 5))), INV, "attention_mask"),
    "mask int32": (wire(act(attention_mask=torch.ones(1, 5, dtype=torch.int32))), INV, "int64"),
    "mask bool": (wire(act(attention_mask=torch.ones(1, 5, dtype=torch.bool))), INV, "int64"),
    "mask of the wrong shape": (wire(act(attention_mask=torch.ones(1, 3, dtype=torch.long))), INV, "attention_mask"),
    "mask missing": (wire(act(attention_mask=None)), INV, "attention_mask"),
    # -- position ids
    "positions 2^62": (wire(act(position_ids=torch.full((1, 5), 1 << 62))), INV, "position_ids"),
    "positions negative": (wire(act(position_ids=torch.full((1, 5), -3))), INV, "position_ids"),
    "positions 8192": (wire(act(position_ids=torch.full((1, 5), 8192))), INV, "position_ids"),
    "positions int32": (wire(act(position_ids=torch.zeros(1, 5, dtype=torch.int32))), INV, "int64"),
    "positions missing": (wire(act(position_ids=None)), INV, "position_ids"),
    # -- labels
    "labels bool": (wire(act(labels=torch.ones(1, 5, dtype=torch.bool))), INV, "int64"),
    "labels uint8": (wire(act(labels=torch.ones(1, 5, dtype=torch.uint8))), INV, "int64"),
    "labels int32": (wire(act(labels=torch.ones(1, 5, dtype=torch.int32))), INV, "int64"),
    "labels float": (wire(act(labels=torch.ones(1, 5))), INV, "int64"),
    "labels = vocabulary size": (wire(act(labels=torch.full((1, 5), V))), INV, "outside"),
    "labels -5": (wire(act(labels=torch.full((1, 5), -5))), INV, "outside"),
    "labels all -100": (wire(act(labels=torch.full((1, 5), -100))), INV, "no target tokens"),
    "labels missing": (wire(act(labels=None)), INV, "labels"),
    "labels of the wrong shape": (wire(act(labels=torch.full((2, 5), 7))), INV, "labels"),
    "reference path when paths=single": (wire(replace(act(), reference=act().base)), INV, "reference"),
}


def raw_call(address: str, what, timeout: float = 20.0, token: str = T0) -> tuple[grpc.StatusCode, str]:
    """Send one table entry with a raw gRPC client; return (status code, details)."""
    with grpc.insecure_channel(address) as ch:
        md: tuple = (("authorization", f"Bearer {token}"),)
        try:
            if isinstance(what, bytes):
                list(ch.unary_stream(EXCHANGE_ONE)(what, metadata=md, timeout=timeout))
            elif what[0] == "hello":
                ch.unary_unary(HELLO)(what[1], metadata=md, timeout=timeout)
            else:
                md = () if what[1] is None else (("authorization", what[1]),)
                ch.unary_unary(HELLO)(b"{}", metadata=md, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return OK, ""


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_refused_with_its_code_and_logged(live, name) -> None:
    address, cfg, net, service = live
    what, code, words = HOSTILE[name]
    if what == "hello-seed":  # a full config that differs in one field
        from lesft.typed import to_dict

        mine = to_dict(service.cfg)
        what = ("hello", json.dumps({"config": {**mine, "seed": mine["seed"] + 1}}).encode())
    got, details = raw_call(address, what)
    assert got == code, f"{name}: {got} {details}"
    assert words in details, details
    assert "\n" not in details and "Traceback" not in details
    assert any(line.startswith("refused client") and code.name in line for line in service.log), list(service.log)
    assert service.step == 0  # nothing was trained on it
    t0 = time.monotonic()
    ok = RemoteSplit(address, T1, cfg, net).call(act(1))  # and the server still serves
    assert torch.isfinite(ok.grad).all() and service.step == 1
    if isinstance(what, bytes) and code in (INV, PERM):  # client 0's message was refused: no wait for client 0
        assert time.monotonic() - t0 < net.timeout_s and 0 in service.benched


# ---------------------------------------------------------------- label-private mode (item 5)


def lp_act(cid: int, step: int = 0, b: int = 1, rows=1) -> Activations:
    m = act(cid, step, b=b, labels=None)
    m.batch_rows = rows
    return m


@pytest.mark.parametrize("rows,words", [(None, "batch_rows"), (10**9, "batch_rows"), (-1, "batch_rows"),
                                        (0.5, "batch_rows"), ("1", "batch_rows"), (True, "batch_rows"),
                                        (2, "batch_rows")])
def test_label_private_bad_batch_rows_is_refused(live_lp, rows, words) -> None:
    address, cfg, net, service = live_lp
    got, details = raw_call(address, wire(lp_act(0, rows=rows)))
    assert got == INV and words in details


def test_label_private_labels_are_refused(live_lp) -> None:
    address, *_ = live_lp
    m = act(0)
    m.batch_rows = 1
    got, details = raw_call(address, wire(m))
    assert got == INV and "refuses target ids" in details


def test_label_private_bad_gradient_fails_only_its_sender(live_lp) -> None:
    """Two clients in one step; client 1 answers the server's hidden states with a gradient of the wrong
    batch size, then NaN, then 1e9: it is refused each time (INVALID_ARGUMENT), client 0's step goes on."""
    address, cfg, net, service = live_lp
    service.expected = {0, 1}
    replies: dict[int, object] = {}

    def forward(cid: int) -> None:
        replies[cid] = RemoteSplit(address, (T0, T1)[cid], cfg, net).call(lp_act(cid))

    threads = [threading.Thread(target=forward, args=(c,)) for c in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert replies[0].batch_rows == 2 == replies[1].batch_rows  # the step's rows with targets, both clients
    bad = RemoteSplit(address, T1, cfg, net)
    for g, words in ((torch.zeros(3, 5, H), "expected [1, 5, 32]"), (torch.full((1, 5, H), float("nan")), "NaN"),
                     (torch.full((1, 5, H), 1e9), "magnitude")):
        with pytest.raises(RemoteError, match=f"INVALID_ARGUMENT.*{re.escape(words)}"):
            bad.call(ActivationGrad(1, 0, g))
    back = RemoteSplit(address, T0, cfg, net).call(ActivationGrad(0, 0, torch.full((1, 5, H), 0.01)))
    assert back.grad.shape == (1, 5, H) and torch.isfinite(back.grad).all()
    assert service.step == 1


# ---------------------------------------------------------------- poisoning (item 1)


def test_one_clients_3e38_cannot_poison_the_adapter(server_model) -> None:
    """Past the magnitude check (limit off), a 3e38 activation breaks the step: it is rerun without that
    client, whose call is refused; the honest client's reply and the server adapter equal a run without it."""
    service, server, address, cfg, net = start(server_model, limits=Limits(max_abs=float("inf")))
    ref = build_service(cfg, NetArgs(timeout_s=1.0), [0], None)  # the same server, the honest client only
    try:
        out: dict[int, object] = {}

        def send(cid: int, value: float) -> None:
            try:
                out[cid] = RemoteSplit(address, (T0, T1)[cid], cfg, net).call(act(cid, value=value))
            except RemoteError as e:
                out[cid] = e

        threads = [threading.Thread(target=send, args=a) for a in ((0, 0.1), (1, 3e38))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.stop(grace=0)
    assert isinstance(out[1], RemoteError) and "INVALID_ARGUMENT" in str(out[1]) and "client 1 breaks" in str(out[1])
    want = ref.exchange(0, bytearray(wire(act(0))))
    from lesft.messages import decode

    torch.testing.assert_close(out[0].grad, decode(bytearray(b"".join(want))).grad, rtol=0, atol=0)
    got, exp = lora_state(service.server.top), lora_state(ref.server.top)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert all(torch.equal(got[k], exp[k]) for k in exp) and service.counts["rounds_applied"] == 1
    assert any("client 1's contribution dropped" in line for line in service.log)


def test_a_non_finite_update_is_not_applied(server_model) -> None:
    """Gradients that reach the round's end non-finite: the update is skipped, the adapter kept, and logged."""
    cfg = make_cfg(server_model)
    service = build_service(cfg, NetArgs(timeout_s=1.0), [0], None)
    service.exchange(0, bytearray(wire(act(0))))
    before = lora_state(service.server.top)
    service.params[0].grad = torch.full_like(service.params[0], float("nan"))
    service.contributed = True
    with service.cv:
        service._close_step()
    after = lora_state(service.server.top)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert service.counts == {"steps_completed": 1, "steps_failed": 0, "rounds_applied": 1, "rounds_rejected": 1}
    assert any("update not applied" in line for line in service.log)


# ---------------------------------------------------------------- resources (items 2, 3, 4)


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmRSS"))


def held_stream(address: str, cid: int, first: bytes, release: threading.Event, result: list) -> threading.Thread:
    """A stream of client ``cid`` that sends ``first`` and then nothing until ``release``."""
    def run() -> None:
        def chunks():
            yield first
            release.wait(60)
        with grpc.insecure_channel(address) as ch:
            try:
                list(ch.stream_stream(EXCHANGE)(chunks(), metadata=(("authorization", f"Bearer {(T0, T1)[cid]}"),),
                                                timeout=60))
                result.append(OK)
            except grpc.RpcError as e:
                result.append(e.code())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_1_gib_announcement_costs_the_server_little(server_model) -> None:
    service, server, address, cfg, net = start(server_model, net=NetArgs(timeout_s=5.0, max_streams=3))
    first = forge({**HEAD, "tensors": [{**HID, "shape": [1, 8192, 32768], "nbytes": 1 << 30}]}) + b"\0" * 100
    release, result = threading.Event(), []
    try:
        before = rss_bytes()
        threads = [held_stream(address, 0, first, release, result) for _ in range(3)]
        wait = time.monotonic() + 30
        while sum(service.admission.streams.values()) < 3 and time.monotonic() < wait:
            time.sleep(0.05)
        time.sleep(0.5)
        grown = rss_bytes() - before
        release.set()
        for t in threads:
            t.join(60)
    finally:
        server.stop(grace=0)
    assert grown < 16 * 2**20, f"{grown / 2**20:.1f} MiB for three 1 GiB announcements"
    assert result == [INV] * 3  # each truncated at 274 of 1 GiB + 174 bytes


def test_stalled_streams_do_not_stop_an_honest_client(server_model) -> None:
    """Client 1 opens 8 streams that send 100 bytes and stay open: 2 are admitted (--max_streams) and end with
    DEADLINE_EXCEEDED after --recv_timeout_s, 6 are refused at once; client 0's steps go on meanwhile."""
    net = NetArgs(timeout_s=1.0, retries=0, recv_timeout_s=3.0)
    service, server, address, cfg, _ = start(server_model, net=net)
    release, result = threading.Event(), []
    try:
        first = wire(act(1))[:100]
        threads = [held_stream(address, 1, first, release, result) for _ in range(8)]
        wait = time.monotonic() + 30
        while len(result) < 6 and time.monotonic() < wait:
            time.sleep(0.05)
        t0 = time.monotonic()
        link = RemoteSplit(address, T0, cfg, net)
        for step in range(3):
            assert torch.isfinite(link.call(act(0, step=step)).grad).all()
        honest_s = time.monotonic() - t0
        for t in threads:
            t.join(60)
        release.set()
    finally:
        server.stop(grace=0)
    assert sorted(r.name for r in result) == ["DEADLINE_EXCEEDED"] * 2 + ["RESOURCE_EXHAUSTED"] * 6
    assert honest_s < 30  # generous: the first step waits at most --timeout_s (1 s) for client 1
    assert any("DEADLINE_EXCEEDED" in line and "--recv_timeout_s" in line for line in service.log)


def threads_in_exchange() -> int:
    """Threads whose stack is inside SplitService.exchange, counted from their frames."""
    code = SplitService.exchange.__code__
    n = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code is code:
                n += 1
                break
            frame = frame.f_back
    return n


def test_a_message_for_a_step_being_computed_is_answered_and_no_thread_leaks(live) -> None:
    address, cfg, net, service = live
    computing, go = threading.Event(), threading.Event()
    compute = service._compute

    def slow(*a, **k):
        computing.set()
        go.wait(30)
        return compute(*a, **k)

    service._compute = slow
    assert threads_in_exchange() == 0
    first: list = []
    t = threading.Thread(target=lambda: first.append(raw_call(address, wire(act(0)))))
    t.start()
    assert computing.wait(30)
    late = raw_call(address, wire(act(1)), timeout=10, token=T1)  # client 1's step 0, while step 0 runs without it
    go.set()
    t.join(30)
    assert late[0] == PRE and "resync" in late[1]
    assert first == [(OK, "")]
    wait = time.monotonic() + 30
    while threads_in_exchange() and time.monotonic() < wait:
        time.sleep(0.05)
    assert threads_in_exchange() == 0
    service._compute = compute
    service.expected = {0, 1}  # both honest clients take part in the next step
    out: dict[int, object] = {}
    ts = [threading.Thread(target=lambda c=c: out.setdefault(c, RemoteSplit(address, (T0, T1)[c], cfg, net)
                                                             .call(act(c, step=1)))) for c in (0, 1)]
    for x in ts:
        x.start()
    for x in ts:
        x.join(60)
    assert set(out) == {0, 1} and not [ln for ln in service.log if "left out clients [1]" in ln]


# ---------------------------------------------------------------- tokens (item 7)


@pytest.mark.parametrize("token", ["", "x", "s" * 21, "has a space in it but long", "tab\tin-the-token-xxxxxxxx",
                                   "ünïcödé-token-of-some-length"])
def test_bad_tokens_in_the_file_are_refused(tmp_path, token) -> None:
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps({"0": token, "1": T1}))
    p.chmod(0o600)
    with pytest.raises(ValueError, match="token of client 0"):
        load_tokens(p)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_tokens_file_others_can_read_is_refused(tmp_path, mode) -> None:
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps({"0": T0}))
    p.chmod(mode)
    with pytest.raises(ValueError, match=f"mode {mode:04o}.*chmod 600"):
        load_tokens(p)


def test_a_new_tokens_file_is_created_0600_in_one_step(tmp_path, monkeypatch) -> None:
    opened, real_open = [], os.open

    def spy(path, flags, mode=0o777, *a, **k):
        opened.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod after writing the secrets"))
    old = os.umask(0)  # even with no umask, no other user could ever read it
    try:
        tokens = load_tokens(tmp_path / "new" / "tokens.json", clients=3)
    finally:
        os.umask(old)
    p = tmp_path / "new" / "tokens.json"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and sorted(tokens.values()) == [0, 1, 2]
    created = [o for o in opened if o[1] & os.O_CREAT]
    assert created and all(o[2] == 0o600 and o[1] & os.O_EXCL for o in created)
    assert all(len(t) >= 22 for t in tokens) and list(tmp_path.glob("new/.*")) == []


def test_serve_refuses_short_tokens(live) -> None:
    _, _, net, service = live
    with pytest.raises(ValueError, match="shorter than 22"):
        serve(service, "127.0.0.1:0", net, {"tok-0": 0})


def test_a_step_that_fails_for_no_clients_fault_is_internal_and_the_client_resyncs(live) -> None:
    address, cfg, net, service = live
    compute = service._compute

    def broken(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    service._compute = broken
    from lesft.exchange import Resync

    with pytest.raises(Resync) as e:
        RemoteSplit(address, T0, cfg, net).call(act(0))
    assert e.value.round == 1 and service.step == 1 and service.counts["steps_failed"] == 1
    assert any("INTERNAL" not in ln and "out of memory (simulated)" in ln for ln in service.log)
    got = raw_call(address, wire(act(0, step=0)))  # the cached answer to that step: one line, no raw text
    assert got[0] == grpc.StatusCode.INTERNAL and "RuntimeError (see the server log)" in got[1]
    assert "out of memory" not in got[1]
    service._compute = compute
    assert torch.isfinite(RemoteSplit(address, T0, cfg, net).call(act(0, step=1)).grad).all()


def test_a_client_retries_calls_open_with_jittered_backoff(monkeypatch) -> None:
    """RESOURCE_EXHAUSTED 'calls open' is retried (nothing of the call was taken), other RESOURCE_EXHAUSTED are
    not; each wait is the backoff times a factor drawn from [0.5, 1.5]."""
    import grpc

    from lesft.deploy import wire as wire_mod
    from lesft.deploy.remote import retryable
    from lesft.deploy.wire import NetArgs, call_with_retries

    class Err(grpc.RpcError):
        def __init__(self, code, details):
            self._c, self._d = code, details

        def code(self):
            return self._c

        def details(self):
            return self._d

    waits = []
    monkeypatch.setattr(wire_mod.time, "sleep", waits.append)
    calls = []

    def busy_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "client 0 already has 2 calls open (--max_streams 2)")
        return "ok"

    assert call_with_retries(busy_twice, NetArgs(retries=3, backoff_s=1.0), retryable) == "ok"
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.5 and 1.0 <= waits[1] <= 3.0
    assert waits != [1.0, 2.0]  # drawn around the backoff, not the bare backoff

    def too_big():
        raise Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "message of 9 MiB exceeds the 8 MiB limit")

    with pytest.raises(grpc.RpcError):
        call_with_retries(too_big, NetArgs(retries=3, backoff_s=1.0), retryable)
    assert len(waits) == 2  # not retried


# ---------------------------------------------------------------- a silent client (issue 31, item 1)


def test_a_silent_client_costs_one_timeout_not_one_per_step(server_model) -> None:
    """4 clients, client 3 says hello before every step and never sends: the first step waits the 1.5 s timeout
    for it, the later steps do not (a bare hello does not put it back); it is benched until a round start it
    must prove alive at by sending, and a repeat miss doubles its bench."""
    from concurrent.futures import ThreadPoolExecutor

    net = NetArgs(timeout_s=1.5, retries=0)
    cfg = make_cfg(server_model)
    service = build_service(cfg, net, [0, 1, 2, 3], None)
    times = []
    with ThreadPoolExecutor(3) as pool:
        for step in range(5):
            service.hello(3, {"config": to_dict(cfg)})  # 'still here', and nothing else
            t0 = time.monotonic()
            replies = list(pool.map(lambda c: service.exchange(c, bytearray(wire(act(c, step)))), (0, 1, 2)))
            times.append(time.monotonic() - t0)
            assert len(replies) == 3 and service.step == step + 1
    assert times[0] >= 1.4  # waited for client 3 once
    assert all(t < 0.75 for t in times[1:]), times  # never again (each step computes in well under 0.75 s here)
    assert service.benched == {3: 1} and service.expected == {0, 1, 2}
    assert any("client 3: no message in" in ln and "benched until step 1" in ln for ln in service.log)
    # it proves alive at a round start: back in; it misses again: benched for 2 rounds this time
    with ThreadPoolExecutor(4) as pool:
        back = pool.submit(service.exchange, 3, bytearray(wire(act(3, 5))))  # first: a rejoining client is not
        time.sleep(0.2)                                                      # waited for until its message is in
        list(pool.map(lambda c: service.exchange(c, bytearray(wire(act(c, 5)))), (0, 1, 2)))
        back.result()
    assert 3 in service.expected and 3 not in service.benched
    service.misses[3] = 1  # as if its earlier miss were still outstanding
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda c: service.exchange(c, bytearray(wire(act(c, 6)))), (0, 1, 2)))
    assert service.benched == {3: 8}  # step 6's round + 2 rounds of one step
    with pytest.raises(Exception, match="benched until step 8"):
        service.exchange(3, bytearray(wire(act(3, 7))))


def test_the_adaptive_deadline_ends_the_wait_for_a_silent_client_early(server_model) -> None:
    """--adaptive_deadline 3: once half of the expected clients are in, the step waits at most 3 x their median
    arrival delay (at least 1 s), not the 20 s timeout."""
    from concurrent.futures import ThreadPoolExecutor

    net = NetArgs(timeout_s=20.0, retries=0, adaptive_deadline=3.0)
    service = build_service(make_cfg(server_model), net, [0, 1, 2, 3], None)
    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda c: service.exchange(c, bytearray(wire(act(c, 0)))), (0, 1, 2)))
    assert 1.0 <= time.monotonic() - t0 < 10.0 and service.benched == {3: 1}


def test_resync_answers_say_what_is_the_case(server_model) -> None:
    """A message for the step being computed without its client, for a closed step, and for a step far ahead:
    FAILED_PRECONDITION 'resync: ...' saying which (it used to say 'step 3 is closed or unknown' for all)."""
    from lesft.deploy.checks import ServiceError

    service = build_service(make_cfg(server_model), NetArgs(timeout_s=1.0, retries=0), [0, 1], None)
    service.step = 3
    with service.cv:
        service.busy, service.computing = True, {1}
    with pytest.raises(ServiceError, match="resync: step 3 is being computed without client 0") as e:
        service.exchange(0, bytearray(wire(act(0, 3))))
    assert e.value.code == PRE
    with service.cv:
        service.busy, service.computing = False, set()
    with pytest.raises(ServiceError, match="resync: step 2 is closed; the server is at step 3"):
        service.exchange(0, bytearray(wire(act(0, 2))))
    with pytest.raises(ServiceError, match="step 9 is ahead of the server"):
        service.exchange(0, bytearray(wire(act(0, 9))))
