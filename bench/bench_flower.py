"""Flower's added time per round, with and without the device worker (issue 27 item 4), on loopback.

Runs ``deploy/flower/run_local.sh`` twice on the same config: ``WORKER=0`` (the ClientApp process Flower starts
for every message trains itself: imports torch, loads the model, resumes its run directory) and ``WORKER=1``
(each device's long-lived ``lesft device`` keeps the model loaded; the ClientApp only passes adapters on).
Per Flower round: the ServerApp's round time (its messages made -> its replies aggregated) minus the slowest
client's split-training time; what is left is Flower's plumbing, the ClientApp and the adapter transfer.

    python bench/bench_flower.py [--config deploy/flower/run.yaml] [--flower-rounds 4]

Run it on an idle machine (pause any study: ``kill -STOP PID`` ... ``kill -CONT PID``) and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, out: Path, worker: bool) -> dict:
    env = dict(os.environ, WORKER="1" if worker else "0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(ROOT / "deploy/flower/run_local.sh"), str(config), str(out)], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"run_local.sh (WORKER={int(worker)}) failed, rc {r.returncode}:\n{r.stderr[-2000:]}")
    agg = json.loads((out / "aggregator" / "aggregation.json").read_text())
    clients = [[json.loads(line) for line in p.read_text().splitlines()]
               for p in sorted(out.glob("client*/flower.jsonl"))]
    rows = []
    for r_, round_s in sorted(agg["round_s"].items(), key=lambda kv: int(kv[0])):
        train = max(next(e["train_s"] for e in c if e["flower_round"] == int(r_)) for c in clients)
        payload = max(next(e["payload_bytes"] for e in c if e["flower_round"] == int(r_))["client_to_aggregator"]
                      for c in clients)
        app = agg["train_metrics"][r_]["app_s"]
        made, done = agg["round_wall"][r_]
        start = agg["train_metrics"][r_]["app_start"]  # the clients' mean (Flower averages metrics)
        rows.append({"round": int(r_), "round_s": round_s, "train_s": train, "added_s": round_s - train,
                     "app_s_mean": app, "adapter_bytes": payload, "to_clientapp_s": start - made,
                     "from_clientapp_s": done - (start + app)})
    return {"worker": worker, "wall_s": wall, "rounds": rows}


def summary(res: dict) -> str:
    later = [r for r in res["rounds"] if r["round"] > 1]  # round 1 also starts the processes and loads models
    added = [r["added_s"] for r in later]
    first = res["rounds"][0]
    med = statistics.median
    return (f"| {'device worker' if res['worker'] else 'ClientApp trains'} | {first['round_s']:.1f} | "
            f"{med(r['round_s'] for r in later):.1f} | {med(r['train_s'] for r in later):.2f} | "
            f"{med(added):.2f} [{min(added):.2f}, {max(added):.2f}] | "
            f"{med(r['app_s_mean'] for r in later):.2f} | {med(r['to_clientapp_s'] for r in later):.2f} | "
            f"{med(r['from_clientapp_s'] for r in later):.2f} | {len(later)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "deploy/flower/run.yaml")
    ap.add_argument("--flower-rounds", type=int, default=4, help="Flower rounds of one split round each")
    ap.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    a = ap.parse_args()
    raw = yaml.safe_load(a.config.read_text())
    raw.update(rounds=a.flower_rounds, aggregate_every=1)
    with tempfile.TemporaryDirectory() as tmp:
        base = a.out or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        cfg = base / "run.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        results = [run(cfg, base / f"worker{w}", w) for w in (False, True)]
    print(f"config {a.config.name}: model {raw['model']}, {raw['clients']} clients, {a.flower_rounds} Flower rounds "
          f"of 1 split round; loopback; {os.cpu_count()} CPUs")
    print("| ClientApp | round 1 (s) | later rounds (s, median) | split training (s, median) | added by Flower "
          "(s, median [min, max]) | in the ClientApp (s, median) | ServerApp's message to the ClientApp (s) | "
          "ClientApp's reply to the aggregate (s) | rounds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        print(summary(res))
    print(f"adapter per reply: {results[1]['rounds'][0]['adapter_bytes'] / 1e6:.2f} MB")
    added = statistics.median(r["added_s"] for r in results[1]["rounds"] if r["round"] > 1)
    print(f"{'PASS' if added <= 1.0 else 'FAIL'} Flower's added time per round with the worker <= 1 s: {added:.2f} s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
