"""Self-contained HTML report of a run: runs/<id>/report/index.html plus PNG plots.

Reads only the run record (metrics.jsonl, summary.json, state.json, plan.json,
devices.jsonl, usage.jsonl), so it works for every target and for runs that
failed or never finished a round.

Up to DENSE devices (flotilla.classes) the plots draw a line or a row per
device. A dense fleet gets plots that stay legible at hundreds of devices: a
device x round heatmap (train seconds, or what kept a device out of a round),
per-class distributions of train seconds and throughput, throughput against
each device's CPU limit, and each class's total CPU and memory over time; and
a table per class. The device table lists lost devices first, then the
slowest.

A package so that each piece stays small: records.py reads the record, plots.py
and dense.py draw, page.py writes the page. Import from here.
"""

from flotilla.monitor.report.page import REPORT_DIR, write_report
from flotilla.monitor.report.plots import DPI, MISSING_COLOR, WAIT_COLOR
from flotilla.monitor.report.records import TRAINED

__all__ = ["DPI", "MISSING_COLOR", "REPORT_DIR", "TRAINED", "WAIT_COLOR", "write_report"]
