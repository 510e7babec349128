"""The driver: submit a job to a target, follow it, write the record, clean up.

Target-agnostic: a target starts the federation (`up`) and ends it (`down`);
the driver submits the Flower App with the `flwr` CLI, follows the records
the ServerApp writes, watches the devices, and turns SIGINT/SIGTERM into an
orderly stop. Whatever happens, `down` runs and summary.json is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from flotilla.device import flower_env
from flotilla.job import BUILTIN_APPS, Job
from flotilla.plan import Plan, format_node_config, make_plan
from flotilla.runs import RunRecord, new_run_id
from flotilla.targets import Federation, Target, TargetError, get_target

BUILTIN_FAB = Path(__file__).parent / "app" / "fab"
CONNECTION = "flotilla"


class RunFailed(RuntimeError):
    pass


class Stopped(Exception):
    pass


@dataclass
class Progress:
    """What the terminal shows; updated by the follow loop."""

    run_id: str
    rounds: int
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
    rec = RunRecord.create(
        Path(runs_dir or job.runs_dir), run_id or new_run_id(job.name), job.model_dump(mode="json"), plan.to_dict()
    )
    rec.write_state(target=target, target_options=target_options or {}, job_name=job.name, rounds=job.rounds,
                    devices=[d.name for d in plan.devices])
    return rec


def app_dir_for(job: Job, run: RunRecord) -> Path:
    """The Flower App directory to submit (a copy: `flwr run` may rewrite its pyproject)."""
    src = BUILTIN_FAB if job.app in BUILTIN_APPS else Path(job.app)
    dst = run.dir / "app"
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".venv", "*.pyc"))
    return dst


def app_run_config(job: Job, plan: Plan, run: RunRecord, fed: Federation, app_dir: Path) -> dict:
    cfg = plan.run_config() | {
        "output-dir": fed.output_dir or str(run.dir),
        "expected-devices": len(plan.devices),
        "run-id": run.run_id,
        "job-name": job.name,
        "metrics-port": fed.serverapp_metrics_port,
    }
    declared = tomllib.loads((app_dir / "pyproject.toml").read_text())
    keys = declared.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return {k: v for k, v in cfg.items() if k in keys}  # flwr refuses keys the app does not declare


def write_flwr_config(flwr_home: Path, fed: Federation) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{CONNECTION}]", f'address = "{fed.control_address}"']
    if fed.insecure:
        lines.append("insecure = true")
    elif fed.root_certificates:
        lines.append(f'root-certificates = "{fed.root_certificates}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


class Driver:
    def __init__(self, job: Job, run: RunRecord, target: Target, metrics_port: int = 0) -> None:
        self.job, self.run, self.target = job, run, target
        self.plan = make_plan(job)
        self.metrics_port = metrics_port
        self.env = flower_env() | {"FLWR_HOME": str(run.dir / "flwr")}
        self.flwr_run_id: int | None = None
        self.progress = Progress(run.run_id, job.rounds)
        self.stop_reason: str | None = None
        self.lost: set[str] = set()
        self.log_follower: subprocess.Popen | None = None

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self.stop_reason = signal.Signals(signum).name
        raise Stopped(self.stop_reason)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    # -- the run -------------------------------------------------------------
    def _start_monitor(self):
        """Tail the record into Prometheus metrics (served if --metrics-port) and usage.jsonl for the report."""
        import threading

        from flotilla.monitor.metrics import FlotillaExporter, follow_run

        exporter = FlotillaExporter(self.run.run_id, self.job.name, target_rounds=self.job.rounds)
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
        try:
            try:
                fed = self.target.up(self.plan, self.run)
                self.run.write_state(status="running", control_address=fed.control_address)
                self._submit(fed)
                self._follow(on_update)
                status = "completed"
            except Stopped:
                status, error = "stopped", f"stopped by {self.stop_reason}"
                self.progress.message = error
                self._stop_flower_run()
            except (TargetError, RunFailed) as err:
                status, error = "failed", str(err)
            except Exception as err:  # noqa: BLE001 - any crash still ends in a clean teardown and a record
                status, error = "failed", f"{type(err).__name__}: {err}"
        finally:
            # Ignore further Ctrl-C while tearing down: a half-done teardown leaks processes.
            for s in old:
                signal.signal(s, signal.SIG_IGN)
            try:
                self._end_log_follower()
                end_monitor()
                self.target.down(self.run)
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        self.progress.status = status
        return self._finish(status, error)

    def _submit(self, fed: Federation) -> None:
        write_flwr_config(self.run.dir / "flwr", fed)
        app_dir = app_dir_for(self.job, self.run)
        cfg = app_run_config(self.job, self.plan, self.run, fed, app_dir)
        cfg_path = self.run.dir / "run_config.toml"
        cfg_path.write_text("\n".join(f"{k} = {format_node_config({k: v}).split('=', 1)[1]}" for k, v in cfg.items()))
        res = self.flwr("run", str(app_dir), CONNECTION, "--run-config", str(cfg_path), "--format", "json")
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
        if self.job.app in BUILTIN_APPS:
            return  # the built-in ServerApp writes logs/serverapp.log itself (flotilla.app.serverlog)
        with open(self.run.log_path("serverapp"), "ab") as fh:
            self.log_follower = subprocess.Popen(
                ["flwr", "log", str(self.flwr_run_id), CONNECTION, "--stream"], env=self.env,
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def _flower_status(self) -> str | None:
        res = self.flwr("ls", CONNECTION, "--run-id", str(self.flwr_run_id), "--format", "json", timeout=60)
        try:
            runs = json.loads(res.stdout[res.stdout.index("{"):]).get("runs", [])
            return runs[0].get("status") if runs else None
        except (ValueError, IndexError, AttributeError):
            return None

    def _follow(self, on_update) -> None:
        from flotilla.throttle import Throttler

        throttler = Throttler(self.run) if self.job.heterogeneity.throttle else None
        seen_rounds = 0
        last_status_check = time.time()
        min_devices = self.job.strategy.min_devices
        while True:
            rounds = self.run.rounds()
            if len(rounds) > seen_rounds:
                seen_rounds = len(rounds)
                last = rounds[-1]
                self.progress.round, self.progress.accuracy, self.progress.loss = (
                    last["round"], last["accuracy"], last["loss"])
                for d in last.get("devices", []):
                    self.progress.devices.setdefault(d["name"], {}).update(
                        train_s=d["train_s"], throughput_sps=d.get("throughput_sps"))
            if throttler is not None:
                for rec in throttler.tick():
                    self.progress.message = (f"throttled {rec['device']}: cpus={rec.get('cpus')} "
                                             f"memory={rec.get('memory')}" + (f" ({rec['error']})" if rec.get("error") else ""))
            states = self.target.device_states(self.run)
            for name, state in states.items():
                self.progress.devices.setdefault(name, {})["state"] = state
                if state == "exited" and name not in self.lost:
                    self._device_lost(name)
            if len(states) - len(self.lost) < min_devices:
                raise RunFailed(
                    f"only {len(states) - len(self.lost)} devices left, fewer than strategy.min_devices={min_devices}")
            if on_update:
                on_update(self.progress)
            done = self.progress.round >= self.job.rounds and (self.run.dir / "weights.npz").exists()
            follower_done = self.log_follower is not None and self.log_follower.poll() is not None
            # `flwr ls` costs ~1.4 s of CPU: ask when the record says done, else rarely (catches crashes)
            if done or follower_done or time.time() - last_status_check > 30:
                last_status_check = time.time()
                st = self._flower_status() or ""
                if st.startswith("finished"):
                    if st != "finished:completed":
                        raise RunFailed(f"the Flower run ended as {st}; see {self.run.log_path('serverapp')}")
                    last = max((r.get("round", 0) for r in self.run.rounds()), default=0)  # fresh read: no race
                    self.progress.round = max(self.progress.round, last)
                    if self.progress.round < self.job.rounds:
                        raise RunFailed(f"the Flower run finished after round {self.progress.round} of "
                                        f"{self.job.rounds}; see {self.run.log_path('serverapp')}")
                    return
            time.sleep(0.25)

    def _device_lost(self, name: str) -> None:
        self.lost.add(name)
        tail = _tail(self.target.log_path(self.run, name), 8)
        code = getattr(self.target, "exit_code", lambda n: None)(name)
        why = self.target.explain_exit(self.run, name)
        msg = f"device {name} exited (code {code})" + (f": {why}" if why else "")
        msg += "; last log lines:\n" + "\n".join("    " + t for t in tail)
        self.progress.message = msg
        print(f"flotilla: {msg}", file=sys.stderr, flush=True)
        (self.run.dir / "lost_devices.json").write_text(json.dumps(sorted(self.lost)))
        self.run.write_state(lost_devices=sorted(self.lost))

    def _stop_flower_run(self) -> None:
        if self.flwr_run_id is not None:
            try:
                self.flwr("stop", str(self.flwr_run_id), CONNECTION, timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def _end_log_follower(self) -> None:
        log = self.run.log_path("serverapp")
        if self.flwr_run_id is not None and (not log.exists() or log.stat().st_size == 0):
            try:  # the ServerApp never got to write its log (e.g. failed at import): ask Flower once
                res = self.flwr("log", str(self.flwr_run_id), CONNECTION, "--show", timeout=30)
                log.write_text(res.stdout + res.stderr)
            except subprocess.TimeoutExpired:
                pass
        p = self.log_follower
        if p is not None and p.poll() is None:
            time.sleep(0.5)  # let it catch the last lines
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def _finish(self, status: str, error: str | None) -> dict:
        st = self.run.state()
        rounds = [r for r in self.run.rounds() if r.get("round", 0) >= 1]
        per_device: dict[str, dict] = {
            d.name: {"name": d.name, "class": d.device_class, "train_s": 0.0} for d in self.plan.devices
        }
        for r in rounds:
            for d in r.get("devices", []):
                if d["name"] in per_device:
                    per_device[d["name"]]["train_s"] = round(per_device[d["name"]]["train_s"] + d["train_s"], 3)
        ended = time.time()
        summary = {
            "run_id": self.run.run_id,
            "status": status,
            "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
            "rounds": [{k: r[k] for k in ("round", "accuracy", "loss", "wall_s")} for r in rounds],
            "devices": list(per_device.values()),
            "wall_s": round(ended - st.get("started", ended), 3),
            "target": self.target.name,
            "limits_enforced": st.get("limits_enforced", False),
            "lost_devices": sorted(self.lost),
            "started": st.get("started"),
            "ended": ended,
            "error": error,
        }
        self.run.summary_path.write_text(json.dumps(summary, indent=2))
        self.run.write_state(status=status, ended=ended, error=error)
        try:
            from flotilla.monitor.report import write_report

            write_report(self.run.dir)
        except Exception as err:  # noqa: BLE001 - a report problem must not turn a good run into a failed one
            print(f"flotilla: could not write the report: {err}", file=sys.stderr)
        return summary


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
