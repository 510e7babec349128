"""Devices that stop answering without exiting: stopped, thrashing at their memory limit, or hung.

A dead device is easy: its process exits. A device that no longer answers
but lives on costs the round its whole timeout (Flower counts a node offline
only after 2 x 30 s of missed heartbeats, and a thrashing one keeps
heartbeating). The driver samples each device's health (its processes'
states, CPU time, memory, limit hits and major page faults, from the kernel)
about every second and asks the Watchdog, which says why a device is stuck:
- stopped: every process of it stopped (SIGSTOP, a frozen cgroup) for HANG_S;
- thrashing: it has a message out, its memory sits at its limit and it keeps
  faulting pages back in (or hitting the limit) for THRASH_S: it will not
  finish; what the kernel shows is quoted, with what to change;
- hung: it has a message out for a long time (HUNG_MIN_S, and HUNG_FACTOR x its
  usual reply time) and its CPU time has not moved for PROGRESS_WINDOW_S (less
  than IDLE_CPU, or a quarter of a smaller quota).
Pure logic over samples, so the rules are unit-tested without a fleet.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

HANG_S = 5.0  # every process stopped this long: stuck
THRASH_S = 8.0  # at the memory limit and faulting for this long, with a message out: stuck
MEMORY_FULL = 0.95  # share of the limit that counts as "at the limit"
THRASH_FAULTS_PER_S = 50.0  # major page faults per second that count as thrashing
HUNG_MIN_S = 60.0
HUNG_FACTOR = 10.0
PROGRESS_WINDOW_S = 20.0
IDLE_CPU = 0.002  # cores: less than this over the window is no progress (an idle SuperNode uses ~0.013)
MiB = 1024**2


@dataclass(frozen=True)
class Health:
    """One sample of a device, from the kernel."""

    t: float
    stopped: bool  # every process of the device is stopped (state T)
    cpu_s: float | None = None  # CPU seconds used so far
    memory: int | None = None  # bytes charged
    limit: int | None = None  # memory limit, bytes
    limit_hits: int = 0  # times usage hit the limit (cumulative)
    major_faults: int = 0  # cumulative
    oom_kills: int = 0  # processes of it the kernel killed at its memory limit (cumulative)
    cpus: float | None = None  # its CPU quota, cores


class Watchdog:
    def __init__(self, hang_s: float = HANG_S, thrash_s: float = THRASH_S) -> None:
        self.hang_s, self.thrash_s = hang_s, thrash_s
        self._samples: dict[str, deque[Health]] = {}
        self._replies: dict[str, deque[float]] = {}  # recent reply times per device

    def reply_time(self, device: str, seconds: float) -> None:
        self._replies.setdefault(device, deque(maxlen=10)).append(seconds)

    def observe(self, device: str, h: Health, in_flight_since: float | None) -> str | None:
        """Add a sample; return why the device is stuck, or None."""
        q = self._samples.setdefault(device, deque())
        q.append(h)
        keep = max(self.hang_s, self.thrash_s, PROGRESS_WINDOW_S) + 2
        while q and h.t - q[0].t > keep:
            q.popleft()
        return self._stopped(q) or self._thrashing(q, in_flight_since) or self._hung(device, q, in_flight_since)

    def forget(self, device: str) -> None:
        self._samples.pop(device, None)

    def _window(self, q: deque[Health], seconds: float) -> list[Health] | None:
        """The samples of the last `seconds`, if the history covers them."""
        now = q[-1].t
        if now - q[0].t < seconds:
            return None
        return [s for s in q if now - s.t <= seconds + 1e-9]

    def _stopped(self, q: deque[Health]) -> str | None:
        w = self._window(q, self.hang_s)
        if w and all(s.stopped for s in w):
            return f"its processes are stopped (SIGSTOP or a frozen cgroup) for {self.hang_s:.0f} s"
        return None

    def _thrashing(self, q: deque[Health], since: float | None) -> str | None:
        w = self._window(q, self.thrash_s)
        if not w or since is None or q[-1].t - since < self.thrash_s:
            return None
        if not all(s.limit and s.memory is not None and s.memory >= MEMORY_FULL * s.limit for s in w):
            return None
        span = w[-1].t - w[0].t
        faults = (w[-1].major_faults - w[0].major_faults) / span if span > 0 else 0.0
        hits = w[-1].limit_hits - w[0].limit_hits
        if faults < THRASH_FAULTS_PER_S and hits <= 0:
            return None
        last = w[-1]
        return (f"thrashing at its memory limit: {last.memory / MiB:.0f} of {last.limit / MiB:.0f} MiB in use, "
                f"{faults:.0f} major page faults/s and {hits} limit hits in {span:.0f} s, its message out for "
                f"{q[-1].t - since:.0f} s")

    def _hung(self, device: str, q: deque[Health], since: float | None) -> str | None:
        if since is None:
            return None
        usual = statistics.median(self._replies[device]) if self._replies.get(device) else 0.0
        out_for = q[-1].t - since
        if out_for < max(HUNG_MIN_S, HUNG_FACTOR * usual):
            return None
        w = self._window(q, PROGRESS_WINDOW_S)
        if not w or w[0].cpu_s is None or w[-1].cpu_s is None:
            return None
        rate = (w[-1].cpu_s - w[0].cpu_s) / max(1e-6, w[-1].t - w[0].t)
        # a device whose whole quota is near IDLE_CPU (a limit scaled down by local.fit_cpus) works at that
        # rate: a quarter of its quota is progress
        if rate >= (min(IDLE_CPU, w[-1].cpus / 4) if w[-1].cpus else IDLE_CPU):
            return None
        return f"no progress: its message out for {out_for:.0f} s and {rate * 100:.2f}% of a core used in " \
               f"{PROGRESS_WINDOW_S:.0f} s"


def advice(reason: str, device_index: int | None, memory: int | None) -> str:
    """What the user can change, for a stuck device."""
    if reason.startswith("thrashing"):
        where = f"devices[{device_index}]" if device_index is not None else "the device class"
        return (f"raise {where}.memory (the app needs more than {memory // MiB if memory else '?'} MiB with "
                "everything it runs) or make the app use less (a smaller batch or model)")
    if reason.startswith("its processes are stopped"):
        return "something outside the run stopped it (a signal, a debugger, a freezer)"
    return "its ClientApp may be blocked or deadlocked; its log shows where it was"
