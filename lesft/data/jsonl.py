"""JSON-lines reading shared by the row loaders (:mod:`lesft.data.rows`) and the benchmark loaders
(:mod:`lesft.data.benchmarks`), and the error both raise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DataError", "read_json_lines"]


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


def read_json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` per non-blank line of a JSON-lines file; ``where`` is ``path:line``."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec
