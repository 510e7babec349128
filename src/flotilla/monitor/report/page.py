"""The HTML page of the report: which plots apply, the tables, and index.html itself.

The one place that knows the page's layout and wording; it draws through
plots.py (a row or line per device) or dense.py (per class), whichever suits the
fleet's size, and takes every number from records.py.
"""

from __future__ import annotations

import html
from pathlib import Path
from statistics import fmean

from flotilla.classes import DENSE, class_summary, fmt_cpus, fmt_mem, span
from flotilla.monitor.report.dense import _plot_classes, _plot_heatmap, _plot_limits, _plot_usage_by_class
from flotilla.monitor.report.plots import _plot_accuracy, _plot_timeline, _plot_training, _plot_usage
from flotilla.monitor.report.records import _as_status_row, _by_class, _load, _num, _worst_first

REPORT_DIR = "report"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1060px;
padding:0 1rem;color:#222}
h1{margin-bottom:.2rem} .meta{color:#555;margin-top:0}
.status-completed{color:#1a7f37} .status-failed{color:#cf222e} .status-stopped{color:#9a6700}
.notice{border-left:4px solid #cf222e;background:#fff5f5;padding:.6rem 1rem;margin:1rem 0}
.notice.info{border-color:#888;background:#f6f8fa}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border-bottom:1px solid #ddd;padding:.25rem .7rem;text-align:right}
th:first-child,td:first-child{text-align:left}
figure{margin:1rem 0} img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9rem}
"""

# Marks <body data-images-loaded="all"> once every plot decoded (checked by the headless-browser test).
_JS = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images-loaded",
    broken.length ? "missing:" + broken.map(function (i) { return i.getAttribute("src"); }).join(",") : "all");
});
"""


def _fmt(v, digits: int = 2, pct: bool = False) -> str:
    v = _num(v)
    if v is None:
        return "–"
    return f"{v * 100:.{digits}f}%" if pct else f"{v:,.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report/index.html and its PNG plots; return the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass a runs/<run-id> directory")
    rounds, summary, state, devices, usage, t0 = _load(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # a plot that no longer applies must not linger
        old.unlink()

    run_id = summary.get("run_id") or run_dir.name
    status = str(summary.get("status") or state.get("status") or "unknown")
    error = summary.get("error") or state.get("error")
    training = [r for r in rounds if r["round"] > 0]
    final_acc = summary.get("final_accuracy")
    if _num(final_acc) is None and rounds:
        final_acc = rounds[-1].get("accuracy")

    figures: list[tuple[str, str, str]] = []  # (file, alt text, caption)
    if t0 is not None and any(_num(r.get("accuracy")) is not None for r in rounds):
        _plot_accuracy(out / "accuracy_loss.png", rounds, t0)
        figures.append(("accuracy_loss.png", "Accuracy and loss of the global model against seconds since start",
                        "Accuracy (left axis) and loss (right axis) of the global model; one marker per round."))
    dense = len(devices) > DENSE
    if training and devices and t0 is not None and not dense:
        _plot_timeline(out / "timeline.png", rounds, devices, t0)
        figures.append(("timeline.png", "Per-device timeline of training and waiting in every round",
                        "Each row is a device; coloured: training, grey: waiting for the rest of the round."))
        _plot_training(out / "training.png", rounds, devices)
        figures.append(("training.png", "Per-device train seconds and throughput per round",
                        "Train seconds and samples per second of each device, per round."))
    if training and dense:
        _plot_heatmap(out / "rounds_heatmap.png", rounds, devices)
        figures.append(("rounds_heatmap.png", "Heatmap of every device in every round: train seconds or why not",
                        "A row per device (grouped by class, slowest first), a column per round: its train "
                        "seconds, or what kept it out of the round."))
        _plot_classes(out / "classes.png", rounds, devices)
        figures.append(("classes.png", "Per-class train seconds per round and per-device throughput by class",
                        "Left: each class's median train seconds per round, the band its 10th-90th percentile. "
                        "Right: each device's throughput (a dot), by class."))
        if len({d.cpus for d in devices if d.cpus is not None and d.throughput is not None}) > 1:
            _plot_limits(out / "limits.png", devices)
            figures.append(("limits.png", "Each device's throughput against its CPU limit",
                            "A dot per device: its measured throughput against its CPU limit (lost: x)."))
    if usage and t0 is not None and not dense:
        _plot_usage(out / "usage.png", usage, devices, t0)
        figures.append(("usage.png", "CPU cores and memory used per device over time",
                        "CPU (cores) and resident memory of each device's processes over time."))
    if usage and t0 is not None and dense:
        _plot_usage_by_class(out / "usage_by_class.png", usage, devices, t0)
        if (out / "usage_by_class.png").exists():
            figures.append(("usage_by_class.png", "Total CPU cores and memory used by each class over time",
                            "CPU (cores) and resident memory of each class's devices together (dashed: the "
                            "fleet), over time."))

    notices = []
    if status == "failed":
        notices.append(f'<div class="notice"><strong>This run failed.</strong> {html.escape(str(error or ""))}</div>')
    elif error:
        notices.append(f'<div class="notice">{html.escape(str(error))}</div>')
    if not training:
        notices.append('<div class="notice info">No training rounds were recorded for this run'
                       f'{" (only the initial evaluation)" if rounds else ""}.</div>')
    for warning in summary.get("warnings") or []:  # a whole class of the fleet never trained
        notices.append(f'<div class="notice"><strong>Degraded:</strong> {html.escape(str(warning))}</div>')
    for note in summary.get("notes") or []:  # what `flotilla run` printed as notes (e.g. limits that cannot hold)
        notices.append(f'<div class="notice info">Note: {html.escape(str(note))}</div>')

    round_rows = []
    for r in rounds:
        ok = [d for d in r.get("devices") or [] if d.get("status", "ok") == "ok"]
        slowest = max(ok, key=lambda d: _num(d.get("train_s")) or 0.0, default=None)
        round_rows.append([
            str(r["round"]), _fmt(r.get("accuracy"), pct=True), _fmt(r.get("loss"), 4), _fmt(r.get("wall_s")),
            str(len(ok)), str(r.get("failures", 0)),
            f"{slowest['name']} ({_fmt(slowest.get('train_s'))} s)" if slowest else "–",
        ])
    device_rows = [[d.name, d.cls, str(d.rounds), _fmt(d.train_s), _fmt(d.wait_s), f"{d.samples:,}",
                    _fmt(d.throughput, 1), fmt_cpus(d.cpus) if d.cpus is not None else "–",
                    fmt_mem(d.memory) if d.memory is not None else "–",
                    f"{d.lost}: {d.why}" if d.lost and d.why else d.lost or ""] for d in _worst_first(devices)]
    class_rows = []
    if dense:
        waits = _by_class(devices)
        for c in class_summary([_as_status_row(d) for d in devices]):
            members = waits[c["class"]]
            class_rows.append([
                c["class"], str(c["devices"]), str(c["lost"] + c["down"]), span(c["cpus_min"], c["cpus_max"], fmt_cpus),
                span(c["memory_min"], c["memory_max"], fmt_mem), _fmt(c["throughput_mean_sps"], 1),
                _fmt(c["throughput_median_sps"], 1),
                f"{c['slowest_device']} ({_fmt(c['throughput_min_sps'], 1)})" if c["slowest_device"] else "–",
                _fmt(c["train_s_total"]), _fmt(fmean([d.wait_s for d in members]))])
    wall = _num(summary.get("wall_s"))
    meta = [f"Run <code>{html.escape(str(run_id))}</code>",
            f'status <strong class="status-{"stopped" if summary.get("degraded") else html.escape(status)}">'
            f'{html.escape(status)}{", degraded" if summary.get("degraded") else ""}</strong>',
            f"final accuracy <strong>{_fmt(final_acc, pct=True)}</strong>",
            f"{len(training)} training round{'s' if len(training) != 1 else ''}"]
    if summary.get("target"):
        meta.append(f"target {html.escape(str(summary['target']))}")
    if wall is not None:
        meta.append(f"wall time {wall:.1f} s")

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Flotilla report: {html.escape(str(run_id))}</title>",
        f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
        "<h1>Flotilla run report</h1>", f'<p class="meta">{" · ".join(meta)}</p>', *notices,
    ]
    for file, alt, caption in figures:
        parts.append(f'<figure><img src="{file}" alt="{html.escape(alt)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Rounds</h2>")
    parts.append(_table(["Round", "Accuracy", "Loss", "Wall s", "Devices", "Failures", "Slowest device"], round_rows)
                 if round_rows else "<p>No rounds recorded.</p>")
    if class_rows:
        parts.append("<h2>Classes</h2>")
        parts.append(_table(["Class", "Devices", "Lost", "CPUs", "Memory", "Samples/s mean", "Median", "Slowest",
                             "Train s", "Waiting s (mean)"], class_rows))
    parts.append("<h2>Devices</h2>")
    if device_rows and dense:
        parts.append("<p>Lost devices first, then the slowest.</p>")
    parts.append(_table(["Device", "Class", "Rounds", "Train s", "Waiting s", "Samples", "Samples/s", "CPUs",
                         "Memory", "Lost"], device_rows)
                 if device_rows else "<p>No devices reported.</p>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts) + "\n")
    return index
