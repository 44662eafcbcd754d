"""Does a right final answer on envs.chain certify its working? (#23: the first chain, a Fibonacci mod 100, forgave a
tens-digit slip in the first result. The running sum that replaced it carries every slip to the answer, but a policy
also writes a result wrong without carrying it on, or repeats one slip until it cancels mod 100; so the chain's
reward is ``working``, which pays only an answer whose every line is the reference's.)

Three shares of answers: the boxed answer right (``math``), and every result right too, and every line the
reference's (what ``working`` pays):
- the shipped chain policies (``tiny_chain_<horizon>``), the builder's held-out problems (64 x 2 samples, T = 0.6);
- the answers stored at the last evaluation of each reported run in ``benchmarks/results/long_horizon_runs.jsonl``.
Writes ``benchmarks/results/chain_working.md``.

    python benchmarks/chain_working.py
"""

import json
import re
import sys
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def verdicts(reference: str, truth: str, answer: str) -> tuple[bool, bool, bool]:
    """(final answer right, and every result right too, and every line the reference's: what ``working`` pays)."""
    from envs.rewards import math_reward, working_reward

    right = math_reward([answer], [truth]) == [1.0]
    results = [line.split(", ")[-1] for line in answer.split("\n") if re.match(r"^[a-zA-Z] ", line)]
    expected = [line.split(", ")[-1] for line in reference.split("\n")[:-1]]
    return right, right and results == expected, working_reward([answer], [truth], solution=[reference]) == [1.0]


def row(name: str, counts: list) -> str:
    n = len(counts)
    return f"| {name} | {n} | " + " | ".join(f"{sum(c[i] for c in counts) / n:.3f}" for i in range(3)) + " |"


def shipped(horizon: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rllib_sppo.llm.assets import supervise, tiny

    folder = next(p for p in tiny.SHIPPED.iterdir() if p.name.startswith(f"tiny_chain_{horizon}_"))
    _, test = supervise.env_split(tiny.chain_env(horizon))
    test, samples = test[:64], 2
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tokens = max(len(supervise.solution(r)) for r in test) + 8
    texts = supervise.sample_answers(model, tok, test, samples, max_new_tokens=tokens)
    records = [r for r in test for _ in range(samples)]
    return row(f"shipped {folder.name}", [verdicts(r["extra_info"]["solution"], r["ground_truth"], t)
                                          for r, t in zip(records, texts)])


def stored(run: dict) -> str:
    from envs.chain import solve

    counts = []
    for item in run["answers"]:
        question = item["prompt"].split("Q: ")[1].split("\n")[0]
        reference = solve(question)
        counts += [verdicts(reference, reference[-3:-1], answer) for answer in item["answers"]]
    return row(f"{run['label'].replace(' | ', ', ')}, seed {run['seed']}, last evaluation", counts)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    lines = ["# Does a right final answer on envs.chain certify its working?", "",
             f"Command: `python benchmarks/chain_working.py` ({date.today()}, 2 cores, no GPU). Shipped policies: the "
             "builder's 64 held-out problems x 2 samples at T = 0.6; reported runs: the answers the runs file keeps from "
             "each run's last evaluation (16 held-out problems x 4 samples).", "",
             "| answers | n | final answer right (`math`) | and every result right | and every line the reference's "
             "(`working`, the reward) |",
             "|---|---|---|---|---|"]
    lines += [shipped(h) for h in ("short", "medium", "long")]
    runs_file = RESULTS / "long_horizon_runs.jsonl"
    runs = [json.loads(line) for line in open(runs_file)] if runs_file.exists() else []
    lines += [stored(r) for r in runs if r["seed"] != 100 and r.get("answers")]
    (RESULTS / "chain_working.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
