"""Many simulated clients: peak memory of the whole simulation against the number of clients, and time
per round against the number of clients sampled per round. Prints measured figures; asserts nothing.

Each point is its own process (``lesft train``), so its peak RSS is its own: ``summary.json``'s
``peak_memory_mb.simulation``. Targets (issue 13): peak RSS of N = 64 clients <= 1.5 x that of N = 4,
plus 64 x (adapter + AdamW state); N = 128 runs; time per round grows no faster than linearly in m.

    .venv/bin/python bench/bench_clients.py [--model smollm2-135m] [--clients 4 64 128] [--sampled 4]
                                            [--rounds-m 1 2 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_point(model: str, clients: int, sampled: int, rounds: int, out: Path, extra: list[str]) -> dict:
    """Train ``rounds`` rounds with ``clients`` clients (``sampled`` per round, 2 rows each); its summary."""
    cmd = [sys.executable, "-m", "lesft.cli", "train", "--model", model, "--method", "lesft", "--data", "synthetic",
           "--samples", str(2 * clients), "--clients", str(clients), "--clients_per_round", str(sampled),
           "--rounds", str(rounds), "--grad_accum", "1", "--progress", "false", "--checkpoint_every", "0",
           "--device", "cpu", "--out", str(out), "--overwrite", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    rounds_s = [json.loads(x)["elapsed_s"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"clients": clients, "sampled": sampled, "peak_rss_mb": s["peak_memory_mb"]["simulation"],
            "client_part_mb": s["peak_memory_mb"]["client"],
            "round_s": [b - a for a, b in zip(rounds_s, rounds_s[1:])] or rounds_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 64, 128])
    ap.add_argument("--sampled", type=int, default=4, help="clients per round in the memory points")
    ap.add_argument("--rounds-m", type=int, nargs="+", default=[1, 2, 4], help="m values of the time points")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more lesft train flags (e.g. tiny sizes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_clients_"))
    mem = [run_point(args.model, n, min(args.sampled, n), 1, tmp / f"n{n}", args.extra) for n in args.clients]
    n_max = max(args.clients)
    times = [run_point(args.model, n_max, m, 3, tmp / f"m{m}", args.extra) for m in args.rounds_m]

    print(f"{'clients':>8} {'sampled':>8} {'peak RSS MB':>12} {'client part MB':>15}")
    for p in mem:
        print(f"{p['clients']:>8} {p['sampled']:>8} {p['peak_rss_mb']:>12.0f} {p['client_part_mb']:>15.1f}")
    base = mem[0]
    for p in mem[1:]:
        ratio = p["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"N={p['clients']}: peak RSS {ratio:.2f} x that of N={base['clients']} "
              f"({'PASS' if ratio <= 1.5 else 'FAIL'}: target <= 1.5 x, before the per-client adapters)")
    print(f"\n{'sampled m':>10} {'s/round (median of rounds 2-3)':>32}")
    med = {}
    for p in times:
        med[p["sampled"]] = sorted(p["round_s"])[len(p["round_s"]) // 2]
        print(f"{p['sampled']:>10} {med[p['sampled']]:>32.2f}")
    ms = sorted(med)
    for a, b in zip(ms, ms[1:]):
        print(f"m {a} -> {b}: time x{med[b] / med[a]:.2f} for m x{b / a:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"memory": mem, "time": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
