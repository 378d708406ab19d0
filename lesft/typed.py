"""Typed dicts <-> dataclasses, with no schema of its own: the checks that turn YAML and command-line values into
a config (``from_dict``: an error names the key, the value and the fix), the way back (``to_dict``, ``flatten``),
dotted overrides, and YAML files. The schemas live in :mod:`lesft.config`, the flags in :mod:`lesft.flags`."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``); tuples become lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


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


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's declared default (its ``default_factory`` called); ``dataclasses.MISSING`` if required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def declared_defaults(cls: type) -> dict[str, Any]:
    """Every field's declared default, nested dataclasses as dicts; required fields left out. Unlike
    ``to_dict(cls())``, nothing ``__post_init__`` derives (``TrainConfig.data_seed`` stays None)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        v = field_default(f)
        if v is not dataclasses.MISSING:
            out[f.name] = declared_defaults(type(v)) if is_dataclass(v) else v
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for hints like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


#: Names trl / peft / transformers users reach for, and what lesft calls them ("did you mean").
HF_NAMES: dict[str, str] = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "rounds", "output_dir": "out",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length", "model_name_or_path": "model", "dataset_name": "data",
    "lora_alpha": "lora.alpha", "lora_r": "lora.r", "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules", "bf16": "dtype bf16", "fp16": "dtype bf16",
    "save_steps": "checkpoint_every", "resume_from_checkpoint": "resume", "do_eval": "eval",
}


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for an unknown field or flag name: its lesft name when it is a trl/peft/HF
    name, else the closest known name; empty when nothing is close."""
    import difflib

    bare = name.lstrip("-").replace("-", "_")
    if bare in HF_NAMES:
        target = HF_NAMES[bare]
    else:
        close = difflib.get_close_matches(bare, known, n=1, cutoff=0.6)
        if not close:
            return ""
        target = close[0]
    return f" (did you mean {'--' if name.startswith('--') else ''}{target}?)"


_EXAMPLE = {bool: "true or false", int: "a whole number, e.g. 8", float: "a number, e.g. 2e-4 or 0.0002",
            str: "a string"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def check_value(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against type hint ``tp`` (and converted where the meaning is certain: a number
    written as a string, such as YAML 1.1's ``2e-4``; an int where a float goes; a number where a string
    goes; a list where a tuple goes). ``key`` names the field in the error, which says what to write."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise TypeError(f"{key}: may not be empty (null); write {_EXAMPLE.get(base, _type_name(base))}")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(base) if a is not Ellipsis] or [Any]
        if isinstance(value, str) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key}: expected a list, got {value!r} ({type(value).__name__}); write e.g. [a, b]")
        fixed = origin is tuple and Ellipsis not in typing.get_args(base)
        if fixed and len(value) != len(args):
            raise TypeError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        items = [check_value(args[i] if fixed else args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if is_dataclass(base):
        if isinstance(value, base):
            return value
        raise TypeError(f"{key}: expected a group of fields ({', '.join(f.name for f in fields(base))}), got "
                        f"{value!r}; write e.g. {key}: {{{fields(base)[0].name}: ...}} or --{key}.{fields(base)[0].name}")
    if base is Any or not isinstance(base, type):
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if base is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if base is float:
                return float(value)
            if float(value).is_integer():
                return int(value)
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(value, base):
        return value
    raise TypeError(f"{key}: expected {_type_name(base)}, got {value!r} ({type(value).__name__}); "
                    f"write {_EXAMPLE.get(base, _type_name(base))}")


def check_dict(cls: type, data: Any, where: str = "", source: str = "") -> dict[str, Any]:
    """``data`` with every key known to dataclass ``cls`` and every value checked against its field's type
    (:func:`check_value`, nested groups recursively); else a ``ValueError`` naming the field and ``source``
    (a YAML file, "command line") that says what to write."""
    at = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ValueError(f"{at}{where.rstrip('.') or 'config'} must be a mapping of field: value, got {data!r}")
    hints = _field_types(cls)
    known = [f.name for f in fields(cls)]
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known:
            raise ValueError(f"{at}unknown config field {where + str(name)!r}{did_you_mean(str(name), known)}; "
                             f"known fields: {', '.join(known)}")
        tp, _ = _base_type(hints[name])
        if is_dataclass(tp) and isinstance(value, dict):
            out[name] = check_dict(tp, value, f"{where}{name}.", source)
            continue
        try:
            out[name] = check_value(hints[name], value, f"{where}{name}")
        except TypeError as e:
            raise ValueError(f"{at}{e}") from None
    return out


def normalised(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its values in ``cls``'s field types (:func:`check_dict`), or unchanged when it does not
    check: compares a config saved before values were type-checked (``client_layers: 2``) with today's."""
    try:
        return _plain(check_dict(cls, data))  # tuples as lists, as in to_dict
    except ValueError:
        return data


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        tp, _ = _base_type(hints[name])
        kwargs[name] = _build(tp, value) if is_dataclass(tp) and isinstance(value, dict) else value
    return cls(**kwargs)


def from_dict(cls: type, data: dict[str, Any], where: str = "", source: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict, checked by :func:`check_dict`; a value the
    dataclass refuses (out of range) is a ``ValueError`` naming ``source`` too."""
    data = check_dict(cls, data, where, source)
    try:
        return _build(cls, data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}" if source else str(e)) from None


def load_yaml(path: str | Path, what: str = "config file", holds: str = "field: value") -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, a syntax error or a non-mapping is an error naming it
    (``what`` the file is, and what its mapping ``holds``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a {what} must hold a mapping of {holds}")
    return data


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

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

def build_config(cls: type, path: str | None, overrides: dict[str, Any], defaults: dict[str, Any] | None = None) -> Any:
    """``cls`` from the layers defaults <- YAML file ``path`` <- command-line ``overrides`` (dotted keys).
    The file's values are checked first, so an error names the file; then the merged whole is built."""
    data = check_dict(cls, load_yaml(path), source=str(path)) if path else dict(defaults or {})
    return from_dict(cls, apply_overrides(data, overrides), source=str(path) if path else "command line")
