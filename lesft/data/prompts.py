"""Prompt templates, in one place: how a row's text becomes the base input x, the reference input
x~ and the target y.

The reference input carries the ground-truth *solution* (the paper's x~ = prompt + original solution
steps), not just the final answer: with an answer-only reference almost every rationale token gets a
low reference probability and a small weight, and the tuned model collapses to the answer line.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REFERENCE_TEMPLATE = "{prompt}\n\nA worked solution, for reference:\n{reference}"


def reference_text(prompt: str, reference: str) -> str:
    """The user text of the reference input x~."""
    return REFERENCE_TEMPLATE.format(prompt=prompt, reference=reference)


def render_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool) -> str:
    """The full model input that precedes the target: a chat user turn + assistant header, or plain text."""
    if chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text + "\n"


def render_target(tokenizer: PreTrainedTokenizerBase, target: str) -> str:
    """The target y as trained on: the text followed by the end-of-sequence token."""
    return target + (tokenizer.eos_token or "")
