"""Aggregation strategies: FedAvg as before, FFA-LoRA's frozen A, FedSA-LoRA's personal B (by hand, unequal
|D_i|), the Flower ServerApp's aggregate equal to the in-process one, and a strategy registered from here."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, rows

from lesft import methods
from lesft.config import TrainConfig
from lesft.lora import LoraArgs, lora_state
from lesft.messages import AdapterUpload
from lesft.roles import Aggregator
from lesft.strategies import STRATEGIES, Strategy, get_strategy, register_strategy
from lesft.train import Run, train

H, L = 32, 4


def cfg_for(tmp_path, **kw) -> TrainConfig:
    base = dict(method="splitlora", clients=2, rounds=2, grad_accum=1, max_length=256, pad_to_multiple=256,
                aggregate_every=1, client_layers="1", lora=LoraArgs(r=4, alpha=8, dropout=0.0), lr=1e-2,
                out=str(tmp_path / "run"), progress=False, device="cpu")
    base.update(kw)
    return methods.resolve(TrainConfig(**base))


def _uploads() -> list[AdapterUpload]:
    g = torch.Generator().manual_seed(0)
    keys = ["layers.0.mlp.up_proj.lora_A.weight", "layers.0.mlp.up_proj.lora_B.weight"]
    return [AdapterUpload(i, n, {k: torch.randn(3, 2, generator=g) for k in keys}) for i, n in enumerate((1, 3))]


def test_fedavg_through_the_registry_is_the_weighted_mean() -> None:
    ups = _uploads()
    avg = Aggregator().aggregate(ups).tensors
    for k in ups[0].tensors:
        expect = (0.25 * ups[0].tensors[k].double() + 0.75 * ups[1].tensors[k].double()).float()  # |D| = 1, 3
        assert torch.equal(avg[k], expect)
    assert set(Aggregator(get_strategy("ffa")).aggregate(ups).tensors) == {k for k in avg if "lora_B" in k}
    assert set(Aggregator(get_strategy("fedsa")).aggregate(ups).tensors) == {k for k in avg if "lora_A" in k}
    with pytest.raises(ValueError, match="unknown aggregation strategy 'nope'.*register_strategy"):
        get_strategy("nope")


def _run(tmp_path, tokenizer, n_rows=7, **kw) -> Run:
    return Run(cfg_for(tmp_path, **kw), make_model("llama", layers=L, hidden=H), tokenizer, rows(n_rows))


def test_ffa_lora_keeps_a_bit_identical_to_its_initialisation(tokenizer, tmp_path) -> None:
    run = _run(tmp_path, tokenizer, aggregation="ffa", rounds=3)
    init = [lora_state(c.bottom) for c in run.clients]
    for r in range(run.rounds):
        run.round(r)
    for c, s0 in zip(run.clients, init):
        now = lora_state(c.bottom)
        assert all(torch.equal(now[k], v) for k, v in s0.items() if "lora_A" in k)
        assert any(not torch.equal(now[k], v) for k, v in s0.items() if "lora_B" in k)  # B trained
    b0, b1 = (lora_state(c.bottom) for c in run.clients)
    assert all(torch.equal(b0[k], b1[k]) for k in b0)  # after the last aggregation: one adapter


def test_fedsa_averages_a_and_keeps_each_clients_b(tokenizer, tmp_path) -> None:
    run = _run(tmp_path, tokenizer, n_rows=7, aggregation="fedsa", rounds=1)  # |D| = 4 and 3
    sizes = [c.n_samples for c in run.clients]
    assert sorted(sizes) == [3, 4]
    before = {}
    real = run.aggregate

    def record(trained):
        before.update({c.cid: lora_state(c.bottom) for c in run.clients})
        real(trained)

    run.aggregate = record
    run.round(0)
    w = [n / sum(sizes) for n in sizes]
    for c in run.clients:
        now = lora_state(c.bottom)
        for k in now:
            if "lora_A" in k:
                expect = (w[0] * before[0][k].double() + w[1] * before[1][k].double()).float()
                torch.testing.assert_close(now[k], expect, rtol=0, atol=1e-7)
            else:
                assert torch.equal(now[k], before[c.cid][k])  # B: this client's own


def test_fedsa_exports_one_adapter_per_client(tokenizer, tmp_path) -> None:
    cfg = cfg_for(tmp_path, aggregation="fedsa")
    train(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(6))
    assert {p.name for p in (tmp_path / "run" / "client_adapters").iterdir()} == {"client_0", "client_1"}


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsa"])
def test_flower_server_app_aggregates_as_the_in_process_aggregator(name) -> None:
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from lesft.deploy.server_app import aggregate_records

    ups = _uploads()
    contents = [RecordDict({"arrays": ArrayRecord(u.tensors), "metrics": MetricRecord({"num-examples": u.n_samples})})
                for u in ups]
    flower = aggregate_records(get_strategy(name), contents).to_torch_state_dict()
    local = Aggregator(get_strategy(name)).aggregate(ups).tensors
    assert flower.keys() == local.keys()
    for k in local:
        assert torch.equal(flower[k], local[k])


def test_a_strategy_registered_from_outside_trains_end_to_end(tokenizer, tmp_path) -> None:
    @register_strategy("test-max-b")
    class MaxB(Strategy):  # a deliberately odd rule: the elementwise max of B, A averaged
        def combine(self, states, weights):
            avg = super().combine(states, weights)
            return {k: (torch.stack([s[k] for s in states]).amax(0) if "lora_B" in k else avg[k]) for k in avg}

    try:
        run = _run(tmp_path, tokenizer, aggregation="test-max-b", rounds=1)
        before = {}
        real = run.aggregate
        run.aggregate = lambda trained: (before.update({c.cid: lora_state(c.bottom) for c in run.clients}),
                                         real(trained))
        run.round(0)
        now = lora_state(run.clients[1].bottom)
        for k in now:
            if "lora_B" in k:
                assert torch.equal(now[k], torch.maximum(before[0][k], before[1][k]))
        summary = train(cfg_for(tmp_path, aggregation="test-max-b", out=str(tmp_path / "e2e")),
                        make_model("llama", layers=L, hidden=H), tokenizer, rows(6))
        assert summary["rounds"] == 2
    finally:
        STRATEGIES.pop("test-max-b")
