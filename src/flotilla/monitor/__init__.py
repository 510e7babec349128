"""Monitoring: a Prometheus exporter, Prometheus/Grafana provisioning, and the HTML run report.

Everything here reads run records (metrics.jsonl, usage.jsonl, summary.json, ...)
and knows nothing about targets; targets only decide where the exporter runs
and which addresses Prometheus scrapes.
"""

from flotilla.monitor.dashboards import (
    DATASOURCE_UID,
    grafana_dashboard,
    grafana_dashboard_provider,
    grafana_datasource,
    prometheus_config,
    write_monitoring,
)
from flotilla.monitor.metrics import FlotillaExporter, follow_run
from flotilla.monitor.report import write_report

__all__ = [
    "DATASOURCE_UID",
    "FlotillaExporter",
    "follow_run",
    "grafana_dashboard",
    "grafana_dashboard_provider",
    "grafana_datasource",
    "prometheus_config",
    "write_monitoring",
    "write_report",
]
