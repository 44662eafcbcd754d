"""Monitoring for real: SPPO's series on Ray's Prometheus endpoint, the dashboard in headless Chromium, and the
CLI's progress lines and curves PNG."""

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.cli import main

SERIES = re.compile(r"^ray_(sppo_\w+)\{(.*)\} (\S+)$", re.M)
HEADLESS_CHROMIUM = Path(__file__).with_name("headless_chromium.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """Ray as the session's (2 CPUs), plus the dashboard and a known Prometheus port; later tests reuse it."""
    ray.shutdown()
    metrics_port = free_port()
    context = ray.init(num_cpus=2, log_to_driver=False, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port(), _metrics_export_port=metrics_port)
    return f"http://{context.dashboard_url}", f"http://127.0.0.1:{metrics_port}/metrics"


def test_cli_prints_progress_and_writes_curves(ray_session, tmp_path, capsys, tiny_llm_experiment):
    path = tiny_llm_experiment("tiny-arith", evaluation_interval=1, eval_samples_per_prompt=2,
                               custom_evaluation_function="rllib_sppo.llm.evaluation.heldout_accuracy")
    assert main(["train", "file", str(path), "--storage-path", str(tmp_path / "results")]) == 0
    out, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if line.startswith("rllib: SPPO_")]
    assert progress, err[-2000:]
    assert re.search(r"iter 1/2 \| return [\d.e-]+ \| accuracy/avg@2 [\d.]+ \| accuracy/pass@2 [\d.]+ \| "
                     r"tokens/s \d+ \| ETA \d+:\d\d:\d\d$", progress[0]), progress[0]
    summary = json.loads(out.strip().splitlines()[-1])
    curves = summary["curves"]
    # rllib evaluate on the LLM checkpoint: the held-out split, 2 samples each
    assert main(["evaluate", summary["checkpoint"]]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["problems"] == 8 and 0 <= report["accuracy/avg@2"] <= report["accuracy/pass@2"] <= 1
    assert curves.startswith(str(tmp_path / "results" / "tiny-arith"))
    with open(curves, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(curves) as image:
        image.verify()
        assert image.size[0] > 500  # return and two accuracy columns


def test_sppo_series_reach_prometheus(ray_with_dashboard):
    dashboard, metrics = ray_with_dashboard
    algo = (SPPOConfig().environment("OutcomeCartPole-v1")
            .training(lr=1e-3, train_batch_size_per_learner=200, minibatch_size=100)
            .rl_module(model_config={"pi_hiddens": [8], "vf_hiddens": [8]}).build_algo())
    for _ in range(2):
        algo.train()
    expected = {"sppo_episode_return_mean", "sppo_critic_abs_error_mean", "sppo_critic_prediction_mean",
                "sppo_timing_s_sample", "sppo_timing_s_update", "sppo_timing_s_weight_sync"}
    deadline, found = time.monotonic() + 30, {}
    while time.monotonic() < deadline and not expected <= set(found):  # the agent exports every few seconds
        time.sleep(1)
        text = urllib.request.urlopen(metrics, timeout=10).read().decode()
        found = {name: (tags, float(value)) for name, tags, value in SERIES.findall(text)}
    algo.stop()
    assert expected <= set(found), sorted(found)
    for name in expected:
        tags, value = found[name]
        assert math.isfinite(value) and 'trial="default"' in tags, (name, tags, value)
    assert 'source="learners/default_policy"' in found["sppo_critic_abs_error_mean"][0]


def test_dashboard_renders_in_headless_chromium(ray_with_dashboard):
    dashboard, _ = ray_with_dashboard
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QTWEBENGINE_CHROMIUM_FLAGS": "--no-sandbox --disable-gpu"}
    run = subprocess.run([sys.executable, str(HEADLESS_CHROMIUM), dashboard, "Overview", "90"], env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]  # needs the test extra (PyQt6-WebEngine)
    page = json.loads(run.stdout.strip().splitlines()[-1])
    assert re.search(r"Chrome/\d+", page["user_agent"]), page["user_agent"]  # Chromium's engine rendered it
    assert page["title"].endswith("Ray Dashboard"), page["title"]  # (the app sets "Overview | ..." a moment later)
    assert {"Overview", "Jobs", "Cluster"} <= set(page["root"].split()), page["root"][:500]  # the app's navigation
