"""Final-answer extraction from model completions, and answer comparison (pure Python, no torch).

``extract_answer(dataset, completion)`` returns the canonical answer a completion commits to, or
``None``; ``is_correct(dataset, predicted, gold)`` compares it with a gold answer.

Numeric datasets (``gsm8k``, ``synthetic``) -- the result is a canonical number string (see
:func:`normalize_number`). Rules, in priority order:

1. **Answer statements.** A statement is a marker -- ``####``, ``\\boxed{``, or ``answer`` (optionally
   ``final``/``correct``/``right``) followed by ``is``/``was``/``would be``/``should be``/
   ``will be``/``must be``/``=``/``:``, with markdown bold allowed around it (``**Answer:** 18``,
   ``**Answer**: 18``), or a ``Final Answer`` heading line -- followed by a number in the same
   sentence. The statement's *window* runs from the marker to the end of its line (or, when
   nothing follows the marker on its line, to the end of the next non-empty line) and stops at the
   first sentence end (``.``/``!``/``?``/``;`` followed by whitespace). The statement's number is
   the **first number** in the window (``The answer is 18 apples.`` -> 18, ``The answer is
   $1,234.56.`` -> 1234.56), except that when that number starts an arithmetic chain that reaches
   ``=`` the result after the last ``=`` is taken (``The answer is 5 + 7 = 12.`` -> 12). A marker
   with no number in its window is not a statement (``The answer is below.``). If there are several
   statements, the **last** one wins (so a correction ``... The answer is 20.`` after ``The answer
   is 18.`` gives 20).

   **Numbers after the last statement are ignored**: rambling or double-checking after the
   statement (``The answer is 18. Let me double-check: 9 + 9 = 18, and 20 - 2 = 18``) never
   overrides it, whatever numbers it contains -- only a later *statement* does.

   A hallucinated next question ends the completion: at a line starting with ``Question``/``Q``/
   ``Problem`` (optionally numbered) and ``:``/``.``/``)``, a ``Human:``/``User:`` turn, or
   ``Next question``, the text before it is used alone when it already holds a statement or ends
   with a line that is just a number -- so ``The answer is 12. Next question: ... The answer is
   40.`` gives 12.

   A bare ``Answer:`` at the very start of the completion that is followed by prose rather than
   directly by a number (a few-shot ``Answer:`` prompt echoed by the model, ``Answer: Janet has
   16 eggs. ...``) is not a statement.

2. **Final bare number.** Otherwise the last number anywhere in the completion.

Numbers in text: optional ``-`` (unicode minus is mapped to ``-``; a ``-`` glued to a preceding
word/digit, as in ``10-3``, is a subtraction, not a sign), optional ``$``, digits with optional
comma thousands groups (``1,234``), optional decimals, optional ``/denominator`` (``3/4``). LaTeX
``\\frac{a}{b}``, ``\\$``, ``\\%`` and ``1{,}000`` are understood. ``%`` is dropped (``50%`` -> 50).
Space-grouped thousands (``1 000``) are accepted by :func:`normalize_number` but not found inside
running text (too ambiguous there: ``3 400-page books``).

Multiple-choice datasets (``commonsenseqa``, ``aqua_rat``; letters A-E) -- the result is an uppercase
letter. Rules, in priority order (the next-question cut above applies here too):

1. **Answer statements**, the **last** one wins: ``answer is``/``answer:``/``answer would be``/...
   (optionally ``correct``/``final``/``best`` and ``choice``/``option``: ``The correct answer
   choice is``), ``the correct/best/right/... option|choice is``, ``I would choose/pick/go with``,
   ``\\boxed{``. The letter directly after the marker (markdown, ``$``, ``option``/``choice`` and
   brackets allowed in between: ``The answer is (c).``, ``**Answer: E**``, ``the answer is B) 25``,
   ``Answer: Option C``); failing that, the first letter *label* in the statement's sentence
   (``(B)``, ``B)``, or an isolated capital ``B``: ``The answer is library (B).``, ``The answer is
   likely C.``). ``(A) and (B) are wrong, the answer is (C)`` -> C.
2. **Final label line**: the last non-empty line starts with a label -- ``(B) library``,
   ``B) library``, ``B. library``, ``B: library``, ``B - library``, ``B``, ``**b**``, ``Option A``
   -- unless it closes a list of choices (the line before opens with another label).
3. The last ``option X``/``choice X`` mention that is not a line-leading enumeration item
   (``Option A: bank`` at the start of a line is one) -- ``..., which matches option B.``
4. The only distinct capital bracketed label ``(X)`` of the last non-empty line, else of the
   whole completion (``I think (C) makes the most sense.``).
5. Otherwise ``None``.

Article guard: an unbracketed ``A``/``a`` followed on the same line by a word is the English
article, not an answer (``The answer is: A revolving door``, ``a person``), unless that word is a
connective (``because``, ``since``, ``as``, ``is``, ``which``, ...: ``The answer is A because``).
``A.``/``A)``/``(A)``/``A`` at the end are labels. Lowercase letters count only when bracketed
(``(c)``, ``c)``), right after a marker or ``option``, or opening the final line; an isolated
capital elsewhere in a statement's sentence counts. Letters outside A-E never count.
"""

from __future__ import annotations

import re
from fractions import Fraction

from lesft.data.registry import BENCHMARKS, answer_kind

__all__ = ["DATASETS", "extract_answer", "is_correct", "normalize_number"]

DATASETS = tuple(BENCHMARKS)  # the built-in four; a registered benchmark is known by lesft.data.registry


def _numeric(dataset: str) -> bool:
    """Whether ``dataset`` has numeric answers (else option letters); refuses an unknown name."""
    return answer_kind(dataset) == "numeric"


# --------------------------------------------------------------------------------------------
# Text preparation
# --------------------------------------------------------------------------------------------

_CHAR_MAP = str.maketrans({
    "\u2212": "-",  # minus sign
    "\ufe63": "-",  # small hyphen-minus
    "\uff0d": "-",  # fullwidth hyphen-minus
    "\uff04": "$",  # fullwidth dollar
    "\u00a0": " ",  # no-break space
    "\u202f": " ",  # narrow no-break space
    "\u2009": " ",  # thin space
    "\uff1a": ":",  # fullwidth colon
})
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_THIN = re.compile(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3})")


def _prep(text: str) -> str:
    text = text.translate(_CHAR_MAP)
    text = _FRAC.sub(lambda m: f"{m.group(1).strip()}/{m.group(2).strip()}", text)
    text = _LATEX_THIN.sub(",", text)
    return text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "")


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_NUM_FULL = re.compile(
    r"""
    (?P<s1>[-+]?)\s*(?:[$€£¥]\s*)?(?P<s2>[-+]?)
    (?:(?P<int>\d{1,3}(?:,\d{3})+|\d{1,3}(?:\ \d{3})+|\d+)(?:\.(?P<frac>\d*))?|\.(?P<frac2>\d+))
    (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?
    \s*%?
    """,
    re.X,
)


_MAX_DIGITS = 200  # longer digit runs are not answers (and int() refuses > 4300 digits)


def _format(value: Fraction) -> str:
    """Canonical string: exact decimal without trailing zeros when it terminates, else ``p/q``."""
    sign = "-" if value < 0 else ""
    num, den = abs(value.numerator), value.denominator
    rest, twos, fives = den, 0, 0
    while rest % 2 == 0:
        rest //= 2
        twos += 1
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    if rest != 1:
        return f"{sign}{num}/{den}"
    k = max(twos, fives)
    digits = str(num * 10**k // den)
    if k == 0:
        return sign + digits
    digits = digits.rjust(k + 1, "0")
    return f"{sign}{digits[:-k]}.{digits[-k:]}"


def normalize_number(text: str) -> str | None:
    """Canonical form of a number written as ``text``, or ``None`` when ``text`` is not one number.

    ``"1,234"`` -> ``"1234"``, ``"$18.00"`` -> ``"18"``, ``"18.0"`` -> ``"18"``, ``"-3.50"`` ->
    ``"-3.5"``, ``"\u22123"`` (unicode minus) -> ``"-3"``, ``"50%"`` -> ``"50"``, ``".5"`` -> ``"0.5"``,
    ``"1 000"`` -> ``"1000"``, ``"**18**"``/``"(18)"``/``"18."`` -> ``"18"``. Fractions are
    evaluated: ``"1/2"`` and ``"\\frac{1}{2}"`` -> ``"0.5"``, ``"6/4"`` -> ``"1.5"``; a fraction
    with no terminating decimal stays a reduced fraction (``"2/6"`` -> ``"1/3"``); ``"1/0"`` ->
    ``None``. ``"-0"`` -> ``"0"``. Words, several numbers, scientific notation or more than 200
    digits -> ``None``.
    """
    if not isinstance(text, str):
        return None
    s = _prep(text).strip().strip("*_`'\"").strip()
    if s.startswith(("(", "[")) and s.endswith((")", "]")):
        s = s[1:-1].strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    m = _NUM_FULL.fullmatch(s)
    if m is None or (m["s1"] and m["s2"]):
        return None
    int_part = (m["int"] or "0").replace(",", "").replace(" ", "")
    frac_part = m["frac"] if m["frac"] is not None else (m["frac2"] or "")
    if len(int_part) + len(frac_part) + len(m["den"] or "") > _MAX_DIGITS:
        return None
    value = Fraction(f"{int_part}.{frac_part}" if frac_part else int_part)
    if m["den"] is not None:
        den = Fraction(m["den"])
        if den == 0:
            return None
        value /= den
    if "-" in (m["s1"] + m["s2"]):
        value = -value
    return _format(value)


# A number inside running text: optional sign (not glued to a preceding word/digit/bracket),
# optional $, digits with comma groups or plain, optional decimals, optional /denominator.
_NUM_CORE = (
    r"(?:-?(?:\$[ ]?)?-?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?(?![\d/]))?)"
)
_NUM = re.compile(r"(?<![\w.)\]])" + _NUM_CORE)
_CHAIN = re.compile(r"[ \t]*([-+*/×x÷·=])[ \t]*(" + _NUM_CORE + ")")

_NUM_MARKER = re.compile(
    r"""
      \#{4,}
    | \\boxed\s*\{
    | \b(?:(?:final|correct|right)\s+)?answer
      (?:\s+(?:to|for)\s+(?:the|this)\s+(?:question|problem))?
      \s*(?:(?:\*\*|__)\s*)?
      (?:is\b|was\b|would\s+be\b|should\s+be\b|will\s+be\b|must\s+be\b|=|:)
    | \bfinal\s+answer(?:[ \t]*(?:\*\*|__|\#))*[ \t]*(?=\n)
    """,
    re.I | re.X,
)
_SENTENCE_END = re.compile(r"[.!?;](?=\s)")
_NON_SPACE = re.compile(r"\S")
_NOT_JUNK = re.compile(r"[^ \t*_:]")
_MAX_WINDOW = 300  # characters of a statement window (a statement's answer comes soon after it)
_LEADING_JUNK = re.compile(r"[\s*_#>]*")
_ECHO = re.compile(r"[\s*_#>]*answer\s*(?:(?:\*\*|__)\s*)?:", re.I)
_NUM_DIRECT_GAP = re.compile(r"[\s*_:=(\[{~≈]*")


def _window(text: str, start: int) -> tuple[int, int]:
    """The statement window after a marker ending at ``start``: the rest of its line (or the next
    non-empty line when only whitespace/markdown follows the marker), at most ``_MAX_WINDOW``
    characters, up to the first sentence end."""
    line_end = text.find("\n", start)
    if line_end < 0:
        line_end = len(text)
    ws = start
    if _NOT_JUNK.search(text, start, line_end) is None:
        nxt = _NON_SPACE.search(text, line_end)
        if nxt is None:
            return len(text), len(text)
        ws = nxt.start()
        line_end = text.find("\n", ws)
        if line_end < 0:
            line_end = len(text)
    line_end = min(line_end, ws + _MAX_WINDOW)
    cut = _SENTENCE_END.search(text, ws, line_end)
    return ws, cut.start() if cut else line_end


def _is_echo(text: str, marker: re.Match[str], lead: int) -> bool:
    """A bare ``Answer:`` opening the completion (a prompt-format echo)."""
    return lead >= marker.start() and _ECHO.match(text, 0, marker.end()) is not None


def _number_statements(text: str) -> list[str]:
    found = []
    lead = _LEADING_JUNK.match(text).end()  # end of the leading whitespace/markdown
    for marker in _NUM_MARKER.finditer(text):
        ws, we = _window(text, marker.end())
        num = _NUM.search(text, ws, we)
        if num is None:
            continue
        direct = _NUM_DIRECT_GAP.fullmatch(text, marker.end(), num.start()) is not None
        if not direct and _is_echo(text, marker, lead):
            continue
        value, pos = num.group(), num.end()
        while (step := _CHAIN.match(text, pos, we)) is not None:
            if step.group(1) == "=":  # only "=" sets the result: "5 + 7 = 12" -> 12
                value = step.group(2)
            pos = step.end()
        normalized = normalize_number(value)
        if normalized is not None:
            found.append(normalized)
    return found


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _numeric_core(text: str, strict: bool) -> str | None:
    statements = _number_statements(text)
    if statements:
        return statements[-1]
    if strict:  # only a line that is just a number counts as an answer before a new question
        return normalize_number(_last_line(text))
    numbers = _NUM.findall(text)
    for raw in reversed(numbers):
        if (value := normalize_number(raw)) is not None:
            return value
    return None


# --------------------------------------------------------------------------------------------
# Multiple choice letters
# --------------------------------------------------------------------------------------------

_CONNECTIVES = frozenset({
    "because", "since", "as", "is", "was", "which", "and", "or", "with", "from", "in", "for",
    "option", "choice", "it", "this", "that", "seems", "makes", "fits", "best",
})
_MC_MARKER = re.compile(
    r"""
      \b(?:(?:final|correct|right|best)\s+)?answer(?:\s+(?:choice|option|letter))?
      \s*(?:(?:\*\*|__)\s*)?
      (?:is\b|was\b|would\s+be\b|should\s+be\b|will\s+be\b|must\s+be\b|=|:)
    | \b(?:correct|best|right|final|likely|appropriate|suitable|logical|reasonable|sensible)\s+
      (?:option|choice|letter)\s*(?:(?:\*\*|__)\s*)?(?:is\b|would\s+be\b|should\s+be\b|must\s+be\b|=|:)
    | \bI(?:\s*(?:would|will|'d|’d))?\s*(?:choose|pick|select|go\s+with)\b
    | \\boxed\s*\{
    """,
    re.I | re.X,
)
_LABEL_TAIL = r"(?![A-Za-z0-9'’])(?!\.\w)(?!-\S)"
_MC_DIRECT = re.compile(
    r"(?:[\s*_:=\"'`~$]|[-–—](?=\s)|\\boxed\s*\{|\\text(?:bf)?\s*\{|\\mathrm\s*\{"
    r"|(?i:option|choice|letter)\b|\#)*"
    r"(?:[(\[]\s*(?P<b>[A-Ea-e])\s*[)\]]|(?P<p>[A-Ea-e])\)|(?P<l>[A-Ea-e])" + _LABEL_TAIL + ")"
)
_MC_LABEL = re.compile(
    r"(?<![A-Za-z0-9'’])(?:[(\[]\s*(?P<b>[A-Ea-e])\s*[)\]]|(?P<p>[A-Ea-e])\)|(?P<l>[A-E])" + _LABEL_TAIL + ")"
)
_MC_LINE = re.compile(
    r"[\s>*_#•-]*(?:"
    r"(?i:option|choice|answer)\s*(?:[:#]\s*)?(?:[(\[]\s*)?(?P<o>[A-Ea-e])(?![A-Za-z0-9'’])"
    r"|[(\[]\s*(?P<b>[A-Ea-e])\s*[)\]]"
    r"|(?P<p>[A-Ea-e])[).:](?!\w)"
    r"|(?P<l>[A-Ea-e])(?=[\s*_]*$)"
    r"|(?P<d>[A-Ea-e])[ \t]+[-–—][ \t]"
    r")"
)
_MC_OPTION = re.compile(r"(?<![A-Za-z])(?i:option|choice)\s*(?:[:#]\s*)?(?:[(\[]\s*)?(?P<l>[A-Ea-e])" + _LABEL_TAIL)
_ENUM_TAIL = re.compile(r"[ \t*]*[:.)\-–—]")  # "Option A: bank" / "Option B) library" list items
_MC_BRACKET = re.compile(r"\(([A-E])\)")
_WORD_AFTER = re.compile(r"[ \t]+([A-Za-z]+)")


def _article(text: str, match: re.Match[str], group: str) -> bool:
    """Whether an unbracketed a/A label is really the English article ("a person")."""
    if match.group(group).upper() != "A":
        return False
    word = _WORD_AFTER.match(text, match.end(group))
    return word is not None and word.group(1).lower() not in _CONNECTIVES


def _label_from(match: re.Match[str], text: str) -> str | None:
    for group in ("b", "p"):
        if group in match.re.groupindex and match.group(group):
            return match.group(group).upper()
    for group in ("o", "l", "d"):
        if group in match.re.groupindex and match.group(group):
            return None if _article(text, match, group) else match.group(group).upper()
    return None


def _letter_statements(text: str) -> list[str]:
    found = []
    lead = _LEADING_JUNK.match(text).end()  # end of the leading whitespace/markdown
    for marker in _MC_MARKER.finditer(text):
        ws, we = _window(text, marker.end())
        direct = _MC_DIRECT.match(text, marker.end(), max(we, marker.end()))
        letter = _label_from(direct, text) if direct else None
        if letter is None and not _is_echo(text, marker, lead):
            for label in _MC_LABEL.finditer(text, ws, we):
                if (letter := _label_from(label, text)) is not None:
                    break
        if letter is not None:
            found.append(letter)
    return found


def _line_label(line: str) -> str | None:
    m = _MC_LINE.match(line)
    return _label_from(m, line) if m else None


def _final_line_label(text: str) -> str | None:
    """The label opening the last non-empty line, unless that line ends a list of choices (the
    line before it opens with a different label: ``A) bank / B) library / ... / E) park``)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or (letter := _line_label(lines[-1])) is None:
        return None
    if len(lines) > 1 and (previous := _line_label(lines[-2])) is not None and previous != letter:
        return None
    return letter


def _choice_core(text: str, strict: bool) -> str | None:
    statements = _letter_statements(text)
    if statements:
        return statements[-1]
    if (letter := _final_line_label(text)) is not None or strict:
        return letter
    for m in reversed(list(_MC_OPTION.finditer(text))):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if text[line_start:m.start()].strip(" \t*_#>•-") == "" and _ENUM_TAIL.match(text, m.end()):
            continue  # "Option A: bank" enumerating the choices
        if (letter := _label_from(m, text)) is not None:
            return letter
    for scope in (_last_line(text), text):
        letters = set(_MC_BRACKET.findall(scope))
        if len(letters) == 1:
            return letters.pop()
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

_NEW_QUESTION = re.compile(
    r"(?:^|\n)[ \t>*#_]*(?:question|problem|q)(?:[ \t]*\d+)?[ \t]*[:.)]"
    r"|\bnext\s+question\b"
    r"|(?:^|\n)[ \t>*#]*(?:human|user)[ \t]*:",
    re.I,
)


_MAX_CUTS = 20  # new-question markers tried (each costs one pass over the text before it)


def extract_answer(dataset: str, completion: str) -> str | None:
    """The answer ``completion`` commits to for ``dataset`` (see the module docstring for the rules):
    a canonical number string for gsm8k/synthetic, an uppercase letter A-E for commonsenseqa/aqua_rat,
    ``None`` when nothing is found. Raises ``ValueError`` for an unknown dataset."""
    numeric = _numeric(dataset)
    if not completion:
        return None
    core = _numeric_core if numeric else _choice_core
    text = _prep(completion)
    for i, m in enumerate(_NEW_QUESTION.finditer(text)):
        if i >= _MAX_CUTS:
            break
        prefix = text[: m.start()]
        if prefix.strip() and (answer := core(prefix, strict=True)) is not None:
            return answer
    return core(text, strict=False)


def _letter(text: str) -> str | None:
    s = text.strip().strip("*_`'\"().[]:").strip()
    return s.upper() if len(s) == 1 and s.upper() in "ABCDE" else None


def is_correct(dataset: str, predicted: str | None, gold: str) -> bool:
    """Whether ``predicted`` matches ``gold`` for ``dataset``.

    Numeric datasets compare canonical numbers (``"18"`` == ``"18.0"`` == ``"$18.00"``; ``"0.5"`` ==
    ``"1/2"``); multiple-choice datasets compare letters case-insensitively (``"c"`` == ``"(C)"``).
    A value that is not a bare number/letter (e.g. a GSM8K gold solution ending in ``#### 72``) is
    run through :func:`extract_answer` first. ``None`` (or anything unextractable) is never correct.
    Raises ``ValueError`` for an unknown dataset.
    """
    numeric = _numeric(dataset)
    if predicted is None or gold is None:
        return False
    canon = normalize_number if numeric else _letter

    def value(text: str) -> str | None:
        text = str(text)
        return canon(text) or extract_answer(dataset, text)

    p, g = value(predicted), value(gold)
    return p is not None and p == g
