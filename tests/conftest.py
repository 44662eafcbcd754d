import os
import textwrap

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole test session (2 cores)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def train_until():
    """``train_until(algo, reached, most)``: ``algo.train()`` until ``reached`` holds for the episode-return means so
    far or ``most`` iterations ran (a learning test waits on its curve, not a count); those means and the results."""
    def train(algo, reached, most: int) -> tuple[list, list]:
        returns, results = [], []
        while len(results) < most:
            results.append(algo.train())
            returns.append(results[-1]["env_runners"]["episode_return_mean"])
            if reached(returns):
                break
        return returns, results
    return train


@pytest.fixture
def yaml_file(tmp_path):
    """``yaml_file(text, name="exp.yaml")``: ``text`` (dedented) written to a file in ``tmp_path``; its path."""
    def write(text: str, name: str = "exp.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)
    return write


@pytest.fixture
def tiny_llm_experiment(tmp_path):
    """``write(name, **config)``: a 2-iteration SPPO tuned-example YAML on a tiny Llama the test builds (arithmetic
    prompts, transformers engine), ``config`` overriding its config keys; returns the file's path."""
    import yaml

    from rllib_sppo.llm.assets import build_tiny_llama

    tiny = str(build_tiny_llama(tmp_path / "tiny", seed=0))

    def write(name: str, **config) -> str:
        experiment = {name: {"run": "SPPO", "env": "ReasoningBandit-v0", "stop": {"training_iteration": 2}, "config": {
            "seed": 0,
            "env_config": {"source": "arithmetic", "size": 100, "heldout_size": 8, "chat_template_model": tiny},
            "llm": {"policy": tiny, "engine": "transformers"},
            "num_envs_per_env_runner": 8,
            "max_response_tokens": 8,
            "train_batch_size_per_learner": 8,
            "minibatch_size": 8,
            **config}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(experiment, sort_keys=False))
        return str(path)

    return write
