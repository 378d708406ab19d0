"""Decoding: batched greedy generation with a KV cache, left padding, prompts of similar length batched
together, cut at EOS or the first stop string. The primitive that evaluation (:mod:`lesft.evaluate`), teacher
targets (:mod:`lesft.distill`), ``lesft generate`` and the benches use; it takes any model with HF's
``generate`` (the merged model, or :class:`lesft.generation.SplitGenerator` for split generation)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from lesft.config import DEFAULT_STOP  # torch-free

__all__ = ["DEFAULT_STOP", "StopOnStrings", "eos_ids", "generate", "split_stops"]

def _bar(total: int, enabled: bool, unit: str = "question"):
    """A progress bar over ``total`` items (a no-op one when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, desc="eval", leave=False)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [tokenizer.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(int(e))
    return ids


def split_stops(tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> tuple[list[str], list[int]]:
    """(text stop strings, token ids of stop strings that are single added/special tokens)."""
    added = tokenizer.get_added_vocab()
    texts, ids = [], []
    for s in stop:
        if s in added:
            ids.append(int(added[s]))
        else:
            texts.append(s)
    return texts, ids


class StopOnStrings(StoppingCriteria):
    """Per-sequence stop once any of ``stops`` occurs in the decoded *new* tokens.

    Only the last ``window`` new tokens are decoded each step (a stop string first appears at the end,
    and each token decodes to at least one character), so the cost stays flat along the sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_len = prompt_len
        self.window = max(len(s) for s in stops) + 8

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:][:, -self.window:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop: list[str] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """Completions of ``prompts`` (greedy when ``temperature`` is 0, else sampled) (full model inputs, e.g. from :func:`render_prompt`), in order.
    ``model`` is an HF causal LM or a :class:`lesft.generation.SplitGenerator` (the same ``generate`` call).

    Prompts are sorted by token length (longest first) and batched, left-padded with an attention mask
    (``tokenizer.padding_side`` is set to ``"left"`` for the call and restored), and generated with the
    KV cache. A sequence stops at EOS (the tokenizer's and the model's generation-config ones), at a
    stop string that is a single special token, or once a text stop string shows up in its new text.
    Only the new tokens are decoded (special tokens skipped) and the text from the first stop string on
    is dropped. Same outputs as one prompt at a time (up to float rounding).
    """
    if not prompts:
        return []
    stop = [s for s in (stop or []) if s]
    text_stops, stop_ids = split_stops(tokenizer, stop)
    eos = eos_ids(model, tokenizer)
    eos += [i for i in stop_ids if i not in eos]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = _device(model)

    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    results: list[str | None] = [None] * len(prompts)

    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # padding needs one; the pad positions are masked out anyway
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    bar = _bar(len(prompts), progress)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            input_ids = enc["input_ids"].to(device)
            attention_mask = enc["attention_mask"].to(device)
            prompt_len = input_ids.shape[1]
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, text_stops, prompt_len)] if text_stops else [])
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                top_k=None,
                num_beams=1,
                use_cache=True,
                eos_token_id=eos or None,
                pad_token_id=pad_id,
                stopping_criteria=criteria,
            )
            for row, i in enumerate(idx):
                new = out[row, prompt_len:].tolist()
                for k, t in enumerate(new):  # finished sequences are padded on: cut at the first EOS
                    if t in eos:
                        new = new[:k]
                        break
                text = tokenizer.decode(new, skip_special_tokens=True)
                results[i] = _cut(text, text_stops)
            bar.update(len(idx))
    finally:
        bar.close()
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
    return results  # type: ignore[return-value]
