"""Server memory bounded by a chunk, not by the number of clients (issue 29): peak memory measured in one run, as
ratios (no timed assertions; always exits 0).

Targets:
  1. SmolLM2-135M, ``lesft``, every client taking part, 2 rows each, one round of one micro-step:
     peak RSS with 32 clients <= 1.6 x that with 4 clients (before chunking: 5.4 x).
  2. A Qwen2.5-0.5B-shaped random model, ``splitlora``, 16 rows x 512 tokens in one server step: the server's peak
     memory with the default chunks <= 1/2 of the unchunked one (``--server_chunk_rows 0 --head_chunk_tokens 0``).
  3. A default SmolLM2 round no slower than unchunked (<= 1.05 x; timed here only as a side note: one round each,
     on a machine that may be busy -- see bench_split.py for careful timing).

Each case is one ``lesft train`` process; its resident set and swapped pages are polled every 0.2 s (the peak RSS,
and the peak RSS + swap: on a machine with swap on, what the process would need without it), and
its summary.json gives the server role's own peak (tensors held + transient growth, see README "Memory").

    .venv/bin/python bench/bench_memory.py [--skip-qwen] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNCHUNKED = ["--server_chunk_rows", "0", "--head_chunk_tokens", "0"]


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident, resident + swapped) MB of process ``pid``: with swap on, what the process would need without it."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmSwap:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = fields.get("VmRSS", 0.0)
    return rss, rss + fields.get("VmSwap", 0.0)


def watch(proc: subprocess.Popen) -> tuple[float, float]:
    """Poll ``proc`` every 0.2 s until it ends: its peak (resident, resident + swapped) MB."""
    peak = peak_all = 0.0
    while proc.poll() is None:
        rss, rss_swap = memory_mb(proc.pid)
        peak, peak_all = max(peak, rss), max(peak_all, rss_swap)
        time.sleep(0.2)
    return peak, peak_all


def train(args: list[str], out: Path, device: str = "cpu") -> dict:
    """Run ``lesft train ARGS --out OUT``; its peak RSS (MB, polled), wall seconds and summary.json (whose
    per-side peaks are ``torch.cuda.max_memory_allocated`` on a GPU)."""
    cmd = [sys.executable, "-m", "lesft.cli", "train", *args, "--out", str(out), "--progress", "false",
           "--device", device, "--checkpoint_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        peak, peak_all = watch(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.communicate()[0].decode(errors="replace")
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    if summary is None:
        print(log[-3000:], file=sys.stderr)
    return {"peak_rss_mb": peak, "peak_rss_swap_mb": peak_all, "wall_s": wall, "rc": proc.returncode,
            "server_peak_mb": (summary or {}).get("peak_memory_mb", {}).get("server"),
            "server_s": (summary or {}).get("latency_s", {}).get("server")}


def deployed(flags: list[str], clients: int, out: Path, device: str = "cpu") -> dict:
    """``lesft server`` and ``clients`` ``lesft client`` processes on loopback for one round of ``flags``: the server
    process's own peak RSS and RSS + swap (MB, polled), and its server_summary.json. Every process is gone after."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    common = [*flags, "--progress", "false", "--device", device, "--checkpoint_every", "0"]
    out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "lesft.cli", "server", "--listen", "127.0.0.1:0", "--tokens",
                               str(out / "tokens.json"), "--max-rounds", "1", *common, "--out", str(out / "server")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    procs, log, t0 = [server], [], time.perf_counter()
    try:
        for line in server.stdout:  # until it serves
            log.append(line)
            if "serving" in line:
                address = line.split(" on ")[1].split(",")[0]
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(log[-30:]))
        procs += [subprocess.Popen([sys.executable, "-m", "lesft.cli", "client", "--server", address, "--token-file",
                                    str(out / "tokens.json"), "--client-id", str(i), "--take-share", *common,
                                    "--out", str(out / f"client{i}")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT, env=env, cwd=ROOT) for i in range(clients)]
        peak, peak_all = watch(server)
        rcs = []
        for p in procs:  # the clients back-propagate after the server's last reply (slowly, when swapped out)
            try:
                rcs.append(p.wait(1800))
            except subprocess.TimeoutExpired:
                rcs.append(-9)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    path = out / "server" / "server_summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    return {"peak_rss_mb": peak, "peak_rss_swap_mb": peak_all, "wall_s": time.perf_counter() - t0,
            "rc": max(rcs, key=abs), "server_peak_mb": None,  # the polled figures are the server's own here
            "server_s": summary.get("server_busy_s"), "server_summary": summary or None}


def record(res: dict[str, dict], key: str, result: dict, json_path: str | None) -> None:
    """Keep ``result`` as ``res[key]``, print its line, and (``json_path``) write every result so far: a stopped
    run keeps what it measured."""
    res[key] = result
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2))
    print(f"{key:40s} peak RSS {result['peak_rss_mb']:8.0f} MB  RSS + swap {result['peak_rss_swap_mb']:8.0f} MB  "
          f"server peak {result['server_peak_mb'] or 0:8.0f} MB  server {result['server_s'] or 0:6.1f} s  "
          f"rc {result['rc']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, nargs=2, default=[4, 32])
    ap.add_argument("--skip-qwen", action="store_true", help="only targets 1 and 3")
    ap.add_argument("--skip-smollm2", action="store_true", help="only target 2")
    ap.add_argument("--qwen-tokens", type=int, default=512, help="tokens per row of the Qwen-shaped step")
    ap.add_argument("--qwen-tokenizer", default=str(ROOT.parent / "shared" / "models" / "qwen2.5-tokenizer"))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the per-side peaks in summary.json are then "
                    "torch.cuda.max_memory_allocated (the GPU script runs it so)")
    ap.add_argument("--deployed", action="store_true", help="target 2 with `lesft server` and 4 `lesft client` "
                    "processes on loopback: the server process's own peak, polled (not the simulation's process)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    res: dict[str, dict] = {}
    label = "smollm2" if args.model == "smollm2-135m" else Path(args.model).name  # the first cases' model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in ([] if args.skip_smollm2 else args.clients):
            for name, extra in (("unchunked", UNCHUNKED), ("default", [])):
                key = f"{label} {n} clients {name}"
                record(res, key, train(["--method", "lesft", "--model", args.model, "--data", "synthetic",
                                        "--samples", str(2 * n), "--clients", str(n), "--batch_size", "2",
                                        "--grad_accum", "1", "--rounds", "1", *extra],
                                       tmp / key.replace(" ", "_"), args.device), args.json)
        if not args.skip_qwen:
            model = tmp / "qwen"
            subprocess.run([sys.executable, str(ROOT / "bench" / "random_model.py"), "--shape", "qwen2.5-0.5b",
                            "--tokenizer", args.qwen_tokenizer, "--out", str(model)], check=True, cwd=ROOT)
            for name, extra in (("unchunked", UNCHUNKED), ("default", [])):
                key = f"qwen2.5-0.5b 16x{args.qwen_tokens} {name}"
                flags = ["--method", "splitlora", "--model", str(model), "--data", "synthetic", "--samples", "16",
                         "--clients", "4", "--batch_size", "4", "--grad_accum", "1", "--rounds", "1",
                         "--max_length", str(args.qwen_tokens), "--pad_to_multiple", str(args.qwen_tokens), *extra]
                run = tmp / key.replace(" ", "_")
                record(res, key, deployed(flags, 4, run, args.device) if args.deployed else
                       train(flags, run, args.device), args.json)
    lo, hi = args.clients
    for name in ([] if args.skip_smollm2 else ("unchunked", "default")):
        a, b = res[f"{label} {lo} clients {name}"], res[f"{label} {hi} clients {name}"]
        ratio = (f"{b['server_peak_mb'] / a['server_peak_mb']:.2f}" if a["server_peak_mb"] and b["server_peak_mb"]
                 else "n/a")
        print(f"RESULT  {name}: peak RSS {hi} / {lo} clients = {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}"
              f"{'  (target <= 1.6)' if name == 'default' else ''}; server peak (summary.json) {ratio}")
    a, b = res.get(f"{label} {lo} clients unchunked", {}), res.get(f"{label} {lo} clients default", {})
    if a.get("server_s") and b.get("server_s"):
        print(f"RESULT  {label} {lo}-client round, server seconds default / unchunked = {b['server_s'] / a['server_s']:.2f}"
              " (one round each; noisy on a busy machine)")
    if not args.skip_qwen:
        a, b = res[f"qwen2.5-0.5b 16x{args.qwen_tokens} unchunked"], res[f"qwen2.5-0.5b 16x{args.qwen_tokens} default"]
        if a["rc"] == 0 and b["rc"] == 0 and args.deployed:
            print(f"RESULT  Qwen2.5-0.5B shape, 16 x {args.qwen_tokens}, deployed: the server process's peak RSS + swap "
                  f"default / unchunked = {b['peak_rss_swap_mb'] / a['peak_rss_swap_mb']:.2f} (target <= 0.5)")
        elif a["rc"] == 0 and b["rc"] == 0:
            print(f"RESULT  Qwen2.5-0.5B shape, 16 x {args.qwen_tokens}: process peak RSS + swap default / unchunked = "
                  f"{b['peak_rss_swap_mb'] / a['peak_rss_swap_mb']:.2f} (target <= 0.5; the server part alone is "
                  f"smaller still, the client part being in both); server peak from summary.json "
                  f"{(b['server_peak_mb'] or 0) / (a['server_peak_mb'] or 1):.2f} (counts resident pages only)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
