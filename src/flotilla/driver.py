"""The driver: submit a job to a target, follow it, write the record, clean up.

Target-agnostic: a target starts the federation (`up`) and ends it (`down`);
the driver waits until the fleet is connected, submits the Flower App with
the `flwr` CLI, follows the run on Flower's Control API (its status is the
run's outcome, for any app) and in the record the ServerApp's observer
writes, watches the devices, and turns SIGINT/SIGTERM into an orderly stop.
Whatever happens, `down` runs and summary.json is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flotilla.appspec import BUILTIN_FAB
from flotilla.contracts import RecordPaths, trained
from flotilla.diagnose import app_failure
from flotilla.flower_control import ControlError, FlowerControl
from flotilla.job import Job
from flotilla.plan import Plan, format_node_config, make_plan
from flotilla.runs import JsonlTail, RunRecord, new_run_id
from flotilla.runtime.commands import flower_env
from flotilla.targets import Federation, Target, TargetError, get_target
from flotilla.watchdog import Watchdog, advice

CONNECTION = "flotilla"
STATUS_EVERY_S = 1.0  # Flower's run status, on its Control API (~10 ms a request)
HEALTH_EVERY_S = 1.0  # each device's kernel view (processes, CPU, memory pressure), for the watchdog
CONTROL_FAILURES_FATAL = 15  # consecutive unanswered status requests: the SuperLink is gone
OBSERVER_FLUSH_S = 10.0  # after Flower says finished, wait this long for the observer's last rows


class RunFailed(RuntimeError):
    pass


class Stopped(Exception):
    pass


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


def create_run(job: Job, target: str, runs_dir: Path | None = None, run_id: str | None = None,
               target_options: dict | None = None) -> RunRecord:
    plan = make_plan(job)
    # job.yaml holds what the job file set (paths resolved): readers tell a user's choice from a default
    # (flotilla.strategy.Auto takes the job's train values only where they were set); plan.json has it all.
    rec = RunRecord.create(Path(runs_dir or job.runs_dir), run_id or new_run_id(job.name),
                           job.model_dump(mode="json", exclude_unset=True), plan.to_dict())
    rec.write_state(target=target, target_options=target_options or {}, job_name=job.name,
                    rounds=plan.target_rounds(), devices=[d.name for d in plan.devices], app=plan.app.name)
    return rec


def app_dir_for(job: Job, run: RunRecord) -> Path:
    """The Flower App directory to submit (a copy: `flwr run` may rewrite its pyproject)."""
    src = BUILTIN_FAB if job.builtin_app else Path(job.app)
    dst = run.dir / "app"
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".venv", "*.pyc", "runs"))
    return dst


def write_flwr_config(flwr_home: Path, fed: Federation) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{CONNECTION}]", f'address = "{fed.control_address}"']
    if fed.insecure:
        lines.append("insecure = true")
    elif fed.root_certificates:
        lines.append(f'root-certificates = "{fed.root_certificates}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def run_config_toml(cfg: dict) -> str:
    return "\n".join(f"{k} = {format_node_config({k: v}).split('=', 1)[1]}" for k, v in cfg.items()) + "\n"


class Driver:
    def __init__(self, job: Job, run: RunRecord, target: Target, metrics_port: int = 0) -> None:
        self.job, self.run, self.target = job, run, target
        self.plan: Plan = make_plan(job)
        self.paths = RecordPaths(run.dir)
        self.metrics_port = metrics_port
        self.env = flower_env() | {"FLWR_HOME": str(run.dir / "flwr")}
        self.flwr_run_id: int | None = None
        self.control: FlowerControl | None = None
        self.progress = Progress(run.run_id, self.plan.target_rounds())
        self.stop_reason: str | None = None
        self.lost: dict[str, str] = {}  # device -> why
        self.notes: list[str] = []
        self.watchdog = Watchdog()
        self.in_flight: dict[str, tuple[str, float]] = {}  # message id -> (device, sent at)
        self.oom_seen: dict[str, int] = {}  # device -> OOM kills already reported

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self.stop_reason = signal.Signals(signum).name
        raise Stopped(f"stopped by {self.stop_reason}")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

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
        end_monitor = self._start_monitor()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        status, error = "failed", None
        self.run.write_state(status="starting", driver_pid=os.getpid(), started=time.time())
        for note in self.plan.run_config_notes():
            self._note(note)
        try:
            try:
                app_dir_for(self.job, self.run)  # the copy is what runs (and what devices preload)
                fed = self.target.up(self.plan, self.run)
                self.control = FlowerControl(fed.control_address, fed.insecure, fed.root_certificates)
                self._wait_for_fleet(on_update)
                self.run.write_state(status="running", control_address=fed.control_address)
                self._submit(fed)
                self._follow(on_update)
                status = "completed"
            except Stopped as stop:
                status, error = "stopped", str(stop)
                self.progress.message = error
                self._stop_flower_run()
            except (TargetError, RunFailed) as err:
                status, error = "failed", str(err)
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
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        self.progress.status = status
        return self._finish(status, error)

    def _note(self, note: str) -> None:
        self.notes.append(note)
        print(f"flotilla: note: {note}", file=sys.stderr, flush=True)

    def _wait_for_fleet(self, on_update) -> None:
        """Hold the app until every device is connected (or start_timeout_s passed with min_devices): round 1
        then includes the whole fleet. A device that exits meanwhile is reported and not waited for."""
        expected = len(self.plan.devices)
        need = self.job.strategy.min_devices
        t0 = time.time()
        end = t0 + self.job.strategy.start_timeout_s
        online: list[int] = []
        while True:
            self._check_devices()
            alive = expected - len(self.lost)
            if alive < need:
                raise RunFailed(f"only {alive} of {expected} devices started, fewer than strategy.min_devices={need}")
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

    def _devices_ready(self) -> int:
        """Devices that said they are warm (the built-in trainer up, the user's ClientApp preloaded), where they
        can say so; elsewhere every connected device counts."""
        if not self.target.devices_share_record:
            return len(self.plan.devices)
        return sum(1 for d in self.plan.devices
                   if d.name not in self.lost and (self.paths.nodes / f"{d.name}.ready").exists())

    def _submit(self, fed: Federation) -> None:
        write_flwr_config(self.run.dir / "flwr", fed)
        app_dir = app_dir_for(self.job, self.run)
        cfg = self.plan.run_config()
        cmd = ["run", str(app_dir), CONNECTION, "--format", "json"]
        if cfg:
            cfg_path = self.run.dir / "run_config.toml"
            cfg_path.write_text(run_config_toml(cfg))
            cmd += ["--run-config", str(cfg_path)]
        res = self.flwr(*cmd)
        self.run.log_path("flwr-run").write_text(res.stdout + res.stderr)
        try:
            out = json.loads(res.stdout[res.stdout.index("{"):])
        except ValueError:
            out = {}
        if res.returncode != 0 or not out.get("success", True) or "run-id" not in out:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise RunFailed(f"flwr run failed to submit the app: {' | '.join(tail)}")
        self.flwr_run_id = int(out["run-id"])
        self.run.write_state(flwr_run_id=self.flwr_run_id)

    def _follow(self, on_update) -> None:
        from flotilla.throttle import Throttler

        throttler = Throttler(self.run) if self.job.heterogeneity.throttle else None
        rounds = JsonlTail(self.paths.metrics)
        messages = JsonlTail(self.paths.messages)
        last_status = last_health = 0.0
        control_failures = 0
        while True:
            for row in rounds.read_new():
                self._on_round(row)
            if time.time() - last_health >= HEALTH_EVERY_S:
                last_health = time.time()
                self._watch(messages)
            if throttler is not None:
                for rec in throttler.tick():
                    self.progress.message = (f"throttled {rec['device']}: cpus={rec.get('cpus')} "
                                             f"memory={rec.get('memory')}" + (f" ({rec['error']})" if rec.get("error") else ""))
            self._check_devices()
            alive = len(self.plan.devices) - len(self.lost)
            if alive < self.job.strategy.min_devices:
                raise RunFailed(f"only {alive} devices left, fewer than strategy.min_devices="
                                f"{self.job.strategy.min_devices}")
            if on_update:
                on_update(self.progress)
            if time.time() - last_status >= STATUS_EVERY_S:
                last_status = time.time()
                try:
                    state = self.control.run_state(self.flwr_run_id)
                    control_failures = 0
                except ControlError as err:
                    control_failures += 1
                    if control_failures >= CONTROL_FAILURES_FATAL:
                        raise RunFailed(f"the SuperLink stopped answering ({err}); see {self.run.log_path('superlink')}")
                    state = None
                if state is not None and state.finished:
                    self._await_observer()
                    for row in rounds.read_new():
                        self._on_round(row)
                    if state.sub_status == "completed":
                        return
                    if state.sub_status == "stopped":
                        raise Stopped("the Flower run was stopped (flwr stop)")
                    raise RunFailed(self._failure(state.details))
            time.sleep(0.25)

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
        while not self.paths.observed.exists() and time.time() < end:
            time.sleep(0.1)

    def _failure(self, details: str) -> str:
        logs = {d.name: self.target.log_path(self.run, d.name) for d in self.plan.devices}
        return "the app failed: " + app_failure(details, self.run.log_path("serverapp"), logs)

    def _check_devices(self) -> None:
        for name, state in self.target.device_states(self.run).items():
            self.progress.devices.setdefault(name, {})["state"] = state
            if state == "exited" and name not in self.lost:
                self._device_lost(name)

    def _watch(self, messages: JsonlTail) -> None:
        """Devices that stopped answering without exiting (stopped, thrashing, hung): stop them, report them."""
        for ev in messages.read_new():
            if ev.get("event") == "sent" and ev.get("mid"):
                self.in_flight[ev["mid"]] = (ev.get("device", ""), float(ev.get("t", time.time())))
            elif ev.get("event") == "reply":
                sent = self.in_flight.pop(ev.get("mid", ""), None)
                if sent and ev.get("reply_s"):
                    self.watchdog.reply_time(sent[0], float(ev["reply_s"]))
        since: dict[str, float] = {}
        for device, t in self.in_flight.values():
            since[device] = min(since.get(device, t), t)
        for i, d in enumerate(self.plan.devices):
            if d.name in self.lost:
                continue
            health = self.target.device_health(self.run, d.name)
            if health is None:
                continue
            self._report_oom_kills(d, health)
            why = self.watchdog.observe(d.name, health, since.get(d.name))
            if why:
                cls_index = next(k for k, c in enumerate(self.job.devices) if c.name == d.device_class)
                self.target.stop_device(self.run, d.name)
                self._device_lost(d.name, f"{why}; {advice(why, cls_index, health.limit)}", stuck=True)

    def _report_oom_kills(self, d, health) -> None:
        """A process of a device killed by its memory limit (its fork server, a ClientApp) while the device
        lives on: its replies fail from now on. Say so, with the limit and what to change."""
        seen = self.oom_seen.get(d.name, 0)
        if health.oom_kills <= seen:
            return
        self.oom_seen[d.name] = health.oom_kills
        idx = next(k for k, c in enumerate(self.job.devices) if c.name == d.device_class)
        limit = f"{health.limit // 2**20} MiB" if health.limit else "its limit"
        msg = (f"device {d.name}: the kernel killed {health.oom_kills} of its processes at its memory limit "
               f"({limit}); its ClientApps fail until it has more memory: raise devices[{idx}].memory or make "
               "the app use less")
        self.progress.message = msg
        self.notes = [n for n in self.notes if not n.startswith(f"device {d.name}: the kernel killed")] + [msg]
        print(f"flotilla: {msg}", file=sys.stderr, flush=True)

    def _device_lost(self, name: str, why: str | None = None, stuck: bool = False) -> None:
        tail = _tail(self.target.log_path(self.run, name), 8)
        if stuck:
            msg = f"device {name} stopped answering: {why}; Flotilla stopped it"
        else:
            code = self.target.exit_code(self.run, name)
            why = why or self.target.explain_exit(self.run, name)
            msg = f"device {name} exited (code {code})" + (f": {why}" if why else "")
        msg += "; last log lines:\n" + "\n".join("    " + t for t in tail)
        self.lost[name] = why or "exited"
        self.progress.message = msg
        print(f"flotilla: {msg}", file=sys.stderr, flush=True)
        self.paths.lost_devices.write_text(json.dumps(sorted(self.lost)))
        self.run.write_state(lost_devices=sorted(self.lost), lost_reasons=self.lost)

    def _stop_flower_run(self) -> None:
        if self.flwr_run_id is None or self.control is None:
            return
        try:
            self.control.stop_run(self.flwr_run_id)
        except ControlError:
            pass

    def _finish(self, status: str, error: str | None) -> dict:
        st = self.run.state()
        rounds = [r for r in self.run.rounds() if r.get("round", 0) >= 1]
        per_device: dict[str, dict] = {
            d.name: {"name": d.name, "class": d.device_class, "train_s": 0.0} for d in self.plan.devices
        }
        for r in rounds:
            for d in r.get("devices", []):
                if d["name"] in per_device and trained(d):
                    per_device[d["name"]]["train_s"] = round(per_device[d["name"]]["train_s"] + (d.get("train_s") or 0),
                                                             3)
        observed = _read_json(self.paths.observed)
        seen = observed.get("metrics_seen", {})
        notes = list(self.notes)
        acc_key = self.job.metrics.accuracy
        if rounds and all(r.get("accuracy") is None for r in rounds):
            names = sorted({m for scope in seen.values() for m in scope})
            notes.append(f"no metric named {acc_key!r} was reported; the app reported: "
                         f"{', '.join(names) or 'none'} (set metrics.accuracy in the job to one of them)")
        ended = time.time()
        summary = {
            "run_id": self.run.run_id,
            "status": status,
            "app": self.plan.app.name,
            "final_accuracy": next((r["accuracy"] for r in reversed(rounds) if r.get("accuracy") is not None), None),
            "accuracy_metric": acc_key,
            "rounds_target": self.progress.rounds,
            "rounds": [{k: r.get(k) for k in ("round", "accuracy", "loss", "wall_s")} for r in rounds],
            "devices": list(per_device.values()),
            "metrics_seen": seen,
            "wall_s": round(ended - st.get("started", ended), 3),
            "target": self.target.name,
            "limits_enforced": st.get("limits_enforced", False),
            "lost_devices": sorted(self.lost),
            "started": st.get("started"),
            "ended": ended,
            "error": error,
            "notes": notes,
        }
        for o in self._collect_outputs():
            summary.setdefault("outputs", []).append(o)
        self.run.summary_path.write_text(json.dumps(summary, indent=2))
        self.run.write_state(status=status, ended=ended, error=error)
        try:
            from flotilla.monitor.report import write_report

            write_report(self.run.dir)
        except Exception as err:  # noqa: BLE001 - a report problem must not turn a good run into a failed one
            print(f"flotilla: could not write the report: {err}", file=sys.stderr)
        return summary

    def _collect_outputs(self) -> list[str]:
        """Files the apps wrote in their working directories (the record's outputs/), relative paths."""
        self.target.collect_outputs(self.run)
        root = self.paths.outputs
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").rstrip().splitlines()[-n:]
    except FileNotFoundError:
        return ["(no log)"]


def run_job(job: Job, target_name: str | None = None, run: RunRecord | None = None, on_update=None,
            metrics_port: int = 0, target_options: dict | None = None) -> dict:
    target_name = target_name or job.target
    run = run or create_run(job, target_name, target_options=target_options)
    target = get_target(target_name, **run.state().get("target_options", {}))
    return Driver(job, run, target, metrics_port).execute(on_update)
