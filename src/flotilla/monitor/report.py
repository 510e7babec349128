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
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from statistics import fmean

from flotilla.classes import DENSE, class_summary, fmt_cpus, fmt_mem, span, worst_first
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
    cpus: float | None = None  # its limits as planned (a spread's draw)
    memory: int | None = None
    lost: str | None = None  # 'lost' / 'down' at the end of the record
    why: str = ""

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
    for d in _read_json(run_dir / "plan.json").get("devices") or []:
        if isinstance(d, dict) and d.get("name"):
            devices[str(d["name"])] = _Device(str(d["name"]), str(d.get("device_class") or "unknown"),
                                              cpus=_num(d.get("cpus")), memory=_num(d.get("memory")))
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
    # A finished run's summary names every device it ended without; a running one's state tells lost
    # (for good) from down (being restarted).
    reasons = summary.get("lost_reasons") or state.get("lost_reasons") or {}
    lost = set(summary.get("lost_devices") or []) if summary else set(state.get("lost_devices") or [])
    down = set() if summary else set(state.get("down_devices") or [])
    for name, dev in devices.items():
        if name in lost or name in down:
            dev.lost, dev.why = ("lost" if name in lost else "down"), str(reasons.get(name) or "")
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

    cmap = colormaps["Set2"] if len(classes) <= 8 else colormaps["tab20"]  # Set2 has 8 colours
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


# -- dense fleets: per class, and a row of pixels per device ------------------------
# What kept a device out of a round, in the heatmap (a trained cell shows its train seconds).
_CELL_KINDS = [("absent", "#cfcfcf"), ("late", "#ff7f0e"), ("busy / async", "#c7c7ff"), ("failed", "#9467bd"),
               ("lost", MISSING_COLOR), ("idle", "#bdbdbd")]
_CELL_OF = {"late": 1, "busy": 2, "async": 2, "failed": 3, "lost": 4, "idle": 5}


def _by_class(devices: list[_Device]) -> dict[str, list[_Device]]:
    out: dict[str, list[_Device]] = {}
    for d in devices:
        out.setdefault(d.cls, []).append(d)
    return out


def _mean_train(dev: _Device) -> float:
    return dev.train_s / dev.rounds if dev.rounds else float("inf")  # never trained: the slowest


def _plot_heatmap(path: Path, rounds: list[dict], devices: list[_Device]) -> None:
    """Device x round: train seconds where a device trained, else why not; grouped by class, slowest on top."""
    import numpy as np
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    training = [r["round"] for r in rounds if r["round"] > 0]
    groups = _by_class(devices)
    rows = [d for cls in groups for d in sorted(groups[cls], key=lambda d: (-_mean_train(d), d.name))]
    vals = np.full((len(rows), len(training)), np.nan)
    kinds = np.full((len(rows), len(training)), -1)
    for i, dev in enumerate(rows):
        for j, n in enumerate(training):
            d = dev.per_round.get(n)
            status = "absent" if d is None else str(d.get("status", "ok"))
            if status in TRAINED or status == "stale":
                vals[i, j] = _num(d.get("train_s")) or 0.0
            else:
                kinds[i, j] = _CELL_OF.get(status, 0)
    n = len(rows)
    h = 1.7 + min(10.0, 0.05 * n + 1.0)
    fig = _new_figure(10, h)
    fig.subplots_adjust(left=0.14, right=0.9, top=1 - 0.45 / h, bottom=1.0 / h)
    ax = fig.add_subplot()
    extent = (-0.5, len(training) - 0.5, n - 0.5, -0.5)
    positive = vals[np.isfinite(vals) & (vals > 0)]
    # log scale: a dense fleet's train seconds span orders of magnitude, a linear one shows only its slowest
    norm = (LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
            if positive.size and positive.max() > 1.5 * positive.min() else None)
    im = ax.imshow(np.ma.masked_invalid(np.where(vals > 0, vals, np.nan) if norm else vals), aspect="auto",
                   interpolation="nearest", cmap="viridis", norm=norm, extent=extent)
    ax.imshow(np.ma.masked_less(kinds, 0), aspect="auto", interpolation="nearest", extent=extent,
              cmap=ListedColormap([c for _, c in _CELL_KINDS]), vmin=-0.5, vmax=len(_CELL_KINDS) - 0.5)
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("train seconds" + (" (log scale)" if norm else ""), fontsize=8)
    edges, centers, start = [], [], 0
    for cls in groups:
        size = len(groups[cls])
        centers.append(start + (size - 1) / 2)
        start += size
        edges.append(start - 0.5)
    ax.hlines(edges[:-1], -0.5, len(training) - 0.5, colors="white", lw=1.5)
    if n <= 60:  # a name per row is still readable
        ax.set_yticks(range(n), [d.name for d in rows], fontsize=5.5)
    else:
        ax.set_yticks(centers, [f"{cls} ({len(groups[cls])})" for cls in groups], fontsize=8)
    step = max(1, len(training) // 20)
    ax.set_xticks(range(0, len(training), step), [str(training[j]) for j in range(0, len(training), step)],
                  fontsize=7)
    ax.set_xlabel("round")
    ax.set_title(f"Every device in every round ({n} devices; by class, slowest on top)", fontsize=10)
    seen = sorted(set(kinds[kinds >= 0].tolist()))
    if seen:
        fig.legend(handles=[Patch(color=_CELL_KINDS[k][1], label=_CELL_KINDS[k][0]) for k in seen],
                   loc="lower center", ncols=len(seen), fontsize=8, frameon=False)
    fig.savefig(path)


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    import numpy as np

    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return float(p10), float(p50), float(p90)


def _plot_classes(path: Path, rounds: list[dict], devices: list[_Device]) -> None:
    """Per class: train seconds per round (median, 10th-90th percentile band) and each device's throughput."""
    import numpy as np

    groups = _by_class(devices)
    colors = _class_colors(list(groups))
    fig = _new_figure(10, 4.0)
    fig.subplots_adjust(left=0.07, right=0.98, wspace=0.22, top=0.9, bottom=0.2)
    ax_t, ax_s = fig.subplots(1, 2)
    numbers = [r["round"] for r in rounds if r["round"] > 0]
    for cls, members in groups.items():
        xs, lo, mid, hi = [], [], [], []
        for n in numbers:
            ts = [_num(d.per_round[n].get("train_s")) for d in members if n in d.per_round
                  and d.per_round[n].get("status", "ok") in TRAINED]
            ts = [t for t in ts if t is not None]
            if ts:
                a, b, c = _percentiles(ts)
                xs.append(n), lo.append(a), mid.append(b), hi.append(c)
        ax_t.plot(xs, mid, "o-", ms=3, color=colors[cls], label=f"{cls} ({len(members)})")
        ax_t.fill_between(xs, lo, hi, color=colors[cls], alpha=0.25, lw=0)
    ax_t.set(title="Train seconds per round (median, 10th-90th percentile)", xlabel="round", ylabel="seconds")
    ax_t.title.set_fontsize(9)
    ax_t.grid(alpha=0.3)
    _wide_scale(ax_t, [d.per_round[n].get("train_s") for d in devices for n in d.per_round])
    ax_t.xaxis.get_major_locator().set_params(integer=True)
    ax_t.legend(fontsize=7, ncols=2 if len(groups) > 4 else 1, loc="best", framealpha=0.8)
    rng = np.random.default_rng(0)  # jitter only: the same report every time
    data, labels = [], []
    for k, (cls, members) in enumerate(groups.items()):
        tps = [d.throughput for d in members if d.throughput is not None]
        data.append(tps or [float("nan")])
        labels.append(f"{cls}\n(n={len(members)})")
        x = k + 1 + rng.uniform(-0.18, 0.18, len(tps))
        ax_s.scatter(x, tps, s=8, color=colors[cls], alpha=0.8, lw=0, zorder=3)
        lost = [d for d in members if d.lost and d.throughput]
        if lost:
            ax_s.scatter([k + 1] * len(lost), [d.throughput for d in lost], marker="x", s=25,
                         color=MISSING_COLOR, zorder=4, label="lost / down" if not ax_s.get_legend_handles_labels()[0]
                         else None)
    ax_s.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
    ax_s.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax_s.set(title="Throughput of each device, by class", ylabel="samples / s")
    ax_s.title.set_fontsize(9)
    ax_s.grid(axis="y", alpha=0.3)
    _wide_scale(ax_s, [d.throughput for d in devices])
    if ax_s.get_legend_handles_labels()[0]:
        ax_s.legend(fontsize=7, frameon=False)
    fig.savefig(path)


def _wide_scale(ax, values) -> None:
    """A log y axis where values span more than 20x (a dense fleet's slowest and fastest), else from 0."""
    vs = [v for v in (_num(x) for x in values) if v is not None and v > 0]
    if vs and max(vs) > 20 * min(vs):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)


def _plot_limits(path: Path, devices: list[_Device]) -> None:
    """Each device's measured throughput against its CPU limit (a spread of limits shows as a cloud)."""
    groups = _by_class(devices)
    colors = _class_colors(list(groups))
    fig = _new_figure(8, 3.8)
    fig.subplots_adjust(left=0.09, right=0.78, top=0.9, bottom=0.14)
    ax = fig.add_subplot()
    for cls, members in groups.items():
        pts = [(d.cpus, d.throughput) for d in members if d.cpus is not None and d.throughput is not None]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=12, color=colors[cls], alpha=0.85, lw=0,
                   label=f"{cls} ({len(members)})")
    lost = [d for d in devices if d.lost and d.cpus is not None and d.throughput]
    if lost:
        ax.scatter([d.cpus for d in lost], [d.throughput for d in lost], marker="x", s=25,
                   color=MISSING_COLOR, label="lost / down")
    ax.set(title="Throughput against each device's CPU limit", xlabel="cpus (limit)", ylabel="samples / s")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    cpus = [d.cpus for d in devices if d.cpus is not None and d.throughput is not None]
    if max(cpus) > 20 * min(cpus):
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    _wide_scale(ax, [d.throughput for d in devices])
    fig.legend(loc="upper left", bbox_to_anchor=(0.79, 0.9), fontsize=8, frameon=False)
    fig.savefig(path)


def _or_nan(v) -> float:
    x = _num(v)
    return float("nan") if x is None else x


def _plot_usage_by_class(path: Path, usage: list[dict], devices: list[_Device], t0: float) -> None:
    """Each class's total CPU cores and memory over time (and the fleet's), in time bins: per bin, the sum over
    a class's devices of each device's mean in that bin."""
    import numpy as np

    cls_of = {d.name: d.cls for d in devices}
    by_device: dict[str, list[dict]] = {}
    for u in usage:
        by_device.setdefault(str(u["device"]), []).append(u)
    nan = float("nan")
    per_device = []  # (class, t, cores, memory bytes): arrays, one value per sample after the first
    for name, samples in by_device.items():
        samples.sort(key=lambda u: u["t"])
        t = np.array([u["t"] for u in samples], dtype=float) - t0
        cpu = np.array([_or_nan(u.get("cpu_seconds_total")) for u in samples], dtype=float)
        mem = np.array([_or_nan(u.get("memory_bytes")) for u in samples], dtype=float)
        if len(t) < 2:
            continue
        dt, dc = np.diff(t), np.diff(cpu)
        with np.errstate(divide="ignore", invalid="ignore"):
            cores = np.where((dt > 0) & (dc >= 0), dc / dt, nan)  # a drop: the process restarted
        per_device.append((cls_of.get(name, "unknown"), t[1:], cores, mem[1:], dt))
    if not per_device:
        return
    lo = min(float(t.min()) for _, t, *_ in per_device)
    hi = max(float(t.max()) for _, t, *_ in per_device)
    gaps = np.concatenate([dt[dt > 0] for *_, dt in per_device])
    width = max(1.5 * float(np.median(gaps)) if gaps.size else 1.0, (hi - lo) / 300 or 1.0)
    nbins = int((hi - lo) / width) + 1
    classes = list(_by_class(devices)) + sorted({c for c, *_ in per_device} - {d.cls for d in devices})
    totals = {c: [np.zeros(nbins), np.zeros(nbins), np.zeros(nbins, dtype=bool)] for c in classes}
    for cls, t, cores, mem, _ in per_device:
        k = ((t - lo) / width).astype(int)
        for slot, v in ((0, cores), (1, mem)):
            ok = np.isfinite(v)
            n = np.bincount(k[ok], minlength=nbins)
            sums = np.bincount(k[ok], weights=v[ok], minlength=nbins)
            seen = n > 0
            totals[cls][slot][seen] += sums[seen] / n[seen]
            totals[cls][2] |= seen
    fig = _new_figure(10, 3.8)
    fig.subplots_adjust(left=0.06, right=0.82, wspace=0.25, top=0.9, bottom=0.14)
    ax_c, ax_m = fig.subplots(1, 2)
    colors = _class_colors(classes)
    xs = lo + width * (np.arange(nbins) + 0.5)
    drawn = [c for c in classes if totals[c][2].any()]
    for cls in drawn:
        c, m, seen = totals[cls]
        ax_c.plot(xs, np.where(seen, c, nan), color=colors[cls], lw=1.2, label=cls)
        ax_m.plot(xs, np.where(seen, m / 2**30, nan), color=colors[cls], lw=1.2)
    if len(drawn) > 1:
        ax_c.plot(xs, sum(totals[c][0] for c in drawn), color="black", lw=1, ls="--", label="fleet")
        ax_m.plot(xs, sum(totals[c][1] for c in drawn) / 2**30, color="black", lw=1, ls="--")
    ax_c.set(title="CPU used by each class", xlabel="seconds since run start", ylabel="cores")
    ax_m.set(title="Memory used by each class", xlabel="seconds since run start", ylabel="GiB")
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


def _as_status_row(d: _Device) -> dict:
    return {"name": d.name, "class": d.cls, "cpus": d.cpus, "memory": d.memory, "throughput_sps": d.throughput,
            "train_s": d.train_s, "lost": d.lost == "lost", "down": d.lost == "down"}


def _worst_first(devices: list[_Device]) -> list[_Device]:
    """Lost and down devices, then the slowest (lowest throughput; never trained first)."""
    by_name = {d.name: d for d in devices}
    return [by_name[r["name"]] for r in worst_first([_as_status_row(d) for d in devices], len(devices))]


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
