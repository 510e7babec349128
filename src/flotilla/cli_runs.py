"""`flotilla status / logs / stop / resume / throttle / fault / report`: commands on a run's record.

They work from any terminal, while the run goes on and after it ended: the
record (runs/<id>/) is the whole truth; a run whose driver died is found,
cleaned up and, where it finished on its own, recorded as completed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flotilla.errors import EXIT_CODES, UserError
from flotilla.runs import TERMINAL, RunRecord, find_run, list_runs

err = Console(stderr=True)
out = Console()
RunsDirOpt = typer.Option(Path("runs"), "--runs-dir", help="Where run records live.")
LOG_APPEAR_S = 60.0  # `logs --follow` on a run that is starting waits this long for a log to appear


def _find(run_id: Optional[str], runs_dir: Path) -> RunRecord:
    return find_run(runs_dir, run_id)


def _driver_alive(st: dict) -> bool:
    from flotilla.sandbox.procs import pid_alive

    return bool(st.get("driver_pid")) and pid_alive(st["driver_pid"])


def status(
    run_id: Optional[str] = typer.Argument(None, help="Run id or prefix (default: the newest run)."),
    runs_dir: Path = RunsDirOpt,
    all_runs: bool = typer.Option(False, "--all", "-a", help="List every run."),
    json_out: bool = typer.Option(False, "--json"),
    devices: str = typer.Option("auto", "--devices", help="all: a row for every device; N: beyond 20 devices, a "
                                "row per class, then the lost, down and N slowest devices (default 10)."),
) -> None:
    """Show a run's state, rounds and devices (works while it runs and after)."""
    from flotilla.status import parse_devices_option, run_status, show_status, show_table

    if all_runs:
        recs = list_runs(runs_dir)
        if json_out:
            print(json.dumps([run_status(r) for r in recs]))
        else:
            show_table(out, recs)
        return
    shown = parse_devices_option(devices)
    st = run_status(_find(run_id, runs_dir))
    print(json.dumps(st)) if json_out else show_status(out, st, shown)


def logs(
    run_id: str = typer.Argument(..., help="Run id or prefix."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="A device name (default: the ServerApp log)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines while the run goes on."),
    runs_dir: Path = RunsDirOpt,
    lines: int = typer.Option(0, "--tail", "-n", help="Only the last N lines (0: all)."),
) -> None:
    """Print a device's log, or the ServerApp's."""
    rec = _find(run_id, runs_dir)
    name = device or "serverapp"
    path = rec.log_path(name)
    known = {d["name"] for d in rec.plan()["devices"]} | {"serverapp", "superlink", "driver", "flwr-run"}
    if device and device not in known:
        raise UserError(f"--device: {device!r} is not a device of run {rec.run_id}; its devices: "
                        f"{', '.join(sorted(d['name'] for d in rec.plan()['devices']))}")
    end = time.time() + LOG_APPEAR_S
    while not path.exists():  # a run just submitted: its log is about to appear
        if not follow or rec.state().get("status") in TERMINAL or time.time() > end:
            logs_now = sorted(p.stem for p in rec.logs.glob("*.log"))
            raise UserError(f"no log {name!r} in run {rec.run_id} (yet); logs: {', '.join(logs_now) or 'none'}")
        time.sleep(0.3)
    with open(path, errors="replace") as fh:
        text = fh.read()
        chunk = text.splitlines(keepends=True)[-lines:] if lines else [text]
        sys.stdout.write("".join(chunk))
        sys.stdout.flush()
        while follow:
            line = fh.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            elif rec.state().get("status") in TERMINAL:
                break
            else:
                time.sleep(0.3)


def stop(
    run_id: str = typer.Argument(..., help="Run id or prefix."),
    runs_dir: Path = RunsDirOpt,
    timeout: float = typer.Option(60, help="Seconds to wait for an orderly stop."),
) -> None:
    """Stop a running job: its driver ends the Flower run and removes everything it started."""
    from flotilla.sandbox.procs import pid_alive

    rec = _find(run_id, runs_dir)
    st = rec.state()
    if st.get("status") in TERMINAL:
        out.print(f"run {rec.run_id} already {st['status']}")
        return
    pid = st.get("driver_pid")
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        end = time.time() + timeout
        while pid_alive(pid) and time.time() < end:
            time.sleep(0.2)
    if rec.state().get("status") not in TERMINAL:
        adopt(rec, "stopped by flotilla stop (its driver was not running)")
    out.print(f"run {rec.run_id} {rec.state().get('status')}")


def adopt(rec: RunRecord, why: str) -> str:
    """A run whose driver is gone: clean up what it left; completed (with its summary and report) if the app
    finished on its own, else stopped."""
    from flotilla.summary import finished_by_itself, write_summary
    from flotilla.targets import get_target

    st = rec.state()
    target = get_target(st.get("target", "local"), **st.get("target_options", {}))
    target.down(rec)
    status = "completed" if finished_by_itself(rec) else "stopped"
    write_summary(rec, status, None if status == "completed" else why, target_name=target.name,
                  notes=[f"its driver was gone; recorded by {why.split(' (')[0].removeprefix('stopped by ')}"])
    return status


def resume(
    run_id: str = typer.Argument(..., help="Run id or prefix."),
    runs_dir: Path = RunsDirOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress."),
    json_out: bool = typer.Option(False, "--json", help="End with the summary as one JSON line on stdout."),
) -> None:
    """Continue a stopped, failed or orphaned run from its last checkpoint, on the same target and record."""
    import yaml

    from flotilla.contracts import RecordPaths
    from flotilla.driver import run_job
    from flotilla.job import parse_job
    from flotilla.runtime.checkpoint import read_checkpoint

    rec = _find(run_id, runs_dir)
    st = rec.state()
    if st.get("status") not in TERMINAL and _driver_alive(st):
        raise UserError(f"run {rec.run_id} is {st.get('status')} (driver pid {st['driver_pid']}); "
                        "stop it first or let it finish")
    job = parse_job(yaml.safe_load((rec.dir / "job.yaml").read_text()), str(rec.dir / "job.yaml"))
    spec = job.app_spec()
    if not spec.builtin and not spec.imports_flotilla():
        raise UserError(f"run {rec.run_id}: app {spec.name!r} uses no Flotilla strategy, so it cannot continue "
                        f"where it stopped (each round's model is in {RecordPaths(rec.dir).checkpoints}); "
                        "run the job again, or wrap its strategy in flotilla.strategy.Auto")
    cp = read_checkpoint(RecordPaths(rec.dir))
    if cp is None:
        raise UserError(f"run {rec.run_id} has no checkpoint (it ended before its first round did); "
                        "run the job again with `flotilla run`")
    if st.get("rounds") and cp.round >= st["rounds"]:
        raise UserError(f"run {rec.run_id} has run all its {st['rounds']} rounds; nothing to resume")
    if st.get("status") not in TERMINAL:
        adopt(rec, "flotilla resume (its driver was not running)")
    if not quiet and not json_out:
        err.print(f"resuming run [bold]{rec.run_id}[/bold] after round {cp.round} on {st.get('target')}",
                  highlight=False)
    summary = run_job(job, st.get("target"), rec, resume=True)
    if json_out:
        print(json.dumps(summary), flush=True)
    else:
        err.print(f"{summary['status']}: {len(summary['rounds'])} rounds, final accuracy "
                  f"{summary['final_accuracy']} — record {rec.dir}", highlight=False)
    raise typer.Exit(EXIT_CODES.get(summary["status"], 1))


def throttle(
    run_id: str = typer.Argument(..., help="Run id or prefix."),
    device: str = typer.Argument(..., help="Device name, e.g. pi-2."),
    cpus: Optional[float] = typer.Option(None, "--cpus", help="New CPU quota, e.g. 0.1."),
    memory: Optional[str] = typer.Option(None, "--memory", help="New memory limit, e.g. 512m."),
    runs_dir: Path = RunsDirOpt,
) -> None:
    """Change a running device's CPU/memory limits now (rewrites its cgroup)."""
    from flotilla.throttle import throttle_now

    res = throttle_now(_find(run_id, runs_dir), device, cpus=cpus, memory=memory)
    out.print(f"{device}: now cpus={res['applied'].get('cpus')} memory={res['applied'].get('memory')}",
              highlight=False)


def fault(
    run_id: str = typer.Argument(..., help="Run id or prefix."),
    process: str = typer.Argument(..., help="A device name, superlink or serverapp."),
    kill: bool = typer.Option(False, "--kill", help="SIGKILL it."),
    pause: bool = typer.Option(False, "--pause", help="SIGSTOP it (a hang)."),
    resume_it: bool = typer.Option(False, "--resume", help="SIGCONT a paused one."),
    runs_dir: Path = RunsDirOpt,
) -> None:
    """Inject a fault into a running job (tests, demos): kill or pause a process of it."""
    from flotilla.faults import inject
    from flotilla.targets import get_target

    actions = [a for a, on in (("kill", kill), ("pause", pause), ("resume", resume_it)) if on]
    if len(actions) != 1:
        raise UserError("give exactly one of --kill, --pause, --resume")
    rec = _find(run_id, runs_dir)
    st = rec.state()
    if st.get("status") != "running" or not _driver_alive(st):
        raise UserError(f"run {rec.run_id} is {st.get('status')}: faults go into a running run")
    devices = {d["name"] for d in rec.plan()["devices"]}
    if process not in devices | {"superlink", "serverapp"}:
        raise UserError(f"{process!r} is neither a device of run {rec.run_id} nor superlink or serverapp")
    target = get_target(st.get("target", "local"), **st.get("target_options", {}))
    out.print(inject(target, rec, actions[0], process)["what"], highlight=False)


def report(run_id: Optional[str] = typer.Argument(None), runs_dir: Path = RunsDirOpt) -> None:
    """(Re)write a run's HTML report with plots."""
    from flotilla.monitor.report import write_report

    out.print(str(write_report(_find(run_id, runs_dir).dir)), highlight=False)


def register(app: typer.Typer) -> None:
    for cmd in (status, logs, stop, resume, throttle, fault, report):
        app.command(cmd.__name__)(cmd)
