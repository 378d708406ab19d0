"""A client as a Flower ClientApp: each Flower round = ``aggregate_every`` rounds of split training.

The train step loads the aggregated adapter it receives, continues its own run directory (a checkpoint:
adapter, AdamW moments, data position, meters) for ``aggregate_every`` more rounds against the split
server, and replies with its adapter and ``num-examples`` = |D_i|. Flower starts a fresh process per
message; the run directory is what carries the client's state from one round to the next (and across
a crash of the device). With node config ``worker`` the training happens in the device's long-lived
``lesft device`` process (``lesft.deploy.device``), which keeps the model loaded: this process then
imports neither torch nor the model, and only passes the adapters on.

Node config (``flower-supernode --node-config``):
  ``config``      the lesft training YAML (same file as the server's and the aggregator's)
  ``server``      HOST:PORT of ``lesft server``
  ``client-id``   this client's id; ``token`` or ``token-file`` its credential
  ``data``        this device's rows (JSONL; or a benchmark name with ``take-share = true``)
  ``out``         this client's run directory
  optional: ``take-share`` (bool), ``tls-ca``, ``tls-cert`` and ``tls-key`` (this device's certificate, for a
  split server that requires one), ``insecure`` (bool), ``worker`` (the Unix socket of this
  device's ``lesft device``)

Reply metrics: ``num-examples``, ``loss``, the rounds done, trained and skipped, ``train_s`` (seconds in
split training), ``app_s`` (seconds from the message's arrival in this process to the reply) and
``app_start`` (that arrival, wall clock).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0, wall0 = time.perf_counter(), time.time()
    node = dict(context.node_config)
    flower_round = int(msg.content["config"]["server-round"])
    if node.get("worker"):  # the device's long-lived worker trains; adapters cross as safetensors, never pickle
        from safetensors.numpy import load, save

        from lesft.deploy.device import ask

        arrays = {k: np.ascontiguousarray(a.numpy()) for k, a in msg.content["arrays"].items()}
        head, body = ask(str(node["worker"]), node, flower_round, save(arrays))
        record = ArrayRecord({k: Array(v) for k, v in load(body).items()})
        n, metrics = int(head["n_rows"]), head["metrics"]
    else:
        import torch  # noqa: F401  (Flower converts to torch tensors only once torch is imported)

        from lesft.deploy.device import train_for_flower

        mine, n, metrics = train_for_flower(node, dict(msg.content["arrays"].to_torch_state_dict()), flower_round)
        record = ArrayRecord(mine)
    metrics["app_s"] = time.perf_counter() - t0
    metrics["app_start"] = wall0  # wall clock: with the ServerApp's, where a round's time goes (bench_flower)
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": n, **metrics})}),
                   reply_to=msg)
