"""Chunked server steps (issue 29): the split server runs a step's rows in chunks of ``server_chunk_rows`` and takes
the same update as over all rows at once -- losses, server adapter and (through the returned gradients) every
client's adapter -- for every split method, the LESFT loss and the label-private split, whether a chunk splits a
client's rows or holds more than the batch."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, make_tokenizer, rows
from lesft import methods
from lesft.config import LossConfig, TrainConfig
from lesft.lora import LoraArgs
from lesft.train import Run


def chunked_run(method: str, tmp_path, chunk: int, **kw) -> Run:
    cfg = methods.resolve(TrainConfig(method=method, clients=4, batch_size=2, rounds=2, grad_accum=2, max_length=64,
                                      client_layers="1", lora=LoraArgs(r=4, alpha=8, dropout=0.0), aggregate_every=0,
                                      out=str(tmp_path / f"{method}-{chunk}"), progress=False, device="cpu",
                                      server_chunk_rows=chunk, **kw))
    return Run(cfg, make_model("llama", layers=4, hidden=32), make_tokenizer(), rows(16))


def adapters(run: Run) -> dict[str, torch.Tensor]:
    out = {f"server.{k}": v for k, v in run.server.top.state_dict().items() if "lora_" in k} if run.server else {}
    for c in run.clients:
        out.update({f"client{c.cid}.{k}": v for k, v in c.bottom.state_dict().items() if "lora_" in k})
        if c.top is not None:  # unsplit: the client holds the whole model
            out.update({f"client{c.cid}.top.{k}": v for k, v in c.top.state_dict().items() if "lora_" in k})
    return out


CASES = [("sl", {}), ("splitlora", {}), ("lesft", {}), ("sl", {"label_privacy": True}),
         ("lesft", {"label_privacy": True})]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}{'-lp' if k else ''}" for m, k in CASES])
def test_chunked_step_equals_the_whole_step(method, kw, tmp_path) -> None:
    whole = chunked_run(method, tmp_path, 0, **kw)  # 4 clients x 2 rows = 8 rows a step, all at once
    runs = {c: chunked_run(method, tmp_path, c, **kw) for c in (1, 3, 100)}  # 3 splits clients' rows; 100 > batch
    for r in range(whole.rounds):
        want = whole.round(r)
        for c, run in runs.items():
            got = run.round(r)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), (c, r)
            for cid, v in want["loss_per_client"].items():
                assert got["loss_per_client"][cid] == pytest.approx(v, rel=1e-5, abs=1e-6), (c, r, cid)
            for k, v in want.get("token_classes", {}).items():
                assert got["token_classes"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (c, k)
    a = adapters(whole)
    for c, run in runs.items():
        b = adapters(run)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (c, k, float((a[k] - b[k]).abs().max()))
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k and k.startswith("client"))


REF = {"lesft": LossConfig(tau=0.3, cluster_on="reference")}  # the reference path's states reach the loss both ways
HEAD_CASES = [("splitlora", {}), ("lesft", {}), ("sl", {"label_privacy": True}), ("lesft", {"label_privacy": True}),
              ("centralized", {}), ("lesft", REF), ("lesft", {"label_privacy": True, **REF})]


@pytest.mark.parametrize("method,kw", HEAD_CASES, ids=[f"{m}{'-lp' if 'label_privacy' in k else ''}"
                                                       f"{'-ref' if 'lesft' in k else ''}" for m, k in HEAD_CASES])
def test_chunked_head_equals_the_whole_logits(method, kw, tmp_path) -> None:
    """Chunks of 7 target positions split sequences (char-level targets hold 10+ tokens); 10**6 holds them all."""
    whole = chunked_run(method, tmp_path, 0, head_chunk_tokens=0, **kw)  # [rows, T, V] logits, all rows at once
    runs = {c: chunked_run(method, tmp_path / f"h{c}", 3, head_chunk_tokens=c, **kw) for c in (7, 10**6)}
    for r in range(whole.rounds):
        want = whole.round(r)
        for c, run in runs.items():
            got = run.round(r)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), (c, r)
            for k, v in want.get("token_classes", {}).items():
                assert got["token_classes"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (c, k)
    a = adapters(whole)
    for c, run in runs.items():
        b = adapters(run)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (c, k, float((a[k] - b[k]).abs().max()))


def test_the_whole_logits_never_exist(tmp_path, monkeypatch) -> None:
    """A vocabulary-sized tensor of more than one chunk's positions is never allocated by the head (the LM head's
    outputs are recorded by a hook): with chunks of 5, every logits tensor has at most 5 rows."""
    run = chunked_run("lesft", tmp_path, 0, head_chunk_tokens=5)
    seen = []
    for part in [run.server.top.head.lm_head]:
        part.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    run.round(0)
    vocab = run.server.top.head.lm_head.out_features
    assert seen and all(s[-1] == vocab and len(s) == 2 and s[0] <= 5 for s in seen), seen[:5]
    whole = chunked_run("lesft", tmp_path / "w", 0, head_chunk_tokens=0)
    seen.clear()
    whole.server.top.head.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    whole.round(0)
    assert any(len(s) == 3 and s[0] * s[1] > 5 for s in seen)  # unchunked: [rows, T, V] (the check can fail)
