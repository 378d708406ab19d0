"""The GPU round's validation cells against plain CE (`splitlora`), recomputed from the kept predictions.

    .venv/bin/python docs/evidence/validation_pairs.py

The GPU round (docs/evidence/results-gpu) did not validate its own `splitlora`. The baseline here is the CPU
`splitlora` of the same seed: seed 0 from issue 10's validation check, seeds 1-2 trained again in session 15
(configs/studies/cpu/evidence_again.yaml; their 500 test answers equal the committed runs' on every question).
So each pair crosses hardware; on the test split a seed's GPU run answers as its CPU run on 99.5 % of questions.
Per cell: the seeds' accuracies, the paired difference in points with its cluster-bootstrap interval over
questions, discordant question x seed pairs, the pooled McNemar p, the sign-flip p (question as the unit) and
the mean over seeds with its t interval (lesft.stats).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lesft.stats import paired_comparison  # noqa: E402

GPU = ROOT / "docs/evidence/results-gpu"
CELLS = ["method=lesft", "method=lesft__lesft.weighting=boost", "method=lesft__lesft.weighting=boost__synthetic.reference_style=worded",
         "method=lesft__lesft.weighting=boost__wire_dtype=bf16__reference_wire=int4__pack_ints=true",
         "method=lesft__synthetic.reference_style=worded", "method=splitlora__loss=dft"]


def load(path: Path) -> dict[str, bool]:
    return {str(r["id"]): bool(r["correct"]) for r in map(json.loads, path.open())}


def baseline(seed: int) -> dict[str, bool]:
    return load(ROOT / f"docs/evidence/validation/seed={seed}__method=splitlora/predictions.jsonl")


def main() -> None:
    ids = sorted(baseline(0))
    print("| GPU cell, 300 validation problems | seeds | accuracy by seed | `splitlora` (CPU) by seed | Δ, points [95 %, questions] "
          "| discordant | McNemar p | sign-flip p | over seeds [95 % t], p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in CELLS:
        a, b = [], []
        for s in (0, 1, 2):
            path = GPU / f"{cell}__seed={s}" / "eval-validation" / "predictions.jsonl"
            if path.is_file():
                mine, base = load(path), baseline(s)
                assert sorted(mine) == ids == sorted(base), f"{cell} seed {s}: not the same questions"
                a.append([mine[k] for k in ids])
                b.append([base[k] for k in ids])
        p = paired_comparison(a, b)
        acc = ", ".join(f"{100 * sum(x) / len(x):.1f}" for x in a)
        accb = ", ".join(f"{100 * sum(x) / len(x):.1f}" for x in b)
        seeds = "–" if len(a) < 2 else f"{100 * p.seed_t[0]:+.1f} [{100 * p.seed_t[1]:+.1f}, {100 * p.seed_t[2]:+.1f}], {p.seed_t[3]:.2g}"
        print(f"| `{cell.replace('__', ' ')}` | {len(a)} | {acc} | {accb} | {100 * p.diff:+.1f} [{100 * p.low:+.1f}, {100 * p.high:+.1f}] "
              f"| {p.only_method} / {p.only_baseline} | {p.p_value:.2g} | {p.p_sign_flip:.2g} | {seeds} |")


if __name__ == "__main__":
    main()
