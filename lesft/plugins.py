"""Extensions from outside the package: files or modules that register a loss
(:func:`lesft.objectives.register_objective`) or an aggregation strategy
(:func:`lesft.strategies.register_strategy`), imported before a command runs.

``lesft --plugin my_loss.py train --loss focal ...`` or ``LESFT_PLUGINS=my_loss.py:my_pkg.rules lesft ...``
(``os.pathsep``-separated). The list is kept in ``$LESFT_PLUGINS``, so the processes that ``lesft sweep
--jobs N`` starts load the same extensions.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["ENV", "claim", "load_plugins"]

ENV = "LESFT_PLUGINS"
_loaded: set[str] = set()


def claim(table: dict[str, Any], name: str, entry: Any, origin: Any, kind: str, replace: bool = False) -> None:
    """Put ``entry`` under ``name`` in a registry ``table``. A name already taken by another definition (another
    module or qualified name than ``origin``'s) is refused unless ``replace``; the same definition registered
    again (a module imported twice) replaces itself."""
    where = f"{getattr(origin, '__module__', '?')}.{getattr(origin, '__qualname__', repr(origin))}"
    old = _ORIGINS.get((id(table), name))
    if name in table and old is not None and old != where and not replace:
        raise ValueError(f"{kind} {name!r} is already registered by {old}; {where} cannot take the name: choose "
                         "another one, or pass replace=True to replace it")
    table[name] = entry
    _ORIGINS[(id(table), name)] = where


_ORIGINS: dict[tuple[int, str], str] = {}  # (registry, name) -> the definition that registered it


def load_plugins(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Import ``extra`` and every entry of ``$LESFT_PLUGINS`` once (a ``.py`` path or a module name);
    return the list, which is written back to ``$LESFT_PLUGINS`` for child processes."""
    specs = list(dict.fromkeys([*(str(Path(e).resolve()) if e.endswith(".py") else e for e in extra),
                                *filter(None, os.environ.get(ENV, "").split(os.pathsep))]))
    for spec in specs:
        if spec in _loaded:
            continue
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"plugin file not found: {path} (from --plugin or ${ENV})")
            name = f"lesft_plugin_{path.stem}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
        _loaded.add(spec)
    if specs:
        os.environ[ENV] = os.pathsep.join(specs)
    return specs
