"""The benchmarks a run can name (``--data NAME``, ``--evaluation.dataset NAME``, a sweep's ``eval``): one
entry each, with its answer kind (which decides the prompt's instruction line, answer extraction and
comparison), its splits, the labelled split evaluation uses by default, and its loader.

The four built-in benchmarks are loaded by :func:`lesft.data.benchmarks.load_benchmark`. Add one from
outside the package (``lesft --plugin my_bench.py``)::

    from lesft.data.prompts import answer_sentence, format_question
    from lesft.data.registry import register_benchmark

    def load(split, data_dir, seed):
        rows = [...]  # read your files
        return [{"id": ..., "prompt": format_question("mybench", question), "answer": "42",
                 "target": rationale + " " + answer_sentence("mybench", "42"), "reference": rationale}]

    register_benchmark("mybench", answer_kind="numeric", splits=("train", "test"), eval_split="test", load=load)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["BENCHMARKS", "Benchmark", "answer_kind", "get_benchmark", "register_benchmark"]

Loader = Callable[[str, "str | None", int], "list[dict[str, str]]"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    answer_kind: str  # "numeric" (a number) or "choice" (an option letter A-E)
    splits: tuple[str, ...]
    eval_split: str  # the labelled split `lesft eval` uses when none is asked for
    load: Loader | None = None  # (split, data_dir, seed) -> rows; None: built into load_benchmark


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(name: str, answer_kind: str, splits: tuple[str, ...], eval_split: str,
                       load: Loader | None = None, replace: bool = False) -> Benchmark:
    """Make ``name`` usable wherever a benchmark is named. ``load(split, data_dir, seed)`` returns rows
    ``{id, prompt, target, reference, answer}`` (the prompt already formatted by ``format_question``). A name
    another loader took is refused unless ``replace``."""
    if answer_kind not in ("numeric", "choice"):
        raise ValueError(f"answer_kind must be 'numeric' or 'choice', got {answer_kind!r}")
    if eval_split not in splits:
        raise ValueError(f"eval_split {eval_split!r} is not one of the splits {splits}")
    from lesft.plugins import claim

    claim(BENCHMARKS, name, Benchmark(name, answer_kind, tuple(splits), eval_split, load), load or name, "benchmark",
          replace)
    return BENCHMARKS[name]


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                         "(add one with lesft.data.registry.register_benchmark)")
    return BENCHMARKS[name]


def answer_kind(name: str) -> str:
    return get_benchmark(name).answer_kind


register_benchmark("gsm8k", "numeric", ("train", "test"), "test")
register_benchmark("commonsenseqa", "choice", ("train", "validation"), "validation")
register_benchmark("aqua_rat", "choice", ("train", "validation", "test"), "test")
register_benchmark("synthetic", "numeric", ("train", "validation", "test"), "test")
