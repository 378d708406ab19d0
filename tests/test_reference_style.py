"""The synthetic benchmark's reference styles (issue 30, part 2): ``equations`` (default, unchanged bytes) and
``worded`` (the paper's form of x~: a worded solution in another voice, equations inline)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from lesft.config import TrainConfig
from lesft.typed import build_config
from lesft.data.benchmarks import load_benchmark
from lesft.data.rows import load_rows
from lesft.data.synthetic import (_TEMPLATES, ArithmeticSpec, check_answer, generate_arithmetic, solution_key,
                                  solution_split)

WORDED = ArithmeticSpec(reference_style="worded")
WIDE = dict(min_steps=1, max_steps=5, operations=("add", "sub", "mul", "div"))
EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _sha(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def test_default_rows_are_byte_identical_to_before():
    """Hashes of the rows made by the code before reference_style existed (commit f567b32)."""
    assert _sha(generate_arithmetic(300, seed=0)) == "fd71b858887c3341f34b1eb599f4d8594bc2db9f0597b864390decde6b6439ad"
    spec = ArithmeticSpec(min_steps=1, max_steps=4, operations=("add", "sub", "mul", "div"))
    assert _sha(generate_arithmetic(300, seed=3, spec=spec)) == \
        "0d9b4cc2466eed6400f95558530874560233dd8e789e18061396d17f0e71e65c"
    assert _sha(load_benchmark("synthetic", "train", n=200, seed=0)) == \
        "16ee0241a97eeb48616aca0ab3dd6a3ebd0d054521cbe00b29c5945276c7db2f"
    assert _sha(load_benchmark("synthetic", "test", n=500, seed=0)) == \
        "9b8b712f6dde803f568a89f2c87e2612680aa9ac357d6625bc5ee03ae75a71eb"
    assert ArithmeticSpec().reference_style == "equations"


@pytest.mark.parametrize("extra", [{}, WIDE])
def test_worded_changes_only_the_reference(extra):
    plain = generate_arithmetic(300, seed=5, spec=ArithmeticSpec(**extra))
    worded = generate_arithmetic(300, seed=5, spec=ArithmeticSpec(reference_style="worded", **extra))
    for a, b in zip(plain, worded, strict=True):
        assert {k: v for k, v in a.items() if k != "reference"} == {k: v for k, v in b.items() if k != "reference"}
        assert a["reference"] != b["reference"]
        assert solution_key(b) == solution_key(a) == a["reference"]
        assert solution_split(a) == solution_split(b)
        assert check_answer(b) == int(a["answer"])


def test_training_rows_same_selection():
    """The training rows a run draws (load_rows, the evidence study's 200 rows at seeds 0-2) and the test set."""
    for seed in (0, 1, 2):
        a = load_rows("synthetic", 200, seed, ArithmeticSpec())
        b = load_rows("synthetic", 200, seed, WORDED)
        assert [r["id"] for r in a] == [r["id"] for r in b]
        assert [(r["prompt"], r["target"], r["answer"]) for r in a] == [(r["prompt"], r["target"], r["answer"])
                                                                         for r in b]
        assert all(x["reference"] != y["reference"] for x, y in zip(a, b))
    ta, tb = (load_benchmark("synthetic", "test", n=500, seed=0, spec=s) for s in (ArithmeticSpec(), WORDED))
    assert [r["id"] for r in ta] == [r["id"] for r in tb]


@pytest.mark.parametrize("extra", [{}, WIDE])
def test_worded_reference_holds_every_equation(extra):
    for row in generate_arithmetic(300, seed=2, spec=ArithmeticSpec(reference_style="worded", **extra)):
        plain_eqs = [ln for ln in solution_key(row).split("\n")[:-1]]
        inline = [" ".join(m[:3]) + " = " + m[3] for m in EQ.findall(row["reference"])]
        assert inline == plain_eqs and plain_eqs
        target_eqs = [" ".join(m[:3]) + " = " + m[3] for m in EQ.findall(row["target"])]
        assert inline == target_eqs
        assert row["reference"].endswith(f"\n#### {row['answer']}")


def _clauses(text: str) -> set[str]:
    """Word sequences of a text with the numbers and equations taken out, split at sentence and clause marks."""
    text = EQ.sub("#", text)
    text = re.sub(r"\d+", "#", text)
    return {c.strip().lower() for c in re.split(r"[.,\n]", text) if c.strip() and c.strip() not in ("#",)}


def test_worded_reference_has_another_voice():
    """No sentence or clause of the worded reference is one of the target's (numbers aside), for any row; and
    none of the target's template clauses (with any person) appears in a reference."""
    rows = generate_arithmetic(500, seed=9, spec=ArithmeticSpec(reference_style="worded", **WIDE))
    target_clauses = set().union(*(_clauses(r["target"]) for r in rows))
    for row in rows:
        assert not _clauses(row["reference"]) & target_clauses, row
        ref = row["reference"].lower()
        assert "the answer is" not in ref and " so " not in ref and "starts with" not in ref
    stems = {c.split("{n}")[0].replace("{P} ", "").strip().lower() for ts in _TEMPLATES.values() for _, c in ts}
    for row in rows:
        for stem in stems:
            if len(stem) > 4:
                assert stem not in row["reference"].lower(), stem


def test_config_option():
    cfg = build_config(TrainConfig, None, {"synthetic.reference_style": "worded"})
    assert cfg.synthetic.reference_style == "worded"
    assert build_config(TrainConfig, None, {}).synthetic.reference_style == "equations"
    with pytest.raises(ValueError, match="reference_style"):
        ArithmeticSpec(reference_style="bare")


def test_contamination_keys_see_the_equations_in_either_style() -> None:
    """A worded reference gives the same problem keys as the bare equations of the same problem (prompt and
    equations), so the contamination check covers runs trained with either style."""
    import dataclasses

    from lesft.data.contamination import problem_keys
    from lesft.data.synthetic import ArithmeticSpec, generate_arithmetic

    bare = generate_arithmetic(20, seed=3)
    worded = generate_arithmetic(20, seed=3, spec=dataclasses.replace(ArithmeticSpec(), reference_style="worded"))
    assert all(len(problem_keys(b)) == 2 and problem_keys(b) == problem_keys(w) for b, w in zip(bare, worded))
