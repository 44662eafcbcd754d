"""SPPO's rollout side: sampling (synchronous, or one step off policy), the policy's weights to the EnvRunners, and
remote EnvRunners that stall or restart (named, restarted, given back their places in the data and the weights).

Asynchronous rollouts (one step off policy): each remote EnvRunner has at most one batch in flight, and Ray runs an
actor's calls in the order they were made. A runner samples batch t+1 (started as soon as batch t was fetched) while
the learner updates on batch t, then loads the weights of update t (sent after it, acknowledged in the next sync),
then samples batch t+2 with them. Batch t+1 is thus sampled with the weights of update t-1.
"""

import logging
import os

import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from rllib_sppo.llm.weight_group import open_store
from rllib_sppo.private_api import count_env_runner_restarts, remote_env_runner_actor, sample_episodes
from rllib_sppo.watchdog import deadline

logger = logging.getLogger(__name__)


def process_identity() -> tuple:
    """This process, as another can find it: (its Ray node, its pid, its start time)."""
    return ray.get_runtime_context().get_node_id(), os.getpid(), psutil.Process().create_time()


@ray.remote(num_cpus=0, max_retries=0)
def _sigkill(pid: int, create_time: float) -> bool:
    """SIGKILLs process ``pid`` on this node if it is still the one started at ``create_time``; whether it did."""
    try:
        process = psutil.Process(pid)
        if process.create_time() != create_time:
            return False
        process.kill()  # (SIGKILL ends a stopped process too)
        return True
    except psutil.NoSuchProcess:
        return False


def kill_process(identity: tuple, timeout_s: float) -> bool:
    """Ends the process ``identity`` (``process_identity()``) on its node, within ``timeout_s``; whether it did."""
    node_id, pid, create_time = identity
    try:
        return ray.get(_sigkill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                       .remote(pid, create_time), timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        return False


def learner_deadline(config, part: str, key: str, factor: float = 1):
    """Bounds a call into the learners by the config's ``key`` (times ``factor``; ``rllib_sppo.watchdog``): a stuck
    learner ends this process naming ``part``, and Tune restarts the trial from its last checkpoint
    (``max_failures``)."""
    return deadline(part, factor * getattr(config, key), key)


class ObjectStoreWeights:
    """How the policy's weights reach remote LLM EnvRunners: the learners put them into Ray's object store in chunks
    of at most ``weight_sync_chunk_mb``, in the module's compute dtype (``SPPOTorchLearner.weight_chunks``); each
    runner fetches and loads them one chunk at a time (``LLMEnvRunner.load_weight_chunks``). With
    ``weight_sync="object_store"``, and for runners the collective did not reach (``CollectiveWeights``)."""

    #: The runner method that loads what ``publish`` returns (as keyword arguments); it returns the runner's index.
    runner_method = "load_weight_chunks"

    def __init__(self, config):
        self.max_bytes = int(config.weight_sync_chunk_mb * 2**20)

    def publish(self, learner_group) -> dict:
        """The weights, sent by the learners: ``{"chunks": [ObjectRef], "seq_no": int}``."""
        max_bytes = self.max_bytes
        results = list(learner_group.foreach_learner(lambda learner: learner.weight_chunks(max_bytes)))
        for result in results:
            if not result.ok:
                raise result.get()
        chunks, seq_no = next((r.get() for r in results if r.get()[0]), ([], 0))
        return {"chunks": chunks, "seq_no": seq_no}


class CollectiveWeights:
    """How the policy's weights reach remote LLM EnvRunners with ``weight_sync="collective"``: a torch.distributed
    group of their own (``rllib_sppo.llm.weight_group``: NCCL where the learner and each runner have a whole GPU,
    else gloo), served from this process, the first learner its rank 0 and the healthy remote runners ranks 1..N.
    The learner broadcasts the policy in buckets of at most ``weight_sync_chunk_mb`` while each runner feeds them to
    its engine.

    The group is formed again whenever its members change: a runner restarted, stuck, or gone (``forget``), or a
    broadcast that failed. Every collective is bounded by ``weight_sync_timeout_s``."""

    def __init__(self, config, env_runner_group, learner_group):
        self.config, self.group, self.learner_group = config, env_runner_group, learner_group
        # NCCL needs a GPU of its own per member: with shares of one (or none), gloo through host memory.
        self.device = "cuda" if config.num_gpus_per_learner >= 1 and config.num_gpus_per_env_runner >= 1 else "cpu"
        self.members = ()  # the remote runners in the group formed last, in rank order (none: to be formed)
        self.store = None

    def forget(self, runners) -> None:
        """Runners whose process changed (restarted) or that are gone: the group is formed again at the next sync."""
        if set(runners) & set(self.members):
            self.members = ()

    def sync(self) -> tuple[set, set]:
        """The policy to every healthy remote EnvRunner, forming the group first if needed. Returns the runners that
        loaded it and those that answered (the others did not, within the timeout)."""
        runners = tuple(sorted(self.group.healthy_worker_ids()))
        if not runners:
            return set(), set()
        if runners != self.members:
            answered = self._form(runners)
            if not self.members:
                return set(), answered
        max_bytes = int(self.config.weight_sync_chunk_mb * 2**20)
        loaded, answered, sent = self._run("receive_weights", {},
                                           lambda learner: learner.broadcast_weights(max_bytes))
        if not sent or loaded != set(self.members):
            self.members = ()
        return loaded, answered

    def _form(self, runners: tuple) -> set:
        """A new group of the learner and ``runners`` (``members`` once all joined); returns the runners that
        answered."""
        timeout, host = self.config.weight_sync_timeout_s, ray.util.get_node_ip_address()
        self.store = open_store(host, timeout)  # (the last group's store is let go)
        port, size, device = self.store.port, len(runners) + 1, self.device
        self.members = runners
        joined, answered, formed = self._run(
            "join_weight_group", {"host": host, "port": port, "members": list(runners), "device": device,
                                  "timeout_s": timeout},
            lambda learner: learner.join_weight_group(host, port, size, device, timeout))
        if not formed or joined != set(runners):
            self.members = ()
        return answered

    def _run(self, method: str, kwargs: dict, learner_call) -> tuple[set, set, bool]:
        """``method`` on every member runner while the learners run ``learner_call`` (the two sides of one
        collective): the runners that returned their index, those that answered, and whether every learner did."""
        group, timeout = self.group, self.config.weight_sync_timeout_s
        group.foreach_env_runner_async(method, tag="weight_group", kwargs=kwargs, remote_worker_ids=list(self.members))
        with learner_deadline(self.config, f"the weight sync's {method} on the learners (bounded by the collective's "
                              f"own timeout, weight_sync_timeout_s; this is a backstop at twice it)",
                              "weight_sync_timeout_s", factor=2):
            results = list(self.learner_group.foreach_learner(learner_call))
        ok = all(result.ok and result.get() for result in results)
        answers = group.fetch_ready_async_reqs(tags="weight_group", timeout_seconds=timeout)
        return {i for i, index in answers if index == i}, {i for i, _ in answers}, ok


class Rollouts:
    """The EnvRunner side of one SPPO algorithm: it samples, syncs the policy's weights, and keeps each remote LLM
    EnvRunner's place in the data (``places``), to give back to a runner that restarts and to checkpoint."""

    def __init__(self, config, env_runner_group, learner_group, metrics):
        self.config, self.group, self.learner_group, self.metrics = config, env_runner_group, learner_group, metrics
        self.weights = ObjectStoreWeights(config)
        self.collective = (CollectiveWeights(config, env_runner_group, learner_group)
                           if config.llm_runner and config.resolved_weight_sync == "collective" else None)
        #: Remote LLM EnvRunner index -> its place in the data (as of the last batch trained on).
        self.places = {}
        #: Remote EnvRunner index -> its process (``process_identity``), to end it if it gets stuck.
        self.processes = {}
        self._in_flight = None  # (runner indices, payload) of an asynchronous weight sync not yet acknowledged
        self.note_processes()

    # Sampling.

    def sample(self) -> tuple[list, list]:
        """One batch from the EnvRunners (RLlib's synchronous sampling), after restoring remote LLM runners that Ray
        restarted in place since the last one (their process died between two calls, which RLlib does not see); then
        each remote runner must answer (``_probe_remote_runners``)."""
        group = self.group
        if self.config.llm_runner and group.num_remote_workers():
            restarted = sorted(i for i, flag in group.foreach_env_runner(
                lambda runner: (runner.worker_index, runner.restarted_in_place), local_env_runner=False,
                timeout_seconds=self.config.env_runner_health_probe_timeout_s) if flag)
            if restarted:
                logger.warning("EnvRunner(s) %s were restarted by Ray after their process died: giving them back their "
                               "places in the data and the policy's weights.", restarted)
                count_env_runner_restarts(group, len(restarted))
                self.restore(restarted)
        episodes, runner_metrics = sample_episodes(group, max_env_steps=self.config.total_train_batch_size,
                                                   sample_timeout_s=self.config.sample_timeout_s)
        self._probe_remote_runners()
        return episodes, runner_metrics

    def sample_async(self) -> tuple[list, list, list]:
        """The batch the remote EnvRunners sampled during the last update, its runners' metrics and wall-clock
        windows; and the next batch started. A runner with no batch in flight (the first iteration, after a restore,
        a restarted runner) starts one first, and this iteration waits for it (RLlib starts no second call on a
        runner with one in flight)."""
        group = self.group
        group.foreach_env_runner_async("sample_batch", tag="sample")
        ready = group.fetch_ready_async_reqs(tags="sample", timeout_seconds=self.config.sample_timeout_s)
        group.foreach_env_runner_async("sample_batch", tag="sample")
        self._restart_stuck_runners(
            set(group.healthy_worker_ids()) - {index for index, _ in ready}, "sampling: EnvRunner(s) {} returned no "
            f"batch within sample_timeout_s={self.config.sample_timeout_s:g} s", "sample_timeout_s")
        if not ready:
            return [], [], []
        self.places.update({index: batch["data"] for index, batch in ready})  # as of the batch trained on
        return ([e for _, batch in ready for e in batch["episodes"]], [batch["metrics"] for _, batch in ready],
                [batch["window"] for _, batch in ready])

    def drop_in_flight(self) -> None:
        """Waits for and discards what the asynchronous rollouts have in flight (before a restore)."""
        if self.config.async_rollouts:
            self.group.fetch_ready_async_reqs(tags=["sample", "weights"], timeout_seconds=(
                self.config.sample_timeout_s + self.config.weight_sync_timeout_s))
            self._in_flight = None

    # Weight sync.

    def sync_weights(self, runners: list[int] | None = None) -> None:
        """The policy's weights to the EnvRunners (the critic stays on the learners).

        A local EnvRunner (num_env_runners=0) receives the learner's state as it is: beside a local learner, the
        learner's tensors themselves (no copy, no numpy, no dtype change). Remote LLM EnvRunners receive them through
        ``self.collective`` (``CollectiveWeights``: all healthy runners at once, ``runners`` or not) or
        ``self.weights`` (``ObjectStoreWeights``); other remote EnvRunners (classic control) through RLlib's
        ``sync_weights``. Bounded by ``weight_sync_timeout_s``: an in-process engine past it ends this process
        (``rllib_sppo.watchdog``), a remote runner past it is named and restarted. With ``async_rollouts`` the load
        is queued behind each runner's sampling and the next sync checks that it happened. ``runners``: only these
        remote runners (restarted ones, loaded at once).
        """
        group = self.group
        if not group.num_remote_workers():
            if group.local_env_runner is not None:
                with learner_deadline(self.config, "the weight sync (the policy's weights from the learner(s) into "
                                      "the local EnvRunner's engine)", "weight_sync_timeout_s"):
                    state = self.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}",
                                                         inference_only=True)[COMPONENT_LEARNER]
                    group.local_env_runner.set_state({COMPONENT_RL_MODULE: state[COMPONENT_RL_MODULE],
                                                      WEIGHTS_SEQ_NO: state[WEIGHTS_SEQ_NO]})
            return
        if not self.config.llm_runner:
            with learner_deadline(self.config, "the weight sync (the policy's weights from the learner(s))",
                                  "weight_sync_timeout_s"):
                group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
            return
        if self.collective is not None:
            loaded, answered = self.collective.sync()  # (every healthy runner: a restarted one joins the group)
            healthy = set(group.healthy_worker_ids())
            self._weights_not_loaded(healthy - answered)
            runners = sorted(healthy & answered - loaded)  # answered without loading: the object store, now
            if not runners:
                return
            logger.warning("weight sync: the collective did not reach EnvRunner(s) %s; sending them the weights "
                           "through the object store, and forming the group again at the next sync.", runners)
        with learner_deadline(self.config, "the weight sync (the policy's weights from the learner(s))",
                              "weight_sync_timeout_s"):
            payload = self.weights.publish(self.learner_group)
        method = self.weights.runner_method
        if self.config.async_rollouts and runners is None:  # queued behind sampling; acknowledged at the next sync
            self._await_weight_loads()
            group.foreach_env_runner_async(method, tag="weights", kwargs=payload)
            self._in_flight = (set(group.healthy_worker_ids()), payload)
            return
        loaded = group.foreach_env_runner(lambda runner: getattr(runner, method)(**payload), local_env_runner=False,
                                          remote_worker_ids=runners, timeout_seconds=self.config.weight_sync_timeout_s)
        healthy = set(group.healthy_worker_ids())  # (runners that died are restarted by RLlib)
        self._weights_not_loaded((set(runners or healthy) & healthy) - set(loaded))

    def _await_weight_loads(self) -> None:
        """The EnvRunners' acknowledgements of the last asynchronous weight sync, each within weight_sync_timeout_s."""
        if self._in_flight is None:
            return
        sent, _ = self._in_flight  # (the payload is kept alive until loaded)
        acks = self.group.fetch_ready_async_reqs(tags="weights", timeout_seconds=self.config.weight_sync_timeout_s)
        self._in_flight = None
        self._weights_not_loaded(sent & set(self.group.healthy_worker_ids()) - {i for _, i in acks})

    def _weights_not_loaded(self, stuck: set) -> None:
        self._restart_stuck_runners(stuck, "weight sync: EnvRunner(s) {} did not load the new policy weights within "
                                    f"weight_sync_timeout_s={self.config.weight_sync_timeout_s:g} s",
                                    "weight_sync_timeout_s")

    # Stuck and restarted runners, and their places in the data.

    def _probe_remote_runners(self) -> None:
        """After sampling, each healthy remote EnvRunner answers within ``env_runner_health_probe_timeout_s``. One
        still busy has not returned its sample within ``sample_timeout_s`` (RLlib drops such a sample and asks again:
        a stuck runner would stall the run silently), so it is named and restarted. LLM runners answer with their
        place in the data, kept to give back to a runner that restarts."""
        if not self.group.num_remote_workers():
            return
        places = self.read_places()
        self.places.update({i: place for i, place in places.items() if place is not None})
        self._restart_stuck_runners(
            set(self.group.healthy_worker_ids()) - set(places), "sampling: EnvRunner(s) {} returned no sample within "
            f"sample_timeout_s={self.config.sample_timeout_s:g} s and did not answer for "
            f"env_runner_health_probe_timeout_s={self.config.env_runner_health_probe_timeout_s:g} s more",
            "sample_timeout_s")

    def read_places(self) -> dict:
        """{index: place in the data (None where the runner has none)} of the remote EnvRunners that answer in time."""
        return dict(self.group.foreach_env_runner(
            lambda runner: (runner.worker_index, runner.get_state(components="data").get("data")),
            local_env_runner=False, timeout_seconds=self.config.env_runner_health_probe_timeout_s))

    def _restart_stuck_runners(self, stuck: set, message: str, key: str) -> None:
        """Remote EnvRunners that did not answer in time (``message`` names them at ``{}``) are logged as an error and
        killed, and RLlib restarts them (``fault_tolerance/num_remote_worker_restarts`` counts it; the restarted
        runner gets the current weights and its place in the data, see ``SPPO.restore_env_runners``). Without
        RLlib's restarts (``restart_failed_env_runners=False``), a TimeoutError."""
        if not stuck:
            return
        message = (f"{message.format(sorted(stuck))} (an engine or env stuck, or the runner's process stopped); see "
                   f"the runner's log, or raise {key} if it is only slow")
        if not self.config.restart_failed_env_runners:
            raise TimeoutError(f"{message}. Set restart_failed_env_runners=True to restart such a runner instead.")
        logger.error("%s. Restarting it.", message)
        if self.collective is not None:
            self.collective.forget(stuck)
        for index in stuck:
            actor, manager = remote_env_runner_actor(self.group, index)
            # Its process is SIGKILLed on its node, and Ray starts the actor again (RLlib's max_restarts). (Ray's own
            # ray.kill asks a frozen process to exit and can leave it frozen: only where that process is unknown.)
            identity = self.processes.pop(index, None)
            if identity is None or not kill_process(identity, self.config.sample_timeout_s):
                ray.kill(actor, no_restart=False)
            manager.set_actor_state(index, healthy=False)  # RLlib's probe brings it back into service
        self._forget_in_flight(stuck)

    def note_processes(self, runners: list[int] | None = None) -> None:
        """Records the processes of the remote EnvRunners (``runners``: only these) that answer in time."""
        if self.group.num_remote_workers():
            self.processes.update(self.group.foreach_env_runner(
                lambda runner: (runner.worker_index, process_identity()), local_env_runner=False,
                remote_worker_ids=runners, timeout_seconds=self.config.env_runner_health_probe_timeout_s))

    def restore(self, runners: list[int]) -> None:
        """Restarted remote EnvRunners: their new processes; LLM runners then get their places in the data and the
        current weights, and sample again."""
        self.note_processes(runners)
        if not self.config.llm_runner:
            return
        self._forget_in_flight(runners)
        if self.collective is not None:
            self.collective.forget(runners)
        self.give_back_places(runners)
        self.sync_weights(runners)
        self.group.foreach_env_runner(lambda runner: runner.restored(), local_env_runner=False,
                                      remote_worker_ids=runners,
                                      timeout_seconds=self.config.env_runner_health_probe_timeout_s)

    def _forget_in_flight(self, runners) -> None:
        """A restarted runner lost the weights queued to it (async_rollouts); it is sent the current ones at once."""
        if self._in_flight is not None:
            sent, payload = self._in_flight
            self._in_flight = (sent - set(runners), payload)

    def give_back_places(self, runners: list[int]) -> None:
        places = {i: self.places[i] for i in runners if i in self.places}
        if places:
            self.group.foreach_env_runner(
                lambda runner: runner.set_state({"data": places[runner.worker_index]}), local_env_runner=False,
                remote_worker_ids=list(places), timeout_seconds=self.config.env_runner_health_probe_timeout_s)
