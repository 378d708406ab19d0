"""Which target tokens LESFT up- and down-weights, by the part of the worked answer they belong to.

For synthetic training rows, runs the untuned model (round 0 of a run; or, with ``--adapter``, a trained one) on the reference path x~ and reports,
per part of the target (the opening that restates the start, the words of each step, the equations
``a op b = c``, the closing "The answer is N."): the number of tokens, the mean reference probability p~, the
share that is salient (p~ > 0.95) and the mean LESFT weight if no token were sub-salient (irrelevant exponent
0.6) and if every non-salient token were (0.3): the true weight lies between. Prints a Markdown table.

    OMP_NUM_THREADS=1 python docs/evidence/token_weights.py --rows 64 --data_seed 0

About 1 s per row on one CPU thread with SmolLM2-135M. Quoted in docs/evidence.md.
"""

from __future__ import annotations

import argparse

import torch

from lesft.data.benchmarks import load_benchmark
from lesft.data.prompts import render_target
from lesft.data.samples import IGNORE_INDEX, build_sample
from lesft.errors import EQUATION
from lesft.evaluate import load_for_eval
from lesft.loss import token_weights

PARTS = ("opening", "step words", "equations", "closing")
MAX_LENGTH = 512  # long enough that no synthetic row is cut


def parts_of(target: str) -> list[tuple[int, int, str]]:
    """Character spans ``(start, end, part)`` of a synthetic target: opening sentence, closing sentence,
    equations, and the step words in between."""
    first_end = target.index(".") + 1
    closing = target.rindex("The answer is")
    spans = [(0, first_end, "opening"), (closing, len(target), "closing")]
    eqs = [(m.start(), m.end(), "equations") for m in EQUATION.finditer(target, first_end, closing)]
    cut = first_end
    for s, e, _ in eqs:
        spans.append((cut, s, "step words"))
        cut = e
    spans.append((cut, closing, "step words"))
    return spans + eqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--data_seed", type=int, default=0)
    ap.add_argument("--adapter", default=None, help="a run's adapter directory: the weights at the end of training")
    args = ap.parse_args()
    model, tok = load_for_eval(args.model, args.adapter)
    rows = load_benchmark("synthetic", "train", n=args.rows, seed=args.data_seed)
    per: dict[str, list[float]] = {p: [] for p in PARTS}
    for row in rows:
        sample = build_sample(tok, row, "dual", MAX_LENGTH, True)  # the reference path exactly as trained
        target = [t for t in sample.ref_labels if t != IGNORE_INDEX]
        enc = tok(render_target(tok, row["target"]), add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == target, "the target was cut: raise MAX_LENGTH"
        start = len(sample.ref_ids) - len(target)
        with torch.no_grad():
            logp = model(torch.tensor([sample.ref_ids])).logits[0, start - 1:-1].float().log_softmax(-1)
        p = logp.gather(-1, torch.tensor(target)[:, None])[:, 0].exp()
        offsets = enc["offset_mapping"]
        spans = parts_of(row["target"])
        for (s, e), prob in zip(offsets, p.tolist()):
            part = next((name for a, b, name in spans if a <= s < b), None)
            if part is not None and e > s:
                per[part].append(prob)
    who = f"{args.model} + {args.adapter}" if args.adapter else f"untuned {args.model}"
    print(f"{len(rows)} training rows of data_seed {args.data_seed}, {who}, reference path\n")
    print("| part of the target | tokens | mean p~ | salient % | mean weight (0.6) | mean weight (0.3) |")
    print("|---|---|---|---|---|---|")
    total = sum(len(v) for v in per.values())
    for part in PARTS:
        p = torch.tensor(per[part])
        none = torch.zeros_like(p, dtype=torch.bool)
        w_irr = token_weights(p, none, gammas=(5.0, 0.3, 0.6)).mean().item()
        w_sub = token_weights(p, ~none, gammas=(5.0, 0.3, 0.6)).mean().item()
        print(f"| {part} | {len(p)} ({100 * len(p) / total:.0f} %) | {p.mean():.3f} | {100 * (p > 0.95).float().mean():.0f} "
              f"| {w_irr:.2f} | {w_sub:.2f} |")


if __name__ == "__main__":
    main()
