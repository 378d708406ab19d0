"""Algorithm 1 end to end on tiny random models: bytes, methods' switches, aggregation, exactness."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from conftest import make_model, rows
from lesft import methods
from lesft.config import TrainConfig
from lesft.lora import LoraArgs
from lesft.messages import AdapterUpload
from lesft.roles import Aggregator, NonFiniteLossError
from lesft.data.partition import partition_iid as partition
from lesft.train import Run, train
from lesft.transport import Loopback

T = 384  # every sequence padded to exactly T tokens, so byte counts are hand-computable
H, I, R, L = 32, 64, 4, 4  # hidden, intermediate, LoRA rank, layers of the tiny model


def cfg_for(method: str, tmp_path, **kw) -> TrainConfig:
    base = dict(method=method, clients=2, rounds=2, grad_accum=2, max_length=T, pad_to_multiple=T,
                client_layers="1", lora=LoraArgs(r=R, alpha=8, dropout=0.0), out=str(tmp_path / method),
                progress=False, device="cpu")
    base.update(kw)
    return methods.resolve(TrainConfig(**base))


def make_run(method: str, tokenizer, tmp_path, n_rows: int = 8, arch: str = "llama", **kw) -> Run:
    cfg = cfg_for(method, tmp_path, **kw)
    return Run(cfg, make_model(arch, layers=L, hidden=H), tokenizer, rows(n_rows))


def run_all(run: Run) -> list[dict]:
    return [run.round(r) for r in range(run.rounds)]


def lora_params_per_layer() -> int:
    return 3 * R * (H + I)  # gate, up: A[r,H] + B[I,r]; down: A[r,I] + B[H,r]


def test_bytes_equal_hand_computed_tensor_sizes(tokenizer, tmp_path) -> None:
    run = make_run("splitlora", tokenizer, tmp_path, aggregate_every=1)
    run_all(run)
    c = run.transport.meter.to_dict()
    micro = run.rounds * run.cfg.grad_accum * len(run.clients)  # messages each way
    b = run.cfg.batch_size
    assert c["client_to_server"]["activations"]["messages"] == micro
    # hidden fp32 + attention mask, position ids, labels (int64)
    assert c["client_to_server"]["activations"]["payload_bytes"] == micro * (b * T * H * 4 + 3 * b * T * 8)
    assert c["server_to_client"]["activation_grad"]["payload_bytes"] == micro * b * T * H * 4
    uploads = run.rounds * len(run.clients)
    assert c["client_to_aggregator"]["adapter_upload"]["payload_bytes"] == uploads * lora_params_per_layer() * 4
    assert c["aggregator_to_client"]["adapter_broadcast"]["payload_bytes"] == uploads * lora_params_per_layer() * 4
    totals = run.transport.meter.totals()
    for d, kinds in c.items():  # totals = payload + headers; headers are small but present
        assert totals[d] == sum(v["payload_bytes"] + v["header_bytes"] for v in kinds.values())
        assert all(0 < v["header_bytes"] / v["messages"] < 4096 for v in kinds.values())


def test_wire_bf16_halves_activation_and_gradient_payload(tokenizer, tmp_path) -> None:
    fp32 = make_run("sl", tokenizer, tmp_path / "a", wire_dtype="fp32")
    bf16 = make_run("sl", tokenizer, tmp_path / "b", wire_dtype="bf16")
    run_all(fp32), run_all(bf16)
    f, h = fp32.transport.meter.to_dict(), bf16.transport.meter.to_dict()
    ints = 2 * 2 * 2 * (3 * T * 8)  # rounds * accum * clients * (mask + positions + labels)
    assert (h["client_to_server"]["activations"]["payload_bytes"] - ints) * 2 == \
        f["client_to_server"]["activations"]["payload_bytes"] - ints
    assert h["server_to_client"]["activation_grad"]["payload_bytes"] * 2 == \
        f["server_to_client"]["activation_grad"]["payload_bytes"]


def test_splitfrozen_keeps_client_weights_bit_identical_and_sends_nothing_back(tokenizer, tmp_path) -> None:
    run = make_run("splitfrozen", tokenizer, tmp_path)
    before = [copy.deepcopy(c.bottom.state_dict()) for c in run.clients]
    server_before = {k: v.clone() for k, v in run.server.top.state_dict().items() if "lora_B" in k}
    run_all(run)
    for c, sd in zip(run.clients, before):
        after = c.bottom.state_dict()
        assert after.keys() == sd.keys()
        assert all(torch.equal(after[k], sd[k]) for k in sd)
        assert not any("lora_" in k for k in sd)  # no client adapter at all
    totals = run.transport.meter.totals()
    assert totals["server_to_client"] == 0 and totals["client_to_aggregator"] == 0
    after = run.server.top.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in server_before.items())  # the server did train


def _client_states(run: Run) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in c.bottom.state_dict().items() if "lora_" in k} for c in run.clients]


def test_sl_never_aggregates_and_splitlora_does(tokenizer, tmp_path) -> None:
    sl = make_run("sl", tokenizer, tmp_path / "sl", rounds=3)
    lines = run_all(sl)
    assert not any(line["aggregated"] for line in lines)
    assert sl.transport.meter.totals()["client_to_aggregator"] == 0
    assert sl.transport.meter.totals()["aggregator_to_client"] == 0
    a, b = _client_states(sl)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # clients drifted apart

    sfl = make_run("splitlora", tokenizer, tmp_path / "sfl", rounds=3, aggregate_every=2)
    lines = run_all(sfl)
    assert [line["aggregated"] for line in lines] == [False, True, True]  # every 2 rounds + after the last
    a, b = _client_states(sfl)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_weights_by_dataset_size_hand_computed() -> None:
    up = [AdapterUpload(0, 1, {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[0.0]])}),
          AdapterUpload(1, 3, {"w": torch.tensor([5.0, -2.0]), "v": torch.tensor([[4.0]])})]
    avg = Aggregator().aggregate(up).tensors
    # (1*[1,2] + 3*[5,-2]) / 4 = [4, -1];  (0 + 12) / 4 = 3
    assert torch.equal(avg["w"], torch.tensor([4.0, -1.0]))
    assert torch.equal(avg["v"], torch.tensor([[3.0]]))


class Recording(Loopback):
    """Loopback that keeps what was delivered, per direction."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered: list[tuple[str, object]] = []

    def send(self, msg, direction):
        got = super().send(msg, direction)
        self.delivered.append((direction, got))
        return got


def test_unequal_partition_sizes_drive_the_aggregate(tokenizer, tmp_path) -> None:
    cfg = cfg_for("fedavg", tmp_path, clients=2, rounds=1, aggregate_every=1)
    run = Run(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(7), transport=Recording())
    assert sorted(c.n_samples for c in run.clients) == [3, 4]
    run.round(0)  # trains, uploads, aggregates, broadcasts
    ups = [m for d, m in run.transport.delivered if d == "client_to_aggregator"]
    assert sorted(u.n_samples for u in ups) == [3, 4]
    assert any(not torch.equal(ups[0].tensors[k], ups[1].tensors[k]) for k in ups[0].tensors)
    for c in run.clients:
        held = {k.replace(".default.", "."): v for k, v in c.bottom.state_dict().items() if "lora_" in k}
        for k, v in held.items():
            expect = (ups[0].tensors[k].double() * ups[0].n_samples + ups[1].tensors[k].double() * ups[1].n_samples) / 7
            torch.testing.assert_close(v, expect.float(), rtol=0, atol=1e-7)


def test_sl_with_one_client_equals_centralized(tokenizer, tmp_path) -> None:
    """Splitting changes nothing but where the layers run: same data, seed and init -> same adapters."""
    sl = make_run("sl", tokenizer, tmp_path / "sl", clients=1, rounds=3)
    cen = make_run("centralized", tokenizer, tmp_path / "cen", rounds=3)
    l_sl, l_cen = run_all(sl), run_all(cen)
    for a, b in zip(l_sl, l_cen):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    split_state = {**{f"c.{k}": v for k, v in sl.clients[0].bottom.state_dict().items() if "lora_" in k}}
    full_state = {f"c.{k}": v for k, v in cen.clients[0].bottom.state_dict().items() if "lora_" in k}
    # the server's layers k.. are layers k.. of the unsplit client's bottom
    for k, v in sl.server.top.state_dict().items():
        if "lora_" in k:
            i, rest = k.split(".", 2)[1], k.split(".", 2)[2]
            split_state[f"c.layers.{int(i) + sl.k}.{rest}"] = v
    assert split_state.keys() == full_state.keys()
    for k in full_state:
        torch.testing.assert_close(split_state[k], full_state[k], atol=2e-6, rtol=1e-4)


def test_lesft_dual_path_sends_reference_but_gets_no_gradient_for_it(tokenizer, tmp_path) -> None:
    run = make_run("lesft", tokenizer, tmp_path / "lesft", rounds=1, grad_accum=1)
    sl = make_run("sl", tokenizer, tmp_path / "sl", rounds=1, grad_accum=1)
    msg = run.clients[0].forward(0)
    assert msg.reference is not None
    assert msg.reference.hidden.grad_fn is None and not msg.reference.hidden.requires_grad
    assert msg.base.hidden.grad_fn is not None  # the base path keeps its graph for the backward
    run.clients[0]._pending = None
    run_all(run), run_all(sl)
    c = run.transport.meter.to_dict()
    # reference activations double the upload; the download is exactly the base-path gradient, as for sl
    assert c["client_to_server"]["activations"]["payload_bytes"] == 2 * sl.transport.meter.to_dict()[
        "client_to_server"]["activations"]["payload_bytes"]
    assert run.transport.meter.totals()["server_to_client"] == sl.transport.meter.totals()["server_to_client"]


def test_train_writes_run_directory_and_adapter_reproduces_model(tokenizer, tmp_path) -> None:
    cfg = cfg_for("lesft", tmp_path, rounds=2)
    summary = train(cfg, make_model("qwen2", layers=L, hidden=H), tokenizer, rows(8))
    out = tmp_path / "lesft"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert set(lines[0]["loss_per_client"]) == {"0", "1"}
    assert lines[-1]["comm_bytes"] == summary["comm_bytes"]
    for key in ("method", "model", "dataset", "clients", "client_layers", "rounds", "comm_bytes",
                "peak_memory_mb", "latency_s", "wall_s"):
        assert key in summary
    assert set(summary["comm_bytes"]) == {"client_to_server", "server_to_client", "client_to_aggregator",
                                          "aggregator_to_client"}
    assert summary["peak_memory_mb"]["client"] > 0 and summary["peak_memory_mb"]["server"] > 0
    assert summary["latency_s"]["client"] > 0 and summary["latency_s"]["server"] > 0
    assert (out / "config.yaml").is_file()

    # the exported adapter on a fresh copy of the same base reproduces the split model's logits
    run = Run(cfg, make_model("qwen2", layers=L, hidden=H), tokenizer, rows(8))  # parts to load it into
    base = make_model("qwen2", layers=L, hidden=H)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]])
    mask = torch.ones_like(ids)
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == L * 3 * 2 and all(k.startswith("base_model.model.model.layers.") for k in saved)
    # rebuild the split model from the same adapter tensors and compare
    from lesft.lora import load_lora_state, lora_state

    for part, first in ((run.clients[0].bottom, 0), (run.server.top, run.k)):
        state = lora_state(part)
        load_lora_state(part, {k: saved[f"base_model.model.model.layers.{first + int(k.split('.')[1])}."
                                        f"{k.split('.', 2)[2]}"] for k in state})
    run.clients[0].bottom.eval(), run.server.top.eval()
    with torch.no_grad():
        h, pos = run.clients[0].bottom(ids, mask)
        expect = run.server.top(h, mask, pos)[0]
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_same_seed_same_run(tokenizer, tmp_path) -> None:
    a = run_all(make_run("lesft", tokenizer, tmp_path / "a", lora=LoraArgs(r=R, alpha=8, dropout=0.2)))
    b = run_all(make_run("lesft", tokenizer, tmp_path / "b", lora=LoraArgs(r=R, alpha=8, dropout=0.2)))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    c = run_all(make_run("lesft", tokenizer, tmp_path / "c", seed=1, lora=LoraArgs(r=R, alpha=8, dropout=0.2)))
    assert [x["loss"] for x in a] != [x["loss"] for x in c]


def test_nan_loss_is_a_clear_error(tokenizer, tmp_path) -> None:
    model = make_model("llama", layers=L, hidden=H)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    run = Run(cfg_for("sl", tmp_path), model, tokenizer, rows(8))
    with pytest.raises(NonFiniteLossError, match="loss is nan on the server"):
        run.round(0)


def test_partition_is_seeded_and_complete() -> None:
    p = partition(10, 3, seed=4)
    assert sorted(i for part in p for i in part) == list(range(10))
    assert [len(x) for x in p] == [4, 3, 3]
    assert p == partition(10, 3, seed=4) and p != partition(10, 3, seed=5)
    with pytest.raises(ValueError):
        partition(2, 3, seed=0)


def test_method_presets_and_bad_combinations() -> None:
    assert methods.resolve(TrainConfig(method="splitfrozen")).client_trainable is False
    r = methods.resolve(TrainConfig(method="lesft", aggregate_every=0))  # the paper's "SL framework"
    assert (r.split, r.aggregate_every, r.paths, r.loss) == (True, 0, "dual", "lesft")
    assert methods.resolve(TrainConfig(method="centralized", clients=4)).clients == 1
    with pytest.raises(ValueError, match="unknown method 'foo'.*lesft"):
        methods.resolve(TrainConfig(method="foo"))
    with pytest.raises(ValueError, match="needs paths=dual"):
        methods.resolve(TrainConfig(method="lesft", paths="base"))
    with pytest.raises(ValueError, match="nothing to aggregate"):
        methods.resolve(TrainConfig(method="splitfrozen", aggregate_every=3))


def test_loopback_receiver_shares_no_tensor_with_sender(tokenizer, tmp_path) -> None:
    run = make_run("sl", tokenizer, tmp_path)
    msg = run.clients[0].forward(0)
    got = Loopback().send(msg, "client_to_server")
    assert got.base.hidden.data_ptr() != msg.base.hidden.data_ptr()
    assert got.base.hidden.grad_fn is None
    torch.testing.assert_close(got.base.hidden, msg.base.hidden.detach(), rtol=0, atol=0)
    assert torch.equal(got.base.labels, msg.base.labels)


def test_lesft_base_only_equals_splitlora(tokenizer, tmp_path) -> None:
    """The paper's 'base input only' ablation is exactly splitlora: same losses, same bytes."""
    a = make_run("lesft", tokenizer, tmp_path / "a", paths="base", loss="ce")
    b = make_run("splitlora", tokenizer, tmp_path / "b")
    la, lb = run_all(a), run_all(b)
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert a.transport.meter.totals() == b.transport.meter.totals()


def test_reference_only_trains_on_the_reference_input(tokenizer, tmp_path) -> None:
    run = make_run("sl", tokenizer, tmp_path, paths="reference", rounds=1, grad_accum=1)
    msg = run.clients[0].forward(0)
    assert msg.reference is None and msg.base.hidden.grad_fn is not None
    text = tokenizer.decode(msg.base.labels.new_tensor(
        [t for t in run.clients[0].stream.samples[0].base_ids])).replace(" ", "")
    assert "Aworkedsolution,forreference:" in text


def test_per_client_and_dirichlet_partitions_reach_the_clients(tokenizer, tmp_path) -> None:
    run = make_run("sl", tokenizer, tmp_path / "a", n_rows=12, clients=3, per_client=2)
    assert [c.n_samples for c in run.clients] == [2, 2, 2]
    run = make_run("sl", tokenizer, tmp_path / "b", n_rows=12, clients=3, partition="dirichlet:0.5")
    assert sum(c.n_samples for c in run.clients) == 12 and all(c.n_samples >= 1 for c in run.clients)
    with pytest.raises(ValueError, match="dirichlet:ALPHA"):
        TrainConfig(partition="dirichlet")


def test_reference_target_puts_the_target_itself_in_the_reference_input(tokenizer, tmp_path) -> None:
    from lesft.data.prompts import reference_text, render_prompt

    solution, target = (make_run("lesft", tokenizer, tmp_path / x, reference=x) for x in ("solution", "target"))
    row = rows(8)[0]
    for run, text in ((solution, row["reference"]), (target, row["target"])):
        s = run.clients[0].stream.samples + run.clients[1].stream.samples
        want = tokenizer(render_prompt(tokenizer, reference_text(row["prompt"], text), True))["input_ids"]
        assert any(x.ref_ids[:len(want)] == want for x in s)
        assert all(x.base_ids == y.base_ids for x, y in zip(s, solution.clients[0].stream.samples
                                                            + solution.clients[1].stream.samples))
    with pytest.raises(ValueError, match="reference must be 'solution' or 'target'"):
        cfg_for("lesft", tmp_path, reference="answer")


def test_an_unresolved_config_is_resolved_not_run_unsplit(tokenizer, tmp_path) -> None:
    """Run resolves the method preset itself: TrainConfig(method='sl') used to leave split=None, read as False."""
    cfg = TrainConfig(method="sl", clients=2, rounds=1, max_length=T, client_layers="1", progress=False,
                      device="cpu", lora=LoraArgs(r=R, alpha=8, dropout=0.0), out=str(tmp_path / "sl"))
    assert cfg.split is None
    run = Run(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(4))
    assert run.cfg.split is True and run.server is not None and run.link is not None


def test_a_memory_peak_that_cannot_be_measured_is_said(monkeypatch, capsys) -> None:
    from lesft import meters

    monkeypatch.setattr(meters, "_reset_failed", None)
    real_open = open

    def deny(path, *a, **kw):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", deny)
    assert meters._reset_cpu_peak() is False and meters._reset_cpu_peak() is False
    assert "clear_refs is not writable" in meters.peak_caveat()
    assert capsys.readouterr().err.count("warning") == 1  # said once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["splitlora", "lesft"])
def test_a_split_run_on_cuda_matches_the_cpu(method, tokenizer, tmp_path) -> None:
    """Every message crosses the wire through the CPU, so each receiver moves it to its own device (the
    client's backward once did not: every split run on CUDA failed at its first step)."""
    cpu = run_all(make_run(method, tokenizer, tmp_path / "cpu"))
    gpu = run_all(make_run(method, tokenizer, tmp_path / "gpu", device="cuda"))
    torch.testing.assert_close([x["loss"] for x in gpu], [x["loss"] for x in cpu], rtol=1e-3, atol=1e-4)
