"""The attacks a curious split server can run on what it receives, and the attacker's own knowledge.

The attacker (the server) knows the public base weights of the client's layers (it partitioned the
model), the public tokenizer and prompt format, and public text. It does not know the client's LoRA,
noise or data. Every attack maps the received rows to one guessed token id per real position
(``-1`` = no guess); none of them is given the client's truth.

- :func:`label_attack` -- (a) the target ids, where the message carries them.
- :class:`NearestState` -- (b) weight-knowledge inversion: nearest neighbour of each received state
  among the states the attacker computes itself, with the base weights, for public tokens in context.
- :class:`LinearInverter` -- (c) a learned inverter: a ridge-regression map from cut states to input
  embeddings, fitted on public text, then the nearest embedding over the whole vocabulary.
- :class:`GradientLabels` -- (a) in label-private mode: the target ids from the gradient the client
  returns for the last-layer states, with the public final norm and LM head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lesft.audit.view import Received
from lesft.data.benchmarks import load_benchmark
from lesft.data.samples import build_sample
from lesft.model.split import ClientPart, HeadPart, _run_layers
from transformers import PreTrainedTokenizerBase

CHUNK = 128  # tokens per window of plain public text


def public_sequences(spec: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int, max_length: int = 320,
                     chat_template: bool = True) -> list[list[int]]:
    """Token ids of the attacker's public text, at most ``max_tokens`` in all. ``spec``: ``synthetic:SEED``
    (prompt + target of generated problems of that seed, in the project's prompt format), ``docs`` (this
    checkout's README.md and docs/*.md) or a path to a text file or folder of ``*.md``/``*.txt`` files
    (read in place), cut into windows of :data:`CHUNK` tokens."""
    if spec.startswith("synthetic:"):
        rows = load_benchmark("synthetic", "train", n=max(1, max_tokens // 64), seed=int(spec.split(":", 1)[1]))
        seqs = [build_sample(tokenizer, r, "base", max_length, chat_template).base_ids for r in rows]
    else:
        root = Path(__file__).resolve().parents[2] if spec == "docs" else Path(spec)
        if spec == "docs":
            files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
        else:
            files = sorted(p for p in root.rglob("*") if p.suffix in (".md", ".txt")) if root.is_dir() else [root]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"public text {spec!r}: no such file(s)")
        ids = tokenizer("\n\n".join(f.read_text() for f in files), add_special_tokens=False)["input_ids"]
        seqs = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]
    out, total = [], 0
    for s in seqs:
        if total >= max_tokens:
            break
        out.append(s[: max_tokens - total])
        total += len(out[-1])
    return out


@torch.no_grad()
def base_states(bottom: ClientPart, sequences: list[list[int]], ks: list[int], batch: int = 8
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The attacker's own cut states of ``sequences`` after each of ``ks`` layers, with the base weights
    of ``bottom`` (no client LoRA): {k: (states [N, H], token ids [N])} over all N real tokens. One pass
    to max(ks), the layers applied exactly as :class:`ClientPart` applies them."""
    ks = sorted(set(ks))
    if ks[-1] > len(bottom.layers):
        raise ValueError(f"need {ks[-1]} layers, the attacker's part has {len(bottom.layers)}")
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    ids_out = []
    for i in range(0, len(sequences), batch):
        chunk = sequences[i:i + batch]
        t = max(len(s) for s in chunk)
        ids = torch.tensor([s + [0] * (t - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in chunk])
        pos = torch.arange(t).expand_as(ids)
        h, done = bottom.embed_tokens(ids), 0
        for k in ks:
            h = _run_layers(bottom.layers[done:k], done, bottom.layer_types, bottom.rotary_emb, bottom.config,
                            h, mask, pos)
            done = k
            parts[k].append(h[mask.bool()].float())
        ids_out.append(ids[mask.bool()])
    ids_all = torch.cat(ids_out)
    return {k: (torch.cat(v), ids_all) for k, v in parts.items()}


def label_attack(views: list[Received]) -> list[torch.Tensor | None]:
    """(a) The target ids in clear: per row [n] with the label where one was sent, -1 elsewhere; None for a
    row that carried no label tensor (label-private mode)."""
    out = []
    for v in views:
        if v.labels is None:
            out.append(None)
            continue
        lab = v.labels[v.mask.bool()]
        out.append(torch.where(lab >= 0, lab, torch.full_like(lab, -1)))
    return out


class _Standardised:
    """Per-dimension mean/std of the attacker's public states (cut states have a few huge dimensions)."""

    def __init__(self, states: torch.Tensor) -> None:
        self.mu = states.mean(0)
        self.sd = states.std(0).clamp_min(1e-6)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mu) / self.sd


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _nearest(queries: torch.Tensor, unit_keys: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Row index of the largest cosine similarity in ``unit_keys`` [N, H] (unit rows) for each query [M, H]."""
    out = [_unit(q).matmul(unit_keys.T).argmax(-1) for q in queries.split(chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _apply(views: list[Received], fn) -> list[torch.Tensor]:
    """``fn`` on the real positions of all rows at once, split back per row."""
    states = [v.hidden[v.mask.bool()] for v in views]
    if not states:
        return []
    guesses = fn(torch.cat(states))
    return list(guesses.split([len(s) for s in states]))


class NearestState:
    """(b) Weight-knowledge inversion: each received state -> the token of the nearest (cosine, after
    standardisation) of the attacker's own base-weight states of public tokens in their context."""

    def __init__(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        self.norm = _Standardised(states)
        self.keys, self.ids = _unit(self.norm(states)), ids

    def __call__(self, views: list[Received]) -> list[torch.Tensor]:
        return _apply(views, lambda h: self.ids[_nearest(self.norm(h), self.keys)])


class LinearInverter:
    """(c) Learned inverter: ridge regression W from standardised cut states (+ bias) to the input
    embedding of their token, fitted on public states; a received state -> the vocabulary token whose
    embedding is nearest (cosine) to its image. ``embedding``: [V, H], the public base embedding."""

    def __init__(self, states: torch.Tensor, ids: torch.Tensor, embedding: torch.Tensor, ridge: float = 1.0) -> None:
        self.norm = _Standardised(states)
        x = self._design(states)
        y = embedding[ids].double()
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
        self.w = torch.linalg.solve(gram, x.T @ y).float()
        self.embedding = _unit(embedding)

    def _design(self, h: torch.Tensor) -> torch.Tensor:
        z = self.norm(h).double()
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)

    def __call__(self, views: list[Received]) -> list[torch.Tensor]:
        return _apply(views, lambda h: _nearest(self._design(h).float() @ self.w, self.embedding))


class GradientLabels:
    """(a) Label-private mode: the client returns g_t = dL/dx_t for the last-layer states x_t [T, H] that
    the server computed. With cross-entropy (LESFT: a detached per-token weight) on the public norm and
    head, g_t = s_t * J_t^T W^T (p_t - e_y) for the next target token y and an unknown s_t > 0, where
    p_t = softmax(head(x_t)) and J_t = d norm / dx at x_t: both computable by the server. So
    a_t - g_t / s_t = J_t^T w_y with a_t = J_t^T W^T p_t, and the guess is the token y whose J_t^T w_y lies
    nearest to the line {a_t - c g_t : c}. For RMSNorm (gamma, eps) J^T w = G/r - x (x.G) / (H r^3), with
    G = gamma * w and r = sqrt(mean(x^2) + eps), so every distance needs three [V, H] products per position.
    Positions with a zero gradient are not targets: they get no guess (-1)."""

    def __init__(self, head: HeadPart) -> None:
        norm = head.norm
        if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
            raise ValueError(f"the gradient attack is written for RMSNorm, not {type(norm).__name__}")
        self.head, self.eps = head, float(norm.variance_epsilon)
        self.g = (head.lm_head.weight.detach() * norm.weight.detach()).double()  # [V, H]
        self.g2 = self.g.pow(2).sum(1)                                            # [V]

    def _row(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """x, grad [n, H] -> guessed next-token ids [n] (-1 where the gradient is zero)."""
        guess = torch.full((len(x),), -1, dtype=torch.long)
        live = grad.abs().sum(-1) > 0
        if not live.any():
            return guess
        x = x[live].detach().requires_grad_(True)
        logits, _ = self.head(x)
        (a,) = torch.autograd.grad(logits, x, logits.softmax(-1).detach())
        x, a, g = x.detach().double(), a.double(), grad[live].double()
        h = x.shape[-1]
        r = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()                    # [m, 1]
        gx, ga, gg = x @ self.g.T, a @ self.g.T, g @ self.g.T                      # [m, V]
        dot = lambda u, v: (u * v).sum(-1, keepdim=True)                          # noqa: E731
        aq = ga / r - dot(a, x) * gx / (h * r ** 3)
        qq = self.g2 / r ** 2 - 2 * gx ** 2 / (h * r ** 4) + gx ** 2 * dot(x, x) / (h ** 2 * r ** 6)
        vv = dot(a, a) - 2 * aq + qq
        vg = dot(a, g) - (gg / r - dot(g, x) * gx / (h * r ** 3))
        guess[live] = (vv - vg ** 2 / dot(g, g)).argmin(-1)
        return guess

    def __call__(self, views: list[Received]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for v in views:
            if v.grad is None or v.top is None:
                out.append(None)
                continue
            m = v.mask.bool()
            nxt = self._row(v.top[m], v.grad[m])  # the gradient at t is about the token at t + 1
            out.append(torch.cat([torch.tensor([-1]), nxt[:-1]]))
        return out
