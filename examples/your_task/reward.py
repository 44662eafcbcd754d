"""Your own reward function, TRL's contract: a plain module-level function of the completions and the dataset's
columns (as lists aligned with the completions), returning one float per completion, or None for "cannot score".
Name it in a YAML by its dotted path: ``env_config: {reward_fn: examples.your_task.reward.last_integer}``."""

import re


def last_integer(completions: list[str], ground_truth: list[str], **_) -> list[float | None]:
    """1.0 if the last integer in the completion equals the ground truth, 0.0 if another, None if there is none."""
    rewards = []
    for completion, truth in zip(completions, ground_truth, strict=True):
        numbers = re.findall(r"-?\d+", completion)
        rewards.append(None if not numbers else float(int(numbers[-1]) == int(truth)))
    return rewards
