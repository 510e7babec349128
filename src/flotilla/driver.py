"""The driver: submit a job to a target, follow it, recover it, write the record, clean up.

Target-agnostic: a target starts the federation (`up`) and ends it (`down`);
the driver waits until the fleet is connected and warm, submits the Flower
App, follows the run on Flower's Control API (its status is the run's
outcome, for any app) and in the record the ServerApp's observer writes, and
keeps a lease the fleet watches (a killed driver leaves no fleet behind).
The devices are watched by a Supervisor (exits, hangs, restarts). When the
SuperLink or the ServerApp dies, the run resumes from its last checkpoint
(`recovery.max_restarts` times): the ServerApp again on the same federation,
or a new federation if the SuperLink is gone. SIGINT/SIGTERM stop it in
order. Whatever happens, `down` runs and summary.json is written.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field

from flotilla.capacity import cpu_note
from flotilla.contracts import RecordPaths, trained
from flotilla.diagnose import app_failure
from flotilla.errors import RunFailure, StoppedError, UserError
from flotilla.faults import FaultSchedule
from flotilla.flower_control import ControlError, FlowerControl
from flotilla.job import Job
from flotilla.memory_check import MemoryProbe
from flotilla.plan import Plan, make_plan
from flotilla.runs import JsonlTail, RunRecord, append_jsonl, write_json
from flotilla.runtime.checkpoint import read_checkpoint, request_resume
from flotilla.runtime.commands import flower_env
from flotilla.runtime.lease import Lease
from flotilla.submit import app_dir_for, create_run, submit, write_run_config
from flotilla.summary import read_json, write_summary
from flotilla.supervise import Supervisor
from flotilla.targets import Federation, Target, TargetError, get_target

STATUS_EVERY_S = 1.0  # Flower's run status, on its Control API (~10 ms a request)
HEALTH_EVERY_S = 1.0  # each device's kernel view (processes, CPU, memory pressure), for the watchdog
SUPERLINK_SILENT_S = 3.0  # unanswered Control API requests this long (where the target cannot see it): gone
SERVERAPP_SILENT_S = 3.0  # the ServerApp's heartbeat this stale: dead or frozen
OBSERVER_FLUSH_S = 10.0  # after Flower says finished, wait this long for the observer's last rows

__all__ = ["Driver", "Progress", "RunFailed", "Stopped", "create_run", "run_job"]


class RunFailed(RunFailure):
    pass


class Stopped(StoppedError):
    pass


class Interrupted(RunFailure):
    """The SuperLink or the ServerApp died: the run can go on from its last checkpoint."""

    def __init__(self, what: str, why: str, detected: float) -> None:
        super().__init__(f"the {what} {why}")
        self.what, self.detected = what, detected


@dataclass
class Progress:
    """What the terminal shows; updated by the follow loop."""

    run_id: str
    rounds: int | None
    round: int = 0
    accuracy: float | None = None
    loss: float | None = None
    started: float = field(default_factory=time.time)
    devices: dict[str, dict] = field(default_factory=dict)
    status: str = "starting"
    message: str = ""


class Driver:
    def __init__(self, job: Job, run: RunRecord, target: Target, metrics_port: int = 0, resume: bool = False) -> None:
        self.job, self.run, self.target = job, run, target
        self.plan: Plan = make_plan(job)
        self.paths = RecordPaths(run.dir)
        self.metrics_port = metrics_port
        self.resume = resume
        self.env = flower_env() | {"FLWR_HOME": str(run.dir / "flwr")}
        self.flwr_run_id: int | None = None
        self.control: FlowerControl | None = None
        self.progress = Progress(run.run_id, self.plan.target_rounds())
        self.notes: list[str] = []
        self.devices = Supervisor(job, self.plan, run, target, self.progress, self.notes)
        self.restarts = 0
        self.submitted_at = 0.0
        # once per run, not per Flower run: a resumed run does not throttle or fault again what it already did
        from flotilla.throttle import Throttler

        self.throttler = Throttler(run) if job.heterogeneity.throttle else None
        self.faults = FaultSchedule(run, job.faults, target) if job.faults else None
        self.memory = MemoryProbe(job, self.plan, run, target, self._note)

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    # -- the run -------------------------------------------------------------
    def _start_monitor(self):
        """Tail the record into Prometheus metrics (served if --metrics-port) and usage.jsonl for the report."""
        import threading

        from flotilla.monitor.metrics import FlotillaExporter, follow_run

        exporter = FlotillaExporter(self.run.run_id, self.job.name, target_rounds=self.progress.rounds)
        if self.metrics_port:
            port = exporter.serve(self.metrics_port, addr="127.0.0.1")
            self.run.write_state(metrics_url=f"http://127.0.0.1:{port}/metrics")
        stop = threading.Event()
        t = threading.Thread(target=follow_run, daemon=True, name="flotilla-monitor",
                             args=(self.run.dir, exporter, stop, lambda: self.target.resource_usage(self.run)))
        t.start()

        def end():
            stop.set()
            t.join(timeout=5)
            exporter.close()

        return end

    def execute(self, on_update=None) -> dict:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        status, error = "failed", None
        self.run.write_state(status="starting", driver_pid=os.getpid(), started=time.time(), ended=None, error=None)
        for note in self.plan.run_config_notes():
            self._note(note)
        if cpu := cpu_note(self.job, self.target.name):
            self._note(cpu)
        end_monitor = lambda: None  # noqa: E731
        lease = Lease(self.paths.owner)
        try:
            try:
                lease.__enter__()
                end_monitor = self._start_monitor()
                self._run(on_update)
                status = "completed"
            except Stopped as stop:
                status, error = "stopped", str(stop)
                self.progress.message = error
                self._stop_flower_run()
            except (TargetError, RunFailure) as err:
                status, error = "failed", str(err)
                self._stop_flower_run()
            except UserError as err:  # the job cannot work as written, found once the fleet is up (memory_check)
                status, error = "refused", str(err)
                self._stop_flower_run()
            except Exception as err:  # noqa: BLE001 - any crash still ends in a clean teardown and a record
                status, error = "failed", f"{type(err).__name__}: {err}"
                self._stop_flower_run()
        finally:
            # Ignore further Ctrl-C while tearing down: a half-done teardown leaks processes.
            for s in old:
                signal.signal(s, signal.SIG_IGN)
            try:
                if self.control is not None:
                    self.control.close()
                end_monitor()
                self.target.down(self.run)
                lease.__exit__(None, None, None)
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        self.progress.status = status
        self.target.collect_outputs(self.run)
        return write_summary(self.run, status, error, target_name=self.target.name, notes=self.notes,
                             lost=self.devices.down | self.devices.lost_for_good, rounds_target=self.progress.rounds)

    def _run(self, on_update) -> None:
        """Up, submit, follow; after a crash of the SuperLink or the ServerApp, again from the last checkpoint."""
        app_dir_for(self.job, self.run)  # the copy is what runs (and what devices preload)
        write_run_config(self.plan, self.run)  # devices read it as they start (the built-in trainer's partition)
        fed = self._bring_up(on_update, self.resume)
        while True:
            try:
                self._follow(on_update)
                return
            except Interrupted as intr:
                fed = self._recover(intr, fed, on_update)

    def _bring_up(self, on_update, resume: bool) -> Federation:
        """The federation up and the app submitted. Where the target holds the app until the fleet is connected,
        it is submitted first: the ServerApp then starts (imports the app, torch) while the devices do."""
        self.paths.fleet.unlink(missing_ok=True)
        self.flwr_run_id = None  # the last SuperLink's run (if any) is gone with it
        fed = self.target.up(self.plan, self.run)
        if self.control is not None:
            self.control.close()
        self.control = FlowerControl(fed.control_address, fed.insecure, fed.root_certificates)
        early = self.target.holds_app_for_fleet
        if early:
            self._submit(fed, resume)
        connected = self._wait_for_fleet(on_update)
        self.target.fleet_warm(self.run)
        self.run.write_state(status="running", control_address=fed.control_address)
        write_json(self.paths.fleet, {"t": time.time(), "connected": connected, "devices": len(self.plan.devices)})
        if not early:
            self._submit(fed, resume)
        return fed

    def _submit(self, fed: Federation, resume: bool) -> None:
        self.paths.resume.unlink(missing_ok=True)
        if resume:
            cp = request_resume(self.paths)
            if cp is not None:
                self._note(f"resuming after round {cp.round} (its checkpoint)")
                self.progress.round = cp.round
        self.submitted_at = time.time()
        self.flwr_run_id = submit(self.plan, self.run, fed, self.env)
        self.run.write_state(flwr_run_id=self.flwr_run_id, flwr_run_ids=self.run.state().get("flwr_run_ids", [])
                             + [self.flwr_run_id])

    def _recover(self, intr: Interrupted, fed: Federation, on_update) -> Federation:
        """Restart what died and go on from the last checkpoint, losing at most the round in flight."""
        cp = read_checkpoint(self.paths)
        if self.restarts >= self.job.recovery.max_restarts:
            raise RunFailed(f"{intr} and recovery.max_restarts={self.job.recovery.max_restarts} are used up"
                            + (f" (the last checkpoint is after round {cp.round}: `flotilla resume`)" if cp else ""))
        self.restarts += 1
        print(f"flotilla: {intr}; recovering ({self.restarts} of {self.job.recovery.max_restarts}) from "
              + (f"round {cp.round}" if cp else "the start"), file=sys.stderr, flush=True)
        self._event(f"{intr.what}_down", why=str(intr), detected=intr.detected)
        self._stop_flower_run()
        if intr.what == "superlink":  # the whole federation again (its SuperNodes end with it)
            self.target.down(self.run)
            fed = self._bring_up(on_update, resume=True)
        else:
            try:  # a frozen ServerApp still holds the run: end it
                self.target.inject(self.run, "kill", "serverapp")
            except Exception:  # noqa: BLE001 - it is gone already
                pass
            self._submit(fed, resume=True)  # the fleet is still connected (paths.fleet stands): it starts at once
        recoveries = self.run.state().get("recoveries", []) + [
            {"what": intr.what, "why": str(intr), "detected": intr.detected, "from_round": cp.round if cp else 0,
             "restarted": time.time()}]
        self.run.write_state(recoveries=recoveries)
        self._event("resumed", from_round=cp.round if cp else 0)
        return fed

    def _note(self, note: str) -> None:
        self.notes.append(note)
        print(f"flotilla: note: {note}", file=sys.stderr, flush=True)

    def _event(self, kind: str, **kw) -> None:
        append_jsonl(self.paths.dir / "recovery.jsonl", {"t": time.time(), "event": kind, **kw})

    def _wait_for_fleet(self, on_update) -> int:
        """Hold the app until every device is connected and warm (or start_timeout_s passed with min_devices):
        round 1 then includes the whole fleet. A device that exits meanwhile is reported and not waited for.
        An app submitted already that ended meanwhile (it failed to load) ends the wait. Returns how many
        devices are connected."""
        expected = len(self.plan.devices)
        need = self.job.strategy.min_devices
        t0 = last_status = time.time()
        end = t0 + self.job.strategy.start_timeout_s
        online: list[int] = []
        while True:
            if self.flwr_run_id is not None and time.time() - last_status >= STATUS_EVERY_S:
                last_status = time.time()
                if self._flower_run_ended():
                    break
            self.devices.check()
            alive = expected - len(self.devices.down) - len(self.devices.lost_for_good)
            if self.devices.alive() < need:
                raise RunFailed(f"only {self.devices.alive()} of {expected} devices started, fewer than "
                                f"strategy.min_devices={need}")
            try:
                online = self.control.online_nodes()
            except ControlError as err:
                if time.time() > end:
                    raise RunFailed(str(err)) from None
            ready = self._devices_ready()
            if len(online) >= alive and ready >= alive:
                break
            if time.time() > end:
                if len(online) >= need:
                    self._note(f"started with {len(online)} of {expected} devices connected after "
                               f"strategy.start_timeout_s={self.job.strategy.start_timeout_s:g} s")
                    break
                raise RunFailed(f"only {len(online)} of {expected} devices connected within "
                                f"strategy.start_timeout_s={self.job.strategy.start_timeout_s:g} s "
                                f"(fewer than strategy.min_devices={need}); see the device logs in {self.run.logs}")
            self.progress.message = (f"waiting for the fleet: {len(online)}/{expected} devices connected"
                                     + (f", {ready}/{expected} warm" if self.target.devices_share_record else ""))
            if on_update:
                on_update(self.progress)
            time.sleep(0.25)
        self.progress.message = ""
        self.run.write_state(fleet_connected_s=round(time.time() - t0, 2), fleet_connected=len(online))
        return len(online)

    def _flower_run_ended(self) -> bool:
        try:
            state = self.control.run_state(self.flwr_run_id)
        except ControlError:
            return False
        return state is not None and state.finished

    def _devices_ready(self) -> int:
        """Devices that said they are warm (the built-in trainer up, the user's ClientApp preloaded), where they
        can say so; elsewhere every connected device counts."""
        if not self.target.devices_share_record:
            return len(self.plan.devices)
        return sum(1 for d in self.plan.devices if (self.paths.nodes / f"{d.name}.ready").exists())

    def _follow(self, on_update) -> None:
        throttler, faults = self.throttler, self.faults
        rounds = JsonlTail(self.paths.metrics)
        last_status = last_health = 0.0
        control_ok = time.time()
        while True:
            for row in rounds.read_new():
                self._on_round(row)
            if throttler is not None:
                for rec in throttler.tick():
                    self.progress.message = (f"throttled {rec['device']}: cpus={rec.get('cpus')} memory="
                                             f"{rec.get('memory')}" + (f" ({rec['error']})" if rec.get("error") else ""))
            if faults is not None:
                for rec in faults.tick():
                    self.progress.message = f"fault injected: {rec.get('what') or rec.get('error')}"
            self.memory.tick()
            self.devices.check()
            if time.time() - last_health >= HEALTH_EVERY_S:
                last_health = time.time()
                self.devices.watch()
            alive = self.devices.alive()
            if alive < self.job.strategy.min_devices:
                raise RunFailed(f"only {alive} devices left, fewer than strategy.min_devices="
                                f"{self.job.strategy.min_devices}")
            if self.target.superlink_alive(self.run) is False:
                raise Interrupted("superlink", "exited", time.time())
            self._check_serverapp()
            if on_update:
                on_update(self.progress)
            if time.time() - last_status >= STATUS_EVERY_S:
                last_status = time.time()
                try:
                    state = self.control.run_state(self.flwr_run_id)
                    control_ok = time.time()
                except ControlError as err:
                    if time.time() - control_ok > SUPERLINK_SILENT_S:
                        raise Interrupted("superlink", f"stopped answering ({err})", time.time()) from None
                    state = None
                if state is not None and state.finished:
                    self._await_observer()
                    for row in rounds.read_new():
                        self._on_round(row)
                    self._finished(state)
                    return
            time.sleep(0.25)

    def _finished(self, state) -> None:
        if state.sub_status == "completed":
            return
        if state.sub_status == "stopped":
            raise Stopped("the Flower run was stopped (flwr stop)")
        obs = read_json(self.paths.observed)
        if obs.get("t", 0) >= self.submitted_at and obs.get("error"):  # the app's own exception: no retry
            raise RunFailed(self._failure(state.details))
        raise Interrupted("serverapp", f"ended without finishing ({state.details or 'no reason given'})", time.time())

    def _check_serverapp(self) -> None:
        """A ServerApp that stopped its heartbeat (killed, frozen) while Flower still counts the run as running."""
        hb = self.paths.dir / "serverapp.heartbeat"
        try:
            mtime = hb.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime >= self.submitted_at and time.time() - mtime > SERVERAPP_SILENT_S and not self._app_done():
            raise Interrupted("serverapp", f"stopped (no heartbeat for {time.time() - mtime:.0f} s)", time.time())

    def _app_done(self) -> bool:
        obs = read_json(self.paths.observed)
        return obs.get("t", 0) >= self.submitted_at

    def _on_round(self, row: dict) -> None:
        if row.get("round", 0) < 1:
            return
        self.progress.round = row["round"]
        self.progress.accuracy, self.progress.loss = row.get("accuracy"), row.get("loss")
        for d in row.get("devices", []):
            if trained(d):
                self.progress.devices.setdefault(d["name"], {}).update(
                    train_s=d.get("train_s"), throughput_sps=d.get("throughput_sps"))

    def _await_observer(self) -> None:
        end = time.time() + OBSERVER_FLUSH_S
        while not self._app_done() and time.time() < end:
            time.sleep(0.1)

    def _failure(self, details: str) -> str:
        logs = {d.name: self.target.log_path(self.run, d.name) for d in self.plan.devices}
        return "the app failed: " + app_failure(details, self.run.log_path("serverapp"), logs)

    def _stop_flower_run(self) -> None:
        if self.flwr_run_id is None or self.control is None:
            return
        try:
            self.control.stop_run(self.flwr_run_id)
        except ControlError:
            pass


def run_job(job: Job, target_name: str | None = None, run: RunRecord | None = None, on_update=None,
            metrics_port: int = 0, target_options: dict | None = None, resume: bool = False) -> dict:
    target_name = target_name or job.target
    run = run or create_run(job, target_name, target_options=target_options)
    target = get_target(target_name, **run.state().get("target_options", {}))
    return Driver(job, run, target, metrics_port, resume=resume).execute(on_update)
