"""Checkpoints of a training run: safetensors for tensors, JSON for the rest, written atomically.

``DIR/checkpoint/`` holds ``tensors.safetensors`` (every party's adapter and AdamW moments, the torch
RNG state) and ``state.json`` (rounds done, data positions, optimizer hyper-parameters, byte meter,
time and memory meters, and the SHA-256 and size of the tensor file). A new checkpoint is written to
``checkpoint.tmp/``, fsync-ed, and swapped in with renames; the one it replaces stays as
``checkpoint.old/``. Reading verifies the checksum: a damaged or truncated checkpoint is refused with
the file named, and :func:`open_checkpoint` falls back to ``.old`` (and says so). Resuming reproduces
the uninterrupted run: same adapters, same bytes counted. The split server's checkpoint
(``lesft.deploy.service``) is written and read by the same two functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from lesft.lora import load_lora_state, lora_state

CKPT = "checkpoint"


def optimizer_state(opt: torch.optim.Optimizer | None, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """An optimizer's state for a checkpoint: its tensors go into ``tensors`` under ``prefix``, the rest (param groups,
    which keys each parameter has) is returned as JSON. The simulation's and the split server's checkpoints use it."""
    if opt is None:
        return None
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return {"param_groups": sd["param_groups"], "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def load_optimizer(opt: torch.optim.Optimizer | None, meta: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`optimizer_state`."""
    if opt is None or meta is None:
        return
    state = {int(i): {k: tensors[f"{prefix}.{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


TENSORS, STATE = "tensors.safetensors", "state.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not match its recorded checksum."""


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(final: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``final/`` (tensors + JSON ``state`` with the tensor file's SHA-256 and size) atomically:
    into ``final.tmp/``, fsync-ed, then renamed into place; the checkpoint it replaces becomes
    ``final.old/``, the fallback of :func:`open_checkpoint`."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    _write(tmp / TENSORS, blob)
    files = {TENSORS: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}}
    _write(tmp / STATE, json.dumps({**state, "files": files}).encode())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state, tensors) of the checkpoint in ``path``, verified against the checksum in its state.json;
    raises :class:`CheckpointError` naming the file that is missing, truncated or altered."""
    try:
        state = json.loads((path / STATE).read_bytes())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / STATE} is missing, truncated or not JSON ({type(e).__name__})") from None
    try:
        blob = (path / TENSORS).read_bytes()
    except OSError:
        raise CheckpointError(f"{path / TENSORS} is missing or unreadable") from None
    want = state.get("files", {}).get(TENSORS)
    if want is not None and (len(blob) != want["bytes"] or hashlib.sha256(blob).hexdigest() != want["sha256"]):
        raise CheckpointError(f"{path / TENSORS} does not match the checksum in {path / STATE} "
                              f"({len(blob)} of {want['bytes']} bytes): the file is truncated or altered")
    try:
        tensors = load(blob)
    except Exception:  # noqa: BLE001 -- safetensors raises its own error types
        raise CheckpointError(f"{path / TENSORS} is not a readable safetensors file") from None
    return state, tensors


def open_checkpoint(final: Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """The newest good checkpoint of ``final/`` and ``final.old/``: (its path, state, tensors). A damaged
    ``final/`` with a good ``final.old/`` is reported on stdout and the older one used; with none good,
    :class:`CheckpointError` names every damaged file."""
    errors = []
    for d in (final, final.with_name(final.name + ".old")):
        if not (d / STATE).exists() and not (d / TENSORS).exists():
            continue
        try:
            state, tensors = read_checkpoint(d)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            print(f"lesft: warning: {errors[0]}; using the previous checkpoint {d}", flush=True)
        return d, state, tensors
    raise CheckpointError("; ".join(errors) or f"no checkpoint in {final}")


def save_checkpoint(run, rounds_done: int, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the whole state of ``run`` (a :class:`lesft.train.Run`) after ``rounds_done`` rounds;
    ``extra`` (JSON) is stored alongside and returned by :func:`load_checkpoint`."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    clients = []
    for c in run.clients:
        p = f"client{c.cid}"
        tensors.update({f"{p}.lora.{k}": v for k, v in lora_state(c.bottom).items()})
        clients.append({
            "optimizer": optimizer_state(c.optimizer, f"{p}.opt", tensors),
            "stream": [c.stream.epoch, c.stream.pos],
            "meter": c.meter.state(),
        })
    server = None
    if run.server is not None:
        s = run.server
        tensors.update({f"server.lora.{k}": v for k, v in lora_state(s.top).items()})
        server = {"optimizer": optimizer_state(s.optimizer, "server.opt", tensors), "meter": s.meter.state()}
    state = {
        "rounds_done": rounds_done,
        "clients": clients,
        "server": server,
        "aggregator_rounds": run.aggregator.rounds if run.aggregator else 0,
        "bytes": run.transport.meter.to_dict(),
        "extra": extra or {},
    }
    return write_checkpoint(out / CKPT, tensors, state)


def find_checkpoint(out: Path) -> Path | None:
    """The directory holding the run's checkpoint (``checkpoint/``, or ``checkpoint.old/`` if killed
    mid-swap); not verified here (:func:`load_checkpoint` does)."""
    for name in (CKPT, f"{CKPT}.old"):
        d = out / name
        if (d / STATE).is_file() or (d / TENSORS).is_file():
            return d
    return None


def load_checkpoint(run, opened: tuple[Path, dict[str, Any], dict[str, torch.Tensor]]) -> tuple[int, dict[str, Any]]:
    """Restore ``run`` from a checkpoint :func:`open_checkpoint` verified; return (rounds already done,
    the ``extra`` saved with it)."""
    path, state, tensors = opened
    if len(state["clients"]) != len(run.clients):
        raise ValueError(f"checkpoint {path} has {len(state['clients'])} clients, the run has {len(run.clients)}")

    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    for c, cs in zip(run.clients, state["clients"]):
        if c.trainable:
            load_lora_state(c.bottom, sub(f"client{c.cid}.lora."))
        load_optimizer(c.optimizer, cs["optimizer"], f"client{c.cid}.opt", tensors)
        c.stream.epoch, c.stream.pos = cs["stream"]
        c.stream._order = c.stream._shuffle()
        c.meter.load(cs["meter"])
    if run.server is not None:
        load_lora_state(run.server.top, sub("server.lora."))
        load_optimizer(run.server.optimizer, state["server"]["optimizer"], "server.opt", tensors)
        run.server.meter.load(state["server"]["meter"])
    if run.aggregator is not None:
        run.aggregator.rounds = state["aggregator_rounds"]
    run.transport.meter.load(state["bytes"])
    torch.set_rng_state(tensors["rng.torch"])
    return state["rounds_done"], state["extra"]
