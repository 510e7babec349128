"""Before round 1: can each device class hold one message of the app? Measured, then said (or refused).

The hosted ServerApp holds round 1's first train messages (runtime.observing_grid)
and leaves, per device class, the message for one of its devices in the
record's probe/ folder. The driver has the target run the app's ClientApp on
each of them once, in a memory group without a limit (targets.shared_fleet:
a fork of the warm zygote, as a device's ClientApp is), and reads the peak.
A device of the class needs what it holds at rest (its group's charge now,
with what it shares counted as its own) plus that peak. A class whose limit
is below it fails every message: with `memory_check: refuse` (the default)
the run stops with exit 2 and one line naming the class, what it needs and
the limit to set; with `note` it goes on and the note is in the summary.
Then the ServerApp sends round 1.

    probe/<device>.msg      the message (pickled flwr Message), written by the ServerApp
    probe/request.json      {"devices": {class: device}}, written by the ServerApp after the messages
    probe/<device>.json     what the probe measured (runtime.probe)
    probe/verdict.json      the driver's verdict; the ServerApp waits for it
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass

from flotilla.errors import UserError
from flotilla.job import MemoryCheck, format_memory

PROBE_TIMEOUT_S = 180.0  # one message of the app, on a fork of the warm process without limits
MARGIN = 0.05  # within 5% of the limit: too close to call (the note says so, the run is not refused)
MiB = 2**20


class MemoryRefused(UserError):
    """A class cannot hold one message of the app (memory_check: refuse)."""


@dataclass(frozen=True)
class ClassNeed:
    cls: str
    index: int  # in the job's devices list
    devices: int
    limit: int | None  # the smallest declared limit of the class's devices
    at_rest: int | None  # the most a device of the class holds at rest (its processes, shared ones counted)
    message: int | None  # what one message of the app adds (the probe's peak)
    message_type: str = "train"
    error: str | None = None  # the probe could not measure it

    @property
    def need(self) -> int | None:
        return None if self.at_rest is None or self.message is None else self.at_rest + self.message

    @property
    def fails(self) -> bool:
        return self.need is not None and self.limit is not None and self.need > self.limit * (1 + MARGIN)

    @property
    def close(self) -> bool:
        return (self.need is not None and self.limit is not None and not self.fails
                and self.need > self.limit * (1 - MARGIN))


def mib(n: int) -> str:
    return f"{round(n / MiB)} MiB"


def suggest(need: int) -> str:
    """A limit that holds `need` with room to spare, as a job would write it (1g, 1280m)."""
    want = need * 1.1
    if want > 2**30:
        return f"{math.ceil(want / 2**29) / 2:g}g"
    m = math.ceil(want / (128 * MiB)) * 128
    return "1g" if m == 1024 else f"{m}m"


def verdict_line(c: ClassNeed) -> str:
    if c.error or c.need is None:
        return f"{c.cls}: the memory one message of this app needs could not be measured ({c.error or 'no figure'})"
    measured = f"measured: {mib(c.at_rest)} at rest, {mib(c.message)} for one {c.message_type} message"
    head = f"{c.cls}: this app needs ~{mib(c.need)} per device ({measured})"
    if c.limit is None:
        return f"{head}; the class has no memory limit"
    limit = format_memory(c.limit)
    if c.fails:
        n = f"its {c.devices} devices" if c.devices > 1 else "its device"
        return (f"{head}, the class has {limit}: {n} will fail every message; raise devices[{c.index}].memory to "
                f"{suggest(c.need)}")
    if c.close:
        return f"{head}, the class has {limit}: close to its limit, its devices may fail some messages"
    return f"{head}, the class has {limit}"


class MemoryProbe:
    """The driver's side: run the probes the ServerApp asked for, write the verdict, refuse or note."""

    def __init__(self, job, plan, run, target, note) -> None:
        from flotilla.contracts import RecordPaths

        self.job, self.plan, self.run, self.target, self.note = job, plan, run, target, note
        self.dir = RecordPaths(run.dir).probe
        self.started: dict[str, tuple[str, object]] | None = None  # class -> (device, probe group)
        self.t0 = 0.0
        self.done = job.memory_check == MemoryCheck.OFF

    def tick(self) -> None:
        """Called by the driver's loop. Raises MemoryRefused when a class fails and the job says refuse."""
        if self.done or not (self.dir / "request.json").exists():
            return
        if (self.dir / "verdict.json").exists():  # said before this driver (a resumed run): once per run
            self.done = True
            return
        if self.started is None:
            self._start()
        finished = all((self.dir / f"{dev}.json").exists() or group is None for dev, group in self.started.values())
        if not finished and time.time() - self.t0 < PROBE_TIMEOUT_S:
            return
        self.done = True
        needs = self._needs()
        for _, group in self.started.values():
            if group is not None:
                group.destroy()
        lines = [verdict_line(c) for c in needs]
        failing = [c for c in needs if c.fails]
        refuse = bool(failing) and self.job.memory_check == MemoryCheck.REFUSE
        (self.dir / "verdict.json").write_text(json.dumps({"refused": refuse, "lines": lines}))
        for c in needs:
            if c.fails or c.close or c.error:
                if not refuse:
                    self.note(verdict_line(c))
        if refuse:
            raise MemoryRefused("memory_check: " + "; ".join(verdict_line(c) for c in failing)
                                + " (memory_check: note runs it anyway)")

    def _start(self) -> None:
        request = json.loads((self.dir / "request.json").read_text())
        self.started, self.t0 = {}, time.time()
        for cls, dev in request.get("devices", {}).items():
            try:
                group = self.target.probe_message(self.run, dev, self.dir / f"{dev}.msg", self.dir / f"{dev}.json")
            except Exception as err:  # noqa: BLE001 - not measured is said in the verdict; the run goes on
                print(f"flotilla: could not measure a message of the app on {dev}: {err}", file=sys.stderr)
                group = None
            self.started[cls] = (dev, group)

    def _needs(self) -> list[ClassNeed]:
        usage = {u["device"]: u for u in self.target.resource_usage(self.run)}
        out = []
        for idx, cls in enumerate(self.job.devices):
            if cls.name not in self.started:
                continue
            dev, group = self.started[cls.name]
            members = [d for d in self.plan.devices if d.device_class == cls.name]
            limits = [d.memory for d in members if d.memory is not None]
            rest = [usage[d.name]["memory_bytes"] for d in members if d.name in usage]
            try:
                result = json.loads((self.dir / f"{dev}.json").read_text())
            except (OSError, ValueError):
                result = {"error": "the probe did not finish" if group is not None else
                          "this target cannot run it (it needs a shared fleet with memory limits)"}
            error = result.get("error") if not result.get("peak_bytes") or not result.get("ok", True) else None
            if error and result.get("peak_bytes"):
                error = f"the app's ClientApp failed in the probe: {error}"
            out.append(ClassNeed(cls.name, idx, len(members), min(limits) if limits else None,
                                 max(rest) if rest else None, None if error else result.get("peak_bytes"),
                                 result.get("type", "train"), error))
        return out
