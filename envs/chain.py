"""A chain of written-out additions on a running value: a reasoning task whose working grows with a horizon knob
(``steps``).

A problem gives a starting number and an addend; each step adds the addend to the running value column by column, the
way it is done by hand, and keeps the last two digits of the sum. One labelled line a step: the running value and the
addend, the units digits' sum, the tens digits' sum with the carry, and the new value; the answer is the last value:

    Start 57, add 33 each step, keep two digits: 3 steps
    a 57+33: 7+3=10, 5+3+1=9, 90
    b 90+33: 0+3=3, 9+3+0=12, 23
    c 23+33: 3+3=6, 2+3+0=5, 56
    \\boxed{56}

Every number is written with two digits; the addend is 01 to 99. A step's first number is the previous line's result,
so the working is real computation from start to end, and an error of d in a result (a slipped digit sum, a miscopied
number) carried on moves every later value by d, mod 100: one slip changes the answer. (The first version of this task
added the last two numbers, a Fibonacci chain mod 100, where an error of d in the first result moved the 15th by
610 x d mod 100: a tens-digit slip left the answer right, and 60% of the right answers RL reached had gone through
one.) A right answer can still come through wrong working: a result written wrong but not carried on (the next line
starts from the right value), or one slip repeated until it cancels (an addend's tens digit miscopied in ten lines
running). So the tuned examples pay only a fully right answer, the boxed one right and every line the reference's
(``envs.rewards.working_reward``); ``check_working`` lists the wrong lines.

A line is 28 to 30 characters (``line_chars``) and the boxed answer 10 more: a character-level model writes about 39
tokens for 1 step, 155 for 5, 444 for 15 (``HORIZONS``), at least 421 of them working before the answer at 15 steps.
"""

from __future__ import annotations

import random
import re
import string

from envs.rewards import working_lines

LABELS = string.ascii_lowercase + string.ascii_uppercase
#: Named horizons: the number of steps.
HORIZONS = {"short": 1, "medium": 5, "long": 15}
#: Distinct problems of a given number of steps: starting values 00-99 times addends 01-99.
PROBLEMS = 100 * 99
_QUESTION = re.compile(r"Start (\d\d), add (\d\d) each step, keep two digits: (\d+) steps?")


def render_question(start: int, addend: int, steps: int) -> str:
    return f"Start {start:02d}, add {addend:02d} each step, keep two digits: {steps} step{'s' if steps > 1 else ''}"


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


def render_working(start: int, addend: int, steps: int) -> str:
    """The step-by-step solution, one labelled line a step, then the boxed answer."""
    if not 1 <= steps <= len(LABELS):
        raise ValueError(f"steps={steps}: a chain has 1 to {len(LABELS)} steps (one label letter each)")
    lines, value = [], start
    for label in LABELS[:steps]:
        line, value = step_line(label, value, addend)
        lines.append(line)
    return "\n".join(lines) + f"\n\\boxed{{{value:02d}}}"


def solve(question: str) -> str | None:
    """The reference working for a rendered ``question`` (None: not a chain question)."""
    m = _QUESTION.fullmatch(question)
    return None if m is None else render_working(*map(int, m.groups()))


def check_working(question: str, working: str) -> list[str]:
    """The lines of ``working`` before its boxed answer that are not the right chain's (empty: every step is right,
    as ``envs.rewards.working_reward`` requires): a line with a wrong number or digit sum, a missing line, another
    label, or a line the chain does not have."""
    reference = solve(question)
    if reference is None:
        return [f"not a chain question: {question!r}"]
    expected = reference.split("\n")[:-1]
    lines = working_lines(working)
    return ([f"step {LABELS[i]}: {(lines[i] if i < len(lines) else '')!r}, expected {line!r}"
             for i, line in enumerate(expected) if i >= len(lines) or lines[i] != line]
            + [f"extra line {line!r}" for line in lines[len(expected):]])


def chain_records(size: int, steps: int, seed: int = 0) -> list[dict]:
    """``size`` distinct problems of ``steps`` steps (at most ``PROBLEMS``) as prompt records (see ``envs.reasoning``);
    each record's ``extra_info`` holds its ``steps`` and the reference ``solution`` (the working), for supervision."""
    if not 0 < size <= PROBLEMS:
        raise ValueError(f"size={size}: there are {PROBLEMS:,} distinct {steps}-step chains (starting values 00-99 "
                         f"times addends 01-99); ask for at most that many")
    records = []
    for i, code in enumerate(random.Random(seed).sample(range(PROBLEMS), size)):
        start, addend = code // 99, code % 99 + 1
        working = render_working(start, addend, steps)
        records.append({"prompt": [{"role": "user", "content": render_question(start, addend, steps)}],
                        "ground_truth": working[-3:-1], "data_source": f"chain/{steps}",
                        "extra_info": {"index": i, "steps": steps, "solution": working}})
    return records
