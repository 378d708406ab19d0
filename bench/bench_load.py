"""Many devices against one split server (issue 27 item 7): 4 and then 16 device hosts, a tiny model, Flower
aggregation, every party on its own namespace host (``lesft.deploy.hosts``). Reported per run: whether every
round completed, the split server's peak RSS (its process's VmHWM) and its busy time per step
(``server_busy_s`` / steps), the wall time per round seen by the devices, and the ratio 16 : 4.

    python bench/bench_load.py [--devices 4 16] [--rounds 3] [--out runs/load]

Run it on an otherwise idle machine (every party shares its CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny(d: Path) -> tuple[Path, Path]:
    """The test suite's tiny Llama (4 layers, hidden 32) and char tokenizer, and 64 synthetic rows."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model, make_tokenizer, rows

    if not (d / "model" / "config.json").exists():
        make_model("llama", layers=4, hidden=32).save_pretrained(d / "model")
        make_tokenizer().save_pretrained(d / "model")
        (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(64)))
    return d / "model", d / "rows.jsonl"


def run(n: int, rounds: int, model: Path, data: Path, out: Path) -> dict:
    cfg = dict(method="lesft", model=str(model), data=str(data), clients=n, rounds=rounds, aggregate_every=rounds,
               grad_accum=2, client_layers="1", max_length=256, pad_to_multiple=16, device="cpu", progress=False,
               lora={"r": 4, "alpha": 8, "dropout": 0.0})
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lesft.deploy.hosts", "run", str(out / "run.yaml"), "--out",
                        str(out / "hosts"), "--link", "lan", "--verify-s", "0", "--timeout-s", "1800"],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    rep = json.loads((out / "hosts" / "report.json").read_text())
    srv = json.loads((out / "hosts" / "hosts" / "split" / "out" / "server_summary.json").read_text())
    diffs = []
    for i in range(n):
        el = [json.loads(line)["elapsed_s"] for line in
              (out / "hosts" / "hosts" / f"dev{i}" / "out" / "metrics.jsonl").read_text().splitlines()]
        diffs += [b - a for a, b in zip(el, el[1:])]
    return {"devices": n, "rc": r.returncode, "failures": rep["failures"], "rounds_done": srv["rounds_done"],
            "rounds": rounds, "steps": srv["step"], "server_peak_rss_mb": rep.get("split_peak_rss_mb"),
            "server_peak_transient_mb": srv["server_peak_transient_mb"],
            "server_s_per_step": srv["server_busy_s"] / max(srv["step"], 1),
            "round_s_median": statistics.median(diffs) if diffs else None, "wall_s": rep["wall_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "load")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, data = tiny(Path(tmp))
        res = [run(n, a.rounds, model, data, a.out / f"devices{n}") for n in a.devices]
    (a.out / "results.json").write_text(json.dumps(res, indent=2))
    print(f"lesft, tiny Llama (4 layers, hidden 32), {a.rounds} rounds of 2 micro-steps, Flower aggregation, lan "
          f"links; {os.cpu_count()} CPUs shared by every party")
    print("| devices | rounds completed | rc | server peak RSS (MB) | server peak transient (MB) | server busy per step "
          "(ms) | round, device view (s, median) | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res:
        print(f"| {r['devices']} | {r['rounds_done']} of {r['rounds']} | {r['rc']} | {r['server_peak_rss_mb']:.0f} | "
              f"{r['server_peak_transient_mb']:.1f} | {r['server_s_per_step'] * 1e3:.1f} | {r['round_s_median']:.2f} | "
              f"{r['wall_s']:.0f} |")
    if len(res) == 2:
        a4, a16 = res
        print(f"ratio {a16['devices']} : {a4['devices']}: server peak RSS {a16['server_peak_rss_mb'] / a4['server_peak_rss_mb']:.2f}x, "
              f"busy per step {a16['server_s_per_step'] / a4['server_s_per_step']:.2f}x, round "
              f"{a16['round_s_median'] / a4['round_s_median']:.2f}x")
    ok = all(r["rc"] == 0 and r["rounds_done"] == r["rounds"] for r in res)
    print(f"{'PASS' if ok else 'FAIL'} every round completed with every device count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
