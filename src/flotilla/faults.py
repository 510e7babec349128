"""Fault injection, for tests and demos: a job's `faults:` schedule, and `flotilla fault RUN ...` by hand.

Each fault kills (SIGKILL) or pauses (SIGSTOP, a hang) a device, the
SuperLink or the ServerApp, at a round's start or some seconds after round 1
started; a pause can end after `for_s`. The target does it (Target.inject:
process groups on local, the Docker engine on compose). Every injection goes
to faults.jsonl with its time, so detection and recovery can be measured
against recovery.jsonl (bench/faults.py).
"""

from __future__ import annotations

import time

from flotilla.contracts import RecordPaths
from flotilla.errors import UserError
from flotilla.runs import RunRecord, append_jsonl, read_jsonl

FAULTS_FILE = "faults.jsonl"


class FaultError(UserError):
    pass


def inject(target, run: RunRecord, action: str, process: str, source: str = "manual") -> dict:
    """Do it now; returns the faults.jsonl record."""
    if action not in ("kill", "pause", "resume"):
        raise FaultError(f"fault: {action!r} is not kill, pause or resume")
    if not hasattr(target, "inject"):
        raise FaultError(f"target {target.name!r} cannot inject faults")
    what = target.inject(run, action, process)
    rec = {"t": time.time(), "action": action, "process": process, "source": source, "what": what,
           "round": _current_round(run)}
    append_jsonl(run.dir / FAULTS_FILE, rec)
    return rec


class FaultSchedule:
    """The job's faults, applied by the driver's follow loop (like the throttle schedule)."""

    def __init__(self, run: RunRecord, faults: list, target) -> None:
        self.run, self.target = run, target
        done = {rec.get("source") for rec in read_jsonl(run.dir / FAULTS_FILE)}  # a resumed run: not again
        self.pending = [(i, f) for i, f in enumerate(faults) if f"faults[{i}]" not in done]
        self.resumes: list[tuple[float, str]] = []  # (when, process) for pauses with for_s

    def tick(self) -> list[dict]:
        out = []
        starts = read_jsonl(RecordPaths(self.run.dir).round_starts)
        if not starts:
            return out
        t0 = starts[0]["t_start"]
        current = max(s["round"] for s in starts)
        now = time.time()
        for i, f in list(self.pending):
            due = (f.at_round is not None and current >= f.at_round) or (f.at_s is not None and now - t0 >= f.at_s)
            if not due:
                continue
            self.pending.remove((i, f))
            try:
                out.append(inject(self.target, self.run, f.action, f.process, source=f"faults[{i}]"))
            except Exception as err:  # noqa: BLE001 - a fault that cannot be injected is recorded, not fatal
                rec = {"t": now, "action": f.action, "process": f.process, "source": f"faults[{i}]",
                       "error": str(err)}
                append_jsonl(self.run.dir / FAULTS_FILE, rec)
                out.append(rec)
                continue
            if f.action == "pause" and f.for_s:
                self.resumes.append((now + f.for_s, f.process))
        for when, process in list(self.resumes):
            if now >= when:
                self.resumes.remove((when, process))
                try:
                    out.append(inject(self.target, self.run, "resume", process, source="faults (for_s)"))
                except Exception:  # noqa: BLE001 - it may have been stopped and restarted meanwhile
                    pass
        return out


def _current_round(run: RunRecord) -> int:
    starts = read_jsonl(RecordPaths(run.dir).round_starts)
    return max((s["round"] for s in starts), default=0)
