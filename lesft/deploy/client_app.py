"""A client as a Flower ClientApp: each Flower round = ``aggregate_every`` rounds of split training.

The train step loads the aggregated adapter it receives, continues its own run directory (a checkpoint:
adapter, AdamW moments, data position, meters) for ``aggregate_every`` more rounds against the split
server, and replies with its adapter and ``num-examples`` = |D_i|. Flower starts a fresh process per
message; the run directory is what carries the client's state from one round to the next (and across
a crash of the device).

Node config (``flower-supernode --node-config``):
  ``config``      the lesft training YAML (same file as the server's and the aggregator's)
  ``server``      HOST:PORT of ``lesft server``
  ``client-id``   this client's id; ``token`` or ``token-file`` its credential
  ``data``        this device's rows (JSONL; or a benchmark name with ``take-share = true``)
  ``out``         this client's run directory
  optional: ``take-share`` (bool), ``tls-ca``, ``insecure`` (bool)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lesft import methods
from lesft.checkpoint import CKPT, open_checkpoint
from lesft.config import TrainConfig, from_dict, load_yaml
from lesft.deploy.wire import NetArgs, client_token

app = ClientApp()


def train_for_flower(node: dict, adapter: dict[str, torch.Tensor], flower_round: int) -> tuple[dict, int, dict]:
    """Run this client's rounds of Flower round ``flower_round`` (1-based); return (adapter, |D_i|, metrics)."""
    from lesft.deploy.cli import train_remote

    cfg = methods.resolve(from_dict(TrainConfig, load_yaml(str(node["config"]))))
    cid = int(node["client-id"])
    total = cfg.rounds
    upto = min(flower_round * cfg.aggregate_every, total)
    cfg = replace(cfg, rounds=upto, out=str(node["out"]), resume=True, progress=False,
                  data=str(node.get("data", cfg.data)))
    token = client_token(cid, node.get("token"), node.get("token-file"))
    net = NetArgs(tls_ca=node.get("tls-ca") or None, insecure=bool(node.get("insecure", False)))
    summary, n_rows = train_remote(cfg, net, str(node["server"]), token, cid, bool(node.get("take-share")),
                                   start_adapter=adapter, leave=upto >= total)
    tensors = open_checkpoint(Path(cfg.out) / CKPT)[2]  # verified against its checksum
    prefix = f"client{cid}.lora."
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    skipped = sum(s["to"] - s["from"] + 1 for s in summary.get("rounds_skipped", []))
    metrics = {"loss": float(summary["final_loss"]), "rounds_done": upto, "rounds_trained": summary["rounds"],
               "rounds_skipped": skipped}
    # adapter payload bytes exchanged with the aggregator (Flower's own framing comes on top)
    nbytes = {"aggregator_to_client": _payload(adapter), "client_to_aggregator": _payload(mine)}
    with (Path(cfg.out) / "flower.jsonl").open("a") as fh:
        fh.write(json.dumps({"flower_round": flower_round, "rounds_done": upto, "payload_bytes": nbytes}) + "\n")
    return mine, n_rows, metrics


def _payload(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@app.train()
def train(msg: Message, context: Context) -> Message:
    adapter = msg.content["arrays"].to_torch_state_dict()
    flower_round = int(msg.content["config"]["server-round"])
    mine, n, metrics = train_for_flower(dict(context.node_config), dict(adapter), flower_round)
    return Message(RecordDict({"arrays": ArrayRecord(mine),
                               "metrics": MetricRecord({"num-examples": n, **metrics})}), reply_to=msg)
