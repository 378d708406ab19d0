"""Tests for lesft.loss (the LESFT token-weighted loss).

Expectations are computed by hand or by a slow per-token Python reference implementation
(``_slow_lesft``) that shares no code with ``lesft.loss``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lesft.loss import (
    IGNORE_INDEX,
    LossConfig,
    ce_loss,
    lesft_loss,
    subsalient_mask,
    target_logprobs,
    token_weights,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _row(p: float, y: int, V: int) -> torch.Tensor:
    """A logits row whose softmax gives probability p to token y (rest spread evenly)."""
    r = torch.full((V,), math.log((1.0 - p) / (V - 1)), dtype=torch.float64)
    r[y] = math.log(p)
    return r


def _slow_lesft(base_logits, base_labels, ref_logits, ref_labels, base_hidden, *, p_sal=0.95,
                gammas=(5.0, 0.3, 0.6), tau=0.8, window=0, uniform=None, lam=0.0):
    """Per-token Python-loop reference implementation (float64). Weights are python floats, so
    the returned loss's gradient only flows through the base log-probs."""
    g1, g2, g3 = gammas
    B = base_labels.shape[0]
    samples, ce_samples = [], []
    for b in range(B):
        bpos = [t for t in range(1, base_labels.shape[1]) if int(base_labels[b, t]) != IGNORE_INDEX]
        rpos = [t for t in range(1, ref_labels.shape[1]) if int(ref_labels[b, t]) != IGNORE_INDEX]
        assert len(bpos) == len(rpos)
        n = len(bpos)
        if n == 0:
            continue
        pref, logp, hs = [], [], []
        for tb, tr in zip(bpos, rpos):
            y = int(base_labels[b, tb])
            assert y == int(ref_labels[b, tr])
            pref.append(float(torch.softmax(ref_logits[b, tr - 1].detach().double(), -1)[y]))
            logp.append(torch.log_softmax(base_logits[b, tb - 1].double(), -1)[y])
            if base_hidden is not None:
                hs.append([float(v) for v in base_hidden[b, tb - 1]])
        sal = [p > p_sal for p in pref]
        sub = []
        for i in range(n):
            s = False
            if not sal[i] and base_hidden is not None:
                for j in range(n):
                    if sal[j] and (window == 0 or abs(i - j) <= window):
                        dot = sum(a * c for a, c in zip(hs[i], hs[j]))
                        ni = math.sqrt(sum(a * a for a in hs[i]))
                        nj = math.sqrt(sum(a * a for a in hs[j]))
                        if dot / (ni * nj) >= tau:
                            s = True
            sub.append(s)
        total, ce_total = 0.0, 0.0
        for i in range(n):
            if sal[i]:
                w = 1.0 + math.pow((pref[i] - p_sal) / (1.0 - p_sal), g1)
            elif uniform is not None:
                w = uniform
            elif sub[i]:
                w = math.pow(pref[i] / p_sal, g2)
            else:
                w = math.pow(pref[i] / p_sal, g3)
            total = total - w * logp[i]
            ce_total = ce_total - logp[i]
        samples.append(total / n)
        ce_samples.append(ce_total / n)
    weighted = sum(samples) / len(samples)
    ce = sum(ce_samples) / len(ce_samples)
    return lam * (ce + weighted) if lam > 0 else weighted


def _random_batch(seed: int = 0, V: int = 13, H: int = 3):
    """Three samples; base is LEFT padded, reference RIGHT padded, different prompt lengths and
    different padded lengths (T_base != T_ref); sample 2 has a 1-token target."""
    g = torch.Generator().manual_seed(seed)
    targets = [[int(v) for v in torch.randint(0, V, (n,), generator=g)] for n in (7, 4, 1)]
    base_prompt = [2, 5, 3]
    ref_prompt = [9, 6, 12]
    T_base = max(p + len(t) for p, t in zip(base_prompt, targets)) + 1
    T_ref = max(p + len(t) for p, t in zip(ref_prompt, targets)) + 2
    B = len(targets)
    base_labels = torch.full((B, T_base), IGNORE_INDEX, dtype=torch.long)
    ref_labels = torch.full((B, T_ref), IGNORE_INDEX, dtype=torch.long)
    for b, t in enumerate(targets):
        end = T_base  # left padding: sequence ends at T_base
        base_labels[b, end - len(t):end] = torch.tensor(t)
        ref_labels[b, ref_prompt[b]:ref_prompt[b] + len(t)] = torch.tensor(t)
    base_logits = torch.randn(B, T_base, V, generator=g, dtype=torch.float64) * 2
    ref_logits = torch.randn(B, T_ref, V, generator=g, dtype=torch.float64) * 2
    # make roughly every other target token salient on the reference path
    for b, t in enumerate(targets):
        for k, y in enumerate(t):
            if k % 2 == 0:
                ref_logits[b, ref_prompt[b] + k - 1, y] += 9.0
    base_hidden = torch.randn(B, T_base, H, generator=g, dtype=torch.float64)
    return (base_logits.float(), base_labels, ref_logits.float(), ref_labels, base_hidden.float())


# ----------------------------------------------------------------------------------------------
# token_weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_at_threshold_is_one_and_not_salient(dtype):
    p = torch.tensor([0.95, 0.95], dtype=dtype)
    w = token_weights(p, torch.tensor([True, False]))
    # p~ == p_sal is NOT salient (strict >), so (p~/p_sal)^gamma = 1 for both classes
    assert torch.equal(w, torch.ones(2, dtype=dtype))


def test_weight_limits():
    p = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    w = token_weights(p, torch.tensor([False, True, False]))
    assert w.tolist() == [2.0, 0.0, 0.0]
    # just above / below the limits
    w = token_weights(torch.tensor([1.0 - 1e-9, 1e-9], dtype=torch.float64), torch.tensor([False, False]))
    assert w[0] == pytest.approx(2.0, abs=1e-6)
    assert w[1] == pytest.approx(0.0, abs=1e-4)


def test_weight_mid_values_hand_computed():
    p = torch.tensor([0.99, 0.975, 0.475, 0.475, 0.76, 0.19], dtype=torch.float64)
    sub = torch.tensor([True, False, True, False, True, False])  # sub flag on salient 0.99 ignored
    w = token_weights(p, sub).tolist()
    expected = [
        1.0 + 0.8**5,          # 1.32768   salient
        1.0 + 0.5**5,          # 1.03125   salient
        0.8122523963562356,    # 0.5^0.3   sub-salient
        0.6597539553864471,    # 0.5^0.6   irrelevant
        0.9352484478226214,    # 0.8^0.3   sub-salient
        0.3807307877431757,    # 0.2^0.6   irrelevant
    ]
    assert w == pytest.approx(expected, rel=1e-12)
    assert w[0] == pytest.approx(1.32768, rel=1e-12)


def test_weight_custom_gammas_and_threshold():
    p = torch.tensor([0.9, 0.4, 0.4], dtype=torch.float64)
    w = token_weights(p, torch.tensor([False, True, False]), p_sal=0.8, gammas=(2.0, 1.0, 2.0)).tolist()
    assert w == pytest.approx([1.0 + 0.25, 0.5, 0.25], rel=1e-12)


def test_weights_carry_no_grad():
    p = torch.tensor([0.99, 0.5], requires_grad=True)
    w = token_weights(p, torch.tensor([False, True]))
    assert not w.requires_grad


# ----------------------------------------------------------------------------------------------
# subsalient_mask
# ----------------------------------------------------------------------------------------------


def test_subsalient_mask_known_answer_and_no_cross_sample_clusters():
    hidden = torch.tensor(
        [
            # sample 0: slot0 salient centre, slot1 close to it, slot2 orthogonal, slot3 padding (close)
            [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.05]],
            # sample 1: slots 0, 1 identical to sample 0's salient centre; slot3 is an INVALID
            # salient slot (padding) that must not act as a centre either
            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
        ]
    )
    salient = torch.tensor([[True, False, False, False], [False, False, False, True]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, False]])
    got = subsalient_mask(hidden, salient, valid, tau=0.8)
    expected = torch.tensor([[False, True, False, False], [False, False, False, False]])
    assert torch.equal(got, expected)


def test_subsalient_mask_threshold_is_inclusive_and_salient_excluded():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    salient = torch.tensor([[True, False, True]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    # cos(slot1, centres) == 0 exactly
    assert subsalient_mask(hidden, salient, valid, tau=0.0).tolist() == [[False, True, False]]
    assert subsalient_mask(hidden, salient, valid, tau=0.01).tolist() == [[False, False, False]]


def test_subsalient_mask_window():
    hidden = torch.ones(1, 6, 4)  # all identical: only the window decides
    valid = torch.ones(1, 6, dtype=torch.bool)
    one = torch.tensor([[True, False, False, False, False, False]])
    assert subsalient_mask(hidden, one, valid, tau=0.9, window=0).tolist() == [[False] + [True] * 5]
    assert subsalient_mask(hidden, one, valid, tau=0.9, window=2).tolist() == [
        [False, True, True, False, False, False]
    ]
    two = torch.tensor([[True, False, False, False, False, True]])
    assert subsalient_mask(hidden, two, valid, tau=0.9, window=1).tolist() == [
        [False, True, False, False, True, False]
    ]


def test_subsalient_mask_matches_loop_on_random():
    g = torch.Generator().manual_seed(3)
    B, N, H = 3, 9, 3
    hidden = torch.randn(B, N, H, generator=g)
    salient = torch.rand(B, N, generator=g) < 0.3
    counts = [9, 5, 2]
    valid = torch.arange(N)[None] < torch.tensor(counts)[:, None]
    for tau, window in [(0.3, 0), (0.5, 2), (-0.2, 1)]:
        got = subsalient_mask(hidden, salient, valid, tau, window)
        for b in range(B):
            for i in range(N):
                exp = bool(valid[b, i]) and not bool(salient[b, i]) and any(
                    bool(salient[b, j]) and bool(valid[b, j])
                    and float(F.cosine_similarity(hidden[b, i], hidden[b, j], dim=0)) >= tau
                    and (window == 0 or abs(i - j) <= window)
                    for j in range(N)
                )
                assert bool(got[b, i]) == exp, (tau, window, b, i)


# ----------------------------------------------------------------------------------------------
# target_logprobs / ce_loss
# ----------------------------------------------------------------------------------------------


def test_target_logprobs_matches_full_log_softmax():
    base_logits, base_labels, *_ = _random_batch()
    logp, mask = target_logprobs(base_logits.bfloat16(), base_labels)
    assert logp.dtype == torch.float32 and logp.shape == mask.shape == (3, base_labels.shape[1] - 1)
    full = torch.log_softmax(base_logits.bfloat16().float(), -1)[:, :-1]
    lab = base_labels[:, 1:]
    assert torch.equal(mask, lab != IGNORE_INDEX)
    exp = full.gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(logp, exp)


def test_ce_loss_is_per_sample_token_mean():
    base_logits, base_labels, *_ = _random_batch()
    per = [F.cross_entropy(base_logits[b, :-1], base_labels[b, 1:], ignore_index=IGNORE_INDEX)
           for b in range(3)]
    torch.testing.assert_close(ce_loss(base_logits, base_labels), torch.stack(per).mean())


# ----------------------------------------------------------------------------------------------
# lesft_loss
# ----------------------------------------------------------------------------------------------


def _worked_example():
    """The example of docs/loss.md: 4 target tokens (ids 3, 5, 7, 2), V = 8.

    p~ = (0.99, 0.76, 0.76, 0.19), base p = (0.5, 0.25, 0.5, 0.8); hidden states (at the
    positions predicting the tokens) (1,0), (1,0.1), (0,1), (-1,0): token 2 has cos 0.995 with
    the salient token 1 -> sub-salient; tokens 3 and 4 irrelevant.
    Base: 2 prompt tokens + 4 targets (T=6). Reference: 5 prompt tokens + 4 targets + 2 pad (T=11).
    """
    V, ys = 8, [3, 5, 7, 2]
    p_ref, p_base = [0.99, 0.76, 0.76, 0.19], [0.5, 0.25, 0.5, 0.8]
    hid = [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]
    base_labels = torch.tensor([[IGNORE_INDEX] * 2 + ys])
    ref_labels = torch.tensor([[IGNORE_INDEX] * 5 + ys + [IGNORE_INDEX] * 2])
    base_logits = torch.zeros(1, 6, V, dtype=torch.float64)
    ref_logits = torch.zeros(1, 11, V, dtype=torch.float64)
    base_hidden = torch.zeros(1, 6, 2)
    for k, y in enumerate(ys):
        base_logits[0, 1 + k] = _row(p_base[k], y, V)
        ref_logits[0, 4 + k] = _row(p_ref[k], y, V)
        base_hidden[0, 1 + k] = torch.tensor(hid[k])
    return base_logits.float(), base_labels, ref_logits.float(), ref_labels, base_hidden


def test_worked_example_from_docs():
    bl, blab, rl, rlab, bh = _worked_example()
    loss, stats = lesft_loss(bl, blab, rl, rlab, bh, LossConfig())
    # hand computation (docs/loss.md):
    #   w = 1.327680, 0.935248, 0.874690, 0.380731 ; -log p = 0.693147, 1.386294, 0.693147, 0.223144
    #   L = (0.920278 + 1.296530 + 0.606289 + 0.084958) / 4 = 0.727013
    assert loss.item() == pytest.approx(0.727013, abs=2e-6)
    assert stats["frac_salient"] == pytest.approx(0.25)
    assert stats["frac_subsalient"] == pytest.approx(0.25)
    assert stats["frac_irrelevant"] == pytest.approx(0.5)
    assert stats["mean_weight_salient"] == pytest.approx(1.327680, abs=2e-5)
    assert stats["mean_weight_subsalient"] == pytest.approx(0.935248, abs=2e-6)
    assert stats["mean_weight_irrelevant"] == pytest.approx((0.874690 + 0.380731) / 2, abs=2e-6)
    assert stats["mean_weight"] == pytest.approx(0.879587, abs=5e-6)
    assert stats["ce"] == pytest.approx(0.748933, abs=2e-6)
    assert stats["loss_weighted"] == pytest.approx(0.727013, abs=2e-6)
    assert stats["n_target_tokens"] == 4.0


def test_worked_example_without_hidden_has_no_subsalient():
    bl, blab, rl, rlab, _ = _worked_example()
    loss, stats = lesft_loss(bl, blab, rl, rlab, None, LossConfig())
    # token 2 falls back to irrelevant: w = 0.8^0.6 = 0.874690
    exp = (1.327680 * math.log(2) + 0.874690 * math.log(4) + 0.874690 * math.log(2)
           + 0.380731 * -math.log(0.8)) / 4
    assert loss.item() == pytest.approx(exp, abs=2e-6)
    assert stats["frac_subsalient"] == 0.0 and stats["mean_weight_subsalient"] == 0.0
    assert stats["frac_irrelevant"] == pytest.approx(0.75)


def test_worked_example_uniform_and_nlft():
    bl, blab, rl, rlab, bh = _worked_example()
    nll = [math.log(2), math.log(4), math.log(2), -math.log(0.8)]
    loss, stats = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(weighting="uniform=0.5"))
    exp = (1.327680 * nll[0] + 0.5 * (nll[1] + nll[2] + nll[3])) / 4
    assert loss.item() == pytest.approx(exp, abs=2e-6)
    assert stats["mean_weight_subsalient"] == pytest.approx(0.5)
    assert stats["mean_weight_irrelevant"] == pytest.approx(0.5)
    loss, _ = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(nlft_lambda=0.5))
    assert loss.item() == pytest.approx(0.5 * (0.748933 + 0.727013), abs=2e-6)  # 0.737973


@pytest.mark.parametrize("c", [0.0, 0.25, 2.0])
def test_uniform_c_all_non_salient_weights_equal_c(c):
    bl, blab, rl, rlab, bh = _random_batch(seed=5)
    loss, stats = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(weighting=f"uniform={c}", tau=0.3))
    assert stats["frac_salient"] > 0 and stats["frac_salient"] < 1
    assert stats["mean_weight_irrelevant"] == pytest.approx(c) or stats["frac_irrelevant"] == 0
    assert stats["mean_weight_subsalient"] == pytest.approx(c) or stats["frac_subsalient"] == 0
    assert stats["mean_weight_salient"] > 1.0
    exp = _slow_lesft(bl, blab, rl, rlab, bh, tau=0.3, uniform=c)
    assert loss.item() == pytest.approx(float(exp), rel=1e-5)


def test_equals_ce_when_all_weights_are_one():
    bl, blab, _, rlab, bh = _random_batch(seed=1)
    rl = torch.zeros(3, rlab.shape[1], bl.shape[-1])  # p~ = 1/V everywhere: nothing salient
    loss, stats = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(weighting="uniform=1"))
    assert stats["frac_salient"] == 0.0 and stats["mean_weight"] == pytest.approx(1.0)
    assert torch.equal(loss, ce_loss(bl, blab))


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(tau=0.3),
        dict(tau=0.3, window=1),
        dict(tau=-0.5, window=3, gammas=(2.0, 0.5, 1.5), p_sal=0.9),
        dict(tau=0.3, lam=0.7),
    ],
)
def test_matches_slow_reference_with_misaligned_paths(kw):
    bl, blab, rl, rlab, bh = _random_batch(seed=0)
    cfg = LossConfig(
        tau=kw.get("tau", 0.8), window=kw.get("window", 0), p_sal=kw.get("p_sal", 0.95),
        gamma_salient=kw.get("gammas", (5.0, 0.3, 0.6))[0],
        gamma_subsalient=kw.get("gammas", (5.0, 0.3, 0.6))[1],
        gamma_irrelevant=kw.get("gammas", (5.0, 0.3, 0.6))[2],
        nlft_lambda=kw.get("lam", 0.0),
    )
    assert blab.shape[1] != rlab.shape[1]
    bl = bl.clone().requires_grad_(True)
    loss, stats = lesft_loss(bl, blab, rl, rlab, bh, cfg)
    bl2 = bl.detach().clone().requires_grad_(True)
    exp = _slow_lesft(bl2, blab, rl, rlab, bh, p_sal=cfg.p_sal, gammas=cfg.gammas, tau=cfg.tau,
                      window=cfg.window, lam=cfg.nlft_lambda)
    # float32 fast path against the float64 reference: log p is accurate to ~1e-7 and the salient weight
    # amplifies a p~ error by up to gamma_1 / (1 - p_sal) = 100 (lesft.loss._rows_logprob), so agreement is
    # ~1e-6 relative, and how close depends on the CPU's float32 reductions (2e-6 on an AVX2-only EPYC)
    assert loss.detach().item() == pytest.approx(exp.detach().item(), rel=1e-5)
    assert stats["frac_salient"] + stats["frac_subsalient"] + stats["frac_irrelevant"] == pytest.approx(1.0)
    assert stats["n_target_tokens"] == 12.0
    if kw.get("tau") == 0.3:  # every class is exercised
        assert min(stats["frac_salient"], stats["frac_subsalient"], stats["frac_irrelevant"]) > 0
    # gradients agree too (the reference uses constant python-float weights => weights detached)
    loss.backward()
    exp.backward()
    torch.testing.assert_close(bl.grad, bl2.grad.float(), rtol=1e-4, atol=1e-6)


def test_cluster_on_reference_clusters_the_reference_paths_states():
    """``cluster_on="reference"`` clusters the reference path's hidden state at the position that predicts each
    target token: the same as the slow reference given those states moved, by a loop over labels, to the base
    path's positions that predict the same target tokens."""
    bl, blab, rl, rlab, bh = _random_batch(seed=3)
    rh = torch.randn(rlab.shape[0], rlab.shape[1], bh.shape[-1], generator=torch.Generator().manual_seed(9))
    moved = torch.zeros_like(bh)
    for b in range(blab.shape[0]):
        base_pos = [t for t in range(1, blab.shape[1]) if blab[b, t] != IGNORE_INDEX]
        ref_pos = [t for t in range(1, rlab.shape[1]) if rlab[b, t] != IGNORE_INDEX]
        for pb, pr in zip(base_pos, ref_pos, strict=True):
            moved[b, pb - 1] = rh[b, pr - 1]
    cfg = LossConfig(tau=0.3, cluster_on="reference")
    loss, stats = lesft_loss(bl, blab, rl, rlab, bh, cfg, ref_hidden=rh)
    exp = _slow_lesft(bl, blab, rl, rlab, moved, tau=0.3)
    assert loss.item() == pytest.approx(float(exp), rel=1e-5)
    on_base, base_stats = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(tau=0.3), ref_hidden=rh)
    assert base_stats["frac_subsalient"] != stats["frac_subsalient"]  # the choice matters on this batch
    with pytest.raises(ValueError, match="cluster_on reference needs"):
        lesft_loss(bl, blab, rl, rlab, bh, cfg)


def test_bf16_logits():
    bl, blab, rl, rlab, bh = _random_batch(seed=2)
    cfg = LossConfig(tau=0.3)
    loss, _ = lesft_loss(bl.bfloat16(), blab, rl.bfloat16(), rlab, bh.bfloat16(), cfg)
    assert loss.dtype == torch.float32
    ref, _ = lesft_loss(bl.bfloat16().float(), blab, rl.bfloat16().float(), rlab, bh.bfloat16().float(), cfg)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_no_gradient_reaches_reference_path():
    bl, blab, rl, rlab, bh = _random_batch(seed=4)
    bl.requires_grad_(True)
    rl.requires_grad_(True)
    bh.requires_grad_(True)
    loss, _ = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(tau=0.3))
    loss.backward()
    assert rl.grad is None
    assert bh.grad is None  # clustering is on detached hidden states
    assert bl.grad is not None and bl.grad.abs().sum() > 0
    # only positions that predict a target token receive gradient
    predicts = torch.zeros(blab.shape, dtype=torch.bool)
    predicts[:, :-1] = blab[:, 1:] != IGNORE_INDEX
    assert torch.all(bl.grad[~predicts] == 0)
    assert torch.all(bl.grad[predicts].abs().sum(-1) > 0)


def test_sample_without_targets_is_skipped_and_empty_batch_is_zero():
    bl, blab, rl, rlab, bh = _random_batch(seed=6)
    blab2, rlab2 = blab.clone(), rlab.clone()
    blab2[1] = IGNORE_INDEX
    rlab2[1] = IGNORE_INDEX
    loss, _ = lesft_loss(bl, blab2, rl, rlab2, bh, LossConfig(tau=0.3))
    exp = _slow_lesft(bl, blab2, rl, rlab2, bh, tau=0.3)  # mean over samples 0 and 2 only
    assert loss.item() == pytest.approx(float(exp), rel=1e-5)
    bl.requires_grad_(True)
    empty = torch.full_like(blab, IGNORE_INDEX)
    loss, stats = lesft_loss(bl, empty, rl, torch.full_like(rlab, IGNORE_INDEX), bh, LossConfig())
    assert loss.item() == 0.0 and stats["n_target_tokens"] == 0.0 and stats["mean_weight"] == 0.0
    loss.backward()  # still part of the graph


def test_mismatched_target_counts_raise():
    bl, blab, rl, rlab, bh = _random_batch()
    rlab = rlab.clone()
    last = (rlab[0] != IGNORE_INDEX).nonzero().max()
    rlab[0, last] = IGNORE_INDEX
    with pytest.raises(ValueError, match="number of target tokens differs.*sample 0"):
        lesft_loss(bl, blab, rl, rlab, bh, LossConfig())


def test_mismatched_target_ids_raise():
    bl, blab, rl, rlab, bh = _random_batch()
    rlab = rlab.clone()
    pos = (rlab[1] != IGNORE_INDEX).nonzero().min()
    rlab[1, pos] = (rlab[1, pos] + 1) % bl.shape[-1]
    with pytest.raises(ValueError, match=r"token ids differ.*\[1\]"):
        lesft_loss(bl, blab, rl, rlab, bh, LossConfig())


def test_bad_hidden_shape_raises():
    bl, blab, rl, rlab, bh = _random_batch()
    with pytest.raises(ValueError, match="clustered hidden states must be"):
        lesft_loss(bl, blab, rl, rlab, bh[:, :-1], LossConfig())


# ----------------------------------------------------------------------------------------------
# LossConfig
# ----------------------------------------------------------------------------------------------


def test_config_defaults_and_help():
    cfg = LossConfig()
    assert cfg.gammas == (5.0, 0.3, 0.6) and cfg.p_sal == 0.95 and cfg.window == 0
    assert cfg.uniform_weight is None and cfg.nlft_lambda == 0.0 and cfg.cluster_on == "hidden"
    assert -1.0 <= cfg.tau <= 1.0
    assert LossConfig(weighting="uniform=0.25").uniform_weight == 0.25
    for f in dataclasses.fields(LossConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("p_sal", 0.0), ("p_sal", 1.0), ("p_sal", 1.5),
        ("gamma_salient", 0.0), ("gamma_subsalient", -1.0), ("gamma_irrelevant", 0.0),
        ("tau", 1.5), ("tau", -1.01),
        ("window", -1), ("window", 1.5),
        ("weighting", "foo"), ("weighting", "uniform=abc"), ("weighting", "uniform=-1"),
        ("cluster_on", "logits"),
        ("cluster_on", "base"),
        ("nlft_lambda", -0.1),
    ],
)
def test_config_validation_names_field(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        LossConfig(**{field_name: value})


def test_boost_is_the_salient_up_weighting_with_every_other_token_at_one():
    """The named variant ``boost`` gives the same loss and weights as ``uniform=1``, which differ from the
    paper's ``adaptive`` exactly on the non-salient tokens (weight 1 instead of (p~/0.95)^gamma < 1)."""
    bl, blab, rl, rlab, bh = _random_batch(seed=3)
    rl = rl.clone()
    rl[0, :, 0] += 40.0  # make some tokens salient (token 0 predicted with p~ ~ 1 on row 0)
    blab[0, blab[0] >= 0] = 0
    rlab[0, rlab[0] >= 0] = 0
    boost, s_boost = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(weighting="boost"))
    one, s_one = lesft_loss(bl, blab, rl, rlab, bh, LossConfig(weighting="uniform=1"))
    adaptive, s_ad = lesft_loss(bl, blab, rl, rlab, bh, LossConfig())
    assert LossConfig(weighting="Boost").uniform_weight == 1.0
    assert torch.equal(boost, one) and s_boost == s_one
    assert 0 < s_boost["frac_salient"] < 1 and s_boost["mean_weight_irrelevant"] == pytest.approx(1.0)
    assert s_ad["mean_weight_irrelevant"] < 1.0 and not torch.equal(boost, adaptive)
