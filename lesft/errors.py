"""What kind of wrong a generated answer is, read from its worked equations alone (no gold solution needed).

A completion of an arithmetic problem (the synthetic benchmark, GSM8K) states its steps as ``a op b = c``.
:func:`error_kind` sorts an answer into one of :data:`ERROR_KINDS`:

- ``correct``: the extracted answer is right (whatever its equations say);
- ``slip``: wrong, and at least one stated equation is false (``7 * 4 = 24``): an arithmetic error;
- ``reasoning``: wrong, every stated equation true: a wrong operation, operand or number of steps;
- ``no equation``: wrong, and no equation at all.

:func:`describe` adds the shape of the answer: its length, its equations, and whether it opens by restating the
problem (a first sentence without an equation, like the synthetic targets' "Tom starts with 5 cookies.").
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["ERROR_KINDS", "EQUATION", "equations", "error_kind", "describe"]

ERROR_KINDS = ("correct", "slip", "reasoning", "no equation")

_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?)"
#: One stated ``a op b = c`` (groups: a, op, b, c), anywhere in a text.
EQUATION = re.compile(_NUMBER + r"\s*([-+*/×x÷])\s*" + _NUMBER + r"\s*=\s*\$?" + _NUMBER)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _num(s: str) -> Fraction:
    return Fraction(s.replace(",", ""))


def equations(text: str) -> list[tuple[Fraction, str, Fraction, Fraction, bool]]:
    """Every ``a op b = c`` in ``text`` as ``(a, op, b, c, true?)``; ``op`` one of ``+ - * /`` (``×``/``x`` read
    as ``*``, ``÷`` as ``/``). A division by zero is false."""
    out = []
    for m in EQUATION.finditer(text):
        a, op, b, c = _num(m[1]), m[2], _num(m[3]), _num(m[4])
        op = {"×": "*", "x": "*", "÷": "/"}.get(op, op)
        value = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                 "/": lambda: a / b if b else None}[op]()
        out.append((a, op, b, c, value == c))
    return out


def _kind(eqs: list[tuple[Fraction, str, Fraction, Fraction, bool]], correct: bool) -> str:
    if correct:
        return "correct"
    if not eqs:
        return "no equation"
    return "slip" if not all(ok for *_, ok in eqs) else "reasoning"


def error_kind(completion: str, correct: bool) -> str:
    """One of :data:`ERROR_KINDS` for an answer whose correctness the evaluation already decided."""
    return _kind(equations(completion), correct)


def describe(completion: str, correct: bool) -> dict[str, float | str]:
    """``{kind, chars, equations, restates}`` of one answer: its :func:`error_kind`, its length in characters,
    its number of equations, and 1.0 when it computes but its first sentence holds no equation (it restates the
    problem before computing)."""
    text = completion.strip()
    first = _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""
    eqs = equations(text)
    return {"kind": _kind(eqs, correct), "chars": float(len(text)), "equations": float(len(eqs)),
            "restates": float(bool(eqs) and not EQUATION.search(first))}
