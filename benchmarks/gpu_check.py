"""GPU check of the reference-scale path, at most 8 minutes on one H200:

    python benchmarks/gpu_check.py [--policy builtin:smollm2-135m-instruct] [--iterations 3]

SmolLM2-135M as policy and critic, bf16 compute over fp32 master weights (the torch learner), vLLM on the same GPU
(colocated: ``num_env_runners: 0``, the engine sleeps at level 2 while the learner updates and wakes for the weight
sync), responses up to 4,096 tokens (the prompts ask for long answers; the lengths reached are printed),
``max_tokens_per_micro_batch`` 16,384. Prints per iteration: rollout tokens/s, response length, update and sync
seconds, the sync's GB/s, peak GPU memory (the learner's torch allocator and the whole device), and the engine/learner
log-prob gap; writes them to ``benchmarks/results/gpu_check.md``. Needs ``pip install -e ".[llm,vllm]"`` on a CUDA
machine and the model folder (no hub access: ``--policy`` takes a local folder).
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from harness import provenance

OUT = Path("benchmarks/results/gpu_check")
TOPICS = ["the history of mathematics", "how compilers work", "the water cycle", "the theory of evolution",
          "how a CPU executes instructions", "the causes of the French revolution", "how vaccines work",
          "the physics of black holes"]


def prompts_parquet(folder: str, n: int = 64) -> str:
    """verl-format prompts asking for long answers (the reward is the math verifier's, mostly 0: a systems check)."""
    prompt = [[{"role": "user", "content": f"Write a very long, detailed essay (at least 3000 words) about "
                                           f"{TOPICS[i % len(TOPICS)]}. Then put the number {i} in \\boxed{{}}."}]
              for i in range(n)]
    table = pa.table({"data_source": ["gpu_check"] * n, "prompt": prompt,
                      "reward_model": [{"ground_truth": str(i)} for i in range(n)]})
    path = f"{folder}/prompts.parquet"
    pq.write_table(table, path)
    return path


def gpu_used_mb() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return float(out.split()[0]) if out.strip() else float("nan")


def main():
    import torch

    import envs  # noqa: F401
    from rllib_sppo import SPPOConfig

    p = argparse.ArgumentParser()
    p.add_argument("--policy", default="builtin:smollm2-135m-instruct")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    args = p.parse_args()
    assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
    folder = tempfile.mkdtemp()
    config = (SPPOConfig()
              .environment("ReasoningBandit-v0", env_config={"source": "parquet", "paths": [prompts_parquet(folder)],
                                                             "chat_template_model": args.policy})
              .llm(policy=args.policy, engine="vllm", dtype="bfloat16", gradient_checkpointing=True)
              .env_runners(num_env_runners=0, num_envs_per_env_runner=args.prompts)
              .learners(num_gpus_per_learner=1)
              .training(lr=1e-6, critic_lr=5e-6, train_batch_size_per_learner=args.prompts,
                        minibatch_size=args.prompts // 2, max_response_tokens=4096, max_tokens_per_micro_batch=16384,
                        temperature=0.6,
                        engine_kwargs={"max_model_len": 4608, "dtype": "bfloat16"})
              .debugging(seed=0))
    start = time.perf_counter()
    algo = config.build_algo()
    lines = ["# GPU check: SmolLM2-135M, bf16 over fp32 masters, colocated vLLM with sleep/wake", "", *provenance(),
             f"Build: {time.perf_counter() - start:.0f} s. Engine sleep level {algo.env_runner.sleep_level}, GPU share "
             f"{algo.env_runner.gpu_memory_utilization}.", "",
             "| iteration | rollout tokens/s | response tokens (mean) | update s | sync s | sync GB/s | learner peak GB "
             "(torch) | GPU used GB | engine/learner log-prob gap |", "|---|---|---|---|---|---|---|---|---|"]
    for i in range(args.iterations):
        torch.cuda.reset_peak_memory_stats()
        r = algo.train()
        runners, learner = r["env_runners"], r["learners"]["default_policy"]
        lines.append(f"| {i + 1} | {runners['rollout/tokens_per_s']:.0f} | {learner['rollout/response_len_mean']:.0f} | "
                     f"{r['timing_s']['update']:.1f} | {r['timing_s']['weight_sync']:.2f} | "
                     f"{runners.get('rollout/weight_sync_gb_per_s', float('nan')):.2f} | "
                     f"{torch.cuda.max_memory_allocated() / 2**30:.1f} | {gpu_used_mb() / 1024:.1f} | "
                     f"{learner['rollout/engine_logp_gap']:.4f} |")
        print(lines[-1], flush=True)
    algo.stop()
    lines += ["", f"Total {time.perf_counter() - start:.0f} s."]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{OUT}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
