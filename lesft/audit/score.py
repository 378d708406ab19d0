"""Scores of an attack against the client's truth: token accuracy and ROUGE-L per kind of token.

Kinds, per path: ``prompt`` (every prompt token, the chat template included), ``private`` (the prompt
without the prefix and suffix that all audited rows share: the system prompt, role markers and a fixed
instruction line, which the attacker knows anyway) and ``target`` (the label tokens, i.e. the text
trained on). ROUGE-L is the F1 of the longest common subsequence of token ids, per row, then averaged.
"""

from __future__ import annotations

import torch

from lesft.audit.view import Truth

KINDS = ("prompt", "private", "target")


def lcs(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(guess: list[int], truth: list[int]) -> float:
    """ROUGE-L F1 of two token sequences (1.0 for two empty ones)."""
    if not guess and not truth:
        return 1.0
    n = lcs(guess, truth)
    return 0.0 if n == 0 else 2 * n / (len(guess) + len(truth))


def _shared_ends(prompts: list[list[int]]) -> tuple[int, int]:
    """Lengths of the longest prefix and suffix common to all ``prompts`` (not overlapping the shortest)."""
    shortest = min(len(p) for p in prompts)
    pre = next((i for i in range(shortest) if len({p[i] for p in prompts}) > 1), shortest)
    suf = next((i for i in range(shortest - pre) if len({p[-1 - i] for p in prompts}) > 1), shortest - pre)
    return pre, suf


def kind_masks(truths: list[Truth]) -> list[dict[str, torch.Tensor]]:
    """Per row, a bool [n] mask for each of :data:`KINDS`."""
    prompts = [t.ids[~t.target].tolist() for t in truths]
    pre, suf = _shared_ends(prompts) if len(truths) > 1 else (0, 0)
    out = []
    for t in truths:
        prompt = ~t.target
        n_prompt = int(prompt.sum())
        private = prompt.clone()
        idx = prompt.nonzero().flatten()
        private[idx[:pre]] = False
        private[idx[n_prompt - suf:]] = False
        out.append({"prompt": prompt, "private": private, "target": t.target})
    return out


def score(guesses: list[torch.Tensor | None], truths: list[Truth], paths: list[str]) -> dict[str, dict[str, float]]:
    """{``path:kind``: {tokens, correct, accuracy, rouge_l, rows}} over rows; a None guess (nothing received
    to attack) scores as no token recovered. ``paths``: the path of each row (base or reference)."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(set(paths)):
        rows = [i for i, p in enumerate(paths) if p == path]
        masks = kind_masks([truths[i] for i in rows])
        for kind in KINDS:
            tokens = correct = 0
            rouge = []
            for i, m in zip(rows, masks):
                truth = truths[i].ids[m[kind]]
                guess = guesses[i][m[kind]] if guesses[i] is not None else torch.full_like(truth, -1)
                tokens += len(truth)
                correct += int((guess == truth).sum())
                rouge.append(rouge_l([g for g in guess.tolist() if g >= 0], truth.tolist()))
            out[f"{path}:{kind}"] = {"tokens": tokens, "correct": correct, "accuracy": correct / max(tokens, 1),
                                     "rouge_l": sum(rouge) / max(len(rouge), 1), "rows": len(rows)}
    return out
