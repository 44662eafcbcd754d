"""``SPPOConfig``'s validation, grouped by concern (the batch, the estimator and its critic, the update, the rollouts,
off-policy sampling); each refusal says the fix. A mixin: ``SPPOConfig(ConfigChecks, AlgorithmConfigHooks)``."""

from rllib_sppo.apis import SamplerLogpAPI, TokenValueAPI
from rllib_sppo.core import CRITIC_LOSSES, LOSS_AGG_MODES
from rllib_sppo.estimators import CriticKind, get_estimator

#: The seconds after which a stuck part of a run is named and restarted (docs/reliability.md).
TIMEOUT_KEYS = ("sample_timeout_s", "generation_timeout_s", "learner_update_timeout_s", "weight_sync_timeout_s")


class ConfigChecks:
    def validate(self) -> None:
        super().validate()
        self._validate_batch()
        self._validate_estimator()
        self._validate_update()
        self._validate_rollouts()
        self._validate_off_policy()
        from rllib_sppo.llm_wiring import wiring_problems

        self._refuse_any(wiring_problems(self))
        if self.prompt_selection is not None:
            from rllib_sppo.llm.critic import prompt_selection_problems

            self._refuse_any(prompt_selection_problems(self))
        if self.deepspeed is not None:
            from rllib_sppo.torch.deepspeed_learner import deepspeed_problems

            self._refuse_any(deepspeed_problems(self))

    def _refuse_any(self, problems) -> None:
        for problem in problems:
            self.refuse(problem)

    def _validate_batch(self) -> None:
        batch, n = self.train_batch_size_per_learner, self.samples_per_prompt
        if self.minibatch_size is not None and batch is not None and self.minibatch_size > batch:
            self.refuse(f"minibatch_size ({self.minibatch_size}) is larger than train_batch_size_per_learner "
                        f"({batch}); lower minibatch_size or raise the batch.")
        if self.batch_mode != "complete_episodes":
            self.refuse(f"SPPO scores whole episodes: batch_mode must be 'complete_episodes', not {self.batch_mode!r}.")
        if n > 1 and batch is not None and batch % n:
            self.refuse(f"train_batch_size_per_learner ({batch}) is not a multiple of samples_per_prompt ({n}): "
                        f"{batch} / {n} = {batch / n:g} prompts per learner, so a group would be cut; use "
                        f"{batch // n * n or n} or {(batch // n + 1) * n}.")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            self.refuse(f"max_tokens_per_micro_batch must be a positive token budget (or None: no split), got "
                        f"{self.max_tokens_per_micro_batch}.")

    def _validate_estimator(self) -> None:
        """The estimator, the critic it reads (and its settings), and the samples per prompt its baseline needs."""
        try:
            estimator, name = get_estimator(self.advantage_estimator), self.advantage_estimator
        except ValueError as e:
            self.refuse(str(e))
            return
        critic, critic_loss = estimator.critic, self.resolved_critic_loss
        if critic is None and (self.critic_loss, self.value_clip, self.critic_init) != (None, None, None):
            self.refuse(f"advantage_estimator={name!r} has no critic (its baseline is the group of samples), so "
                        f"critic_loss, value_clip and critic_init do not apply; leave them unset.")
        if critic is None and {"critic", "critic_layers"} & set(self.module_config):
            self.refuse(f"advantage_estimator={name!r} has no critic, so model_config's critic and critic_layers do "
                        f"not apply; remove them.")
        if critic is not None and critic_loss not in CRITIC_LOSSES:
            self.refuse(f"critic_loss={self.critic_loss!r}; choose one of {CRITIC_LOSSES}.")
        if self.value_clip is not None and (critic_loss != "mse" or self.value_clip <= 0):
            self.refuse(f"value_clip={self.value_clip} clips an mse critic's loss and must be > 0 (critic_loss is "
                        f"{critic_loss!r}); unset it or set critic_loss='mse'.")
        if self.normalize_advantage and (name != "sppo" or critic_loss != "bce"):
            self.refuse("normalize_advantage=True needs critic_loss='bce' and advantage_estimator='sppo': it is "
                        "SPPO's A = (R - p) / sqrt(p (1 - p)), with p a probability.")
        if self.critic_init is not None and critic_loss == "bce" and not 0 < self.critic_init < 1:
            self.refuse(f"critic_init={self.critic_init} is a probability for the bce critic: pick it in (0, 1).")
        if critic and self.samples_per_prompt != 1:
            self.refuse(f"advantage_estimator={name!r} samples one response per prompt (its baseline is the "
                        f"critic), got samples_per_prompt={self.samples_per_prompt}; set it to 1, or "
                        f"advantage_estimator='grpo'/'rloo' for N > 1.")
        if estimator.needs_groups and self.samples_per_prompt < 2:
            self.refuse(f"advantage_estimator={name!r} needs a group of samples per prompt for its baseline, got "
                        f"samples_per_prompt={self.samples_per_prompt}; set it to 2 or more (GRPO uses 8).")
        if critic == CriticKind.TOKEN:
            offers, module_name = self._module_offers(TokenValueAPI)
            if not offers:
                self.refuse(f"advantage_estimator={name!r} needs a critic read at every token (an RLModule with "
                            f"TokenValueAPI, e.g. SPPOLLMModule); {module_name} has none. For classic control, "
                            f"RLlib's own PPO is the token-level baseline.")
            if not (0 < self.gamma <= 1 and 0 <= self.lambda_ <= 1):
                self.refuse(f"need 0 < gamma <= 1 and 0 <= lambda_ <= 1, got {self.gamma}, {self.lambda_}.")
        elif (self.gamma, self.lambda_) != (1.0, 1.0):
            self.refuse(f"gamma={self.gamma}, lambda_={self.lambda_}: only advantage_estimator='ppo' discounts "
                        f"(per-token GAE); {name!r} scores the whole episode by its outcome. Leave both at 1.")

    def _validate_update(self) -> None:
        """The PPO update: its loss, learning rates and compute dtype."""
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            self.refuse(f"loss_agg_mode={self.loss_agg_mode!r}; choose one of {LOSS_AGG_MODES}.")
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            self.refuse(f"need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}.")
        if self.dual_clip is not None and self.dual_clip <= 1:
            self.refuse(f"dual_clip must be > 1 (reference 3.0) or None, got {self.dual_clip}.")
        if self.critic_lr <= 0 or self.lr <= 0:
            self.refuse(f"learning rates must be > 0 (lr={self.lr}, critic_lr={self.critic_lr}).")
        if self.temperature <= 0:
            self.refuse(f"temperature must be > 0 (log-probs divide by it), got {self.temperature}.")
        if self.module_config.get("dtype", "float32") == "float16":
            self.refuse("model_config dtype='float16' would need loss scaling, which SPPO's learners do not do; use "
                        "'bfloat16' (fp32 master weights, bf16 compute) or 'float32'.")

    def _validate_rollouts(self) -> None:
        """The generation engine, the weight sync and the timeouts."""
        from rllib_sppo.llm.engines import engine_problems
        from rllib_sppo.llm.weight_group import weight_sync_problems

        self._refuse_any(engine_problems(self))
        if self.weight_sync_chunk_mb <= 0:
            self.refuse(f"weight_sync_chunk_mb must be > 0, got {self.weight_sync_chunk_mb}.")
        self._refuse_any(weight_sync_problems(self))
        for key in TIMEOUT_KEYS:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                self.refuse(f"{key}={value!r}: give a number of seconds > 0 (past it the stuck part is named and "
                            f"restarted; without a bound a stuck part would hang the run).")

    def _validate_off_policy(self) -> None:
        """Truncated importance sampling, and the one-step-off-policy rollouts it corrects."""
        if self.tis_cap is not None:
            if not self.tis_cap >= 1:
                self.refuse(f"tis_cap={self.tis_cap} caps importance weights pi_old / pi_engine and must be >= 1 (a "
                            f"cap below 1 would down-weigh on-policy tokens too); 2.0 is the usual value.")
            offers, module_name = self._module_offers(SamplerLogpAPI)
            if not offers:
                self.refuse(f"tis_cap corrects the gap between an inference engine's log-probs and the learner's; "
                            f"{module_name} samples with the learner's own network (its batches carry no engine "
                            f"log-probs), so there is nothing to correct: leave tis_cap unset.")
        if not self.async_rollouts or self.in_evaluation:  # (RLlib's evaluation config has no EnvRunners of its own)
            return
        if self.num_env_runners < 1:
            self.refuse("async_rollouts samples the next batch on remote EnvRunners while the learner updates on this "
                        "one; with num_env_runners=0 the only EnvRunner samples in the learner's own process, so "
                        "nothing can overlap: set num_env_runners >= 1, or async_rollouts=False.")
        if not self.llm_runner:
            self.refuse(f"async_rollouts needs the LLM EnvRunner (rllib_sppo.llm.runner.LLMEnvRunner), not "
                        f"{getattr(self.env_runner_cls, '__name__', self.env_runner_cls)}.")
        if self.tis_cap is None:
            self.refuse("async_rollouts samples each batch with weights one update behind the learner's; set tis_cap "
                        "(e.g. 2.0) so that truncated importance sampling corrects that lag.")
        if self.max_requests_in_flight_per_env_runner != 1:
            self.refuse(f"async_rollouts keeps exactly one batch in flight per EnvRunner (one step off policy); "
                        f"max_requests_in_flight_per_env_runner={self.max_requests_in_flight_per_env_runner} would "
                        f"keep more: set it to 1.")

    def _module_offers(self, api: type) -> tuple[bool, str]:
        """Whether the configured RLModule class implements ``api``, and the class's name (for messages)."""
        module_class = getattr(self.rl_module_spec, "module_class", None)
        offers = isinstance(module_class, type) and issubclass(module_class, api)
        return offers, getattr(module_class, "__name__", str(module_class))

