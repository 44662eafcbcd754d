"""SPPO (Sequence-Level PPO, arXiv 2604.08865) as an RLlib Algorithm: setup, the training step, its state.

Not Self-Play Preference Optimization: this SPPO treats a whole episode (an LLM response) as one action of a
contextual bandit, with a scalar critic V(s_0). Its config: ``rllib_sppo.config``; the EnvRunner side (sampling,
weight sync, restarts): ``rllib_sppo.rollouts``; checkpoint integrity: ``rllib_sppo.checkpoints``.
"""

import os
import random
import time
from contextlib import contextmanager

import numpy as np
import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS, ENV_RUNNER_SAMPLING_TIMER, LEARNER_RESULTS, LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME, SYNCH_WORKER_WEIGHTS_TIMER, TIMERS, WEIGHTS_SEQ_NO,
)

from rllib_sppo.checkpoints import READING_STATE, IntactCheckpoints
from rllib_sppo.config import SPPOConfig
from rllib_sppo.connectors import GROUP_ID
from rllib_sppo.llm.critic import score_prompt_candidates
from rllib_sppo.monitoring import BEFORE_TRAINING
from rllib_sppo.private_api import asked_for, keep_trial_info
from rllib_sppo.rollouts import Rollouts, learner_deadline
from rllib_sppo.sppo_learner import NONFINITE_STREAK

#: Checkpoint state: each remote LLM EnvRunner's place in the data, by runner index.
RUNNER_PLACES = "env_runner_places"


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


class SPPO(IntactCheckpoints, Algorithm):
    @classmethod
    def get_default_config(cls) -> SPPOConfig:
        return SPPOConfig()

    def __init__(self, config=None, env=None, **kwargs):
        super().__init__(config, env, **kwargs)
        keep_trial_info(self, config)  # (a Tune trial's name: its gauges' trial label)

    def setup(self, config) -> None:
        # In a Ray actor (a Tune trial under `rllib train`), torch uses the CPUs the actor holds
        # (num_cpus_for_main_process): the local learner, the old log-probs and an in-process CPU vLLM all run here.
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            torch.set_num_threads(max(1, cpus))
        super().setup(config)
        self.metrics.log_value("torch_threads", torch.get_num_threads(), window=1)
        self.rollouts = Rollouts(self.config, self.env_runner_group, self.learner_group, self.metrics)
        self._windows = {}  # each phase's last wall-clock window (time.time()): the overlap of sampling and updates

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
            if self.config.async_rollouts:
                episodes, runner_metrics, windows = self.rollouts.sample_async()
                if windows:
                    self._log_overlap(windows)
            else:
                episodes, runner_metrics = self.rollouts.sample()
        if not episodes:
            return
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        # Learner: old log-probs and critic values -> advantages (connector), then critic and policy updates.
        with self._phase("update", LEARNER_UPDATE_TIMER), learner_deadline(self.config, "the learner update",
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
            self.rollouts.sync_weights()

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

    def restore_env_runners(self, env_runner_group) -> list[int]:
        """RLlib brings restarted EnvRunners back into service and hands them the local runner's state; their new
        processes are noted (to end them if they get stuck). Restarted LLM runners then also get the policy's current
        weights (the local runner's state holds none: they would sample with the weights they started with) and their
        own place in the data (the local runner's is another's)."""
        restored = super().restore_env_runners(env_runner_group)
        if restored and env_runner_group is self.env_runner_group:
            self.rollouts.restore(restored)
        return restored

    # State. Besides RLlib's, it holds this process's random generators, so a resumed run with num_env_runners=0 and
    # num_learners=0 (sampling and learning in this process) continues bit for bit like an uninterrupted one, and
    # each remote LLM EnvRunner's place in the data (RLlib's state holds only the local runner's), as of the last
    # batch trained on: with async_rollouts the batch in flight is dropped, and a resumed run samples it again (the
    # same prompts, with the restored weights).

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        with learner_deadline(self.config, READING_STATE, "learner_update_timeout_s"):
            state = super().get_state(components, not_components=not_components, **kwargs)
        if asked_for(self, "rng", components, not_components):
            state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state().numpy()}
        rollouts = getattr(self, "rollouts", None)
        if rollouts and rollouts.group.num_remote_workers() and asked_for(self, RUNNER_PLACES, components,
                                                                            not_components):
            if not self.config.async_rollouts:  # (async: the places of the batches trained on, kept when sampled)
                rollouts.places.update({i: p for i, p in rollouts.read_places().items() if p is not None})
            if rollouts.places:
                state[RUNNER_PLACES] = dict(rollouts.places)
        return state

    def set_state(self, state: dict) -> None:
        self.rollouts.drop_in_flight()
        super().set_state(state)
        if "rng" in state:
            random.setstate(state["rng"]["python"])
            np.random.set_state(state["rng"]["numpy"])
            torch.set_rng_state(torch.from_numpy(state["rng"]["torch"]))
        # The learning rates are this config's, not the checkpoint's optimizers' (Tune's PBT restores a better trial's
        # checkpoint into a trial with a mutated lr; RLlib itself would set them only after the next update).
        steps = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        self.learner_group.foreach_learner(lambda learner: learner.after_gradient_based_update(
            timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: steps}))
        if RUNNER_PLACES in state:
            places, group = state[RUNNER_PLACES], self.env_runner_group
            if not set(places) <= set(range(1, group.num_remote_workers() + 1)):
                raise ValueError(f"the checkpoint holds the data places of EnvRunners {sorted(places)}, this run has "
                                 f"{group.num_remote_workers()}: resume with the num_env_runners it was saved with.")
            self.rollouts.places = dict(places)
            self.rollouts.give_back_places(group.healthy_worker_ids())
