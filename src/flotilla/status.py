"""`flotilla status`: what a run is doing, read from its record (any process, any time)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from flotilla.runs import RunRecord
from flotilla.sandbox.procs import pid_alive


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
            "train_s": round(sum(x["train_s"] for x in per_round), 3),
            "lost": d["name"] in st.get("lost_devices", []),
        })
    end = st.get("ended") or time.time()
    return {
        "run_id": rec.run_id, "status": status, "target": st.get("target"), "dir": str(rec.dir),
        "round": rounds[-1]["round"] if rounds else 0, "rounds": st.get("rounds"),
        "accuracy": rounds[-1]["accuracy"] if rounds else None, "loss": rounds[-1]["loss"] if rounds else None,
        "elapsed_s": round(end - st.get("started", st.get("created", end)), 1),
        "limits_enforced": st.get("limits_enforced"), "error": st.get("error"), "devices": devices,
    }


def _mem(n) -> str:
    return f"{n / 2**20:.0f}M" if n else "-"


def show_status(console: Console, s: dict) -> None:
    acc = f"{s['accuracy']:.4f}" if s["accuracy"] is not None else "-"
    console.print(f"[bold]{s['run_id']}[/bold]  {s['status']}  target={s['target']}  round {s['round']}/{s['rounds']}"
                  f"  accuracy {acc}  elapsed {s['elapsed_s']}s  limits enforced: {s['limits_enforced']}",
                  highlight=False)
    if s.get("error"):
        console.print(f"  error: {s['error']}", highlight=False)
    t = Table()
    for col in ("device", "class", "cpus (asked/effective)", "memory (asked/effective)", "samples/s", "train s", ""):
        t.add_column(col)
    for d in s["devices"]:
        t.add_row(d["name"], d["class"], f"{d['cpus'] or '-'} / {d['effective_cpus'] or '-'}",
                  f"{_mem(d['memory'])} / {_mem(d['effective_memory'])}",
                  f"{d['throughput_sps']:.0f}" if d["throughput_sps"] else "-", f"{d['train_s']:.1f}",
                  "[red]lost[/red]" if d["lost"] else "")
    console.print(t)


def show_table(console: Console, recs: list[RunRecord]) -> None:
    t = Table()
    for col in ("run", "status", "target", "round", "accuracy"):
        t.add_column(col)
    for rec in recs:
        s = run_status(rec)
        t.add_row(s["run_id"], s["status"], str(s["target"]), f"{s['round']}/{s['rounds']}",
                  f"{s['accuracy']:.4f}" if s["accuracy"] is not None else "-")
    console.print(t)
