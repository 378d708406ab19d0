"""Has an evaluated problem been trained on? Keys that identify a problem, written by every training run
(``RUN/train_keys.json``) and every evaluation (``keys`` in ``predictions.jsonl``), and the check a study
runs over them.

A problem's keys: a hash of its prompt text (lower-cased, white space folded) and, for the synthetic
benchmark, a hash of its solution's equations (:func:`lesft.data.synthetic.solution_key`), so that the
same arithmetic with other names and objects counts as the same problem. Only hashes are stored: a run
directory never gains a copy of the training text.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

from lesft.data.synthetic import solution_key

__all__ = ["TRAIN_KEYS_FILE", "problem_keys", "write_train_keys", "read_train_keys", "overlap"]

TRAIN_KEYS_FILE = "train_keys.json"
_EQUATIONS = re.compile(r"^\d+ [-+*/] \d+ = \d+$")


def _hash(kind: str, text: str) -> str:
    return kind + ":" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def problem_keys(row: dict[str, str]) -> list[str]:
    """``["p:<hash of the prompt>"]``, plus ``"s:<hash of the equations>"`` when the row's reference is
    synthetic: bare equations (``a op b = c`` lines, then ``Answer: N``) or their worded form (``#### N`` last),
    which gives the same key as the bare form of the same solution."""
    keys = [_hash("p", " ".join(row["prompt"].lower().split()))]
    lines = solution_key(row).split("\n") if row.get("reference") else []
    if len(lines) >= 2 and all(_EQUATIONS.match(ln) for ln in lines[:-1]) and lines[-1].startswith("Answer: "):
        keys.append(_hash("s", "\n".join(lines)))
    return keys


def write_train_keys(rows: Iterable[dict[str, str]], path: Path) -> None:
    """``path``: ``{"rows": N, "keys": [...]}`` (sorted, distinct) of the training rows."""
    rows = list(rows)
    keys = sorted({k for r in rows for k in problem_keys(r)})
    path.write_text(json.dumps({"rows": len(rows), "keys": keys}) + "\n")


def read_train_keys(path: Path) -> set[str]:
    return set(json.loads(path.read_text())["keys"])


def overlap(evaluated: Iterable[tuple[str, list[str]]], train_keys: set[str]) -> list[str]:
    """Ids of the evaluated ``(id, keys)`` problems any of whose keys is among ``train_keys``."""
    return [qid for qid, keys in evaluated if any(k in train_keys for k in keys)]
