"""Live terminal view of a run: a rounds bar, accuracy/loss and each device's state."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _devices_table(p) -> Table:
    t = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("device", "state", "train s", "samples/s"):
        t.add_column(col, justify="right" if col != "device" else "left")
    for name, d in sorted(p.devices.items()):
        state = d.get("state", "starting")
        color = {"running": "green", "exited": "red"}.get(state, "yellow")
        tp = d.get("throughput_sps")
        t.add_row(name, f"[{color}]{state}[/{color}]",
                  f"{d['train_s']:.1f}" if "train_s" in d else "-", f"{tp:.0f}" if tp else "-")
    return t


@contextmanager
def live_progress(console: Console):
    bar = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                   TimeElapsedColumn(), console=console)
    task = bar.add_task("rounds", total=None, metrics="")
    state = {"p": None}

    def render():
        p = state["p"]
        if p is None:
            return bar
        msg = f"[yellow]{p.message.splitlines()[0]}[/yellow]" if p.message else ""
        return Group(bar, _devices_table(p), msg)

    with Live(render(), console=console, refresh_per_second=4, transient=False) as live:
        def update(p):
            state["p"] = p
            acc = f"accuracy {p.accuracy:.4f}  loss {p.loss:.4f}" if p.accuracy is not None else "waiting for round 1"
            bar.update(task, total=p.rounds, completed=p.round, metrics=acc)
            live.update(render())

        yield update
        time.sleep(0.05)
