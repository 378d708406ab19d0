"""The embedded default: SmolLM2-135M, synthetic arithmetic, 4 clients, several methods, one table."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lesft.config import TrainConfig
from lesft.meters import MB

DEMO_METHODS = ["sl", "splitlora", "splitfrozen", "lesft"]
DEMO_DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "data": "synthetic",
    "samples": 64,
    "clients": 4,
    "epochs": 1.0,
    "grad_accum": 2,  # 8 rounds: aggregation (every 5) happens mid-run, not only at the end
    "lr": 2e-4,  # above the paper's 5e-5 so that 4 rounds visibly move the loss
    "out": "runs/demo",
}


def format_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table: final loss, bytes each way, peak memory and busy time per side."""
    head = ("| method | final loss | client->server MB | server->client MB | client<->aggregator MB "
            "| peak mem client MB | peak mem server MB | time client s | time server s | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x / MB:.2f}"

    def num(x: float | None, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    for s in summaries:
        b = s["comm_bytes"]
        agg = b["client_to_aggregator"] + b["aggregator_to_client"]
        lines.append(
            f"| {s['method']} | {num(s['final_loss'], '.4f')} | {mb(b['client_to_server'])} | "
            f"{mb(b['server_to_client'])} | {mb(agg)} | {num(s['peak_memory_mb']['client'], '.0f')} | "
            f"{num(s['peak_memory_mb']['server'], '.0f')} | {num(s['latency_s']['client'])} | "
            f"{num(s['latency_s']['server'])} | {num(s['wall_s'])} |"
        )
    return "\n".join(lines)


def run_demo(base: TrainConfig, methods: list[str]) -> list[dict[str, Any]]:
    """Train each method with the same data, seed and model; print and save the comparison table."""
    from lesft.train import train

    root = Path(base.out)
    summaries = []
    for m in methods:
        cfg = replace(base, method=m, out=str(root / m), resume=not base.overwrite)  # a finished run is reused
        print(f"== {m}: {cfg.clients} clients, model {cfg.model}, data {cfg.data} -> {cfg.out}", flush=True)
        summaries.append(train(cfg))  # loads fresh weights: a run consumes its model
    table = format_table(summaries)
    print("\n" + table)
    (root / "demo.md").write_text(table + "\n")
    (root / "demo.json").write_text(json.dumps(summaries, indent=2))
    print(f"\nper-run files under {root}/<method>/ (config.yaml, metrics.jsonl, summary.json, adapter/)")
    return summaries
