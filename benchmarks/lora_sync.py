"""LoRA against full fine-tuning on SmolLM2-135M: the bytes and seconds of each weight sync into vLLM, and the
learner's peak memory of one update.

    python benchmarks/lora_sync.py --lora '{"r": 16, "alpha": 32}' --iterations 3

Each mode runs in a fresh process. Memory: the SPPO learner alone (the SmolLM2 example's settings: a sequence critic
of the policy's size, fp32, no micro-batches) on ``--prompts`` synthetic episodes (48 prompt and 64 response tokens)
does one update as a warm-up (AdamW's state appears), then the measured one; the process's peak resident set during
it (Linux VmHWM, reset just before it through /proc/self/clear_refs, after handing freed memory back with glibc's
malloc_trim) and that peak above what was resident before (gradients, activations). Sync: the algorithm with the vLLM engine trains ``--iterations`` tiny iterations (4 prompts,
8-token answers) with the EnvRunner in the learner's process (the learner's tensors handed over) and on one remote
EnvRunner (object-store chunks); per sync after the first iteration: the bytes the engine received
(``rollout/weight_sync_bytes``), the engine's load seconds (``env_runners/timing_s/weight_sync``) and the driver's
whole sync phase (``timing_s/weight_sync``: reading the weights, chunking, the remote load). Seconds depend on the
load of the machine: the 1-minute load average before and after each mode is in the table. Writes
``benchmarks/results/lora_sync.{md,csv}``.
"""

import argparse
import csv
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from harness import provenance, reset_peak_rss, rss_mb, token_episodes

OUT = Path("benchmarks/results/lora_sync")
POLICY = "builtin:smollm2-135m-instruct"


def learner_memory(lora: dict | None, prompts: int) -> dict:
    import gymnasium as gym
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rllib_sppo import SPPOConfig
    from rllib_sppo.llm.connectors import TokenBatch
    from rllib_sppo.torch.llm_rl_module import SPPOLLMModule

    text = gym.spaces.Text(8)
    learner = (SPPOConfig()
               .learners(learner_connector=lambda *a: TokenBatch(), add_default_connectors_to_learner_pipeline=False)
               .training(lr=2e-5, critic_lr=1e-4, train_batch_size_per_learner=prompts, minibatch_size=prompts)
               .rl_module(rl_module_spec=RLModuleSpec(module_class=SPPOLLMModule, model_config={
                   "policy": POLICY, **({"lora": lora} if lora else {})}))
               .build_learner(env=None, spaces={DEFAULT_MODULE_ID: (text, text)}))
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    episodes = token_episodes(prompts, 48, 64, module.policy.config.vocab_size)
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=prompts)  # warm-up: AdamW's state
    resident = reset_peak_rss(trim=True)
    start = time.perf_counter()
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=prompts)
    return {"update_s": time.perf_counter() - start, "peak_mb": rss_mb("VmHWM"),
            "peak_above_mb": rss_mb("VmHWM") - resident,
            "policy_trained_params": sum(p.numel() for p in module.policy_parameters()),
            "policy_params": sum(p.numel() for p in module.policy.parameters())}


def sync(lora: dict | None, runners: int, iterations: int) -> dict:
    import ray
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    import envs  # noqa: F401
    from rllib_sppo import SPPOConfig
    from rllib_sppo.llm.connectors import TokenBatch
    from rllib_sppo.llm.runner import LLMEnvRunner
    from rllib_sppo.torch.llm_rl_module import SPPOLLMModule

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    algo = (SPPOConfig()
            .learners(learner_connector=lambda *a: TokenBatch(), add_default_connectors_to_learner_pipeline=False)
            .environment("ReasoningBandit-v0", env_config={
                "source": "arithmetic", "size": 200, "chat_template_model": POLICY})
            .env_runners(env_runner_cls=LLMEnvRunner, num_env_runners=runners, num_envs_per_env_runner=4,
                         num_cpus_per_env_runner=1)
            .training(lr=2e-5, critic_lr=1e-4, train_batch_size_per_learner=4, minibatch_size=4,
                      max_response_tokens=8, rollout_engine="vllm", engine_kwargs={"max_model_len": 512})
            .rl_module(rl_module_spec=RLModuleSpec(module_class=SPPOLLMModule, model_config={
                "policy": POLICY, **({"lora": lora} if lora else {})}))
            .debugging(seed=0)
            .build_algo())
    rows = []
    for i in range(iterations):
        result = algo.train()
        if i:  # the first iteration's engine starts; later syncs are the steady state
            rows.append((result["env_runners"]["rollout/weight_sync_bytes"],
                         result["env_runners"]["timing_s/weight_sync"], result["timing_s"]["weight_sync"]))
    algo.stop()
    ray.shutdown()
    sync_bytes, engine_s, driver_s = (float(np.mean(c)) for c in zip(*rows))
    return {"sync_mb": sync_bytes / 2**20, "engine_load_s": engine_s, "sync_phase_s": driver_s}


def run_mode(job: dict, results) -> None:
    load = os.getloadavg()[0]
    row = {"mode": job["mode"], **learner_memory(job["lora"], job["prompts"])}
    for where, runners in (("local", 0), ("remote", 1)):
        row |= {f"{where}_{k}": v for k, v in sync(job["lora"], runners, job["iterations"]).items()}
    results.put({**row, "load_before": load, "load_after": os.getloadavg()[0]})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lora", default='{"r": 16, "alpha": 32}', help="model_config lora (JSON) of the LoRA mode")
    p.add_argument("--prompts", type=int, default=16, help="episodes of the measured update (one minibatch)")
    p.add_argument("--iterations", type=int, default=3, help="training iterations per sync measurement")
    args = p.parse_args()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    rows, results = [], ctx.Queue()
    for mode, lora in (("full fine-tuning", None), (f"LoRA {args.lora}", json.loads(args.lora))):
        # A fresh (non-daemonic: Ray and vLLM start processes) process per mode: its own peak memory.
        process = ctx.Process(target=run_mode, args=({"mode": mode, "lora": lora, "prompts": args.prompts,
                                                      "iterations": args.iterations}, results))
        process.start()
        rows.append(results.get())
        process.join()
        print(rows[-1], flush=True)
    with open(f"{OUT}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# LoRA against full fine-tuning, SmolLM2-135M: weight sync into vLLM and learner peak memory", "",
             *provenance(("ray", "torch", "vllm", "peft")),
             "| mode | policy params trained | sync MB | local sync: engine s | remote sync: engine s | remote sync "
             "phase s | learner peak MB | peak above resident MB | update s | load avg before / after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['policy_trained_params']:,} of {r['policy_params']:,} | {r['remote_sync_mb']:.2f} | "
              f"{r['local_engine_load_s']:.3f} | {r['remote_engine_load_s']:.3f} | {r['remote_sync_phase_s']:.3f} | "
              f"{r['peak_mb']:.0f} | {r['peak_above_mb']:.0f} | {r['update_s']:.1f} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |" for r in rows]
    Path(f"{OUT}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
