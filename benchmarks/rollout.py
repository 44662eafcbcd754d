"""Rollout throughput: the vLLM EnvRunner vs a bare ``vllm.LLM.generate`` (the limit) vs the transformers
engine, on the same prompts; and the in-place weight sync's seconds and bytes.

    python benchmarks/rollout.py tuned_examples/arith_tiny_sppo.yaml --rounds 5

``--out`` names another output stem, for a variant of the machine such as vLLM's advised preload on CPU:
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/rollout.py ... --out ...`` (the
report records ``LD_PRELOAD``).

The EnvRunner figure is end to end (reset, tokenise, generate, score, build episodes); the bare figure
calls the runner's own ``vllm.LLM`` with the same prompt ids and sampling parameters. Writes
``benchmarks/results/rollout.{md,csv,png}``.
"""

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from harness import provenance

OUT = Path("benchmarks/results/rollout")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("yaml")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(OUT), help="output path stem (default %(default)s)")
    args = p.parse_args()

    import envs  # noqa: F401  (registers ReasoningBandit-v0)
    import vllm
    from transformers import AutoModelForCausalLM

    from rllib_sppo.experiments import build_config, load_experiments, resolve_algorithm
    from rllib_sppo.llm.engines import GenerationConfig, make_engine
    from rllib_sppo.llm.runner import LLMEnvRunner

    (name, exp), = load_experiments(args.yaml).items()
    config = build_config(resolve_algorithm(exp["run"], args.yaml), exp["env"], exp["config"], args.yaml)
    runner = LLMEnvRunner(config=config)
    n = config.total_train_batch_size
    gen = GenerationConfig(temperature=config.temperature, top_p=config.top_p,
                           max_tokens=config.max_response_tokens, n=config.samples_per_prompt)
    runner.sample(num_episodes=n)  # warm-up: engine start, first compilation
    rows, prompts = [], []

    def timed(label, fn):
        tokens, start = 0, time.perf_counter()
        for _ in range(args.rounds):
            tokens += fn()
        wall = time.perf_counter() - start
        rows.append({"path": label, "prompts_per_round": n, "rounds": args.rounds,
                     "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall})
        print(rows[-1], flush=True)

    def runner_round():
        episodes = runner.sample(num_episodes=n)
        prompts.append([list(e.get_extra_model_outputs("prompt_ids", 0)) for e in episodes])
        return sum(len(e.get_extra_model_outputs("response_ids", 0)) for e in episodes)

    timed("LLMEnvRunner.sample (vLLM, end to end)", runner_round)
    params = vllm.SamplingParams(n=gen.n, temperature=gen.temperature, top_p=gen.top_p,
                                 max_tokens=gen.max_tokens, logprobs=0)
    rounds = iter(prompts)
    timed("bare vllm.LLM.generate (same prompts)", lambda: sum(
        len(c.token_ids) for o in runner.engine.llm.generate(
            [{"prompt_token_ids": q} for q in next(rounds)], params, use_tqdm=False) for c in o.outputs))
    hf = make_engine("transformers", runner.model_dir, seed=config.seed or 0)
    rounds = iter(prompts)
    timed("transformers generate engine (same prompts)", lambda: sum(
        len(s.response_ids) for g in hf.generate(next(rounds), gen) for s in g))

    # Weight sync: the policy's full state pushed into the running engine, as after every update.
    state = AutoModelForCausalLM.from_pretrained(runner.model_dir).state_dict()
    sync_s = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        runner._load_weights(iter(state.items()))
        sync_s.append(time.perf_counter() - start)
    sync_bytes = sum(t.numel() * t.element_size() for t in state.values())
    write(rows, float(np.median(sync_s)), sync_bytes, Path(args.out))


def write(rows, sync_s, sync_bytes, out: Path) -> None:
    import matplotlib

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    limit = rows[1]["tokens_per_s"]
    lines = ["# Rollout throughput and weight sync", "",
             *provenance(("ray", "torch", "vllm")),
             f"LD_PRELOAD: {os.environ.get('LD_PRELOAD') or 'unset'}", "",
             "| path | prompts per round | rounds | response tokens | wall s | tokens/s | share of bare vLLM |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['prompts_per_round']} | {r['rounds']} | {r['tokens']} | {r['wall_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / limit:.2f} |" for r in rows]
    lines += ["", f"Weight sync into the running vLLM engine (in place, no restart): median {sync_s:.3f} s, "
              f"{sync_bytes / 1e6:.1f} MB per sync."]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.barh([r["path"] for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set_xlabel("response tokens / s")
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
