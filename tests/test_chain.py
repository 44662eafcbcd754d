"""The long-horizon task (envs.chain): the working is real computation that checks out step by step, the truths are
exact, the horizon knob sets the response length, the held-out split is disjoint by rendered text, and only an exact
final answer scores."""

import random
import re

import pytest

from envs.chain import HORIZONS, LABELS, STEP_CHARS, chain_problem, chain_records, check_working, render_working
from envs.reasoning import ReasoningEnv
from envs.rewards import math_reward


def test_every_step_of_the_working_checks_out_and_the_truth_is_the_last_value():
    for steps in (1, 2, 14, 42, len(LABELS)):
        for record in chain_records(50, steps, seed=steps):
            question, working = record["prompt"][0]["content"], record["extra_info"]["solution"]
            assert check_working(question, working) == []
            lines = working.split("\n")
            assert len(lines) == steps + 1 and lines[-1] == f"\\boxed{{{record['ground_truth']}}}"
            # the truth recomputed from the question alone
            start, ops = re.fullmatch(r"Start (\d+), apply (.*)", question).groups()
            value = int(start)
            for op in ops.split():
                value += int(op[2]) * (1 if op[1] == "+" else -1)
                assert 10 <= value <= 99
            assert record["ground_truth"] == str(value)


def test_a_hand_checked_chain():
    problem = {"start": 57, "ops": [("+", 8), ("-", 3), ("+", 9)], "values": [65, 62, 71]}
    assert render_working(problem) == "a 57+8=65\nb 65-3=62\nc 62+9=71\n\\boxed{71}"
    assert check_working("Start 57, apply a+8 b-3 c+9", "a 57+8=65\nb 65-3=61\nc 61+9=70\n\\boxed{70}") == [
        "step b: 'b 65-3=61', expected 'b 65-3=62'", "step c: 'c 61+9=70', expected 'c 62+9=71'"]


def test_values_stay_in_range_and_every_operation_changes_the_value():
    rng = random.Random(0)
    for _ in range(200):
        problem = chain_problem(rng, 42)
        values = [problem["start"], *problem["values"]]
        assert all(10 <= v <= 99 for v in values)
        assert all(abs(b - a) == operand for (a, b), (_, operand) in zip(zip(values, values[1:]), problem["ops"]))
    with pytest.raises(ValueError, match="a chain has 1 to 52 steps"):
        chain_problem(rng, 53)


@pytest.mark.parametrize("horizon", sorted(HORIZONS))
def test_the_horizon_sets_the_response_length_as_documented(horizon):
    """STEP_CHARS characters (tokens, for the package's character-level models) a step, plus the boxed answer: 30
    tokens short, 150 medium, 430 long, every problem; 420 tokens of working before the answer at the long one."""
    steps = HORIZONS[horizon]
    workings = [r["extra_info"]["solution"] for r in chain_records(200, steps, seed=0)]
    assert {len(w) for w in workings} == {STEP_CHARS * steps + 10} == {{"short": 30, "medium": 150, "long": 430}[horizon]}
    assert {len(w) - len(w.split("\n")[-1]) for w in workings} == {STEP_CHARS * steps}


def test_the_held_out_split_is_disjoint_by_rendered_text():
    env = ReasoningEnv({"source": "chain", "steps": 14, "size": 600, "heldout_size": 100, "seed": 3})
    train, heldout = env.splits["train"].texts, env.splits["heldout"].texts
    assert (len(train), len(heldout)) == (500, 100) and not set(train) & set(heldout)
    assert len(set(train)) == 500
    env.close()


def test_a_wrong_final_answer_scores_zero_however_much_of_the_working_is_right():
    [record] = chain_records(1, 42, seed=1)
    working, truth = record["extra_info"]["solution"], record["ground_truth"]
    lines = working.split("\n")
    wrong = str((int(truth) + 1) % 100)
    all_steps_right_last_answer_wrong = "\n".join(lines[:-1] + [f"\\boxed{{{wrong}}}"])
    one_step_wrong = "\n".join(lines[:10] + ["k 1+1=3"] + lines[11:])  # the final value still right
    assert math_reward([working, all_steps_right_last_answer_wrong, "\n".join(lines[:-1])],
                       [truth] * 3) == [1.0, 0.0, None]  # (None: no boxed answer, which the env pays 0)
    # the reward is the outcome of the final answer alone: a broken step with the right answer still pays
    assert math_reward([one_step_wrong], [truth]) == [1.0] and check_working(
        record["prompt"][0]["content"], one_step_wrong) != []
