"""Error kinds of generated answers (lesft.errors) and the report's Answers section, against hand counts."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

from lesft.errors import describe, equations, error_kind
from lesft.report import write_report


def test_equations_are_checked_exactly() -> None:
    eqs = equations("He has 9 * 5 = 45 apples, then 45 + 15 = 61, then 7 x 3 = 21 and 10 / 4 = 2.5; 3 / 0 = 0.")
    assert [(a, op, b, c, ok) for a, op, b, c, ok in eqs] == [
        (9, "*", 5, 45, True), (45, "+", 15, 61, False), (7, "*", 3, 21, True),
        (10, "/", 4, Fraction(5, 2), True), (3, "/", 0, 0, False)]
    assert equations("1,200 - 200 = 1,000")[0][4] is True
    assert equations("no arithmetic here") == []


def test_error_kind_by_hand() -> None:
    right = "Tom starts with 5 cookies. He buys 4 more, so he has 5 + 4 = 9 cookies. The answer is 9."
    assert error_kind(right, True) == "correct"
    assert error_kind("So 5 + 4 = 10. The answer is 10.", False) == "slip"
    assert error_kind("So 5 * 4 = 20. The answer is 20.", False) == "reasoning"  # true equation, wrong operation
    assert error_kind("The answer is 7.", False) == "no equation"
    assert error_kind("So 5 + 4 = 10. The answer is 9.", True) == "correct"  # the evaluation decides correctness


def test_describe_shape() -> None:
    text = "Tom starts with 5 cookies. He buys 4 more, so he has 5 + 4 = 9 cookies."  # 26 + 1 + 44 characters
    assert describe(text, True) == {"kind": "correct", "chars": 71.0, "equations": 1.0, "restates": 1.0}
    assert describe("Tom has 5 + 4 = 9 cookies. The answer is 9.", True)["restates"] == 0.0
    assert describe("", False) == {"kind": "no equation", "chars": 0.0, "equations": 0.0, "restates": 0.0}


def test_report_answers_section_by_hand(tmp_path: Path) -> None:
    answers = {  # (completion, correct)
        "splitlora": [("Tom starts with 5. So 5 + 4 = 9. The answer is 9.", True),
                      ("Anna starts with 3. So 3 * 2 = 7. The answer is 7.", False)],
        "lesft": [("So 5 + 4 = 9. The answer is 9.", True), ("So 3 + 2 = 5. The answer is 5.", False),
                  ("The answer is 1.", False), ("So 3 * 2 = 5. The answer is 5.", False)],
    }
    for method, recs in answers.items():
        d = tmp_path / f"method={method}"
        (d / "eval").mkdir(parents=True)
        (d / "config.yaml").write_text(json.dumps({"method": method, "seed": 0}))
        k = sum(c for _, c in recs)
        (d / "eval" / "eval.json").write_text(json.dumps({"dataset": "synthetic", "split": "test", "mode": "generate",
                                                          "n": len(recs), "correct": k, "accuracy": k / len(recs)}))
        (d / "eval" / "predictions.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "completion": t, "correct": c}) + "\n" for i, (t, c) in enumerate(recs)))
    text = write_report(str(tmp_path)).read_text().split("## Answers", 1)[1].split("##", 1)[0]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]]
            for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")}
    # lesft: 1 correct, 1 reasoning (3 + 2 = 5 true), 1 no equation, 1 slip (3 * 2 = 5) of 4
    assert rows["lesft"][:5] == ["4", "25.0", "25.0", "25.0", "25.0"]
    assert rows["lesft"][6:] == ["0.75", "0"]
    # splitlora: 1 correct, 1 slip; both open with a restatement; 1 equation each
    assert rows["splitlora"][:5] == ["2", "50.0", "50.0", "0.0", "0.0"]
    assert rows["splitlora"][6:] == ["1.00", "100"]
    mean_chars = sum(len(t) for t, _ in answers["splitlora"]) / 2
    assert rows["splitlora"][5] == f"{mean_chars:.0f}"
