"""Prometheus and Grafana provisioning for a run: the files users otherwise write by hand.

The dashboard works for every target: CPU and memory panels query both
cAdvisor's container series (container targets) and the exporter's
flotilla_device_* usage series (local target); whichever exists shows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DATASOURCE_UID = "flotilla-prom"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
GRAFANA_DASHBOARDS_PATH = "/var/lib/grafana/dashboards"  # where the compose/k8s targets mount grafana/dashboards
_HOST_PORT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")
_DURATION = re.compile(r"^\d+(ms|s|m|h)$")


def prometheus_config(scrape_targets: dict[str, list[str]], cadvisor: str | None = None, interval: str = "5s") -> str:
    """prometheus.yml scraping each job's host:port list (and cAdvisor, if given)."""
    if not _DURATION.match(interval):
        raise ValueError(f"interval: {interval!r} is not a Prometheus duration such as 5s or 1m")
    jobs = dict(scrape_targets)
    if cadvisor:
        if "cadvisor" in jobs:
            raise ValueError("scrape_targets: the job name 'cadvisor' is reserved for the cadvisor address")
        jobs["cadvisor"] = [cadvisor]
    scrape_configs = []
    for job, targets in jobs.items():
        if isinstance(targets, str):
            raise TypeError(f"scrape_targets[{job!r}]: give a list of host:port strings, not one string")
        for t in targets:
            if not _HOST_PORT.match(t):
                raise ValueError(f"scrape_targets[{job!r}]: {t!r} is not host:port")
        scrape_configs.append({"job_name": job, "static_configs": [{"targets": list(targets)}]})
    doc = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": scrape_configs,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def grafana_datasource(prometheus_url: str) -> str:
    """Grafana datasource provisioning with the fixed uid every dashboard panel refers to."""
    doc = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus (Flotilla)",
                "uid": DATASOURCE_UID,
                "type": "prometheus",
                "access": "proxy",
                "url": prometheus_url,
                "isDefault": True,
                "editable": False,
                # Lets $__rate_interval span at least a few scrapes.
                "jsonData": {"timeInterval": "5s"},
            }
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def grafana_dashboard_provider(path: str = GRAFANA_DASHBOARDS_PATH) -> str:
    """Grafana dashboard provisioning: load every dashboard JSON under `path` (as Grafana sees it)."""
    doc = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "flotilla",
                "orgId": 1,
                "folder": "Flotilla",
                "type": "file",
                "disableDeletion": False,
                "updateIntervalSeconds": 10,
                "allowUiUpdates": True,
                "options": {"path": path, "foldersFromFilesStructure": False},
            }
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _promql_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid PromQL double-quoted string


def _target(ref: str, expr: str, legend: str) -> dict:
    return {"datasource": DATASOURCE, "refId": ref, "expr": expr, "legendFormat": legend, "range": True}


def _panel(title: str, kind: str, targets: list[tuple[str, str]], grid: tuple[int, int, int, int],
           unit: str = "short", description: str = "") -> dict:
    x, y, w, h = grid
    return {
        "title": title,
        "type": kind,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [_target(chr(ord("A") + i), expr, legend) for i, (expr, legend) in enumerate(targets)],
    }


def grafana_dashboard(job_name: str) -> dict:
    """Dashboard JSON for the runs of one job (Grafana schema 39)."""
    run = 'run=~"$run"'
    cont = 'name=~"$container"'
    dev = "{{device}} ({{device_class}})"
    ts = "timeseries"
    panels = [
        _panel("Round", "stat", [
            (f"max by (run) (flotilla_round{{{run}}})", "{{run}} round"),
            (f"max by (run) (flotilla_rounds_target{{{run}}})", "{{run}} of"),
        ], (0, 0, 6, 5), description="Last finished round and the rounds configured."),
        _panel("Global accuracy", "stat", [
            (f"flotilla_global_accuracy_ratio{{{run}}}", "{{run}}"),
        ], (6, 0, 6, 5), unit="percentunit"),
        _panel("Device failures", "bargauge", [
            (f"sum by (device) (flotilla_device_failures_total{{{run}}})", "{{device}}"),
            (f"sum by (run) (flotilla_round_failures_total{{{run}}})", "server-counted ({{run}})"),
        ], (12, 0, 12, 5), description="Failures per device by the driver, and failed replies counted by the server."),
        _panel("Accuracy per round", ts, [
            (f"flotilla_global_accuracy_ratio{{{run}}}", "{{run}}"),
        ], (0, 5, 12, 8), unit="percentunit"),
        _panel("Loss per round", ts, [
            (f"flotilla_global_loss{{{run}}}", "{{run}}"),
        ], (12, 5, 12, 8)),
        _panel("Round duration", ts, [
            (f"flotilla_last_round_duration_seconds{{{run}}}", "last round ({{run}})"),
            (f"flotilla_round_duration_seconds_sum{{{run}}} / flotilla_round_duration_seconds_count{{{run}}}",
             "mean ({{run}})"),
        ], (0, 13, 12, 8), unit="s"),
        _panel("Train seconds per device (last round)", ts, [
            (f"flotilla_device_round_train_seconds{{{run}}}", dev),
        ], (12, 13, 12, 8), unit="s", description="The slowest device sets the round time: the straggler."),
        _panel("Throughput per device (samples/s)", ts, [
            (f"flotilla_device_throughput_samples_per_second{{{run}}}", dev),
        ], (0, 21, 12, 8), description="Training samples per second in the device's last round."),
        _panel("Samples trained per device", "bargauge", [
            (f"flotilla_device_samples_total{{{run}}}", dev),
        ], (12, 21, 12, 8)),
        _panel("CPU per device (cores)", ts, [
            (f"sum by (name) (rate(container_cpu_usage_seconds_total{{{cont}}}[$__rate_interval]))",
             "{{name}} (container)"),
            (f"rate(flotilla_device_cpu_seconds_total{{{run}}}[$__rate_interval])", dev),
            (f"flotilla_device_cpu_quota_cores{{{run}}}", "{{device}} quota"),
        ], (0, 29, 12, 8), description="cAdvisor containers (container targets) and device processes (local)."),
        _panel("Memory per device", ts, [
            (f"sum by (name) (container_memory_usage_bytes{{{cont}}})", "{{name}} (container)"),
            (f"flotilla_device_memory_bytes{{{run}}}", dev),
            (f"flotilla_device_memory_limit_bytes{{{run}}}", "{{device}} limit"),
        ], (12, 29, 12, 8), unit="bytes",
            description="cAdvisor containers (container targets) and device processes (local)."),
    ]
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    job = _promql_string(job_name)
    templating = [
        {
            "name": "run",
            "label": "Run",
            "type": "query",
            "datasource": DATASOURCE,
            "definition": f"label_values(flotilla_run_info{{flotilla_job={job}}}, run)",
            "query": {"query": f"label_values(flotilla_run_info{{flotilla_job={job}}}, run)", "refId": "run"},
            "refresh": 2,  # on time range change: new runs show up
            "sort": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".+",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        },
        {
            "name": "container",
            "label": "Containers (regex)",
            "type": "textbox",
            "query": ".+",
            "current": {"text": ".+", "value": ".+"},
            "description": "cAdvisor container names to show in the CPU and memory panels.",
        },
    ]
    slug = re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-") or "job"
    return {
        "uid": f"flotilla-{slug}"[:40],
        "title": f"Flotilla: {job_name}",
        "tags": ["flotilla", "federated-learning"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": templating},
        "annotations": {"list": []},
        "panels": panels,
    }


def write_monitoring(
    out_dir: str | Path,
    scrape_targets: dict[str, list[str]],
    cadvisor: str | None = None,
    *,
    job_name: str | None = None,
    prometheus_url: str = "http://prometheus:9090",
    dashboards_path: str = GRAFANA_DASHBOARDS_PATH,
    interval: str = "5s",
) -> list[Path]:
    """Write Prometheus config and Grafana provisioning under out_dir; return the paths.

    Mount out_dir/prometheus/prometheus.yml at /etc/prometheus/prometheus.yml,
    out_dir/grafana/provisioning at /etc/grafana/provisioning and
    out_dir/grafana/dashboards at `dashboards_path`.
    """
    out = Path(out_dir)
    job_name = job_name or next(iter(scrape_targets), "flotilla")
    files = {
        out / "prometheus" / "prometheus.yml": prometheus_config(scrape_targets, cadvisor, interval),
        out / "grafana" / "provisioning" / "datasources" / "datasource.yml": grafana_datasource(prometheus_url),
        out / "grafana" / "provisioning" / "dashboards" / "dashboards.yml": grafana_dashboard_provider(dashboards_path),
        out / "grafana" / "dashboards" / "flotilla.json": json.dumps(grafana_dashboard(job_name), indent=2) + "\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
