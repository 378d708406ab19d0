"""The argparse bridge: one ``--flag`` per dataclass field, help text from the field's metadata."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from lesft.typed import _base_type, _field_types, field_default


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


_METAVAR = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       sections: dict[str, str] | None = None, title: str | None = None) -> None:
    """One ``--flag`` per field (``--lora.r`` for nested ones), help text from the field metadata, grouped in
    ``--help`` by ``sections`` (first field -> title) and one group per nested dataclass.

    Every flag defaults to argparse.SUPPRESS so that only what the user typed overrides YAML.
    """
    hints = _field_types(cls)
    group: Any = parser.add_argument_group(title) if title else parser
    for f in fields(cls):
        tp, optional = _base_type(hints[f.name])
        name = f"{prefix}{f.name}"
        if sections and f.name in sections:
            group = parser.add_argument_group(sections[f.name])
        if is_dataclass(tp):
            add_dataclass_args(parser, tp, prefix=f"{name}.", title=f"--{name}.* ({f.metadata.get('help', '').rstrip('.')})")
            continue
        default = field_default(f)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        flags = [f"--{name}"] + [f"--{a}" for a in f.metadata.get("aliases", ())]
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:  # "--eval" alone means true; "--eval false" is accepted too
            kw.update(type=_parse_bool, metavar="BOOL", nargs="?", const=True)
        elif origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kw.update(type=inner, nargs="+", metavar=_METAVAR.get(inner, "X"))
        else:
            kw.update(type=tp, metavar=_METAVAR.get(tp, "X"))
        group.add_argument(*flags, **kw)
        if "_" in name:  # --max-length too, not listed in --help
            group.add_argument(f"--{name.replace('_', '-')}", **dict(kw, help=argparse.SUPPRESS))
