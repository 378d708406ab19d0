"""The wire study's table (issue 28), recomputed from the kept predictions: each compressed run against the
uncompressed run of the same method, seed and rows (the evidence study's), paired question by question.

    .venv/bin/python docs/wire/pairs.py [SWEEP_DIR]      # default: docs/wire/results + docs/evidence/results

Per cell: seeds finished, bytes per 25-round run each way (MB = 2^20 B, client<->server only; aggregation is
the same fp32 adapters in every cell), accuracy, and the paired difference in points with its bootstrap
interval over questions (clustered: each question keeps its seeds), the exact McNemar p (seeds pooled as question x
seed pairs, optimistic), the sign-flip p (the question as the unit) and the mean over seeds with its t interval
(lesft.stats).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lesft.stats import paired_comparison  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MB = 2 ** 20


def runs(dirs: list[Path]) -> dict[str, Path]:
    out = {}
    for d in dirs:
        for r in sorted(d.iterdir()) if d.is_dir() else []:
            if (r / "eval" / "predictions.jsonl").is_file():
                out.setdefault(r.name, r)
    return out


def correct(run: Path) -> dict[str, bool]:
    rows = (json.loads(x) for x in (run / "eval" / "predictions.jsonl").open())
    return {str(d["id"]): bool(d["correct"]) for d in rows}


WIRE_KEYS = r"__(?:wire_dtype|reference_wire|grad_wire|pack_ints)=[^_]+"


def pair_name(name: str, found: dict[str, Path]) -> str:
    """The uncompressed run of the same point: the name without its wire keys, from the same study where it has one
    (the GPU round's `boost`), else as the evidence study names a plain method and seed (``seed=S__method=M``)."""
    plain = re.sub(WIRE_KEYS, "", name)
    if plain in found:
        return plain
    m = re.fullmatch(r"method=([a-z0-9]+)__seed=(\d+)", plain)
    if m is None:
        raise SystemExit(f"no uncompressed pair {plain!r} for {name!r}")
    return f"seed={m.group(2)}__method={m.group(1)}"


def main() -> None:
    dirs = [Path(sys.argv[1])] if len(sys.argv) > 1 else [ROOT / "docs/wire/results", ROOT / "docs/evidence/results"]
    found = runs(dirs + [ROOT / "docs/evidence/results"])
    cells: dict[str, list[str]] = defaultdict(list)
    for name in found:
        if "wire" in name:  # a compressed run: its cell is its name without the seed
            cells[re.sub(r"__seed=\d+", "", name)].append(name)
    print("| run | seeds | up MB | down MB | accuracy | uncompressed | difference, points [95 %, questions] | discordant "
          "| McNemar p | sign-flip p | over seeds [95 % t] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cell, names in sorted(cells.items()):
        a, b, up, down = [], [], [], []
        for n in sorted(names):
            mine, base = correct(found[n]), correct(found[pair_name(n, found)])
            keys = sorted(k for k in mine if k in base)
            a.append([mine[k] for k in keys])
            b.append([base[k] for k in keys])
            comm = json.loads((found[n] / "summary.json").read_text())["comm_bytes"]
            up.append(comm["client_to_server"] / MB)
            down.append(comm["server_to_client"] / MB)
        p = paired_comparison(a, b)
        acc_a = sum(map(sum, a)) / sum(map(len, a))
        acc_b = sum(map(sum, b)) / sum(map(len, b))
        print(f"| `{cell.replace('__', ' ')}` | {len(names)} | {sum(up) / len(up):.1f} | {sum(down) / len(down):.1f} | "
              f"{100 * acc_a:.1f} % | {100 * acc_b:.1f} % | {100 * p.diff:+.1f} [{100 * p.low:+.1f}, {100 * p.high:+.1f}] | "
              f"{p.only_method} / {p.only_baseline} | {p.p_value:.2g} | {p.p_sign_flip:.2g} | {over_seeds(p)} |")


def over_seeds(p) -> str:
    """The mean of the per-seed differences with its t interval (points); '-' with one seed."""
    if p.seed_t is None:  # one seed
        return "–"
    mean, low, high = p.seed_t[:3]
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


if __name__ == "__main__":
    main()
