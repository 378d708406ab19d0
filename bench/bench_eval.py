"""Evaluation throughput: batched greedy generation vs one question at a time (no timed assertions; exits 0).

Target (SmolLM2-135M-Instruct, CPU, GSM8K test questions in the chat template, 256 new tokens, greedy,
KV cache, the default stop strings):

  questions/s with ``lesft.evaluate.generate(batch_size=16)``  >=  3x  questions/s one at a time

How: the first --n-batched GSM8K test questions (default 16: one batch of 16) are generated in one
``generate`` call; the first --n-single of them (default 4) one at a time (``batch_size=1``). Each mode's
rate is its own questions / wall seconds, so the one-at-a-time rate is *extrapolated* from fewer
questions (to keep the run to a few minutes). Both modes stop a question at EOS or a stop string; a
batch runs until its longest member is done. The one-at-a-time completions are also compared with the
batched ones (greedy: they should match, up to float rounding).

Threads: --threads (default 1) intra-op threads for both modes. On a busy 2-core machine two threads are
several times slower than one (thread oversubscription); pass --threads 0 to keep torch's default.

    .venv/bin/python bench/bench_eval.py [--n-batched 16] [--n-single 4] [--max-new-tokens 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesft.data.benchmarks import load_benchmark  # noqa: E402
from lesft.data.prompts import render_prompt  # noqa: E402
from lesft.evaluate import DEFAULT_STOP, generate  # noqa: E402
from lesft.model.load import load_model  # noqa: E402
from timing import verdict  # noqa: E402  (bench/ is on sys.path when run as a script)

TARGET = 3.0


def questions(n: int) -> tuple[list[str], str]:
    """The first ``n`` GSM8K test prompts (user text) and where they came from (the benchmark's data
    directory: ``$LESFT_DATA_DIR`` or ``../shared/data``; its error says how to point at it)."""
    rows = load_benchmark("gsm8k", "test")[:n]
    return [r["prompt"] for r in rows], "lesft.data.benchmarks.load_benchmark('gsm8k', 'test')"


def timed(model, tok, prompts: list[str], args: argparse.Namespace, batch_size: int) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, args.max_new_tokens, batch_size, list(DEFAULT_STOP))
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-batched", type=int, default=16, help="questions generated batched")
    ap.add_argument("--n-single", type=int, default=4, help="questions generated one at a time (a prefix of the batched ones)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    model.eval()
    user, source = questions(max(args.n_batched, args.n_single))
    prompts = [render_prompt(tok, q, True) for q in user]
    generate(model, tok, prompts[:2], 4, 2)  # warm-up (untimed)

    batched, t_b = timed(model, tok, prompts[: args.n_batched], args, args.batch_size)
    single, t_s = timed(model, tok, prompts[: args.n_single], args, 1)

    n_b, n_s = len(batched), len(single)
    rate_b, rate_s = n_b / t_b, n_s / t_s
    speedup = rate_b / rate_s
    same = sum(a == b for a, b in zip(single, batched))
    tokens_b = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in batched]
    tokens_s = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in single]
    hit_limit = sum(t >= args.max_new_tokens - 1 for t in tokens_b)

    print(f"bench_eval: {args.model} on {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, max_new_tokens {args.max_new_tokens}, greedy, KV cache")
    print(f"questions: GSM8K test (first {max(n_b, n_s)}), from {source}; chat template; stop {list(DEFAULT_STOP)!r}")
    print()
    print(f"{'mode':<22}{'questions':>10}{'wall s':>10}{'q/s':>10}{'mean tok':>10}")
    print(f"{'batched (bs=' + str(args.batch_size) + ')':<22}{n_b:>10}{t_b:>10.1f}{rate_b:>10.3f}"
          f"{sum(tokens_b) / n_b:>10.1f}")
    print(f"{'one at a time':<22}{n_s:>10}{t_s:>10.1f}{rate_s:>10.3f}{sum(tokens_s) / n_s:>10.1f}")
    print()
    print(f"one-at-a-time rate extrapolated from {n_s} questions (the first {n_s} of the {n_b} batched ones)")
    print(f"batched completions that hit max_new_tokens: {hit_limit}/{n_b} (a batch runs as long as its longest member)")
    print(f"one-at-a-time completions identical to the batched ones: {same}/{n_s}")
    print(verdict(f"batched speed-up  {rate_b:.3f} / {rate_s:.3f} q/s = {speedup:.2f}x (>= {TARGET}x)", speedup >= TARGET))

    if args.json:
        out = {
            "model": args.model, "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "source": source,
            "batched": {"n": n_b, "wall_s": t_b, "questions_per_s": rate_b, "mean_tokens": sum(tokens_b) / n_b,
                        "hit_limit": hit_limit},
            "single": {"n": n_s, "wall_s": t_s, "questions_per_s": rate_s, "mean_tokens": sum(tokens_s) / n_s},
            "speedup": speedup, "target": TARGET, "pass": speedup >= TARGET, "identical_completions": same,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
