"""The report's plots for a dense fleet (more than flotilla.classes.DENSE devices).

A line or a row per device stops being legible at hundreds of devices, so these
draw per class, or a row of pixels per device: a device x round heatmap, per-class
distributions of train seconds and throughput, throughput against each device's
CPU limit, and each class's total CPU and memory over time.
"""

from __future__ import annotations

from pathlib import Path

from flotilla.monitor.report.plots import MISSING_COLOR, _class_colors, _new_figure, _save_side_by_side, _side_by_side
from flotilla.monitor.report.records import TRAINED, _by_class, _Device, _num, _usage_by_device

# What kept a device out of a round, in the heatmap (a trained cell shows its train seconds).
_CELL_KINDS = [("absent", "#cfcfcf"), ("late", "#ff7f0e"), ("busy / async", "#c7c7ff"), ("failed", "#9467bd"),
               ("lost", MISSING_COLOR), ("idle", "#bdbdbd")]
_CELL_OF = {"late": 1, "busy": 2, "async": 2, "failed": 3, "lost": 4, "idle": 5}


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
    by_device = _usage_by_device(usage)
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
    fig, (ax_c, ax_m) = _side_by_side(3.8)
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
    _save_side_by_side(fig, (ax_c, ax_m), path)
