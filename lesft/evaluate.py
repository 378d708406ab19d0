"""Accuracy of a (base or LoRA-tuned) causal LM on a benchmark: batched greedy generation or
multiple-choice log-likelihood scoring, answer extraction, Wilson 95% interval, per-question records.

Two modes:

* ``generate`` (every dataset): the prompt is rendered like in training (:func:`render_prompt`), the
  model continues it greedily (KV cache, left padding, prompts of similar length batched together),
  the completion is cut at EOS or the first stop string, and the answer is taken from it with
  :func:`lesft.data.extract.extract_answer` and compared with ``row["answer"]`` by ``is_correct``.
* ``loglik`` (multiple choice only: commonsenseqa, aqua_rat): for every option letter ``L`` the model
  scores ``log P("The answer is (L)." | prompt)`` (summed over the sentence's tokens, in batches) and the
  best-scoring letter is the prediction. No sampling, no parsing: a cheap, low-variance check.

Outputs (when ``EvalConfig.out`` is set): ``predictions.jsonl`` (one line per question: ``id, prompt,
completion, extracted, gold, correct``) and ``eval.json`` (the returned summary plus the config).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lesft.config import DEFAULT_STOP, KNOWN_DATASETS, MC_DATASETS, EvalConfig
from lesft.typed import load_yaml  # torch-free
from lesft.data.contamination import problem_keys
from lesft.decoding import _bar, _device, generate  # re-exported: decoding has its own module
from lesft.data.prompts import render_prompt
from lesft.data.registry import answer_kind, get_benchmark
from lesft.model.load import load_for_eval  # re-exported: its home is model loading
from lesft.stats import wilson_ci

__all__ = [
    "DEFAULT_STOP",
    "MC_DATASETS",
    "EvalConfig",
    "evaluate_rows",
    "generate",
    "load_for_eval",
    "run_eval",
    "score_continuations",
    "wilson_ci",
]

# ----------------------------------------------------------------------------------------------
# Log-likelihood scoring (multiple choice)
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: list[str],
    continuations: list[str],
    batch_size: int,
    progress: bool = False,
) -> list[float]:
    """``log P(continuation | context)`` summed over the continuation's tokens, for each pair.

    Tokenized like training: the context with the tokenizer's special tokens, the continuation without,
    concatenated. Pairs are sorted by length and scored in right-padded batches of ``batch_size``.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if not contexts:
        return []
    ctx_ids = tokenizer(contexts)["input_ids"]
    cont_ids = tokenizer(continuations, add_special_tokens=False)["input_ids"]
    seqs = [c + t for c, t in zip(ctx_ids, cont_ids)]
    for i, t in enumerate(cont_ids):
        if not t:
            raise ValueError(f"continuation {continuations[i]!r} has no tokens")
        if not ctx_ids[i]:
            raise ValueError(f"context {i} has no tokens (nothing to condition the first token on)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    scores = [0.0] * len(seqs)
    bar = _bar(len(seqs), progress, unit="option")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for r, i in enumerate(idx):
            n_ctx, n_cont = len(ctx_ids[i]), len(cont_ids[i])
            # token at position p is predicted by the logits at position p - 1
            pos = torch.arange(n_ctx - 1, n_ctx - 1 + n_cont, device=logprobs.device)
            target = torch.tensor(cont_ids[i], device=logprobs.device)
            scores[i] = float(logprobs[r, pos, target].sum())
        bar.update(len(idx))
    bar.close()
    return scores


_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[\)\.:]\s*\S", re.MULTILINE)


def option_letters(row: dict) -> list[str]:
    """The option letters of a multiple-choice row: from ``row["options"]``/``row["choices"]`` when
    present, else from option lines in the prompt (``A) ...``, ``(A) ...``, ``A. ...``), else A-E."""
    for key in ("options", "choices", "letters"):
        opts = row.get(key)
        if isinstance(opts, dict) and opts:
            return [str(k).strip() for k in opts]
        if isinstance(opts, (list, tuple)) and opts:
            letters = []
            for o in opts:
                if isinstance(o, dict) and "label" in o:
                    letters.append(str(o["label"]).strip())
                elif isinstance(o, str):
                    m = re.match(r"\s*\(?([A-J])(?:[\)\.:]|$)", o)
                    if m:
                        letters.append(m.group(1))
            if len(letters) == len(opts):
                return letters
    found: list[str] = []
    for m in _OPTION_LINE.finditer(row.get("prompt", "")):
        if m.group(1) not in found:
            found.append(m.group(1))
    if len(found) >= 2 and found == [chr(ord("A") + k) for k in range(len(found))]:
        return found
    return list("ABCDE")


# ----------------------------------------------------------------------------------------------
# Metrics and the evaluation loop
# ----------------------------------------------------------------------------------------------


def _extract(dataset: str):
    from lesft.data.extract import extract_answer, is_correct  # written alongside; imported lazily

    return extract_answer, is_correct


def evaluate_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    dataset: str,
    cfg: EvalConfig,
    meta: dict | None = None,
) -> dict:
    """Evaluate ``model`` on every row (``id, prompt, answer``); write ``cfg.out`` files when set.

    Returns ``{"dataset", "split", "mode", "n", "correct", "accuracy", "ci95", "questions_per_s",
    "wall_s"}`` (``wall_s``: generation/scoring plus extraction, model loading excluded), and ``"inference"`` (its
    measured bytes and times) when ``model`` is a :class:`lesft.generation.SplitGenerator`. ``meta`` is
    added to ``eval.json`` only. ``cfg.limit`` is not applied here (the caller picks the rows).
    """
    extract_answer, is_correct = _extract(dataset)
    model.eval()
    texts = [render_prompt(tokenizer, r["prompt"], cfg.chat_template) for r in rows]
    t0 = time.perf_counter()
    records: list[dict] = []
    if cfg.mode == "generate":
        completions = generate(model, tokenizer, texts, cfg.max_new_tokens, cfg.batch_size, cfg.stop,
                               progress=cfg.progress)
        for r, c in zip(rows, completions):
            pred = extract_answer(dataset, c)
            ok = pred is not None and bool(is_correct(dataset, pred, str(r["answer"])))
            records.append({"id": r.get("id"), "prompt": r["prompt"], "completion": c, "extracted": pred,
                            "gold": str(r["answer"]), "correct": ok, "keys": problem_keys(r)})
    elif cfg.mode == "loglik":
        if answer_kind(dataset) != "choice":
            raise ValueError(f"mode 'loglik' needs a multiple-choice dataset ({', '.join(MC_DATASETS)}), got {dataset!r}")
        letters = [option_letters(r) for r in rows]
        ctx, cont, owner = [], [], []
        for k, (t, ls) in enumerate(zip(texts, letters)):
            for L in ls:
                ctx.append(t)
                cont.append(cfg.choice_template.format(letter=L))
                owner.append(k)
        flat = score_continuations(model, tokenizer, ctx, cont, cfg.batch_size, progress=cfg.progress)
        per_row: list[dict[str, float]] = [{} for _ in rows]
        for k, (o, s) in enumerate(zip(owner, flat)):
            per_row[o][cont[k]] = s
        for r, ls, sc in zip(rows, letters, per_row):
            scores = {L: sc[cfg.choice_template.format(letter=L)] for L in ls}
            best = max(ls, key=lambda L: scores[L])  # ties: the first letter
            ok = bool(is_correct(dataset, best, str(r["answer"])))
            records.append({"id": r.get("id"), "prompt": r["prompt"],
                            "completion": cfg.choice_template.format(letter=best), "extracted": best,
                            "gold": str(r["answer"]), "correct": ok, "scores": scores, "keys": problem_keys(r)})
    else:
        raise ValueError(f"mode must be 'generate' or 'loglik', got {cfg.mode!r}")
    wall = time.perf_counter() - t0
    inference = model.inference_stats() if hasattr(model, "inference_stats") else None  # split generation

    n = len(records)
    correct = sum(r["correct"] for r in records)
    lo, hi = wilson_ci(correct, n)
    result = {
        "dataset": dataset,
        "split": cfg.split,
        "mode": cfg.mode,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": [lo, hi],
        "questions_per_s": n / wall if wall > 0 else 0.0,
        "wall_s": wall,
        **({"inference": inference} if inference is not None else {}),
    }
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        summary = dict(result, config=dataclasses.asdict(cfg), **(meta or {}))
        (out / "eval.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _run_config(run_dir: Path) -> dict:

    p = run_dir / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no config.yaml)")
    return load_yaml(p)


def prepare_eval(
    cfg: EvalConfig, model: str | None = None, adapter: str | None = None, run_dir: str | None = None,
    need_adapter: bool = True,
) -> tuple[EvalConfig, str, str | None, list[dict]]:
    """Resolve an evaluation and load its questions, loading no model: ``(cfg, model, adapter, rows)``.

    ``lesft train --eval`` calls it before training (``need_adapter=False``), so a setting that cannot
    work for the dataset is refused before any training is done. See :func:`run_eval` for the defaults.
    """
    cfg = dataclasses.replace(cfg, stop=list(cfg.stop))
    defaults = EvalConfig()
    run_conf: dict = {}
    if run_dir is not None:
        rd = Path(run_dir)
        run_conf = _run_config(rd)
        model = model or run_conf.get("model")
        if adapter is None:
            if need_adapter and not (rd / "adapter" / "adapter_config.json").is_file():
                raise FileNotFoundError(f"no adapter in {rd / 'adapter'} (has the run finished?)")
            adapter = str(rd / "adapter")
        run_data = run_conf.get("dataset", run_conf.get("data"))
        if cfg.dataset is None and isinstance(run_data, str):
            if run_data not in KNOWN_DATASETS:
                raise ValueError(f"the run trains on {run_data!r}, not a benchmark, so there is no test split to "
                                 f"evaluate on: name one of {', '.join(KNOWN_DATASETS)} (lesft eval --dataset; lesft train "
                                 "--evaluation.dataset; a sweep's eval.dataset)")
            cfg.dataset = run_data
        if cfg.data_dir is None:
            cfg.data_dir = run_conf.get("data_dir")
        if cfg.chat_template == defaults.chat_template and run_conf.get("chat_template") is False:
            cfg.chat_template = False
        if cfg.out is None:
            cfg.out = str(rd / "eval")
    if cfg.dataset is None:
        cfg.dataset = "synthetic"
    bench = get_benchmark(cfg.dataset)  # refuses an unknown name, listing the registered ones
    if cfg.split == defaults.split:  # e.g. CSQA: the public test split has no answer keys; validation is used
        cfg.split = bench.eval_split
    if not model:
        raise ValueError("no model: pass one, or a run directory whose config.yaml names it")
    if cfg.mode == "loglik" and bench.answer_kind != "choice":
        raise ValueError(f"mode 'loglik' needs a multiple-choice dataset ({', '.join(MC_DATASETS)}), got "
                         f"{cfg.dataset!r}: use mode 'generate'")
    rows = _load_rows(cfg, run_conf)
    if not rows:
        raise ValueError(f"no questions in {cfg.dataset}/{cfg.split}")
    return cfg, model, adapter, rows


def run_eval(
    cfg: EvalConfig, model: str | None = None, adapter: str | None = None, run_dir: str | None = None
) -> dict:
    """Load the questions and the model (+ adapter), evaluate, write files; return the summary.

    With ``run_dir`` (a ``lesft train`` output): the model is the run's ``model`` unless given, the adapter
    ``run_dir/adapter`` unless given, and the files go to ``run_dir/eval`` unless ``cfg.out`` is set.
    Fields left at their defaults follow the run: ``dataset`` (when the run's ``dataset``/``data`` is a
    benchmark name; a run on a JSONL file needs ``dataset`` set) and ``chat_template`` (off when the run
    trained without it). For the synthetic benchmark the run's ``synthetic`` difficulty is passed on.
    CommonsenseQA with ``split`` left at ``test`` (unlabelled) is evaluated on ``validation``.
    """
    cfg, model, adapter, rows = prepare_eval(cfg, model, adapter, run_dir)
    if cfg.split_inference:
        if run_dir is None:
            raise ValueError("split_inference needs a run directory (--run): its config says where the model is cut")
        from lesft.generation import in_process

        lm, tokenizer, _ = in_process(run_dir, adapter)
    else:
        lm, tokenizer = load_for_eval(model, adapter, cfg.device)
    meta = {"model": model, "adapter": adapter, "run_dir": run_dir, "split_inference": cfg.split_inference}
    result = evaluate_rows(lm, tokenizer, rows, cfg.dataset, cfg, meta=meta)
    return dict(result, **meta, out=cfg.out)


def _load_rows(cfg: EvalConfig, run_conf: dict) -> list[dict]:
    from lesft.data.benchmarks import load_benchmark
    from lesft.data.synthetic import ArithmeticSpec

    kwargs: dict[str, Any] = dict(file=cfg.file, n=cfg.limit or None, seed=cfg.seed)
    spec = run_conf.get("synthetic")
    if cfg.dataset == "synthetic" and isinstance(spec, dict):
        kwargs["spec"] = ArithmeticSpec(**spec)
    return load_benchmark(cfg.dataset, cfg.split, cfg.data_dir, **kwargs)
