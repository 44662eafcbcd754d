"""Chains of operations on a running value: a reasoning task whose working grows with a horizon knob (``steps``).

A problem gives a start value and ``steps`` labelled operations; the working applies them in order, one line per
step (the label, the running value, the operation and its result), and the answer is the last value:

    Start 57, apply a+8 b-3 c+9 d-6
    a 57+8=65
    b 65-3=62
    c 62+9=71
    d 71-6=65
    \\boxed{65}

Values have two digits, 10..99 (an operation that would leave that range is turned around), operands are 1..9. A
step's result is the next step's input and every operation is a bijection of the value, so one wrong step makes every
later value wrong, and the answer with it (unless a second error happens to undo the first). Every line of the working
is ``STEP_CHARS`` characters, and the boxed answer 10 more: a character-level model writes 10 x steps + 10 tokens, 30
for 2 steps, 150 for 14, 430 for 42 (``HORIZONS``).
"""

from __future__ import annotations

import random
import re
import string

LABELS = string.ascii_lowercase + string.ascii_uppercase
#: Named horizons: the number of steps, and the response length in characters their working takes.
HORIZONS = {"short": 2, "medium": 14, "long": 42}
#: Characters of one step's line of the working ("b 65-3=62" and its newline).
STEP_CHARS = 10
_LINE = re.compile(r"([a-zA-Z]) (\d+)([+-])(\d)=(\d+)")


def chain_problem(rng: random.Random, steps: int) -> dict:
    """One problem: ``{"start", "ops": [(sign, operand)], "values": [running value after each step]}``."""
    if not 1 <= steps <= len(LABELS):
        raise ValueError(f"steps={steps}: a chain has 1 to {len(LABELS)} steps (one label letter each)")
    value = rng.randrange(10, 100)
    start, ops, values = value, [], []
    for _ in range(steps):
        operand = rng.randint(1, 9)
        sign = rng.choice("+-")
        if not 10 <= value + (operand if sign == "+" else -operand) <= 99:
            sign = "-" if sign == "+" else "+"
        value += operand if sign == "+" else -operand
        ops.append((sign, operand))
        values.append(value)
    return {"start": start, "ops": ops, "values": values}


def render_question(problem: dict) -> str:
    return f"Start {problem['start']}, apply " + " ".join(
        f"{LABELS[i]}{sign}{operand}" for i, (sign, operand) in enumerate(problem["ops"]))


def render_working(problem: dict) -> str:
    """The step-by-step solution, one line a step, then the boxed answer."""
    lines, value = [], problem["start"]
    for i, ((sign, operand), result) in enumerate(zip(problem["ops"], problem["values"])):
        lines.append(f"{LABELS[i]} {value}{sign}{operand}={result}")
        value = result
    return "\n".join(lines) + f"\n\\boxed{{{value}}}"


def check_working(question: str, working: str) -> list[str]:
    """The steps of ``working`` that do not check out against ``question`` (empty: every step is right): a line that
    is not the next label applied to the running value with the question's operation, or a wrong result."""
    header = re.fullmatch(r"Start (\d+), apply ((?:[a-zA-Z][+-]\d ?)+)", question)
    if header is None:
        return [f"not a chain question: {question!r}"]
    value = int(header.group(1))
    ops = {op[0]: (op[1], int(op[2:])) for op in header.group(2).split()}
    lines = working.split("\n")
    errors = []
    for i, label in enumerate(LABELS[:len(ops)]):
        line = lines[i] if i < len(lines) else ""
        m = _LINE.fullmatch(line)
        sign, operand = ops[label]
        expected = value + (operand if sign == "+" else -operand)
        if m is None or m.groups() != (label, str(value), sign, str(operand), str(expected)):
            errors.append(f"step {label}: {line!r}, expected '{label} {value}{sign}{operand}={expected}'")
        value = expected
    return errors


def chain_records(size: int, steps: int, seed: int = 0) -> list[dict]:
    """``size`` distinct problems of ``steps`` steps as prompt records (see ``envs.reasoning``); each record's
    ``extra_info`` holds its ``steps`` and the reference ``solution`` (the working), for supervision."""
    rng, records, seen = random.Random(seed), [], set()
    for _ in range(100 * size):
        if len(records) == size:
            break
        problem = chain_problem(rng, steps)
        question = render_question(problem)
        if question in seen:
            continue
        seen.add(question)
        records.append({"prompt": [{"role": "user", "content": question}],
                        "ground_truth": str(problem["values"][-1]), "data_source": f"chain/{steps}",
                        "extra_info": {"index": len(records), "steps": steps, "solution": render_working(problem)}})
    if len(records) < size:
        raise ValueError(f"could not draw {size} distinct {steps}-step chains (only {len(records)} exist or were "
                         f"drawn); ask for fewer")
    return records
