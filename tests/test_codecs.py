"""The wire codecs (lesft.codecs) and the wire formats of messages: error bounds, exact byte counts by hand,
lossless integer packing, refused damage, and 'every option off' pinned to the wire before the codecs."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from conftest import make_model, make_tokenizer, rows
from lesft import codecs, methods
from lesft.config import TrainConfig
from lesft.lora import LoraArgs
from lesft.messages import Activations, ActivationGrad, GenStep, PathBatch, WireFormat, decode, encode
from lesft.train import Run

STEP = {"int8": 127, "int4": 7}  # levels: scale = absmax / levels


def roundtrip(x: torch.Tensor, codec: str) -> torch.Tensor:
    raw, keys = codecs.encode_float(x, codec)
    spec = {"name": "x", "shape": list(x.shape), **keys}
    assert raw.numel() == codecs.wire_bytes(spec)
    return codecs.decode(raw, spec)


def block_scales(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Each element's block scale, computed here by a loop (independent of the codec's vectorised code)."""
    flat = x.reshape(-1).double()
    out = torch.empty_like(flat)
    for i in range(0, flat.numel(), 64):
        out[i:i + 64] = flat[i:i + 64].abs().max() / levels
    return out.view(x.shape)


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(3, 7, 32), (2, 5, 576), (1, 1, 1), (130,)])
def test_error_is_at_most_half_a_step_of_the_block_scale(codec, shape) -> None:
    g = torch.Generator().manual_seed(1)
    n = torch.Size(shape).numel()
    magnitude = 10.0 ** ((torch.arange(n) // 64) % 7 - 3).float()  # each block its own magnitude: 1e-3 .. 1e3
    x = torch.randn(shape, generator=g) * magnitude.view(shape)
    y = roundtrip(x, codec)
    assert y.shape == x.shape and y.dtype == torch.float32
    half = block_scales(x, STEP[codec]) / 2
    err = (y.double() - x.double()).abs()
    assert (err <= half * (1 + 1e-6) + 1e-30).all(), float((err / half).max())


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_representable_values_come_back_exact(codec) -> None:
    levels = STEP[codec]
    s = 2.0 ** -5  # a power of two: absmax / levels is exact in fp32
    codes = torch.arange(-levels, levels + 1, dtype=torch.float32)
    x = torch.cat([codes, codes.flip(0)])[:64]
    x[0] = -levels  # every block holds its absmax
    y = roundtrip(x * s, codec)
    assert torch.equal(y, x * s)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_zero_blocks_and_extreme_magnitudes(codec) -> None:
    x = torch.zeros(4, 64)
    x[1] = 3e38  # near the fp32 maximum
    x[2, :32] = 1e-30  # tiny values, one block
    x[2, 32:] = -1e-30
    x[3, 0] = -2.5e38
    y = roundtrip(x, codec)
    assert torch.equal(y[0], torch.zeros(64))  # a zero block: scale 0, decodes to zeros, no NaN
    assert torch.isfinite(y).all()
    assert torch.allclose(y[1], x[1]) and torch.allclose(y[2], x[2], rtol=0, atol=1e-36)
    assert y[3, 0] == pytest.approx(-2.5e38, rel=1e-6) and torch.equal(y[3, 1:], torch.zeros(63))


def test_non_finite_values_are_refused() -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            codecs.encode_float(torch.tensor([1.0, bad]), "int8")


def test_codec_byte_counts_by_hand() -> None:
    # 2 x 10 x 8 = 160 values: 3 blocks of 64 (the last one of 32) -> 3 fp32 scales
    spec = {"name": "x", "shape": [2, 10, 8]}
    assert codecs.wire_bytes({**spec, "codec": "int8"}) == 3 * 4 + 160
    assert codecs.wire_bytes({**spec, "codec": "int4"}) == 3 * 4 + 80
    assert codecs.wire_bytes({"name": "x", "shape": [1, 1, 3], "codec": "int4"}) == 4 + 2  # odd count: 2 bytes


def _batch(lab_ids: int = 200) -> PathBatch:
    h = torch.randn(2, 10, 8)
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
    pos = torch.arange(10).expand(2, 10)
    labels = torch.full((2, 10), -100)
    labels[0, 4:10] = torch.arange(6) + lab_ids
    labels[1, 3:7] = torch.arange(4) + lab_ids
    return PathBatch(h, mask, pos, labels)


def test_packed_message_bytes_by_hand_and_lossless() -> None:
    b = _batch()
    msg = Activations(0, 1, b)
    _, plain = encode(msg)
    assert plain == 2 * 10 * 8 * 4 + 3 * 2 * 10 * 8  # fp32 hidden + three int64 [2, 10] tensors
    ints = 2 * 4 + 0 + (2 * 8 + 10 * 1)  # lengths int32 [2]; positions nothing; spans int32 [2, 2] + 10 uint8 ids
    for fmt, hidden in [("fp32", 640), ("bf16", 320), ("int8", 3 * 4 + 160), ("int4", 3 * 4 + 80)]:
        data, payload = encode(msg, WireFormat(fmt, pack_ints=True))
        assert payload == hidden + ints, fmt
        out = decode(data)
        for name in ("attention_mask", "position_ids", "labels"):
            got, want = getattr(out.base, name), getattr(b, name)
            assert torch.equal(got, want) and got.dtype == torch.int64, name


def test_label_ids_take_the_narrowest_type() -> None:
    for first, width in [(0, 1), (300, 2), (70_000, 4)]:
        _, payload = encode(Activations(0, 1, _batch(first)), WireFormat("fp32", pack_ints=True))
        assert payload == 640 + 8 + 16 + 10 * width


def test_unpackable_integers_travel_as_they_are() -> None:
    b = _batch()
    b.attention_mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])  # left padding: not lengths
    b.position_ids = b.position_ids + 1
    b.labels[0, 5] = -100  # two runs in one row: not a span
    data, payload = encode(Activations(0, 1, b), WireFormat("fp32", pack_ints=True))
    assert payload == 640 + 3 * 160
    out = decode(data)
    assert all(torch.equal(getattr(out.base, n), getattr(b, n)) for n in ("attention_mask", "position_ids", "labels"))


def test_each_path_and_direction_takes_its_own_format() -> None:
    msg = Activations(0, 1, _batch(), _batch())
    _, payload = encode(msg, WireFormat("bf16", reference="int4"))
    assert payload == 320 + 480 + (12 + 80) + 480
    grad = ActivationGrad(0, 1, torch.randn(2, 10, 8))
    assert encode(grad, WireFormat("int8", grad="bf16"))[1] == 320
    assert encode(grad, WireFormat("bf16"))[1] == 320 and encode(grad, "int8")[1] == 172
    gen = GenStep("s", 0, torch.randn(2, 10, 8), torch.ones(2, 10, dtype=torch.bool))
    out = decode(encode(gen, "int8")[0])
    assert out.hidden.shape == (2, 10, 8) and encode(gen, "int8")[1] == 172 + 20


def _damaged(msg, fmt, edit) -> bytes:
    data, _ = encode(msg, fmt)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = bytearray(data[8 + n:])
    edit(header, body)
    h = json.dumps(header).encode()
    h += b" " * (-(8 + len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + bytes(body)


def _spec(header, name):
    return next(s for s in header["tensors"] if s["name"] == name)


@pytest.mark.parametrize("case,match", [
    ("nbytes", "do not match codec"),
    ("unknown", "unknown codec"),
    ("codec-on-wrong-field", "carries"),
    ("int-codec-on-hidden", "carries"),
    ("nan-scale", "scales must be finite"),
    ("length", "row lengths outside"),
    ("spans", "spans outside"),
    ("int4-code", "code out of range"),
])
def test_damaged_codec_headers_and_payloads_are_refused(case, match) -> None:
    fmt = WireFormat("int4", pack_ints=True)

    def edit(header, body):
        h, m, lab = (_spec(header, f"base.{n}") for n in ("hidden", "attention_mask", "labels"))
        if case == "nbytes":
            h["nbytes"] -= 1
        elif case == "unknown":
            h["codec"] = "int3"
        elif case == "codec-on-wrong-field":
            m["codec"] = "spans"
        elif case == "int-codec-on-hidden":
            h.update(codec="arange", dtype="int64", nbytes=0)
        elif case == "nan-scale":
            body[0:4] = struct.pack("<f", float("nan"))
        elif case == "length":
            off = h["nbytes"]
            body[off:off + 4] = struct.pack("<i", 11)
        elif case == "spans":
            off = h["nbytes"] + m["nbytes"]
            body[off:off + 4] = struct.pack("<i", 5)  # start 5, end 10: 5 ids, not 6
        elif case == "int4-code":
            body[12] = 0  # nibble 0 = code -8, outside [-7, 7]
    with pytest.raises(ValueError, match=match):
        decode(_damaged(Activations(0, 1, _batch()), fmt, edit))


# ------------------------------------------------------------------ every option off = the wire before the codecs

# Measured with the commit before lesft.codecs existed (same tiny runs, same machine): the meters, exactly, and the
# round losses (float.hex; bit-equal there; compared to 1e-6 here so that another CPU's float sums do not fail it).
BEFORE = {
    "lesft": (["0x1.2ecf740000000p-2", "0x1.2df2e20000000p-2"],
              {"aggregator_to_client": {"adapter_broadcast": {"header_bytes": 1360, "messages": 2, "payload_bytes": 9216}},
               "client_to_aggregator": {"adapter_upload": {"header_bytes": 1392, "messages": 2, "payload_bytes": 9216}},
               "client_to_server": {"activations": {"header_bytes": 5504, "messages": 8, "payload_bytes": 155648}},
               "server_to_client": {"activation_grad": {"header_bytes": 1280, "messages": 8, "payload_bytes": 65536}}}),
    "sl": (["0x1.29457c0000000p+2", "0x1.29a2360000000p+2"],
           {"aggregator_to_client": {}, "client_to_aggregator": {},
            "client_to_server": {"activation_grad": {"header_bytes": 1280, "messages": 8, "payload_bytes": 65536},
                                 "activations": {"header_bytes": 2624, "messages": 8, "payload_bytes": 73728}},
            "server_to_client": {"activation_grad": {"header_bytes": 1280, "messages": 8, "payload_bytes": 65536},
                                 "activations": {"header_bytes": 1472, "messages": 8, "payload_bytes": 65536}}}),
    "splitlora": (["0x1.29457c0000000p+2", "0x1.29a2360000000p+2"],
                  {"aggregator_to_client": {"adapter_broadcast": {"header_bytes": 1360, "messages": 2, "payload_bytes": 9216}},
                   "client_to_aggregator": {"adapter_upload": {"header_bytes": 1392, "messages": 2, "payload_bytes": 9216}},
                   "client_to_server": {"activations": {"header_bytes": 3200, "messages": 8, "payload_bytes": 77824}},
                   "server_to_client": {"activation_grad": {"header_bytes": 1280, "messages": 8, "payload_bytes": 65536}}}),
}


def tiny_run(method: str, tmp_path, **kw) -> Run:
    extra = {"label_privacy": True} if method == "sl" else {}
    cfg = methods.resolve(TrainConfig(method=method, clients=2, rounds=2, grad_accum=2, max_length=64,
                                      client_layers="1", lora=LoraArgs(r=4, alpha=8, dropout=0.0),
                                      out=str(tmp_path / method), progress=False, device="cpu", **extra, **kw))
    return Run(cfg, make_model("llama", layers=4, hidden=32), make_tokenizer(), rows(8))


@pytest.mark.parametrize("method", sorted(BEFORE))
def test_every_option_off_is_the_wire_before_the_codecs(method, tmp_path) -> None:
    losses, meter = BEFORE[method]
    run = tiny_run(method, tmp_path)
    got = [run.round(r)["loss"] for r in range(run.rounds)]
    assert run.transport.meter.to_dict() == meter
    assert got == pytest.approx([float.fromhex(x) for x in losses], rel=1e-6, abs=0)


def test_packed_integers_change_bytes_not_training(tmp_path) -> None:
    """Lossless: the same losses to the bit as the unpacked run, fewer bytes; and with packing, bf16 sends half
    of fp32's client->server payload (the tiny model too: the goal 0.500 +- 0.005)."""
    plain, packed = tiny_run("lesft", tmp_path / "a"), tiny_run("lesft", tmp_path / "b", pack_ints=True)
    half = tiny_run("lesft", tmp_path / "c", pack_ints=True, wire_dtype="bf16")
    for r in range(2):
        assert plain.round(r)["loss"] == packed.round(r)["loss"]
        half.round(r)
    up = [x.transport.meter.to_dict()["client_to_server"]["activations"]["payload_bytes"] for x in (plain, packed, half)]
    assert up[1] < up[0]
    assert 0.495 <= up[2] / up[1] <= 0.505, up[2] / up[1]


def test_label_private_split_and_split_generation_take_the_same_codecs(tokenizer, tmp_path) -> None:
    from test_generation import PROMPTS, batch, make_run as make_gen_run

    from lesft.generation import in_process

    run = tiny_run("sl", tmp_path, wire_dtype="int8")  # U-shaped: hidden states both ways, gradients both ways
    losses = [run.round(r)["loss"] for r in range(run.rounds)]
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    c = run.transport.meter.to_dict()
    for d in ("client_to_server", "server_to_client"):
        per_msg = c[d]["activation_grad"]["payload_bytes"] / c[d]["activation_grad"]["messages"]
        assert per_msg < 0.3 * 64 * 32 * 4  # int8 with scales: 0.266 of fp32 for [1, <= 64, 32]
    gen, _, _ = in_process(make_gen_run(tmp_path, tokenizer, "llama", 2), wire_dtype="int8")
    ids, mask = batch(tokenizer, PROMPTS[:2])
    out = gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 3)
    up = gen.link.meter.to_dict()["client_to_server"]["gen_step"]["payload_bytes"]
    n = 2 * ids.shape[1] * 32
    assert up == (n + 4 * -(-n // 64)) + ids.numel() + 2 * (64 + 4 * 1)  # int8 prefill + bool mask, 2 decode steps


# ------------------------------------------------------------------ frozen activations sent once


def frozen_run(tmp_path, name: str, **kw) -> Run:
    cfg = methods.resolve(TrainConfig(method="splitfrozen", clients=2, epochs=3, grad_accum=2, max_length=64,
                                      client_layers="1", lora=LoraArgs(r=4, alpha=8, dropout=0.0),
                                      out=str(tmp_path / name), progress=False, device="cpu", **kw))
    return Run(cfg, make_model("llama", layers=4, hidden=32), make_tokenizer(), rows(8))


def server_lora(run: Run) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.server.top.state_dict().items() if "lora_" in k}


def test_frozen_cache_equals_resending_bit_for_bit_with_a_restart_that_loses_it(tmp_path) -> None:
    plain = frozen_run(tmp_path, "plain")
    cached = frozen_run(tmp_path, "cached", frozen_cache_mb=64)
    restarted = frozen_run(tmp_path, "restarted", frozen_cache_mb=64)
    assert plain.rounds == cached.rounds == 6  # 3 epochs of 4 rows per client, 2 rows a round
    for r in range(plain.rounds):
        if r == 4:
            restarted.server.cache.clear()  # a restarted server: every reference of epoch 3 (rounds 5-6) misses
        losses = [x.round(r)["loss"] for x in (plain, cached, restarted)]
        assert losses[0] == losses[1] == losses[2], r
    a, b, c = server_lora(plain), server_lora(cached), server_lora(restarted)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    up = [x.transport.meter.to_dict()["client_to_server"] for x in (plain, cached, restarted)]
    full = up[0]["activations"]["payload_bytes"]
    # epoch 1 in full, epochs 2-3 by reference: the tensor bytes fall to a third
    assert up[1]["activations"]["messages"] == 8 and up[1]["cached_activations"]["messages"] == 16
    assert up[1]["activations"]["payload_bytes"] * 3 == pytest.approx(full, rel=0.1)
    assert up[1]["cached_activations"]["payload_bytes"] == 0
    # after the restart: epoch 3's 8 references miss, the server asks, the clients send again
    down = restarted.transport.meter.to_dict()["server_to_client"]
    assert down["resend"]["messages"] == 8 and up[2]["activations"]["messages"] == 16


def test_frozen_cache_bounded_and_refused_where_it_cannot_be_exact(tmp_path) -> None:
    tiny = frozen_run(tmp_path, "tiny", frozen_cache_mb=0.01)  # ~10 KB: at most one batch fits
    plain = frozen_run(tmp_path, "plain")
    for r in range(tiny.rounds):
        assert tiny.round(r)["loss"] == plain.round(r)["loss"]
        assert tiny.server.cache.used <= 0.01 * 2**20
    assert tiny.transport.meter.to_dict()["server_to_client"]["resend"]["messages"] > 0
    with pytest.raises(ValueError, match="client_trainable=False"):
        methods.resolve(TrainConfig(method="splitlora", frozen_cache_mb=8))
    with pytest.raises(ValueError, match="cut_noise"):
        TrainConfig(method="splitfrozen", frozen_cache_mb=8, cut_noise=1.0)
