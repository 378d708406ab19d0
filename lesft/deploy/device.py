"""``lesft device``: a device's long-lived trainer for Flower, which keeps the model in memory between rounds.

Flower 1.41 runs a ClientApp as a fresh process per message (``flwr-clientapp`` exits after one), so a
ClientApp that trains in its own process imports torch and loads the model every round. ``lesft device`` is
started once per device, beside its SuperNode: it imports and loads once, and the ClientApp
(``lesft.deploy.client_app`` with node config ``worker = SOCKET``) only hands it each round's adapter over a
Unix socket and returns the reply. The run directory still carries the client's state (a checkpoint after
every round), so a device that restarts resumes where it was.

    lesft device --socket runs/dev0/device.sock

Protocol (one request per connection; no pickle): a frame is an 8-byte big-endian length, then that many
bytes. Request: a JSON frame ``{"node": node config, "flower_round": r}``, then a safetensors frame (the
aggregated adapter). Reply: a JSON frame ``{"n_rows", "metrics"}`` or ``{"error"}``, then a safetensors frame
(this client's adapter; empty after an error).

This module imports neither torch nor lesft's training code at import time: the ClientApp side
(:func:`ask`) stays a fast process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

#: request and reply frames larger than this are refused (an adapter of a 3B model at r = 64 is ~0.5 GB)
MAX_FRAME = 4 << 30


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">Q", len(payload)) + payload)


def recv_frame(sock: socket.socket) -> bytes:
    n = struct.unpack(">Q", _recv_exact(sock, 8))[0]
    if n > MAX_FRAME:
        raise ValueError(f"device frame of {n} bytes is over the limit of {MAX_FRAME}")
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"device socket closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def ask(path: str, node: dict[str, Any], flower_round: int, adapter: bytes, timeout_s: float = 0.0) -> tuple[dict, bytes]:
    """The ClientApp's side: send one round to the worker at ``path``; return (reply header, adapter bytes).
    ``adapter`` and the returned bytes are safetensors files in memory. Raises RuntimeError with the worker's
    error, or ConnectionError when no worker listens at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if timeout_s:
        s.settimeout(timeout_s)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise ConnectionError(f"no `lesft device` worker at {path} ({e.strerror}): start it on this device "
                                  f"(`lesft device --socket {path}`) or drop `worker` from the node config") from e
        send_frame(s, json.dumps({"node": node, "flower_round": flower_round}).encode())
        send_frame(s, adapter)
        head = json.loads(recv_frame(s))
        body = recv_frame(s)
    finally:
        s.close()
    if "error" in head:
        raise RuntimeError(f"lesft device worker at {path}: {head['error']}")
    return head, body


def train_for_flower(node: dict, adapter: dict[str, Any], flower_round: int,
                     model_source: Callable[[str], tuple[Any, Any]] | None = None) -> tuple[dict, int, dict]:
    """Run this client's rounds of Flower round ``flower_round`` (1-based); return (adapter, |D_i|, metrics).
    ``adapter``: name -> torch tensor. ``model_source(name)`` gives a fresh (model, tokenizer) to train (the
    device worker's kept copy); without it the model is loaded from disk."""
    from lesft import methods
    from lesft.checkpoint import CKPT, open_checkpoint
    from lesft.config import TrainConfig
    from lesft.typed import from_dict, load_yaml
    from lesft.deploy.cli import train_remote
    from lesft.deploy.wire import NetArgs, client_token

    cfg = methods.resolve(from_dict(TrainConfig, load_yaml(str(node["config"]))))
    cid = int(node["client-id"])
    total = cfg.rounds
    upto = min(flower_round * cfg.aggregate_every, total)
    cfg = replace(cfg, rounds=upto, out=str(node["out"]), resume=True, progress=False,
                  data=str(node.get("data", cfg.data)))
    token = client_token(cid, node.get("token"), node.get("token-file"))
    net = NetArgs(tls_ca=node.get("tls-ca") or None, tls_cert=node.get("tls-cert") or None,
                  tls_key=node.get("tls-key") or None, insecure=bool(node.get("insecure", False)))
    t0 = time.perf_counter()
    model, tok = model_source(cfg.model) if model_source is not None else (None, None)
    summary, n_rows = train_remote(cfg, net, str(node["server"]), token, cid, bool(node.get("take-share")),
                                   start_adapter=adapter, leave=upto >= total, model=model, tokenizer=tok)
    tensors = open_checkpoint(Path(cfg.out) / CKPT)[2]  # verified against its checksum
    prefix = f"client{cid}.lora."
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    skipped = sum(s["to"] - s["from"] + 1 for s in summary.get("rounds_skipped", []))
    metrics = {"loss": float(summary["final_loss"]), "rounds_done": upto, "rounds_trained": summary["rounds"],
               "rounds_skipped": skipped, "train_s": time.perf_counter() - t0}
    # adapter payload bytes exchanged with the aggregator (Flower's own framing comes on top)
    nbytes = {"aggregator_to_client": _payload(adapter), "client_to_aggregator": _payload(mine)}
    with (Path(cfg.out) / "flower.jsonl").open("a") as fh:
        fh.write(json.dumps({"flower_round": flower_round, "rounds_done": upto, "payload_bytes": nbytes,
                             "train_s": metrics["train_s"]}) + "\n")
    return mine, n_rows, metrics


def _payload(tensors: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Worker:
    """Serves rounds one at a time; keeps each model it loaded (pristine) and trains a copy per round."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}  # model name -> (model, tokenizer), never trained
        self.loads = self.rounds = 0  # models loaded from disk, rounds served

    def model(self, name: str):
        import copy

        from lesft.model.load import load_model

        if name not in self.models:
            t0 = time.perf_counter()
            self.models[name] = load_model(name, device="cpu")
            self.loads += 1
            print(f"lesft device: loaded {name} in {time.perf_counter() - t0:.1f} s (kept for every round)", flush=True)
        base, tok = self.models[name]
        return copy.deepcopy(base), tok  # train() consumes the model it is given

    def handle(self, head: dict[str, Any], adapter: bytes) -> tuple[dict, bytes]:
        from safetensors.torch import load, save

        t0 = time.perf_counter()
        mine, n, metrics = train_for_flower(head["node"], load(adapter), int(head["flower_round"]),
                                            model_source=self.model)
        metrics["worker_s"] = time.perf_counter() - t0
        self.rounds += 1
        return {"n_rows": n, "metrics": metrics}, save({k: v.contiguous() for k, v in mine.items()})

    def serve(self, path: str, stop: threading.Event | None = None) -> None:
        """Answer rounds at the Unix socket ``path`` until ``stop`` is set (or forever)."""
        p = Path(path)
        if p.exists():
            if p.is_socket():
                p.unlink()  # a socket left by a worker that was killed
            else:
                raise FileExistsError(f"--socket {path} exists and is not a socket: choose another path")
        p.parent.mkdir(parents=True, exist_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bound, restricted and listening under a temporary name first, then renamed: whoever sees ``path``
        # can connect at once, and never while it is open to others (only this device's user may hand it rounds)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        srv.bind(str(tmp))
        os.chmod(tmp, 0o600)
        srv.listen(4)
        os.replace(tmp, path)
        srv.settimeout(0.5)
        print(f"lesft device: ready on {path}", flush=True)
        try:
            while stop is None or not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                conn.settimeout(None)
                with conn:
                    try:
                        head = json.loads(recv_frame(conn))
                        adapter = recv_frame(conn)
                    except (ConnectionError, ValueError) as e:
                        print(f"lesft device: bad request ({e}); ignored", flush=True)
                        continue
                    try:
                        reply, body = self.handle(head, adapter)
                    except Exception as e:  # noqa: BLE001  (the ClientApp reports it to Flower)
                        reply, body = {"error": f"{type(e).__name__}: {e}"}, b""
                        print(f"lesft device: round {head.get('flower_round')} failed: {reply['error']}", flush=True)
                    try:
                        send_frame(conn, json.dumps(reply).encode())
                        send_frame(conn, body)
                    except OSError as e:
                        print(f"lesft device: the ClientApp left before the reply ({e})", flush=True)
        finally:
            srv.close()
            p.unlink(missing_ok=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, help="Unix socket path the ClientApp connects to (node config "
                                                   "`worker`); created with mode 0600")
    p.add_argument("--model", action="append", default=[],
                   help="load this model before the first round (repeatable; otherwise on the first round)")


def main(args: argparse.Namespace) -> int:
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    w = Worker()
    for name in args.model:
        w.model(name)
    try:
        w.serve(args.socket)
    except KeyboardInterrupt:
        print("lesft device: stopped", flush=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m lesft.deploy.device")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
