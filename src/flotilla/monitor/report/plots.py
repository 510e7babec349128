"""The report's matplotlib plots for a fleet small enough to draw a line or a row per device.

Also the figure and colour helpers the dense plots (dense.py) share. matplotlib
is imported inside the functions, so importing the report costs nothing until a
plot is drawn; figures use Agg without pyplot, so no global backend state.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from flotilla.monitor.report.records import _Device, _num, _span, _usage_by_device

DPI = 100
WAIT_COLOR = "#d9d9d9"
MISSING_COLOR = "#d62728"


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)  # fixed margins: constrained layout costs a draw per plot
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend state, safe in threads
    return fig


def _side_by_side(h: float):
    """A figure of two plots side by side, room on the right for the legend that _save_side_by_side draws."""
    fig = _new_figure(10, h)
    fig.subplots_adjust(left=0.06, right=0.82, wspace=0.25, top=0.9, bottom=0.14)
    return fig, fig.subplots(1, 2)


def _save_side_by_side(fig, axes, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.legend(loc="upper left", bbox_to_anchor=(0.83, 0.9), fontsize=8, frameon=False)
    fig.savefig(path)


def _label_rounds(ax, xs: list[float], rounds: list[dict]) -> None:
    """Round names (r1, r2, ...) at xs on a top axis, rather than with one annotation each."""
    top = ax.secondary_xaxis("top")
    top.set_xticks(xs, [f"r{r['round']}" for r in rounds], fontsize=7)
    top.tick_params(length=0)


def _device_colors(devices: list[_Device]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(devices) <= 10 else colormaps["tab20"]
    return {d.name: cmap(i % cmap.N) for i, d in enumerate(devices)}


def _class_colors(classes: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["Set2"] if len(classes) <= 8 else colormaps["tab20"]  # Set2 has 8 colours
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


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
    _label_rounds(ax, xs, rounds)
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
    # Round boundaries, labelled on a top axis.
    starts = [r["t_start"] - t0 for r in training]
    ax.vlines(starts, -0.5, len(devices) - 0.5, colors="black", lw=0.6, alpha=0.5)
    _label_rounds(ax, starts, training)
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


def _plot_training(path: Path, rounds: list[dict], devices: list[_Device]) -> None:
    fig, (ax_t, ax_s) = _side_by_side(3.6)
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
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save_side_by_side(fig, (ax_t, ax_s), path)


def _plot_usage(path: Path, usage: list[dict], devices: list[_Device], t0: float) -> None:
    fig, (ax_c, ax_m) = _side_by_side(3.6)
    colors = _device_colors(devices)
    by_device = _usage_by_device(usage)
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
    _save_side_by_side(fig, (ax_c, ax_m), path)
