"""GPU check of the reference-scale path: on one GPU in at most 8 minutes, each number measured and checked.

    python benchmarks/gpu_check.py [--policy builtin:smollm2-135m-instruct] [--out benchmarks/results/gpu_check]

SmolLM2-135M as policy and critic, bf16 compute over fp32 master weights (the torch learner), vLLM on the same GPU.
It measures, and asserts:

1. colocated (``num_env_runners: 0``, the engine asleep at level 2 during the update): the engine/learner log-prob
   gap after a sync (< 0.05, bf16 rounding); what the engine's sleep frees (>= half of what it holds awake);
   the learner's peak memory against the rule of thumb (``rllib_sppo.llm.memory``, within 1.5x); the learner
   update's tokens/s against a bare transformers forward+backward of the same policy on the same shape (>= 0.3x:
   the learner also runs the critic and the old log-probs);
2. a remote EnvRunner on the same GPU (a share of it: the collective runs over gloo, NCCL needs a GPU per member),
   ``weight_sync`` collective and object_store: the sync's seconds and GB/s, the same bytes, both gaps < 0.05;
3. 5 SPPO iterations of ``tuned_examples/smollm2_rg_sppo.yaml`` on the GPU through ``rllib train`` (exit 0).

Writes ``<out>.json`` (every number, each check passed or not) and ``<out>.md``, then exits 1 if a check failed.
Needs ``pip install -e ".[llm,vllm]"`` on a CUDA machine and the model (no hub access: ``--policy`` takes a folder).
Not yet run: no GPU was lent while it was written (2026-12-05).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import provenance

BATCH, RESPONSE = 16, 1024  # prompts per iteration, longest response (long answers: the prompts ask for essays)


def config(policy: str, **overrides):
    from rllib_sppo import SPPOConfig

    env_config = {"source": "reasoning_gym", "task": "basic_arithmetic", "size": 512, "heldout_size": 0,
                  "chat_template_model": policy}
    return (SPPOConfig().environment("ReasoningBandit-v0", env_config=env_config)
            .llm(policy=policy, engine="vllm", dtype="bfloat16", gradient_checkpointing=True)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=BATCH)
            .learners(num_gpus_per_learner=1)
            .training(lr=1e-6, critic_lr=5e-6, train_batch_size_per_learner=BATCH, minibatch_size=BATCH // 2,
                      max_response_tokens=RESPONSE, max_tokens_per_micro_batch=16384, temperature=1.0,
                      engine_kwargs={"max_model_len": 2048, "dtype": "bfloat16"}, **overrides)
            .debugging(seed=0))


def device_used_gb() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 1e9


def colocated(policy: str, checks: dict) -> dict:
    """Gap, sleep, peak memory against the rule of thumb, learner tokens/s against a bare forward+backward."""
    import torch
    from transformers import AutoConfig

    from rllib_sppo.llm.memory import rule_of_thumb
    from rllib_sppo.llm.models import resolve_model

    algo = config(policy).build_algo()
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats()
        result = algo.train()
    learner, runner = result["learners"]["default_policy"], algo.env_runner
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    tokens = learner["rollout/response_len_mean"] * BATCH
    update_tokens_per_s = tokens / result["timing_s"]["update"]
    algo.rollouts.sync_weights()  # awake, with the new weights
    awake_gb = device_used_gb()
    runner.sample()  # then asleep (level 2: weights and KV cache freed) until the next sync
    asleep_gb = device_used_gb()
    shape = AutoConfig.from_pretrained(resolve_model(policy))
    thumb = rule_of_thumb(shape, shape, tokens=int(max(tokens, 1)))
    bare = bare_tokens_per_s(policy, int(learner["rollout/response_len_mean"]) + 64, BATCH)
    numbers = {"gap": learner["rollout/engine_logp_gap"], "awake_gb": awake_gb, "asleep_gb": asleep_gb,
               "freed_gb": awake_gb - asleep_gb, "engine_share": runner.gpu_memory_utilization,
               "learner_peak_gb": peak_gb, "rule_of_thumb_gb": thumb["update_bytes"] / 1e9,
               "update_tokens_per_s": update_tokens_per_s, "bare_forward_backward_tokens_per_s": bare}
    algo.stop()
    total_gb = torch.cuda.mem_get_info()[1] / 1e9
    checks["colocated gap < 0.05"] = numbers["gap"] < 0.05
    checks["sleep frees >= half the engine's share"] = numbers["freed_gb"] >= 0.5 * numbers["engine_share"] * total_gb
    checks["learner peak <= 1.5 x rule of thumb"] = peak_gb <= 1.5 * numbers["rule_of_thumb_gb"]
    checks["learner tokens/s >= 0.3 x bare forward+backward"] = update_tokens_per_s >= 0.3 * bare
    return numbers


def bare_tokens_per_s(policy: str, length: int, rows: int) -> float:
    """transformers forward+backward of the policy in bf16 autocast over fp32 weights, ``rows`` x ``length`` tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from rllib_sppo.llm.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(policy), dtype=torch.float32).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, model.config.vocab_size, (rows, length), device="cuda")
    seconds = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    del model
    torch.cuda.empty_cache()
    return rows * length / min(seconds[1:])


def weight_sync(policy: str, how: str, checks: dict) -> dict:
    """A remote EnvRunner on a share of the GPU; the learner beside the driver on another share."""
    algo = (config(policy, weight_sync=how, gpu_memory_utilization=0.3)
            .env_runners(num_env_runners=1, num_gpus_per_env_runner=0.4)
            .learners(num_gpus_per_learner=0.5).build_algo())
    results = [algo.train() for _ in range(3)]
    runner, learner = results[-1]["env_runners"], results[-1]["learners"]["default_policy"]
    numbers = {"sync_s": results[-1]["timing_s"]["weight_sync"], "runner_load_s": runner["timing_s/weight_sync"],
               "gb": runner["rollout/weight_sync_bytes"] / 1e9, "gb_per_s": runner["rollout/weight_sync_gb_per_s"],
               "gap": learner["rollout/engine_logp_gap"]}
    if how == "collective":
        checks["collective: the group formed, no object-store fallback"] = algo.rollouts.collective.members == (1,)
    algo.stop()
    checks[f"{how} gap < 0.05"] = numbers["gap"] < 0.05
    return numbers


def rllib_train(checks: dict) -> dict:
    start = time.perf_counter()
    done = subprocess.run(["rllib", "train", "file", "tuned_examples/smollm2_rg_sppo.yaml", "--stop",
                           '{"training_iteration": 5}', "--config", '{"num_gpus_per_learner": 1}'],
                          capture_output=True, text=True)
    checks["rllib train: 5 SPPO iterations, exit 0"] = done.returncode == 0
    return {"exit": done.returncode, "seconds": time.perf_counter() - start, "tail": done.stdout[-2000:]}


def main():
    import ray
    import torch

    import envs  # noqa: F401

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="builtin:smollm2-135m-instruct")
    p.add_argument("--out", default="benchmarks/results/gpu_check")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    start, checks = time.perf_counter(), {}
    results = {"device": torch.cuda.get_device_name(), "provenance": provenance(("ray", "torch", "vllm"))}
    results["colocated"] = colocated(args.policy, checks)
    ray.shutdown()
    for how in ("object_store", "collective"):
        results[how] = weight_sync(args.policy, how, checks)
        ray.shutdown()
    checks["the same bytes both ways"] = results["collective"]["gb"] == results["object_store"]["gb"]
    results["rllib_train"] = rllib_train(checks)
    results["seconds"] = time.perf_counter() - start
    checks["within 8 minutes"] = results["seconds"] <= 480
    results["checks"] = checks
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = [f"# GPU check on {results['device']} ({results['seconds']:.0f} s)", "", *results["provenance"], "",
             "| check | passed |", "|---|---|", *[f"| {name} | {ok} |" for name, ok in checks.items()], "",
             "| part | numbers |", "|---|---|",
             *[f"| {part} | {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in nums.items()})} |"
               for part, nums in results.items() if part in ("colocated", "object_store", "collective")]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
