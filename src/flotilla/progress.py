"""Live terminal view of a run: a rounds bar, accuracy/loss and each device's state.

Above DENSE devices (flotilla.classes) a row per device would not fit a terminal: the view shows a row
per class (how many run, start, exited; median and slowest throughput), then every device that exited
(up to EXITED_SHOWN) and the SLOWEST_SHOWN slowest running ones.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from statistics import median

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flotilla.classes import DENSE, class_of

SLOWEST_SHOWN = 5
EXITED_SHOWN = 10
_COLOR = {"running": "green", "exited": "red"}


def _state(d: dict) -> str:
    state = d.get("state", "starting")
    color = _COLOR.get(state, "yellow")
    return f"[{color}]{state}[/{color}]"


def _devices_table(p) -> Table:
    if len(p.devices) > DENSE:
        return _dense_view(p)
    t = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("device", "state", "train s", "samples/s"):
        t.add_column(col, justify="right" if col != "device" else "left")
    for name, d in sorted(p.devices.items()):
        _device_row(t, name, d)
    return t


def _device_row(t: Table, name: str, d: dict) -> None:
    tp = d.get("throughput_sps")
    t.add_row(name, _state(d), f"{d['train_s']:.1f}" if d.get("train_s") is not None else "-",
              f"{tp:.0f}" if tp else "-")


def _dense_view(p) -> Table:
    """A row per class, then the exited and the slowest devices (the few worth watching)."""
    classes: dict[str, list[tuple[str, dict]]] = {}
    for name, d in p.devices.items():
        classes.setdefault(class_of(name), []).append((name, d))
    t = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("class", "devices", "running", "starting", "exited", "samples/s median", "slowest"):
        t.add_column(col, justify="left" if col in ("class", "slowest") else "right")
    for cls, members in classes.items():
        states = [d.get("state", "starting") for _, d in members]
        tps = [(d["throughput_sps"], n) for n, d in members if d.get("throughput_sps") and d.get("state") != "exited"]
        running, exited = states.count("running"), states.count("exited")
        starting = len(states) - running - exited
        t.add_row(cls, str(len(members)), str(running), str(starting) if starting else "-",
                  f"[red]{exited}[/red]" if exited else "-", f"{median(v for v, _ in tps):.0f}" if tps else "-",
                  f"{min(tps)[1]} ({min(tps)[0]:.0f})" if tps else "-")
    exited = sorted(n for n, d in p.devices.items() if d.get("state") == "exited")
    slow = sorted(((d["throughput_sps"], n) for n, d in p.devices.items()
                   if d.get("throughput_sps") and d.get("state") != "exited"))[:SLOWEST_SHOWN]
    w = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("device", "state", "train s", "samples/s"):
        w.add_column(col, justify="right" if col != "device" else "left")
    for name in exited[:EXITED_SHOWN]:
        _device_row(w, name, p.devices[name])
    for _, name in slow:
        _device_row(w, name, p.devices[name])
    more = f" (+{len(exited) - EXITED_SHOWN} more exited)" if len(exited) > EXITED_SHOWN else ""
    title = f"{len(p.devices)} devices; exited and slowest{more}"
    outer = Table.grid()
    outer.add_row(t)
    if exited or slow:
        outer.add_row(f"[dim]{title}[/dim]")
        outer.add_row(w)
    return outer


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
