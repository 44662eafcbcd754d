"""The long-horizon task (envs.chain): the working is real computation that checks out step by step, the truths are
exact, the horizon knob sets the response length, the held-out split is disjoint by rendered text, and only an exact
final answer scores."""

import re

import pytest

from envs.chain import (HORIZONS, LABELS, PROBLEMS, chain_records, check_working, line_chars, render_question,
                        render_working, step_line)
from envs.reasoning import ReasoningEnv
from envs.rewards import math_reward, working_reward


LINE = re.compile(r"([a-zA-Z]) (\d\d)\+(\d\d): (\d)\+(\d)=(\d+), (\d)\+(\d)\+([01])=(\d+), (\d\d)")


def test_every_step_of_the_working_checks_out_and_the_truth_is_the_last_number():
    for steps in (1, 2, 5, 15, len(LABELS)):
        for record in chain_records(50, steps, seed=steps):
            question, working = record["prompt"][0]["content"], record["extra_info"]["solution"]
            assert check_working(question, working) == []
            lines = working.split("\n")
            assert len(lines) == steps + 1 and lines[-1] == f"\\boxed{{{record['ground_truth']}}}"
            # every line adds the addend to the running value (the previous line's result) column by column: the
            # units digits, then the tens digits with the carry; the last two digits of the sum
            a, b = map(int, re.match(r"Start (\d\d), add (\d\d) each step", question).groups())
            assert 1 <= b <= 99
            for i, line in enumerate(lines[:-1]):
                label, x, y, xu, yu, units, xt, yt, carry, tens, result = LINE.fullmatch(line).groups()
                assert (label, int(x), int(y)) == (LABELS[i], a, b)
                assert (int(xu), int(yu), int(xt), int(yt)) == (a % 10, b % 10, a // 10, b // 10)
                assert int(units) == a % 10 + b % 10 and int(carry) == int(units) // 10
                assert int(tens) == a // 10 + b // 10 + int(carry)
                assert int(result) == (a + b) % 100 == (10 * int(tens) + int(units) % 10) % 100
                a = int(result)
            assert record["ground_truth"] == f"{a:02d}"


def test_a_hand_checked_chain():
    assert render_working(57, 33, 3) == ("a 57+33: 7+3=10, 5+3+1=9, 90\nb 90+33: 0+3=3, 9+3+0=12, 23\n"
                                         "c 23+33: 3+3=6, 2+3+0=5, 56\n\\boxed{56}")
    assert render_working(5, 95, 1) == "a 05+95: 5+5=10, 0+9+1=10, 00\n\\boxed{00}"
    question = render_question(57, 33, 3)
    assert question == "Start 57, add 33 each step, keep two digits: 3 steps"
    wrong = "a 57+33: 7+3=10, 5+3+1=9, 90\nb 90+33: 0+3=3, 9+3+0=12, 24\nc 24+33: 4+3=7, 2+3+0=5, 57\n\\boxed{57}"
    assert check_working(question, wrong) == [
        "step b: 'b 90+33: 0+3=3, 9+3+0=12, 24', expected 'b 90+33: 0+3=3, 9+3+0=12, 23'",
        "step c: 'c 24+33: 4+3=7, 2+3+0=5, 57', expected 'c 23+33: 3+3=6, 2+3+0=5, 56'"]
    with pytest.raises(ValueError, match="a chain has 1 to 52 steps"):
        render_working(1, 2, 53)


@pytest.mark.parametrize("horizon", sorted(HORIZONS))
def test_the_horizon_sets_the_response_length_as_documented(horizon):
    """28 to 30 characters (tokens, for the package's character-level models) a step, plus the boxed answer: about
    39 tokens short, 155 medium, 444 long, and at least 420 tokens of working before the answer at the long one."""
    steps = HORIZONS[horizon]
    workings = [r["extra_info"]["solution"] for r in chain_records(PROBLEMS, steps, seed=0)]
    lengths = [len(w) for w in workings]
    low, mean, high = {"short": (38, 39, 40), "medium": (150, 155, 160), "long": (431, 444, 459)}[horizon]
    assert (min(lengths), round(sum(lengths) / len(lengths)), max(lengths)) == (low, mean, high)
    assert {line_chars(x, y) for x in range(100) for y in range(100)} == {28, 29, 30}
    if horizon == "long":
        assert min(len(w) - len(w.split("\n")[-1]) for w in workings) == 421


def test_the_held_out_split_is_disjoint_by_rendered_text():
    env = ReasoningEnv({"source": "chain", "steps": 5, "size": 600, "heldout_size": 100, "seed": 3})
    train, heldout = env.splits["train"].texts, env.splits["heldout"].texts
    assert (len(train), len(heldout)) == (500, 100) and not set(train) & set(heldout)
    assert len(set(train)) == 500
    env.close()
    with pytest.raises(ValueError, match="there are 9,900 distinct 5-step chains"):
        chain_records(9901, 5)
    assert len({r["prompt"][0]["content"] for r in chain_records(9900, 5)}) == 9900


def test_a_wrong_final_answer_scores_zero_however_much_of_the_working_is_right():
    [record] = chain_records(1, 15, seed=1)
    working, truth = record["extra_info"]["solution"], record["ground_truth"]
    lines = working.split("\n")
    wrong = f"{(int(truth) + 1) % 100:02d}"
    all_steps_right_last_answer_wrong = "\n".join(lines[:-1] + [f"\\boxed{{{wrong}}}"])
    answers = [working, all_steps_right_last_answer_wrong, "\n".join(lines[:-1])]
    for reward in (math_reward, working_reward):  # (None: no boxed answer, which the env pays 0)
        assert reward(answers, [truth] * 3, solution=[working] * 3) == [1.0, 0.0, None]


def test_the_working_reward_pays_only_a_fully_right_answer():
    """Two right answers the shipped long policy really writes (read in its samples), which the final answer alone
    pays and the tuned examples' reward (``working``) does not: a result written wrong but not carried on (the next
    line starts from the right value), and an addend miscopied in its tens column for ten lines running (ten extra
    tens are 100: the answer comes out right). Hand check on 62 + 09 a step: the answer is 97 both ways."""
    question, working = render_question(62, 9, 15), render_working(62, 9, 15)
    lines = working.split("\n")
    assert lines[11] == "l 61+09: 1+9=10, 6+0+1=7, 70" and lines[-1] == "\\boxed{97}"
    not_carried = "\n".join(lines[:11] + [lines[11][:-2] + "71"] + lines[12:])
    miscopied, value = lines[:5], 7
    assert lines[4].endswith(", 07")
    for label in LABELS[5:15]:  # written "+09", the tens column adding 1: 19 in effect
        line, value = step_line(label, value, 19)
        miscopied.append(line.replace("+19:", "+09:"))
    miscopied = "\n".join(miscopied) + f"\n\\boxed{{{value:02d}}}"
    answers = [working, not_carried, miscopied]
    assert miscopied.endswith("\\boxed{97}") and [len(check_working(question, a)) for a in answers] == [0, 1, 10]
    assert math_reward(answers, ["97"] * 3) == [1.0, 1.0, 1.0]
    assert working_reward(answers, ["97"] * 3, solution=[working] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="needs each record's reference working in a `solution` column"):
        working_reward(answers, ["97"] * 3, solution=[None] * 3)


def test_the_checker_and_the_reward_agree_on_a_line_the_chain_does_not_have():
    """Every step right, the answer right, and one more line before the box (the last step written twice): the
    checker names that line, and the working reward pays 0 as it does for any wrong line."""
    question, working = render_question(62, 9, 3), render_working(62, 9, 3)
    lines = working.split("\n")
    assert lines == ["a 62+09: 2+9=11, 6+0+1=7, 71", "b 71+09: 1+9=10, 7+0+1=8, 80",
                     "c 80+09: 0+9=9, 8+0+0=8, 89", "\\boxed{89}"]
    repeated = "\n".join(lines[:3] + lines[2:])
    assert check_working(question, repeated) == ["extra line 'c 80+09: 0+9=9, 8+0+0=8, 89'"]
    assert math_reward([repeated], ["89"]) == [1.0]
    assert working_reward([repeated], ["89"], solution=[working]) == [0.0]


def test_one_slip_anywhere_changes_a_fifteen_step_answer():
    """As the module says: an error of d in any result moves every later value by d, so no single slip leaves the
    answer right (every step, every d). Hand check on 49 + 54 a step: the right chain ends in 59; the first line's tens
    written 5+5+1 (first result 13, not 03) ends it in 69."""
    question, working = render_question(49, 54, 15), render_working(49, 54, 15)
    assert working.endswith("\\boxed{59}")
    for step in range(15):
        for d in range(1, 100):
            value = 49
            for i in range(15):
                value = (value + 54 + (d if i == step else 0)) % 100
            assert value != 59
    slipped, value = ["a 49+54: 9+4=13, 5+5+1=11, 13"], 13
    for label in LABELS[1:15]:
        line, value = step_line(label, value, 54)
        slipped.append(line)
    slipped = "\n".join(slipped) + f"\n\\boxed{{{value:02d}}}"
    assert slipped.endswith("\\boxed{69}") and math_reward([slipped], ["59"]) == [0.0]
    assert len(check_working(question, slipped)) == 15
