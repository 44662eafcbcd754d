"""An RLlib EnvRunner for one-step LLM episodes (prompt in, whole response out, reward back).

The runner holds one bandit env (its prompts loaded and rendered once). A sampling
round poses ``num_envs_per_env_runner`` prompts that the ``EpochSampler`` picks (each
training prompt once per epoch, runners drawing disjoint shards), generates every
response in a single engine call, scores them all in one call to the env and returns
one-step ``SingleAgentEpisode``s that carry the prompt and response token ids, the
engine's per-token log-probs and the ``weights_seq_no`` of the weights that generated them.
``sample_batch`` returns a whole batch with its metrics, data position and wall-clock
window in one call (SPPO's asynchronous rollouts). With ``prompt_selection`` the prompts
come from a ``PromptPool`` instead: the driver scores its candidates with the learner's
critic before each ``sample()`` (``prompt_candidates``, ``set_prompt_scores``; see
``rllib_sppo.llm.critic``).

New policy weights reach the engine in place (no restart): through ``set_state`` (RLlib's
state, e.g. after a restore, and the local runner's sync), ``receive_weights`` (SPPO's sync of remote runners
over a collective, a bucket at a time as broadcast) or ``load_weight_chunks`` (through the object store, a chunk at
a time); the sync's seconds, bytes and GB/s
are logged. With ``engine_sleep_level`` > 0 the engine sleeps from the end of sampling
to the next weight load (the learner has the accelerator meanwhile). A remote runner starts
its engine and reward workers when it is created (its first sample is sampling, not start-up);
the local runner starts them on first use, so a driver-side runner that never samples never loads one.
"""

from __future__ import annotations

import logging
import time

import gymnasium as gym
import numpy as np
import ray
import torch

from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.env import INPUT_ENV_SPACES
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.metrics import (
    EPISODE_LEN_MEAN, EPISODE_RETURN_MEAN, NUM_ENV_STEPS_SAMPLED, NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_EPISODES, NUM_EPISODES_LIFETIME, WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

import envs  # noqa: F401  (registers ReasoningBandit-v0 in this process: a remote EnvRunner's too)
from rllib_sppo.connectors import GROUP_ID
from rllib_sppo.llm.engines import GenerationConfig, make_engine
from rllib_sppo.llm.lora import resolve_lora
from rllib_sppo.llm.models import resolve_model
from rllib_sppo.llm.sampler import EpochSampler, PromptPool
from rllib_sppo.llm.weight_group import WeightGroup
from rllib_sppo.private_api import asked_for, registered_env_creator
from rllib_sppo.watchdog import deadline

logger = logging.getLogger(__name__)


def policy_weights(named):
    """The policy's (name, tensor) pairs of the module's inference-only state, named as the engine's model names them
    (without the module's ``policy.`` prefix)."""
    return ((name.removeprefix("policy."), tensor) for name, tensor in named if name.startswith("policy."))


class LLMEnvRunner(EnvRunner, Checkpointable):
    weight_group = None  # this runner's membership of the weight-sync group, once it joined one

    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        self.worker_index = kwargs.get("worker_index", 0)
        self.metrics = MetricsLogger()
        self.env = self._make_env()
        # Remote runners are workers 1..N; with none, the local runner (worker 0) samples.
        self.sampler = EpochSampler(len(self.env.splits["train"].records), seed=config.seed or 0,
                                    shard=max(self.worker_index - 1, 0), num_shards=max(config.num_env_runners, 1))
        selection = config.resolved_prompt_selection
        self.prompt_pool = selection and PromptPool(self.sampler, selection["pool"], selection["floor"],
                                                    seed=[config.seed or 0, self.worker_index])
        spec = config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True)
        self.model_dir = resolve_model(spec.model_config["policy"])
        self.lora = resolve_lora(spec.model_config.get("lora"))  # the engine then takes the policy's adapters alone
        self._engine = None
        self._pending_weights = None  # a callable giving the (name, tensor) pairs, for when the engine starts
        self._weights_seq_no = 0
        shares_learner_gpu = config.num_env_runners == 0 and torch.cuda.is_available()
        self.sleep_level = (config.engine_sleep_level if config.engine_sleep_level is not None
                            else (1 if self.lora else 2) if shares_learner_gpu else 0)  # (a LoRA base is not resent)
        self.gpu_memory_utilization = (config.gpu_memory_utilization if config.gpu_memory_utilization is not None
                                       else 0.4 if shares_learner_gpu else 0.9)
        self._asleep = False
        self._num_prompts = 0
        # Ray restarts a remote runner whose process died (max_restarts), and RLlib does not notice when it died
        # between two calls: it would sample from the start of its shard with the weights it started with. It refuses
        # to sample until the driver has restored it (its place in the data, the weights; Rollouts.restore).
        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        self.restarted_in_place = (self.worker_index > 0 and in_actor
                                   and ray.get_runtime_context().was_current_actor_reconstructed)
        if self.worker_index > 0:  # a remote runner samples: it starts its engine and reward workers now, so that
            self.engine  # sample_timeout_s bounds sampling, not start-up (RLlib's probe waits for the constructor)
            self.env.start_scoring()

    def _make_env(self) -> gym.Env:
        """The runner's one env (both splits, its reward workers); ``chat_template_model`` resolved to a folder."""
        from ray.rllib.env.env_context import EnvContext

        env_config = dict(self.config.env_config)
        if env_config.get("split", "train") != "train":
            raise ValueError(f"env_config split={env_config['split']!r}: LLMEnvRunner trains on the train split and "
                             f"evaluates on the heldout one; remove the key")
        if env_config.get("chat_template_model") is not None:
            env_config["chat_template_model"] = resolve_model(env_config["chat_template_model"])
        ctx = EnvContext(env_config, worker_index=self.worker_index, vector_index=0)
        creator = registered_env_creator(self.config.env)
        if creator is not None:
            return creator(ctx).unwrapped
        return gym.make(self.config.env, env_config=ctx).unwrapped

    @property
    def engine(self):
        if self._engine is None:
            kwargs = {"seed": (self.config.seed or 0) + self.worker_index, "sleep_level": self.sleep_level,
                      "gpu_memory_utilization": self.gpu_memory_utilization, "lora": self.lora,
                      "enforce_eager": self.config.enforce_eager, **self.config.engine_kwargs}
            self._engine = make_engine(self.config.rollout_engine, self.model_dir, **kwargs)
            self.tokenizer = self._engine.tokenizer
            if self._pending_weights is not None:
                self._load_weights(self._pending_weights())
                self._pending_weights = None
        if self._asleep:  # woken without new weights: only a level-1 sleep kept them
            if self.sleep_level >= 2:
                raise RuntimeError("the engine slept at level 2 (its weights freed) and got no weights since; sync the "
                                   "policy's weights before sampling, or use engine_sleep_level 1.")
            self._wake_engine()
        return self._engine

    def sample(self, *, num_timesteps=None, num_episodes=None, explore=True, random_actions=False,
               force_reset=False, **kwargs) -> list[SingleAgentEpisode]:
        """``n`` one-step episodes; responses are always sampled at the training temperature."""
        self._check_weights()
        n = num_episodes or num_timesteps or self._episodes_per_sample()
        episodes, per_prompt = [], self.config.samples_per_prompt
        per_round = max(1, self.config.num_envs_per_env_runner)
        while len(episodes) < n:
            episodes += self._sample_round(min(per_round, -(-(n - len(episodes)) // per_prompt)))
        if self.prompt_pool:
            self.metrics.log_dict(self.prompt_pool.metrics(), window=1)
        if self.sleep_level:  # the learner updates next: free what the engine holds until the new weights arrive
            self._engine.sleep(self.sleep_level)
            self._asleep = True
        return episodes

    def _check_weights(self) -> None:
        if self.restarted_in_place:  # (RLlib then restarts it, and SPPO restores it: its place, then the weights)
            raise RuntimeError(f"EnvRunner {self.worker_index} was restarted after its process died and has not been "
                               f"sent the policy's weights and its place in the data yet; it samples once it has.")

    def _episodes_per_sample(self) -> int:
        """How many episodes a ``sample()`` returns when RLlib does not say: this runner's share of the batch."""
        return max(1, self.config.total_train_batch_size // max(1, self.config.num_env_runners))

    def prompt_candidates(self) -> dict:
        """Prompt selection: the pool's candidates for the next ``sample()``, to be scored by the critic:
        ``{"worker": this runner's index, "indices": [...], "texts": [...]}``."""
        n = -(-self._episodes_per_sample() // self.config.samples_per_prompt)
        indices = self.prompt_pool.candidates(n)
        texts = self.env.splits["train"].texts
        return {"worker": self.worker_index, "indices": indices, "texts": [texts[i] for i in indices]}

    def set_prompt_scores(self, indices: list[int], logits) -> None:
        """Prompt selection: the critic's logits of ``prompt_candidates``' prompts."""
        self.prompt_pool.score(indices, logits)

    def sample_batch(self) -> dict:
        """One training batch in one call, for SPPO's asynchronous rollouts: the ``episodes``, this runner's
        ``metrics``, its ``data`` position after drawing them (where a run resumed from a checkpoint taken while the
        next batch is sampled continues) and the wall-clock ``window`` (``time.time()``) it sampled in."""
        start = time.time()
        episodes = self.sample()
        return {"episodes": episodes, "window": (start, time.time()), "metrics": self.get_metrics(),
                "data": self.get_state(components="data")["data"]}

    def _sample_round(self, k: int) -> list[SingleAgentEpisode]:
        """k prompts from the sampler (or the prompt pool), ``samples_per_prompt`` responses each: one engine call,
        one scoring call."""
        self.engine  # started (and its tokenizer loaded) on first use
        indices = self.prompt_pool.take(k) if self.prompt_pool else self.sampler.draw(k)
        resets = [self.env.reset(options={"index": i}) for i in indices]
        prompt_ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in resets]
        gen = GenerationConfig(temperature=self.config.temperature, top_p=self.config.top_p,
                               max_tokens=self.config.max_response_tokens, n=self.config.samples_per_prompt)
        start = time.perf_counter()
        groups = self._generate(prompt_ids, gen)
        gen_s = time.perf_counter() - start
        start = time.perf_counter()
        scored = zip(*self.env.score([info0["index"] for (_, info0), group in zip(resets, groups) for _ in group],
                                     [s.text for group in groups for s in group]))
        self.metrics.log_value("timing_s/score", time.perf_counter() - start, window=1)
        episodes, tokens = [], 0
        for (text, info0), group in zip(resets, groups):
            self._num_prompts += 1
            group_id = self.worker_index * 10**12 + self._num_prompts
            for s, (reward, info) in zip(group, scored):
                tokens += len(s.response_ids)
                episodes.append(SingleAgentEpisode(
                    observations=[text, text], infos=[info0, info], actions=[s.text], rewards=[float(reward)],
                    terminated=True, truncated=False, len_lookback_buffer=0,
                    extra_model_outputs={"prompt_ids": [np.asarray(s.prompt_ids, np.int64)],
                                         "response_ids": [np.asarray(s.response_ids, np.int64)],
                                         "engine_logp": [np.asarray(s.logp, np.float32)],
                                         GROUP_ID: [group_id], WEIGHTS_SEQ_NO: [self._weights_seq_no]}))
        self._log_round(episodes, tokens, gen_s)
        return episodes

    def heldout_samples(self, k: int) -> dict:
        """Every held-out problem, ``k`` samples each at the training temperature: ``{"texts": [P], "completions":
        [P][k], "rewards": [P, k], "parsed": [P * k]}`` (``rllib_sppo.llm.evaluation.heldout_report`` turns them into
        metrics; the completions are what the policy wrote, to be read)."""
        self._check_weights()
        texts = self.env.splits["heldout"].texts
        if not texts:
            raise ValueError("held-out evaluation needs held-out problems: set env_config heldout_size > 0")
        self.engine  # started (and its tokenizer loaded) on first use
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        groups = self._generate(prompt_ids, GenerationConfig(
            temperature=self.config.temperature, top_p=self.config.top_p,
            max_tokens=self.config.max_response_tokens, n=k))
        completions = [[s.text for s in group] for group in groups]
        rewards, infos = self.env.score([i for i, group in enumerate(completions) for _ in group],
                                        [text for group in completions for text in group], split="heldout")
        return {"texts": list(texts), "completions": completions,
                "rewards": np.reshape(np.asarray(rewards, np.float64), (len(texts), k)),
                "parsed": [bool(info["parsed"]) for info in infos]}

    def _generate(self, prompt_ids: list, gen: GenerationConfig) -> list:
        """One engine call, bounded by ``generation_timeout_s``: past it this process ends with an error naming the
        engine and this runner (``rllib_sppo.watchdog``), and is restarted."""
        part = (f"EnvRunner {self.worker_index}: the {self.config.rollout_engine} engine generating {len(prompt_ids)} "
                f"prompt(s) x {gen.n} response(s) of up to {gen.max_tokens} tokens")
        with deadline(part, self.config.generation_timeout_s, "generation_timeout_s"):
            return self.engine.generate(prompt_ids, gen)

    def _log_round(self, episodes, tokens: int, gen_s: float) -> None:
        m, n = self.metrics, len(episodes)
        for e in episodes:
            info = e.get_infos(-1)
            m.log_value(EPISODE_RETURN_MEAN, e.get_return(), window=self.config.metrics_num_episodes_for_smoothing)
            m.log_value(EPISODE_LEN_MEAN, 1, window=self.config.metrics_num_episodes_for_smoothing)
            m.log_value("rollout/parse_failure_rate", float(not info.get("parsed", True)), window=n)
            m.log_value("rollout/reward_error_rate", float(bool(info.get("reward_error"))), window=n)
        m.log_value("rollout/tokens_per_s", tokens / max(gen_s, 1e-9), window=1)
        m.log_value("rollout/response_tokens_lifetime", tokens, reduce="lifetime_sum")
        m.log_value("timing_s/generate", gen_s, window=1)
        m.log_value("rollout/epoch", self.sampler.progress, window=1)
        m.log_value(WEIGHTS_SEQ_NO, self._weights_seq_no, window=1)
        m.log_value(NUM_ENV_STEPS_SAMPLED, n, reduce="sum")
        m.log_value(NUM_EPISODES, n, reduce="sum")
        m.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, n, reduce="lifetime_sum")
        m.log_value(NUM_EPISODES_LIFETIME, n, reduce="lifetime_sum")
        self.num_env_steps_sampled_lifetime += n

    def get_metrics(self):
        return self.metrics.reduce()

    def get_spaces(self):
        spaces = (self.env.observation_space, self.env.action_space)
        return {INPUT_ENV_SPACES: spaces, DEFAULT_MODULE_ID: spaces}

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime}
        if asked_for(self, "data", components, not_components):  # the place in the epochs of prompts
            state["data"] = {"runner": self.worker_index, "sampler": self.sampler.get_state(),
                             "num_prompts": self._num_prompts,
                             **({"prompt_pool": self.prompt_pool.get_state()} if self.prompt_pool else {})}
        return state

    def set_state(self, state) -> None:
        if COMPONENT_RL_MODULE in state:
            weights = state[COMPONENT_RL_MODULE]
            self._receive(lambda: (
                (k.removeprefix("policy."), torch.as_tensor(v))
                for k, v in (ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights).get(
                    DEFAULT_MODULE_ID, weights).items() if k.startswith("policy.")), state.get(WEIGHTS_SEQ_NO, 0))
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state:
            self.num_env_steps_sampled_lifetime = state[NUM_ENV_STEPS_SAMPLED_LIFETIME]
        # A resumed run draws the prompts the uninterrupted one would have. A place is this runner's own: RLlib hands
        # a restarted remote runner the local runner's state, whose place (shard) is not its.
        if state.get("data", {}).get("runner") == self.worker_index:
            self.sampler.set_state(state["data"]["sampler"])
            self._num_prompts = state["data"]["num_prompts"]
            if self.prompt_pool and "prompt_pool" in state["data"]:
                self.prompt_pool.set_state(state["data"]["prompt_pool"])

    def load_weight_chunks(self, chunks: list, seq_no: int) -> int:
        """SPPO's weight sync: the policy's weights as object-store chunks ({name: tensor}), fetched and loaded one
        at a time. Returns this runner's index (the driver checks who answered in time)."""
        self._receive(lambda: policy_weights(pair for ref in chunks for pair in ray.get(ref).items()), seq_no)
        return self.worker_index

    def join_weight_group(self, host: str, port: int, members: list[int], device: str, timeout_s: float):
        """SPPO's collective weight sync: joins the weight-sync group (``rllib_sppo.llm.weight_group``) as rank 1 + this
        runner's position in ``members`` (the learner is rank 0), leaving any group it was in. Returns this runner's
        index, or None if the group was not formed within ``timeout_s``."""
        self.weight_group = None
        try:
            self.weight_group = WeightGroup(host, port, members.index(self.worker_index) + 1, len(members) + 1,
                                            device, timeout_s)
        except RuntimeError as error:  # (torch.distributed's errors, a timeout among them)
            logger.warning("EnvRunner %d did not join the weight-sync group: %s", self.worker_index, error)
            return None
        return self.worker_index

    def receive_weights(self) -> int | None:
        """SPPO's collective weight sync: the policy broadcast by the learner, fed to the engine bucket by bucket as
        it arrives. Returns this runner's index, or None if the broadcast failed (the group is formed again)."""
        if self.weight_group is None:
            return None
        try:
            meta, pairs = self.weight_group.receive()
            try:
                self._receive(lambda: policy_weights(pairs), meta["seq_no"])
            finally:  # what the engine did not take (it had these weights, or failed): the sender sends every bucket
                for _ in pairs:
                    pass
        except RuntimeError as error:
            logger.warning("EnvRunner %d: the weight broadcast failed: %s", self.worker_index, error)
            self.weight_group = None
            return None
        return self.worker_index

    def restored(self) -> None:
        """The driver has given this runner its place in the data and the policy's weights: it samples again."""
        self.restarted_in_place = False

    def _receive(self, weights, seq_no: int) -> None:
        """Loads ``weights()`` (an iterator of (name, tensor)) if newer than what the engine has, or if the engine
        sleeps (a level-2 sleep freed its weights); kept for later if the engine has not started."""
        if seq_no == 0 or self._weights_seq_no < seq_no or self._asleep:
            if self._engine is None:
                self._pending_weights = weights
            else:
                self._load_weights(weights())
        self._weights_seq_no = max(self._weights_seq_no, seq_no)

    def _load_weights(self, named) -> None:
        start, size = time.perf_counter(), 0

        def counted():
            nonlocal size
            for name, tensor in named:
                size += tensor.numel() * tensor.element_size()
                yield name, tensor

        if self._asleep:
            self._wake_engine()
        self._engine.update_weights(counted())
        seconds = time.perf_counter() - start
        self.metrics.log_value("timing_s/weight_sync", seconds, window=1)
        self.metrics.log_value("rollout/weight_sync_bytes", size, window=1)
        self.metrics.log_value("rollout/weight_sync_gb_per_s", size / 1e9 / max(seconds, 1e-9), window=1)

    def _wake_engine(self) -> None:
        """The engine takes back what its sleep freed; first this process's cached CUDA blocks (the learner's, beside
        it) are given back to the GPU, for the engine to take."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._engine.wake_up()
        self._asleep = False

    def get_ctor_args_and_kwargs(self):
        return (), {"config": self.config}

    def assert_healthy(self):
        assert self.env is not None, "LLMEnvRunner has no env"

    def stop(self):
        self._engine = None
        self.env.close()  # its reward workers
