"""The split is exact: client part + server part == the unsplit model (logits and LoRA gradients),
and the exported adapter reproduces the split model inside a plain PeftModel."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from conftest import make_model
from lesft.lora import LoraArgs, add_lora, export_adapter, full_model_keys, join_adapters, load_lora_state, lora_state
from lesft.model.split import UnsupportedModelError, inspect_decoder, resolve_client_layers, split_model

LORA = LoraArgs(r=4, alpha=8, dropout=0.0)


def _batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the batch
    mask[2, 4:] = 0
    return ids, mask


def _randomize_lora(module: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_equals_unsplit_logits_and_lora_grads(arch: str, k: int) -> None:
    base = make_model(arch, layers=4)
    full = get_peft_model(copy.deepcopy(base), LORA.peft_config())
    _randomize_lora(full)
    bottom, top, layout = split_model(copy.deepcopy(base), k)
    add_lora(bottom, LORA)
    add_lora(top, LORA)
    # copy the full model's adapter into the parts
    full_state = {n.replace(".default.", "."): p.detach() for n, p in full.named_parameters() if "lora_" in n}
    for part, first in ((bottom, 0), (top, k)):
        names = full_model_keys(lora_state(part), first, layout.layers_path)
        load_lora_state(part, {local: full_state[names_key]
                               for local, names_key in zip(lora_state(part), names)})

    ids, mask = _batch(base.config.vocab_size)
    w = torch.randn(3, 11, base.config.vocab_size, generator=torch.Generator().manual_seed(5))
    valid = mask.bool()

    ref = full(input_ids=ids, attention_mask=mask).logits
    (ref * w)[valid].sum().backward()
    h, pos = bottom(ids, mask)
    logits, _ = top(h, mask, pos)
    (logits * w)[valid].sum().backward()

    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-5, rtol=1e-5)
    full_grads = {n.replace(".default.", "."): p.grad for n, p in full.named_parameters() if "lora_" in n}
    checked = 0
    for part, first in ((bottom, 0), (top, k)):
        grads = {n.replace(".default.", "."): p.grad for n, p in part.named_parameters() if "lora_" in n}
        for key, g in full_model_keys(grads, first, layout.layers_path).items():
            torch.testing.assert_close(g, full_grads[key], atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked == len(full_grads) == 4 * 3 * 2  # layers x modules x (A, B)


def test_tied_head_is_a_frozen_copy_on_the_server() -> None:
    model = make_model("llama", tie=True)
    bottom, top, _ = split_model(model, 1)
    assert top.head.lm_head.weight.data_ptr() != bottom.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(top.head.lm_head.weight, bottom.embed_tokens.weight, rtol=0, atol=0)
    assert not top.head.lm_head.weight.requires_grad
    # the client part has no head, the server part no embedding
    assert not any("embed" in n for n, _ in top.named_parameters())
    assert not any("lm_head" in n or n.startswith("norm") for n, _ in bottom.named_parameters())


def _adapted_split():
    """A 4-layer qwen2, and its split at k = 1 with random LoRA on both parts: (base, bottom, top, layout)."""
    base = make_model("qwen2", layers=4, tie=False)
    bottom, top, layout = split_model(copy.deepcopy(base), 1)
    add_lora(bottom, LORA)
    add_lora(top, LORA)
    _randomize_lora(bottom, 7)
    _randomize_lora(top, 8)
    return base, bottom, top, layout


def test_exported_adapter_reproduces_split_model(tmp_path) -> None:
    base, bottom, top, layout = _adapted_split()
    out = export_adapter([(lora_state(bottom), 0), (lora_state(top), 1)], layout.layers_path, LORA,
                         tmp_path / "adapter", "tiny")
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids, mask = _batch(base.config.vocab_size)
    with torch.no_grad():
        expect = top(*[*bottom(ids, mask)][:1], mask, bottom(ids, mask)[1])[0]
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expect[valid], atol=1e-5, rtol=1e-5)
    # and the adapter is not a no-op
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (plain[valid] - got[valid]).abs().max() > 1e-3


def test_server_only_adapter_wraps_only_its_layers_and_joins_back(tmp_path) -> None:
    """splitfrozen exports the server's LoRA alone: the adapter names only the server's layers, so peft
    loads it without "missing adapter keys" and adds nothing to the client's layers; joining a client
    part and a server part gives the same config and logits as one export of both."""
    base, bottom, top, layout = _adapted_split()
    server = export_adapter([(lora_state(top), 1)], layout.layers_path, LORA, tmp_path / "server", "tiny")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")  # the old export warned so
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(server)).eval()
    wrapped = {int(n.split("layers.")[1].split(".")[0]) for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert wrapped == {1, 2, 3}
    ids, mask = _batch(base.config.vocab_size)
    plain_bottom, _, _ = split_model(copy.deepcopy(base), 1)
    with torch.no_grad():
        h = plain_bottom(ids, mask)
        expect = top(h[0], mask, h[1])[0]
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expect[valid], atol=1e-5, rtol=1e-5)

    client = export_adapter([(lora_state(bottom), 0)], layout.layers_path, LORA, tmp_path / "client", "tiny")
    both = export_adapter([(lora_state(bottom), 0), (lora_state(top), 1)], layout.layers_path, LORA,
                          tmp_path / "both", "tiny")
    joined = join_adapters([client, server], tmp_path / "joined")
    read = lambda d: json.loads((d / "adapter_config.json").read_text())  # noqa: E731
    assert read(joined)["layers_to_transform"] == read(both)["layers_to_transform"] == [0, 1, 2, 3]
    a, b = (PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval() for d in (joined, both))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids, attention_mask=mask).logits[valid],
                                   b(input_ids=ids, attention_mask=mask).logits[valid])


@pytest.mark.parametrize("spec,layers,expect", [("1/4", 24, 6), ("1/5", 24, 4), ("1/4", 30, 7), ("1/3", 30, 10), ("1/2", 4, 2),
                                                ("7", 30, 7), (3, 4, 3), ("0.25", 28, 7)])
def test_client_layers_spec(spec, layers, expect) -> None:
    assert resolve_client_layers(spec, layers) == expect


@pytest.mark.parametrize("spec", ["0", "4", "-1", "1/1", "1/100", "abc", "1/0"])
def test_client_layers_out_of_range_is_a_clear_error(spec) -> None:
    with pytest.raises(ValueError, match="client_layers"):
        resolve_client_layers(spec, 4)


def test_unsupported_model_names_class_and_what_is_missing() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*decoder.layers.*rotary"):
        inspect_decoder(gpt2)

    class NoConfig(nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="NoConfig"):
        inspect_decoder(NoConfig())
