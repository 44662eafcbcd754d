"""The critic as an instrument, read by the driver from the learners: prompt scores before any generation.

SPPO's critic predicts from the prompt alone how likely the policy is to solve it. The learners hold it (the
EnvRunners get only the policy), so the driver asks them: ``critic_logits`` sends prompt texts to the learners and
gets one logit per prompt back. Two readers use it: prompt selection (``score_prompt_candidates``, before each
sample, ``SPPOConfig.prompt_selection``) and the held-out calibration (``rllib_sppo.llm.evaluation``).

Why a call to the learners rather than the critic's weights on the EnvRunners: the learners hold the critic as it
is after the last update, in the place it trains (a DeepSpeed learner's ZeRO partitions included), at no memory
cost on the runners' accelerators (which vLLM fills) and no second weight sync per iteration; what travels is the
prompt texts out and one float per prompt back. The price is one prompt-only forward pass of the critic per
iteration on the learners, logged as ``timing_s/prompt_scoring`` (docs/critic.md).
"""

from __future__ import annotations

import numpy as np


def critic_logits(learner_group, texts: list[str]) -> np.ndarray:
    """The critic's logit for each prompt text, [len(texts)]. Every learner reads them (a ZeRO-3 forward gathers
    its parameters collectively, so all take part), the first one's are returned."""
    results = list(learner_group.foreach_learner(lambda learner: learner.prompt_values(texts)))
    for result in results:
        if not result.ok:
            raise result.get()
    return np.asarray(results[0].get())


def score_prompt_candidates(env_runner_group, learner_group) -> None:
    """Prompt selection: every sampling EnvRunner's candidate prompts scored by the critic in one call to the
    learners, and the logits handed back to each runner (the local one when there are no remote runners)."""
    if env_runner_group.num_remote_workers() == 0:
        runner = env_runner_group.local_env_runner
        candidates = runner.prompt_candidates()
        runner.set_prompt_scores(candidates["indices"], critic_logits(learner_group, candidates["texts"]))
        return
    pools = env_runner_group.foreach_env_runner(lambda r: r.prompt_candidates(), local_env_runner=False)
    if not pools:
        return  # no healthy runner answered: RLlib restores them; the sample that follows says so
    logits = critic_logits(learner_group, [text for pool in pools for text in pool["texts"]])
    scores, start = {}, 0
    for pool in pools:
        n = len(pool["indices"])
        scores[pool["worker"]] = (pool["indices"], logits[start:start + n])
        start += n
    env_runner_group.foreach_env_runner(lambda r: r.set_prompt_scores(*scores[r.worker_index]),
                                        local_env_runner=False,
                                        remote_worker_ids=[w for w in env_runner_group.healthy_worker_ids()
                                                           if w in scores])
