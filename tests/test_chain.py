"""The long-horizon task (envs.chain): the working is real computation that checks out step by step, the truths are
exact, the horizon knob sets the response length, the held-out split is disjoint by rendered text, and only an exact
final answer scores."""

import re

import pytest

from envs.chain import (HORIZONS, LABELS, chain_records, check_working, line_chars, render_question, render_working,
                        step_line)
from envs.reasoning import ReasoningEnv
from envs.rewards import math_reward


LINE = re.compile(r"([a-zA-Z]) (\d\d)\+(\d\d): (\d)\+(\d)=(\d+), (\d)\+(\d)\+([01])=(\d+), (\d\d)")


def test_every_step_of_the_working_checks_out_and_the_truth_is_the_last_number():
    for steps in (1, 2, 5, 15, len(LABELS)):
        for record in chain_records(50, steps, seed=steps):
            question, working = record["prompt"][0]["content"], record["extra_info"]["solution"]
            assert check_working(question, working) == []
            lines = working.split("\n")
            assert len(lines) == steps + 1 and lines[-1] == f"\\boxed{{{record['ground_truth']}}}"
            # every line adds the last two numbers (the previous line's second number and its result) column by
            # column: the units digits, then the tens digits with the carry; the last two digits of the sum
            a, b = map(int, re.match(r"Start (\d\d) (\d\d)", question).groups())
            for i, line in enumerate(lines[:-1]):
                label, x, y, xu, yu, units, xt, yt, carry, tens, result = LINE.fullmatch(line).groups()
                assert (label, int(x), int(y)) == (LABELS[i], a, b)
                assert (int(xu), int(yu), int(xt), int(yt)) == (a % 10, b % 10, a // 10, b // 10)
                assert int(units) == a % 10 + b % 10 and int(carry) == int(units) // 10
                assert int(tens) == a // 10 + b // 10 + int(carry)
                assert int(result) == (a + b) % 100 == (10 * int(tens) + int(units) % 10) % 100
                a, b = b, int(result)
            assert record["ground_truth"] == f"{b:02d}"


def test_a_hand_checked_chain():
    assert render_working(57, 33, 3) == ("a 57+33: 7+3=10, 5+3+1=9, 90\nb 33+90: 3+0=3, 3+9+0=12, 23\n"
                                         "c 90+23: 0+3=3, 9+2+0=11, 13\n\\boxed{13}")
    assert render_working(5, 95, 1) == "a 05+95: 5+5=10, 0+9+1=10, 00\n\\boxed{00}"
    question = render_question(57, 33, 3)
    assert question == "Start 57 33, add the last two, keep two digits: 3 steps"
    wrong = "a 57+33: 7+3=10, 5+3+1=9, 90\nb 33+90: 3+0=3, 3+9+0=12, 24\nc 90+24: 0+4=4, 9+2+0=11, 14\n\\boxed{14}"
    assert check_working(question, wrong) == [
        "step b: 'b 33+90: 3+0=3, 3+9+0=12, 24', expected 'b 33+90: 3+0=3, 3+9+0=12, 23'",
        "step c: 'c 90+24: 0+4=4, 9+2+0=11, 14', expected 'c 90+23: 0+3=3, 9+2+0=11, 13'"]
    with pytest.raises(ValueError, match="a chain has 1 to 52 steps"):
        render_working(1, 2, 53)


@pytest.mark.parametrize("horizon", sorted(HORIZONS))
def test_the_horizon_sets_the_response_length_as_documented(horizon):
    """28 to 30 characters (tokens, for the package's character-level models) a step, plus the boxed answer: about
    39 tokens short, 155 medium, 444 long, and at least 420 tokens of working before the answer at the long one."""
    steps = HORIZONS[horizon]
    workings = [r["extra_info"]["solution"] for r in chain_records(10000, steps, seed=0)]
    lengths = [len(w) for w in workings]
    low, mean, high = {"short": (38, 39, 40), "medium": (150, 155, 159), "long": (430, 444, 451)}[horizon]
    assert (min(lengths), round(sum(lengths) / len(lengths)), max(lengths)) == (low, mean, high)
    assert {line_chars(x, y) for x in range(100) for y in range(100)} == {28, 29, 30}
    if horizon == "long":
        assert min(len(w) - len(w.split("\n")[-1]) for w in workings) == 420


def test_the_held_out_split_is_disjoint_by_rendered_text():
    env = ReasoningEnv({"source": "chain", "steps": 5, "size": 600, "heldout_size": 100, "seed": 3})
    train, heldout = env.splits["train"].texts, env.splits["heldout"].texts
    assert (len(train), len(heldout)) == (500, 100) and not set(train) & set(heldout)
    assert len(set(train)) == 500
    env.close()
    with pytest.raises(ValueError, match="there are 10,000 distinct 5-step chains"):
        chain_records(10001, 5)


def test_a_wrong_final_answer_scores_zero_however_much_of_the_working_is_right():
    [record] = chain_records(1, 15, seed=1)
    working, truth = record["extra_info"]["solution"], record["ground_truth"]
    lines = working.split("\n")
    wrong = f"{(int(truth) + 1) % 100:02d}"
    all_steps_right_last_answer_wrong = "\n".join(lines[:-1] + [f"\\boxed{{{wrong}}}"])
    assert math_reward([working, all_steps_right_last_answer_wrong, "\n".join(lines[:-1])],
                       [truth] * 3) == [1.0, 0.0, None]  # (None: no boxed answer, which the env pays 0)
    # the reward is the outcome of the final answer alone: a broken step with the right answer still pays
    broken = "\n".join(lines[:10] + ["k 01+01: 1+1=3, 0+0+0=0, 03"] + lines[11:])
    assert math_reward([broken], [truth]) == [1.0] and check_working(record["prompt"][0]["content"], broken) != []


def test_a_tens_slip_in_the_first_result_leaves_a_fifteen_step_answer_right():
    """As the module says: an error of d in the first result moves the last of 15 by 610 x d mod 100 (F(15) = 610), so a
    slip of 10 there does not change the answer, which the reward alone cannot see and ``check_working`` does. Hand
    check on 49, 54: the right chain ends in 88; with 13 for 03 as the first result it also ends in 88."""
    question, working = render_question(49, 54, 15), render_working(49, 54, 15)
    slipped = ["a 49+54: 9+4=13, 5+5+1=11, 13"]  # 4+5+1 written as 5+5+1: the first result 13, not 03
    x, y = 54, 13
    for label in LABELS[1:15]:
        line, result = step_line(label, x, y)
        slipped.append(line)
        x, y = y, result
    slipped = "\n".join(slipped) + f"\n\\boxed{{{y:02d}}}"
    assert working.endswith("\\boxed{88}") and slipped.endswith("\\boxed{88}") and slipped != working
    assert math_reward([slipped], ["88"]) == [1.0]
    assert [problem[:6] for problem in check_working(question, slipped)] == ["step a"] + [
        f"step {label}" for label in LABELS[1:15]]
