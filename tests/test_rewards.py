"""Reward functions with the real math-verify and reasoning-gym verifiers."""

import json
import time

import pytest
import reasoning_gym

from envs.rewards import (REWARD_FNS, extract_answer, extract_boxed, get_reward_fn, math_reward,
                          reasoning_gym_reward, score_with_timeout)


def raising_reward(completions, **_):
    raise ValueError("verifier exploded")


def hanging_reward(completions, **_):
    if completions:  # hangs on real input only, like a verifier stuck on one pathological answer
        time.sleep(60)
    return [1.0] * len(completions)


def short_reward(completions, **_):
    return [1.0]


@pytest.mark.parametrize("text, expected", [
    (r"The answer is \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
    (r"<think>maybe \boxed{7}</think> so \boxed{8}", "8"),
    (r"<think>maybe \boxed{7}</think> I am not sure", None),
    (r"\boxed{3} and a truncated \boxed{\frac{1}{", "3"),
    ("no box at all", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    (r"So the sum is \boxed{163}.", "163", 1.0),
    (r"\boxed{164}", "163", 0.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"\boxed{1/2}", "0.5", 1.0),
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
    (r"\boxed{2^{1/2}}", r"\sqrt{2}", 1.0),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    (r"\boxed{x + 1}", "1 + x", 1.0),
    (r"<think>\boxed{3}</think>The answer is \boxed{4}", "3", 0.0),
    (r"<think>\boxed{3}</think>The answer is 3", "3", None),
    ("The answer is 3", "3", None),
    (r"\boxed{}", "3", None),
    (r"\boxed{#@!}", "3", 0.0),
    (r"\boxed{banana}", "3", 0.0),
])
def test_math_reward(completion, gold, expected):
    assert math_reward([completion], ground_truth=[gold], data_source=["math"]) == [expected]


def test_model_output_is_parsed_never_executed(tmp_path):
    marker = tmp_path / "executed"
    payloads = [f"\\boxed{{__import__('os').system('touch {marker}')}}", f"\\boxed{{open('{marker}', 'w')}}",
                f"\\boxed{{exec(\"open('{marker}', 'w')\")}}"]
    item = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=0)[0]  # reasoning-gym's own scorer too
    for rewards in (math_reward(payloads, ground_truth=["0"] * 3),
                    reasoning_gym_reward(payloads, ground_truth=[item["answer"]] * 3, metadata=[item["metadata"]] * 3)):
        assert all(r in (0.0, None) for r in rewards), rewards
    assert not marker.exists()


def test_math_reward_boxed_gold_and_batch():
    rewards = math_reward([r"\boxed{5}", r"\boxed{6}", "?"], ground_truth=[r"\boxed{5}", "$5$", "5"])
    assert rewards == [1.0, 0.0, None]


def test_reasoning_gym_reward_uses_the_task_scorer():
    items = list(reasoning_gym.create_dataset("chain_sum", size=3, seed=7))
    item = items[0]
    completions = [
        rf"I add them up: \boxed{{{item['answer']}}}",
        f"<answer> {item['answer']} </answer>",
        f"Working...\n{item['answer']}\n",
        rf"\boxed{{{int(item['answer']) + 1}}}",
        "   \n",
    ]
    meta = item["metadata"]
    rewards = reasoning_gym_reward(completions, ground_truth=[item["answer"]] * 5, metadata=[meta] * 5)
    assert rewards == [1.0, 1.0, 1.0, 0.0, None]
    # metadata stored as a JSON string (e.g. in Parquet) works the same
    assert reasoning_gym_reward(completions[:1], [item["answer"]], [json.dumps(meta)]) == [1.0]


def test_reasoning_gym_reward_partial_credit_of_the_task():
    item = reasoning_gym.create_dataset("fraction_simplification", size=1, seed=0)[0]
    score = reasoning_gym.get_score_answer_fn("fraction_simplification")
    wrong = "1/2"
    reward = reasoning_gym_reward([rf"\boxed{{{wrong}}}"], [item["answer"]], [item["metadata"]])
    assert reward == [score(wrong, item)]
    assert reasoning_gym_reward([rf"\boxed{{{item['answer']}}}"], [item["answer"]], [item["metadata"]]) == [1.0]


def test_extract_answer_fallbacks():
    assert extract_answer(r"<answer>1</answer> \boxed{2}") == "2"
    assert extract_answer("<answer>1</answer> then <answer>5</answer>\nbye") == "5"
    assert extract_answer("<think>x\n9</think>\nfinal: 12\n\n") == "final: 12"
    assert extract_answer("<think>12</think>") is None


def test_get_reward_fn_names_and_dotted_paths():
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("reasoning_gym") is reasoning_gym_reward
    assert get_reward_fn("envs.rewards.math_reward") is math_reward
    assert get_reward_fn(raising_reward) is raising_reward
    with pytest.raises(ValueError, match=r"unknown reward fn 'gsm8k'.*'math'.*'reasoning_gym'"):
        get_reward_fn("gsm8k")
    with pytest.raises(ValueError, match="envs.rewards.nope"):
        get_reward_fn("envs.rewards.nope")
    with pytest.raises(ValueError, match="no_such_pkg.fn"):
        get_reward_fn("no_such_pkg.fn")
    assert set(REWARD_FNS) == {"math", "reasoning_gym"}


def test_score_with_timeout_scores_in_a_worker():
    rewards, errors = score_with_timeout(
        math_reward, [r"\boxed{2}", r"\boxed{3}", "none"], {"ground_truth": ["2", "2", "2"]}
    )
    assert (rewards, errors) == ([1.0, 0.0, None], [])


def test_score_with_timeout_reports_a_raising_verifier():
    rewards, errors = score_with_timeout(raising_reward, ["a", "b"], {"ground_truth": ["1", "2"]})
    assert rewards == [None, None]
    assert errors == ["reward fn raising_reward raised ValueError: verifier exploded"]


def test_score_with_timeout_reports_a_malformed_result():
    rewards, errors = score_with_timeout(short_reward, ["a", "b"], {})
    assert rewards == [None, None] and "returned [1.0] for 2 completions" in errors[0]


def test_score_with_timeout_bounds_a_hanging_verifier_and_recovers():
    start = time.monotonic()
    rewards, errors = score_with_timeout(hanging_reward, ["a"], {}, timeout_s=1.0)
    assert time.monotonic() - start < 5.0
    assert rewards == [None] and errors == ["reward fn hanging_reward timed out after 1.0s"]
    # the hung worker was replaced: scoring works again
    assert score_with_timeout(math_reward, [r"\boxed{1}"], {"ground_truth": ["1"]}) == ([1.0], [])
