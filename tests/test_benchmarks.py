"""Tests for the benchmark loaders (lesft.data.benchmarks) and the question/answer templates they use.

The official files are read in place from ``../shared/data`` next to the repository (never copied)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from lesft.data import benchmarks
from lesft.data.benchmarks import BENCHMARKS, default_data_dir, load_benchmark
from lesft.data.prompts import (
    INSTRUCTION_CHOICE,
    INSTRUCTION_NUMERIC,
    answer_sentence,
    format_question,
    reference_text,
)
from lesft.data.rows import DataError
from lesft.data.synthetic import ArithmeticSpec, check_answer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "gsm8k" / "train.jsonl").is_file(),
    reason=f"official benchmark files not found at {SHARED} (the shared/ folder next to the checkout)",
)
KEYS = {"id", "prompt", "target", "reference", "answer"}


@pytest.fixture(scope="module")
def load():
    """``load_benchmark`` on the shared data, memoised per argument set (the big files are read once)."""
    cache: dict = {}

    def get(name: str, split: str, **kw):
        key = (name, split, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = load_benchmark(name, split, str(SHARED), **kw)
        return cache[key]

    return get


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def test_format_question_and_answer_sentence() -> None:
    assert format_question("gsm8k", " How many? ") == f"How many?\n{INSTRUCTION_NUMERIC}"
    assert format_question("synthetic", "How many?") == f"How many?\n{INSTRUCTION_NUMERIC}"
    text = format_question("commonsenseqa", "Where?", [("A", "bank"), ("B", " mall ")])
    assert text == f"Where?\n(A) bank\n(B) mall\n{INSTRUCTION_CHOICE}"
    assert answer_sentence("gsm8k", "18") == "The answer is 18."
    assert answer_sentence("aqua_rat", "C") == "The answer is (C)."
    with pytest.raises(ValueError, match="options"):
        format_question("aqua_rat", "Q?")
    with pytest.raises(ValueError, match="known"):
        answer_sentence("mmlu", "A")


# --------------------------------------------------------------------------------------------
# Official files
# --------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize(
    "name, split, kw, count",
    [
        ("gsm8k", "train", {}, 7473),
        ("gsm8k", "test", {}, 1319),
        ("commonsenseqa", "train", {}, 9741),
        ("commonsenseqa", "validation", {}, 1221),
        ("aqua_rat", "test", {}, 254),
        ("aqua_rat", "validation", {}, 254),
        ("aqua_rat", "train", {"file": "train_flan_subset/aqua_train_flan_subset.jsonl"}, 2728),
    ],
)
def test_official_row_counts(load, name, split, kw, count) -> None:
    rows = load(name, split, **kw)
    assert len(rows) == count
    assert all(set(r) == KEYS and all(isinstance(v, str) for v in r.values()) for r in rows)
    assert len({r["id"] for r in rows}) == count
    for r in rows:
        sentence = answer_sentence(name, r["answer"])
        assert r["target"].endswith(sentence) and r["reference"].endswith(sentence)
        assert r["prompt"].endswith(INSTRUCTION_NUMERIC if name == "gsm8k" else INSTRUCTION_CHOICE)


@needs_shared
def test_gsm8k_row(load) -> None:
    row = load("gsm8k", "train")[0]
    assert row["id"] == "gsm8k-train-0"
    assert row["prompt"].startswith("Natalia sold clips to 48 of her friends in April")
    assert row["prompt"].endswith("\n" + INSTRUCTION_NUMERIC)
    assert "48/2 = 24" in row["reference"] and "<<" not in row["reference"] and "####" not in row["reference"]
    assert row["target"] == row["reference"]
    assert row["target"].endswith("\nThe answer is 72.")
    assert row["answer"] == "72"
    # thousands separators are removed from the canonical answer
    assert all("," not in r["answer"] for r in load("gsm8k", "train"))
    assert reference_text(row["prompt"], row["reference"]).endswith("The answer is 72.")


@needs_shared
def test_commonsenseqa_rows_and_rationale_sources(load) -> None:
    rows = load("commonsenseqa", "train")
    row = next(r for r in rows if r["id"] == "d5d4022dd1196d5986d8fc41eccc3433")
    assert row["prompt"] == (
        "What might a person see at the scene of a brutal killing?\n(A) bloody mess\n(B) pleasure\n"
        f"(C) being imprisoned\n(D) feeling of guilt\n(E) cake\n{INSTRUCTION_CHOICE}"
    )
    assert row["reference"] == (
        "Bloody mess is covered or stained with blood. A person might see a bloody mess at the scene of "
        "a brutal killing.\nThe answer is (A)."
    )
    assert row["target"] == row["reference"] and row["answer"] == "A"
    # ECQA covers 6,318 train questions; the rest fall back to the answer sentence alone (kept, not dropped)
    with_rationale = [r for r in rows if r["reference"] != answer_sentence("commonsenseqa", r["answer"])]
    assert len(with_rationale) == 6318
    # ECQA explanations of dev questions never reach train rows (they are joined by split)
    ecqa = [json.loads(line) for line in
            (SHARED / "commonsenseqa/rationales/ecqa_flan/ecqa_flan_joined.jsonl").open(encoding="utf-8")]
    train_text = {e["id"]: e["rationale"].strip() for e in ecqa if e["csqa_split"] == "train"}
    assert all(r["reference"] == f"{train_text[r['id']]}\nThe answer is ({r['answer']})." for r in with_rationale)
    dev_ids = {e["id"] for e in ecqa if e["csqa_split"] == "dev"}
    assert len(dev_ids) == 794 and not dev_ids & {r["id"] for r in rows}
    # PaLM rationales only where the teacher was right (75.7 % of train); CoS-E for every question
    palm = load("commonsenseqa", "train", rationale="palm")
    assert sum("\n" in r["reference"] for r in palm) == 7377
    assert [r["id"] for r in palm] == [r["id"] for r in rows]
    none = load("commonsenseqa", "validation", rationale="none")
    assert all(r["target"] == f"The answer is ({r['answer']})." for r in none)
    with pytest.raises(ValueError, match="ecqa"):
        load_benchmark("commonsenseqa", "train", str(SHARED), rationale="gpt")


@needs_shared
def test_aqua_row(load) -> None:
    row = load("aqua_rat", "test")[0]
    assert row["id"] == "aqua_rat-test-0"
    assert row["prompt"].startswith("A car is being driven, in a straight line")
    assert "\n(A) 5(√3 + 1)\n(B) 6(√3 + √2)\n" in row["prompt"] and "\n(E) None of these\n" in row["prompt"]
    assert row["answer"] == "A"
    assert row["reference"].endswith(
        "So, it takes 5(1 + √3) minutes to reach the base of the tower.\nThe answer is (A)."
    )
    assert "Answer : A" not in row["reference"] and row["target"] == row["reference"]
    flan = load("aqua_rat", "train", file="train_flan_subset/aqua_train_flan_subset.jsonl")
    assert flan[0]["id"] == "aqua_rat-aqua_train_flan_subset-0" and flan[0]["answer"] == "C"


@needs_shared
def test_sampling_keeps_file_order_and_is_seeded(load) -> None:
    full = load("gsm8k", "test")
    a = load_benchmark("gsm8k", "test", str(SHARED), n=20, seed=3)
    assert a == load_benchmark("gsm8k", "test", str(SHARED), n=20, seed=3)
    assert a != load_benchmark("gsm8k", "test", str(SHARED), n=20, seed=4)
    pos = [int(r["id"].rsplit("-", 1)[1]) for r in a]
    assert len(a) == 20 and pos == sorted(pos) and all(full[i] == r for i, r in zip(pos, a))
    with pytest.raises(ValueError, match="only 1319"):
        load_benchmark("gsm8k", "test", str(SHARED), n=5000)


@needs_shared
def test_teacher_targets(tmp_path, load) -> None:
    rows = load("aqua_rat", "test")
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text(
        json.dumps({"id": "aqua_rat-test-1", "completion": "Some reasoning.\nThe answer is (B)."}) + "\n"
        + json.dumps({"id": "aqua_rat-test-0", "completion": " Tan 45 = 1, so ...  "}) + "\n"
        + json.dumps({"id": "not-a-row", "completion": "x"}) + "\n",
        encoding="utf-8",
    )
    out = load_benchmark("aqua_rat", "test", str(SHARED), target=f"teacher:{teacher}")
    assert [r["id"] for r in out] == ["aqua_rat-test-0", "aqua_rat-test-1"]  # file order, others dropped
    assert out[0]["target"] == "Tan 45 = 1, so ...\nThe answer is (A)."  # gold sentence appended
    assert out[1]["target"] == "Some reasoning.\nThe answer is (B)."  # already canonical: kept as is
    assert out[0]["reference"] == rows[0]["reference"] and out[0]["prompt"] == rows[0]["prompt"]

    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "completion": "x"}\n{"id": "a", "completion": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{dup}:2"):
        load_benchmark("aqua_rat", "test", str(SHARED), target=f"teacher:{dup}")
    with pytest.raises(ValueError, match="teacher:PATH"):
        load_benchmark("aqua_rat", "test", str(SHARED), target="gpt4")


# --------------------------------------------------------------------------------------------
# Malformed files, missing files, the hub fallback
# --------------------------------------------------------------------------------------------

GSM_OK = {"question": "Q?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}
AQUA_OK = {"question": "Q?", "options": ["A)1", "B)2"], "rationale": "r", "correct": "B"}
CSQA_OK = {"id": "x1", "answerKey": "A",
           "question": {"stem": "Q?", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": "b"}]}}


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("gsm8k", "{not json", "not valid JSON"),
        ("gsm8k", {"question": "Q?"}, "missing field 'answer'"),
        ("gsm8k", {"question": "Q?", "answer": "2"}, "####"),
        ("aqua_rat", {**AQUA_OK, "correct": "F"}, "answer key 'F' is not among the options"),
        ("aqua_rat", {**AQUA_OK, "options": ["1", "2"]}, "not of the form"),
        ("commonsenseqa", {**CSQA_OK, "answerKey": "E"}, "answer key 'E' is not among the options"),
        ("commonsenseqa", {"id": "x2", "question": CSQA_OK["question"]}, "missing field 'answerKey'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, name, bad, message) -> None:
    good = {"gsm8k": GSM_OK, "aqua_rat": AQUA_OK, "commonsenseqa": CSQA_OK}[name]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n",
                    encoding="utf-8")
    kw = {"rationale": "none"} if name == "commonsenseqa" else {}
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        load_benchmark(name, "train", str(tmp_path), file=str(path), **kw)


def test_small_files_in_a_data_dir(tmp_path) -> None:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps(GSM_OK) + "\n", encoding="utf-8")
    (row,) = load_benchmark("gsm8k", "test", str(tmp_path))
    assert row == {"id": "gsm8k-test-0", "prompt": f"Q?\n{INSTRUCTION_NUMERIC}",
                   "target": "1+1 = 2\nThe answer is 2.", "reference": "1+1 = 2\nThe answer is 2.", "answer": "2"}
    # file= relative to the dataset folder
    (tmp_path / "gsm8k" / "mine.jsonl").write_text(json.dumps(GSM_OK) + "\n", encoding="utf-8")
    (row,) = load_benchmark("gsm8k", "train", str(tmp_path), file="mine.jsonl")
    assert row["id"] == "gsm8k-mine-0"


def test_unknown_names_and_splits() -> None:
    with pytest.raises(ValueError, match="gsm8k, commonsenseqa, aqua_rat, synthetic"):
        load_benchmark("mmlu", "test")
    with pytest.raises(ValueError, match="no answer keys"):
        load_benchmark("commonsenseqa", "test")
    with pytest.raises(ValueError, match="train, test"):
        load_benchmark("gsm8k", "validation")
    assert set(BENCHMARKS) == {"gsm8k", "commonsenseqa", "aqua_rat", "synthetic"}


def test_missing_file_error_names_paths_hub_and_file_hint(tmp_path, monkeypatch) -> None:
    def no_hub(name, split):
        raise ImportError("No module named 'datasets'")

    monkeypatch.setattr(benchmarks, "_read_hub", no_hub)
    with pytest.raises(FileNotFoundError) as e:
        load_benchmark("aqua_rat", "train", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "aqua" / "train.json") in msg and "deepmind/aqua_rat" in msg and "file=" in msg
    with pytest.raises(FileNotFoundError, match="openai/gsm8k"):
        load_benchmark("gsm8k", "test", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_benchmark("gsm8k", "test", str(tmp_path), file="nowhere.jsonl")


def test_hub_fallback_imports_datasets_lazily(tmp_path, monkeypatch) -> None:
    calls = []

    def load_dataset(*args, split):
        calls.append((args, split))
        return [{"id": "h1", "question": "Where?", "question_concept": "c",
                 "choices": {"label": ["A", "B"], "text": ["here", "there"]}, "answerKey": "B"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (row,) = load_benchmark("commonsenseqa", "validation", str(tmp_path), rationale="none")
    assert calls == [(("tau/commonsense_qa",), "validation")]
    assert row == {"id": "h1", "prompt": f"Where?\n(A) here\n(B) there\n{INSTRUCTION_CHOICE}",
                   "target": "The answer is (B).", "reference": "The answer is (B).", "answer": "B"}


def test_default_data_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LESFT_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("LESFT_DATA_DIR")
    found = default_data_dir()
    assert found == (SHARED if SHARED.is_dir() else found)


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, n_test", [(None, 500), (ArithmeticSpec(min_steps=1, max_steps=1, max_value=9), 10)])
def test_synthetic_splits_share_no_solution_whatever_the_seeds(spec, n_test) -> None:
    test = load_benchmark("synthetic", "test", n=n_test, seed=0, spec=spec)
    validation = load_benchmark("synthetic", "validation", n=n_test, seed=0, spec=spec)
    solutions = {r["reference"] for r in test}
    assert len(solutions) == n_test  # distinct problems, not only distinct prompts
    assert not solutions & {r["reference"] for r in validation}
    for seed in (0, 1, 2, 7):  # train rows of any seed: none has the equations of a test problem
        train = load_benchmark("synthetic", "train", n=800, seed=seed, spec=spec)
        assert len(train) == 800
        assert not solutions & {r["reference"] for r in train}
        assert not {r["reference"] for r in validation} & {r["reference"] for r in train}
    assert test == load_benchmark("synthetic", "test", n=n_test, seed=0, spec=spec)
    for r in train[:5] + test[:5]:
        assert set(r) == KEYS and r["prompt"].endswith("\n" + INSTRUCTION_NUMERIC)
        assert r["target"].endswith(answer_sentence("synthetic", r["answer"]))
        assert check_answer(r) == int(r["answer"])
    assert load_benchmark("synthetic", "train", n=30, seed=7, spec=spec) == train[:30]


def test_synthetic_split_of_a_problem_depends_on_its_equations_only() -> None:
    from lesft.data.synthetic import solution_split

    row = load_benchmark("synthetic", "test", n=1, seed=3)[0]
    renamed = {**row, "prompt": row["prompt"].replace("apples", "pears"), "id": "x"}
    assert solution_split(row) == solution_split(renamed) == "test"


def test_synthetic_test_set_too_large_for_a_tiny_spec_is_refused() -> None:
    spec = ArithmeticSpec(min_steps=1, max_steps=1, max_value=9)
    with pytest.raises(ValueError, match="problem space is too small"):
        load_benchmark("synthetic", "test", n=200, seed=1, spec=spec)
