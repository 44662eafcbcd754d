"""``SPPOConfig``: SPPO's keys (typed ``training()`` arguments, documented there), ``.llm(...)``, and what the rest of
the package reads from them; its validation, grouped by concern, is ``config_checks.py``."""

import numpy as np
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_sppo.config_checks import TIMEOUT_KEYS, ConfigChecks  # noqa: F401 (TIMEOUT_KEYS: read here)
from rllib_sppo.env_runner import EpisodeEnvRunner, flatten_observations
from rllib_sppo.estimators import CriticKind, Estimator, get_estimator
from rllib_sppo.llm.critic import PROMPT_SELECTION_DEFAULTS
from rllib_sppo.monitoring import PrometheusExport
from rllib_sppo.private_api import AlgorithmConfigHooks



class SPPOConfig(ConfigChecks, AlgorithmConfigHooks):
    """SPPO's configuration; defaults are the reference run's (1.5B on DeepScaleR).

    Inherited keys keep RLlib's meaning: ``lr`` is the policy's learning rate,
    ``train_batch_size_per_learner`` counts env steps (= prompts for LLM bandits),
    ``minibatch_size`` and ``num_epochs`` shape the PPO update, ``grad_clip`` is
    applied to each optimizer's global norm. SPPO's own keys: ``training()``.
    """

    def __init__(self, algo_class=None):
        # The algorithm this config builds (RLlib's configs sit in their algorithm's file; SPPO's imports this module,
        # so its class is imported when a config is made, not when this module loads).
        from rllib_sppo.sppo import SPPO

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
        # A remote EnvRunner that has not returned its sample within this many seconds is named in an error and
        # restarted (RLlib alone would drop the late sample and ask again: a silent stall). RLlib's 60 s is short
        # for LLM sampling.
        self.sample_timeout_s = 3600.0
        # SPPO's metrics as Prometheus series for the Ray dashboard (rllib_sppo/monitoring.py).
        self.callbacks_on_train_result = PrometheusExport()
        # SPPO's keys (see training()): the update, the critic, and the estimator.
        self.critic_lr = 5e-6
        self.weight_decay = 0.01
        self.critic_weight_decay = 0.01
        self.clip_low = 0.2
        self.clip_high = 0.2
        self.dual_clip = 3.0
        self.loss_agg_mode = "token-mean"
        self.advantage_estimator = "sppo"
        self.gamma = 1.0
        self.lambda_ = 1.0
        self.critic_loss = None
        self.value_clip = None
        self.critic_init = None
        self.normalize_advantage = False
        self.entropy_coeff = 0.0
        self.tis_cap = None
        self.async_rollouts = False
        self.max_nonfinite_updates = 3
        self.max_tokens_per_micro_batch = None
        self.deepspeed = None
        # LLM rollouts (read by rllib_sppo.llm.runner.LLMEnvRunner) and the held-out evaluation.
        self.temperature = 0.6
        self.top_p = 1.0
        self.max_response_tokens = 8192
        self.samples_per_prompt = 1
        self.rollout_engine = "vllm"
        self.engine_kwargs = {}
        self.gpu_memory_utilization = None
        self.engine_sleep_level = None
        self.weight_sync = None
        self.weight_sync_chunk_mb = 512
        self.enforce_eager = None
        self.eval_samples_per_prompt = 4
        self.prompt_selection = None
        # Timeouts (TIMEOUT_KEYS, with RLlib's sample_timeout_s above).
        self.weight_sync_timeout_s = 600.0
        self.generation_timeout_s = 1800.0
        self.learner_update_timeout_s = 1800.0

    def training(
        self, *,
        critic_lr: float = NotProvided, weight_decay: float = NotProvided, critic_weight_decay: float = NotProvided,
        clip_low: float = NotProvided, clip_high: float = NotProvided, dual_clip: float | None = NotProvided,
        loss_agg_mode: str = NotProvided, advantage_estimator: str = NotProvided, lambda_: float = NotProvided,
        critic_loss: str | None = NotProvided, value_clip: float | None = NotProvided,
        critic_init: float | None = NotProvided, normalize_advantage: bool = NotProvided,
        entropy_coeff: float = NotProvided, tis_cap: float | None = NotProvided, async_rollouts: bool = NotProvided,
        max_nonfinite_updates: int = NotProvided, max_tokens_per_micro_batch: int | None = NotProvided,
        deepspeed: dict | None = NotProvided, temperature: float = NotProvided, top_p: float = NotProvided,
        max_response_tokens: int = NotProvided, samples_per_prompt: int = NotProvided,
        rollout_engine: str = NotProvided, engine_kwargs: dict = NotProvided,
        gpu_memory_utilization: float | None = NotProvided, engine_sleep_level: int | None = NotProvided,
        weight_sync: str | None = NotProvided, weight_sync_chunk_mb: float = NotProvided,
        enforce_eager: bool | None = NotProvided, eval_samples_per_prompt: int = NotProvided,
        prompt_selection: dict | None = NotProvided, weight_sync_timeout_s: float = NotProvided,
        generation_timeout_s: float = NotProvided, learner_update_timeout_s: float = NotProvided,
        **kwargs,
    ) -> "SPPOConfig":
        """Sets SPPO's training keys; ``kwargs`` are RLlib's (``AlgorithmConfig.training``: ``lr``, ``gamma``, ...).
        Each key in more detail: docs/configuration.md.

        Args:
            critic_lr: The critic's learning rate (its own AdamW).
            weight_decay: AdamW weight decay of the policy optimizer.
            critic_weight_decay: AdamW weight decay of the critic optimizer.
            clip_low: PPO clip range below 1 (ratio >= 1 - clip_low).
            clip_high: PPO clip range above 1 (ratio <= 1 + clip_high).
            dual_clip: Dual-clip constant c > 1 bounding the loss for A < 0; None turns it off.
            loss_agg_mode: How per-token losses become one number: token-mean, seq-mean-token-mean, seq-mean-token-sum.
            advantage_estimator: A name in ``rllib_sppo.estimators.ESTIMATORS``: "sppo" (the critic's baseline,
                N = 1); "grpo", "drgrpo", "rloo" (N > 1 samples per prompt, no critic); "ppo" (token-level PPO as
                verl runs it, LLM module only); or the dotted path of your own (an ``@estimator`` function, see
                ``rllib_sppo.estimators``), e.g. "my_pkg.estimators.my_sppo".
            lambda_: GAE lambda of token-level PPO, with RLlib's ``gamma`` ("ppo" only; 1 and 1 suit outcomes).
            critic_loss: "bce" (outcomes in [0, 1]; A = R - sigmoid(z)) or "mse" (A = R - V); None: the estimator's.
            value_clip: Clip range of an mse critic's loss around its value before the update (verl's
                cliprange_value); None: the estimator's own (0.5 for "ppo", unclipped for "sppo").
            critic_init: The critic's estimate before any update (P(R = 1) for bce, V for mse), e.g. the policy's
                starting accuracy. None: the head starts at 0 (p = 0.5), as the reference.
            normalize_advantage: A = (R - p) / sqrt(p (1 - p)) instead of R - p (bce only; not in the reference).
            entropy_coeff: Entropy bonus coefficient (reference: 0).
            tis_cap: Truncated importance sampling: each response token's policy loss weighed by min(pi_old /
                pi_engine, tis_cap), detached (LLM module). None: off; 2.0 is the usual cap.
            async_rollouts: One-step-off-policy rollouts: remote EnvRunners sample the next batch during the update,
                with weights one update behind (needs num_env_runners >= 1, the LLM EnvRunner and tis_cap).
            max_nonfinite_updates: Stop the run (saving the last good weights) after this many optimizer steps in a
                row were skipped for a non-finite loss or gradient.
            max_tokens_per_micro_batch: Token budget of one forward/backward (classic control: steps): minibatches
                are split into micro-batches packed by length, gradients accumulated. None: no split.
            deepspeed: A DeepSpeed learner for the LLM module: {"zero_stage": 2 or 3, "offload_optimizer": bool,
                "offload_param": bool}, defaults 2, False, False. None: the torch learner.
            temperature: Sampling temperature; the learner's log-probs use logits / temperature too.
            top_p: Nucleus sampling threshold (reference: 1.0).
            max_response_tokens: Longest response, in tokens (reference: 8192).
            samples_per_prompt: Responses sampled per prompt: 1 for SPPO (its baseline is the critic), N > 1 for
                group estimators.
            rollout_engine: A name in ``rllib_sppo.llm.engines.ENGINES``: "vllm" or "transformers".
            engine_kwargs: Extra engine arguments, e.g. {"max_model_len": 1024, "dtype": "bfloat16"}: vLLM takes any
                argument of ``vllm.LLM`` (and refuses a name it lacks; max_model_len: the model's context length by
                default, a shorter one takes less KV-cache memory); the transformers engine takes dtype alone.
            gpu_memory_utilization: Share of a GPU vLLM takes. None: 0.4 beside the learner (num_env_runners=0),
                else 0.9.
            engine_sleep_level: What the engine frees during the update: 0 nothing, 1 its KV cache, 2 its weights
                too. None: 2 beside the learner on a GPU, else 0.
            weight_sync: How remote LLM EnvRunners receive the policy: "collective" (broadcast by the learner over a
                torch.distributed group of their own: NCCL with a whole GPU each, else gloo) or "object_store"
                (Ray's object store). None: collective, but the object store with async_rollouts.
            weight_sync_chunk_mb: Remote EnvRunners receive the policy in its compute dtype in chunks (buckets) of at
                most this many MB, loaded one at a time.
            enforce_eager: vLLM without CUDA graphs. None: True on a CPU machine, False on a GPU one.
            eval_samples_per_prompt: k of the held-out evaluation (avg@k, pass@k).
            prompt_selection: Critic-guided prompt selection: {"pool": int >= 2, "floor": float > 0}, defaults 4,
                0.05; prompts posed with probability proportional to p (1 - p) + floor (docs/critic.md). None: off.
            weight_sync_timeout_s: A remote EnvRunner not done loading new weights within this many seconds is named
                and restarted; fetching them from the learners past it ends the process naming it.
            generation_timeout_s: One engine call past this many seconds ends its EnvRunner's process, naming it.
            learner_update_timeout_s: One learner update, or reading the learners' state for a checkpoint, past this
                many seconds ends the algorithm's process, naming it (Tune restarts the trial: max_failures).
        """
        sppo_keys = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")}
        super().training(**kwargs)
        for key, value in sppo_keys.items():
            if value is not NotProvided:
                setattr(self, key, value)
        return self

    def llm(self, *, policy: str, critic: str | None = None, engine: str | None = None,
            **model_config) -> "SPPOConfig":
        """Wires an LLM run in one call (YAML: ``llm: {policy: ..., critic: ..., engine: ...}``): the LLM EnvRunner,
        the LLM RLModule (``policy`` and ``critic`` model folders or ``builtin:`` names, and any other of its
        ``model_config`` keys, e.g. ``dtype``, ``gradient_checkpointing``), the token-batch learner connector in
        place of RLlib's default pipeline, and the held-out evaluation; ``engine`` sets ``rollout_engine``. Each
        piece stays overridable by the usual calls afterwards; ``validate()`` refuses a set that does not fit
        together (``rllib_sppo.llm_wiring``)."""
        from rllib_sppo.llm_wiring import wire

        wire(self, policy, critic, engine, model_config)
        return self

    # What the rest of the package reads.

    @property
    def module_config(self) -> dict:
        """The RLModule's model_config as the module gets it (RLlib: the spec's keys win over ``model_config``)."""
        return {**self.model_config, **(getattr(self.rl_module_spec, "model_config", None) or {})}

    @property
    def llm_runner(self) -> bool:
        """Whether the EnvRunners are LLM ones (``rllib_sppo.llm.runner.LLMEnvRunner``: chunked weight sync, one-call
        batches, a data position)."""
        from rllib_sppo.llm_wiring import is_llm_runner

        return is_llm_runner(self.env_runner_cls)

    @property
    def resolved_weight_sync(self) -> str:
        """``weight_sync``, or where unset: "collective", but "object_store" with async_rollouts (a runner loads its
        weights after sampling, which a broadcast would wait for)."""
        if self.weight_sync is not None:
            return self.weight_sync
        return "object_store" if self.async_rollouts else "collective"

    @property
    def resolved_prompt_selection(self) -> dict | None:
        """``prompt_selection`` with its defaults filled in; None when off."""
        return None if self.prompt_selection is None else {**PROMPT_SELECTION_DEFAULTS, **self.prompt_selection}

    @property
    def resolved_estimator(self) -> Estimator | None:
        """The estimator ``advantage_estimator`` names (None when it names none: ``validate`` says why)."""
        try:
            return get_estimator(self.advantage_estimator)
        except ValueError:
            return None

    @property
    def prompt_critic(self) -> bool:
        """Whether the critic predicts, from the prompt alone, the probability that the policy solves it (SPPO's
        sequence critic with the bce loss): what prompt selection and the held-out calibration read."""
        estimator = self.resolved_estimator
        return bool(estimator and estimator.critic == CriticKind.SEQUENCE and self.resolved_critic_loss == "bce")

    @property
    def resolved_critic_loss(self) -> str | None:
        """``critic_loss``, or the estimator's own when unset (None for a critic-free estimator)."""
        estimator = self.resolved_estimator
        return self.critic_loss or (estimator and estimator.default_critic_loss)

    @property
    def resolved_value_clip(self) -> float | None:
        """``value_clip``, or the estimator's own for its mse critic (see ``rllib_sppo.estimators``)."""
        estimator = self.resolved_estimator
        if self.value_clip is not None or self.resolved_critic_loss != "mse":
            return self.value_clip
        return estimator and estimator.default_value_clip

    def model_config_additions(self) -> dict:
        # The module computes log-probs at the sampling temperature, builds the critic the estimator reads (or
        # none), and splits its batches into micro-batches of the token budget.
        bias = self.critic_init
        if bias is not None and self.resolved_critic_loss == "bce" and 0 < bias < 1:
            bias = float(np.log(bias / (1 - bias)))
        estimator = self.resolved_estimator
        return {"temperature": self.temperature, "critic_bias": bias, "critic_kind": estimator and estimator.critic,
                "max_tokens_per_micro_batch": self.max_tokens_per_micro_batch, "entropy_grad": bool(self.entropy_coeff)}

    def sync_env_runner_states_each_iteration(self) -> bool:
        # Asynchronous rollouts keep the remote EnvRunners sampling between iterations; RLlib's sync of their
        # connector states after every iteration would wait for that sampling. As IMPALA does, it is off then (the
        # LLM EnvRunner, the only one async_rollouts runs with, has no connector state).
        return not self.async_rollouts

    # The learners and the module RLlib builds.

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
