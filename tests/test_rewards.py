"""Reward functions with the real math-verify and reasoning-gym verifiers."""

import json
import os
import signal
import time

import pytest
import reasoning_gym

from envs.rewards import (REWARD_FNS, RewardScorer, extract_answer, extract_boxed, final_answer,
                          final_answer_reward, get_reward_fn, math_reward, reasoning_gym_reward,
                          working_reward)


def picky_reward(completions, ground_truth, **_):
    """Raises, hangs, dies or misbehaves on some answers, like a verifier stuck on one pathological answer."""
    rewards = []
    for c, gt in zip(completions, ground_truth):
        if c == "raise":
            raise ValueError("verifier exploded")
        if c == "hang":
            time.sleep(60)
        if c == "hang in C":  # where the timeout signal cannot reach it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        if c == "die":
            os._exit(1)
        if c == "two":
            return [1.0, 1.0]
        if c == "text":
            return ["yes"]
        rewards.append(float(c == gt))
    return rewards


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


@pytest.mark.parametrize("completion, expected", [
    ("7 - 0 = 7", "7"),
    ("7 - 0 equals 6", "6"),
    ("0 - 4 = -4.", "-4"),
    ("3-9=-6", "-6"),
    (r"It is 12, so \boxed{13}", "13"),
    ("about 1,234.5 apples", "1234.5"),
    ("10 + 8 = 18\n\nThe answer is within \\boxed{}.", "18"),  # an empty box is no answer (SmolLM2 writes it)
    ("<think>it is 3</think> no idea", None),
    ("seven", None),
])
def test_final_answer_is_the_boxed_one_else_the_last_number(completion, expected):
    assert final_answer(completion) == expected


def test_final_answer_reward_pays_only_the_right_result():
    completions = ["7 - 0 = 6", "7 - 0 = 7", "7 - 0 equals 6", r"\boxed{7}", r"7 - 0 = 7, \boxed{6}", "seven"]
    assert final_answer_reward(completions, ground_truth=["7"] * 6) == [0.0, 1.0, 0.0, 1.0, 0.0, None]
    assert final_answer_reward(["0 - 4 = -4", "4 - 0 = 4"], ground_truth=["-4", "-4"]) == [1.0, 0.0]
    # reasoning-gym's own scorer pays partial credit for the restated wrong line; this one does not
    item = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=0)[0]
    wrong = f"{item['question'].split('Calculate ')[-1].rstrip('.')} = {int(item['answer']) + 1}"
    assert final_answer_reward([wrong], [item["answer"]]) == [0.0]


def test_get_reward_fn_names_and_dotted_paths():
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("reasoning_gym") is reasoning_gym_reward
    assert get_reward_fn("envs.rewards.math_reward") is math_reward
    assert get_reward_fn(picky_reward) is picky_reward
    with pytest.raises(ValueError, match=r"reward_fn='gsm8k'; choose one of .*'math'.*'reasoning_gym'.*, or the "
                                         r"dotted path of your own \(a function"):
        get_reward_fn("gsm8k")
    with pytest.raises(ValueError, match="envs.rewards.nope"):
        get_reward_fn("envs.rewards.nope")
    with pytest.raises(ValueError, match="no_such_pkg.fn"):
        get_reward_fn("no_such_pkg.fn")
    with pytest.raises(ValueError, match="reward_fn='envs.rewards.REWARD_FNS' names a 'dict' object, not a function"):
        get_reward_fn("envs.rewards.REWARD_FNS")
    assert get_reward_fn("final_answer") is final_answer_reward
    assert get_reward_fn("working") is working_reward
    assert set(REWARD_FNS) == {"math", "final_answer", "reasoning_gym", "working"}


def test_scorer_scores_a_batch_in_workers():
    scorer = RewardScorer(math_reward, num_workers=2)
    rewards, errors = scorer([r"\boxed{2}", r"\boxed{3}", "none"], {"ground_truth": ["2", "2", "2"]})
    assert (rewards, errors) == ([1.0, 0.0, None], [None, None, None])
    assert len(scorer._workers) == 2 and scorer([], {}) == ([], [])
    scorer.close()
    assert scorer._workers == []


def test_scorer_isolates_raising_and_malformed_samples():
    scorer = RewardScorer(picky_reward, num_workers=2)
    rewards, errors = scorer(["1", "raise", "two", "text", "5"], {"ground_truth": ["1", "1", "1", "1", "1"]})
    assert rewards == [1.0, None, None, None, 0.0]
    assert errors == [None, "reward fn picky_reward raised ValueError: verifier exploded",
                      "reward fn picky_reward returned [1.0, 1.0] for 1 completion",
                      "reward fn picky_reward returned a non-numeric reward: could not convert string to float: 'yes'",
                      None]
    scorer.close()


@pytest.mark.system
def test_scorer_bounds_a_hanging_verifier_to_its_timeout():
    scorer = RewardScorer(picky_reward, timeout_s=1.0, num_workers=2)
    assert scorer(["1"], {"ground_truth": ["1"]}) == ([1.0], [None])  # started and warm
    start = time.monotonic()
    rewards, errors = scorer(["1", "hang", "1", "1"], {"ground_truth": ["1"] * 4})
    assert time.monotonic() - start < 30.0  # the hanging sample cost its timeout (1 s, not 60); the others scored
    assert rewards == [1.0, None, 1.0, 1.0] and errors[1] == "reward fn picky_reward timed out after 1.0s"
    scorer.close()


@pytest.mark.system
@pytest.mark.parametrize("bad", ["hang in C", "die"])
def test_scorer_replaces_a_stuck_or_dead_worker(bad):
    scorer = RewardScorer(picky_reward, timeout_s=1.0, num_workers=2)
    assert scorer(["1"], {"ground_truth": ["1"]}) == ([1.0], [None])
    start = time.monotonic()
    rewards, errors = scorer(["1", bad, "1", "1"], {"ground_truth": ["1"] * 4})
    assert time.monotonic() - start < 30.0  # the chunk budget (2 samples x 1 s, plus 1 s), not 60 s
    assert rewards == [None, None, 1.0, 1.0]  # the stuck worker's chunk is lost, the other one scored
    assert errors[0] == errors[1] and "did not return 2 samples within 3s (stuck or died); replaced" in errors[0]
    assert scorer._workers == []  # replaced: the next call starts new workers, and they score
    assert scorer([r"1"], {"ground_truth": ["1"]}) == ([1.0], [None])
    scorer.close()


@pytest.mark.system
@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL])
def test_scorer_replaces_a_worker_stopped_or_killed_while_idle(fault):
    """A worker stopped (SIGSTOP) or killed (the OOM killer) while it waits for work costs the next call its chunk,
    within the chunk's budget, and the workers are replaced; the close does not hang on it. (Workers sharing
    multiprocessing.Pool's task queue hang here: the idle worker holds the queue's lock, forever.)"""
    scorer = RewardScorer(picky_reward, timeout_s=1.0, num_workers=2)
    assert scorer(["1", "1"], {"ground_truth": ["1", "1"]}) == ([1.0, 1.0], [None, None])
    victim = scorer._workers[0][0]
    os.kill(victim.pid, fault)
    start = time.monotonic()
    rewards, errors = scorer(["1", "1", "1", "1"], {"ground_truth": ["1"] * 4})
    assert time.monotonic() - start < 30.0  # the chunk budget, not a hang (60 s)
    assert rewards == [None, None, 1.0, 1.0] and "did not return 2 samples within 3s (stuck or died)" in errors[0]
    assert not victim.is_alive() and scorer._workers == []
    assert scorer(["1"], {"ground_truth": ["1"]}) == ([1.0], [None])
    scorer.close()


def test_scorer_refuses_a_reward_fn_workers_cannot_load():
    with pytest.raises(ValueError, match="must be a module-level function"):
        RewardScorer(lambda completions, **_: [1.0] * len(completions))
    with pytest.raises(ValueError, match="at least one worker"):
        RewardScorer(math_reward, num_workers=0)
