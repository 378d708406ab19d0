"""Many simulated clients: one shared frozen base (the same numbers as a deep copy per client), clients
sampled per round (seeded, resumable, aggregation weights over the clients that trained only)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, rows
from safetensors.torch import load_file

from lesft import methods
from lesft.config import TrainConfig
from lesft.lora import LoraArgs, lora_state
from lesft.train import Run, num_rounds, train

T, H, L = 256, 32, 4


def cfg_for(method: str, out, **kw) -> TrainConfig:
    base = dict(method=method, clients=3, rounds=4, grad_accum=1, max_length=T, pad_to_multiple=T, aggregate_every=2,
                client_layers="1", lora=LoraArgs(r=4, alpha=8, dropout=0.1), out=str(out), progress=False,
                device="cpu", checkpoint_every=1, lr=1e-2)
    if method in ("sl", "splitfrozen"):
        base["aggregate_every"] = 0
    base.update(kw)
    return methods.resolve(TrainConfig(**base))


def _train(cfg: TrainConfig, tokenizer, crash_at: int | None = None, monkeypatch=None) -> dict:
    if crash_at is not None:  # stop after `crash_at` finished rounds (checkpointed every round), then resume
        real = Run.round

        def crashing(self, r):
            if r == crash_at:
                raise KeyboardInterrupt
            return real(self, r)

        monkeypatch.setattr(Run, "round", crashing)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(6))
        monkeypatch.setattr(Run, "round", real)
        cfg = TrainConfig(**{**vars(cfg), "resume": True})
    train(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(6))
    out = cfg.out
    adapters = {p.parent.name: load_file(str(p)) for p in sorted(
        __import__("pathlib").Path(out).rglob("adapter_model.safetensors"))}
    metrics = [json.loads(x) for x in open(f"{out}/metrics.jsonl").read().splitlines()]
    return {"adapters": adapters, "losses": [m["loss"] for m in metrics],
            "bytes": json.load(open(f"{out}/summary.json"))["comm_bytes"]}


@pytest.mark.parametrize("method", ["lesft", "splitlora", "sl", "splitfrozen", "fedavg"])
def test_shared_base_equals_a_copy_per_client(method, tokenizer, tmp_path, monkeypatch) -> None:
    copies = _train(cfg_for(method, tmp_path / "copies", share_base=False), tokenizer)
    shared = _train(cfg_for(method, tmp_path / "shared", share_base=True), tokenizer, crash_at=3,
                    monkeypatch=monkeypatch)  # across an aggregation (round 2) and a resume (round 3)
    assert shared["losses"] == pytest.approx(copies["losses"], abs=1e-6)
    assert shared["bytes"] == copies["bytes"]
    assert shared["adapters"].keys() == copies["adapters"].keys()
    for name, tensors in copies["adapters"].items():
        for k, v in tensors.items():
            torch.testing.assert_close(shared["adapters"][name][k], v, atol=1e-6, rtol=0)


def _frozen_and_lora(run: Run, i: int):
    c = run.clients[i]
    frozen = {n: p.data_ptr() for n, p in c.bottom.named_parameters() if not p.requires_grad}
    lora = {n: p.data_ptr() for n, p in c.bottom.named_parameters() if p.requires_grad}
    return frozen, lora


def test_clients_share_frozen_storage_and_own_their_lora(tokenizer, tmp_path) -> None:
    run = Run(cfg_for("splitlora", tmp_path), make_model("llama", layers=L, hidden=H), tokenizer, rows(6))
    (f0, l0), (f1, l1) = _frozen_and_lora(run, 0), _frozen_and_lora(run, 1)
    assert f0 and f0 == f1  # the same storage: one frozen base
    assert l0 and not set(l0.values()) & set(l1.values())  # each client its own LoRA tensors
    copies = Run(cfg_for("splitlora", tmp_path, share_base=False), make_model("llama", layers=L, hidden=H),
                 tokenizer, rows(6))
    assert not set(_frozen_and_lora(copies, 0)[0].values()) & set(_frozen_and_lora(copies, 1)[0].values())


def test_an_update_never_changes_another_clients_adapter_before_aggregation(tokenizer, tmp_path) -> None:
    run = Run(cfg_for("sl", tmp_path, clients_per_round=1), make_model("llama", layers=L, hidden=H), tokenizer,
              rows(6))
    before = [lora_state(c.bottom) for c in run.clients]
    line = run.round(0)
    (trained,) = line["clients"]
    for c, b in zip(run.clients, before):
        moved = any(not torch.equal(v, lora_state(c.bottom)[k]) for k, v in b.items())
        assert moved == (c.cid == trained)


def test_sampling_is_seeded_and_aggregates_only_the_clients_that_trained(tokenizer, tmp_path) -> None:
    cfg = cfg_for("splitlora", tmp_path, clients_per_round=1, aggregate_every=1, rounds=3)
    run = Run(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(6))
    again = Run(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(6))
    assert [[c.cid for c in run.sampled(r)] for r in range(20)] == [[c.cid for c in again.sampled(r)]
                                                                     for r in range(20)]
    assert len({run.sampled(r)[0].cid for r in range(20)}) == 3  # every client gets its turn
    # one client trained: its adapter (weight |D_i| / |D_i| = 1, untrained clients weigh 0) goes to every client
    trained = run.sampled(0)[0]
    sent = {}
    real = trained.upload
    trained.upload = lambda: sent.setdefault("u", real())
    line = run.round(0)
    assert line["clients"] == [trained.cid] and line["aggregated"]
    for c in run.clients:
        for k, v in sent["u"].tensors.items():
            assert torch.equal(lora_state(c.bottom)[k], v)


def test_rounds_from_epochs_count_expected_passes(tokenizer, tmp_path) -> None:
    cfg = cfg_for("splitlora", tmp_path, rounds=0, epochs=1, clients=4, clients_per_round=2)
    assert num_rounds(cfg, [5, 5, 4, 4]) == 10  # 5 micro-batches per pass, each client trains half the rounds
    with pytest.raises(ValueError, match="clients_per_round must be in"):
        TrainConfig(clients=4, clients_per_round=5)
