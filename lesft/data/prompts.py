"""Prompt templates, in one place: how a row's text becomes the base input x, the reference input
x~ and the target y.

The reference input carries the ground-truth *solution* (the paper's x~ = prompt + original solution
steps), not just the final answer: with an answer-only reference almost every rationale token gets a
low reference probability and a small weight, and the tuned model collapses to the answer line.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lesft.data.registry import answer_kind

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


# --------------------------------------------------------------------------------------------
# Benchmark questions and the canonical answer sentence
# --------------------------------------------------------------------------------------------

#: The one instruction line closing every numeric prompt (GSM8K, synthetic arithmetic).
INSTRUCTION_NUMERIC = (
    'Reason step by step, then end with the sentence "The answer is N." where N is the final number.'
)
#: The one instruction line closing every multiple-choice prompt (CommonsenseQA, AQuA-RAT).
INSTRUCTION_CHOICE = (
    'Reason step by step, then end with the sentence "The answer is (X)." where X is the letter of the '
    "correct option."
)
#: Instruction line of each answer kind (a benchmark's kind is in :mod:`lesft.data.registry`).
INSTRUCTIONS: dict[str, str] = {"numeric": INSTRUCTION_NUMERIC, "choice": INSTRUCTION_CHOICE}


def _answer_kind(dataset: str) -> str:
    return answer_kind(dataset)


def format_question(dataset: str, question: str, options: list[tuple[str, str]] | None = None) -> str:
    """The user text x: the question, then one ``(A) text`` line per option (multiple choice only),
    then the dataset's instruction line. Lines are joined with a single newline."""
    kind = _answer_kind(dataset)
    if kind == "choice" and not options:
        raise ValueError(f"{dataset} is multiple choice: options are required")
    if kind == "numeric" and options:
        raise ValueError(f"{dataset} has numeric answers: options must be None")
    lines = [question.strip()]
    lines += [f"({label}) {text.strip()}" for label, text in options or ()]
    lines.append(INSTRUCTIONS[kind])
    return "\n".join(lines)


def answer_sentence(dataset: str, answer: str) -> str:
    """The canonical closing sentence of a target: ``The answer is 18.`` or ``The answer is (C).``"""
    answer = str(answer).strip()
    if _answer_kind(dataset) == "choice":
        return f"The answer is ({answer})."
    return f"The answer is {answer}."
