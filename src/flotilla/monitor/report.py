"""Self-contained HTML report of a run: runs/<id>/report/index.html plus PNG plots.

Reads only the run record (metrics.jsonl, summary.json, state.json,
devices.jsonl, usage.jsonl), so it works for every target and for runs that
failed or never finished a round.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from flotilla.runs import read_jsonl

REPORT_DIR = "report"
DPI = 100
WAIT_COLOR = "#d9d9d9"
MISSING_COLOR = "#d62728"
TRAINED = ("ok", "partial")  # statuses of a device that trained in the round (auto: partial = stopped at its deadline)


@dataclass
class _Device:
    name: str
    cls: str = "unknown"
    rounds: int = 0
    train_s: float = 0.0
    wait_s: float = 0.0
    samples: int = 0
    per_round: dict[int, dict] = field(default_factory=dict)

    @property
    def throughput(self) -> float | None:
        return self.samples / self.train_s if self.train_s > 0 else None


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _load(run_dir: Path):
    by_round = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if isinstance(r.get("round"), int):
            by_round[r["round"]] = r  # a repeated round: the last line wins
    rounds = [by_round[k] for k in sorted(by_round)]
    summary = _read_json(run_dir / "summary.json")
    state = _read_json(run_dir / "state.json")
    devices: dict[str, _Device] = {}
    for rep in read_jsonl(run_dir / "devices.jsonl"):
        if rep.get("name"):
            devices.setdefault(str(rep["name"]), _Device(str(rep["name"]), str(rep.get("class") or "unknown")))
    for r in rounds:
        round_s = _span(r.get("t_start"), r.get("t_end")) or _num(r.get("wall_s"))
        for d in r.get("devices") or []:
            name = str(d.get("name"))
            dev = devices.setdefault(name, _Device(name))
            dev.cls = str(d.get("class") or dev.cls)
            dev.per_round[r["round"]] = d
            if d.get("status", "ok") not in TRAINED:
                continue
            train = _num(d.get("train_s")) or 0.0
            dev.rounds += 1
            dev.train_s += train
            dev.samples += int(_num(d.get("samples")) or 0)
            if round_s is not None:
                dev.wait_s += max(0.0, round_s - train)
    usage = [u for u in read_jsonl(run_dir / "usage.jsonl") if u.get("device") and _num(u.get("t")) is not None]
    starts = [_num(r.get("t_start")) for r in rounds] + [_num(u["t"]) for u in usage]
    t0 = _num(summary.get("started")) or _num(state.get("created")) or min((t for t in starts if t), default=None)
    # Plot order: grouped by class so the slow class stands out as a block.
    ordered = sorted(devices.values(), key=lambda d: (d.cls, d.name))
    return rounds, summary, state, ordered, usage, t0


def _span(a, b) -> float | None:
    a, b = _num(a), _num(b)
    return b - a if a is not None and b is not None and b >= a else None


# -- plots ----------------------------------------------------------------------
def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)  # fixed margins: constrained layout costs a draw per plot
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend state, safe in threads
    return fig


def _device_colors(devices: list[_Device]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(devices) <= 10 else colormaps["tab20"]
    return {d.name: cmap(i % cmap.N) for i, d in enumerate(devices)}


def _plot_accuracy(path: Path, rounds: list[dict], t0: float) -> None:
    fig = _new_figure(8, 3.6)
    fig.subplots_adjust(left=0.09, right=0.91, top=0.83, bottom=0.14)
    ax = fig.add_subplot()
    xs = [(_num(r.get("t_end")) or t0) - t0 for r in rounds]
    acc = [_num(r.get("accuracy")) for r in rounds]
    loss = [_num(r.get("loss")) for r in rounds]
    nan = float("nan")
    ax.plot(xs, [a if a is not None else nan for a in acc], "o-", color="tab:blue", label="accuracy")
    ax.set_xlabel("seconds since run start")
    ax.set_ylabel("accuracy", color="tab:blue")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [v if v is not None else nan for v in loss], "s--", color="tab:red", label="loss")
    ax2.set_ylabel("loss", color="tab:red")
    ax.vlines(xs, 0, 1.02, colors="grey", lw=0.5, alpha=0.4)  # round markers: where each round ended
    top = ax.secondary_xaxis("top")
    top.set_xticks(xs, [f"r{r['round']}" for r in rounds], fontsize=7)
    top.tick_params(length=0)
    ax.set_title("Global model accuracy and loss", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=8)
    fig.savefig(path)


def _plot_timeline(path: Path, rounds: list[dict], devices: list[_Device], t0: float) -> None:
    from matplotlib.patches import Patch

    training = [r for r in rounds if r["round"] > 0 and _span(r.get("t_start"), r.get("t_end")) is not None]
    h = 1.5 + 0.4 * len(devices)
    fig = _new_figure(9, h)
    fig.subplots_adjust(left=1.5 / 9, right=0.98, top=1 - 0.55 / h, bottom=0.8 / h)
    ax = fig.add_subplot()
    classes = sorted({d.cls for d in devices})
    class_color = _class_colors(classes)
    any_missing = False
    for row, dev in enumerate(devices):
        # One broken_barh per kind and device: per-bar calls make this plot 10x slower.
        waiting, trained, missing = [], [], []
        for r in training:
            rs = r["t_start"] - t0
            span = (rs, r["t_end"] - r["t_start"])
            d = dev.per_round.get(r["round"])
            if d is None or d.get("status", "ok") != "ok":  # absent or failed in this round
                missing.append(span)
                continue
            waiting.append(span)
            train = _span(d.get("started"), d.get("ended"))
            if train is not None:
                trained.append((d["started"] - t0, train))
        y = (row - 0.35, 0.7)
        ax.broken_barh(waiting, y, facecolors=WAIT_COLOR)
        ax.broken_barh(trained, y, facecolors=class_color[dev.cls])
        if missing:
            any_missing = True
            ax.broken_barh(missing, y, facecolors="none", edgecolors=MISSING_COLOR, hatch="///", lw=0.5)
    # Round boundaries, labelled on a top axis rather than with one annotation each.
    starts = [r["t_start"] - t0 for r in training]
    ax.vlines(starts, -0.5, len(devices) - 0.5, colors="black", lw=0.6, alpha=0.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks(starts, [f"r{r['round']}" for r in training], fontsize=7)
    top.tick_params(length=0)
    ax.set_yticks(range(len(devices)), [f"{d.name} ({d.cls})" for d in devices], fontsize=8)
    ax.set_ylim(len(devices) - 0.4, -0.6)  # first device on top
    ax.set_xlabel("seconds since run start")
    ax.set_title("Per-device timeline: training vs waiting for the slowest device", fontsize=10)
    legend = [Patch(color=class_color[c], label=f"training ({c})") for c in classes]
    legend.append(Patch(color=WAIT_COLOR, label="waiting"))
    if any_missing:
        legend.append(Patch(facecolor="none", edgecolor=MISSING_COLOR, hatch="///", label="absent / failed"))
    fig.legend(handles=legend, loc="lower center", ncols=min(len(legend), 5), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path)


def _class_colors(classes: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["Set2"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


def _plot_training(path: Path, rounds: list[dict], devices: list[_Device]) -> None:
    fig = _new_figure(10, 3.6)
    fig.subplots_adjust(left=0.06, right=0.82, wspace=0.25, top=0.9, bottom=0.14)
    ax_t, ax_s = fig.subplots(1, 2)
    colors = _device_colors(devices)
    numbers = [r["round"] for r in rounds if r["round"] > 0]
    for dev in devices:
        ok = [(n, dev.per_round[n]) for n in numbers if n in dev.per_round
              and dev.per_round[n].get("status", "ok") == "ok"]
        xs = [n for n, _ in ok]
        ax_t.plot(xs, [_num(d.get("train_s")) or float("nan") for _, d in ok], "o-", ms=3,
                  color=colors[dev.name], label=f"{dev.name} ({dev.cls})")
        ax_s.plot(xs, [_num(d.get("throughput_sps")) or float("nan") for _, d in ok], "o-", ms=3,
                  color=colors[dev.name])
    ax_t.set(title="Train seconds per round", xlabel="round", ylabel="seconds")
    ax_s.set(title="Training throughput", xlabel="round", ylabel="samples / s")
    for ax in (ax_t, ax_s):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="upper left", bbox_to_anchor=(0.83, 0.9), fontsize=8, frameon=False)
    fig.savefig(path)


def _plot_usage(path: Path, usage: list[dict], devices: list[_Device], t0: float) -> None:
    fig = _new_figure(10, 3.6)
    fig.subplots_adjust(left=0.06, right=0.82, wspace=0.25, top=0.9, bottom=0.14)
    ax_c, ax_m = fig.subplots(1, 2)
    colors = _device_colors(devices)
    by_device: dict[str, list[dict]] = {}
    for u in usage:
        by_device.setdefault(str(u["device"]), []).append(u)
    names = [d.name for d in devices if d.name in by_device] + sorted(set(by_device) - {d.name for d in devices})
    fallback = _device_colors([_Device(n) for n in names])
    classes = {d.name: d.cls for d in devices}
    for name in names:
        samples = sorted(by_device[name], key=lambda u: u["t"])
        color = colors.get(name, fallback[name])
        xs, cores = [], []
        for a, b in pairwise(samples):
            ca, cb = _num(a.get("cpu_seconds_total")), _num(b.get("cpu_seconds_total"))
            dt = b["t"] - a["t"]
            if ca is not None and cb is not None and dt > 0:
                xs.append(b["t"] - t0)
                cores.append((cb - ca) / dt if cb >= ca else float("nan"))  # drop: process restarted
        ax_c.plot(xs, cores, color=color, lw=1.2, label=f"{name} ({classes[name]})" if name in classes else name)
        mem = [(u["t"] - t0, _num(u.get("memory_bytes"))) for u in samples]
        ax_m.plot([x for x, m in mem if m is not None], [m / 2**20 for _, m in mem if m is not None],
                  color=color, lw=1.2)
    ax_c.set(title="CPU used", xlabel="seconds since run start", ylabel="cores")
    ax_m.set(title="Memory used", xlabel="seconds since run start", ylabel="MiB")
    for ax in (ax_c, ax_m):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.legend(loc="upper left", bbox_to_anchor=(0.83, 0.9), fontsize=8, frameon=False)
    fig.savefig(path)


# -- HTML -----------------------------------------------------------------------
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
    if training and devices and t0 is not None:
        _plot_timeline(out / "timeline.png", rounds, devices, t0)
        figures.append(("timeline.png", "Per-device timeline of training and waiting in every round",
                        "Each row is a device; coloured: training, grey: waiting for the rest of the round."))
        _plot_training(out / "training.png", rounds, devices)
        figures.append(("training.png", "Per-device train seconds and throughput per round",
                        "Train seconds and samples per second of each device, per round."))
    if usage and t0 is not None:
        _plot_usage(out / "usage.png", usage, devices, t0)
        figures.append(("usage.png", "CPU cores and memory used per device over time",
                        "CPU (cores) and resident memory of each device's processes over time."))

    notices = []
    if status == "failed":
        notices.append(f'<div class="notice"><strong>This run failed.</strong> {html.escape(str(error or ""))}</div>')
    elif error:
        notices.append(f'<div class="notice">{html.escape(str(error))}</div>')
    if not training:
        notices.append('<div class="notice info">No training rounds were recorded for this run'
                       f'{" (only the initial evaluation)" if rounds else ""}.</div>')

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
                    _fmt(d.throughput, 1)] for d in devices]
    wall = _num(summary.get("wall_s"))
    meta = [f"Run <code>{html.escape(str(run_id))}</code>",
            f'status <strong class="status-{html.escape(status)}">{html.escape(status)}</strong>',
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
    parts.append("<h2>Devices</h2>")
    parts.append(_table(["Device", "Class", "Rounds", "Train s", "Waiting s", "Samples", "Samples/s"], device_rows)
                 if device_rows else "<p>No devices reported.</p>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts) + "\n")
    return index
