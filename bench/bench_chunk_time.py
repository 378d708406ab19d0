"""Issue 29's time target, measured in one run (no timed assertions; always exits 0): a default SmolLM2 ``lesft``
round with the default chunks (``--server_chunk_rows 8 --head_chunk_tokens 1024``) is no slower than without them
(``0 0``, the whole logits at once): target <= 1.05 x.

"Default round": ``lesft train``'s defaults (4 clients, batch 1, grad_accum 4, fp32) on the synthetic benchmark,
SmolLM2-135M. Both runs start from the same model and seed, so round r holds the same rows in both. After --warmup
untimed rounds each, --reps rounds each are timed, interleaved (the order alternates every repetition); a round
during which other processes used noticeable CPU is re-taken (at most --retries times) and counted. Reported: the
median of each, the median of the paired ratios, and their spread.

    .venv/bin/python bench/bench_chunk_time.py [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesft import methods  # noqa: E402
from lesft.config import TrainConfig  # noqa: E402
from lesft.data.rows import load_rows  # noqa: E402
from lesft.model.load import load_model  # noqa: E402
from lesft.train import Run  # noqa: E402

from bench_split import Rounds  # noqa: E402  (the same round stepping as bench_split)
from timing import BUSY, disturbed, interleaved, med, parse_with_timing_args  # noqa: E402

TARGET = 1.05
CASES = {"chunked (default)": {}, "unchunked": {"server_chunk_rows": 0, "head_chunk_tokens": 0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds per case (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per case first")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_with_timing_args(ap, retries=2, retry_budget=600.0)
    t_start = time.perf_counter()
    base = TrainConfig(method="lesft", model=args.model, device="cpu", progress=False, seed=args.seed,
                       rounds=10**6, checkpoint_every=0)
    rows = load_rows("synthetic", base.samples, args.seed, base.synthetic)
    runs = {}
    for name, over in CASES.items():
        model, tok = load_model(args.model)
        runs[name] = Run(methods.resolve(dataclasses.replace(base, **over)), model, tok, rows)
    step = Rounds(runs)
    for name in runs:
        for _ in range(args.warmup):
            step(name)
    got = interleaved({n: (lambda n=n: step(n)) for n in runs}, args.reps, args.retries,
                      prepare=step.skip_aggregation, deadline=t_start + args.retry_budget, quiet_wait=args.quiet_wait)
    wall, foreign, retried = got.wall, got.foreign, got.retried
    a, b = wall["chunked (default)"], wall["unchunked"]
    paired = sorted(x / y for x, y in zip(a, b))
    print(f"bench_chunk_time  model={args.model}  lesft, {base.clients} clients x {base.grad_accum} micro-steps, "
          f"batch {base.batch_size}, {base.dtype}  threads={torch.get_num_threads()}  reps={args.reps} (interleaved)  "
          f"re-taken={retried}  'disturbed' = rounds during which other processes used > {BUSY} core")
    for name in runs:
        print(f"{name:<20} round s: median {med(wall[name]):7.3f}  min {min(wall[name]):7.3f}  "
              f"max {max(wall[name]):7.3f}  disturbed {disturbed(foreign[name])}/{len(foreign[name])}")
    print(f"RESULT  chunked / unchunked round time: median {med(a) / med(b):.3f}, paired ratios median "
          f"{med(paired):.3f} [min {paired[0]:.3f}, max {paired[-1]:.3f}] over {len(paired)} pairs "
          f"(target <= {TARGET})")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "foreign": foreign, "paired": paired,
                                               "retried": retried}, indent=2))


if __name__ == "__main__":
    main()
