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

#: ``SPPOConfig.prompt_selection``'s keys and their defaults.
PROMPT_SELECTION_DEFAULTS = {"pool": 4, "floor": 0.05}


def critic_logits(learner_group, texts: list[str]) -> np.ndarray:
    """The critic's logit for each prompt text, [len(texts)]. Every learner reads them (a ZeRO-3 forward gathers
    its parameters collectively, so all take part), the first one's are returned."""
    results = list(learner_group.foreach_learner(lambda learner: learner.prompt_values(texts)))
    for result in results:
        if not result.ok:
            raise result.get()
    return np.array(results[0].get())  # (a copy: from a remote learner they come read-only, Ray's object store)


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


def prompt_selection_problems(config):
    """What is wrong with ``config.prompt_selection`` (``SPPOConfig.validate``), each with its fix."""
    example = "{'pool': 4, 'floor': 0.05}"
    if not isinstance(config.prompt_selection, dict):
        yield f"prompt_selection must be a dict such as {example} (or None: off), got {config.prompt_selection!r}."
        return
    unknown = sorted(set(config.prompt_selection) - set(PROMPT_SELECTION_DEFAULTS))
    if unknown:
        yield f"prompt_selection has unknown key(s) {unknown}; its keys are pool and floor, e.g. {example}."
    sel = config.resolved_prompt_selection
    if not isinstance(sel["pool"], int) or isinstance(sel["pool"], bool) or sel["pool"] < 2:
        yield (f"prompt_selection pool={sel['pool']!r}: candidates scored per prompt posed, an int >= 2 (4: score "
               f"four times the prompts, pose a quarter of them).")
    if not isinstance(sel["floor"], (int, float)) or isinstance(sel["floor"], bool) or not sel["floor"] > 0:
        yield (f"prompt_selection floor={sel['floor']!r} must be a number > 0: it keeps every prompt reachable (with "
               f"0, a prompt the critic is sure about, p = 0 or 1, is never posed).")
    if not config.prompt_critic:
        yield (f"prompt_selection scores prompts with SPPO's critic of the prompt, a probability (advantage_estimator="
               f"'sppo', critic_loss='bce'); advantage_estimator={config.advantage_estimator!r} with critic_loss="
               f"{config.resolved_critic_loss!r} has none.")
    if not hasattr(config.env_runner_cls, "prompt_candidates"):
        name = getattr(config.env_runner_cls, "__name__", config.env_runner_cls)
        yield (f"prompt_selection chooses the prompts of LLM runs: set env_runner_cls to "
               f"rllib_sppo.llm.runner.LLMEnvRunner (got {name}).")
