"""A trial's resource request against the Ray cluster, before Tune starts it.

Tune waits for a trial the cluster can never hold, printing an "insufficient resources" warning once a minute (RLlib
PPO's defaults ask for 3 CPUs: on a 2-core machine it never starts). ``check_resources`` refuses such a trial with one
line: what it asks, what the cluster has, the config keys that set it. On an autoscaling cluster, where more nodes may
come (Tune's own test), it says so and the trial waits.
"""

from __future__ import annotations

import logging

from rllib_sppo.experiments import UsageError

logger = logging.getLogger(__name__)

#: The parts of a trial's request, in the order of RLlib's bundles: the key that counts them, and the keys that set
#: one's CPUs, GPUs and other resources.
PARTS = {
    "the main process": (None, {"CPU": "num_cpus_for_main_process", "GPU": "num_gpus_per_learner",
                                None: "custom_resources_for_main_process"}),
    "EnvRunner": ("num_env_runners", {"CPU": "num_cpus_per_env_runner", "GPU": "num_gpus_per_env_runner",
                                      None: "custom_resources_per_env_runner"}),
    "evaluation EnvRunner": ("evaluation_num_env_runners", {"CPU": "num_cpus_per_env_runner",
                                                            "GPU": "num_gpus_per_env_runner",
                                                            None: "custom_resources_per_env_runner"}),
    "learner": ("num_learners", {"CPU": "num_cpus_per_learner", "GPU": "num_gpus_per_learner", None: "num_learners"}),
}


def _parts(config: dict, bundles: list) -> dict:
    """{part: its bundles}: the main process, the EnvRunners, the evaluation EnvRunners, the learners."""
    runners, learners = config["num_env_runners"], config["num_learners"]
    return {"the main process": bundles[:1], "EnvRunner": bundles[1:1 + runners],
            "evaluation EnvRunner": bundles[1 + runners:len(bundles) - learners],
            "learner": bundles[len(bundles) - learners:] if learners else []}


def _key(part: str, resource: str, count: bool) -> str:
    """The key that sets ``resource`` for one ``part`` (with ``count``: or the key that counts them)."""
    counted, keys = PARTS[part]
    key = keys.get(resource, keys[None])
    return f"{counted} or {key}" if count and counted and counted != key else key


def _amount(value: float) -> str:
    return f"{value:g}"


def _shortfall(config: dict, bundles: list, total: dict, nodes: list) -> str | None:
    """What a request lacks on this cluster, as the middle of the error line; None if it fits."""
    parts = _parts(config, bundles)
    asked = {}
    for bundle in bundles:
        for resource, value in bundle.items():
            asked[resource] = asked.get(resource, 0.0) + value
    for resource, value in asked.items():  # the cluster as a whole
        if value <= total.get(resource, 0.0) + 1e-9:
            continue
        using = {name: [b[resource] for b in group if b.get(resource)] for name, group in parts.items()}
        using = {name: amounts for name, amounts in using.items() if amounts}
        detail = ", ".join(f"{name} {_amount(amounts[0])}" if name == "the main process" else
                           f"{len(amounts)} {name}{'s' * (len(amounts) > 1)} {_amount(amounts[0])} each"
                           for name, amounts in using.items())
        keys = [_key(name, resource, count=True) for name in using]
        return (f"asks for {_amount(value)} {resource} ({detail}) but the cluster has {_amount(total.get(resource, 0))} "
                f"{resource}; lower {', '.join(keys)}")
    for name, group in parts.items():  # each part on one node
        for bundle in group:
            if any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes):
                continue
            for resource, value in bundle.items():  # the resource short on every node that has the rest
                rest = [node for node in nodes if all(node.get(k, 0.0) >= v for k, v in bundle.items() if k != resource)]
                most = max((node.get(resource, 0.0) for node in rest), default=0.0)
                if most < value:
                    break
            asked_for = ", ".join(f"{k}: {_amount(v)}" for k, v in bundle.items())
            return (f"asks for {{{asked_for}}} for one {name.removeprefix('the ')} and no node has that much (at most "
                    f"{_amount(most)} {resource} on a node with the rest); lower {_key(name, resource, count=False)}")
    return None


def check_resources(algo_cls, config, swept: bool, where: str) -> None:
    """Raises a ``UsageError`` if a trial of ``config`` (each variant of a sweep) asks for more than the cluster has,
    naming what it asks, what the cluster has and the keys to change; on an autoscaling cluster logs a warning
    instead (the autoscaler may add the nodes)."""
    import ray
    from ray.tune.search.variant_generator import generate_variants

    from rllib_sppo.private_api import autoscaling_cluster

    total = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    variants = [v for _, v in generate_variants(config.to_dict())] if swept else [config.to_dict()]
    for variant in variants:
        request = algo_cls.default_resource_request(variant)
        problem = _shortfall(variant, request.bundles, total, nodes)
        if problem is None:
            continue
        if autoscaling_cluster():
            logger.warning("a trial %s for now; it waits for the autoscaler to add nodes", problem.split("; lower")[0])
            return
        raise UsageError(f"{where}: a trial {problem}")
