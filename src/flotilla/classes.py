"""A fleet seen by class: the aggregates `status`, the live view and the report show for dense fleets.

Above DENSE devices a row per device stops being readable; the views show a row per class and then the
devices worth looking at: every lost or down device, then the slowest few (lowest measured throughput).
"""

from __future__ import annotations

import math
import re
from statistics import fmean, median

DENSE = 20  # more devices than this: the views aggregate by class
SLOWEST = 10  # devices listed after the class rows (besides every lost or down one)
_SUFFIX = re.compile(r"^(.+)-\d+$")


def class_of(name: str) -> str:
    """A device's class from its name (`<class>-<n>`)."""
    m = _SUFFIX.match(name)
    return m.group(1) if m else name


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def problem(d: dict) -> str | None:
    """'lost' or 'down' for a device that is, else None."""
    return "lost" if d.get("lost") else "down" if d.get("down") else None


def worst_first(devices: list[dict], slowest: int = SLOWEST) -> list[dict]:
    """Every lost, then every down device, then the `slowest` others by throughput (unmeasured first:
    a device that never reported a throughput has not trained), ties broken by more training seconds."""
    bad = [d for d in devices if problem(d)]
    bad.sort(key=lambda d: (problem(d) != "lost", d["name"]))
    rest = [d for d in devices if not problem(d)]
    rest.sort(key=lambda d: (_num(d.get("throughput_sps")) is not None, _num(d.get("throughput_sps")) or 0.0,
                             -(_num(d.get("train_s")) or 0.0), d["name"]))
    return bad + rest[:max(0, slowest)]


def class_summary(devices: list[dict]) -> list[dict]:
    """One row per class (in the fleet's order): counts, limit ranges, throughput and training time.

    `devices`: dicts with name, class, cpus, memory, throughput_sps, train_s, lost, down."""
    groups: dict[str, list[dict]] = {}
    for d in devices:
        groups.setdefault(d.get("class") or class_of(d["name"]), []).append(d)
    rows = []
    for cls, members in groups.items():
        tps = [t for t in (_num(d.get("throughput_sps")) for d in members) if t is not None]
        cpus = [c for c in (_num(d.get("cpus")) for d in members) if c is not None]
        mem = [m for m in (_num(d.get("memory")) for d in members) if m is not None]
        lost = sum(1 for d in members if problem(d) == "lost")
        down = sum(1 for d in members if problem(d) == "down")
        measured = [d for d in members if _num(d.get("throughput_sps")) is not None]
        slowest = min(measured, key=lambda d: d["throughput_sps"], default=None)
        rows.append({
            "class": cls, "devices": len(members), "up": len(members) - lost - down, "down": down, "lost": lost,
            "cpus_min": min(cpus, default=None), "cpus_max": max(cpus, default=None),
            "memory_min": int(min(mem)) if mem else None, "memory_max": int(max(mem)) if mem else None,
            "throughput_mean_sps": round(fmean(tps), 3) if tps else None,
            "throughput_median_sps": round(median(tps), 3) if tps else None,
            "throughput_min_sps": round(min(tps), 3) if tps else None,
            "slowest_device": slowest["name"] if slowest else None,
            "train_s_total": round(sum(_num(d.get("train_s")) or 0.0 for d in members), 3),
        })
    return rows


def span(lo, hi, fmt) -> str:
    """'0.1-2' for a range, '0.5' when all equal, '-' when none."""
    if lo is None:
        return "-"
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def fmt_cpus(x: float) -> str:
    return f"{x:g}"


def fmt_mem(n) -> str:
    return f"{n / 2**30:.3g}G" if n >= 2**30 else f"{n / 2**20:.0f}M"
