"""The wire study's table (issue 28), recomputed from the kept predictions: each compressed run against the
uncompressed run of the same method, seed and rows (the evidence study's), paired question by question.

    .venv/bin/python docs/wire/pairs.py [SWEEP_DIR]      # default: docs/wire/results + docs/evidence/results

Per cell: seeds finished, bytes per 25-round run each way (MB = 2^20 B, client<->server only; aggregation is
the same fp32 adapters in every cell), accuracy, and the paired difference in points with its bootstrap
interval and exact McNemar p (lesft.stats; seeds pooled as question x seed pairs).
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


def pair_name(name: str) -> str:
    """The uncompressed run of the same method and seed, as the evidence study names it."""
    method = re.search(r"method=([a-z]+)", name).group(1)
    seed = re.search(r"seed=(\d+)", name).group(1)
    return f"seed={seed}__method={method}"


def main() -> None:
    dirs = [Path(sys.argv[1])] if len(sys.argv) > 1 else [ROOT / "docs/wire/results", ROOT / "docs/evidence/results"]
    found = runs(dirs + [ROOT / "docs/evidence/results"])
    cells: dict[str, list[str]] = defaultdict(list)
    for name in found:
        if "wire" in name:  # a compressed run: its cell is its name without the seed
            cells[re.sub(r"__seed=\d+", "", name)].append(name)
    print("| run | seeds | up MB | down MB | accuracy | uncompressed | difference, points [95 %] | discordant | McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell, names in sorted(cells.items()):
        a, b, up, down = [], [], [], []
        for n in sorted(names):
            mine, base = correct(found[n]), correct(found[pair_name(n)])
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
              f"{p.only_method} / {p.only_baseline} | {p.p_value:.2g} |")


if __name__ == "__main__":
    main()
