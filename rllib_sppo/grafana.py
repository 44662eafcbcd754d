"""SPPO's Grafana dashboard: its panels over the series ``monitoring.PrometheusExport`` exports, one row per trial.

Ray's dashboard draws its Metrics view through Grafana, which loads every dashboard in the folder Ray writes its own
into (``<session>/metrics/grafana/dashboards``, or ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR``), with the Prometheus
data source Ray provisions beside it. ``install_dashboard`` writes ``sppo_grafana_dashboard.json`` there (``rllib
train`` does, on the machine of the cluster's head node); ``dashboard()`` is the JSON, to import by hand elsewhere.
"""

from __future__ import annotations

import json
import os

UID = "rllibSppo"
FILE = "sppo_grafana_dashboard.json"
TRIAL = 'trial=~"$trial"'

#: (title, unit, [(PromQL, legend)]): the panels of a trial's row, each series filtered to the row's trial.
PANELS = (
    ("held-out accuracy (avg@k, pass@k)", "percentunit",
     [(f'{{__name__=~"ray_sppo_accuracy_.+", source="evaluation/env_runners", {TRIAL}}}', "{{__name__}}")]),
    ("reward", "short",
     [(f'ray_sppo_episode_return_mean{{source="env_runners", {TRIAL}}}', "training outcome mean"),
      (f'{{__name__=~"ray_sppo_reward_avg_at_.+", source="evaluation/env_runners", {TRIAL}}}', "held-out {{__name__}}")]),
    ("critic calibration (held-out)", "short",
     [(f'{{__name__=~"ray_sppo_critic_heldout_(brier|ece|auroc|spearman)", {TRIAL}}}', "{{__name__}}"),
      (f'ray_sppo_critic_abs_error_mean{{{TRIAL}}}', "training |R - p|")]),
    ("rollout tokens/s", "short", [(f'ray_sppo_rollout_tokens_per_s{{{TRIAL}}}', "tokens/s")]),
    ("seconds per phase of the iteration", "s",
     [(f'{{__name__=~"ray_sppo_timing_s_.+", source="algorithm", {TRIAL}}}', "{{__name__}}")]),
    ("weight sync seconds", "s",
     [(f'ray_sppo_timing_s_weight_sync{{source="algorithm", {TRIAL}}}', "learner to runners"),
      (f'ray_sppo_timing_s_weight_sync{{source="env_runners", {TRIAL}}}', "loading into the engine")]),
    ("EnvRunner restarts", "short",
     [(f'ray_sppo_fault_tolerance_num_remote_worker_restarts{{{TRIAL}}}', "restarts"),
      (f'ray_sppo_fault_tolerance_num_healthy_workers{{{TRIAL}}}', "healthy remote runners")]),
)


def _variable(name: str, query: str) -> dict:
    return {"name": name, "label": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "definition": query, "query": {"query": query, "refId": name}, "refresh": 2, "includeAll": True,
            "multi": True, "allValue": ".+", "current": {"text": ["All"], "value": ["$__all"]}, "sort": 1}


def dashboard() -> dict:
    """The dashboard: variables ``experiment`` and ``trial`` (from the series' tags), then a row per trial (repeated
    by ``trial``) of ``PANELS``, three to a line."""
    panels = [{"type": "row", "id": 1, "title": "trial $trial", "repeat": "trial", "collapsed": False,
               "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}, "panels": []}]
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "type": "timeseries", "id": i + 2, "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": 1 + 8 * (i // 3)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + j)}
                        for j, (expr, legend) in enumerate(targets)]})
    return {
        "uid": UID, "title": "SPPO", "tags": ["rllib-sppo"], "editable": True, "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "panels": panels,
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 2,
             "current": {"selected": False}},
            _variable("experiment", "label_values(ray_sppo_episode_return_mean, experiment)"),
            _variable("trial", 'label_values(ray_sppo_episode_return_mean{experiment=~"$experiment"}, trial)'),
        ]},
    }


def dashboards_folder() -> str | None:
    """Where Grafana, set up by this Ray session's dashboard, loads dashboards from; None if no dashboard runs on
    this machine (the folder is the head node's)."""
    from rllib_sppo.private_api import ray_session_dir

    folder = os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR") or os.path.join(
        ray_session_dir(), "metrics", "grafana", "dashboards")
    return folder if os.path.isdir(folder) else None


def install_dashboard() -> str | None:
    """Writes the dashboard beside Ray's own (``dashboards_folder``); its path, or None where there is none."""
    folder = dashboards_folder()
    if folder is None:
        return None
    path = os.path.join(folder, FILE)
    with open(path, "w") as f:
        json.dump(dashboard(), f, indent=1)
    return path
