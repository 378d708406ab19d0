"""The LESFT token-weighted loss (pure torch, no dependency on the rest of the package).

A training sample is a prompt ``x`` with target ``y = (y_1..y_n)``; the *reference* input
``x~`` is ``x`` plus the ground-truth solution. The model runs two paths, base ``[x ; y]`` and
reference ``[x~ ; y]``. For every target token ``y_t``:

* ``p~_t`` -- probability of ``y_t`` on the reference path (no gradient),
* ``p_t``  -- probability of ``y_t`` on the base path (trained).

Tokens are split into three classes and weighted (weights are detached)::

    salient      p~ > p_sal                          w = 1 + ((p~ - p_sal) / (1 - p_sal)) ** g1
    sub-salient  not salient, cos(h_i, h_j) >= tau   w = (p~ / p_sal) ** g2
                 for some salient j of the same sample
    irrelevant   everything else                     w = (p~ / p_sal) ** g3

    L_sample = -(1/|y|) * sum_t w_t * log p_t ;   L = mean over samples with >= 1 target token

Conventions (HF causal LM): ``labels`` ``[B, T]`` are aligned with input positions, with
``IGNORE_INDEX`` (-100) on prompt and padding; ``labels[b, t]`` is predicted by ``logits[b, t-1]``.
Base and reference paths have different prompt lengths (and possibly different padded lengths),
so the two paths are aligned by *target span*: the k-th target token of sample b on the base path
corresponds to the k-th target token of sample b on the reference path. See ``docs/loss.md``.
"""

from __future__ import annotations


from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lesft.config import LossConfig  # defined there: torch-free, for --help

__all__ = [
    "IGNORE_INDEX",
    "LossConfig",
    "token_weights",
    "subsalient_mask",
    "target_logprobs",
    "ce_loss",
    "lesft_loss",
]

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


def token_weights(
    ref_probs: Tensor,
    subsalient: Tensor,
    p_sal: float = 0.95,
    gammas: tuple[float, float, float] = (5.0, 0.3, 0.6),
) -> Tensor:
    """Adaptive LESFT weight of each token.

    Args:
        ref_probs: ``[...]`` reference-path probability ``p~`` of each target token (in [0, 1]).
        subsalient: ``[...]`` bool, same shape; tokens clustered around a salient token.
            Ignored where the token is salient (``p~ > p_sal`` overrides it).
        p_sal: saliency threshold.
        gammas: ``(g1, g2, g3)`` for salient / sub-salient / irrelevant tokens.

    Returns:
        ``[...]`` weights (dtype of ``ref_probs``, no grad)::

            salient (p~ > p_sal):  1 + ((p~ - p_sal) / (1 - p_sal)) ** g1      in (1, 2]
            sub-salient:           (p~ / p_sal) ** g2                          in [0, 1]
            irrelevant:            (p~ / p_sal) ** g3                          in [0, 1]
    """
    g1, g2, g3 = (float(g) for g in gammas)
    with torch.no_grad():
        p = ref_probs.detach()
        if not p.is_floating_point():
            p = p.float()
        sub = subsalient.to(device=p.device, dtype=torch.bool)
        salient = p > p_sal
        ratio = p / p_sal
        w_sal = 1.0 + ((p - p_sal) / (1.0 - p_sal)).clamp(min=0.0).pow(g1)
        w_sub = ratio.pow(g2)
        w_irr = ratio.pow(g3)
        return torch.where(salient, w_sal, torch.where(sub, w_sub, w_irr))


def subsalient_mask(
    hidden: Tensor,
    salient: Tensor,
    valid: Tensor,
    tau: float,
    window: int = 0,
) -> Tensor:
    """Mark the sub-salient tokens (per sample, by cosine similarity of hidden states).

    Args:
        hidden: ``[B, N, H]`` hidden state of each target-token slot (padded slots arbitrary).
        salient: ``[B, N]`` bool, salient tokens.
        valid: ``[B, N]`` bool, real (non-padding) slots.
        tau: cosine-similarity threshold.
        window: 0 = whole span; ``w > 0`` = only ``|i - j| <= w`` (slot index) may cluster.

    Returns:
        ``[B, N]`` bool: ``valid & ~salient & any_j(salient[b,j] & valid[b,j] &
        cos(h[b,i], h[b,j]) >= tau & (window == 0 or |i - j| <= window))``.
        Similarities are computed per sample with ``bmm``, so clusters never cross samples.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, N, H], got shape {tuple(hidden.shape)}")
    B, N, _ = hidden.shape
    if salient.shape != (B, N) or valid.shape != (B, N):
        raise ValueError(
            f"salient/valid must be [B, N] = {(B, N)}, got {tuple(salient.shape)} and {tuple(valid.shape)}"
        )
    with torch.no_grad():
        valid = valid.to(device=hidden.device, dtype=torch.bool)
        salient = salient.to(device=hidden.device, dtype=torch.bool)
        h = torch.nn.functional.normalize(hidden.detach().float(), dim=-1, eps=1e-12)
        cos = torch.bmm(h, h.transpose(1, 2))  # [B, N(i), N(j)]
        centre = (salient & valid)[:, None, :]  # [B, 1, N(j)]
        near = (cos >= tau) & centre
        if window > 0:
            idx = torch.arange(N, device=hidden.device)
            near = near & ((idx[:, None] - idx[None, :]).abs() <= window)[None]
        return near.any(dim=-1) & valid & ~salient


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted views: ``logits[:, :-1]`` ``[B, T-1, V]``, ``labels[:, 1:]`` ``[B, T-1]`` and the target mask."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    lab = labels[:, 1:]
    return logits[:, :-1], lab, lab != IGNORE_INDEX


def _rows_logprob(rows: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(rows)[targets]`` in float32. rows ``[M, V]``, targets ``[M]`` -> ``[M]``."""
    # log_softmax subtracts the row max before anything else, so log p stays accurate to ~1e-7
    # absolute even for large logits (logit_y - logsumexp would lose ~ulp(max logit) ~ 1e-6, which
    # the salient weight amplifies by up to gamma_1 / (1 - p_sal) = 100).
    return torch.log_softmax(rows.float(), dim=-1).gather(-1, targets.long()[:, None]).squeeze(-1)


def target_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each label token (HF shift convention).

    Args:
        logits: ``[B, T, V]`` (any float dtype; computed in float32).
        labels: ``[B, T]`` int, ``IGNORE_INDEX`` on prompt / padding.

    Returns:
        ``(logp, mask)``, both ``[B, T-1]``: ``logp[b, t] = log softmax(logits[b, t])[labels[b, t+1]]``
        (float32, 0 where masked), ``mask = labels[:, 1:] != IGNORE_INDEX``. Only the target rows
        are converted to float32 / normalised (no full ``[B, T, V]`` float32 copy).
    """
    sl, lab, mask = _shift(logits, labels)
    vals = _rows_logprob(sl[mask], lab[mask])
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    out = out.index_put((mask,), vals)
    return out, mask


def _sample_mean(values: Tensor, rows: Tensor, counts: Tensor) -> Tensor:
    """Per-sample mean of flat token values ``[M]`` (sample id ``rows``), then the mean over
    samples with >= 1 token. Returns a scalar (0, still in the graph, if there are no tokens)."""
    B = counts.shape[0]
    sums = torch.zeros(B, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    has = counts > 0
    if not bool(has.any()):
        return values.sum() * 0.0
    return (sums[has] / counts[has].to(values.dtype)).mean()


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Plain causal-LM cross-entropy: per-sample token mean, averaged over samples with >= 1
    target token (note: NOT the HF global token mean). logits ``[B, T, V]``, labels ``[B, T]``
    -> scalar float32."""
    sl, lab, mask = _shift(logits, labels)
    return ce_from_logprobs(_rows_logprob(sl[mask], lab[mask]), labels)


def ce_from_logprobs(logp: Tensor, labels: Tensor) -> Tensor:
    """:func:`ce_loss` from the target tokens' log-probabilities ``logp`` ``[M]`` (row-major over
    ``labels[:, 1:] != IGNORE_INDEX``, as :func:`chunked_target_logprobs` gives them)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    rows, _ = mask.nonzero(as_tuple=True)
    return _sample_mean(-logp, rows.to(logp.device), mask.sum(1).to(logp.device))


def chunked_target_logprobs(head: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor, chunk: int) -> Tensor:
    """Log-probability of every target token, ``[M]`` row-major, computing the LM head on at most ``chunk``
    target positions at a time: the ``[B, T, V]`` logits never exist, only ``[chunk, V]``. With a graph,
    each chunk is checkpointed (its logits are computed again in backward and dropped again), so memory
    stays at one chunk's logits in both passes.

    ``head``: final hidden states ``[n, H]`` -> logits ``[n, V]`` (the LM head, after the final norm);
    ``hidden``: ``[B, T, H]`` the head's input at every position; ``labels``: ``[B, T]`` (HF alignment)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    h = hidden[:, :-1][mask.to(hidden.device)]  # [M, H]: the positions that predict a target
    targets = labels[:, 1:][mask].to(hidden.device)
    if chunk <= 0:
        chunk = max(h.shape[0], 1)

    def piece(x: Tensor, t: Tensor) -> Tensor:
        return _rows_logprob(head(x), t)

    out = []
    for i in range(0, h.shape[0], chunk):
        x, t = h[i:i + chunk], targets[i:i + chunk]
        out.append(checkpoint(piece, x, t, use_reentrant=False) if torch.is_grad_enabled() and x.requires_grad
                   else piece(x, t))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------


def _pack(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Scatter flat per-token values ``[M, ...]`` (row-major order of ``mask`` ``[B, L]``) into
    slots ``[B, N, ...]`` (N = max tokens per row) plus the ``valid`` mask ``[B, N]``."""
    B = mask.shape[0]
    counts = mask.sum(1)
    N = int(counts.max()) if B > 0 and mask.numel() > 0 else 0
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    k_idx = (mask.long().cumsum(1) - 1)[b_idx, t_idx]  # rank of each token within its row
    packed = values.new_zeros((B, N) + tuple(values.shape[1:]))
    packed[b_idx, k_idx] = values
    valid = torch.arange(N, device=mask.device)[None, :] < counts[:, None]
    return packed, valid


def lesft_loss(
    base_logits: Tensor,
    base_labels: Tensor,
    ref_logits: Tensor,
    ref_labels: Tensor,
    base_hidden: Tensor | None,
    cfg: LossConfig,
    ref_hidden: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """LESFT token-weighted loss.

    Args:
        base_logits: ``[B, T_base, V]`` logits of the base path ``[x ; y]`` (trained).
        base_labels: ``[B, T_base]`` labels, ``IGNORE_INDEX`` on prompt and padding.
        ref_logits: ``[B, T_ref, V]`` logits of the reference path ``[x~ ; y]``. No gradient flows
            into them (used under ``no_grad`` only); computing them under ``torch.no_grad()`` saves memory.
        ref_labels: ``[B, T_ref]`` labels of the reference path.
        base_hidden: ``[B, T_base, H]`` hidden states of the base path at the input positions
            (the tensor fed to the LM head); ``base_hidden[b, t-1]`` is clustered for target token
            ``base_labels[b, t]``. Detached. If ``None``, no token is sub-salient: every non-salient
            token is irrelevant (exponent gamma_irrelevant).
        cfg: :class:`LossConfig`.
        ref_hidden: ``[B, T_ref, H]`` hidden states of the reference path, clustered instead of ``base_hidden``
            when ``cfg.cluster_on == "reference"`` (``ref_hidden[b, t-1]`` for target ``ref_labels[b, t]``).

    The k-th target token of sample b on the base path is matched with the k-th target token of
    sample b on the reference path; counts and token ids must agree (``ValueError`` otherwise).

    Returns:
        ``(loss, stats)``: scalar float32 loss (``L_weighted``, or ``nlft_lambda * (CE + L_weighted)``
        if ``nlft_lambda > 0``) and float stats: ``frac_salient``, ``frac_subsalient``,
        ``frac_irrelevant`` (fractions of all target tokens of the batch), ``mean_weight_salient``,
        ``mean_weight_subsalient``, ``mean_weight_irrelevant`` (0.0 for an empty class),
        ``mean_weight``, ``ce``, ``loss_weighted``, ``n_target_tokens``.
    """
    sl_b, lab_b, m_b = _shift(base_logits, base_labels)
    sl_r, lab_r, m_r = _shift(ref_logits, ref_labels)
    tgt_b, tgt_r = _aligned_targets(lab_b, m_b, lab_r, m_r)
    nll = -_rows_logprob(sl_b[m_b], tgt_b)  # [M] float32
    with torch.no_grad():
        ref_logp = _rows_logprob(sl_r.detach()[m_r], tgt_r)
    return _weighted(nll, ref_logp, m_b, _clustered(base_hidden, base_labels, ref_hidden, ref_labels, cfg), cfg)


def lesft_from_logprobs(logp: Tensor, ref_logp: Tensor, base_labels: Tensor, ref_labels: Tensor,
                        base_hidden: Tensor | None, cfg: LossConfig,
                        ref_hidden: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """:func:`lesft_loss` from the target tokens' log-probabilities on the base path ``logp`` ``[M]`` (with
    graph) and on the reference path ``ref_logp`` ``[M]`` (row-major target order, as
    :func:`chunked_target_logprobs` gives them); the same checks, weights and statistics."""
    lab_b, lab_r = base_labels[:, 1:], ref_labels[:, 1:]
    m_b, m_r = lab_b != IGNORE_INDEX, lab_r != IGNORE_INDEX
    _aligned_targets(lab_b, m_b, lab_r, m_r)
    with torch.no_grad():
        ref_logp = ref_logp.detach()
    return _weighted(-logp, ref_logp, m_b, _clustered(base_hidden, base_labels, ref_hidden, ref_labels, cfg), cfg)


def _clustered(base_hidden: Tensor | None, base_labels: Tensor, ref_hidden: Tensor | None, ref_labels: Tensor,
               cfg: LossConfig) -> Tensor | None:
    """The hidden states ``cfg.cluster_on`` names at the position that predicts each target token: ``[M, H]``
    float32 in row-major target order (the same order on both paths, :func:`_aligned_targets` checked), or None
    (no sub-salient token)."""
    hidden, labels = (ref_hidden, ref_labels) if cfg.cluster_on == "reference" else (base_hidden, base_labels)
    if hidden is None:
        if cfg.cluster_on == "reference" and base_hidden is not None:
            raise ValueError("--lesft.cluster_on reference needs the reference path's hidden states (ref_hidden); "
                             "pass them, or use --lesft.cluster_on hidden")
        return None
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"the clustered hidden states must be [B, T, H] = {tuple(labels.shape)} + [H], "
                         f"got {tuple(hidden.shape)}")
    targets = labels[:, 1:] != IGNORE_INDEX
    return hidden.detach()[:, :-1][targets.to(hidden.device)].float()


def _aligned_targets(lab_b: Tensor, m_b: Tensor, lab_r: Tensor, m_r: Tensor) -> tuple[Tensor, Tensor]:
    """The target ids of both paths ``[M]`` (row-major), after checking that they line up sample by sample."""
    if m_b.shape[0] != m_r.shape[0]:
        raise ValueError(f"batch size differs between base ({m_b.shape[0]}) and reference ({m_r.shape[0]}) paths")

    # --- alignment by target span -----------------------------------------------------------
    cnt_b, cnt_r = m_b.sum(1), m_r.sum(1)
    if not torch.equal(cnt_b.cpu(), cnt_r.cpu()):
        bad = (cnt_b != cnt_r).nonzero().flatten().tolist()
        detail = ", ".join(f"sample {i}: base {int(cnt_b[i])} vs reference {int(cnt_r[i])}" for i in bad[:5])
        raise ValueError(f"number of target tokens differs between base and reference paths ({detail})")
    tgt_b = lab_b[m_b]  # [M] row-major => k-th target of sample b on both paths line up
    tgt_r = lab_r[m_r].to(tgt_b.device)
    if not torch.equal(tgt_b, tgt_r):
        rows_all, _ = m_b.nonzero(as_tuple=True)
        bad = torch.unique(rows_all[tgt_b != tgt_r]).tolist()
        raise ValueError(f"target token ids differ between base and reference paths for sample(s) {bad[:10]}")
    return tgt_b, tgt_r


def _weighted(nll: Tensor, ref_logp: Tensor, m_b: Tensor, h: Tensor | None,
              cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """The LESFT loss and statistics from the base path's per-token NLL ``[M]`` (with graph), the reference
    path's log-probabilities ``[M]`` (no graph) and the clustered hidden states ``[M, H]`` (or None: no
    sub-salient token); ``m_b`` ``[B, T-1]`` marks the base path's target positions."""
    cnt_b = m_b.sum(1)
    rows, _ = m_b.nonzero(as_tuple=True)  # sample id of each flat target token
    M = nll.numel()

    # --- reference path + weights (no graph) -------------------------------------------------
    with torch.no_grad():
        ref_p = ref_logp.exp().to(nll.device)  # [M]
        salient = ref_p > cfg.p_sal
        if h is not None and M > 0:
            h_packed, valid = _pack(h.to(nll.device), m_b.to(nll.device))
            sal_packed, _ = _pack(salient, m_b.to(nll.device))
            sub_packed = subsalient_mask(h_packed, sal_packed, valid, cfg.tau, cfg.window)
            subsalient = sub_packed[valid]  # back to flat row-major order
        else:
            subsalient = torch.zeros_like(salient)
        w = token_weights(ref_p, subsalient, cfg.p_sal, cfg.gammas)
        c = cfg.uniform_weight
        if c is not None:
            w = torch.where(salient, w, torch.full_like(w, c))
        subsalient = subsalient & ~salient
        irrelevant = ~salient & ~subsalient

    counts = cnt_b.to(nll.device)
    weighted = _sample_mean(w * nll, rows.to(nll.device), counts)
    ce = _sample_mean(nll, rows.to(nll.device), counts)
    loss = cfg.nlft_lambda * (ce + weighted) if cfg.nlft_lambda > 0 else weighted

    # --- stats (one host sync) ---------------------------------------------------------------
    with torch.no_grad():
        wf = w.float()
        n_all = max(M, 1)
        vals = []
        for cls in (salient, subsalient, irrelevant):
            n = cls.sum()
            vals += [n.float() / n_all, (wf * cls).sum() / n.clamp(min=1).float()]
        vals += [wf.sum() / n_all, ce.detach().float(), weighted.detach().float()]
        vals = torch.stack([v.reshape(()) for v in vals]).tolist()
    stats = {
        "frac_salient": vals[0],
        "mean_weight_salient": vals[1],
        "frac_subsalient": vals[2],
        "mean_weight_subsalient": vals[3],
        "frac_irrelevant": vals[4],
        "mean_weight_irrelevant": vals[5],
        "mean_weight": vals[6],
        "ce": vals[7],
        "loss_weighted": vals[8],
        "n_target_tokens": float(M),
    }
    return loss, stats
