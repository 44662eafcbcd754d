"""A chain of written-out additions: a reasoning task whose working grows with a horizon knob (``steps``).

A problem gives two starting numbers; each step adds the last two numbers column by column, the way it is done by
hand, and keeps the last two digits of the sum (a Fibonacci sequence mod 100). One labelled line a step: the two
numbers, the units digits' sum, the tens digits' sum with the carry, and the result; the answer is the last result:

    Start 57 33, add the last two, keep two digits: 3 steps
    a 57+33: 7+3=10, 5+3+1=9, 90
    b 33+90: 3+0=3, 3+9+0=12, 23
    c 90+23: 0+3=3, 9+2+0=11, 13
    \\boxed{13}

Every number is written with two digits. A step's numbers are the previous line's second number and its result, so
the working is real computation from start to end, and a wrong number changes every later one. It does not always
change the answer: an error of d in the first result moves the k-th by d times the k-th Fibonacci number, mod 100, and
F(15) = 610, so at 15 steps an error in the first result's tens digit (d a multiple of 10, the commonest slip: a
miscopied tens digit of a starting number) leaves the answer right; F(5) = 5 forgives d a multiple of 20 at 5 steps.
The reward is the final answer's, so such an answer scores 1; ``check_working`` tells it apart. A line is 28 to 30
characters (``line_chars``) and the boxed answer 10 more: a character-level model writes about 39 tokens for 1 step,
155 for 5, 444 for 15 (``HORIZONS``), at least 420 of them working before the answer at 15 steps.
"""

from __future__ import annotations

import random
import re
import string

LABELS = string.ascii_lowercase + string.ascii_uppercase
#: Named horizons: the number of steps.
HORIZONS = {"short": 1, "medium": 5, "long": 15}
_QUESTION = re.compile(r"Start (\d\d) (\d\d), add the last two, keep two digits: (\d+) steps?")


def render_question(a: int, b: int, steps: int) -> str:
    return f"Start {a:02d} {b:02d}, add the last two, keep two digits: {steps} step{'s' if steps > 1 else ''}"


def step_line(label: str, x: int, y: int) -> tuple[str, int]:
    """One step written out: ``(line, x + y mod 100)``."""
    units = x % 10 + y % 10
    tens = x // 10 + y // 10 + units // 10
    result = (10 * tens + units % 10) % 100
    return (f"{label} {x:02d}+{y:02d}: {x % 10}+{y % 10}={units}, {x // 10}+{y // 10}+{units // 10}={tens}, "
            f"{result:02d}"), result


def line_chars(x: int, y: int) -> int:
    """Characters of a step's line adding ``x`` and ``y``, its newline included."""
    return len(step_line("a", x, y)[0]) + 1


def render_working(a: int, b: int, steps: int) -> str:
    """The step-by-step solution, one labelled line a step, then the boxed answer."""
    if not 1 <= steps <= len(LABELS):
        raise ValueError(f"steps={steps}: a chain has 1 to {len(LABELS)} steps (one label letter each)")
    lines = []
    for label in LABELS[:steps]:
        line, result = step_line(label, a, b)
        lines.append(line)
        a, b = b, result
    return "\n".join(lines) + f"\n\\boxed{{{b:02d}}}"


def solve(question: str) -> str | None:
    """The reference working for a rendered ``question`` (None: not a chain question)."""
    m = _QUESTION.fullmatch(question)
    return None if m is None else render_working(*map(int, m.groups()))


def check_working(question: str, working: str) -> list[str]:
    """The steps of ``working`` that are not the right chain's (empty: every step is right): a line with a wrong
    number or digit sum, a missing line, or another label."""
    reference = solve(question)
    if reference is None:
        return [f"not a chain question: {question!r}"]
    expected = reference.split("\n")[:-1]
    lines = working.split("\n")
    return [f"step {LABELS[i]}: {(lines[i] if i < len(lines) else '')!r}, expected {line!r}"
            for i, line in enumerate(expected) if i >= len(lines) or lines[i] != line]


def chain_records(size: int, steps: int, seed: int = 0) -> list[dict]:
    """``size`` distinct problems of ``steps`` steps (at most 10,000: the starting pairs) as prompt records (see
    ``envs.reasoning``); each record's ``extra_info`` holds its ``steps`` and the reference ``solution`` (the working),
    for supervision."""
    if not 0 < size <= 10000:
        raise ValueError(f"size={size}: there are 10,000 distinct {steps}-step chains (their starting pairs)")
    records = []
    for i, code in enumerate(random.Random(seed).sample(range(10000), size)):
        working = render_working(code // 100, code % 100, steps)
        records.append({"prompt": [{"role": "user", "content": render_question(code // 100, code % 100, steps)}],
                        "ground_truth": working[-3:-1], "data_source": f"chain/{steps}",
                        "extra_info": {"index": i, "steps": steps, "solution": working}})
    return records
