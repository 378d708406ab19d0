"""Split generation: what it costs next to unsplit generation, in process and over gRPC (no timed assertions;
exits 0).

Targets (SmolLM2-135M-Instruct, CPU, greedy, KV cache, synthetic word problems in the chat template):

  split in process, batch --batch-size       <=  1.15x the time per token of unsplit HF ``generate``, same batch
  split over gRPC on loopback, one sequence  <=  1.5x  the time per token of the split in process, one sequence
  bytes per decoded token                    =   one hidden vector up (H x wire bytes) and one token id (8 bytes)
                                                 down, or label-private one hidden vector down; plus the header

How: one model is loaded; the unsplit model and the split parts share its weights (no adapter: a LoRA is folded
into the weights before generation, so it costs nothing per token). Four modes are timed, interleaved, --reps
times each, after one untimed warm-up: ``unsplit`` (HF ``model.generate``), ``split`` (``SplitGenerator`` over a
counting ``Loopback``) at --batch-size rows, and ``split/1`` and ``grpc/1`` (the generation service in a thread
of this process, ``RemoteGen`` over 127.0.0.1) with the first prompt only. Every mode gets the same stop rules
(EOS and the default stop strings) and, greedy and exact, generates the same tokens, so the same number of steps:
time per token = wall seconds of the call / steps (prefill included). Medians are reported; calls disturbed by
other processes are re-taken (``bench/timing.py``). Where the gRPC time goes: client and server compute per
step (measured inside each side) and the rest (encoding, gRPC, the thread hand-off).

    .venv/bin/python bench/bench_generate.py [--reps 5] [--batch-size 4] [--max-new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import disturbed, interleaved, med, parse_with_timing_args, verdict  # noqa: E402

from lesft.data.prompts import render_prompt  # noqa: E402
from lesft.data.synthetic import generate_arithmetic  # noqa: E402
from lesft.deploy.generation import RemoteGen, serve_generation  # noqa: E402
from lesft.deploy.wire import NetArgs  # noqa: E402
from lesft.decoding import DEFAULT_STOP, StopOnStrings, eos_ids, split_stops  # noqa: E402
from lesft.generation import GenerationServer, LocalGen, SplitGenerator, cut  # noqa: E402
from lesft.model.load import load_model  # noqa: E402
from lesft.model.split import inspect_decoder, resolve_client_layers  # noqa: E402
from lesft.transport import Loopback  # noqa: E402

TARGET_SPLIT, TARGET_GRPC = 1.15, 1.5
BENCH_TOKEN = "bench-generate-loopback-token"  # >= 22 characters, as the server requires


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--client-layers", default="1/4")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--wire-dtype", default="fp32")
    args = parse_with_timing_args(ap, retries=2, retry_budget=600)
    if not args.threads:
        torch.set_num_threads(1)

    model, tok = load_model(args.model)
    model.eval()
    n_layers = len(inspect_decoder(model).layers)
    k = resolve_client_layers(args.client_layers, n_layers)
    hidden = model.config.hidden_size
    wire_bytes = torch.empty(0, dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.wire_dtype]).element_size()
    prompts = [render_prompt(tok, r["prompt"], True) for r in generate_arithmetic(args.batch_size, seed=0)]
    text_stops, stop_ids = split_stops(tok, list(DEFAULT_STOP))
    eos = eos_ids(model, tok) + stop_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    if tok.pad_token is None:
        tok.pad_token = tok.convert_ids_to_tokens(pad)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    one = tok(prompts[:1], return_tensors="pt")

    def gen_kwargs(batch):
        from transformers import StoppingCriteriaList

        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                    stopping_criteria=StoppingCriteriaList([StopOnStrings(tok, text_stops, batch["input_ids"].shape[1])]))

    bottom, head, top = cut(model, k, None, label_private=False)
    server = GenerationServer(top, hidden)
    split = SplitGenerator(bottom, LocalGen(server, Loopback(args.wire_dtype)), model.generation_config)
    net = NetArgs(retries=0, timeout_s=600)
    grpc_server, port = serve_generation(server, "127.0.0.1:0", net, {BENCH_TOKEN: 0}, args.wire_dtype)
    remote = SplitGenerator(bottom, RemoteGen(f"127.0.0.1:{port}", BENCH_TOKEN, net, args.wire_dtype),
                            model.generation_config)

    modes = {
        "unsplit": lambda: model.generate(**gen_kwargs(enc), do_sample=False, top_k=None, temperature=None,
                                          top_p=None, num_beams=1),
        "split": lambda: split.generate(**gen_kwargs(enc)),
        "split/1": lambda: split.generate(**gen_kwargs(one)),
        "grpc/1": lambda: remote.generate(**gen_kwargs(one)),
    }
    outs = {m: fn() for m, fn in modes.items()}  # warm-up, and the tokens each mode generates
    same_batch = torch.equal(outs["unsplit"], outs["split"])
    same_one = torch.equal(outs["split/1"], outs["grpc/1"])
    steps = {m: o.shape[1] - (enc if m in ("unsplit", "split") else one)["input_ids"].shape[1] for m, o in outs.items()}

    counted = {"split/1": split, "grpc/1": remote}  # the modes whose generator counts its own work
    stats0: dict = {m: [] for m in counted}

    def reset(m: str) -> None:
        if m in counted:
            counted[m].totals = dict.fromkeys(counted[m].totals, 0)  # this call's numbers only

    def read(m: str) -> None:
        if m in counted:
            stats0[m].append(counted[m].inference_stats())

    got = interleaved(modes, args.reps, args.retries, before=reset, after=read,
                      deadline=time.perf_counter() + args.retry_budget, quiet_wait=args.quiet_wait)
    walls, foreign = got.wall, got.foreign
    per_tok = {m: med(walls[m]) / max(steps[m], 1) for m in modes}
    r_split = per_tok["split"] / per_tok["unsplit"]
    r_grpc = per_tok["grpc/1"] / per_tok["split/1"]

    def where(m: str) -> dict[str, float]:
        s = stats0[m]
        c = med([x["client_s"] for x in s]) / steps[m]
        sv = med([x["server_s"] for x in s]) / steps[m]
        return {"client": c, "server": sv, "rest": per_tok[m] - c - sv}

    # bytes: one split call at batch B, standard and label-private, payload per decoded token from the meter
    def decode_bytes(label_private: bool) -> dict[str, float]:
        b2, h2, t2 = cut(model, k, None, label_private=label_private)
        g = SplitGenerator(b2, LocalGen(GenerationServer(t2, hidden), Loopback(args.wire_dtype)),
                           model.generation_config, h2)
        out = g.generate(**gen_kwargs(enc))
        c = g.link.meter.to_dict()
        up, down = c["client_to_server"]["gen_step"], c["server_to_client"]["gen_reply"]
        b, t = enc["input_ids"].shape
        rows = (up["messages"] - 1) * b
        prefill_up = b * t * hidden * wire_bytes + b * t  # hidden + the bool mask
        prefill_down = b * (hidden * wire_bytes if label_private else 8)
        return {"steps": out.shape[1] - t, "up_payload": (up["payload_bytes"] - prefill_up) / rows,
                "down_payload": (down["payload_bytes"] - prefill_down) / rows,
                "up_header": up["header_bytes"] / up["messages"], "down_header": down["header_bytes"] / down["messages"]}

    byts = {"standard": decode_bytes(False), "label_private": decode_bytes(True)}
    grpc_server.stop(grace=0)

    print(f"bench_generate: {args.model} ({n_layers} layers, client {k} / server {n_layers - k}, H={hidden}) on "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, greedy, KV cache, "
          f"max_new_tokens {args.max_new_tokens}, wire {args.wire_dtype}, reps {args.reps} (interleaved)")
    print(f"tokens identical: unsplit vs split (batch {args.batch_size}) {same_batch}; "
          f"split/1 vs grpc/1 {same_one}")
    print()
    print(f"{'mode':<10}{'rows':>6}{'steps':>7}{'wall s (med)':>14}{'s/token':>10}{'disturbed':>11}")
    for m in modes:
        rows = args.batch_size if m in ("unsplit", "split") else 1
        print(f"{m:<10}{rows:>6}{steps[m]:>7}{med(walls[m]):>14.3f}{per_tok[m]:>10.4f}"
              f"{disturbed(foreign[m]):>8}/{len(walls[m])}")
    print()
    for m in ("split/1", "grpc/1"):
        w = where(m)
        print(f"{m}: per step client {w['client'] * 1e3:.2f} ms, server {w['server'] * 1e3:.2f} ms, "
              f"rest (encode/decode, transport) {w['rest'] * 1e3:.2f} ms")
    for mode, b in byts.items():
        print(f"bytes per decoded token ({mode}): up {b['up_payload']:.1f} payload + {b['up_header']:.1f} header, "
              f"down {b['down_payload']:.1f} payload + {b['down_header']:.1f} header  "
              f"(one hidden vector = {hidden * wire_bytes} B)")
    print()
    unreliable = any(disturbed(foreign[m]) > len(walls[m]) / 4 for m in modes)
    print(verdict(f"split in process / unsplit per token (batch {args.batch_size}) = {r_split:.3f} (<= {TARGET_SPLIT})",
                  r_split <= TARGET_SPLIT, unreliable))
    print(verdict(f"gRPC loopback / split in process per token (1 sequence) = {r_grpc:.3f} (<= {TARGET_GRPC})",
                  r_grpc <= TARGET_GRPC, unreliable))
    exact = (byts["standard"]["up_payload"] == hidden * wire_bytes and byts["standard"]["down_payload"] == 8
             and byts["label_private"]["up_payload"] == hidden * wire_bytes
             and byts["label_private"]["down_payload"] == hidden * wire_bytes)
    print(verdict("payload per decoded token: one hidden vector up, one token id (label-private: one hidden vector) "
                  "down", exact))
    if args.json:
        out = {"model": args.model, "client_layers": k, "hidden": hidden, "threads": torch.get_num_threads(),
               "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "wire_dtype": args.wire_dtype,
               "steps": steps, "wall_s": walls, "foreign_cores": foreign, "s_per_token": per_tok,
               "ratio_split_over_unsplit": r_split, "ratio_grpc_over_split": r_grpc,
               "where": {m: where(m) for m in ("split/1", "grpc/1")}, "bytes_per_decoded_token": byts,
               "tokens_identical": {"batch": same_batch, "one": same_one}, "payload_exact": exact,
               "unreliable": unreliable}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
