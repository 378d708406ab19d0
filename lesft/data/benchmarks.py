"""The project's benchmarks as training/evaluation rows: GSM8K, CommonsenseQA, AQuA-RAT and the
built-in synthetic arithmetic problems.

Every loader returns rows ``{"id", "prompt", "target", "reference", "answer"}`` (all strings), in file
order:

* ``prompt`` (x): the question, the lettered options ``(A) text`` (multiple choice only) and one
  instruction line asking to reason step by step and end with the canonical answer sentence
  (:func:`lesft.data.prompts.format_question`);
* ``target`` (y): a chain of thought ending with the canonical answer sentence
  (:func:`lesft.data.prompts.answer_sentence`: ``The answer is 18.`` / ``The answer is (C).``);
* ``reference``: the ground-truth solution shown in the reference input x~
  (:func:`lesft.data.prompts.reference_text`), also ending with the canonical sentence;
* ``answer``: the canonical gold answer, a number string without thousands separators (``1200``) or
  an option letter (``C``).

Per dataset, with ``target="dataset"`` the target is the dataset's own rationale, identical to the
reference:

* **GSM8K**: the official solution with the ``<<48/2=24>>`` calculator notes removed and the final
  ``#### N`` line replaced by ``The answer is N.``. Ids: ``gsm8k-train-0`` ... (0-based row number).
* **AQuA-RAT**: the human rationale, with a trailing answer declaration (``Answer: A``, ``ANSWER:A``,
  ``Correct Option: A``, a lone ``A`` line, ...) removed, then ``The answer is (A).``. A few hundred
  rationales end in other wordings (``D is the answer``); those are kept verbatim, the canonical sentence
  follows them. Ids: ``aqua_rat-test-0``, ``aqua_rat-dev-0`` (the local file's stem), or the stem of
  the file passed as ``file=`` (``aqua_rat-aqua_train_flan_subset-0``).
* **CommonsenseQA**: the explanation of the chosen rationale source joined by CSQA id, then
  ``The answer is (A).``. ``rationale``: ``"ecqa"`` (default; human ECQA free-flow explanations as
  redistributed by FLAN, 6,318 of the 9,741 train questions), ``"palm"`` (PaLM-540B chain of thought;
  used only where the teacher was correct), ``"cose"`` (CoS-E, all questions, short and noisy) or
  ``"none"``. A rationale is joined only when its ``csqa_split`` matches the requested split, so ECQA's
  794 dev-question explanations never reach train rows. A question without a rationale in the chosen
  source keeps its row, with ``reference == target == "The answer is (X)."`` (nothing dropped). Ids: the
  CSQA ids. The rationale files are read from the local data directory even when the questions come
  from the hub; a missing rationale file is an error (pass ``rationale="none"`` to do without).
* **synthetic**: :func:`lesft.data.synthetic.iter_arithmetic`, splits ``train`` / ``validation`` /
  ``test`` owning disjoint sets of solutions (a hash of the equations, the same for every seed, so no
  train row of any seed has a test problem's equations); the prompt gets the numeric instruction line, target/reference/answer/id are the generator's (the reference stays the
  ``a op b = c`` lines + ``Answer: N`` that :func:`~lesft.data.synthetic.check_answer` reads).

``target="teacher:PATH"``: PATH is a JSONL of ``{"id", "completion"}``; each row's target becomes its
teacher completion (stripped), rows without one are dropped, and the reference stays the dataset's.
A completion that already ends with a canonical answer sentence (``The answer is 18.``/``(C).``, whatever
the answer) is kept as is; otherwise the gold canonical sentence is appended on a new line. The loader
does not judge the teacher: filter wrong completions out of the file beforehand if that matters.

Where the data comes from: ``data_dir`` (default :func:`default_data_dir`) with the layout
``gsm8k/{train,test}.jsonl``, ``commonsenseqa/{train,dev}_rand_split.jsonl`` (+ ``rationales/``),
``aqua/{train,dev,test}.json``; ``file=`` points one split at any file in the same format (absolute,
relative to the working directory, or relative to the dataset's folder). When no local file is found the
Hugging Face hub is tried (``datasets`` is imported only then).
"""

from __future__ import annotations

import itertools
import os
import random
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from lesft.data.prompts import answer_sentence, format_question
from lesft.data.registry import BENCHMARKS, answer_kind, get_benchmark
from lesft.data.jsonl import DataError, read_json_lines
from lesft.data.synthetic import ArithmeticSpec, iter_arithmetic, solution_key, solution_split

__all__ = [
    "BENCHMARKS",
    "HUB",
    "RATIONALES",
    "SPLITS",
    "default_data_dir",
    "load_benchmark",
]

HUB = {
    "gsm8k": ("openai/gsm8k", "main"),
    "commonsenseqa": ("tau/commonsense_qa", None),
    "aqua_rat": ("deepmind/aqua_rat", "raw"),
}
#: Local file of each split, under ``data_dir / SUBDIRS[name]``.
SPLITS: dict[str, dict[str, str | None]] = {
    "gsm8k": {"train": "train.jsonl", "test": "test.jsonl"},
    "commonsenseqa": {"train": "train_rand_split.jsonl", "validation": "dev_rand_split.jsonl"},
    "aqua_rat": {"train": "train.json", "validation": "dev.json", "test": "test.json"},
    "synthetic": {"train": None, "validation": None, "test": None},
}
SUBDIRS = {"gsm8k": "gsm8k", "commonsenseqa": "commonsenseqa", "aqua_rat": "aqua"}
_SPLIT_ALIASES = {"dev": "validation"}

#: CommonsenseQA rationale sources: split -> file under ``commonsenseqa/rationales/`` (``csqa_split`` names).
RATIONALES: dict[str, dict[str, str]] = {
    "ecqa": {"train": "ecqa_flan/ecqa_flan_joined.jsonl", "dev": "ecqa_flan/ecqa_flan_joined.jsonl"},
    "palm": {"train": "palm_distilling_step_by_step/palm_train_joined.jsonl",
             "dev": "palm_distilling_step_by_step/palm_dev_joined.jsonl"},
    "cose": {"train": "cose_v1.11/cose_train_joined.jsonl", "dev": "cose_v1.11/cose_dev_joined.jsonl"},
    "none": {},
}
_CSQA_SPLIT = {"train": "train", "validation": "dev"}

#: Synthetic rows generated per split when ``n`` is not given.
SYNTHETIC_DEFAULT_N = {"train": 800, "validation": 200, "test": 200}


def default_data_dir() -> Path | None:
    """``$LESFT_DATA_DIR`` if set; else ``../shared/data`` next to the repository checkout (or next to the
    working directory) if it exists; else ``None`` (loaders then use the hub)."""
    env = os.environ.get("LESFT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Reading records (local JSON lines or the hub)
# --------------------------------------------------------------------------------------------


def _read_hub(name: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets  # optional dependency, imported only when a hub load is needed

    hub_id, config = HUB[name]
    ds = datasets.load_dataset(hub_id, config, split=split) if config else datasets.load_dataset(hub_id, split=split)
    for i, rec in enumerate(ds):
        yield f"hub {hub_id} split {split} row {i}", dict(rec)


def _field(rec: dict[str, Any], key: str, where: str, kind: type = str) -> Any:
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _resolve_file(name: str, file: str, data_dir: Path | None) -> Path:
    p = Path(file).expanduser()
    tried = [p]
    if p.is_file():
        return p
    if not p.is_absolute() and data_dir is not None:
        q = data_dir / SUBDIRS[name] / p
        tried.append(q)
        if q.is_file():
            return q
    raise FileNotFoundError(f"{name}: file not found: tried {', '.join(map(str, tried))}")


def _records(name: str, split: str, data_dir: Path | None, file: str | None):
    """``(records iterator, id stem)`` for one split, from ``file``, the local data dir or the hub."""
    local_name = SPLITS[name][split]
    stem = Path(local_name).stem
    if file is not None:
        path = _resolve_file(name, file, data_dir)
        return read_json_lines(path), path.stem
    tried = []
    if data_dir is not None:
        path = data_dir / SUBDIRS[name] / local_name
        if path.is_file():
            return read_json_lines(path), stem
        tried.append(str(path))
    hub_id, config = HUB[name]
    try:
        records = list(_read_hub(name, split))
    except DataError:
        raise
    except Exception as e:  # ImportError (no `datasets`), no network, unknown split, ...
        local = f"local file(s) {', '.join(tried)} not found" if tried else "no local data directory (set LESFT_DATA_DIR)"
        why = ("the `datasets` package is not installed (pip install datasets)" if isinstance(e, ImportError)
               else f"{type(e).__name__}: {e}")  # the cause stays chained below, with its traceback
        hint = ""
        if name == "aqua_rat" and split == "train":
            hint = (" The full AQuA-RAT train file (train.json, 97k rows) is not in shared/data; point the split at "
                    "another file, e.g. file='train_flan_subset/aqua_train_flan_subset.jsonl' (2,728 real train rows).")
        raise FileNotFoundError(
            f"{name} split {split!r}: {local}, and the hub could not provide {hub_id}"
            f"{f' ({config})' if config else ''}: {why}.{hint}"
        ) from e
    return iter(records), stem


# --------------------------------------------------------------------------------------------
# Converting records into rows
# --------------------------------------------------------------------------------------------

_CALC = re.compile(r"<<[^>]*>>")
_GSM_FINAL = re.compile(r"\n?####\s*(.*?)\s*$", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPTION = re.compile(r"^\s*\(?\s*([A-Z])\s*\)\s*(.*)$", re.S)
_AQUA_TAIL = re.compile(
    r"(?:^|(?<=[\s.,;:!?)]))"
    r"(?:(?:hence|so|thus|therefore)\s*,?\s*)?(?:the\s+)?(?:correct\s+|right\s+|final\s+)?"
    r"(?:answer|ans|option|choice)\s*(?:is|will\s+be|should\s+be|would\s+be|=|:|-|\.)?\s*"
    r"(?:option|choice)?\s*[:.]?\s*\(?\s*([A-Ea-e])\s*\)?\s*[.!]?\s*$",
    re.I,
)
_BARE_LETTER = re.compile(r"(?:^|\n)\s*\(?([A-E])\)?\s*\.?\s*$")


def _with_sentence(text: str, sentence: str) -> str:
    text = text.strip()
    return f"{text}\n{sentence}" if text else sentence


def _gsm8k_row(rec: dict[str, Any], where: str) -> dict[str, str]:
    question = _field(rec, "question", where)
    solution = _field(rec, "answer", where)
    m = _GSM_FINAL.search(solution)
    if "####" not in solution or m is None:
        raise DataError(f"{where}: GSM8K answer has no '#### N' final line")
    answer = m.group(1).replace(",", "").strip()
    if not _NUMBER.fullmatch(answer):
        raise DataError(f"{where}: GSM8K final answer {m.group(1)!r} is not a number")
    body = _CALC.sub("", solution[: m.start()])
    reference = _with_sentence(body, answer_sentence("gsm8k", answer))
    return {"prompt": format_question("gsm8k", question), "target": reference, "reference": reference,
            "answer": answer}


def _check_options(options: list[tuple[str, str]], answer: str, where: str) -> None:
    labels = [label for label, _ in options]
    if len(set(labels)) != len(labels):
        raise DataError(f"{where}: repeated option labels {labels}")
    if answer not in labels:
        raise DataError(f"{where}: answer key {answer!r} is not among the options {labels}")


def _aqua_row(rec: dict[str, Any], where: str) -> dict[str, str]:
    question = _field(rec, "question", where)
    raw = _field(rec, "options", where, list)
    rationale = _field(rec, "rationale", where)
    answer = _field(rec, "correct", where).strip()
    options = []
    for o in raw:
        m = _OPTION.match(o) if isinstance(o, str) else None
        if m is None:
            raise DataError(f"{where}: option {o!r} is not of the form 'A)text'")
        options.append((m.group(1), m.group(2).strip()))
    _check_options(options, answer, where)
    text = rationale.strip()
    m = _AQUA_TAIL.search(text) or _BARE_LETTER.search(text)
    if m is not None:
        text = text[: m.start()]
    reference = _with_sentence(text, answer_sentence("aqua_rat", answer))
    return {"prompt": format_question("aqua_rat", question, options), "target": reference,
            "reference": reference, "answer": answer}


def _csqa_question(rec: dict[str, Any], where: str) -> tuple[str, list[tuple[str, str]]]:
    """Question stem and options from the official layout (``question: {stem, choices: [...]}``) or the
    hub layout (``question: str``, ``choices: {label: [...], text: [...]}``)."""
    q = rec.get("question")
    if isinstance(q, dict):
        stem = _field(q, "stem", where)
        choices = _field(q, "choices", where, list)
        try:
            options = [(c["label"], c["text"]) for c in choices]
        except (TypeError, KeyError):
            raise DataError(f"{where}: choices must be objects with 'label' and 'text'") from None
    elif isinstance(q, str):
        stem = q
        choices = _field(rec, "choices", where, dict)
        labels, texts = choices.get("label"), choices.get("text")
        if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
            raise DataError(f"{where}: choices must hold equally long 'label' and 'text' lists")
        options = list(zip(labels, texts))
    else:
        raise DataError(f"{where}: missing field 'question'")
    if not options or not all(isinstance(a, str) and isinstance(b, str) for a, b in options):
        raise DataError(f"{where}: no valid choices")
    return stem, [(a.strip(), b.strip()) for a, b in options]


@lru_cache(maxsize=16)
def _rationale_table(path: str, csqa_split: str, source: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for where, rec in read_json_lines(Path(path)):
        if rec.get("csqa_split") != csqa_split:
            continue
        if source == "palm" and rec.get("teacher_correct") is not True:
            continue  # the PaLM rationale argues for a wrong (or no) option
        key = _field(rec, "id", where)
        text = rec.get("rationale")
        if isinstance(text, str) and text.strip():
            table[key] = text.strip()
    return table


def _csqa_rationales(source: str, split: str, data_dir: Path | None) -> dict[str, str]:
    if source not in RATIONALES:
        raise ValueError(f"unknown CommonsenseQA rationale source {source!r}; known: {', '.join(RATIONALES)}")
    if source == "none":
        return {}
    rel = RATIONALES[source][_CSQA_SPLIT[split]]
    path = data_dir / "commonsenseqa" / "rationales" / rel if data_dir is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"CommonsenseQA rationale file for source {source!r} not found "
            f"({path if path is not None else 'no local data directory; set LESFT_DATA_DIR'}); "
            "pass rationale='none' to use the answer sentence as the reference"
        )
    return _rationale_table(str(path.resolve()), _CSQA_SPLIT[split], source)


def _csqa_row(rec: dict[str, Any], where: str, rationales: dict[str, str]) -> dict[str, str]:
    key = _field(rec, "id", where)
    answer = _field(rec, "answerKey", where).strip()
    stem, options = _csqa_question(rec, where)
    _check_options(options, answer, where)
    reference = _with_sentence(rationales.get(key, ""), answer_sentence("commonsenseqa", answer))
    return {"id": key, "prompt": format_question("commonsenseqa", stem, options), "target": reference,
            "reference": reference, "answer": answer}


# --------------------------------------------------------------------------------------------
# Synthetic rows
# --------------------------------------------------------------------------------------------


def _synthetic(split: str, n: int | None, seed: int, spec: ArithmeticSpec | None) -> list[dict[str, str]]:
    """``n`` problems of ``split``: the stream of ``seed`` (``f"{split}-{seed}"`` for the evaluation splits)
    filtered to the solutions the split owns (:func:`solution_split`); evaluation splits hold distinct
    solutions. Disjoint from every other split at the level of the equations, whatever the seeds."""
    spec = ArithmeticSpec() if spec is None else spec
    n = SYNTHETIC_DEFAULT_N[split] if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"synthetic needs n >= 1, got {n!r}")
    distinct = split != "train"
    stream = iter_arithmetic(seed if split == "train" else f"{split}-{seed}", spec)
    budget = 200 * n + 10_000
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for row in itertools.islice(stream, budget):
        key = solution_key(row)
        if solution_split(row) != split or (distinct and key in seen):
            continue
        seen.add(key)
        rows.append(row)
        if len(rows) == n:
            return [{**r, "prompt": format_question("synthetic", r["prompt"])} for r in rows]
    raise ValueError(
        f"synthetic {split}: only {len(rows)} of {n} problems with {'distinct ' if distinct else ''}solutions "
        f"of this split in {budget} draws; the spec's problem space is too small (raise max_value/max_steps "
        "or lower n)"
    )


# --------------------------------------------------------------------------------------------
# Teacher targets and sampling
# --------------------------------------------------------------------------------------------

_CANONICAL_END = {
    "numeric": re.compile(r"The answer is -?[\d,]*\.?\d+\.$"),
    "choice": re.compile(r"The answer is \([A-Z]\)\.$"),
}


def _load_teacher(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"teacher completions file not found: {path}")
    out: dict[str, str] = {}
    for where, rec in read_json_lines(path):
        key = _field(rec, "id", where)
        completion = _field(rec, "completion", where)
        if key in out:
            raise DataError(f"{where}: duplicate id {key!r}")
        out[key] = completion
    return out


def _teacher_rows(name: str, rows: list[dict[str, str]], path: Path) -> list[dict[str, str]]:
    completions = _load_teacher(path)
    end = _CANONICAL_END[answer_kind(name)]
    out = []
    for row in rows:
        completion = completions.get(row["id"], "").strip()
        if not completion:
            continue
        if not end.search(completion):
            completion = _with_sentence(completion, answer_sentence(name, row["answer"]))
        out.append({**row, "target": completion})
    if not out:
        raise DataError(f"{path}: no teacher completion matches any {name} row id (e.g. {rows[0]['id']!r})")
    return out


def _sample(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if n > len(rows):
        raise ValueError(f"asked for n={n} rows but only {len(rows)} are available")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_benchmark(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    file: str | None = None,
    target: str = "dataset",
    rationale: str | None = None,
    n: int | None = None,
    seed: int = 0,
    spec: ArithmeticSpec | None = None,
) -> list[dict[str, str]]:
    """Rows ``{id, prompt, target, reference, answer}`` of one benchmark split, in file order.

    ``name``: one of :data:`BENCHMARKS`. ``split``: gsm8k ``train``/``test``; commonsenseqa
    ``train``/``validation``; aqua_rat ``train``/``validation``/``test``; synthetic ``train``/``test``
    (``dev`` is accepted for ``validation``). ``data_dir``: the folder holding ``gsm8k/``,
    ``commonsenseqa/``, ``aqua/`` (default :func:`default_data_dir`). ``file``: read this split from
    this file instead. ``target``: ``"dataset"`` or ``"teacher:PATH"``. ``rationale``: the CommonsenseQA
    rationale source (``ecqa`` default, ``palm``, ``cose``, ``none``). ``n``: a seeded random sample of
    ``n`` rows (file order kept; drawn after teacher filtering); for synthetic, the number of generated
    rows (default 800 train / 200 test) and ``seed`` its generation seed. ``spec``: the synthetic
    :class:`~lesft.data.synthetic.ArithmeticSpec`. ``rationale`` and ``spec`` are ignored by the benchmarks
    they do not apply to, so one call site can pass them for every benchmark.

    Raises ``ValueError`` for an unknown name/split/rationale/target, :class:`~lesft.data.rows.DataError`
    (naming file and line) for a malformed row, ``FileNotFoundError`` when neither a local file nor the
    hub has the split.
    """
    bench = get_benchmark(name)
    split = _SPLIT_ALIASES.get(split, split)
    if name == "commonsenseqa" and split == "test":
        raise ValueError(
            "commonsenseqa: the public test split has no answer keys (leaderboard only); evaluate on 'validation'"
        )
    if split not in bench.splits:
        raise ValueError(f"{name} has no split {split!r}; known: {', '.join(bench.splits)}")
    if target != "dataset" and not (target.startswith("teacher:") and target[len("teacher:"):].strip()):
        raise ValueError(f"target must be 'dataset' or 'teacher:PATH', got {target!r}")

    if bench.load is not None:  # a registered benchmark: its own loader
        rows = bench.load(split, data_dir, seed)
        if not rows:
            raise DataError(f"{name} split {split!r}: its loader returned no rows")
    elif name == "synthetic":
        if file is not None:
            raise ValueError("synthetic rows are generated; file= does not apply")
        rows = _synthetic(split, n, seed, spec)
        n = None  # n was the generated count
    else:
        ddir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        if name == "commonsenseqa":
            rationales = _csqa_rationales(rationale or "ecqa", split, ddir)
        records, stem = _records(name, split, ddir, file)
        rows = []
        for i, (where, rec) in enumerate(records):
            if name == "gsm8k":
                row = _gsm8k_row(rec, where)
            elif name == "aqua_rat":
                row = _aqua_row(rec, where)
            else:
                row = _csqa_row(rec, where, rationales)
            rows.append({"id": row.pop("id", None) or f"{name}-{stem}-{i}", **row})
        if not rows:
            raise DataError(f"{name} split {split!r}: no rows")

    if target != "dataset":
        rows = _teacher_rows(name, rows, Path(target[len("teacher:"):].strip()).expanduser())
    if n is not None:
        rows = _sample(rows, n, seed)
    return rows

