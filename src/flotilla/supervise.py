"""The driver's watch over the devices: exits, hangs, OOM kills, and restarts with back-off.

A device that dies or stops answering is *down*: it goes on the record's
lost list at once, so the ServerApp gives it no work and answers its pending
messages with Flower's NODE_UNAVAILABLE (flotilla.runtime.fleetview). It is
restarted after a back-off (1, 2, 4 ... s; `recovery.device_restarts` times)
where the target can restart one; it then registers as a new Flower node and
is trained again from the next round. A device that cannot come back is lost
for good, with why (its exit code or signal, its memory limit at start-up or
while training, a hang). Every event goes to recovery.jsonl with its time.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field

from flotilla.contracts import RecordPaths
from flotilla.runs import JsonlTail, RunRecord, append_jsonl
from flotilla.watchdog import Watchdog, advice

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass
class DeviceState:
    restarts: int = 0
    down_since: float | None = None
    restart_at: float | None = None
    why: str = ""
    gone: bool = False  # lost for good


@dataclass
class Supervisor:
    job: object
    plan: object
    run: RunRecord
    target: object
    progress: object
    notes: list[str]
    devices: dict[str, DeviceState] = field(default_factory=dict)
    watchdog: Watchdog = field(default_factory=Watchdog)
    in_flight: dict[str, tuple[str, float]] = field(default_factory=dict)  # message id -> (device, sent at)
    oom_seen: dict[str, int] = field(default_factory=dict)
    round_started: bool = False  # round 1 has begun (a loss before it is "at start-up")

    def __post_init__(self) -> None:
        self.paths = RecordPaths(self.run.dir)
        self.messages = JsonlTail(self.paths.messages)
        self.devices = {d.name: DeviceState() for d in self.plan.devices}

    # -- what the driver asks ------------------------------------------------
    @property
    def down(self) -> dict[str, str]:
        return {n: s.why for n, s in self.devices.items() if s.down_since is not None}

    @property
    def lost_for_good(self) -> dict[str, str]:
        return {n: s.why for n, s in self.devices.items() if s.gone}

    def alive(self) -> int:
        """Devices up, or coming back."""
        return sum(1 for s in self.devices.values() if not s.gone)

    def check(self) -> None:
        """Exits (every call) and due restarts."""
        for name, state in self.target.device_states(self.run).items():
            self.progress.devices.setdefault(name, {})["state"] = state
            if state == "exited" and self.devices[name].down_since is None and not self.devices[name].gone:
                self._down(name, self._exit_reason(name), stuck=False)
        now = time.time()
        for name, s in self.devices.items():
            if s.restart_at is not None and now >= s.restart_at:
                self._restart(name)

    def watch(self) -> None:
        """Devices that stop answering without exiting (stopped, thrashing, hung), and OOM kills in live ones."""
        for ev in self.messages.read_new():
            if ev.get("event") == "sent" and ev.get("mid"):
                self.in_flight[ev["mid"]] = (ev.get("device", ""), float(ev.get("t", time.time())))
            elif ev.get("event") == "reply":
                sent = self.in_flight.pop(ev.get("mid", ""), None)
                if sent and ev.get("reply_s"):
                    self.watchdog.reply_time(sent[0], float(ev["reply_s"]))
                if ev.get("round", 0) >= 1:
                    self.round_started = True
        since: dict[str, float] = {}
        for device, t in self.in_flight.values():
            since[device] = min(since.get(device, t), t)
        for d in self.plan.devices:
            if self.devices[d.name].down_since is not None or self.devices[d.name].gone:
                continue
            health = self.target.device_health(self.run, d.name)
            if health is None:
                continue
            self._report_oom_kills(d, health)
            why = self.watchdog.observe(d.name, health, since.get(d.name))
            if why:
                self.target.stop_device(self.run, d.name)
                self._down(d.name, f"{why}; {advice(why, self._class_index(d), health.limit)}", stuck=True)

    # -- down, restarted, lost ---------------------------------------------------
    def _down(self, name: str, why: str, stuck: bool) -> None:
        s = self.devices[name]
        now = time.time()
        s.down_since, s.why = now, why
        for mid in [m for m, (dev, _) in self.in_flight.items() if dev == name]:
            del self.in_flight[mid]
        self.watchdog.forget(name)
        # its node id is stale from now: the ServerApp must not use it (it comes back as a new node)
        for f in (self.paths.nodes / f"{name}.json", self.paths.nodes / f"{name}.ready"):
            f.unlink(missing_ok=True)
        can = s.restarts < self.job.recovery.device_restarts and "restart" in self.target.capabilities
        if can:
            s.restart_at = now + BACKOFF_S[min(s.restarts, len(BACKOFF_S) - 1)]
        else:
            s.gone = True
        what = "stopped answering" if stuck else "exited"
        then = (f"restarting it in {s.restart_at - now:.0f} s ({s.restarts + 1} of "
                f"{self.job.recovery.device_restarts})") if can else "it is lost for good"
        tail = _tail(self.target.log_path(self.run, name), 8)
        msg = f"device {name} {what}: {why}; {then}; last log lines:\n" + "\n".join("    " + t for t in tail)
        self.progress.message = msg
        print(f"flotilla: {msg}", file=sys.stderr, flush=True)
        self._event("device_down", name, why=why, stuck=stuck, will_restart=can)
        self._write_lost()

    def _restart(self, name: str) -> None:
        s = self.devices[name]
        s.restart_at = None
        try:
            self.target.restart_device(self.plan, self.run, name)
        except Exception as err:  # noqa: BLE001 - a device that cannot come back is lost, the run goes on
            s.gone, s.why = True, f"{s.why}; restart failed: {err}"
            self._event("device_lost", name, why=s.why)
            self._write_lost()
            return
        s.restarts += 1
        down_s = time.time() - (s.down_since or time.time())
        s.down_since = None
        print(f"flotilla: device {name} restarted after {down_s:.1f} s down", file=sys.stderr, flush=True)
        self._event("device_restarted", name, down_s=round(down_s, 2), restarts=s.restarts)
        self._write_lost()

    def _write_lost(self) -> None:
        down = self.down | self.lost_for_good
        self.paths.lost_devices.write_text(json.dumps(sorted(down)))
        self.run.write_state(lost_devices=sorted(self.lost_for_good), down_devices=sorted(self.down),
                             lost_reasons=down)

    def _event(self, kind: str, device: str, **kw) -> None:
        append_jsonl(self.paths.dir / "recovery.jsonl", {"t": time.time(), "event": kind, "device": device, **kw})

    # -- reasons -------------------------------------------------------------------
    def _exit_reason(self, name: str) -> str:
        code = self.target.exit_code(self.run, name)
        why = self.target.explain_exit(self.run, name)
        if why:  # the kernel killed it at its memory limit
            phase = "while training" if self.round_started else "at start-up"
            return f"{why} ({phase})"
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}" if code is not None else "exited"

    def _report_oom_kills(self, d, health) -> None:
        """A process of a live device killed by its memory limit (its fork server, a ClientApp): its replies
        fail from now on. Say so once per new kill, with the limit and what to change."""
        seen = self.oom_seen.get(d.name, 0)
        if health.oom_kills <= seen:
            return
        self.oom_seen[d.name] = health.oom_kills
        limit = f"{health.limit // 2**20} MiB" if health.limit else "its limit"
        msg = (f"device {d.name}: the kernel killed {health.oom_kills} of its processes at its memory limit "
               f"({limit}); its ClientApps fail until it has more memory: raise devices[{self._class_index(d)}]"
               ".memory or make the app use less")
        self.progress.message = msg
        self.notes[:] = [n for n in self.notes if not n.startswith(f"device {d.name}: the kernel killed")] + [msg]
        print(f"flotilla: {msg}", file=sys.stderr, flush=True)

    def _class_index(self, d) -> int:
        return next(k for k, c in enumerate(self.job.devices) if c.name == d.device_class)


def _tail(path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").rstrip().splitlines()[-n:]
    except FileNotFoundError:
        return ["(no log)"]
