"""The token-weighting baselines (issue 30, part 3): DFT (lesft/objectives/dft.py) and Rho-1
(lesft/objectives/rho1.py, its frozen pass in lesft/frozen.py)."""

from __future__ import annotations

import math

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import make_model, rows
from lesft import methods
from lesft.config import TrainConfig
from lesft.typed import build_config
from lesft.frozen import adapters_disabled, frozen_target_logprobs
from lesft.lora import LoraArgs
from lesft.objectives import ObjectiveBatch, get_objective
from lesft.objectives.dft import dft_from_logprobs
from lesft.objectives.rho1 import rho1_from_logprobs, rho1_keep
from lesft.train import Run

T = 384
H, L = 32, 4


def _cfg(method: str, tmp_path, **kw) -> TrainConfig:
    base = dict(method=method, clients=2, rounds=1, grad_accum=2, max_length=T, pad_to_multiple=T,
                client_layers="1", lora=LoraArgs(r=4, alpha=8, dropout=0.0), out=str(tmp_path / method),
                progress=False, device="cpu")
    base.update(kw)
    return methods.resolve(TrainConfig(**base))


# ---------------------------------------------------------------------------------------------- DFT

def test_dft_hand_computed_on_tiny_logits():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]],
                           [[0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]], requires_grad=True)
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 2]])
    # row 0: position 0 predicts 0 from [2, 0, 0]; position 1 predicts 1 from [0, 1, 0]; row 1: position 1 predicts 2
    p00 = math.exp(2) / (math.exp(2) + 2)
    p01 = math.e / (math.e + 2)
    p11 = 1 / 3
    row0 = (-p00 * math.log(p00) - p01 * math.log(p01)) / 2
    row1 = -p11 * math.log(p11)
    want = (row0 + row1) / 2  # per-sample token mean, then the mean over samples (as the project's ce)
    batch = ObjectiveBatch(logits, labels, torch.zeros(2, 3, 4))
    loss, stats = get_objective("dft").fn(batch, TrainConfig())
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["mean_p"] == pytest.approx((p00 + p01 + p11) / 3, rel=1e-6)
    # the weight is held constant: the gradient is sg(p) times ce's
    loss.backward()
    g = logits.grad[1, 1]
    soft = torch.softmax(torch.zeros(3), 0)
    want_g = p11 * (soft - torch.tensor([0.0, 0.0, 1.0])) / 2  # d(-log p)/dz = softmax - onehot; row 1 weighs 1/2
    assert torch.allclose(g, want_g, atol=1e-6)


def test_dft_logprobs_path_equals_logits_path():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.tensor([[-100, -100, 1, 2, 3, 4], [-100, 5, 6, -100, -100, -100], [-100, -100, -100, -100, 7, 8]])
    a, _ = get_objective("dft").fn(ObjectiveBatch(logits, labels, torch.zeros(3, 6, 2)), TrainConfig())
    mask = labels[:, 1:] != -100
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0][mask]
    b, _ = dft_from_logprobs(lp, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


# -------------------------------------------------------------------------------------------- Rho-1

def test_rho1_kept_tokens_hand_computed():
    cur = torch.log(torch.tensor([0.5, 0.1, 0.9, 0.2, 0.3])).requires_grad_(True)
    ref = torch.log(torch.tensor([0.5, 0.4, 0.3, 0.25, 0.9]))
    # excess = -log p + log p_ref = log(p_ref / p) = [0, log 4, log 1/3, log 1.25, log 3]
    # ratio 0.6 of 5 tokens -> ceil(3.0) = 3 kept: tokens 1 (log 4), 4 (log 3), 3 (log 1.25)
    keep = rho1_keep(cur, ref, 0.6)
    assert keep.tolist() == [False, True, False, True, True]
    loss, stats = rho1_from_logprobs(cur, ref, 0.6)
    assert loss.item() == pytest.approx(-(math.log(0.1) + math.log(0.2) + math.log(0.3)) / 3, rel=1e-6)
    assert stats["kept"] == pytest.approx(0.6)
    assert stats["mean_excess_kept"] == pytest.approx((math.log(4) + math.log(3) + math.log(1.25)) / 3, rel=1e-5)
    loss.backward()
    assert cur.grad.tolist() == pytest.approx([0.0, -1 / 3, 0.0, -1 / 3, -1 / 3])
    assert rho1_keep(cur, ref, 0.5).tolist() == [False, True, False, True, True]  # ceil(2.5) = 3
    assert rho1_keep(cur, ref, 0.01).tolist() == [False, True, False, False, False]  # at least one
    assert rho1_keep(cur, ref, 1.0).all()


def test_rho1_config_and_presets():
    assert TrainConfig().rho1.ratio == 0.6
    assert build_config(TrainConfig, None, {"rho1.ratio": 0.7}).rho1.ratio == 0.7
    with pytest.raises(ValueError, match="rho1.ratio"):
        build_config(TrainConfig, None, {"rho1.ratio": 0.0})
    for m in ("dft", "rho1"):
        r = methods.resolve(TrainConfig(method=m))
        assert (r.split, r.client_trainable, r.paths, r.loss, r.aggregate_every) == (True, True, "base", m, 5)
    assert methods.resolve(TrainConfig(method="splitlora", loss="rho1")).loss == "rho1"
    with pytest.raises(ValueError, match="frozen base.*label_privacy"):
        methods.resolve(TrainConfig(method="rho1", label_privacy=True))
    methods.resolve(TrainConfig(method="dft", label_privacy=True))  # dft needs nothing more: allowed


def _lora_layers(module):
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def test_rho1_frozen_pass_has_no_grad_and_leaves_adapters_on(tokenizer, tmp_path):
    cfg = _cfg("rho1", tmp_path)
    run = Run(cfg, make_model("llama", layers=L, hidden=H), tokenizer, rows(8))
    top = run.server.top
    lora = _lora_layers(top)
    assert lora
    for m in lora:  # make the adapters matter (B starts at zero)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    grads = {id(p): p.requires_grad for p in top.parameters()}
    torch.manual_seed(1)
    hidden = torch.randn(2, 10, H, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.long)
    pos = torch.arange(10).expand(2, 10)
    labels = torch.tensor([[-100] * 5 + [3, 4, 5, 6, 7], [-100] * 7 + [8, 9, 10]])
    top.train()
    frozen = frozen_target_logprobs(top, hidden, mask, pos, labels, 0)
    assert not frozen.requires_grad and frozen.grad_fn is None and frozen.shape == (8,)
    assert all(not m.disable_adapters for m in lora) and top.training
    assert {id(p): p.requires_grad for p in top.parameters()} == grads  # FFA's frozen A stays frozen
    logits, _ = top(hidden, mask, pos)
    on = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    on = on[labels[:, 1:] != -100]
    assert not torch.allclose(on, frozen, atol=1e-4)  # the adapters were off in the frozen pass
    with adapters_disabled(top), torch.no_grad():
        top.eval()
        logits, _ = top(hidden, mask, pos)
        top.train()
    off = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(off[labels[:, 1:] != -100], frozen, atol=1e-5)
    assert all(not m.disable_adapters for m in lora)
    # chunked head: the same values
    assert torch.allclose(frozen_target_logprobs(top, hidden, mask, pos, labels, 3), frozen, atol=1e-6)


@pytest.mark.parametrize("method,kw", [("rho1", {}), ("dft", {}), ("fedavg", {"loss": "rho1"}),
                                       ("rho1", {"head_chunk_tokens": 0}), ("rho1", {"server_chunk_rows": 1})])
def test_one_round_trains(method, kw, tokenizer, tmp_path):
    """A smoke round: split server (whole head and chunked), unsplit client (frozen pass from the bottom up)."""
    run = Run(_cfg(method, tmp_path, **kw), make_model("llama", layers=L, hidden=H), tokenizer, rows(8))
    out = run.round(0)
    assert math.isfinite(out["loss"]) if "loss" in out else True
    parties = ([run.server.top] if run.server is not None else []) + [c.bottom for c in run.clients]
    assert all(not m.disable_adapters for p in parties for m in _lora_layers(p))


def test_unsplit_frozen_pass_reruns_the_bottom(tokenizer, tmp_path, monkeypatch):
    import lesft.roles as roles
    calls = []
    real = roles.frozen_hidden

    def spy(bottom, ids, mask):
        out = real(bottom, ids, mask)
        calls.append((torch.is_grad_enabled(), out.requires_grad))
        return out

    monkeypatch.setattr(roles, "frozen_hidden", spy)
    run = Run(_cfg("fedavg", tmp_path, loss="rho1"), make_model("llama", layers=L, hidden=H), tokenizer, rows(8))
    run.round(0)
    assert calls and all(not req for _, req in calls)
