"""LoRA adapters on model parts (peft underneath) and export as one peft adapter for the whole model.

A part's adapter tensors are named relative to the part, e.g.
``layers.2.mlp.gate_proj.lora_A.weight`` with the part's *local* layer index; :func:`export_adapter`
renumbers them to the full model's layers so ``PeftModel.from_pretrained(base, out/adapter)`` works.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from lesft.config import LoraArgs  # defined there: torch-free, for --help

ADAPTER = "default"


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


def _local_layer(key: str) -> tuple[int, str]:
    """``layers.{i}.rest`` (a part's adapter key) -> ``(i, rest)``."""
    m = re.match(r"layers\.(\d+)\.(.+)$", key)
    if m is None:
        raise ValueError(f"adapter tensor {key!r} is not inside a decoder layer")
    return int(m.group(1)), m.group(2)


def full_model_keys(state: dict[str, torch.Tensor], first_layer: int, layers_path: str) -> dict[str, torch.Tensor]:
    """``layers.{i}.rest`` of a part -> ``base_model.model.{layers_path}.{first_layer+i}.rest`` (peft's file keys)."""
    out = {}
    for k, v in state.items():
        i, rest = _local_layer(k)
        out[f"base_model.model.{layers_path}.{first_layer + i}.{rest}"] = v
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
    # only the layers that hold tensors (splitfrozen: the server's), so that peft wraps no other layer
    # and does not warn of "missing adapter keys" for layers that were never adapted
    config.layers_to_transform = sorted({first + _local_layer(k)[0] for state, first in parts for k in state})
    config.save_pretrained(str(out))
    return out


def _refuse_existing(out: Path, marker: str, overwrite: bool, what: str) -> None:
    if (out / marker).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds {what} ({marker}): choose another --out, or pass --overwrite "
                              "to replace it")


def join_adapters(dirs: list[str | Path], out_dir: str | Path, overwrite: bool = False) -> Path:
    """One peft adapter from several that cover disjoint layers of the same model (a networked run's
    client part, ``CLIENT_RUN/adapter``, and server part, ``SERVER_OUT/adapter``). This joins parts; it
    is not peft's ``merge_and_unload`` (that is :func:`export_merged`). An adapter already in ``out_dir``
    is refused unless ``overwrite``."""
    if len(dirs) < 2:
        raise ValueError("join needs at least two adapter directories (the client part and the server part)")
    out = Path(out_dir)
    _refuse_existing(out, "adapter_config.json", overwrite, "an adapter")
    tensors: dict[str, torch.Tensor] = {}
    for d in map(Path, dirs):
        f = d / "adapter_model.safetensors"
        if not f.is_file() or not (d / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{d} is not an adapter directory (adapter_model.safetensors + adapter_config.json)")
        if d.resolve() == out.resolve():
            raise ValueError(f"--out {out} is one of the inputs: choose another directory")
        part = load_file(str(f))
        clash = sorted(set(part) & set(tensors))
        if clash:
            raise ValueError(f"{d} overlaps the other adapters in {clash[:2]}: not parts of one split model")
        tensors.update(part)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    configs = [json.loads((Path(d) / "adapter_config.json").read_text()) for d in dirs]
    layers = [c.get("layers_to_transform") for c in configs]
    # the union of the parts' layers; None (every layer) if any part predates the field
    configs[0]["layers_to_transform"] = None if None in layers else sorted({i for part in layers for i in part})
    (out / "adapter_config.json").write_text(json.dumps(configs[0], indent=2))
    return out


def export_merged(out_dir: str | Path, run_dir: str | None = None, model: str | None = None,
                  adapter: str | None = None, overwrite: bool = False) -> Path:
    """A full model with the adapter merged in (peft's ``merge_and_unload``), written with
    ``save_pretrained`` together with its tokenizer: ``AutoModelForCausalLM.from_pretrained(out_dir)``
    loads it with plain transformers. ``run_dir`` gives the defaults: its ``model`` and ``RUN/adapter``."""
    from lesft.typed import load_yaml
    from lesft.model.load import load_for_eval

    out = Path(out_dir)
    _refuse_existing(out, "config.json", overwrite, "a model")
    if run_dir is not None:
        rd = Path(run_dir)
        if not (rd / "config.yaml").is_file():
            raise FileNotFoundError(f"{rd} is not a training run directory (no config.yaml); pass --model and --adapter")
        model = model or load_yaml(rd / "config.yaml").get("model")
        adapter = adapter or str(rd / "adapter")
    if not model or not adapter:
        raise ValueError("export needs --run RUN_DIR, or both --model and --adapter")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a peft adapter directory (no adapter_config.json); has the run "
                                "finished?")
    merged, tokenizer = load_for_eval(model, adapter)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def check_target_modules(model: nn.Module, layers_path: str, args: LoraArgs) -> None:
    """Refuse ``target_modules`` entries that match no linear module of the decoder layers (peft would
    inject nothing for them, silently), naming the modules that do exist."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(layers_path + ".")]
    unmatched = [t for t in args.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        have = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"lora.target_modules {unmatched} match no linear module of this model's decoder layers; "
                         f"its linear modules are {have}: set e.g. --lora.target_modules {' '.join(have[:3])}")



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


merge_adapters = join_adapters  # the name before `lesft merge` became `lesft join`
