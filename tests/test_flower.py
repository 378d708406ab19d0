"""Aggregation through Flower: our ServerApp (Flower's FedAvg) and ClientApps against a live split server.

Flower's own simulation engine needs ray; here a minimal in-memory ``Grid`` delivers each round's
messages to the ClientApps, in threads (they must meet at the split server's step barrier), and the
real ``FedAvg`` strategy does the rest. docs/deploy.md runs the same apps on SuperLink/SuperNodes.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from safetensors.torch import load_file

flwr = pytest.importorskip("flwr")
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from lesft import methods  # noqa: E402
from lesft.config import TrainConfig
from lesft.typed import from_dict, to_dict  # noqa: E402
from lesft.deploy.cli import build_service  # noqa: E402
from lesft.deploy.client_app import app as client_app  # noqa: E402
from lesft.deploy.server_app import app as server_app  # noqa: E402
from lesft.deploy.endpoint import serve  # noqa: E402
from lesft.deploy.wire import NetArgs  # noqa: E402
from lesft.train import train  # noqa: E402


class ThreadGrid(Grid):
    """Delivers messages to in-process ClientApps, all of a round's at once (threads)."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict) -> None:
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(),
                                      run_config=dict(run_config)) for nid, cfg in node_configs.items()}
        self.replies: dict[str, Message] = {}
        self.lock = threading.Lock()

    def set_run(self, run_id):
        self._run = run_id

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        messages = list(messages)
        if not messages:
            return []
        ids = [str(uuid.uuid4()) for _ in messages]
        for m, mid in zip(messages, ids):
            m.metadata.__dict__["_message_id"] = mid
        with ThreadPoolExecutor(len(messages)) as pool:
            replies = list(pool.map(lambda m: client_app(m, self.contexts[m.metadata.dst_node_id]), messages))
        self.replies.update(zip(ids, replies))
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.mark.parametrize("worker", [False, True], ids=["clientapp-trains", "device-worker"])
def test_flower_aggregation_equals_in_process_splitlora(assets, tmp_path, worker) -> None:
    """Both ways a ClientApp trains (itself, or through the device's long-lived `lesft device` worker over a Unix
    socket) give the simulation's adapters."""
    from flwr.supercore.task_identity import TaskIdentity  # internal in 1.41: Message() needs a run id

    from lesft.deploy.device import Worker

    base = dict(method="lesft", model=str(assets / "model"), data=str(assets / "rows.jsonl"), clients=2, rounds=3,
                aggregate_every=2, grad_accum=2, client_layers="1", max_length=256, pad_to_multiple=16,
                device="cpu", progress=False, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    sim = train(from_dict(TrainConfig, {**base, "out": str(tmp_path / "sim")}))
    cfg = methods.resolve(from_dict(TrainConfig, base))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    tokens = {f"token-of-flower-client-{i}": i for i in range(2)}  # >= 22 characters
    service = build_service(cfg, NetArgs(timeout_s=60), [0, 1], tmp_path / "server")
    server, port = serve(service, "127.0.0.1:0", NetArgs(), tokens)
    stop, workers = threading.Event(), []
    try:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        nodes = {10 + i: {"config": str(tmp_path / "run.yaml"), "server": f"127.0.0.1:{port}", "client-id": i,
                          "token": f"token-of-flower-client-{i}", "out": str(tmp_path / f"c{i}"), "take-share": True}
                 for i in range(2)}
        if worker:
            for nid, node in nodes.items():
                node["worker"] = str(tmp_path / f"dev{nid}.sock")
                w = Worker()
                workers.append((w, threading.Thread(target=w.serve, args=(node["worker"], stop), daemon=True)))
                workers[-1][1].start()
            for node in nodes.values():
                _wait_for(node["worker"])
        run_config = {"config": str(tmp_path / "run.yaml"), "out": str(tmp_path / "agg"), "clients": 2}
        server_app(ThreadGrid(nodes, run_config), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                          run_config=run_config))
    finally:
        stop.set()
        for _, t in workers:
            t.join(timeout=10)
        server.stop(grace=0)
    if worker:  # the model was loaded once per device, not once per Flower round
        assert [(w.loads, w.rounds) for w, _ in workers] == [(1, 2), (1, 2)]
    # 3 rounds, aggregate every 2: Flower rounds after round 2 and after round 3, as the simulation does
    agg = load_file(str(tmp_path / "agg" / "aggregated_adapter.safetensors"))
    ref = load_file(str(tmp_path / "sim" / "checkpoint" / "tensors.safetensors"))
    assert agg
    for k, v in agg.items():
        torch.testing.assert_close(v, ref[f"client0.lora.{k}"], atol=1e-5, rtol=1e-4)
    srv = load_file(str(tmp_path / "server" / "server_checkpoint" / "tensors.safetensors"))
    for k in (k for k in ref if k.startswith("server.lora.")):
        torch.testing.assert_close(srv[k.removeprefix("server.")], ref[k], atol=1e-5, rtol=1e-4)
    assert sim["rounds"] == 3 and service.step == 3 * 2
    # aggregated client part + server part = the simulation's exported adapter
    from lesft.lora import merge_adapters

    merged = load_file(str(merge_adapters([tmp_path / "agg" / "adapter", tmp_path / "server" / "adapter"],
                                          tmp_path / "merged") / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "sim" / "adapter" / "adapter_model.safetensors"))
    assert merged.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(merged[k], want[k], atol=1e-5, rtol=1e-4)


def _wait_for(path: str, timeout: float = 10.0) -> None:
    import os
    import time

    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"no worker socket at {path}"
        time.sleep(0.05)


def test_device_worker_reports_errors_and_absence(tmp_path) -> None:
    """The ClientApp's side names the cause: no worker at the path (with the fix), or the worker's own error."""
    from lesft.deploy import device

    with pytest.raises(ConnectionError, match="no `lesft device` worker at .*start it"):
        device.ask(str(tmp_path / "none.sock"), {}, 1, b"")

    class Failing(device.Worker):
        def handle(self, head, adapter):
            raise ValueError(f"round {head['flower_round']}: {len(adapter)} bytes refused")

    stop = threading.Event()
    path = str(tmp_path / "w.sock")
    t = threading.Thread(target=Failing().serve, args=(path, stop), daemon=True)
    t.start()
    _wait_for(path)
    try:
        with pytest.raises(RuntimeError, match=r"ValueError: round 7: 3 bytes refused"):
            device.ask(path, {"config": "x"}, 7, b"abc")
        assert oct(__import__("os").stat(path).st_mode & 0o777) == "0o600"
    finally:
        stop.set()
        t.join(timeout=5)
    assert not __import__("os").path.exists(path), "the worker removes its socket when it stops"
