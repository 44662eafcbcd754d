"""What the decoupled critic costs: a critic the policy's size vs a smaller one, and as responses grow.

    python benchmarks/critic_cost.py --batch 4 --prompt-len 64 --response-lens 32 128 384

Policy: SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``). Critics: the same model ("= policy"),
and a small Llama with the same tokenizer (2 layers, hidden 128; randomly initialised: only its cost is
measured, as the reference pairs a 7B policy with a 1.5B critic). Each critic runs in its own process
(for a clean peak RSS); per response length the median of 3 learner steps of each part is timed: the critic's
(values at the last prompt token, BCE loss, backward, AdamW) and the policy's (log-probs, PPO-clip loss,
backward, AdamW). The critic reads the prompt only, so its cost must stay flat as responses grow.
Writes ``benchmarks/results/critic_cost.{md,csv,png}``.
"""

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import provenance

OUT = Path("benchmarks/results/critic_cost")


def small_critic(out_dir: str, policy_dir: str) -> str:
    """A 2-layer Llama with the policy's tokenizer, saved as a HF folder."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = AutoConfig.from_pretrained(policy_dir)
    config = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=base.vocab_size, tie_word_embeddings=True,
                         bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out_dir)
    return out_dir


def measure(critic: str | None, batch: int, prompt_len: int, response_lens: list[int]) -> list[dict]:
    """One process: builds the module, times the median of 3 critic steps and of 3 policy steps per response length."""
    import gymnasium as gym
    import torch

    from rllib_sppo.core import critic_bce_loss, ppo_clip_loss
    from rllib_sppo.torch.llm_rl_module import SPPOLLMModule

    torch.manual_seed(0)
    text = gym.spaces.Text(8)
    module = SPPOLLMModule(observation_space=text, action_space=text, model_config={
        "policy": "builtin:smollm2-135m-instruct", **({"critic": critic} if critic else {})})
    policy_opt = torch.optim.AdamW(module.policy_parameters(), lr=1e-6)
    critic_opt = torch.optim.AdamW(module.critic_parameters(), lr=1e-6)
    vocab = module.policy.config.vocab_size
    rows = []
    for i, length in enumerate([response_lens[0]] + response_lens):  # the first pass warms up
        ids = torch.randint(0, vocab, (batch, prompt_len + length))
        mask = torch.zeros(batch, prompt_len + length - 1)
        mask[:, prompt_len - 1:] = 1.0
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask,
             "critic_input_ids": ids[:, :prompt_len],
             "critic_attention_mask": torch.ones(batch, prompt_len, dtype=torch.long)}
        critic_s, policy_s = [], []
        for _ in range(3):  # the median of 3 steps
            start = time.perf_counter()
            critic_opt.zero_grad()
            critic_bce_loss(module.compute_values(b), torch.rand(batch)).backward()
            critic_opt.step()
            critic_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            policy_opt.zero_grad()
            logp = module.forward_train(b)["logp"]
            loss, _ = ppo_clip_loss(logp, logp.detach(), torch.randn(batch), mask)
            loss.backward()
            policy_opt.step()
            policy_s.append(time.perf_counter() - start)
        critic_s, policy_s = sorted(critic_s)[1], sorted(policy_s)[1]
        if i:
            rows.append({"critic": "= policy" if critic is None else "small", "response_len": length,
                         "critic_params_m": sum(p.numel() for p in module.critic_parameters()) / 1e6,
                         "critic_step_s": critic_s, "policy_step_s": policy_s})
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return [{**r, "peak_rss_gb": peak_gb} for r in rows]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-lens", type=int, nargs="+", default=[32, 128, 384])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:  # a measuring process
        print(json.dumps(measure(args.child or None, args.batch, args.prompt_len, args.response_lens)))
        return
    from rllib_sppo.llm.models import resolve_model

    policy_dir = resolve_model("builtin:smollm2-135m-instruct")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for critic in ("", small_critic(tmp, policy_dir)):
            out = subprocess.run([sys.executable, __file__, "--child", critic, "--batch", str(args.batch),
                                  "--prompt-len", str(args.prompt_len), "--response-lens",
                                  *map(str, args.response_lens)], capture_output=True, text=True, check=True)
            rows += json.loads(out.stdout.strip().splitlines()[-1])
            print(rows[-1], flush=True)
    write(rows, args)


def write(rows: list, args) -> None:
    import matplotlib

    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{OUT}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Critic cost: a critic the policy's size vs a small one, as responses grow", "",
             *provenance(),
             f"Policy SmolLM2-135M-Instruct, batch {args.batch}, prompt {args.prompt_len} tokens, fp32.", "",
             "| critic | critic params (M) | response tokens | critic step s | policy step s | critic share | "
             "process peak RSS GB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['critic']} | {r['critic_params_m']:.1f} | {r['response_len']} | {r['critic_step_s']:.2f} | "
              f"{r['policy_step_s']:.2f} | {r['critic_step_s'] / (r['critic_step_s'] + r['policy_step_s']):.0%} | "
              f"{r['peak_rss_gb']:.2f} |" for r in rows]
    Path(f"{OUT}.md").write_text("\n".join(lines) + "\n")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for critic in dict.fromkeys(r["critic"] for r in rows):
        sel = [r for r in rows if r["critic"] == critic]
        ax.plot([r["response_len"] for r in sel], [r["critic_step_s"] for r in sel], "o-", label=f"critic ({critic})")
    sel = [r for r in rows if r["critic"] == "= policy"]
    ax.plot([r["response_len"] for r in sel], [r["policy_step_s"] for r in sel], "s--", label="policy")
    ax.set_xlabel("response tokens")
    ax.set_ylabel("learner step s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{OUT}.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
