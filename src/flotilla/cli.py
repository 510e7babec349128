"""The `flotilla` command: run / submit / render / validate, and the subsystems' commands (cli_runs: status,
logs, stop, resume, throttle, fault, report; images; certs; cluster). Errors end in main(), in one place."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from flotilla.capacity import check_fleet
from flotilla.errors import EXIT_CODES, FlotillaError, UserError
from flotilla.job import job_schema, load_job

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


def fail(msg: str) -> None:
    """Bad input: one line, exit 2 (printed by main, like every FlotillaError)."""
    raise UserError(msg)


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


def _check_metrics_port(port: int) -> None:
    """A busy --metrics-port is bad input, said before the run exists (not a traceback mid-start)."""
    import socket

    if not port:
        return
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            fail(f"--metrics-port {port}: {e.strerror or e}; pick a free port (or 0 for none)")


def _load(job_file: Path, target: Optional[str], check_app: bool = True):
    from flotilla.appcheck import check_app_imports
    from flotilla.targets import REGISTRY, check_job

    job = load_job(job_file)
    target = target or job.target
    if target not in REGISTRY:
        fail(f"--target: {target!r} is not available; choose one of {', '.join(REGISTRY)}")
    check_job(job, target)
    check_fleet(job, target)  # spreads this target can give; on local, the fleet's memory fits this machine
    if check_app:  # a user's app whose ServerApp/ClientApp does not import is refused here, in a child process
        note = check_app_imports(job.app_spec(), target)
        if note:
            err.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
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

    job, target = _load(job_file, target, check_app=run_dir is None)  # --run-dir: `submit` has checked the app
    if dry_run:
        from flotilla.plan import make_plan

        out.print_json(json.dumps(make_plan(job).to_dict()))
        return
    opts = _target_options(target, insecure, image, registry, target_opt)
    _check_metrics_port(metrics_port)
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
    status = summary["status"]
    if summary.get("degraded"):
        color, status = "yellow", f"{status}, degraded"
    err.print(f"[{color}]{status}[/{color}]: final {summary.get('accuracy_metric', 'accuracy')} {acc_s} "
              f"after {len(summary['rounds'])} rounds in {summary['wall_s']:.1f}s — record {rec.dir}", highlight=False)
    if summary.get("error"):
        err.print(f"  {escape(str(summary['error']))}", highlight=False)
    for warning in summary.get("warnings", []):
        err.print(f"  [yellow]warning[/yellow]: {escape(str(warning))}", highlight=False)
    for note in summary.get("notes", []):
        err.print(f"  note: {escape(str(note))}", highlight=False)
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
    from flotilla.targets import get_target

    job, target = _load(job_file, target)
    opts = _target_options(target, insecure, image, registry, target_opt)
    paths = get_target(target, **opts).render(make_plan(job), output)
    for p in paths:
        out.print(str(p), highlight=False)


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
    """Commands that live with their subsystem (run records, images, certificates, clusters)."""
    from flotilla import cli_runs
    from flotilla.images.cli import images_app
    from flotilla.security import certs_command
    from flotilla.targets.swarm.cli import cluster_nodes_command

    cli_runs.register(app)
    app.add_typer(images_app, name="images", help="Build (and push) the Flotilla container image.")
    app.command("certs")(certs_command)
    cluster = typer.Typer(no_args_is_help=True, help="Inspect the cluster a swarm job runs on.")
    cluster.command("nodes")(cluster_nodes_command)
    app.add_typer(cluster, name="cluster")


_register_subcommands()


def main() -> None:
    """Every FlotillaError ends here: one line on stderr, its exit code (2 bad input, 1 failed, 130 stopped)."""
    try:
        app()
    except FlotillaError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
