"""Live throttling: change a running device's CPU quota or memory limit by rewriting its cgroup.

Two ways in:
- the job's `heterogeneity.throttle` schedule: `Throttler(run).tick()`, called
  by the driver's follow loop every ~0.25 s, applies each step once when it
  is due (`at_s` seconds after round 1 starts, or when round `at_round` starts);
- by hand: `throttle_now(run, device, cpus=..., memory=...)`, behind
  `flotilla throttle RUN DEVICE --cpus X [--memory M]`.

Every change is appended to the run's throttle.jsonl with the limits read
back from the kernel: {"t", "device", "cpus", "memory", "source":
schedule|manual, "round", "applied": {"cpus", "memory"}} (plus "step" for
schedule steps, "error" when it could not be applied). A schedule step is
applied at most once per run, also across a restarted driver: the file is
the record of what was done.

Only runs whose devices have cgroups (the local target with limits
enforced) can be throttled; the state file's "cgroups" says which.
"""

from __future__ import annotations

import os
import sys
import time

import yaml

from flotilla.errors import UserError
from flotilla.job import JobError, ThrottleStep, parse_job, parse_memory
from flotilla.runs import JsonlTail, RunRecord, append_jsonl, read_jsonl

THROTTLE_FILE = "throttle.jsonl"
ROUND_STARTS_FILE = "round_starts.jsonl"  # written by the ServerApp as each round begins


class ThrottleError(UserError):
    """A throttle that cannot be done; the message is one line saying why and what to do."""


def step_due(step: ThrottleStep, now: float, t_round1: float | None, started: int, completed: int) -> bool:
    """Whether a schedule step should be in force now.

    at_s counts from the start of round 1. at_round k is due once round k has
    started, or as soon as round k-1 is complete (so the new limit holds from
    the start of round k rather than one poll into it).
    """
    if step.at_s is not None:
        return t_round1 is not None and now >= t_round1 + step.at_s
    return started >= step.at_round or completed >= step.at_round - 1


def _job_steps(run: RunRecord) -> list[ThrottleStep]:
    try:
        doc = yaml.safe_load((run.dir / "job.yaml").read_text())
        return list(parse_job(doc, str(run.dir / "job.yaml")).heterogeneity.throttle)
    except (OSError, yaml.YAMLError, JobError):
        return []


class Throttler:
    """Applies a run's throttle schedule as the run goes; `tick()` is cheap when nothing is due."""

    def __init__(self, run: RunRecord, steps: list[ThrottleStep] | None = None) -> None:
        self.run = run
        self.steps = list(_job_steps(run) if steps is None else steps)
        self.path = run.dir / THROTTLE_FILE
        self._log = JsonlTail(self.path)  # steps another Throttler (another process) already applied
        self.done: set[int] = set()
        self._read_log()
        self._starts = JsonlTail(run.dir / ROUND_STARTS_FILE)
        self._metrics = JsonlTail(run.metrics_path)
        self.t_round1: float | None = None
        self.started = 0  # highest round known to have started
        self.completed = -1  # highest round in metrics.jsonl (0: the initial evaluation)
        self._warned = False

    @property
    def pending(self) -> list[int]:
        return [i for i in range(len(self.steps)) if i not in self.done]

    def tick(self, now: float | None = None) -> list[dict]:
        """Apply the steps that are due; returns the records written (usually none). Never raises:
        a throttle that cannot be applied is recorded and reported, and the run goes on."""
        if not self.pending:
            return []
        try:
            return self._tick(now)
        except Exception as err:  # noqa: BLE001 - the driver's follow loop must not die of a throttle
            if not self._warned:
                self._warned = True
                print(f"flotilla: throttle schedule: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return []

    def _tick(self, now: float | None) -> list[dict]:
        self._refresh()
        now = time.time() if now is None else now
        due = [i for i in self.pending if step_due(self.steps[i], now, self.t_round1, self.started, self.completed)]
        if due:
            self._read_log()
        return [self._apply(i, now) for i in due if i not in self.done]

    def _read_log(self) -> None:
        self.done |= {r["step"] for r in self._log.read_new() if r.get("source") == "schedule" and "step" in r}

    def _refresh(self) -> None:
        for r in self._starts.read_new():
            rnd = int(r.get("round", 0))
            self.started = max(self.started, rnd)
            if rnd == 1:
                self.t_round1 = float(r["t_start"])
        for r in self._metrics.read_new():
            rnd = int(r.get("round", 0))
            self.completed = max(self.completed, rnd)
            if rnd == 1 and self.t_round1 is None:  # a ServerApp that does not write round starts
                self.t_round1 = float(r["t_start"])

    def _apply(self, i: int, now: float) -> dict:
        step = self.steps[i]
        rec = {"t": now, "device": step.device, "cpus": step.cpus, "memory": step.memory, "source": "schedule",
               "step": i, "round": self.started}
        try:
            rec["applied"] = set_device_limits(self.run, step.device, step.cpus, step.memory)
        except ThrottleError as err:
            rec["error"] = str(err)
            print(f"flotilla: throttle schedule step {i} ({step.device}): {err}", file=sys.stderr, flush=True)
        self.done.add(i)
        append_jsonl(self.path, rec)
        self._read_log()  # our own line (and any another process wrote meanwhile)
        return rec


def set_device_limits(run: RunRecord, device: str, cpus: float | None, memory: int | None) -> dict:
    """Rewrite one device's cgroup limits; returns the limits read back from the kernel. cpus is in the job's
    units: a fleet scaled to fit the machine (local.fit_cpus) gets it times the run's cpu_scale."""
    from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup

    st = run.state()
    if cpus is not None:
        cpus *= float(st.get("cpu_scale") or 1.0)
    cgroups = st.get("cgroups") or {}
    if device not in cgroups:
        if not st.get("limits_enforced"):
            note = st.get("limits_note") or "limits were not enforced"
            raise ThrottleError(f"limits are not enforced on run {run.run_id} ({note}); there is no cgroup to rewrite")
        raise ThrottleError(f"device {device!r} has no cgroup in run {run.run_id}: its class sets neither cpus "
                            "nor memory, so it runs unlimited")
    try:
        cg = DeviceCgroup.from_state(cgroups[device])
        if not cg.exists:
            raise ThrottleError(f"the cgroup of {device} is gone (run {run.run_id} is ending)")
        cg.set_limits(cpus=cpus, memory=memory)
        return cg.read_limits()
    except (CgroupError, ValueError) as err:
        if isinstance(err, ThrottleError):
            raise
        raise ThrottleError(f"{device}: {err}") from None


def _driver_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def throttle_now(run: RunRecord, device: str, cpus: float | None = None, memory: int | str | None = None) -> dict:
    """Change a running device's limits now (`flotilla throttle`); returns the throttle.jsonl record."""
    if cpus is None and memory is None:
        raise ThrottleError("give --cpus or --memory (or both)")
    if cpus is not None and not cpus >= 0.01:
        raise ThrottleError(f"--cpus {cpus}: use a CPU quota >= 0.01, e.g. 0.25")
    if memory is not None:
        try:
            memory = parse_memory(memory)
        except ValueError as err:
            raise ThrottleError(f"--memory: {err}") from None
        if memory < 64 * 1024**2:
            raise ThrottleError(f"--memory {memory}: at least 64m (a Flower SuperNode alone needs more)")
    st = run.state()
    status = st.get("status", "unknown")
    if status != "running":
        raise ThrottleError(f"run {run.run_id} is {status}, not running: only a running run can be throttled")
    if not _driver_alive(st.get("driver_pid")):
        raise ThrottleError(f"run {run.run_id} is not running (its driver is gone); `flotilla stop` cleans it up")
    devices = st.get("devices") or [d["name"] for d in run.plan().get("devices", [])]
    if device not in devices:
        raise ThrottleError(f"unknown device {device!r} in run {run.run_id}; its devices: {', '.join(devices)}")
    down = set(st.get("lost_devices") or []) | set(st.get("down_devices") or [])
    if device in down:
        why = (st.get("lost_reasons") or {}).get(device, "")
        raise ThrottleError(f"device {device} is down ({why or 'not running'}): there is nothing to throttle")
    applied = set_device_limits(run, device, cpus, memory)
    rec = {"t": time.time(), "device": device, "cpus": cpus, "memory": memory, "source": "manual",
           "round": _current_round(run), "applied": applied}
    append_jsonl(run.dir / THROTTLE_FILE, rec)
    return rec


def _current_round(run: RunRecord) -> int:
    starts = read_jsonl(run.dir / ROUND_STARTS_FILE)
    return max((int(r.get("round", 0)) for r in starts), default=0)
