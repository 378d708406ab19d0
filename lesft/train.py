"""Algorithm 1 of the paper over roles and a transport; one loop for every method.

Per round (= one optimizer step for every party):
  for each of ``grad_accum`` micro-steps:
    split:   every client sends its cut activations (base, and reference for paths=dual); the server
             concatenates them, runs once, back-propagates, returns each client its slice of dL/dh
             (nothing for the reference path, nothing at all when clients are frozen); clients back-propagate.
    unsplit: every client runs the whole model and its loss locally.
  every party steps its optimizer; every ``aggregate_every`` rounds (and after the last round) the
  aggregator averages the client adapters weighted by |D_i| and broadcasts the average.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lesft import methods
from lesft.checkpoint import CKPT, find_checkpoint, load_checkpoint, open_checkpoint, save_checkpoint
from lesft.config import TrainConfig
from lesft.typed import flatten, load_yaml, normalised, save_yaml, to_dict
from lesft.data.partition import length_buckets, partition_dirichlet, partition_iid, per_client_sample
from lesft.data.rows import load_rows
from lesft.data.samples import build_sample
from lesft.interrupt import Interrupted, finish_round_on_sigint
from lesft.lora import add_lora, check_target_modules, export_adapter, lora_state
from lesft.messages import AdapterBroadcast, WireFormat
from lesft.meters import MB, module_bytes, peak_caveat, peak_rss_mb
from lesft.provenance import device_name, git_commit, versions
from lesft.model.load import load_model, peft_base, resolve_device
from lesft.exchange import LocalSplit, Resync, SplitLink
from lesft.data.contamination import TRAIN_KEYS_FILE, write_train_keys
from lesft.model.split import client_head, inspect_decoder, resolve_client_layers, split_model
from lesft.roles import Aggregator, Client, SplitServer, merge_losses
from lesft.objectives import get_objective
from lesft.strategies import get_strategy
from lesft.transport import Loopback, Transport


def split_clients(cfg: TrainConfig, rows: list[dict[str, str]]) -> list[list[int]]:
    """Row indices of each client: ``per_client`` rows each, or all rows split IID / Dirichlet non-IID
    (over answer labels when rows carry a letter answer, else over prompt-length quartiles)."""
    if cfg.per_client:
        return per_client_sample(len(rows), cfg.clients, cfg.per_client, cfg.data_seed)
    if cfg.partition == "iid":
        return partition_iid(len(rows), cfg.clients, cfg.data_seed)
    alpha = float(cfg.partition.split(":", 1)[1])
    answers = [r.get("answer", "") for r in rows]
    labels = answers if all(len(a) == 1 and a.isalpha() for a in answers) else length_buckets(rows)
    return partition_dirichlet(labels, cfg.clients, alpha, cfg.data_seed)


def num_rounds(cfg: TrainConfig, sizes: list[int]) -> int:
    """``cfg.rounds``, or enough rounds for ``epochs`` passes over the largest client's data (in expectation
    when only ``clients_per_round`` of the clients train each round)."""
    if cfg.rounds:
        return cfg.rounds
    share = cfg.clients_per_round / len(sizes) if 0 < cfg.clients_per_round < len(sizes) else 1.0
    return max(1, math.ceil(cfg.epochs * max(sizes) / (cfg.batch_size * cfg.grad_accum) / share))


def frozen_memo(*parts: torch.nn.Module | None) -> dict[int, torch.Tensor]:
    """A ``copy.deepcopy`` memo under which the frozen tensors of ``parts`` copy as themselves: the copies
    share the frozen base and own only what trains (LoRA)."""
    return {id(t): t for m in parts if m is not None
            for t in itertools.chain(m.parameters(), m.buffers()) if not t.requires_grad}


def build_parts(cfg: TrainConfig, model: PreTrainedModel):
    """Cut ``model`` for ``cfg`` and add the initial LoRA: (k, bottom, top, head, layers_path).

    Every party calls this with the same seed and gets the same initial adapters (the client's
    bottom LoRA is drawn first, then the server's), whether they run in one process or several.
    ``head`` is the client's final norm + LM head in label-private mode, else None."""
    layout = inspect_decoder(model)  # refuses unsupported models by name
    check_target_modules(model, layout.layers_path, cfg.lora)
    num_layers = len(layout.layers)
    k = resolve_client_layers(cfg.client_layers, num_layers) if cfg.split else num_layers
    torch.manual_seed(cfg.seed)
    bottom, top, layout = split_model(model, k, label_private=cfg.label_privacy)
    if cfg.client_trainable:
        add_lora(bottom, cfg.lora)  # one init, copied to every client (the global starting point)
    add_lora(top, cfg.lora)
    head = client_head(layout) if cfg.label_privacy else None
    return k, bottom, top, head, layout.layers_path


class Run:
    """The parties of one training run, built from a resolved config.

    In-process (default): every client, the split server and the aggregator. With ``link`` (a remote
    split server) and ``client_id``: one client holding all of ``rows``, talking to the server over
    ``link``; aggregation is then someone else's (Flower), and the server part here is discarded."""

    def __init__(self, cfg: TrainConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 rows: list[dict[str, str]], transport: Transport | None = None,
                 link: SplitLink | None = None, client_id: int | None = None) -> None:
        self.cfg = cfg = methods.resolve(cfg)  # a config with unset switches would otherwise run unsplit
        self.device = resolve_device(cfg.device)
        self.k, bottom, top, head, self.layers_path = build_parts(cfg, model)
        ref_rows = rows if cfg.reference == "solution" else [{**r, "reference": r["target"]} for r in rows]
        samples = [build_sample(tokenizer, r, cfg.paths, cfg.max_length, cfg.chat_template) for r in ref_rows]
        parts = split_clients(cfg, rows) if link is None else [list(range(len(rows)))]
        ids = range(len(parts)) if link is None else [client_id or 0]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        if link is not None and cfg.clients_per_round:
            raise ValueError("clients_per_round samples the clients of an in-process simulation; a networked "
                             "client trains every round (sample clients in the Flower ServerApp instead)")
        shared = frozen_memo(bottom, top, head) if cfg.share_base else {}

        def client(cid: int, idx: list[int]) -> Client:  # one deepcopy per client: a tied head stays tied
            b, t, h = copy.deepcopy((bottom, None if cfg.split else top, head), memo=dict(shared))
            return Client(cid, b.to(self.device), [samples[j] for j in idx], cfg, pad_id, self.device,
                          top=t.to(self.device) if t is not None else None,
                          head=h.to(self.device) if h is not None else None)

        self.clients = [client(cid, idx) for cid, idx in zip(ids, parts)]
        self.transport = transport or Loopback(WireFormat.of(cfg))
        self.server = SplitServer(top.to(self.device), cfg, self.device) if cfg.split and link is None else None
        self.link = link or (LocalSplit(self.server, self.transport, cfg.label_privacy) if self.server else None)
        self.aggregator = Aggregator(get_strategy(cfg.aggregation)) if cfg.aggregate_every and link is None else None
        self.rounds = num_rounds(cfg, [c.n_samples for c in self.clients])

    # ------------------------------------------------------------------ one round

    def sampled(self, r: int) -> list[Client]:
        """The clients that train in round ``r``: all, or ``clients_per_round`` of them drawn from
        ``(seed, r)`` alone (so a resumed run draws the same)."""
        m = self.cfg.clients_per_round
        if not m or m >= len(self.clients):
            return self.clients
        ids = sorted(random.Random(f"{self.cfg.seed}:clients:{r}").sample(range(len(self.clients)), m))
        return [self.clients[i] for i in ids]

    def round(self, r: int) -> dict[str, Any]:
        """Run round ``r`` (0-based); return its metrics line."""
        cfg = self.cfg
        active = self.sampled(r)
        client_parts: dict[int, list] = {c.cid: [] for c in active}
        for micro in range(cfg.grad_accum):
            step = r * cfg.grad_accum + micro
            if self.link is not None:
                for c, p in zip(active, self.link.micro_step(active, step)):
                    client_parts[c.cid].append(p)
            else:
                for c in active:
                    client_parts[c.cid].append(c.local_step())
        if self.link is not None:
            self.link.round_end()
        for c in active:
            c.step()
        aggregated = bool(self.aggregator and ((r + 1) % cfg.aggregate_every == 0 or r + 1 == self.rounds))
        if aggregated:  # the clients that trained since the last aggregation (rounds r0..r)
            r0 = r // cfg.aggregate_every * cfg.aggregate_every
            trained = {c.cid for q in range(r0, r + 1) for c in self.sampled(q)}
            self.aggregate([c for c in self.clients if c.cid in trained])
        objective = get_objective(cfg.loss)
        per_client = {cid: merge_losses(ps, objective) for cid, ps in client_parts.items()}
        loss, stats = merge_losses([p for ps in client_parts.values() for p in ps], objective)
        return {
            "round": r + 1,
            "loss": loss.item(),
            "loss_per_client": {str(cid): v[0].item() for cid, v in per_client.items()},
            "aggregated": aggregated,
            "comm_bytes": self.transport.meter.totals(),
            **({"clients": [c.cid for c in active]} if active is not self.clients else {}),
            **({"token_classes": stats} if stats else {}),
        }

    def mark(self) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """Where the data streams and the torch RNG are (taken at a round start, for :meth:`discard_partial_round`)."""
        return [(c.stream.epoch, c.stream.pos) for c in self.clients], torch.get_rng_state()

    def discard_partial_round(self, mark: tuple[list[tuple[int, int]], torch.Tensor] | None = None) -> None:
        """Forget the gradients of an unfinished round (networked: the server restarted or moved on) and,
        given a ``mark``, rewind the data streams and RNG to it, so the round's micro-batches are drawn again."""
        for c in self.clients:
            c.bottom.zero_grad(set_to_none=True)
            c._pending, c._labels, c._drawn = None, None, None
        if mark is None:
            return
        streams, rng = mark
        for c, (epoch, pos) in zip(self.clients, streams):
            if c.stream.epoch != epoch:
                c.stream.epoch = epoch
                c.stream._order = c.stream._shuffle()
            c.stream.pos = pos
        torch.set_rng_state(rng)

    def aggregate(self, trained: list[Client]) -> None:
        """FedAvg of the ``trained`` clients' adapters (weights |D_i|), broadcast to every client."""
        send = self.transport.send
        uploads = [send(c.upload(), "client_to_aggregator") for c in trained]
        avg = self.aggregator.aggregate(uploads)
        for c in self.clients:
            c.receive(send(avg, "aggregator_to_client"))

    # ------------------------------------------------------------------ results

    def system_summary(self) -> dict[str, Any]:
        """Measured bytes per direction, peak memory and busy time per side."""
        def client_bytes(c: Client) -> int:
            return module_bytes(c.bottom, c.optimizer) + (module_bytes(c.top) if c.top is not None else 0)

        s = self.server
        return {
            "comm_bytes": self.transport.meter.totals(),
            "comm_detail": self.transport.meter.to_dict(),
            "peak_memory_mb": {
                "client": max(client_bytes(c) + c.meter.peak_transient for c in self.clients) / MB,
                "server": (module_bytes(s.top, s.optimizer) + s.meter.peak_transient) / MB if s else None,
                "simulation": peak_rss_mb(),  # this whole process (every party, model loading included)
            },
            **({"peak_memory_caveat": peak_caveat()} if peak_caveat() else {}),
            "latency_s": {
                "client": sum(c.meter.seconds for c in self.clients) / len(self.clients),
                "server": s.meter.seconds if s else None,
            },
        }

    def export(self, out: Path, base_model: str) -> None:
        """``out/adapter``: the unsplit model's adapter as client 0 holds it (after the final aggregation,
        every client holds the same); without aggregation, or with a personalised strategy (fedsa), also
        ``out/client_adapters/client_i``."""
        def write(c: Client, path: Path) -> None:
            parts = []
            if self.cfg.client_trainable:
                parts.append((lora_state(c.bottom), 0))
            if self.server is not None:
                parts.append((lora_state(self.server.top), self.k))
            export_adapter(parts, self.layers_path, self.cfg.lora, path, base_model)

        write(self.clients[0], out / "adapter")
        personal = not self.aggregator or self.aggregator.strategy.personalised
        if personal and len(self.clients) > 1 and self.cfg.client_trainable:
            for c in self.clients:
                write(c, out / "client_adapters" / f"client_{c.cid}")


def train(
    cfg: TrainConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rows: list[dict[str, str]] | None = None,
    link: Any = None,
    client_id: int = 0,
    start_adapter: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train as configured; write config.yaml, metrics.jsonl, summary.json and adapter/ under ``cfg.out``.

    ``model``/``tokenizer``/``rows`` may be passed in (tests, notebooks); they are loaded from the config
    otherwise. A passed-in model is consumed: its modules become the parties' parts. With ``link`` (a
    ``lesft.deploy.remote.RemoteSplit``) this process is client ``client_id`` of a networked run holding all
    of ``rows``; the split server runs elsewhere and the adapter written is the client's part only.
    ``start_adapter`` (Flower): the aggregated client adapter to continue from, loaded after the checkpoint.
    """
    cfg = methods.resolve(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    resolve_device(cfg.device)  # checks first: a device torch cannot use, a clobbered run, evaluation settings
    previous = _check_out_dir(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    opened = open_checkpoint(out / CKPT) if previous is not None else None  # verified: (path, state, tensors)
    if opened is None:
        save_yaml(cfg, out / "config.yaml")
    if cfg.eval:
        from lesft.evaluate import prepare_eval

        prepare_eval(replace(cfg.evaluation, out=None), run_dir=str(out), need_adapter=False)
    if opened is not None and (done := _finished_summary(out, opened[1], cfg.rounds)) is not None:
        # finished before: nothing to retrain; evaluated again when asked with other settings
        return _evaluate(cfg, out, done) if cfg.eval and done.get("eval", {}).get("settings") != _eval_settings(cfg) \
            else done
    if rows is None:  # data first: a bad row is reported before a model is loaded
        rows = load_rows(cfg.data, cfg.samples, cfg.data_seed, cfg.synthetic, data_dir=cfg.data_dir, target=cfg.target,
                         rationale=cfg.rationale)
    write_train_keys(rows, out / TRAIN_KEYS_FILE)  # hashes only: lets a study prove no test problem was trained on
    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model, device="cpu")
    transport = None
    if link is not None:
        transport = Loopback(WireFormat.of(cfg))
        transport.meter = link.meter
    run = Run(cfg, model, tokenizer, rows, transport=transport, link=link, client_id=client_id)
    del model
    start, extra = load_checkpoint(run, opened) if opened is not None else (0, {})
    if start_adapter is not None:
        for c in run.clients:
            c.receive(AdapterBroadcast(0, start_adapter))
    trained = extra.get("rounds_trained", start)  # rounds this client took part in (all of them in process)
    skipped: list[dict[str, Any]] = list(extra.get("rounds_skipped", []))

    def skip(first: int, end: int, reason: str) -> None:  # rounds first+1..end (1-based) were not trained here
        if end > first:
            skipped.append({"from": first + 1, "to": end, "reason": reason})
            print(f"lesft: warning: client {client_id} skips rounds {first + 1}..{end}: {reason}", flush=True)

    resumed = start  # the checkpoint's rounds: a later line in metrics.jsonl is from a process that died after it
    if link is not None:  # a restarted or late client continues where the server is
        joined = link.join()
        skip(start, joined, "the server trained them while this client was away")
        start = max(start, joined)
    wall0 = extra.get("wall_s", 0.0)
    metrics_path = out / "metrics.jsonl"
    kept = [ln for ln in (metrics_path.read_text().splitlines() if previous and metrics_path.exists() else [])
            if json.loads(ln)["round"] <= resumed]
    metrics_path.write_text("".join(ln + "\n" for ln in kept))
    last: dict[str, Any] = json.loads(kept[-1]) if kept else {}
    bar = tqdm(range(start, run.rounds), desc=f"{cfg.method}", disable=not cfg.progress, unit="round",
               initial=start, total=run.rounds)
    board = _tensorboard(out)
    with metrics_path.open("a") as fh, finish_round_on_sigint() as stop:
        r = start
        while r < run.rounds:
            mark = run.mark()
            try:
                last = run.round(r)
            except Resync as e:  # networked: the server went on without us (or restarted): catch up
                run.discard_partial_round(mark)
                skip(r, min(e.round, run.rounds), "the server closed them without this client (it stalled past "
                     "the server's --timeout_s, its message came late, or the step failed on the server)")
                r = e.round
                bar.n = r
                continue
            trained += 1
            bar.update(1)
            last["elapsed_s"] = wall0 + time.perf_counter() - t0
            fh.write(json.dumps(last) + "\n")
            fh.flush()
            if board is not None:
                board.add_scalar("train/loss", last["loss"], r + 1)
                for direction, n in last["comm_bytes"].items():
                    board.add_scalar(f"comm_mb/{direction}", n / MB, r + 1)
            scheduled = cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0
            if r + 1 == run.rounds or scheduled or stop.requested:
                save_checkpoint(run, r + 1, out, {"wall_s": last["elapsed_s"], "rounds_trained": trained,
                                                  "rounds_skipped": skipped})
            up = last["comm_bytes"]["client_to_server"] + last["comm_bytes"]["client_to_aggregator"]
            bar.set_postfix(loss=f"{last['loss']:.4f}", up=f"{up / MB:.1f}MB")
            r += 1
            if stop.requested and r < run.rounds:
                bar.close()
                raise Interrupted(f"stopped after round {r} of {run.rounds}, checkpoint written to {out / 'checkpoint'}."
                                  f" Resume with: lesft train --config {out / 'config.yaml'} --resume")
    bar.close()
    if board is not None:
        board.close()
    run.export(out, peft_base(cfg.model))
    summary = {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.data,
        "clients": cfg.clients,
        "client_layers": run.k,
        "rounds": trained,  # rounds this client trained; the plan, and what it skipped and why, below
        "rounds_planned": run.rounds,
        "rounds_skipped": skipped,
        "samples_per_client": [c.n_samples for c in run.clients],
        "switches": {k: getattr(cfg, k) for k in methods.SWITCHES},
        "final_loss": last.get("loss"),
        **run.system_summary(),
        "wall_s": wall0 + time.perf_counter() - t0,
        "resumed_from_round": start if previous is not None else None,
        "versions": versions(),
        "git_commit": git_commit(),
        "device": device_name(run.device),
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "data_seed": cfg.data_seed,
    }
    del run  # free the parties before evaluation loads the merged model
    _write_summary(out, summary)  # before the evaluation: a failed one loses no training
    return _evaluate(cfg, out, summary) if cfg.eval else summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    tmp = out / "summary.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")


def _eval_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The ``--evaluation.*`` settings that change a result (not where it is written, not the progress bar)."""
    return {k: v for k, v in to_dict(cfg.evaluation).items() if k not in ("out", "progress")}


def _evaluate(cfg: TrainConfig, out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the run's exported adapter (``--evaluation.*``) and put the accuracy into summary.json."""
    from lesft.evaluate import run_eval

    result = run_eval(replace(cfg.evaluation, out=None), run_dir=str(out))
    summary = dict(summary, accuracy=result["accuracy"])
    summary["eval"] = {k: result[k] for k in ("dataset", "split", "mode", "n", "correct", "accuracy", "ci95")}
    summary["eval"]["settings"] = _eval_settings(cfg)
    _write_summary(out, summary)
    return summary


def _tensorboard(out: Path):
    """A TensorBoard writer on ``out/tensorboard`` when the ``tensorboard`` package is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))


def _finished_summary(out: Path, state: dict[str, Any], rounds: int = 0) -> dict[str, Any] | None:
    """The summary of a run whose last checkpoint (``state``) is its final round (``rounds``, or the
    summary's when 0), else None."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    planned = summary.get("rounds_planned", summary.get("rounds", float("inf")))
    return summary if state["rounds_done"] >= (rounds or planned) else None


# Fields that may differ between a run and its resumption.
# rounds: train a finished run further; eval, evaluation: evaluate a finished run (again) without retraining
_RESUME_FREE = {"resume", "overwrite", "progress", "rounds", "eval", "evaluation"}


def _check_out_dir(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; refuse to clobber a run by accident."""
    ckpt = find_checkpoint(out)
    holds_run = ckpt is not None or (out / "metrics.jsonl").exists()
    if cfg.overwrite or not holds_run:
        if cfg.overwrite:
            for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "adapter", "client_adapters", "tensorboard"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json"):
                (out / name).unlink(missing_ok=True)
        return None
    if not cfg.resume:
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace "
                              "it, or choose another --out")
    if ckpt is None:
        raise FileNotFoundError(f"{out} has metrics but no checkpoint to resume from; use --overwrite")
    # a field added since (top-level or in a group, e.g. synthetic.reference_style) takes its default
    saved = {**flatten(to_dict(TrainConfig())), **flatten(normalised(TrainConfig, load_yaml(out / "config.yaml")))}
    now = flatten(to_dict(cfg))
    diff = sorted(k for k in set(saved) | set(now)
                  if k.split(".")[0] not in _RESUME_FREE and saved.get(k) != now.get(k))
    if diff:
        raise ValueError(f"cannot resume {out}: config differs in {diff}; use another --out or --overwrite")
    return ckpt
