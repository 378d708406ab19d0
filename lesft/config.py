"""Typed configuration: small dataclasses with help text on every field, loaded from YAML and
overridden from the command line (``--rounds 8 --lora.r 16 --lesft.p_sal 0.9``).

Nested dataclasses map to dotted flags; ``None`` on a method switch means "take it from the
method preset" (see :mod:`lesft.methods`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from lesft.data.synthetic import ArithmeticSpec
from lesft.evaluate import EvalConfig
from lesft.loss import LossConfig
from lesft.lora import LoraArgs


def _help(text: str, aliases: tuple[str, ...] = (), **kw: Any) -> Any:
    return field(metadata={"help": text, "aliases": aliases}, **kw)


@dataclass
class TrainConfig:
    """Everything ``lesft train`` needs. Switches left at ``None`` come from the method preset."""

    method: str = _help(
        "Method preset: centralized, fedavg, sl, splitlora, splitfrozen or lesft.", default="lesft"
    )
    model: str = _help(
        "Model: alias 'smollm2-135m', a Hugging Face hub id, a local model directory or a .gguf file.",
        default="smollm2-135m",
    )
    data: str = _help(
        "Training data (alias --dataset): a benchmark (synthetic, gsm8k, commonsenseqa, aqua_rat: its train "
        "split) or a JSONL file of {prompt, target, reference} rows.",
        default="synthetic", aliases=("dataset",),
    )
    data_dir: str | None = _help(
        "Folder with the benchmarks' official files (gsm8k/, commonsenseqa/, aqua/); default $LESFT_DATA_DIR, "
        "then ../shared/data, then the Hugging Face hub.", default=None
    )
    target: str = _help(
        "Target source for benchmarks: 'dataset' (its own rationale) or 'teacher:FILE' (JSONL of {id, completion}).",
        default="dataset",
    )
    rationale: str | None = _help(
        "CommonsenseQA rationale source for targets and references: ecqa (default), palm, cose or none.", default=None
    )
    samples: int = _help(
        "Training rows in total across clients, a seeded sample (0 = every row). For 'synthetic', the number generated.",
        default=256,
    )
    partition: str = _help(
        "How rows are split across clients: 'iid' (seeded, near-equal) or 'dirichlet:ALPHA' (non-IID over answer "
        "labels, or prompt-length quartiles for numeric tasks; smaller ALPHA = more skew).", default="iid"
    )
    per_client: int = _help(
        "Rows per client, disjoint (the paper's 10..50 sample-size study); 0 = split all rows by --partition.",
        default=0,
    )
    clients: int = _help("Number of clients (edge devices). Ignored by 'centralized' (one party).", default=4)
    clients_per_round: int = _help(
        "Clients sampled per round (FedAvg's C x N; seeded by --seed and the round, so resumable); 0 = all. "
        "Aggregation averages the clients that trained since the last one. Rounds from --epochs grow by "
        "clients / clients_per_round, so that an epoch is still one pass over each client's data in expectation.",
        default=0,
    )
    share_base: bool = _help(
        "Simulation: all clients share one copy of the frozen base weights and own only their LoRA, optimizer "
        "state and data (false: a deep copy per client; the same numbers at N times the memory).", default=True
    )
    client_layers: str = _help(
        "Decoder layers kept on the client: a count ('7') or a fraction of all layers ('1/4').", default="1/4"
    )
    rounds: int = _help("Training rounds (one optimizer step per party each). 0 = derive from --epochs.", default=0)
    epochs: float = _help(
        "Passes over the largest client's data; used when --rounds is 0.", default=1.0
    )
    lr: float = _help("AdamW learning rate, the same for client and server adapters.", default=5e-5)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    batch_size: int = _help("Samples per client per micro-batch.", default=1)
    grad_accum: int = _help("Micro-batches per client accumulated into one round (one optimizer step).", default=4)
    max_length: int = _help(
        "Longest token sequence per path; longer prompts are cut from the left, then targets from the right.",
        default=320,
    )
    pad_to_multiple: int = _help(
        "Pad every batch to a multiple of this many tokens (fewer distinct shapes; matters for bf16 on CPU).",
        default=32,
    )
    chat_template: bool = _help("Wrap prompts in the tokenizer's chat template when it has one.", default=True)
    # --- method switches (None: from the preset) ---
    split: bool | None = _help("Split the model between clients and a server (False: every party holds it whole).", default=None)
    client_trainable: bool | None = _help("Clients train LoRA on their layers (False: frozen, forward only).", default=None)
    aggregate_every: int | None = _help(
        "Aggregate client adapters every I rounds, weighted by |D_i| (0 = never).", default=None
    )
    aggregation: str = _help(
        "How client adapters are combined: fedavg (every tensor averaged), ffa (FFA-LoRA: A frozen at its "
        "initialisation, B averaged), fedsa (FedSA-LoRA: A averaged, B kept per client, one adapter exported "
        "per client) or a name registered with lesft.strategies.register_strategy.", default="fedavg"
    )
    paths: str | None = _help(
        "Inputs used: 'base' (x), 'dual' (x and the forward-only reference x~ = x + solution) or 'reference' (train on x~).",
        default=None,
    )
    loss: str | None = _help(
        "Loss: 'ce' (token-mean cross-entropy), 'lesft' (token-weighted, needs paths=dual) or a name registered "
        "with lesft.objectives.register_objective.", default=None)
    label_privacy: bool = _help(
        "U-shaped split: the client also holds the final norm and LM head and computes the loss, so the "
        "server receives hidden states only, never target ids (two exchanges per micro-step).", default=False
    )
    # --- system ---
    wire_dtype: str = _help("dtype of activations and gradients on the wire: fp32, bf16 or fp16.", default="fp32")
    dtype: str = _help(
        "Compute precision: fp32, or bf16 (autocast; on CPU the weights stay fp32).", default="fp32"
    )
    device: str = _help("cpu, cuda or auto.", default="auto")
    seed: int = _help("Seed of the LoRA init, dropout and the order in which each client reads its rows.", default=0)
    data_seed: int | None = _help(
        "Seed of the training sample (synthetic: the generated rows) and of its partition across clients; "
        "unset = --seed. Vary --seed alone for new inits on the same rows, --data_seed alone for new rows.",
        default=None,
    )
    out: str = _help("Run directory: config.yaml, metrics.jsonl, summary.json, adapter/.", default="runs/lesft")
    progress: bool = _help("Show a progress bar.", default=True)
    checkpoint_every: int = _help(
        "Write a checkpoint (adapters, optimizer and RNG states, data position, meters) every K rounds "
        "and after the last one (0 = only after the last).", default=10
    )
    resume: bool = _help(
        "Continue the run in --out from its last checkpoint (a finished run is not retrained).", default=False
    )
    overwrite: bool = _help("Start afresh even if --out already holds a run (its files are replaced).", default=False)
    eval: bool = _help(
        "After training, evaluate the exported adapter (settings: --evaluation.*) and put accuracy into "
        "summary.json.", default=False
    )
    # --- nested groups ---
    lora: LoraArgs = _help("LoRA settings.", default_factory=LoraArgs)
    lesft: LossConfig = _help("LESFT loss settings.", default_factory=LossConfig)
    synthetic: ArithmeticSpec = _help("Difficulty of the built-in synthetic data.", default_factory=ArithmeticSpec)
    evaluation: EvalConfig = _help("Evaluation after training (with --eval).", default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("clients", "batch_size", "grad_accum", "max_length", "pad_to_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0 or self.epochs <= 0 and self.rounds == 0:
            raise ValueError(f"need rounds >= 1 or epochs > 0 (got rounds={self.rounds}, epochs={self.epochs})")
        if self.partition != "iid":
            kind, _, alpha = self.partition.partition(":")
            try:
                ok = kind == "dirichlet" and float(alpha) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"partition must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0, got {self.partition!r}")
        if not 0 <= self.clients_per_round <= self.clients:
            raise ValueError(f"clients_per_round must be in [0, clients={self.clients}] (0 = all), "
                             f"got {self.clients_per_round}")
        if self.per_client < 0:
            raise ValueError(f"per_client must be >= 0, got {self.per_client}")
        if self.wire_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"wire_dtype must be fp32, bf16 or fp16, got {self.wire_dtype!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.data_seed is None:
            self.data_seed = self.seed  # recorded resolved in config.yaml


# ---------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass tree as plain YAML/JSON-able values."""
    out = dataclasses.asdict(cfg)
    return _plain(out)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for hints like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict; unknown keys are an error naming them."""
    hints = _field_types(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(where + k for k in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        tp, _ = _base_type(hints[name])
        if is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where}{name}.")
        elif isinstance(value, list) and typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config file must hold a mapping of field: value")
    return data


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- command line


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One ``--flag`` per field (``--lora.r`` for nested ones), help text from the field metadata.

    Every flag defaults to argparse.SUPPRESS so that only what the user typed overrides YAML.
    """
    hints = _field_types(cls)
    for f in fields(cls):
        tp, optional = _base_type(hints[f.name])
        name = f"{prefix}{f.name}"
        if is_dataclass(tp):
            add_dataclass_args(parser, tp, prefix=f"{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags += [f"--{a}" for a in f.metadata.get("aliases", ())]
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:  # "--eval" alone means true; "--eval false" is accepted too
            kw.update(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
        elif origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kw.update(type=inner, nargs="+")
        else:
            kw.update(type=tp)
        parser.add_argument(*flags, **kw)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``lora.r``) of a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
