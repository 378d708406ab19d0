"""``lesft distill``: chain-of-thought targets from a teacher model, kept only where the teacher's final
answer is correct -- how the paper builds its few-shot training sets (teacher Llama-3-8B-Instruct).

Writes a JSONL of ``{"id", "completion", "extracted", "answer"}`` rows, the file that
``lesft train --target teacher:FILE`` reads. Each question gets up to ``attempts`` completions (greedy
first, then sampled at ``temperature``) until one is correct.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class DistillConfig:
    """Teacher generation settings."""

    teacher: str = field(default="smollm2-135m", metadata={"help": "Teacher model: alias, hub id, directory or .gguf."})
    dataset: str = field(default="synthetic", metadata={"help": "Benchmark: gsm8k, commonsenseqa, aqua_rat or synthetic."})
    split: str = field(default="train", metadata={"help": "Split whose questions get teacher targets."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the benchmark files (default as in train)."})
    file: str | None = field(default=None, metadata={"help": "Read the questions from this file instead."})
    limit: int = field(default=0, metadata={"help": "Questions to try, a seeded sample (0 = all)."})
    batch_size: int = field(default=16, metadata={"help": "Questions per generation batch."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens per completion."})
    attempts: int = field(default=1, metadata={"help": "Completions per question until one is correct (1 = greedy only)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of attempts after the first."})
    chat_template: bool = field(default=True, metadata={"help": "Wrap prompts in the teacher's chat template."})
    seed: int = field(default=0, metadata={"help": "Seed of the question sample and of sampling."})
    out: str = field(default="teacher.jsonl", metadata={"help": "Output JSONL (written atomically)."})

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def distill_rows(model, tokenizer, rows: list[dict[str, str]], dataset: str, cfg: DistillConfig) -> list[dict[str, Any]]:
    """Teacher completions of ``rows`` whose extracted answer equals the gold answer, in row order."""
    from lesft.data.extract import extract_answer, is_correct
    from lesft.data.prompts import render_prompt
    from lesft.evaluate import DEFAULT_STOP, generate

    kept: dict[str, dict[str, Any]] = {}
    todo = list(rows)
    for attempt in range(cfg.attempts):
        if not todo:
            break
        prompts = [render_prompt(tokenizer, r["prompt"], cfg.chat_template) for r in todo]
        torch.manual_seed(cfg.seed + attempt)
        outs = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, list(DEFAULT_STOP),
                        temperature=0.0 if attempt == 0 else cfg.temperature)
        left = []
        for r, text in zip(todo, outs):
            pred = extract_answer(dataset, text)
            if is_correct(dataset, pred, r["answer"]):
                kept[r["id"]] = {"id": r["id"], "completion": text.strip(), "extracted": pred, "answer": r["answer"]}
            else:
                left.append(r)
        todo = left
    return [kept[r["id"]] for r in rows if r["id"] in kept]


def run_distill(cfg: DistillConfig) -> dict[str, Any]:
    """Load questions and teacher, distill, write ``cfg.out``; return counts."""
    from lesft.data.benchmarks import load_benchmark
    from lesft.model.load import load_for_eval

    t0 = time.perf_counter()
    rows = load_benchmark(cfg.dataset, cfg.split, cfg.data_dir, file=cfg.file, n=cfg.limit or None, seed=cfg.seed)
    model, tokenizer = load_for_eval(cfg.teacher)
    kept = distill_rows(model, tokenizer, rows, cfg.dataset, cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(k) + "\n" for k in kept))
    tmp.replace(out)
    return {"questions": len(rows), "kept": len(kept), "kept_fraction": len(kept) / max(1, len(rows)),
            "out": str(out), "wall_s": time.perf_counter() - t0}
