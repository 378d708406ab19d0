"""lesft distill keeps exactly the teacher completions whose final answer is correct."""

from __future__ import annotations

import json

import lesft.evaluate as evaluate
from conftest import rows
from lesft.data.benchmarks import load_benchmark
from lesft.distill import DistillConfig, distill_rows


def test_distill_keeps_only_correct_completions_and_retries(monkeypatch, tokenizer) -> None:
    data = rows(4)
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens, batch_size, stop, temperature=0.0, top_p=1.0):
        calls.append((len(prompts), temperature))
        out = []
        for p in prompts:
            row = next(r for r in data if r["prompt"] in p)
            i = data.index(row)
            right = i % 2 == 0 or temperature > 0  # odd rows are wrong greedily, right when sampled
            out.append(f"Some steps. The answer is {row['answer'] if right else int(row['answer']) + 1}.")
        return out

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    greedy = distill_rows(None, tokenizer, data, "synthetic", DistillConfig(attempts=1))
    assert [k["id"] for k in greedy] == [data[0]["id"], data[2]["id"]]
    assert all(k["extracted"] == k["answer"] for k in greedy)
    again = distill_rows(None, tokenizer, data, "synthetic", DistillConfig(attempts=2, temperature=0.5))
    assert [k["id"] for k in again] == [r["id"] for r in data]  # order of the questions kept
    assert calls[-2:] == [(4, 0.0), (2, 0.5)]  # only the failures are retried, sampled


def test_teacher_file_feeds_training_targets(tmp_path, monkeypatch, tokenizer) -> None:
    data = load_benchmark("synthetic", "train", n=3, seed=0)
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps({"id": r["id"], "completion": f"Teacher says {r['answer']}. "
                                           f"The answer is {r['answer']}."}) + "\n" for r in data[:2]))
    got = load_benchmark("synthetic", "train", n=3, seed=0, target=f"teacher:{teacher}")
    assert [r["id"] for r in got] == [r["id"] for r in data[:2]]
    assert got[0]["target"].startswith("Teacher says") and got[0]["reference"] == data[0]["reference"]
