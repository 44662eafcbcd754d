"""The GPU examples that mirror the paper's runs train on the reference's effective settings (../shared/SPPO.md,
"Reference hyperparameters"), read through RLlib's own meaning of each key: batch keys count per learner, so an
iteration trains on train_batch_size_per_learner x num_learners prompts and an optimizer step sees minibatch_size x
num_learners (DDP and ZeRO average the learners' gradients)."""

from pathlib import Path

import pytest

import envs  # noqa: F401  (registers ReasoningBandit-v0)
from rllib_sppo import SPPO
from rllib_sppo.experiments import build_config, load_experiments

REPO = Path(__file__).resolve().parents[1]

#: The reference runs (SPPO.md): prompts per iteration and per optimizer step, longest response, sampling
#: temperature, the policy's and the critic's learning rates and the policy's weight decay, and the loss_agg_mode
#: that reproduces the reference's token-mean per micro-batch (7B: one sequence per micro-batch, exactly
#: seq-mean-token-mean; 1.5B: two, a mean over pairs, closest to seq-mean-token-mean).
REFERENCE = {
    "deepscaler_1.5b_sppo_gpu.yaml": {"prompts": 256, "prompts_per_step": 128, "response": 8192, "temperature": 0.6,
                                      "top_p": 1.0, "lr": 1e-6, "critic_lr": 5e-6, "weight_decay": 0.01,
                                      "loss_agg_mode": "seq-mean-token-mean"},
    "dapo_7b_small_critic_sppo_gpu.yaml": {"prompts": 512, "prompts_per_step": 32, "response": 8192,
                                           "temperature": 0.6, "top_p": 1.0, "lr": 1e-6, "critic_lr": 1e-5,
                                           "weight_decay": 0.1, "loss_agg_mode": "seq-mean-token-mean"},
}


def effective(config) -> dict:
    """What an iteration of ``config`` trains on, globally."""
    learners = max(config.num_learners, 1)
    return {"prompts": config.total_train_batch_size // config.samples_per_prompt,
            "prompts_per_step": config.minibatch_size * learners // config.samples_per_prompt,
            "response": config.max_response_tokens, "temperature": config.temperature, "top_p": config.top_p,
            "lr": config.lr, "critic_lr": config.critic_lr, "weight_decay": config.weight_decay,
            "loss_agg_mode": config.loss_agg_mode}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_each_gpu_example_trains_on_the_reference_settings(name):
    path = REPO / "tuned_examples" / name
    [(_, experiment)] = load_experiments(str(path)).items()
    config = build_config(SPPO, experiment["env"], experiment["config"], str(path))
    assert effective(config) == REFERENCE[name]
    assert config.advantage_estimator == "sppo" and config.samples_per_prompt == 1 and config.num_epochs == 1
    assert config.entropy_coeff == 0 and config.clip_low == config.clip_high == 0.2 and config.dual_clip == 3.0
    # The engine's context holds a prompt and the longest response; a micro-batch holds at least one such row.
    max_len = config.engine_kwargs["max_model_len"]
    assert max_len > config.max_response_tokens and config.max_tokens_per_micro_batch >= max_len
    # One EnvRunner round poses its share of the iteration's prompts in one engine call.
    assert config.num_envs_per_env_runner * max(config.num_env_runners, 1) == config.total_train_batch_size


def test_the_per_learner_reading_is_the_one_rllib_trains_on():
    """The check above is not a tautology: with 4 learners RLlib's total is 4x the per-learner key (the 7B example's
    old 512 would have been 2,048 prompts an iteration)."""
    from rllib_sppo import SPPOConfig

    config = SPPOConfig().training(train_batch_size_per_learner=512, minibatch_size=32).learners(num_learners=4)
    assert effective(config)["prompts"] == 2048 and effective(config)["prompts_per_step"] == 128
