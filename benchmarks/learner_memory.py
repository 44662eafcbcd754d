"""Peak memory and throughput of one SPPO learner update on SmolLM2-135M, against response length and minibatch size
at a fixed micro-batch token budget, beside a bare transformers forward + backward on the same tokens.

    python benchmarks/learner_memory.py --lengths 256 512 1024 2048 4096 --minibatches 8 16 32 64 128

Each point runs in a fresh process with ``--threads`` torch threads (the cores a trial of the SmolLM2 example holds,
``num_cpus_for_main_process: 2``): the SPPO learner (gradient checkpointing, ``max_tokens_per_micro_batch =
--budget``, a sequence critic of the policy's size) does one update as a warm-up (AdamW's state appears), then the
measured one; the bare step is transformers' own: ``model(input_ids, labels=...)`` (full [rows, L, vocabulary]
logits, its cross-entropy), backward, on the same rows in the same micro-batches, gradient checkpointing on.
Memory: the process's peak resident set during the measured step (Linux VmHWM, reset just before it), and the
peak above what was resident before it (activations, logits, gradients). Throughput: response and prompt tokens per
second of the optimizer-step part of the update (the forward/backward passes over the micro-batches and the step;
the learner's other pass, the old log-probs, is timed apart). Writes ``benchmarks/results/learner_memory.{md,csv,png}``.
"""

import argparse
import csv
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from harness import provenance, reset_peak_rss, rss_mb, token_episodes

OUT = Path("benchmarks/results/learner_memory")
POLICY = "builtin:smollm2-135m-instruct"


def sppo_point(job: dict) -> dict:
    import gymnasium as gym
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_sppo import SPPOConfig

    torch.set_num_threads(job["threads"])
    n, text = job["minibatch"], gym.spaces.Text(8)
    learner = (SPPOConfig().llm(policy=POLICY, gradient_checkpointing=True)
               .training(lr=1e-6, critic_lr=1e-6, train_batch_size_per_learner=n, minibatch_size=n,
                         max_tokens_per_micro_batch=job["budget"])
               .build_learner(env=None, spaces={DEFAULT_MODULE_ID: (text, text)}))
    vocab = learner.module[DEFAULT_MODULE_ID].unwrapped().policy.config.vocab_size
    episodes = token_episodes(n, job["prompt_len"], job["response_len"], vocab)
    timed = {"step_s": 0.0}
    update = learner.minibatch_update

    def timed_update(batch, **kwargs):
        start = time.perf_counter()
        out = update(batch, **kwargs)
        timed["step_s"] += time.perf_counter() - start
        return out

    learner.minibatch_update = timed_update  # what the learner calls per minibatch (TorchLearnerHooks)
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=n)  # warm-up: AdamW's state
    timed["step_s"] = 0.0
    resident = reset_peak_rss()
    start = time.perf_counter()
    learner.update(episodes=episodes, num_epochs=1, minibatch_size=n)
    total_s = time.perf_counter() - start
    return _row(job, resident, timed["step_s"], total_s)


def bare_point(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rllib_sppo.llm.models import resolve_model

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(resolve_model(POLICY), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    length = job["prompt_len"] + job["response_len"]
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(10, model.config.vocab_size, (job["minibatch"], length)))
    labels = ids.clone()
    labels[:, :job["prompt_len"]] = -100  # the response tokens are scored
    rows = max(1, job["budget"] // length)

    def step():
        for s in range(0, len(ids), rows):
            model(input_ids=ids[s:s + rows], labels=labels[s:s + rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW's state
    resident = reset_peak_rss()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return _row(job, resident, seconds, seconds)


def _row(job, resident, step_s, total_s) -> dict:
    tokens = job["minibatch"] * (job["prompt_len"] + job["response_len"])
    return {**job, "tokens": tokens, "peak_rss_mb": round(rss_mb("VmHWM")),
            "peak_above_resident_mb": round(rss_mb("VmHWM") - resident), "step_s": round(step_s, 2),
            "update_s": round(total_s, 2), "tokens_per_s": round(tokens / step_s, 1),
            "load": round(os.getloadavg()[0], 2)}


def run(job: dict) -> dict:
    return (sppo_point if job["kind"] == "sppo" else bare_point)(job)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                   help="response lengths, at --length-minibatch rows")
    p.add_argument("--length-minibatch", type=int, default=4)
    p.add_argument("--minibatches", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                   help="minibatch sizes, at --minibatch-length response tokens")
    p.add_argument("--minibatch-length", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--budget", type=int, default=4096, help="max_tokens_per_micro_batch")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    base = {"prompt_len": args.prompt_len, "budget": args.budget, "threads": args.threads}
    jobs = [{"sweep": "length", "response_len": L, "minibatch": args.length_minibatch, **base} for L in args.lengths]
    jobs += [{"sweep": "minibatch", "response_len": args.minibatch_length, "minibatch": n, **base}
             for n in args.minibatches]
    rows = []
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for job in jobs:
            for kind in ("sppo", "bare"):  # side by side, one process each
                rows.append(pool.apply(run, ({**job, "kind": kind},)))
                print(rows[-1], flush=True)
                write(rows)


def write(rows: list) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{OUT}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pairs = {}
    for r in rows:
        pairs.setdefault((r["sweep"], r["response_len"], r["minibatch"]), {})[r["kind"]] = r
    lines = ["# One learner update on SmolLM2-135M: peak memory and throughput", "", *provenance(),
             f"Micro-batch budget {rows[0]['budget']} tokens, prompts of {rows[0]['prompt_len']} tokens, gradient "
             f"checkpointing, {rows[0]['threads']} torch threads, fp32. SPPO: the learner's update (policy and a "
             "policy-sized sequence critic, the policy's LM head on the response positions in chunks). Bare: "
             "transformers' forward (full logits) + cross-entropy + backward + AdamW step on the same rows and "
             "micro-batches (policy only). Load average at the end of each point in the CSV.", "",
             "| sweep | response tokens | minibatch | tokens | SPPO peak RSS MB (above resident) | bare peak RSS MB "
             "(above resident) | SPPO step tokens/s | bare tokens/s | ratio | SPPO whole update s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (sweep, length, n), pair in pairs.items():
        s, b = pair.get("sppo"), pair.get("bare")
        if not (s and b):
            continue
        lines.append(f"| {sweep} | {length} | {n} | {s['tokens']:,} | {s['peak_rss_mb']:,} ({s['peak_above_resident_mb']:,}) | "
                     f"{b['peak_rss_mb']:,} ({b['peak_above_resident_mb']:,}) | {s['tokens_per_s']:,.0f} | "
                     f"{b['tokens_per_s']:,.0f} | {s['tokens_per_s'] / b['tokens_per_s']:.2f} | {s['update_s']:.1f} |")
    Path(f"{OUT}.md").write_text("\n".join(lines) + "\n")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="tight")
    for ax, sweep, x in zip(fig.subplots(1, 2), ("length", "minibatch"), ("response_len", "minibatch")):
        for kind, style in (("sppo", "o-"), ("bare", "s--")):
            sel = [r for r in rows if r["sweep"] == sweep and r["kind"] == kind]
            ax.plot([r[x] for r in sel], [r["peak_above_resident_mb"] for r in sel], style, label=kind)
        ax.set(xlabel=x.replace("_", " "), ylabel="peak MB above resident", xscale="log")
        ax.legend()
    fig.savefig(f"{OUT}.png", dpi=100)


if __name__ == "__main__":
    main()
