"""Tokenised dual-path samples and their collation into padded micro-batches.

A sample holds the base sequence [x ; y] and, for ``paths=dual``, the reference sequence [x~ ; y].
The target y is tokenised once and shared by both paths, so the two target spans hold the same ids.
Labels follow the Hugging Face convention: aligned with the inputs, -100 on prompt and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lesft.data.prompts import reference_text, render_prompt, render_target

IGNORE_INDEX = -100


@dataclass
class Sample:
    base_ids: list[int]
    base_labels: list[int]
    ref_ids: list[int] | None = None
    ref_labels: list[int] | None = None


@dataclass
class Batch:
    """A padded micro-batch: ``ids``/``mask``/``labels`` [B, T] per path (``ref_*`` None without a reference)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    ref_ids: torch.Tensor | None = None
    ref_mask: torch.Tensor | None = None
    ref_labels: torch.Tensor | None = None


def build_sample(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, str], paths: str, max_length: int, chat_template: bool
) -> Sample:
    """Tokenise one row. ``paths``: 'base' (x), 'dual' (x and x~) or 'reference' (train on x~).

    Too long: the target keeps at most ``max_length - min(len(longest prompt), max_length // 2)`` tokens
    (cut from the right, the same in both paths), then prompts are cut from the left to fit.
    """
    target = tokenizer(render_target(tokenizer, row["target"]), add_special_tokens=False)["input_ids"]
    base_prompt = tokenizer(render_prompt(tokenizer, row["prompt"], chat_template))["input_ids"]
    ref_prompt = None
    if paths in ("dual", "reference"):
        ref_prompt = tokenizer(render_prompt(tokenizer, reference_text(row["prompt"], row["reference"]),
                                             chat_template))["input_ids"]
    longest = max(len(base_prompt), len(ref_prompt or []))
    target = target[: max_length - min(longest, max_length // 2)]

    def seq(prompt: list[int]) -> tuple[list[int], list[int]]:
        prompt = prompt[len(prompt) - (max_length - len(target)):] if len(prompt) + len(target) > max_length else prompt
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target

    if paths == "reference":
        return Sample(*seq(ref_prompt))
    base = seq(base_prompt)
    ref = seq(ref_prompt) if ref_prompt is not None else (None, None)
    return Sample(base[0], base[1], ref[0], ref[1])


def _pad(seqs: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(samples: list[Sample], pad_id: int, pad_to_multiple: int = 1) -> Batch:
    """Right-pad each path to a multiple of ``pad_to_multiple`` tokens."""

    def path(ids: list[list[int]], labels: list[list[int]]):
        t = _round_up(max(len(s) for s in ids), pad_to_multiple)
        mask = _pad([[1] * len(s) for s in ids], 0, t)
        return _pad(ids, pad_id, t), mask, _pad(labels, IGNORE_INDEX, t)

    ids, mask, labels = path([s.base_ids for s in samples], [s.base_labels for s in samples])
    if samples[0].ref_ids is None:
        return Batch(ids, mask, labels)
    r_ids, r_mask, r_labels = path([s.ref_ids for s in samples], [s.ref_labels for s in samples])
    return Batch(ids, mask, labels, r_ids, r_mask, r_labels)
