"""Seeded synthetic multi-step arithmetic word problems: the project's built-in benchmark.

Every problem tracks one running quantity of objects owned by one person. It starts at a value
in ``[1, max_value]`` and then goes through ``k`` operations, ``k`` drawn uniformly from
``[min_steps, max_steps]``:

* ``add``: buys / finds / gets ``b`` more, ``b`` in ``[1, max_value]``;
* ``sub``: gives away / loses / sells ``b``, ``b`` in ``[1, min(max_value, v - 1)]``;
* ``mul``: the amount becomes ``f`` times as large, ``f`` in ``[2, min(max_factor, max_value)]``;
* ``div``: the amount is split into ``d`` equal parts and one part is kept, ``d`` in
  ``[2, min(max_factor, max_value)]`` and only when ``v`` is divisible by ``d`` (always exact).

The running value always stays an integer in ``[1, max_running]`` (so never negative and never
zero). At each step the operation is drawn uniformly among the allowed operations that are
feasible at the current value; if none is (e.g. only ``"div"`` and a prime value), the problem is
redrawn. Each row carries:

* ``prompt``: the word problem;
* ``target``: a worked chain of thought in words, ending with ``The answer is {answer}.``;
* ``reference``: the same computation, phrased differently from the target on purpose. With
  ``reference_style="equations"`` (the default) bare equations (``a op b = c`` lines, then
  ``Answer: {answer}``); with ``"worded"`` a GSM8K-like worded solution in another voice (other sentences,
  other connectives, past tense, every equation inline, ending ``#### {answer}`` as GSM8K's own solutions do).
  The style changes the reference only: prompt, target, answer, id, the draws of the stream and the split
  of every problem (:func:`solution_split` reads the equations either way) are the same;
* ``answer``: the final integer as a string.

Only ``random.Random(seed)`` is used, so ``(n, seed, spec)`` fully determines the rows.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["OPERATIONS", "REFERENCE_STYLES", "SPLIT_BUCKETS", "ArithmeticSpec", "check_answer", "generate_arithmetic", "iter_arithmetic",
           "solution_key", "solution_split"]

#: Allowed operation names and their symbols (as written in targets and references).
OPERATIONS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

#: Forms of the reference solution (:attr:`ArithmeticSpec.reference_style`); the first is the default.
REFERENCE_STYLES = ("equations", "worded")

_MAX_ATTEMPTS = 1000  # redraws of one problem before a spec is declared infeasible


@dataclass(frozen=True)
class ArithmeticSpec:
    """Difficulty of the generated problems, and the form of their reference solution.

    ``min_steps``/``max_steps``: bounds (inclusive) on the number of operations per problem.
    ``max_value``: start values and add/sub operands are drawn from ``[1, max_value]``.
    ``operations``: allowed operations among ``"add"``, ``"sub"``, ``"mul"``, ``"div"``.
    ``max_factor``: multipliers and divisors are drawn from ``[2, min(max_factor, max_value)]``.
    ``max_running``: upper bound on every intermediate value (they are all in ``[1, max_running]``).
    ``reference_style``: ``"equations"`` (bare ``a op b = c`` lines) or ``"worded"`` (a worded solution in
    another voice than the target, equations inline; the paper's x~ for GSM8K is of this kind).
    """

    min_steps: int = field(default=2, metadata={"help": "Fewest arithmetic operations per problem (>= 1)."})
    max_steps: int = field(default=2, metadata={"help": "Most arithmetic operations per problem (>= min_steps)."})
    max_value: int = field(default=20, metadata={"help": "Start values and add/sub operands are drawn from [1, max_value]."})
    operations: tuple[str, ...] = field(
        default=("add", "sub", "mul"), metadata={"help": "Allowed operations among add, sub, mul, div (div is always exact)."}
    )
    max_factor: int = field(default=5, metadata={"help": "Multipliers and divisors are drawn from [2, min(max_factor, max_value)]."})
    max_running: int = field(default=1000, metadata={"help": "Upper bound on every intermediate value."})
    reference_style: str = field(default="equations", metadata={"help": (
        "Form of each row's reference solution (what x~ adds to the prompt): 'equations' (bare 'a op b = c' lines, "
        "then 'Answer: N') or 'worded' (a GSM8K-like worded solution in another voice than the target, every "
        "equation inline, then '#### N', as the paper's x~ = prompt + the dataset's own solution). Only the "
        "reference changes: prompts, targets and which rows are drawn are the same.")})

    def __post_init__(self) -> None:
        if isinstance(self.operations, str):
            raise ValueError(f"operations must be a sequence of names, got {self.operations!r}")
        object.__setattr__(self, "operations", tuple(self.operations))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field if the spec is invalid."""
        for name in ("min_steps", "max_steps", "max_value", "max_factor", "max_running"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.min_steps < 1:
            raise ValueError(f"min_steps must be >= 1, got {self.min_steps}")
        if self.max_steps < self.min_steps:
            raise ValueError(
                f"max_steps must be >= min_steps ({self.min_steps}), got {self.max_steps}"
            )
        if self.max_value < 2:
            raise ValueError(f"max_value must be >= 2, got {self.max_value}")
        if self.max_factor < 2:
            raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")
        if self.max_running < self.max_value:
            raise ValueError(
                f"max_running must be >= max_value ({self.max_value}), got {self.max_running}"
            )
        if self.reference_style not in REFERENCE_STYLES:
            raise ValueError(f"reference_style must be one of {', '.join(REFERENCE_STYLES)}, "
                             f"got {self.reference_style!r}")
        if not self.operations:
            raise ValueError(f"operations must be non-empty, got {self.operations!r}")
        for op in self.operations:
            if op not in OPERATIONS:
                raise ValueError(
                    f"operations contains unknown operation {op!r} "
                    f"(allowed: {', '.join(OPERATIONS)})"
                )


# --------------------------------------------------------------------------------------------
# Vocabulary and sentence templates
# --------------------------------------------------------------------------------------------

# (name, subject pronoun, possessive, reflexive)
_PEOPLE = (
    ("Tom", "he", "his", "himself"),
    ("Anna", "she", "her", "herself"),
    ("Sam", "he", "his", "himself"),
    ("Mia", "she", "her", "herself"),
    ("Ben", "he", "his", "himself"),
    ("Lily", "she", "her", "herself"),
    ("Max", "he", "his", "himself"),
    ("Emma", "she", "her", "herself"),
)

# (singular, plural)
_OBJECTS = (
    ("apple", "apples"),
    ("pencil", "pencils"),
    ("sticker", "stickers"),
    ("marble", "marbles"),
    ("book", "books"),
    ("cookie", "cookies"),
    ("coin", "coins"),
    ("card", "cards"),
)

# Each template: (prompt sentence, target clause). Placeholders: {p} pronoun, {pos} possessive,
# {refl} reflexive, {n} operand, {q} "{n} {object(s)}", {things} plural object,
# {thing} singular object, {others} "{n-1} friend(s)" (div only). Prompt sentences start with
# the pronoun or "the" so that "Then " can be prepended after lowercasing.
_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("{P} buys {n} more {things_n}.", "{P} buys {n} more"),
        ("{P} finds {n} more {things_n}.", "{P} finds {n} more"),
        ("{P} gets {n} more {things_n} from a friend.", "{P} gets {n} more"),
    ),
    "sub": (
        ("{P} gives away {q}.", "{P} gives away {n}"),
        ("{P} loses {q}.", "{P} loses {n}"),
        ("{P} sells {q}.", "{P} sells {n}"),
    ),
    "mul": (
        ("{P} ends up with {n} times as many {things}.", "{P} ends up with {n} times as many"),
        ("{P} trades each {thing} for {n} new {things}.", "{P} trades each one for {n}"),
        ("The number of {things} {p} has becomes {n} times as big.",
         "The number becomes {n} times as big"),
    ),
    "div": (
        ("{P} splits {pos} {things} into {n} equal groups and keeps one group.",
         "{P} keeps one of {n} equal groups"),
        ("{P} shares {pos} {things} equally between {refl} and {others}.",
         "{P} shares them equally among {n} people"),
        ("{P} puts {pos} {things} into {n} equal piles and keeps one pile.",
         "{P} keeps one of {n} equal piles"),
    ),
}


# The worded reference's voice (reference_style="worded"): GSM8K-like, past tense, impersonal, its own
# connectives, each step's equation inline. No sentence or clause here is one of the target's (which says
# "{Name} starts with ...", "{P} buys/finds/gets/... , so {p} has a op b = c ...", "The answer is N.").
# Placeholders: {Name}, {start} ("N objects"), {a}, {b}, {c} (numbers), {sym}, {things}.
_WORDED_START = (
    "{Name} had {start} at first.",
    "In the beginning there were {start}.",
)
_WORDED_STEP: dict[str, tuple[str, ...]] = {
    "add": (
        "adding the {b} new ones made it {a} {sym} {b} = {c}.",
        "with {b} extra the count came to {a} {sym} {b} = {c}.",
    ),
    "sub": (
        "taking away {b} left {a} {sym} {b} = {c}.",
        "once {b} were gone, only {a} {sym} {b} = {c} remained.",
    ),
    "mul": (
        "multiplying by {b} gave {a} {sym} {b} = {c}.",
        "{b} times the amount was {a} {sym} {b} = {c}.",
    ),
    "div": (
        "dividing by {b} left {a} {sym} {b} = {c}.",
        "one share out of {b} held {a} {sym} {b} = {c}.",
    ),
}
_WORDED_CONNECTIVES = ("First, ", "Next, ", "After that, ", "Later, ")


def _worded_reference(seed: int | str, i: int, name: str, thing: str, things: str, start: int,
                      steps: list[tuple[str, int, int, int]]) -> str:
    """The worded reference of row ``i``: its own ``random.Random`` (from ``seed`` and ``i``), so that the
    stream's draws, and hence every other field of every row, are those of the default style."""
    rng = random.Random(f"worded-reference-{seed}-{i}")
    out = [rng.choice(_WORDED_START).format(Name=name, start=_count(start, thing, things))]
    for k, (op, a, b, c) in enumerate(steps):
        clause = rng.choice(_WORDED_STEP[op]).format(a=a, b=b, c=c, sym=OPERATIONS[op], things=things)
        last = k == len(steps) - 1 and k > 0
        out.append(("Finally, " if last else _WORDED_CONNECTIVES[min(k, len(_WORDED_CONNECTIVES) - 1)]) + clause)
    out.append(f"#### {steps[-1][3] if steps else start}")
    return "\n".join([" ".join(out[:-1]), out[-1]])


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _feasible(op: str, v: int, spec: ArithmeticSpec) -> list[int]:
    """Operands allowed for ``op`` at running value ``v`` (empty when ``op`` is infeasible)."""
    fmax = min(spec.max_factor, spec.max_value)
    if op == "add":
        return list(range(1, min(spec.max_value, spec.max_running - v) + 1))
    if op == "sub":
        return list(range(1, min(spec.max_value, v - 1) + 1))
    if op == "mul":
        return [f for f in range(2, fmax + 1) if v * f <= spec.max_running]
    if op == "div":
        return [d for d in range(2, fmax + 1) if v % d == 0]
    raise ValueError(f"unknown operation {op!r}")


def _apply(op: str, a: int, b: int) -> int:
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if a % b:
        raise ValueError(f"inexact division {a} / {b}")
    return a // b


def _draw_chain(rng: random.Random, steps: int, spec: ArithmeticSpec):
    """Draw a start value and ``steps`` (op, operand) pairs keeping every value in range."""
    for _ in range(_MAX_ATTEMPTS):
        v = start = rng.randint(1, spec.max_value)
        chain: list[tuple[str, int]] = []
        for _ in range(steps):
            options = [(op, ok) for op in spec.operations if (ok := _feasible(op, v, spec))]
            if not options:
                break
            op, operands = rng.choice(options)
            b = rng.choice(operands)
            chain.append((op, b))
            v = _apply(op, v, b)
        else:
            return start, chain
    raise ValueError(
        f"spec {spec} cannot produce a {steps}-step problem within {_MAX_ATTEMPTS} attempts "
        "(operations too restrictive for the value ranges)"
    )


def _make_row(rng: random.Random, seed: int, i: int, spec: ArithmeticSpec) -> dict[str, str]:
    steps = rng.randint(spec.min_steps, spec.max_steps)
    name, p, pos, refl = rng.choice(_PEOPLE)
    thing, things = rng.choice(_OBJECTS)
    start, chain = _draw_chain(rng, steps, spec)

    prompt = [f"{name} has {_count(start, thing, things)}."]
    target = [f"{name} starts with {_count(start, thing, things)}."]
    reference = []
    steps_done: list[tuple[str, int, int, int]] = []
    v = start
    for k, (op, b) in enumerate(chain):
        sentence, clause = rng.choice(_TEMPLATES[op])
        fields = {
            "P": p.capitalize(), "p": p, "pos": pos, "refl": refl, "n": b,
            "q": _count(b, thing, things), "thing": thing, "things": things,
            "things_n": thing if b == 1 else things,
            "others": _count(b - 1, "friend", "friends"),
        }
        sentence = sentence.format(**fields)
        if k > 0:
            sentence = "Then " + sentence[0].lower() + sentence[1:]
        prompt.append(sentence)
        new = _apply(op, v, b)
        sym = OPERATIONS[op]
        target.append(
            f"{clause.format(**fields)}, so {p} has {v} {sym} {b} = {_count(new, thing, things)}."
        )
        reference.append(f"{v} {sym} {b} = {new}")
        steps_done.append((op, v, b, new))
        v = new
    prompt.append(f"How many {things} does {name} have now?")
    target.append(f"The answer is {v}.")
    reference.append(f"Answer: {v}")
    return {
        "id": f"arith-{seed}-{i}",
        "prompt": " ".join(prompt),
        "target": " ".join(target),
        "reference": ("\n".join(reference) if spec.reference_style == "equations"
                      else _worded_reference(seed, i, name, thing, things, start, steps_done)),
        "answer": str(v),
    }


def iter_arithmetic(seed: int | str = 0, spec: ArithmeticSpec = ArithmeticSpec()) -> Iterator[dict[str, str]]:
    """The endless stream of word problems of ``(seed, spec)``; row ``i`` has id ``f"arith-{seed}-{i}"``."""
    if not isinstance(spec, ArithmeticSpec):
        raise ValueError(f"spec must be an ArithmeticSpec, got {spec!r}")
    spec.validate()
    rng = random.Random(seed)
    for i in itertools.count():
        yield _make_row(rng, seed, i, spec)


def generate_arithmetic(
    n: int, seed: int | str = 0, spec: ArithmeticSpec = ArithmeticSpec()
) -> list[dict[str, str]]:
    """The first ``n`` rows of :func:`iter_arithmetic`, deterministically from ``(n, seed, spec)``.

    Each row is ``{"id", "prompt", "target", "reference", "answer"}`` (all strings); row ``i``
    has id ``f"arith-{seed}-{i}"`` and the first ``m`` rows of ``n > m`` equal the ``m`` rows.
    Raises ``ValueError`` for ``n < 0`` or an invalid/infeasible ``spec``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return list(itertools.islice(iter_arithmetic(seed, spec), n))


#: Each split owns a fixed range of 100 buckets of the solution space (bucket = hash of the equations, see
#: :func:`solution_split`): test 10 %, validation 10 %, train 80 %. A problem's split depends on its solution
#: only, never on a seed, so no train row of any seed has the equations of any test or validation problem.
SPLIT_BUCKETS: dict[str, range] = {"test": range(0, 10), "validation": range(10, 20), "train": range(20, 100)}


def solution_key(row: dict[str, str]) -> str:
    """What makes two problems the same problem: their equations (``reference`` without names or objects).

    A bare-equations reference is its own key; a worded one (``#### N`` last line) gives the same key as the
    bare form of the same solution (its inline ``a op b = c`` in order, then ``Answer: N``), so a problem
    falls in the same split whichever the reference style."""
    ref = row["reference"]
    lines = ref.split("\n")
    if len(lines) == 2 and lines[-1].startswith("#### "):
        eqs = [" ".join(m) for m in _INLINE_EQUATION.findall(lines[0])]
        return "\n".join([*eqs, "Answer: " + lines[-1][5:].strip()])
    return ref


def solution_split(row: dict[str, str]) -> str:
    """The split that owns this problem's solution: ``train``, ``validation`` or ``test``."""
    bucket = int.from_bytes(hashlib.sha256(solution_key(row).encode()).digest()[:8], "big") % 100
    return next(name for name, r in SPLIT_BUCKETS.items() if bucket in r)


_EQUATION = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
_INLINE_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) (=) (\d+)")
_FINAL = re.compile(r"^Answer: (\d+)$")
_SYMBOL_TO_OP = {sym: op for op, sym in OPERATIONS.items()}


def check_answer(row: dict[str, str]) -> int:
    """Recompute a row's answer from its reference equations and return it.

    Each ``a op b = c`` line is verified (``/`` must be exact), each line must start from the
    previous result, the last line must be ``Answer: c`` with the last ``c``, and this must equal
    ``row["answer"]``; when the row has a prompt, its first number must be the start value.
    A worded reference is read through its equations (:func:`solution_key`).
    Raises ``ValueError`` on any inconsistency.
    """
    lines = solution_key(row).split("\n")
    if len(lines) < 2:
        raise ValueError(f"reference needs at least one equation and an answer: {row['reference']!r}")
    value: int | None = None
    for line in lines[:-1]:
        m = _EQUATION.match(line)
        if m is None:
            raise ValueError(f"malformed equation line {line!r}")
        a, sym, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if value is not None and a != value:
            raise ValueError(f"equation {line!r} does not start from previous result {value}")
        if sym == "/" and (b == 0 or a % b):
            raise ValueError(f"inexact division in {line!r}")
        if _apply(_SYMBOL_TO_OP[sym], a, b) != c:
            raise ValueError(f"wrong equation {line!r}")
        if value is None and "prompt" in row:
            first = re.search(r"\d+", row["prompt"])
            if first is None or int(first[0]) != a:
                raise ValueError(f"first operand {a} is not the prompt's start value")
        value = c
    m = _FINAL.match(lines[-1])
    if m is None:
        raise ValueError(f"malformed final line {lines[-1]!r}")
    if int(m[1]) != value:
        raise ValueError(f"final line {lines[-1]!r} disagrees with last result {value}")
    if str(value) != row["answer"]:
        raise ValueError(f"answer field {row['answer']!r} disagrees with reference result {value}")
    return value
