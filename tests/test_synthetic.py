"""Tests for the synthetic arithmetic benchmark (lesft.data.synthetic)."""

from __future__ import annotations

import re

import pytest

from lesft.data.synthetic import ArithmeticSpec, check_answer, generate_arithmetic

FIELDS = {"id", "prompt", "target", "reference", "answer"}
EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")

SPECS = [
    ArithmeticSpec(),
    ArithmeticSpec(min_steps=1, max_steps=1),
    ArithmeticSpec(min_steps=1, max_steps=5, operations=("add", "sub", "mul", "div")),
    ArithmeticSpec(min_steps=3, max_steps=4, max_value=50, operations=("sub", "div", "mul")),
    ArithmeticSpec(min_steps=2, max_steps=3, max_value=12, operations=("div",)),
    ArithmeticSpec(min_steps=4, max_steps=6, max_value=9, operations=("add", "sub")),
]


def _independent_eval(a: int, sym: str, b: int) -> int:
    """Recompute one step without the module's helpers; division must be exact."""
    if sym == "+":
        return a + b
    if sym == "-":
        return a - b
    if sym == "*":
        return a * b
    assert b != 0 and a % b == 0, f"inexact division {a} / {b}"
    return a // b


def _target_equations(target: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), s, int(b), int(c)) for a, s, b, c in EQ.findall(target)]


def _reference_equations(reference: str) -> list[tuple[int, str, int, int]]:
    lines = reference.split("\n")
    assert lines[-1].startswith("Answer: ")
    out = []
    for line in lines[:-1]:
        m = EQ.fullmatch(line)
        assert m, f"bad reference line {line!r}"
        out.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return out


def test_deterministic_same_seed():
    spec = ArithmeticSpec(min_steps=1, max_steps=4, operations=("add", "sub", "mul", "div"))
    assert generate_arithmetic(50, seed=7, spec=spec) == generate_arithmetic(50, seed=7, spec=spec)
    # prefix-stable: fewer rows are a prefix of more rows
    assert generate_arithmetic(20, seed=7, spec=spec) == generate_arithmetic(50, seed=7, spec=spec)[:20]


def test_different_seeds_differ():
    a = generate_arithmetic(50, seed=0)
    b = generate_arithmetic(50, seed=1)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]
    # not just a shuffle / offset: most problems are new
    assert len({r["prompt"] for r in a} & {r["prompt"] for r in b}) < 10
    assert a[3]["id"] == "arith-0-3" and b[3]["id"] == "arith-1-3"


def test_does_not_touch_global_rng():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_arithmetic(20, seed=5)
    assert random.random() == expected


def test_zero_rows():
    assert generate_arithmetic(0, seed=3) == []


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.min_steps}-{s.max_steps}-{'+'.join(s.operations)}")
def test_rows_are_exact_and_consistent(spec):
    rows = generate_arithmetic(500, seed=11, spec=spec)
    assert len(rows) == 500
    seen_steps = set()
    symbols = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
    allowed = {symbols[op] for op in spec.operations}
    for i, row in enumerate(rows):
        assert set(row) == FIELDS
        assert all(isinstance(v, str) for v in row.values())
        assert row["id"] == f"arith-11-{i}"
        answer = int(row["answer"])
        assert row["answer"] == str(answer)

        # 1. the module's own checker, from the reference
        assert check_answer(row) == answer

        # 2. independently, from the target's chain of thought
        eqs = _target_equations(row["target"])
        assert eqs == _reference_equations(row["reference"])
        assert spec.min_steps <= len(eqs) <= spec.max_steps
        seen_steps.add(len(eqs))
        start = int(re.search(r"\d+", row["prompt"])[0])
        assert 1 <= start <= spec.max_value
        value = start
        for a, sym, b, c in eqs:
            assert a == value
            assert sym in allowed
            assert _independent_eval(a, sym, b) == c
            assert 0 <= c <= spec.max_running
            if sym in "+-":
                assert 1 <= b <= spec.max_value
            else:
                assert 2 <= b <= min(spec.max_factor, spec.max_value)
            value = c
        assert value == answer
        assert row["target"].endswith(f"The answer is {answer}.")
        assert row["target"].count("The answer is") == 1
        assert row["reference"].endswith(f"\nAnswer: {answer}")

        # prompt shape: a single question at the end
        assert row["prompt"].endswith(" have now?")
        assert row["prompt"].count("?") == 1
    # steps are drawn over the whole [min, max] range
    assert seen_steps == set(range(spec.min_steps, spec.max_steps + 1))


def test_all_operations_and_templates_appear():
    spec = ArithmeticSpec(min_steps=1, max_steps=3, operations=("add", "sub", "mul", "div"))
    rows = generate_arithmetic(500, seed=2, spec=spec)
    text = "\n".join(r["reference"] for r in rows)
    for sym in "+-*/":
        assert f" {sym} " in text
    prompts = " ".join(r["prompt"] for r in rows)
    for phrase in ("buys", "finds", "gives away", "loses", "times as many", "equal groups", "equally between"):
        assert phrase in prompts


def test_hand_checked_row():
    # One add step: "X has a things. He/She <verb> b more things. How many ...?" with answer a + b.
    spec = ArithmeticSpec(min_steps=1, max_steps=1, operations=("add",))
    (row,) = generate_arithmetic(1, seed=42, spec=spec)
    a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
    assert row["answer"] == str(a + b)
    assert row["reference"] == f"{a} + {b} = {a + b}\nAnswer: {a + b}"
    name = row["prompt"].split()[0]
    assert row["prompt"].endswith(f"does {name} have now?")
    assert row["target"].startswith(f"{name} starts with {a} ")
    assert f"{a} + {b} = {a + b} " in row["target"]
    assert row["target"].endswith(f"The answer is {a + b}.")
    assert row["id"] == "arith-42-0"

    # The default benchmark's first row, worked by hand (golden: changes here change the benchmark).
    row = generate_arithmetic(1, seed=0)[0]
    assert row == {
        "id": "arith-0-0",
        "prompt": "Max has 9 apples. He trades each apple for 5 new apples. Then he loses 10 apples. "
        "How many apples does Max have now?",
        "target": "Max starts with 9 apples. He trades each one for 5, so he has 9 * 5 = 45 apples. "
        "He loses 10, so he has 45 - 10 = 35 apples. The answer is 35.",
        "reference": "9 * 5 = 45\n45 - 10 = 35\nAnswer: 35",
        "answer": "35",
    }
    assert 9 * 5 - 10 == 35 == check_answer(row)


def test_singular_grammar():
    rows = generate_arithmetic(500, seed=4, spec=ArithmeticSpec(min_steps=3, max_steps=3, max_value=6,
                                                                operations=("sub", "div")))
    text = " ".join(r["prompt"] + " " + r["target"] for r in rows)
    assert re.search(r"\b1 (apple|pencil|sticker|marble|book|cookie|coin|card)\b", text)
    assert not re.search(r"\b1 (apples|pencils|stickers|marbles|books|cookies|coins|cards|friends)\b", text)


@pytest.mark.parametrize(
    "row_patch, message",
    [
        ({"answer": "36"}, "answer"),
        ({"reference": "9 * 5 = 45\n45 - 10 = 36\nAnswer: 36"}, "wrong equation"),
        ({"reference": "9 * 5 = 45\n44 - 10 = 34\nAnswer: 34"}, "previous result"),
        ({"reference": "9 * 5 = 45\n45 - 10 = 35\nAnswer: 34"}, "final line"),
        ({"reference": "9 * 5 = 45\n45 / 10 = 4\nAnswer: 4"}, "inexact"),
        ({"reference": "9 * 5 = 45\n45 - 10 = 35"}, "malformed"),
        ({"reference": "Answer: 35"}, "at least one"),
        ({"prompt": "Max has 8 apples."}, "start value"),
    ],
)
def test_check_answer_rejects_inconsistent_rows(row_patch, message):
    row = dict(generate_arithmetic(1, seed=0)[0])
    check_answer(row)
    row.update(row_patch)
    with pytest.raises(ValueError, match=message):
        check_answer(row)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_steps": 0}, "min_steps"),
        ({"min_steps": 3, "max_steps": 2}, "max_steps"),
        ({"max_value": 1}, "max_value"),
        ({"operations": ()}, "operations"),
        ({"operations": ("add", "pow")}, "operations"),
        ({"operations": "add"}, "operations"),
        ({"max_factor": 1}, "max_factor"),
        ({"max_running": 10}, "max_running"),
        ({"min_steps": 1.5}, "min_steps"),
    ],
)
def test_bad_spec_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArithmeticSpec(**kwargs)


def test_bad_n_raises():
    with pytest.raises(ValueError, match="n must be"):
        generate_arithmetic(-1)
    with pytest.raises(ValueError, match="spec"):
        generate_arithmetic(1, spec={"min_steps": 1})


def test_infeasible_spec_raises():
    # only halving-style divisions with a tiny start range cannot make 8 steps
    with pytest.raises(ValueError, match="cannot produce"):
        generate_arithmetic(1, spec=ArithmeticSpec(min_steps=8, max_steps=8, operations=("div",)))
