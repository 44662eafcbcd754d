"""Weight sync on CPU, the same bytes three ways: the collective (gloo broadcast) against the object store against a
memcpy of the bytes, with 1 and 2 remote LLM EnvRunners (the transformers engine, so that loading is a copy too).

    python benchmarks/weight_sync.py [--policy builtin:smollm2-135m-instruct] [--runners 1 2] [--repeats 5]

Prints, per path and runner count, the median seconds of ``Rollouts.sync_weights`` (fetch or broadcast and load,
every runner) and its ratio to a memcpy of the policy's bytes (the issue's goal: the collective <= 1.5x).
"""

import argparse
import statistics
import time

import torch


def median_sync_s(policy: str, how: str, runners: int, repeats: int) -> tuple[float, int]:
    import envs  # noqa: F401
    from rllib_sppo import SPPOConfig

    algo = (SPPOConfig().llm(policy=policy, engine="transformers")
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 64,
                                                           "chat_template_model": policy})
            .env_runners(num_env_runners=runners, num_cpus_per_env_runner=0.5)
            .training(weight_sync=how, train_batch_size_per_learner=8, minibatch_size=8, max_response_tokens=8)
            .debugging(seed=0).build_algo())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        algo.rollouts.sync_weights()
        seconds.append(time.perf_counter() - start)
    [nbytes] = [r.get() for r in algo.learner_group.foreach_learner(
        lambda learner: sum(t.numel() * t.element_size() for _, t in learner.policy_tensors()))]
    algo.stop()
    return statistics.median(seconds), nbytes


def memcpy_s(nbytes: int, repeats: int) -> float:
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="builtin:smollm2-135m-instruct")
    p.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print("| runners | path | sync s (median) | MB | x memcpy |\n|---|---|---|---|---|")
    for runners in args.runners:
        for how in ("collective", "object_store"):
            seconds, nbytes = median_sync_s(args.policy, how, runners, args.repeats)
            copy = memcpy_s(nbytes, args.repeats)
            print(f"| {runners} | {how} | {seconds:.3f} | {nbytes / 1e6:.1f} | {seconds / copy:.0f} |", flush=True)


if __name__ == "__main__":
    main()
