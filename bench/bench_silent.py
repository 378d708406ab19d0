"""A silent client among 4 (issue 31): the honest clients' time per step, with client 3 silent (it says hello before
every step and never sends) against a run where only the 3 honest clients exist; ratio of the medians of the steps
after the first, measured in one run (no assertion; always exits 0). Target: <= 1.2, after at most one timeout.

    .venv/bin/python bench/bench_silent.py [--steps 8] [--timeout 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def steps(model_dir: Path, clients: list[int], silent: int | None, n: int, timeout: float) -> list[float]:
    from test_hostile import act, make_cfg, wire

    from lesft.typed import to_dict
    from lesft.deploy.cli import build_service
    from lesft.deploy.wire import NetArgs

    cfg = make_cfg(model_dir)
    service = build_service(cfg, NetArgs(timeout_s=timeout, retries=0), clients + ([silent] if silent is not None
                                                                                   else []), None)
    times = []
    with ThreadPoolExecutor(len(clients)) as pool:
        for step in range(n):
            if silent is not None:
                service.hello(silent, {"config": to_dict(cfg)})
            t0 = time.perf_counter()
            list(pool.map(lambda c: service.exchange(c, bytearray(wire(act(c, step)))), clients))
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=2.0, help="the server's --timeout_s")
    args = ap.parse_args()
    import torch
    from conftest import make_model

    torch.set_num_threads(1)
    model_dir = Path(tempfile.mkdtemp())
    make_model().save_pretrained(model_dir)
    honest = steps(model_dir, [0, 1, 2], None, args.steps, args.timeout)
    with_silent = steps(model_dir, [0, 1, 2], 3, args.steps, args.timeout)
    a, b = statistics.median(honest[1:]), statistics.median(with_silent[1:])
    print("step s, 3 honest clients only:  " + " ".join(f"{t:.3f}" for t in honest))
    print("step s, + a silent client 3:    " + " ".join(f"{t:.3f}" for t in with_silent))
    print(f"RESULT  first step with the silent client {with_silent[0]:.2f} s (the timeout: {args.timeout:g} s); "
          f"later steps, median {b:.3f} s against {a:.3f} s: {b / a:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
