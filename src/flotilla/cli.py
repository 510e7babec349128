"""The `flotilla` command: run / submit / status / logs / stop / render / report, and helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flotilla.job import JobError, job_schema, load_job
from flotilla.runs import RunNotFound, find_run, list_runs

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated learning on fleets of unlike devices, on the real Flower engine.")
err = Console(stderr=True)
out = Console()

TargetOpt = typer.Option(None, "--target", "-t", help="local | compose | swarm | k8s (default: the job's target)")
InsecureOpt = typer.Option(False, "--insecure", help="swarm/k8s: no TLS, no SuperNode authentication (trusted networks only).")
ImageOpt = typer.Option(None, "--image", help="compose/swarm/k8s: the Flotilla image (default flotilla:<version>).")
RegistryOpt = typer.Option(None, "--registry", help="swarm/k8s: registry/project the image is pulled from.")
TargetOptOpt = typer.Option(None, "--target-opt", "-O", help="A target option KEY=VALUE (repeatable), e.g. "
                            "subnet=10.213.0.0/24, endpoint_mode=vip, namespace=fl, nfs=server:/export.")
RunsDirOpt = typer.Option(Path("runs"), "--runs-dir", help="Where run records live.")
EXIT_CODES = {"completed": 0, "failed": 1, "stopped": 130}  # 2: bad input (fail())


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _target_options(target: str, insecure: bool, image, registry, pairs) -> dict:
    import yaml

    opts: dict = {}
    if insecure:
        opts["insecure"] = True
    if image:
        opts["image"] = image
    if registry:
        opts["registry"] = registry
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--target-opt: {pair!r} is not KEY=VALUE")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else ""
    from flotilla.targets import TargetError, get_target

    try:
        get_target(target, **opts)  # refuse unknown options now, before anything starts
    except TargetError as e:
        fail(str(e))
    return opts


def _load(job_file: Path, target: Optional[str]):
    from flotilla.targets import REGISTRY

    try:
        job = load_job(job_file)
    except JobError as e:
        fail(str(e))
    target = target or job.target
    if target not in REGISTRY:
        fail(f"--target: {target!r} is not available; choose one of {', '.join(REGISTRY)}")
    return job, target


@app.command()
def run(
    job_file: Path = typer.Argument(..., help="The job file (YAML)."),
    target: Optional[str] = TargetOpt,
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Where run records live (default: the job's runs_dir)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress."),
    json_out: bool = typer.Option(False, "--json", help="End with the summary as one JSON line on stdout."),
    metrics_port: int = typer.Option(0, "--metrics-port", help="Serve Prometheus metrics on this port (0: off)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", hidden=True),
    insecure: bool = InsecureOpt,
    image: Optional[str] = ImageOpt,
    registry: Optional[str] = RegistryOpt,
    target_opt: Optional[list[str]] = TargetOptOpt,
) -> None:
    """Submit a job, follow it to the end, write the record and report."""
    from flotilla.driver import create_run, run_job
    from flotilla.runs import RunRecord

    job, target = _load(job_file, target)
    if dry_run:
        from flotilla.plan import make_plan

        out.print_json(json.dumps(make_plan(job).to_dict()))
        return
    opts = _target_options(target, insecure, image, registry, target_opt)
    rec = RunRecord(run_dir.resolve()) if run_dir else create_run(job, target, runs_dir, target_options=opts)
    if not quiet and not json_out:
        err.print(f"run [bold]{rec.run_id}[/bold] on {target}: {job.device_count} devices, {job.rounds} rounds "
                  f"(record: {rec.dir})", highlight=False)
    if quiet or json_out or not sys.stderr.isatty():
        summary = run_job(job, target, rec, on_update=None if quiet or json_out else _plain_progress(),
                          metrics_port=metrics_port)
    else:
        from flotilla.progress import live_progress

        with live_progress(err) as update:
            summary = run_job(job, target, rec, on_update=update, metrics_port=metrics_port)
    _print_result(summary, rec, json_out)
    raise typer.Exit(EXIT_CODES.get(summary["status"], 1))


def _plain_progress():
    last = {"round": -1}

    def update(p):
        if p.round != last["round"]:
            last["round"] = p.round
            acc = f"{p.accuracy:.4f}" if p.accuracy is not None else "-"
            err.print(f"round {p.round}/{p.rounds or '?'}  accuracy {acc}  ({time.time() - p.started:.0f}s)",
                      highlight=False)

    return update


def _print_result(summary: dict, rec, json_out: bool) -> None:
    if json_out:
        print(json.dumps(summary), flush=True)
        return
    acc = summary["final_accuracy"]
    acc_s = f"{acc:.2%}" if acc is not None else "n/a"
    color = {"completed": "green", "stopped": "yellow"}.get(summary["status"], "red")
    err.print(f"[{color}]{summary['status']}[/{color}]: final {summary.get('accuracy_metric', 'accuracy')} {acc_s} "
              f"after {len(summary['rounds'])} rounds in {summary['wall_s']:.1f}s — record {rec.dir}", highlight=False)
    if summary.get("error"):
        err.print(f"  {summary['error']}", highlight=False)
    for note in summary.get("notes", []):
        err.print(f"  note: {note}", highlight=False)
    report = rec.dir / "report" / "index.html"
    if report.exists():
        err.print(f"  report: {report}", highlight=False)


@app.command()
def submit(
    job_file: Path = typer.Argument(..., help="The job file (YAML)."),
    target: Optional[str] = TargetOpt,
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir"),
    insecure: bool = InsecureOpt,
    image: Optional[str] = ImageOpt,
    registry: Optional[str] = RegistryOpt,
    target_opt: Optional[list[str]] = TargetOptOpt,
) -> None:
    """Start a job in the background and print its run id."""
    from flotilla.driver import create_run

    job, target = _load(job_file, target)
    opts = _target_options(target, insecure, image, registry, target_opt)
    rec = create_run(job, target, runs_dir, target_options=opts)
    with open(rec.log_path("driver"), "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flotilla.cli", "run", str(job_file.resolve()), "--target", target, "--quiet",
             "--run-dir", str(rec.dir)],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    rec.write_state(driver_pid=proc.pid)
    print(rec.run_id)


def _find(run_id: Optional[str], runs_dir: Path):
    try:
        return find_run(runs_dir, run_id)
    except RunNotFound as e:
        fail(str(e))


@app.command()
def status(
    run_id: Optional[str] = typer.Argument(None, help="Run id or prefix (default: the newest run)."),
    runs_dir: Path = RunsDirOpt,
    all_runs: bool = typer.Option(False, "--all", "-a", help="List every run."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show a run's state, rounds and devices (works while it runs and after)."""
    from flotilla.status import run_status, show_status, show_table

    if all_runs:
        recs = list_runs(runs_dir)
        if json_out:
            print(json.dumps([run_status(r) for r in recs]))
        else:
            show_table(out, recs)
        return
    rec = _find(run_id, runs_dir)
    st = run_status(rec)
    if json_out:
        print(json.dumps(st))
    else:
        show_status(out, st)


@app.command()
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
    if not path.exists():
        known = sorted(p.stem for p in rec.logs.glob("*.log"))
        fail(f"--device: no log named {name!r} in run {rec.run_id}; logs: {', '.join(known)}")
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
            elif rec.state().get("status") in ("completed", "failed", "stopped"):
                break
            else:
                time.sleep(0.3)


@app.command()
def stop(
    run_id: str = typer.Argument(..., help="Run id or prefix."),
    runs_dir: Path = RunsDirOpt,
    timeout: float = typer.Option(60, help="Seconds to wait for an orderly stop."),
) -> None:
    """Stop a running job: its driver ends the Flower run and removes everything it started."""
    from flotilla.targets.local import pid_alive

    rec = _find(run_id, runs_dir)
    st = rec.state()
    if st.get("status") in ("completed", "failed", "stopped"):
        out.print(f"run {rec.run_id} already {st['status']}")
        return
    pid = st.get("driver_pid")
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        end = time.time() + timeout
        while pid_alive(pid) and time.time() < end:
            time.sleep(0.2)
    if rec.state().get("status") not in ("completed", "failed", "stopped"):
        # the driver is gone (crashed or killed): clean up from the record
        from flotilla.targets import get_target

        get_target(st.get("target", "local"), **st.get("target_options", {})).down(rec)
        rec.write_state(status="stopped", ended=time.time(), error="stopped by flotilla stop (driver not running)")
    out.print(f"run {rec.run_id} {rec.state().get('status')}")


@app.command()
def throttle(
    run_id: str = typer.Argument(..., help="Run id or prefix."),
    device: str = typer.Argument(..., help="Device name, e.g. pi-2."),
    cpus: Optional[float] = typer.Option(None, "--cpus", help="New CPU quota, e.g. 0.1."),
    memory: Optional[str] = typer.Option(None, "--memory", help="New memory limit, e.g. 512m."),
    runs_dir: Path = RunsDirOpt,
) -> None:
    """Change a running device's CPU/memory limits now (rewrites its cgroup)."""
    from flotilla.throttle import ThrottleError, throttle_now

    rec = _find(run_id, runs_dir)
    try:
        res = throttle_now(rec, device, cpus=cpus, memory=memory)
    except ThrottleError as e:
        fail(str(e))
    out.print(f"{device}: now cpus={res['applied'].get('cpus')} memory={res['applied'].get('memory')}",
              highlight=False)


@app.command()
def render(
    job_file: Path = typer.Argument(..., help="The job file (YAML)."),
    target: Optional[str] = TargetOpt,
    output: Path = typer.Option(Path("rendered"), "--output", "-o", help="Directory to write into."),
    insecure: bool = InsecureOpt,
    image: Optional[str] = ImageOpt,
    registry: Optional[str] = RegistryOpt,
    target_opt: Optional[list[str]] = TargetOptOpt,
) -> None:
    """Write the artifacts that run the job on a target, without running them."""
    from flotilla.plan import make_plan
    from flotilla.targets import TargetError, get_target

    job, target = _load(job_file, target)
    opts = _target_options(target, insecure, image, registry, target_opt)
    try:
        paths = get_target(target, **opts).render(make_plan(job), output)
    except TargetError as e:
        fail(str(e))
    for p in paths:
        out.print(str(p), highlight=False)


@app.command()
def report(run_id: Optional[str] = typer.Argument(None), runs_dir: Path = RunsDirOpt) -> None:
    """(Re)write a run's HTML report with plots."""
    from flotilla.monitor.report import write_report

    rec = _find(run_id, runs_dir)
    out.print(str(write_report(rec.dir)), highlight=False)


@app.command()
def validate(job_file: Path = typer.Argument(...)) -> None:
    """Check a job file; print the plan's devices."""
    from flotilla.plan import make_plan

    job, _ = _load(job_file, None)
    for d in make_plan(job).devices:
        out.print(f"{d.name}: cpus={d.cpus} memory={d.memory} batch={d.train.batch_size} lr={d.train.lr}",
                  highlight=False)


@app.command()
def schema() -> None:
    """Print the job file's JSON schema."""
    print(json.dumps(job_schema(), indent=2))


@app.command()
def init(directory: Path = typer.Argument(Path("."), help="Where to write job.yaml.")) -> None:
    """Write a commented example job file."""
    src = Path(__file__).parent / "examples" / "mnist.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    dst = directory / "job.yaml"
    if dst.exists():
        fail(f"{dst} exists; remove it or choose another directory")
    dst.write_text(src.read_text())
    out.print(f"wrote {dst}; run it with: flotilla run {dst}", highlight=False)


def _register_subcommands() -> None:
    """Commands that live with their subsystem (images, certificates, clusters)."""
    from flotilla.images.cli import images_app
    from flotilla.security import certs_command
    from flotilla.targets.swarm import cluster_nodes_command

    app.add_typer(images_app, name="images", help="Build (and push) the Flotilla container image.")
    app.command("certs")(certs_command)
    cluster = typer.Typer(no_args_is_help=True, help="Inspect the cluster a swarm job runs on.")
    cluster.command("nodes")(cluster_nodes_command)
    app.add_typer(cluster, name="cluster")


_register_subcommands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
