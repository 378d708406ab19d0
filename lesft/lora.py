"""LoRA adapters on model parts (peft underneath) and export as one peft adapter for the whole model.

A part's adapter tensors are named relative to the part, e.g.
``layers.2.mlp.gate_proj.lora_A.weight`` with the part's *local* layer index; :func:`export_adapter`
renumbers them to the full model's layers so ``PeftModel.from_pretrained(base, out/adapter)`` works.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER = "default"


@dataclass
class LoraArgs:
    """LoRA adapters, the same on the client and the server side (peft's LoraConfig underneath)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha / r."})
    dropout: float = field(default=0.2, metadata={"help": "Dropout on the LoRA input during training."})
    target_modules: list[str] = field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Names of the linear modules that get adapters (matched by suffix, as in peft)."},
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )


def add_lora(part: nn.Module, args: LoraArgs) -> nn.Module:
    """Inject adapters into ``part`` in place; only adapter weights stay trainable."""
    if not any(isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in args.target_modules
               for name, m in part.named_modules()):
        return part  # e.g. a server part with no layers: nothing to adapt
    inject_adapter_in_model(args.peft_config(), part, adapter_name=ADAPTER)
    for name, p in part.named_parameters():
        p.requires_grad_("lora_" in name)
    return part


def lora_key(name: str) -> str:
    """A parameter name without the adapter name (``...lora_A.default.weight`` -> ``...lora_A.weight``)."""
    return name.replace(f".{ADAPTER}.", ".")


def lora_state(part: nn.Module) -> dict[str, torch.Tensor]:
    """The part's adapter tensors (detached copies), keyed without the adapter name."""
    return {lora_key(n): p.detach().clone() for n, p in part.named_parameters() if "lora_" in n}


@torch.no_grad()
def load_lora_state(part: nn.Module, state: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Copy ``state`` into the part's adapter tensors in place (optimizer state stays attached). With
    ``partial``, ``state`` may hold a subset (the tensors an aggregation strategy shares)."""
    params = {lora_key(n): p for n, p in part.named_parameters() if "lora_" in n}
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if unexpected or (missing and not partial) or not state:
        raise ValueError(f"adapter keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    for k, v in state.items():
        params[k].copy_(v.to(params[k].dtype))


def full_model_keys(state: dict[str, torch.Tensor], first_layer: int, layers_path: str) -> dict[str, torch.Tensor]:
    """``layers.{i}.rest`` of a part -> ``base_model.model.{layers_path}.{first_layer+i}.rest`` (peft's file keys)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.(.+)$", k)
        if m is None:
            raise ValueError(f"adapter tensor {k!r} is not inside a decoder layer")
        out[f"base_model.model.{layers_path}.{first_layer + int(m.group(1))}.{m.group(2)}"] = v
    return out


def export_adapter(
    parts: list[tuple[dict[str, torch.Tensor], int]],
    layers_path: str,
    args: LoraArgs,
    out_dir: str | Path,
    base_model: str,
) -> Path:
    """Write ONE peft adapter directory for the unsplit model from ``(part_state, first_layer)`` pairs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for state, first in parts:
        tensors.update(full_model_keys(state, first, layers_path))
    save_file({k: v.contiguous().float().cpu() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = args.peft_config()
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))
    return out


def merge_adapters(dirs: list[str | Path], out_dir: str | Path) -> Path:
    """One peft adapter from several that cover disjoint layers of the same model (a networked run's
    client part, ``CLIENT_RUN/adapter``, and server part, ``SERVER_OUT/adapter``)."""
    if len(dirs) < 2:
        raise ValueError("merge needs at least two adapter directories")
    tensors: dict[str, torch.Tensor] = {}
    for d in map(Path, dirs):
        f = d / "adapter_model.safetensors"
        if not f.is_file() or not (d / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{d} is not an adapter directory (adapter_model.safetensors + adapter_config.json)")
        part = load_file(str(f))
        clash = sorted(set(part) & set(tensors))
        if clash:
            raise ValueError(f"{d} overlaps the other adapters in {clash[:2]}: not parts of one split model")
        tensors.update(part)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    shutil.copy(Path(dirs[0]) / "adapter_config.json", out / "adapter_config.json")
    return out


def adapter_args(adapter_dir: str | Path) -> tuple[LoraArgs, dict[str, torch.Tensor]]:
    """The :class:`LoraArgs` and tensors (peft's file keys) of a peft adapter directory."""
    d = Path(adapter_dir)
    f, c = d / "adapter_model.safetensors", d / "adapter_config.json"
    if not f.is_file() or not c.is_file():
        raise FileNotFoundError(f"{d} is not an adapter directory (adapter_model.safetensors + adapter_config.json)")
    conf = json.loads(c.read_text())
    args = LoraArgs(r=int(conf["r"]), alpha=int(conf["lora_alpha"]), dropout=0.0,
                    target_modules=sorted(conf["target_modules"]))
    return args, load_file(str(f))


def part_state(tensors: dict[str, torch.Tensor], first_layer: int, n_layers: int, layers_path: str
               ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`full_model_keys` for one part: the tensors of layers ``[first, first + n)``, keyed
    ``layers.{local index}.rest``; tensors of other layers are left out (a side reads only its own)."""
    out = {}
    pattern = re.compile(rf"base_model\.model\.{re.escape(layers_path)}\.(\d+)\.(.+)$")
    for k, v in tensors.items():
        m = pattern.match(k)
        if m is not None and first_layer <= int(m.group(1)) < first_layer + n_layers:
            out[f"layers.{int(m.group(1)) - first_layer}.{m.group(2)}"] = v
    return out


@torch.no_grad()
def merge_lora(part: nn.Module, state: dict[str, torch.Tensor], args: LoraArgs) -> nn.Module:
    """Fold ``state`` (``lora_state`` keys) into ``part``'s weights, in place, as peft's ``merge_and_unload``
    does (the same merge, so the same weights): adapters are injected, loaded, merged and removed again.
    Nothing to merge (an empty state) leaves the part as it is."""
    if not state:
        return part
    add_lora(part, args)
    load_lora_state(part, state)
    from peft.tuners.lora import LoraLayer

    for name, m in list(part.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(part.get_submodule(parent) if parent else part, leaf, m.get_base_layer())
    for p in part.parameters():
        p.requires_grad_(False)
    return part
