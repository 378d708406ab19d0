"""Checkpoints of a training run: safetensors for tensors, JSON for the rest, written atomically.

``DIR/checkpoint/`` holds ``tensors.safetensors`` (every party's adapter and AdamW moments, the torch
RNG state) and ``state.json`` (rounds done, data positions, optimizer hyper-parameters, byte meter,
time and memory meters). A new checkpoint is written to ``checkpoint.tmp/`` and swapped in with a
rename, so a run killed at any point keeps its previous checkpoint intact. Resuming reproduces the
uninterrupted run: same adapters, same bytes counted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lesft.lora import load_lora_state, lora_state

CKPT = "checkpoint"


def _optimizer_state(opt: torch.optim.Optimizer | None, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if opt is None:
        return None
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return {"param_groups": sd["param_groups"], "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def _load_optimizer(opt: torch.optim.Optimizer | None, meta: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    if opt is None or meta is None:
        return
    state = {int(i): {k: tensors[f"{prefix}.{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run, rounds_done: int, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the whole state of ``run`` (a :class:`lesft.train.Run`) after ``rounds_done`` rounds;
    ``extra`` (JSON) is stored alongside and returned by :func:`load_checkpoint`."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    clients = []
    for c in run.clients:
        p = f"client{c.cid}"
        tensors.update({f"{p}.lora.{k}": v for k, v in lora_state(c.bottom).items()})
        clients.append({
            "optimizer": _optimizer_state(c.optimizer, f"{p}.opt", tensors),
            "stream": [c.stream.epoch, c.stream.pos],
            "meter": c.meter.state(),
        })
    server = None
    if run.server is not None:
        s = run.server
        tensors.update({f"server.lora.{k}": v for k, v in lora_state(s.top).items()})
        server = {"optimizer": _optimizer_state(s.optimizer, "server.opt", tensors), "meter": s.meter.state()}
    state = {
        "rounds_done": rounds_done,
        "clients": clients,
        "server": server,
        "aggregator_rounds": run.aggregator.rounds if run.aggregator else 0,
        "bytes": run.transport.meter.to_dict(),
        "extra": extra or {},
    }
    tmp, final, old = out / f"{CKPT}.tmp", out / CKPT, out / f"{CKPT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: Path) -> Path | None:
    """The latest complete checkpoint (``checkpoint/``, or ``checkpoint.old/`` if killed mid-swap)."""
    for name in (CKPT, f"{CKPT}.old"):
        d = out / name
        if (d / "state.json").is_file() and (d / "tensors.safetensors").is_file():
            return d
    return None


def load_checkpoint(run, path: Path) -> tuple[int, dict[str, Any]]:
    """Restore ``run`` from ``path``; return (rounds already done, the ``extra`` saved with it)."""
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "tensors.safetensors"))
    if len(state["clients"]) != len(run.clients):
        raise ValueError(f"checkpoint {path} has {len(state['clients'])} clients, the run has {len(run.clients)}")

    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    for c, cs in zip(run.clients, state["clients"]):
        if c.trainable:
            load_lora_state(c.bottom, sub(f"client{c.cid}.lora."))
        _load_optimizer(c.optimizer, cs["optimizer"], f"client{c.cid}.opt", tensors)
        c.stream.epoch, c.stream.pos = cs["stream"]
        c.stream._order = c.stream._shuffle()
        c.meter.load(cs["meter"])
    if run.server is not None:
        load_lora_state(run.server.top, sub("server.lora."))
        _load_optimizer(run.server.optimizer, state["server"]["optimizer"], "server.opt", tensors)
        run.server.meter.load(state["server"]["meter"])
    if run.aggregator is not None:
        run.aggregator.rounds = state["aggregator_rounds"]
    run.transport.meter.load(state["bytes"])
    torch.set_rng_state(tensors["rng.torch"])
    return state["rounds_done"], state["extra"]
