"""`flotilla status`: what a run is doing, read from its record (any process, any time).

Up to DENSE devices, a row per device. Above, a row per class (devices up / down / lost, the range of
their limits, throughput, training time) and then only the devices worth a look: every lost or down one
and the slowest few (`--devices N`); `--devices all` lists every device. `--json` has both: `devices`
(every device) and `classes`.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Console
from rich.table import Table

from flotilla.classes import DENSE, SLOWEST, class_summary, fmt_cpus, fmt_mem, span, worst_first
from flotilla.runs import RunRecord
from flotilla.sandbox.procs import pid_alive


def _summary_warnings(rec: RunRecord) -> list[str]:
    """A finished run's warnings (a class that never trained), from its summary."""
    from flotilla.summary import read_json

    return list(read_json(rec.summary_path).get("warnings") or [])


def run_status(rec: RunRecord) -> dict:
    st = rec.state()
    status = st.get("status", "unknown")
    if status in ("starting", "running") and st.get("driver_pid") and not pid_alive(st["driver_pid"]):
        status = "lost"  # the driver died without writing an end state
    rounds = [r for r in rec.rounds() if r.get("round", 0) >= 1]
    caps = {c["name"]: c for c in rec.device_reports()}
    devices = []
    for d in rec.plan()["devices"]:
        per_round = [x for r in rounds for x in r.get("devices", []) if x["name"] == d["name"]]
        cap = caps.get(d["name"], {})
        devices.append({
            "name": d["name"], "class": d["device_class"], "cpus": d["cpus"], "memory": d["memory"],
            "effective_cpus": cap.get("cpus"), "effective_memory": cap.get("memory"),
            # the last measured value (rounds where a device was busy or late measure nothing)
            "throughput_sps": next((x["throughput_sps"] for x in reversed(per_round) if x.get("throughput_sps")),
                                   cap.get("throughput_sps")),
            "train_s": round(sum(x.get("train_s") or 0.0 for x in per_round), 3),
            "lost": d["name"] in st.get("lost_devices", []),
            "down": d["name"] in st.get("down_devices", []),
        })
    end = st.get("ended") or time.time()
    return {
        "run_id": rec.run_id, "status": status, "target": st.get("target"), "dir": str(rec.dir),
        "round": rounds[-1]["round"] if rounds else 0, "rounds": st.get("rounds"),
        "accuracy": rounds[-1]["accuracy"] if rounds else None, "loss": rounds[-1]["loss"] if rounds else None,
        "elapsed_s": round(end - st.get("started", st.get("created", end)), 1),
        "limits_enforced": st.get("limits_enforced"), "cpu_scale": st.get("cpu_scale", 1.0),
        "error": st.get("error"), "warnings": _summary_warnings(rec), "devices": devices,
        "classes": class_summary(devices),
    }


def _mem(n) -> str:
    return f"{n / 2**20:.0f}M" if n else "-"


def parse_devices_option(value: str) -> str | int:
    """`--devices`: 'all', 'auto' or a count of slowest devices; bad input is one line (exit 2)."""
    from flotilla.errors import UserError

    v = value.strip().lower()
    if v in ("all", "auto"):
        return v
    if v.isdigit():
        return int(v)
    raise UserError(f"--devices: {value!r} is neither 'all' nor a number of slowest devices to list")


def show_status(console: Console, s: dict, devices: str | int = "auto") -> None:
    """The run's line, then its devices: every one (up to DENSE, or devices='all'), else a row per class and
    the lost, down and `devices` slowest ones (default SLOWEST)."""
    acc = f"{s['accuracy']:.4f}" if s["accuracy"] is not None else "-"
    console.print(f"[bold]{s['run_id']}[/bold]  {s['status']}  target={s['target']}  round {s['round']}/{s['rounds']}"
                  f"  accuracy {acc}  elapsed {s['elapsed_s']}s  limits enforced: {s['limits_enforced']}"
                  + (f"  cpus scaled by {s['cpu_scale']:.3g} (local.fit_cpus)" if (s.get("cpu_scale") or 1.0) < 1 else ""),
                  highlight=False)
    if s.get("error"):
        console.print(f"  error: {s['error']}", highlight=False)
    for warning in s.get("warnings") or []:
        console.print(f"  [yellow]warning[/yellow]: {warning}", highlight=False)
    every = s["devices"]
    if devices == "all" or (devices == "auto" and len(every) <= DENSE):
        console.print(_devices_table(every))
        return
    classes = s.get("classes") or class_summary(every)
    lost, down = sum(c["lost"] for c in classes), sum(c["down"] for c in classes)
    console.print(f"{len(every)} devices in {len(classes)} classes: {len(every) - lost - down} up, {down} down, "
                  f"{lost} lost", highlight=False)
    console.print(_classes_table(classes, console.width))
    n = SLOWEST if devices == "auto" else int(devices)
    shown = worst_first(every, n)
    what = ", ".join(x for x in (f"{lost} lost" if lost else "", f"{down} down" if down else "",
                                 f"the {len(shown) - lost - down} slowest" if len(shown) > lost + down else "") if x)
    console.print(f"{what or 'no devices'} of {len(every)} devices (--devices all: every device)", highlight=False)
    if shown:
        console.print(_devices_table(shown, compact=True))


def _devices_table(devices: list[dict], compact: bool = False) -> Table:
    """A row per device; compact (the dense view's few devices): no column rules, shorter headers."""
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False) if compact else Table()
    limits = ("cpus asked/eff", "memory asked/eff") if compact else ("cpus (asked/effective)",
                                                                     "memory (asked/effective)")
    for col in ("device", "class", *limits, "samples/s", "train s", ""):
        t.add_column(col)
    for d in devices:
        t.add_row(d["name"], d["class"], f"{d['cpus'] or '-'} / {d['effective_cpus'] or '-'}",
                  f"{_mem(d['memory'])} / {_mem(d['effective_memory'])}",
                  f"{d['throughput_sps']:.0f}" if d["throughput_sps"] else "-", f"{d['train_s']:.1f}",
                  "[red]lost[/red]" if d["lost"] else "[yellow]down[/yellow]" if d.get("down") else "")
    return t


def _classes_table(classes: list[dict], width: int = 200) -> Table:
    """A row per class; under 110 columns (a pipe, a small terminal) a compact set that fits 80."""
    compact = width < 110
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    cols = (("class", "devices", "up/down/lost", "cpus", "samples/s\nmean/med", "slowest", "train s") if compact else
            ("class", "devices", "up", "down", "lost", "cpus", "memory", "samples/s mean", "median", "slowest",
             "train s"))
    for col in cols:
        t.add_column(col, justify="left" if col in ("class", "slowest") else "right", overflow="fold",
                     min_width=len(col) if col == "up/down/lost" else None)
    sps = lambda v: f"{v:.0f}" if v is not None else "-"  # noqa: E731
    for c in classes:
        lost = f"[red]{c['lost']}[/red]" if c["lost"] else "-"
        down = str(c["down"]) if c["down"] else "-"
        cpus = span(c["cpus_min"], c["cpus_max"], fmt_cpus)
        slowest = c["slowest_device"] or "-"
        if compact:
            t.add_row(c["class"], str(c["devices"]), f"{c['up']}/{down}/{lost}", cpus,
                      f"{sps(c['throughput_mean_sps'])}/{sps(c['throughput_median_sps'])}", slowest,
                      f"{c['train_s_total']:.1f}")
            continue
        t.add_row(c["class"], str(c["devices"]), str(c["up"]), down, lost, cpus,
                  span(c["memory_min"], c["memory_max"], fmt_mem), sps(c["throughput_mean_sps"]),
                  sps(c["throughput_median_sps"]),
                  f"{slowest} ({sps(c['throughput_min_sps'])})" if c["slowest_device"] else "-",
                  f"{c['train_s_total']:.1f}")
    return t


def show_table(console: Console, recs: list[RunRecord]) -> None:
    t = Table()
    for col in ("run", "status", "target", "round", "accuracy"):
        t.add_column(col)
    for rec in recs:
        s = run_status(rec)
        t.add_row(s["run_id"], s["status"], str(s["target"]), f"{s['round']}/{s['rounds']}",
                  f"{s['accuracy']:.4f}" if s["accuracy"] is not None else "-")
    console.print(t)
