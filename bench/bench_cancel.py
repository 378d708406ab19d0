"""Memory that stays after cancelled streams (issue 31): the split server's resident set after rounds of two
concurrent large messages that a client cancels midway (no assertion; always exits 0).

Each round, a client process opens two streams to the server (this process, a tiny model), announces a 256 MiB
message on each, sends 160 MiB of it and cancels both. Printed per round: the server's RSS before, at the peak
and 1 s after the client ended, with the allocator trim after a large refused or cancelled call (the default)
and without it (``--no-trim``).

    .venv/bin/python bench/bench_cancel.py [--rounds 3] [--no-trim]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLIENT = r"""
import sys, threading, time, grpc
sys.path.insert(0, sys.argv[3])
from lesft.deploy.wire import EXCHANGE
from test_hostile import forge, HEAD, HID, T0, T1
first = forge({**HEAD, "tensors": [{**HID, "shape": [64, 32768, 32], "nbytes": 1 << 28}]})  # 256 MiB announced
chunk = b"\0" * (1 << 20)
calls = []
for token in (T0, T1):
    def chunks():
        yield first
        for _ in range(160):
            yield chunk
        time.sleep(30)
    calls.append(grpc.insecure_channel(sys.argv[1]).stream_stream(EXCHANGE)(
        chunks(), metadata=(("authorization", f"Bearer {token}"),), timeout=60))
def drive(it):
    try:
        list(it)
    except grpc.RpcError:
        pass
threads = [threading.Thread(target=drive, args=(it,), daemon=True) for it in calls]
[t.start() for t in threads]
time.sleep(float(sys.argv[2]))
for it in calls:
    it.cancel()
[t.join(10) for t in threads]
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-trim", action="store_true", help="leave freed memory in the allocator (as before)")
    ap.add_argument("--send-s", type=float, default=6.0, help="seconds the client sends before cancelling")
    args = ap.parse_args()
    from conftest import make_model
    from test_hostile import rss_bytes, start

    from lesft.deploy import service as svc
    from lesft.deploy.wire import NetArgs

    if args.no_trim:
        svc.release_memory = lambda: None
    model_dir = Path(tempfile.mkdtemp())
    make_model().save_pretrained(model_dir)
    service, server, address, _, _ = start(model_dir, net=NetArgs(timeout_s=5.0, max_streams=3, max_inflight_mb=4096,
                                                                   recv_timeout_s=60))
    before = rss_bytes()
    script = Path(tempfile.mkdtemp()) / "client.py"
    script.write_text(CLIENT)
    try:
        for r in range(args.rounds):
            peak = 0
            p = subprocess.Popen([sys.executable, str(script), address, str(args.send_s), str(ROOT / "tests")],
                                 cwd=ROOT)
            while p.poll() is None:
                peak = max(peak, rss_bytes())
                time.sleep(0.05)
            time.sleep(1.0)
            print(f"round {r + 1}: server RSS before {before >> 20} MiB, peak {peak >> 20} MiB, after "
                  f"{rss_bytes() >> 20} MiB ({'no trim' if args.no_trim else 'trim'}; "
                  f"{sum(service.admission.bytes.values())} bytes still in flight)", flush=True)
    finally:
        server.stop(grace=0)


if __name__ == "__main__":
    threading.excepthook = lambda a: None  # a cancelled stream's worker may end with an error: expected here
    main()
