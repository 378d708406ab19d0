"""Training rows: ``{prompt, target, reference}`` (+ optional ``id``, ``answer``) from a JSONL file
or from the built-in synthetic generator.

A JSONL file may also use trl's formats, read as:

* ``{"prompt", "completion"}`` (prompt-completion): ``target`` = ``completion``;
* ``{"messages": [{"role", "content"}, ...]}`` (conversational): ``target`` = the last message, which must
  be the assistant's; ``prompt`` = the earlier messages' contents, joined by blank lines.

Either may carry a ``reference`` (the solution steps that LESFT's reference input needs); without one it
is empty, and x~ = x.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lesft.data.benchmarks import BENCHMARKS, load_benchmark
from lesft.data.jsonl import DataError, read_json_lines
from lesft.data.synthetic import ArithmeticSpec

__all__ = ["DataError", "REQUIRED", "load_jsonl", "load_rows", "read_json_lines"]

REQUIRED = ("prompt", "target", "reference")


def _from_trl(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A trl prompt-completion or conversational row as ``{prompt, target, reference}`` (others unchanged)."""
    if "messages" in row and "prompt" not in row:
        msgs = row.pop("messages")
        ok = isinstance(msgs, list) and len(msgs) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs)
        if not ok:
            raise DataError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message is {msgs[-1]['role']!r}'s; it must be the assistant's "
                            "(the text that is trained on)")
        row.update(prompt="\n\n".join(m["content"] for m in msgs[:-1]), target=msgs[-1]["content"])
        row.setdefault("reference", "")
    elif "completion" in row and "target" not in row:
        row["target"] = row.pop("completion")
        row.setdefault("reference", "")
    return row


def load_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Rows of a JSONL file; each needs non-empty string ``prompt`` and ``target`` and a string ``reference``
    (or is a trl prompt-completion / conversational row, see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    rows = []
    for where, row in read_json_lines(p):
        row = _from_trl(row, where)
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; each row needs {list(REQUIRED)}, or trl's "
                            "{prompt, completion} or {messages}")
        bad = [k for k in REQUIRED if not isinstance(row[k], str)]
        if bad:
            raise DataError(f"{where}: field(s) {bad} must be strings")
        empty = [k for k in ("prompt", "target") if not row[k].strip()]
        if empty:
            raise DataError(f"{where}: field(s) {empty} are empty")
        row.setdefault("id", f"{p.stem}-{where.rsplit(':', 1)[1]}")
        rows.append(row)
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


def load_rows(data: str, samples: int, seed: int, spec: ArithmeticSpec, *, data_dir: str | None = None,
              target: str = "dataset", rationale: str | None = None) -> list[dict[str, str]]:
    """Training rows. ``data``: a benchmark name (gsm8k, commonsenseqa, aqua_rat, synthetic; its train
    split, ``samples`` of them as a seeded sample, all if 0) or a JSONL file of {prompt, target, reference}
    rows (a seeded sample of ``samples`` rows when 0 < samples < rows, file order kept)."""
    if data in BENCHMARKS:
        return load_benchmark(data, "train", data_dir, target=target, rationale=rationale,
                              n=samples or None, seed=seed, spec=spec)
    rows = load_jsonl(data)
    if 0 < samples < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), samples))
        rows = [rows[i] for i in keep]
    return rows
