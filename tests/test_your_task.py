"""docs/your_own_task.md's YAMLs, run as a user runs them: `rllib train file ...` from the repository root, with
relative paths to the user's files and dotted paths to the user's own code."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from envs.rewards import get_reward_fn

pytestmark = pytest.mark.system  # every test here runs the CLI in a fresh process

REPO = Path(__file__).resolve().parents[1]


def rllib(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rllib", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def returns(storage: Path) -> list[float]:
    [progress] = storage.rglob("progress.csv")
    with progress.open() as f:
        return [float(row["env_runners/episode_return_mean"]) for row in csv.DictReader(f)]


def test_your_gymnasium_env_and_its_outcome_from_a_yaml(tmp_path):
    """examples/your_task/corridor.py's env class by its dotted path, `outcome: success`: a random walk rarely
    reaches the corridor's end within 30 steps; SPPO learns to."""
    run = rllib("train", "file", "tuned_examples/your_task_env.yaml", "--storage-path", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    curve = returns(tmp_path)
    assert curve[0] < 0.5 and curve[-1] >= 0.9, curve


def test_your_parquet_and_reward_function_from_a_yaml(tmp_path):
    """examples/your_task/problems.parquet by its relative path and examples/your_task/reward.py's function by its
    dotted path, one iteration and a held-out evaluation; the policy is swapped for a tiny model the test builds
    (the YAML's SmolLM2 takes minutes on 2 cores), all else as written."""
    from rllib_sppo.llm.assets import build_tiny_llama

    assert get_reward_fn("examples.your_task.reward.last_integer")(
        ["3 + 4 = 7", "it is 8", "no idea"], ground_truth=["7", "7", "7"]) == [1.0, 0.0, None]
    tiny = build_tiny_llama(tmp_path / "tiny", seed=0)
    spec = yaml.safe_load((REPO / "tuned_examples/your_task_llm.yaml").read_text())
    config = spec["your-task-llm"]["config"]
    config["llm"] = {"policy": tiny, "engine": "transformers"}
    del config["engine_kwargs"]  # vLLM's max_model_len: the transformers engine takes none (engine_problems)
    config["env_config"]["chat_template_model"] = tiny
    config["evaluation_interval"] = 1
    path = tmp_path / "your_task_llm.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = rllib("train", "file", str(path), "--stop", '{"training_iteration": 1}', "--storage-path",
                str(tmp_path / "results"))
    assert run.returncode == 0, run.stderr[-3000:]
    [result] = [json.loads(line) for line in next((tmp_path / "results").rglob("result.json")).read_text().splitlines()]
    assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 6  # 6 of the 12 training problems
    assert result["evaluation"]["env_runners"]["problems"] == 4  # the 4 held-out ones
