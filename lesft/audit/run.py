"""``lesft audit``: what a curious split server reconstructs, per split point and defence.

For each split point k the audit builds the real parties of a run (``train.Run``, the same ``Client``
code as training), optionally fine-tunes them for ``train_rounds`` rounds, then records every
``Activations`` message the server receives while each client sends all its rows once. The attacker
fits its attacks on public text with the public base weights only, then attacks the recorded view; the
client's truth is read only by the scorer. At the defence split point it also attacks the view under
Gaussian noise of each ``noise`` sigma (the ``cut_noise`` defence, applied to the recorded clean
activations with a fixed seed, so every sigma sees the same noise direction) and the label-private view.

Writes ``OUT/audit.json`` (config, every result, timings), ``OUT/audit.md`` (tables) and
``OUT/recovery_vs_k.png``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lesft import methods
from lesft.audit.attacks import (GradientLabels, LinearInverter, NearestState, base_states, label_attack,
                                 public_sequences)
from lesft.audit.score import score
from lesft.audit.view import Received, Recorder, Truth, capture, record_training
from lesft.config import TrainConfig
from lesft.typed import to_dict
from lesft.data.rows import load_rows
from lesft.messages import PathBatch, WireFormat
from lesft.meters import MB
from lesft.model.load import load_model
from lesft.model.split import client_head, inspect_decoder, resolve_client_layers, split_model
from lesft.roles import noised
from lesft.train import Run


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _victim_run() -> TrainConfig:
    return TrainConfig(method="lesft", clients=2, samples=32, batch_size=1, grad_accum=1, pad_to_multiple=1,
                       lr=1e-3, device="cpu", progress=False)


@dataclass
class AuditConfig:
    """Everything ``lesft audit`` needs."""

    run: TrainConfig = _help(
        "The audited run (--run.method, --run.samples = the clients' private rows in all, --run.data, "
        "--run.data_seed, --run.clients, --run.lr, ...); its client_layers, label_privacy and cut_noise are "
        "set by the sweep below. batch_size must stay 1.", default_factory=_victim_run)
    client_layers: tuple[str, ...] = _help(
        "Split points to audit: counts or fractions of the layers (k = floor(L * f)).",
        default=("1", "1/5", "1/4", "1/3", "1/2"))
    defence_layers: str = _help("Split point of the defence sweep (noise, label-private mode).", default="1/4")
    noise: tuple[float, ...] = _help(
        "cut_noise sigmas (relative to each token's RMS) attacked at defence_layers; 0 = no noise.",
        default=(0.0, 0.1, 0.3, 1.0, 3.0, 10.0))
    label_private: bool = _help("Also audit the label-private (U-shaped) view at defence_layers.", default=True)
    train_rounds: tuple[int, ...] = _help(
        "Fine-tuning checkpoints audited at defence_layers: the view is recorded after each of these many "
        "rounds of training the clients (and server) on their own rows (0 = the untuned base model: the "
        "zero-initialised LoRA leaves the activations unchanged). Other split points are audited untuned.",
        default=(0,))
    cost_rounds: int = _help(
        "Training rounds run at defence_layers per defence (none, label-private, the largest noise sigma) to "
        "measure its bytes per direction and client/server seconds (0 = skip).", default=1)
    public: str = _help(
        "The attacker's public text: 'synthetic:SEED' (generated problems of another seed), 'docs' (this "
        "checkout's README.md and docs/*.md) or a text file / folder of .md/.txt files, read in place.",
        default="synthetic:1000")
    public_tokens: int = _help("Public tokens the attacker computes states for (its training set).", default=8192)
    ridge: float = _help("Ridge penalty of the linear inverter (attack c), on standardised states.", default=1.0)
    attack_seed: int = _help("Seed of the noise drawn for the noise sweep.", default=0)
    out: str = _help("Output directory: audit.json, audit.md, recovery_vs_k.png.", default="runs/audit")

    def __post_init__(self) -> None:
        if self.run.batch_size != 1:
            raise ValueError("the audit records one row per message: run.batch_size must be 1")
        if any(r < 0 for r in self.train_rounds) or self.cost_rounds < 0:
            raise ValueError("train_rounds and cost_rounds must be >= 0")
        if any(s < 0 for s in self.noise):
            raise ValueError(f"noise sigmas must be >= 0, got {self.noise}")


def audit_config(data: dict[str, Any], overrides: dict[str, Any]) -> AuditConfig:
    """Defaults <- ``data`` (a YAML mapping, nested) <- ``overrides`` (dotted keys), so that a partial
    ``run:`` group keeps the audit's own run defaults."""
    from lesft.typed import apply_overrides, from_dict

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    return from_dict(AuditConfig, apply_overrides(merge(to_dict(AuditConfig()), data), overrides))


def _timed(label: str, fn, timings: dict[str, float]):
    t0 = time.perf_counter()
    out = fn()
    timings[label] = time.perf_counter() - t0
    print(f"  {label}: {timings[label]:.1f} s", flush=True)
    return out


def victim_run(cfg: TrainConfig, model, tokenizer, rows: list[dict[str, str]]) -> Run:
    """The audited run's parties, on a copy of ``model``, every message through a :class:`Recorder`."""
    return Run(methods.resolve(cfg), copy.deepcopy(model), tokenizer, rows, transport=Recorder(WireFormat.of(cfg)))


def server_view(cfg: TrainConfig, model, tokenizer, rows: list[dict[str, str]]
                ) -> tuple[list[Received], list[Truth], Run]:
    """The untuned run's view of every row (see :func:`lesft.audit.view.capture`)."""
    run = victim_run(cfg, model, tokenizer, rows)
    return (*capture(run), run)


def defence_costs(cfg: TrainConfig, model, tokenizer, rows: list[dict[str, str]], rounds: int
                  ) -> tuple[dict[str, Any], list[Received], list[Truth]]:
    """Bytes per direction (all messages) and client / server busy seconds of ``rounds`` training rounds,
    and what the server received during them."""
    run = victim_run(cfg, model, tokenizer, rows)
    t0 = time.perf_counter()
    views, truths = record_training(run, rounds)
    s = run.system_summary()
    return ({"rounds": rounds, "samples": rounds * cfg.grad_accum * cfg.batch_size * len(run.clients),
             "comm_bytes": s["comm_bytes"], "latency_s": s["latency_s"], "wall_s": time.perf_counter() - t0},
            views, truths)


def with_noise(views: list[Received], sigma: float, seed: int) -> list[Received]:
    """The view as the client would have sent it with ``cut_noise = sigma`` (:func:`lesft.roles.noised`, the
    client's own function), drawn from one seeded generator in row order."""
    if sigma == 0:
        return views
    g = torch.Generator().manual_seed(seed)
    return [replace(v, hidden=noised(PathBatch(v.hidden[None]), sigma, g).hidden[0]) for v in views]


def _moved(before: list[Received], after: list[Received]) -> float:
    """RMS of the change of the sent states over the RMS of the states before (0 when untouched)."""
    num = sum(float((a.hidden - b.hidden).pow(2).sum()) for a, b in zip(after, before))
    den = sum(float(b.hidden.pow(2).sum()) for b in before)
    return (num / den) ** 0.5 if den else 0.0


def attack(views: list[Received], truths: list[Truth], inverters: dict[str, Any]) -> dict[str, Any]:
    """Every attack on ``views``, scored against ``truths``, with its time in seconds."""
    paths = [v.path for v in views]
    out: dict[str, Any] = {}
    for name, fn in [("labels", label_attack), *inverters.items()]:
        t0 = time.perf_counter()
        guesses = fn(views)
        seconds = time.perf_counter() - t0
        out[name] = {"seconds": seconds, **score(guesses, truths, paths)}
        if name == "labels":
            out[name]["label_tensor"] = any(v.labels is not None for v in views)
        print(f"    attack {name}: {seconds:.1f} s, base target {out[name]['base:target']['accuracy']:.1%}, "
              f"private prompt {out[name]['base:private']['accuracy']:.1%}", flush=True)
    return out


def run_audit(cfg: AuditConfig, model=None, tokenizer=None) -> dict[str, Any]:
    """The sweep; returns (and writes) ``{config, layers, results: [{k, label_private, rounds, sigma,
    during_training, attacks}], defence_costs, client_weights_mb, timings_s, wall_s}``."""
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.run
    if model is None or tokenizer is None:
        model, tokenizer = _timed("load model", lambda: load_model(base.model, device="cpu"), timings)
    n_layers = len(inspect_decoder(model).layers)
    ks = sorted({resolve_client_layers(s, n_layers) for s in cfg.client_layers})
    k_def = resolve_client_layers(cfg.defence_layers, n_layers)
    rows = load_rows(base.data, base.samples, base.data_seed, base.synthetic, data_dir=base.data_dir,
                     target=base.target, rationale=base.rationale)
    attacker, _, layout = split_model(copy.deepcopy(model), max(ks + [k_def]))  # public base weights, no LoRA
    public = public_sequences(cfg.public, tokenizer, cfg.public_tokens, base.max_length, base.chat_template)
    states = _timed("attacker: public states", lambda: base_states(attacker, public, ks + [k_def]), timings)
    embedding = attacker.embed_tokens.weight.detach()
    results, costs, client_mb, by_k = [], {}, {}, {}
    for k in ks:
        inverters = by_k[k] = _timed(f"k={k} fit attacks b, c", lambda: {
            "nearest_state": NearestState(*states[k]),
            "linear_inverter": LinearInverter(*states[k], embedding, cfg.ridge)}, timings)
        for label_private in ([False, True] if k == k_def and cfg.label_private else [False]):
            run_cfg = replace(base, client_layers=str(k), label_privacy=label_private, cut_noise=0.0)
            run = victim_run(run_cfg, model, tokenizer, rows)
            client_mb[k] = sum(p.numel() * p.element_size() for p in run.clients[0].bottom.parameters()) / MB
            done, losses, untuned = 0, [], None
            for rounds in (sorted(cfg.train_rounds) if k == k_def and not label_private else [0]):
                tag = f"k={k} lp={label_private} rounds={rounds}"
                if rounds > done:
                    losses += _timed(f"{tag} fine-tune", lambda: [run.round(r)["loss"] for r in range(done, rounds)],
                                     timings)
                    done = rounds
                print(f"{tag}: recording the server's view", flush=True)
                views, truths = _timed(f"{tag} record view", lambda: capture(run), timings)
                untuned = untuned or views
                moved = _moved(untuned, views)  # the same rows in the same order: capture is seeded
                sigmas = cfg.noise if k == k_def and not label_private and rounds == min(cfg.train_rounds) else (0.0,)
                for sigma in sigmas:
                    print(f"  sigma={sigma}", flush=True)
                    t0 = time.perf_counter()
                    seen = with_noise(views, sigma, cfg.attack_seed)
                    results.append({"k": k, "label_private": label_private, "rounds": rounds, "sigma": sigma,
                                    "during_training": False, "train_loss": losses[:1] + losses[-1:],
                                    "moved": moved,
                                    "noise_s": time.perf_counter() - t0, "attacks": attack(seen, truths, inverters)})
    if cfg.cost_rounds:
        for name, kw in [("none", {}), ("label_private", {"label_privacy": True}),
                         (f"cut_noise={max(cfg.noise):g}", {"cut_noise": max(cfg.noise)})]:
            run_cfg = replace(base, client_layers=str(k_def), **{"label_privacy": False, "cut_noise": 0.0, **kw})
            costs[name], views, truths = _timed(
                f"cost of defence {name}", lambda: defence_costs(run_cfg, model, tokenizer, rows, cfg.cost_rounds),
                timings)
            if name == "label_private":  # the gradients it returns for the server's last-layer states
                print(f"k={k_def} label-private, during {cfg.cost_rounds} training round(s)", flush=True)
                attacks = {"gradient_labels": GradientLabels(client_head(layout)), **by_k.get(k_def, {})}
                results.append({"k": k_def, "label_private": True, "rounds": cfg.cost_rounds, "sigma": 0.0,
                                "during_training": True, "noise_s": 0.0, "attacks": attack(views, truths, attacks)})
    summary = {"config": to_dict(cfg), "layers": n_layers, "public_tokens": sum(len(s) for s in public),
               "victim_rows": len(rows), "results": results, "defence_costs": costs,
               "client_weights_mb": client_mb, "timings_s": timings,
               "wall_s": time.perf_counter() - t_all}
    (out / "audit.json").write_text(json.dumps(summary, indent=2))
    (out / "audit.md").write_text(markdown(summary))
    figure({cfg.public: summary}, out / "recovery_vs_k.png")
    print(f"audit done in {summary['wall_s']:.0f} s -> {out}/audit.md")
    return summary


ATTACKS = ("labels", "gradient_labels", "nearest_state", "linear_inverter")


def markdown(summary: dict[str, Any]) -> str:
    """One table row per (k, mode, sigma): token accuracy / ROUGE-L of each attack on target and private prompt."""
    cols = [("labels", "base:target"), ("gradient_labels", "base:target"), ("nearest_state", "base:target"),
            ("linear_inverter", "base:target"), ("nearest_state", "base:private"), ("linear_inverter", "base:private"),
            ("nearest_state", "base:prompt"), ("linear_inverter", "base:prompt")]
    head = ["k", "mode", "rounds", "σ"] + [f"{a} {kind.split(':')[1]}" for a, kind in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["results"]:
        mode = ("label-private" if r["label_private"] else "standard") + (", training" if r["during_training"] else "")
        cells = [str(r["k"]), mode, str(r["rounds"]), f"{r['sigma']:g}"]
        cells += [f"{100 * r['attacks'][a][kind]['accuracy']:.1f} % / {r['attacks'][a][kind]['rouge_l']:.2f}"
                  if a in r["attacks"] else "–" for a, kind in cols]
        lines.append("| " + " | ".join(cells) + " |")
    first = summary["results"][0]["attacks"]["labels"]
    n = {kind: first[f"base:{kind}"]["tokens"] for kind in ("target", "private", "prompt")}
    lines.append("")
    lines.append(f"Cells: token accuracy / mean ROUGE-L per row. {summary['victim_rows']} private rows "
                 f"({n['target']} target, {n['private']} private-prompt, {n['prompt']} prompt tokens); attacker "
                 f"fitted on {summary['public_tokens']} public tokens ({summary['config']['public']}).")
    if summary["defence_costs"]:
        lines += ["", "| defence (training rounds) | client->server MB | server->client MB | client s | server s |",
                  "|---|---|---|---|---|"]
        for name, c in summary["defence_costs"].items():
            b, t = c["comm_bytes"], c["latency_s"]
            lines.append(f"| {name} ({c['rounds']}) | {b['client_to_server'] / MB:.2f} | "
                         f"{b['server_to_client'] / MB:.2f} | {t['client']:.1f} | {t['server']:.1f} |")
    lines.append("")
    lines.append("| step | seconds |")
    lines.append("|---|---|")
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    attack_s = {a: sum(r["attacks"][a]["seconds"] for r in summary["results"] if a in r["attacks"]) for a in ATTACKS}
    lines += [f"| attack {a} (all cells) | {s:.1f} |" for a, s in attack_s.items()]
    lines.append(f"| whole audit | {summary['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


_SHORT = {"nearest_state": "(b) nearest state", "linear_inverter": "(c) linear inverter"}


def figure(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """Recovery (token accuracy) of the private prompt and of the target against k, standard split, untuned,
    no noise: one colour per attack and kind, one line style per summary (labelled by its key)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.8, 4.4), dpi=110)
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    layers = 0
    for (label, summary), style in zip(summaries.items(), styles * len(summaries)):
        layers = summary["layers"]
        pts = [r for r in summary["results"] if not r["label_private"] and r["sigma"] == 0 and r["rounds"] == 0
               and not r["during_training"]]
        ks = [r["k"] for r in pts]
        for i, (a, kind) in enumerate([(a, k) for a in ("nearest_state", "linear_inverter")
                                       for k in ("base:private", "base:target")]):
            ax.plot(ks, [100 * r["attacks"][a][kind]["accuracy"] for r in pts], style, color=f"C{i}", marker="o",
                    label=f"{_SHORT[a]} {kind.split(':')[1]}" + (f" · {label}" if len(summaries) > 1 else ""))
    ax.set_xlabel(f"client layers k (of {layers})")
    ax.set_ylabel("tokens recovered %")
    ax.set_ylim(0, 102)
    ax.set_title("What the split server reconstructs from the cut activations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, format="png")
