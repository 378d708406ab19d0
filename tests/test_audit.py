"""Privacy audit on a tiny random model: what the server receives, and what the attacks recover from it."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch

from conftest import make_model, make_tokenizer, rows
from lesft import methods
from lesft.audit import run as audit_run
from lesft.audit.attacks import LinearInverter, NearestState, base_states, public_sequences
from lesft.audit.run import AuditConfig, attack, server_view, with_noise
from lesft.audit.score import kind_masks, lcs, rouge_l
from lesft.audit.view import Received, Recorder
from lesft.config import TrainConfig
from lesft.data.prompts import render_target
from lesft.model.split import split_model
from lesft.train import Run

N_ROWS = 6


def victim_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(method="splitlora", clients=2, samples=N_ROWS, batch_size=1, grad_accum=1,
                                 pad_to_multiple=1, client_layers="1", device="cpu", progress=False), **kw})


@pytest.fixture(scope="module")
def world():
    """Tiny model, the victims' rows, and the attacker's public states at k = 1 (another seed's problems)."""
    tok, model = make_tokenizer(), make_model("llama", layers=4, hidden=32)
    attacker = split_model(make_model("llama", layers=4, hidden=32), 1)[0]  # the same public base weights
    public = public_sequences("synthetic:1000", tok, 3000)
    states = base_states(attacker, public, [1])[1]
    inverters = {"nearest_state": NearestState(*states),
                 "linear_inverter": LinearInverter(*states, attacker.embed_tokens.weight.detach())}
    return tok, model, rows(N_ROWS), inverters


def test_label_attack_finds_every_target_token_in_the_standard_split(world) -> None:
    tok, model, victims, inverters = world
    views, truths, _ = server_view(victim_cfg(), model, tok, victims)
    res = attack(views, truths, inverters)["labels"]
    n_target = sum(len(tok(render_target(tok, r["target"]), add_special_tokens=False)["input_ids"]) for r in victims)
    assert res["label_tensor"] is True
    assert res["base:target"]["tokens"] == n_target and res["base:target"]["correct"] == n_target
    assert res["base:private"]["correct"] == 0  # labels say nothing about the prompt


def test_label_private_view_has_no_labels_but_target_text_is_recovered_and_reported(world) -> None:
    tok, model, victims, inverters = world
    views, truths, run = server_view(victim_cfg(label_privacy=True), model, tok, victims)
    assert run.transport.received and all(m.base.labels is None for m in run.transport.received)
    res = attack(views, truths, inverters)
    assert res["labels"]["label_tensor"] is False and res["labels"]["base:target"]["correct"] == 0
    # the targets' hidden states still arrive: measured, not assumed to be 0
    assert res["nearest_state"]["base:target"]["accuracy"] > 0.9
    assert res["linear_inverter"]["base:target"]["accuracy"] > 0.9


def test_weight_knowledge_attack_recovers_nearly_all_prompt_tokens_at_k1(world) -> None:
    tok, model, victims, inverters = world
    views, truths, _ = server_view(victim_cfg(), model, tok, victims)
    res = attack(views, truths, inverters)["nearest_state"]
    private = torch.cat([t.ids[m["private"]] for t, m in zip(truths, kind_masks(truths))])
    chance = Counter(private.tolist()).most_common(1)[0][1] / len(private)  # always guess the commonest token
    assert res["base:private"]["tokens"] == len(private) > 200
    # the cut state after one layer is dominated by the token's own embedding: the nearest public state
    # in the attacker's base-weight codebook is almost always the same token (misses: characters that the
    # public problems never contain)
    assert res["base:private"]["accuracy"] >= 0.95 and chance < 0.3
    assert res["base:prompt"]["rouge_l"] >= 0.95


def test_noise_lowers_recovery_monotonically_on_a_fixed_seed(world) -> None:
    tok, model, victims, inverters = world
    views, truths, _ = server_view(victim_cfg(), model, tok, victims)
    for name in inverters:
        acc = [attack(with_noise(views, s, seed=0), truths, {name: inverters[name]})[name]["base:private"]["accuracy"]
               for s in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
        assert all(a >= b for a, b in zip(acc, acc[1:])), (name, acc)
        assert acc[-1] < 0.3 * acc[0], (name, acc)


def test_attacks_never_read_the_clients_text(world, monkeypatch) -> None:
    tok, model, victims, inverters = world
    # the view holds what crossed the wire, and nothing else
    assert {f.name for f in dataclasses.fields(Received)} == {"hidden", "mask", "positions", "labels", "path",
                                                               "top", "grad"}
    views, truths, run = server_view(victim_cfg(), model, tok, victims)
    sent = [m.base.hidden[0] for m in run.transport.received]
    assert len(sent) == len(views) and all(torch.equal(v.hidden, h) for v, h in zip(views, sent))
    # guesses are the same whatever the truth is: only the scorer reads it
    seen: list[list] = []
    monkeypatch.setattr(audit_run, "score", lambda guesses, truths, paths: seen.append(guesses) or {
        "base:target": {"accuracy": 0.0}, "base:private": {"accuracy": 0.0}})
    attack(views, truths, inverters)
    garbage = [dataclasses.replace(t, ids=torch.randint(0, 100, t.ids.shape)) for t in truths]
    attack(views, garbage, inverters)
    assert len(seen) == 6 and all(len(g) > 0 for g in seen)  # three attacks per call, each guessing something
    for a, b in zip(seen[:3], seen[3:]):
        assert len(a) == len(b)
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def test_cut_noise_is_added_by_the_client_at_the_set_sigma(world) -> None:
    tok, model, victims, _ = world
    cfg = methods.resolve(victim_cfg(cut_noise=0.5))
    run = Run(cfg, make_model("llama", layers=4, hidden=32), tok, victims, transport=Recorder())
    clean = Run(methods.resolve(victim_cfg()), make_model("llama", layers=4, hidden=32), tok, victims,
                transport=Recorder())
    torch.manual_seed(1)
    run.round(0)
    torch.manual_seed(1)
    clean.round(0)
    assert len(run.transport.received) == len(clean.transport.received) > 0
    for noisy, ref in zip(run.transport.received, clean.transport.received):
        h, n = ref.base.hidden, noisy.base.hidden - ref.base.hidden
        rms = h.pow(2).mean(-1).sqrt()
        assert n.pow(2).mean(-1).sqrt().div(rms).mean().item() == pytest.approx(0.5, rel=0.1)
    assert run.round(1)["loss"] > 0  # training goes on with the noisy activations


def test_rouge_l_and_the_shared_template_ends() -> None:
    assert lcs([1, 2, 3, 4], [1, 3, 4, 5]) == 3
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    assert rouge_l([], [1]) == 0.0 and rouge_l([], []) == 1.0
    from lesft.audit.view import Truth

    t = [Truth(torch.tensor([7, 8, 1, 9, 5, 5]), torch.tensor([0, 0, 0, 0, 1, 1]).bool()),
         Truth(torch.tensor([7, 8, 2, 3, 9, 6]), torch.tensor([0, 0, 0, 0, 0, 1]).bool())]
    m = kind_masks(t)
    assert m[0]["private"].tolist() == [False, False, True, False, False, False]
    assert m[1]["private"].tolist() == [False, False, True, True, False, False]


def test_cli_audit_writes_tables_json_and_figure(assets, tmp_path) -> None:
    from lesft.cli import main

    out = tmp_path / "audit"
    rc = main(["audit", "--run.model", str(assets / "model"), "--run.method", "lesft", "--run.samples", "4",
               "--run.synthetic.min_steps", "1", "--run.synthetic.max_steps", "1", "--run.max_length", "400", "--client_layers", "1", "2",
               "--defence_layers", "1", "--noise", "0", "1", "--public", "docs", "--public_tokens", "800",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "audit.json").read_text())
    cells = [(r["k"], r["label_private"], r["sigma"]) for r in summary["results"]]
    assert cells == [(1, False, 0.0), (1, False, 1.0), (1, True, 0.0), (2, False, 0.0), (1, True, 0.0)]
    assert "base:target" in summary["results"][0]["attacks"]["nearest_state"]
    assert "reference:target" in summary["results"][0]["attacks"]["nearest_state"]  # lesft: both paths
    assert summary["config"]["run"]["lr"] == AuditConfig().run.lr  # a partial run group keeps the defaults
    assert (out / "recovery_vs_k.png").stat().st_size > 0 and "| k | mode" in (out / "audit.md").read_text()


def test_fine_tuning_moves_the_view_and_costs_are_measured(tmp_path) -> None:
    tok, model = make_tokenizer(), make_model("llama", layers=4, hidden=32)
    run = dataclasses.replace(AuditConfig().run, method="splitlora", samples=4, lr=1e-2, model="tiny",
                              synthetic=dataclasses.replace(AuditConfig().run.synthetic, min_steps=1, max_steps=1))
    cfg = AuditConfig(run=run, client_layers=("1",), defence_layers="1", noise=(0.0, 2.0), train_rounds=(0, 3),
                      public="synthetic:7", public_tokens=1500, out=str(tmp_path))
    s = audit_run.run_audit(cfg, model, tok)
    cells = [(r["rounds"], r["sigma"], r["label_private"]) for r in s["results"]]
    assert cells == [(0, 0.0, False), (0, 2.0, False), (3, 0.0, False), (0, 0.0, True), (1, 0.0, True)]
    during = s["results"][-1]
    assert during["during_training"] and during["attacks"]["gradient_labels"]["base:target"]["accuracy"] > 0.99
    by = {c: r["attacks"]["nearest_state"]["base:prompt"] for c, r in zip(cells, s["results"])}
    assert by[(0, 0.0, False)]["tokens"] == by[(3, 0.0, False)]["tokens"]  # the same rows before and after
    tuned = s["results"][2]
    assert s["results"][0]["moved"] == 0.0 and tuned["moved"] > 0 and len(tuned["train_loss"]) == 2
    c = s["defence_costs"]
    # label-private: the last layer's states come down and their gradient goes up, on top of the standard split
    assert c["label_private"]["comm_bytes"]["server_to_client"] > 1.9 * c["none"]["comm_bytes"]["server_to_client"]
    # noise: not one byte more
    assert c["cut_noise=2"]["comm_bytes"] == c["none"]["comm_bytes"]


@pytest.mark.parametrize("method", ["splitlora", "lesft"])
def test_label_private_gradients_give_the_targets_back(world, method) -> None:
    """No label tensor crosses in label-private mode, but the returned gradient dL/d(last states) does."""
    from lesft.audit.attacks import GradientLabels
    from lesft.audit.view import record_training
    from lesft.model.split import client_head

    tok, _, victims, _ = world
    cfg = methods.resolve(victim_cfg(method=method, label_privacy=True, grad_accum=2))
    run = Run(cfg, make_model("llama", layers=4, hidden=32), tok, victims, transport=Recorder())
    views, truths = record_training(run, rounds=2)
    assert len([v for v in views if v.path == "base"]) == 2 * 2 * 2 and all(v.labels is None for v in views)
    _, _, layout = split_model(make_model("llama", layers=4, hidden=32), 1)
    res = attack(views, truths, {"gradient_labels": GradientLabels(client_head(layout))})
    assert res["labels"]["base:target"]["correct"] == 0
    # the gradient at position t gives the target token at t + 1: all of them come back (the bound leaves room
    # for a LESFT weight of exactly 0, whose gradient is 0), and no prompt token is guessed
    tgt = res["gradient_labels"]["base:target"]
    assert tgt["tokens"] > 300 and tgt["correct"] >= 0.99 * tgt["tokens"]
    assert res["gradient_labels"]["base:private"]["correct"] == 0
