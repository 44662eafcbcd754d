"""Held-out accuracy of an LLM tuned example's policy before any training (its base rate).

    python benchmarks/heldout_base_rate.py tuned_examples/smollm2_rg_sppo.yaml --seeds 0 1 2

Builds the example's EnvRunner (its engine, env_config, temperature and ``eval_samples_per_prompt``) and evaluates
the held-out split as training does: ``accuracy/avg@k`` and ``accuracy/pass@k`` count fully correct answers only,
``reward/avg@k`` is the mean reward. ``--show N`` prints N responses with their rewards. One JSON line per seed.
"""

import argparse
import json
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--show", type=int, default=0, help="print this many held-out responses with their rewards")
    args = p.parse_args()

    from rllib_sppo.experiments import build_config, load_experiments, resolve_algorithm
    from rllib_sppo.llm.engines import GenerationConfig
    from rllib_sppo.llm.evaluation import heldout_report
    from rllib_sppo.llm.runner import LLMEnvRunner

    (name, exp), = load_experiments(args.yaml).items()
    for seed in args.seeds:
        config = build_config(resolve_algorithm(exp["run"], args.yaml), exp["env"], {**exp["config"], "seed": seed},
                              args.yaml)
        runner = LLMEnvRunner(config=config)
        start = time.perf_counter()
        result = heldout_report(runner.heldout_samples(config.eval_samples_per_prompt))
        print(json.dumps({"example": name, "seed": seed, **result, "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)
        if args.show:
            texts = runner.env.splits["heldout"].texts[:args.show]
            groups = runner.engine.generate([runner.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                                            GenerationConfig(temperature=config.temperature, top_p=config.top_p,
                                                             max_tokens=config.max_response_tokens, n=1))
            rewards, _ = runner.env.score(range(len(texts)), [g[0].text for g in groups], split="heldout")
            for i, (group, reward) in enumerate(zip(groups, rewards)):
                truth = runner.env.splits["heldout"].records[i]["ground_truth"]
                print(f"{reward:.2f} (truth {truth}): {group[0].text!r}")
        runner.stop()


if __name__ == "__main__":
    main()
