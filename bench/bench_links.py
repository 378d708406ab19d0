"""Round time on emulated links, measured and predicted (issue 27 item 6).

For each method and link profile, a whole deployment runs on namespace hosts (``lesft.deploy.hosts``: split
server, aggregator, N devices, each link shaped and checked). Measured per round, from the parties' own
records: the round (a device's ``metrics.jsonl`` ``elapsed_s`` from one round to the next), device compute
(``latency_s`` of its summary), server compute (``server_busy_s``), and for aggregating methods the
aggregation round's extra (the ServerApp's round time minus the slowest device's training). Predicted with
``lesft plan`` from the config alone: its exact message sizes, the link profile, and compute seconds per row
taken from the same method's ``lan`` run: the meters' busy seconds per row of device and server (over all
rounds, round 1's warm-up included, while the measured rounds are 2 on), and Flower's own overhead per
aggregation (lan's measured aggregation extra minus its adapter transfer). So lan's round time is a check of
the compute model, its aggregation is not.

    python bench/bench_links.py [--methods sl splitlora lesft] [--links lan wifi 4g 3g] [--out runs/links]

Every party shares this machine's CPUs, so compute here is that of 4 devices and a server on 2 cores.
Run it on an otherwise idle machine (pause any study: ``kill -STOP PID`` ... ``kill -CONT PID``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = dict(model="smollm2-135m", data="synthetic", samples=32, clients=4, rounds=3, batch_size=1, grad_accum=2,
            lr=2.0e-4, lora={"r": 8, "alpha": 16, "dropout": 0.2}, device="cpu", seed=0, progress=False)


def config(method: str, extra: dict) -> dict:
    return {**BASE, **extra, "method": method, **({"aggregate_every": BASE["rounds"]} if method != "sl" else {})}


def deploy(cfg_path: Path, out: Path, link: str) -> dict:
    done = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    if done.get("rc") == 0:
        return done  # done before: measured once
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lesft.deploy.hosts", "run", str(cfg_path), "--out", str(out),
                        "--link", link, "--verify-s", "1", "--timeout-s", "1200"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"deployment {out} failed (rc {r.returncode}):\n{r.stdout[-3000:]}")
    return json.loads((out / "report.json").read_text())


def measured(out: Path, n: int, flower: bool) -> dict:
    devs = [out / "hosts" / f"dev{i}" / "out" for i in range(n)]
    diffs, dev_c = [], []
    for d in devs:
        el = [json.loads(line)["elapsed_s"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        diffs += [b - a for a, b in zip(el, el[1:])]
        s = json.loads((d / "summary.json").read_text())
        dev_c.append(s["latency_s"]["client"] / s["rounds"])
    srv = json.loads((out / "hosts" / "split" / "out" / "server_summary.json").read_text())
    rounds = srv["rounds_done"]
    m = {"split_round": statistics.median(diffs), "split_round_min": min(diffs), "split_round_max": max(diffs),
         "n_intervals": len(diffs), "device_compute": statistics.mean(dev_c),
         "server_compute": srv["server_busy_s"] / rounds, "rounds": rounds}
    if flower:
        agg = json.loads((out / "hosts" / "agg" / "out" / "aggregation.json").read_text())
        trains = [json.loads((d / "flower.jsonl").read_text().splitlines()[-1])["train_s"] for d in devs]
        m["aggregation_extra"] = agg["round_s"][str(len(agg["round_s"]))] - max(trains)
    return m


def compute_from(m: dict, cfg: dict, out: Path) -> "plan.Compute":
    """Busy seconds per row from a measured run (``measured``'s per-round compute over the rows of a round)."""
    from lesft import plan

    rows = cfg["batch_size"] * cfg["grad_accum"]
    return plan.Compute(m["device_compute"] / rows, m["server_compute"] / (rows * cfg["clients"]),
                        f"the lan run ({out})")


def main() -> int:
    from lesft import plan
    from lesft.config import TrainConfig
    from lesft.typed import from_dict
    from lesft.deploy.netem import PROFILES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["sl", "splitlora", "lesft"])
    ap.add_argument("--links", nargs="+", default=["lan", "wifi", "4g", "3g"])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "links")
    ap.add_argument("--set", type=Path, help="a YAML file of config fields over the defaults (e.g. a tiny model "
                                             "for a smoke run)")
    a = ap.parse_args()
    if a.links[0] != "lan":
        raise SystemExit("the first link must be lan: it calibrates compute for the others")
    results = []
    for method in a.methods:
        raw = config(method, yaml.safe_load(a.set.read_text()) if a.set else {})
        d = a.out / method
        d.mkdir(parents=True, exist_ok=True)
        (d / "run.yaml").write_text(yaml.safe_dump(raw))
        traffic = plan.traffic(from_dict(TrainConfig, raw))
        calib = None
        for link in a.links:
            out = d / link
            deploy(d / "run.yaml", out, link)
            m = measured(out, raw["clients"], method != "sl")
            if calib is None:  # lan calibrates: busy seconds per row, and Flower's own overhead per aggregation
                calib = compute_from(m, raw, out)
                lan = plan.round_time(traffic, PROFILES["lan"], calib)
                over = max(0.0, m.get("aggregation_extra", 0.0) - lan["aggregation"] * traffic.rounds)
            p = plan.round_time(traffic, PROFILES[link], calib, over)
            results.append({"method": method, "link": link, "measured": m, "predicted": p, "flower_overhead_s": over,
                            "compute": vars(calib), "bytes_per_round": {"up": traffic.per_round("up"),
                                                                       "down": traffic.per_round("down")}})
            print(f"{method} {link}: measured {m['split_round']:.2f} s, predicted {p['split_round']:.2f} s", flush=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{raw['model']}, {raw['clients']} devices, batch {raw['batch_size']} x {raw['grad_accum']} micro-steps, "
          f"{raw['rounds']} rounds; every device on the link named; {os.cpu_count()} CPUs shared by every party")
    print("| method | link | MB up / down per round | measured split round (s, median [min, max], n) | predicted (s) "
          "| error | device compute (s, measured / predicted) | server compute (s, measured / predicted) | upload, download, "
          "waiting, other predicted (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        m, p = r["measured"], r["predicted"]
        err = (p["split_round"] - m["split_round"]) / m["split_round"] * 100
        print(f"| {r['method']} | {r['link']}{' (calibration)' if r['link'] == 'lan' else ''} | "
              f"{r['bytes_per_round']['up'] / 1e6:.2f} / {r['bytes_per_round']['down'] / 1e6:.2f} | "
              f"{m['split_round']:.2f} [{m['split_round_min']:.2f}, {m['split_round_max']:.2f}], {m['n_intervals']} | "
              f"{p['split_round']:.2f} | {err:+.0f} % | {m['device_compute']:.2f} / {p['device_compute']:.2f} | "
              f"{m['server_compute']:.2f} / {p['server_compute']:.2f} | {p['upload']:.2f}, {p['download']:.2f}, "
              f"{p['waiting']:.2f}, {p['other']:.2f} |")
    errs = [abs(r["predicted"]["split_round"] / r["measured"]["split_round"] - 1) for r in results]
    print(f"{'PASS' if max(errs) <= 0.2 else 'FAIL'} every predicted split round within 20 % of the measured one: "
          f"largest error {100 * max(errs):.0f} %")
    aggs = [r for r in results if "aggregation_extra" in r["measured"]]
    if aggs:
        print("\naggregation round's extra (ServerApp round minus the slowest device's training), measured once per run:")
        for r in aggs:
            pa = r["predicted"]["aggregation"] * r["measured"]["rounds"]
            print(f"- {r['method']} {r['link']}: measured {r['measured']['aggregation_extra']:.2f} s, predicted "
                  f"{pa:.2f} s (Flower overhead {r['flower_overhead_s']:.2f} s from lan + the adapter both ways)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
