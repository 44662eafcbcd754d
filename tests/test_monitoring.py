"""Monitoring for real: SPPO's series on Ray's Prometheus endpoint, the dashboard in headless Chromium, and the
CLI's progress lines and curves PNG."""

import copy
import json
import logging
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pandas as pd
import pytest
import ray
from PIL import Image

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.cli import main
from rllib_sppo.monitoring import (
    ACCURACY, BEFORE_TRAINING, ENV_STEPS, KNOWN_NOISE, accuracy_curve, quiet_console,
)
from rllib_sppo.private_api import PRIVATE_LOGGERS, ray_init

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
    context = ray_init(num_cpus=2, log_to_driver=False, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port(), metrics_export_port=metrics_port)
    return f"http://{context.dashboard_url}", f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.mark.system
def test_cli_prints_progress_and_writes_curves(ray_session, tmp_path, capsys, tiny_llm_experiment):
    path = tiny_llm_experiment("tiny-arith", evaluation_interval=2, eval_samples_per_prompt=2)
    assert main(["train", "file", str(path), "--storage-path", str(tmp_path / "results")]) == 0
    out, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if line.startswith("rllib: SPPO_")]
    assert progress, err[-2000:]
    # Iteration 1 has no evaluation of its own: the line shows the one before the first update (iteration 0).
    assert re.search(r"iter 1/2 \| return [\d.e-]+ \| accuracy/avg@2 [\d.]+ \(iter 0\) \| accuracy/pass@2 [\d.]+ "
                     r"\(iter 0\) \| tokens/s \d+ \| ETA \d+:\d\d:\d\d$", progress[0]), progress[0]
    summary = json.loads(out.strip().splitlines()[-1])
    curves, checkpoint = summary["curves"], summary["best_checkpoint"]
    assert re.search(rf"^rllib: best checkpoint: {re.escape(checkpoint)} \(accuracy/avg@2 [\d.e-]+ at iteration 2\)$",
                     err, re.M), err[-2000:]
    assert f"rllib: evaluate it: rllib evaluate {checkpoint}\n" in err
    # rllib evaluate on the LLM checkpoint: the held-out split, 2 samples each, and the critic's calibration on it
    assert main(["evaluate", checkpoint]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["problems"] == 8 and 0 <= report["accuracy/avg@2"] <= report["accuracy/pass@2"] <= 1
    assert 0 <= report["critic/heldout_brier"] <= 1 and 0 <= report["critic/heldout_ece"] <= 1
    assert {"critic/heldout_auroc", "critic/heldout_spearman"} <= set(report)  # (NaN when undefined)
    assert sum(b["problems"] for b in report["reliability"]) == 8
    # The critic's reliability diagram, next to the curves
    reliability = summary["reliability"]
    assert reliability == str(Path(curves).with_name("reliability.png"))
    assert f"rllib: critic's reliability diagram: {reliability}\n" in err
    with Image.open(reliability) as image:
        image.verify()
    assert curves.startswith(str(tmp_path / "results" / "tiny-arith"))
    with open(curves, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    with Image.open(curves) as image:
        image.verify()
        assert image.size[0] > 500  # return and two accuracy columns
    # The accuracy curve: the evaluation before training at iteration 0 (0 env steps), then iteration 2's; not
    # iteration 1's result, which repeats the last evaluation.
    df = pd.read_csv(Path(curves).with_name("progress.csv"))
    data = accuracy_curve(df, f"{ACCURACY}avg@2", {"evaluation_interval": 2})
    assert data["training_iteration"].tolist() == [0, 2] and data[ENV_STEPS].tolist()[0] == 0
    assert data[f"{ACCURACY}avg@2"].iloc[0] == df[f"{BEFORE_TRAINING}/accuracy/avg@2"].iloc[0]
    # The held-out calibration is in the results, before training and at each evaluation; the reliability bins
    # hold every held-out problem.
    for prefix in (f"{BEFORE_TRAINING}/", "evaluation/env_runners/"):
        last = df[[c for c in df if c.startswith(prefix)]].dropna(how="all").iloc[-1]
        assert 0 <= last[f"{prefix}critic/heldout_brier"] <= 1
        assert sum(last[f"{prefix}reliability/bin{b}/problems"] for b in range(10)) == 8


def test_heldout_calibration_is_exported_beside_accuracy(ray_session, monkeypatch):
    """The critic's held-out calibration (evaluation results, ``critic/`` namespace) becomes gauges like accuracy;
    the reliability diagram's bins stay in the results only."""
    from types import SimpleNamespace

    from rllib_sppo import monitoring

    monkeypatch.setattr(monitoring, "trial_info", lambda algorithm: None)  # (outside Tune)
    export = monitoring.PrometheusExport()
    export(SimpleNamespace(trial_name="default"), {"evaluation": {"env_runners": {
        "accuracy/avg@4": 0.5, "critic/heldout_brier": 0.2, "critic/heldout_auroc": float("nan"),
        "reliability/bin3/problems": 7}}})
    assert set(export._gauges) == {"sppo_accuracy_avg_at_4", "sppo_critic_heldout_brier"}  # (NaN: not set)


@pytest.mark.system
def test_sppo_series_reach_prometheus(ray_with_dashboard):
    dashboard, metrics = ray_with_dashboard
    algo = (SPPOConfig().environment("OutcomeCartPole-v1")
            .training(lr=1e-3, train_batch_size_per_learner=200, minibatch_size=100)
            .rl_module(model_config={"pi_hiddens": [8], "vf_hiddens": [8]}).build_algo())
    for _ in range(2):
        algo.train()
    expected = {"sppo_episode_return_mean", "sppo_critic_abs_error_mean", "sppo_critic_prediction_mean",
                "sppo_timing_s_sample", "sppo_timing_s_update", "sppo_timing_s_weight_sync"}
    deadline, found = time.monotonic() + 120, {}
    while time.monotonic() < deadline and not expected <= set(found):  # the agent exports every few seconds
        time.sleep(1)
        text = urllib.request.urlopen(metrics, timeout=10).read().decode()
        found = {name: (tags, float(value)) for name, tags, value in SERIES.findall(text)}
    export = algo.config.callbacks_on_train_result
    algo.stop()
    assert expected <= set(found), sorted(found)
    # The gauges live in this algorithm's export object: a new config, or a copy (a checkpoint's), has none yet.
    assert {"sppo_critic_abs_error_mean", "sppo_episode_return_mean"} <= set(export._gauges)
    assert SPPOConfig().callbacks_on_train_result._gauges == {}
    assert pickle.loads(pickle.dumps(export))._gauges == {} and copy.deepcopy(export)._gauges == {}
    for name in expected:
        tags, value = found[name]
        assert math.isfinite(value) and 'trial="default"' in tags, (name, tags, value)
    assert 'source="learners/default_policy"' in found["sppo_critic_abs_error_mean"][0]


@pytest.mark.system
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


def test_quiet_console_shows_this_packages_progress_on_the_current_stderr(monkeypatch):
    import io

    quiet_console()
    for _ in range(2):  # a closed earlier stream (another test's) is never written to again
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        logging.getLogger("rllib_sppo.llm.engines").info("starting the %s engine on %s", "vllm", "/m")
        logging.getLogger("rllib_sppo.llm.engines").debug("not shown")
        assert stream.getvalue() == "rllib: starting the vllm engine on /m\n"
        stream.close()


def test_quiet_console_drops_only_the_known_lines():
    """Each KNOWN_NOISE line is dropped by its logger; another warning of the same logger, or the same text from
    another logger, still shows."""
    quiet_console()
    quiet_console()  # twice: still one filter each
    samples = {
        "ray.rllib.algorithms.algorithm_config": "You are running SPPO on the new API stack! This is the new default "
                                                 "behavior for this algorithm. If you don't want ...",
        PRIVATE_LOGGERS["ray_deprecation"]: "DeprecationWarning: `RLModule(config=[RLModuleConfig object])` has been "
                                   "deprecated. Use `RLModule(observation_space=..)` instead.",
        "ray.tune.utils.util": "Install gputil for GPU system monitoring.",
        "ray.tune.trainable.trainable": "Trainable.setup took 16.534 seconds. If your trainable is slow to initialize, "
                                        "consider setting reuse_actors=True to reduce actor creation overheads.",
        "ray.tune.tune": "Wrote the latest version of all result files and experiment state to '/x' in 0.01s.",
        PRIVATE_LOGGERS["torch_triton"]: "Triton not available, find_triton_kernels = []",
        PRIVATE_LOGGERS["ray_auth_token"]:
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. ...",
        "vllm.v1.worker.cpu_worker": "CPU backend doesn't allow to use `torch.set_num_threads` after the thread "
                                     "binding, skip it.",
        "vllm.config.vllm": "Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT kernel warmup. ...",
        "vllm.platforms.cpu": "Reset SSM cache type to float32 for accelerated GDN mamba backend 'none'.",
        "vllm.engine.arg_utils": "The global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to "
                                 "False, this may affect the random state of the Python process that launched vLLM.",
        "vllm.utils.torch_utils": "OMP_NUM_THREADS=2 is set; leaving Torch threads at 2 for serving. Multi-...",
        "ray.train.torch.config": "Setting up process group for: env:// [rank=0, world_size=2]",
        "DeepSpeed": "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        PRIVATE_LOGGERS["train_storage"]: "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
    }
    assert set(samples) == {name for name, _ in KNOWN_NOISE}
    for name, message in samples.items():
        logger, seen = logging.getLogger(name), []
        assert sum(type(f).__name__ == "_DropMessage" for f in logger.filters) == 1
        handler = logging.Handler()
        handler.emit = seen.append
        logger.addHandler(handler)
        other = logging.getLogger("some.other.logger")
        other.addHandler(handler)
        try:
            logger.warning(message)
            logger.warning("Something else went wrong: %s", message)
            other.warning(message)
        finally:
            logger.removeHandler(handler)
            other.removeHandler(handler)
        assert [r.getMessage() for r in seen] == [f"Something else went wrong: {message}", message], name
    for name, message in [("vllm.v1.worker.cpu_worker", "libtcmalloc is not found in LD_PRELOAD. For best ..."),
                          ("vllm.v1.worker.cpu_worker", "libiomp is not found in LD_PRELOAD. For best ..."),
                          ("vllm.config.vllm", "Model Runner V2 requires Triton; using the V1 model runner instead."),
                          ("vllm.config.vllm", "Inductor compilation was disabled by user settings, ..."),
                          ("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected on x86 CPUs.")]:
        assert not logging.getLogger(name).filter(logging.LogRecord(name, logging.WARNING, "", 0, message, (), None))
    # The Python warnings: ignored from their own module only.
    with warnings.catch_warnings(record=True) as caught:
        for module in ("vllm.triton_utils.dispatcher", "my_module"):
            warnings.warn_explicit("`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` "
                                   "instead", FutureWarning, "dispatcher.py", 138, module=module, registry={})
    assert len(caught) == 1 and caught[0].category is FutureWarning  # the one from my_module
    texts = [f"\x1b[33mWARN: Overriding environment {name} already in registry.\x1b[0m"
             for name in ("rllib-single-agent-env-v0", "MyEnv-v0")]
    with warnings.catch_warnings(record=True) as caught:
        for text, module in [(texts[0], "gymnasium.envs.registration"), (texts[0], "my_module"),
                             (texts[1], "gymnasium.envs.registration")]:
            warnings.warn_explicit(text, UserWarning, "registration.py", 636, module=module, registry={})
    assert [str(w.message) for w in caught] == texts


SELECTOR = re.compile(r'([a-zA-Z_:][\w:]*)?\{([^}]*)\}')
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selected(selector: tuple, series: list, trial: str) -> list:
    """The scraped ``series`` ((name, {label: value})) a PromQL selector (name, label matchers) picks, ``$trial`` being
    ``trial``; Prometheus anchors its regular expressions."""
    name, body = selector
    matchers = [(k, op, v) for k, op, v in MATCHER.findall(body.replace("$trial", trial))]
    if name:
        matchers.append(("__name__", "=", name))
    ops = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, "=~": lambda a, b: re.fullmatch(b, a) is not None,
           "!~": lambda a, b: re.fullmatch(b, a) is None}
    return [(n, labels) for n, labels in series
            if all(ops[op]({"__name__": n, **labels}.get(k, ""), v) for k, op, v in matchers)]


@pytest.mark.system
def test_every_grafana_panel_queries_series_a_real_run_exports(ray_with_dashboard, tmp_path, tiny_llm_experiment):
    """SPPO's Grafana dashboard is installed beside Ray's own, and every query of every panel picks series that a real
    LLM run (held-out evaluation every iteration) exports on Ray's metrics endpoint, with the run's trial as its row.
    The run is `rllib train` in a process of its own on this Ray cluster, stopped once every query has its series
    (a trial's gauges leave the endpoint when its process ends)."""
    from rllib_sppo.grafana import FILE, PANELS, dashboard, dashboards_folder

    _, metrics = ray_with_dashboard
    path = tiny_llm_experiment("grafana", evaluation_interval=1, eval_samples_per_prompt=2)
    with open(tmp_path / "console.txt", "w") as console:
        run = subprocess.Popen([sys.executable, "-m", "rllib_sppo.cli", "train", "file", path, "--storage-path",
                                str(tmp_path / "results"), "--stop", '{"time_total_s": 300}'],
                               env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
                               cwd=Path(__file__).resolve().parents[1], stdout=console, stderr=console)
    exprs = [expr for _, _, targets in PANELS for expr, _ in targets]
    deadline, missing, series, trials = time.monotonic() + 300, exprs, [], set()
    try:
        while time.monotonic() < deadline and missing and run.poll() is None:  # the agent exports every few seconds
            time.sleep(2)
            text = urllib.request.urlopen(metrics, timeout=10).read().decode()
            series = [(f"ray_{name}", dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', tags)))
                      for name, tags, _ in SERIES.findall(text)]
            trials = {labels["trial"] for name, labels in series if labels.get("experiment") == "grafana"}
            missing = [e for e in exprs if not trials or not all(selected(s, series, sorted(trials)[0])
                                                                  for s in SELECTOR.findall(e))]
    finally:
        run.terminate()
        run.wait(timeout=60)
    assert missing == [] and len(trials) == 1, (missing, sorted({n for n, _ in series}),
                                                (tmp_path / "console.txt").read_text()[-2000:])
    installed = Path(dashboards_folder()) / FILE
    assert installed.parent.name == "dashboards" and (installed.parent / "default_grafana_dashboard.json").exists()
    assert json.loads(installed.read_text()) == dashboard()
    # The dashboard's rows repeat per trial, and each panel filters to the row's trial.
    row, *panels = dashboard()["panels"]
    assert row["repeat"] == "trial" and all('trial=~"$trial"' in t["expr"] for p in panels for t in p["targets"])


#: Ray's prefix of a line it forwards from a worker (``(SPPO(env=...; learners=0) pid=7) ``), its colours removed.
FORWARDED = re.compile(r"^\(.*? pid=\d+(, ip=[\d.]+)?\) ")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
#: A progress bar of loading weights (tqdm's: ``Loading weights: 100%|#####| 12/12 [00:00<00:00, 95.1it/s]``).
PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%( Completed)? ?\|.*\d+/\d+ \[")


#: The flagship as the README runs it, and with two DeepSpeed ZeRO-3 learners (remote learners: Ray Train's process
#: group, DeepSpeed's collectives, batches and critic logits through the object store); its held-out evaluation, the
#: same vLLM engine's as in the README's run, is left to that one.
ZERO3_LEARNERS = {"deepspeed": {"zero_stage": 3}, "num_learners": 2, "num_cpus_per_learner": 0.5,
                  "num_cpus_for_main_process": 1, "evaluation_interval": None}


@pytest.mark.system
@pytest.mark.parametrize("overrides", [{}, ZERO3_LEARNERS], ids=["readme", "deepspeed-learners"])
def test_the_flagships_console_is_the_packages_own_lines_and_kept_ones(tmp_path, overrides):
    """The README's main command for one iteration, as a user runs it (a fresh process, vLLM generating, the shipped
    tiny-arith model): every line on its console (stderr and stdout) is the package's own (what it starts, progress
    lines, the summary), a progress bar of loading weights, the JSON summary, or a line of ``KEPT_LINES``, each kept for
    a reason it gives; the warnings of vLLM, DeepSpeed and Ray a user cannot act on (``KNOWN_NOISE``,
    ``KNOWN_WARNINGS``) are not there, nor any warning of this package's own code."""
    from rllib_sppo.monitoring import KEPT_LINES

    assert all(why for _, why in KEPT_LINES)
    # A user's shell: without what vLLM engines started in this test session put into os.environ (VLLM_DIST_IDENT,
    # which a fresh vLLM then warns about as unknown).
    env = {key: value for key, value in os.environ.items() if key != "VLLM_DIST_IDENT"}
    run = subprocess.run([sys.executable, "-m", "rllib_sppo.cli", "train", "file",
                          "tuned_examples/arith_tiny_sppo.yaml", "--stop", '{"training_iteration": 1}',
                          "--storage-path", str(tmp_path / "results"), "--config", json.dumps(overrides)],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["experiment"] == "arith-tiny-sppo" and summary["training_iteration"] == 1
    lines = [FORWARDED.sub("", COLOUR.sub("", line)) for line in (run.stderr + run.stdout).splitlines()]
    lines = [line for line in lines if line.strip()]
    strays = [line for line in lines if not (line.startswith("rllib: ") or PROGRESS_BAR.match(line)
                                             or line == json.dumps(summary)
                                             or any(re.search(pattern, line) for pattern, _ in KEPT_LINES))]
    assert strays == [], "\n".join(strays)
    assert any(line.startswith("rllib: SPPO_") and " iter 1/1 | " in line for line in lines)  # the progress line
