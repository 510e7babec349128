"""Run a Flower App on N local devices with the plain Flower deployment engine.

One flower-superlink and N flower-supernode processes on loopback, each in its own process
group, with their own FLWR_HOME; the app is submitted with `flwr run` and followed with
`flwr ls`. The ServerApp writes <output-dir>/metrics.jsonl (one line per round), from which
each round's wall time, slowest device's training time and their difference (the overhead)
are read. bench/round_overhead.py reuses start_plain_fleet, run_app, stop_fleet, read_rounds.

    .venv/bin/python bench/run_plain.py --app baseline --devices 4 --rounds 3 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BUILTIN_APPS = {"baseline": BENCH_DIR / "baseline_app", "noop": BENCH_DIR / "noop_app"}
# Every process the engine starts; leftovers are matched by name, then by our FLWR_HOME.
ENGINE_PROCESS_NAMES = ("flower-superlink", "flower-supernode", "flower-superexec",
                        "flwr-clientapp", "flwr-serverapp")
CONNECTION = "local"  # the [superlink.local] entry in our config.toml


@dataclass
class Fleet:
    work_dir: Path
    flwr_home: Path
    log_dir: Path
    env: dict[str, str]
    address: str
    n_devices: int
    device_names: list[str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> group leader
    _log_files: list = field(default_factory=list)


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until every port is chosen so that no two are the same.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _engine_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # SuperLink/SuperNode start flower-superexec by name: the venv's bin must be on PATH.
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


def _flwr(fleet: Fleet, *args: str, timeout: float = 120) -> dict:
    """Run a `flwr ... --format json` command and return its JSON output."""
    proc = subprocess.run(["flwr", *args, "--format", "json"], env=fleet.env, capture_output=True,
                          text=True, timeout=timeout, cwd=fleet.work_dir)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"flwr {' '.join(args)} failed (exit {proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()[-2000:]}") from None


def _start(fleet: Fleet, name: str, cmd: list[str]) -> None:
    log = open(fleet.log_dir / f"{name}.log", "wb")
    fleet._log_files.append(log)
    # Own session = own process group: stop_fleet ends the process and every child it forked
    # (flower-superexec, ClientApp/ServerApp processes), which SIGTERM alone leaves behind.
    fleet.procs[name] = subprocess.Popen(cmd, env=fleet.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=fleet.work_dir,
                                         start_new_session=True)


def _check_alive(fleet: Fleet) -> None:
    for name, proc in fleet.procs.items():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{log_tail(fleet, name)}")


def log_tail(fleet: Fleet, name: str, lines: int = 20) -> str:
    path = fleet.log_dir / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    kept = [ln for ln in text.splitlines() if "uvicorn.access" not in ln]  # one per HTTP request
    return "\n".join(kept[-lines:])


def start_plain_fleet(n_devices: int, work_dir: Path | None = None, ready_timeout: float = 90) -> Fleet:
    """Start a SuperLink and n_devices SuperNodes; return once all nodes are online."""
    if n_devices < 1:
        raise ValueError("devices: need at least 1 device")
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="flotilla-plain-")).resolve()
    flwr_home, log_dir = work_dir / "flwr_home", work_dir / "logs"
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    link_port, *node_ports = _free_ports(n_devices + 1)
    address = f"127.0.0.1:{link_port}"
    (flwr_home / "config.toml").write_text(
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n')
    fleet = Fleet(work_dir=work_dir, flwr_home=flwr_home, log_dir=log_dir, env=_engine_env(flwr_home),
                  address=address, n_devices=n_devices,
                  device_names=[f"dev-{i}" for i in range(n_devices)])
    try:
        _start(fleet, "superlink", [
            "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
            "--database", str(work_dir / "state.db"), "--port", str(link_port)])
        for i, (name, port) in enumerate(zip(fleet.device_names, node_ports)):
            node_config = f'partition-id={i} num-partitions={n_devices} device="{name}"'
            _start(fleet, name, [
                "flower-supernode", "--insecure", "--superlink", address,
                "--node-config", node_config, "--port", str(port)])
        _wait_for_nodes(fleet, ready_timeout)
    except BaseException:
        stop_fleet(fleet)
        raise
    return fleet


def _wait_for_nodes(fleet: Fleet, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        _check_alive(fleet)
        try:
            nodes = _flwr(fleet, "supernode", "ls", CONNECTION).get("nodes", [])
            online = sum(1 for n in nodes if n.get("status") == "online")
            if online >= fleet.n_devices:
                return
        except RuntimeError:
            pass  # SuperLink not answering yet
        time.sleep(1)
    raise TimeoutError(f"only {online} of {fleet.n_devices} SuperNodes online after {timeout:.0f} s; "
                       f"logs in {fleet.log_dir}")


def resolve_app(app: str) -> Path:
    path = BUILTIN_APPS.get(app, Path(app)).resolve()
    if not (path / "pyproject.toml").is_file():
        raise ValueError(f"--app: {app!r} is neither baseline, noop nor a Flower App directory "
                         "with a pyproject.toml")
    return path


def prepared_app(app: str | Path, dest: Path) -> Path:
    """A copy of the app to run, with bench/bench_strategy.py in each of its packages that imports it."""
    src = resolve_app(str(app))
    dst = Path(dest) / src.name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for pkg in dst.iterdir():
        if (pkg / "__init__.py").exists() and any("bench_strategy" in f.read_text() for f in pkg.glob("*.py")):
            shutil.copy(BENCH_DIR / "bench_strategy.py", pkg / "bench_strategy.py")
    return dst


def run_app(fleet: Fleet, app: str | Path, rounds: int, output_dir: Path,
            timeout: float | None = None, poll_s: float = 15) -> list[dict]:
    """Submit the app with `flwr run`, wait until it finishes and return read_rounds()."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    app_dir = prepared_app(app, output_dir.parent / "apps")
    if (output_dir / "metrics.jsonl").exists():  # the ServerApp appends: rounds would mix
        raise ValueError(f"output dir {output_dir} already holds a metrics.jsonl: use an empty directory")
    app_config = tomllib.loads((app_dir / "pyproject.toml").read_text())
    known = app_config.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    overrides = {"num-server-rounds": rounds, "output-dir": str(output_dir),
                 "min-nodes": fleet.n_devices}  # every round waits for the whole fleet
    # `flwr run` rejects keys the app does not declare: pass only those it knows.
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()
                          if k in known or k == "num-server-rounds")
    submitted = _flwr(fleet, "run", str(app_dir), CONNECTION, "--run-config", run_config)
    if not submitted.get("success") or "run-id" not in submitted:
        raise RuntimeError(f"flwr run {app_dir} failed: {json.dumps(submitted)}")
    run_id = submitted["run-id"]

    # `flwr ls` costs ~1.4 s of CPU (imports), which would disturb the rounds being measured
    # on a small machine: ask it rarely, and at once when metrics.jsonl shows the last round.
    metrics_path = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + (timeout or 300 + 180 * rounds)
    next_ls = 0.0
    while time.monotonic() < deadline:
        _check_alive(fleet)
        all_rounds = len(read_rounds(metrics_path)) >= rounds
        if all_rounds or time.monotonic() >= next_ls:
            runs = _flwr(fleet, "ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
            status = runs[0].get("status", "") if runs else ""
            if status.startswith("finished"):
                if status != "finished:completed":
                    details = runs[0].get("status-details", "")
                    raise RuntimeError(f"run {run_id} of {app_dir.name} ended {status}: {details}\n"
                                       f"superlink log:\n{log_tail(fleet, 'superlink')}")
                return read_rounds(metrics_path)
            next_ls = time.monotonic() + poll_s
        time.sleep(1 if all_rounds else 0.5)
    subprocess.run(["flwr", "stop", str(run_id), CONNECTION], env=fleet.env, capture_output=True)
    raise TimeoutError(f"run {run_id} of {app_dir.name} did not finish in time; logs in {fleet.log_dir}")


def read_rounds(metrics_path: Path) -> list[dict]:
    """Per-round figures from a metrics.jsonl: wall_s, slowest device's train_s, overhead_s."""
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return []
    rounds = []
    text = metrics_path.read_text()
    lines = text.split("\n")[:-1]  # a last line without its newline is still being written
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("round", 0) < 1:  # round 0 = initial central evaluation, no training
            continue
        devices = rec.get("devices") or []
        slowest = max(devices, key=lambda d: d.get("train_s", 0.0), default={})
        slowest_s = float(slowest.get("train_s", 0.0))
        rounds.append({
            "round": rec["round"], "wall_s": rec["wall_s"], "slowest_train_s": round(slowest_s, 3),
            "slowest_device": slowest.get("name"), "overhead_s": round(rec["wall_s"] - slowest_s, 3),
            "accuracy": rec.get("accuracy"), "loss": rec.get("loss"), "devices": devices,
        })
    return rounds


def _leftover_processes(fleet: Fleet) -> list[str]:
    """Engine processes still alive that belong to this fleet (its groups or its FLWR_HOME)."""
    pattern = "|".join(ENGINE_PROCESS_NAMES)
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    groups = {p.pid for p in fleet.procs.values()}
    marker = f"FLWR_HOME={fleet.flwr_home}".encode()
    left = []
    for line in out.splitlines():
        pid = int(line.split(maxsplit=1)[0])
        try:
            ours = os.getpgid(pid) in groups or marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue  # gone meanwhile
        if ours and state != "Z":  # zombies are already dead, waiting for their parent
            left.append(line)
    return left


def stop_fleet(fleet: Fleet, grace: float = 10) -> None:
    """SIGTERM every process group, SIGKILL what is left after the grace; check nothing remains."""
    # Nodes first, so they do not spin on reconnecting to a SuperLink that is gone.
    order = [n for n in fleet.procs if n != "superlink"] + [n for n in fleet.procs if n == "superlink"]
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        for name in order:
            try:
                os.killpg(fleet.procs[name].pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (
                any(p.poll() is None for p in fleet.procs.values()) or _leftover_processes(fleet)):
            time.sleep(0.2)
    for log in fleet._log_files:
        log.close()
    left = _leftover_processes(fleet)
    if left:
        raise RuntimeError("processes left running after stop_fleet:\n" + "\n".join(left))


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(app: str, n_devices: int, rounds: list[dict]) -> dict:
    return {
        "app": app, "devices": n_devices,
        "rounds": [{k: r[k] for k in ("round", "wall_s", "slowest_train_s", "overhead_s",
                                      "accuracy", "loss")} for r in rounds],
        "median_wall_s": _median([r["wall_s"] for r in rounds]),
        "median_slowest_train_s": _median([r["slowest_train_s"] for r in rounds]),
        "median_overhead_s": _median([r["overhead_s"] for r in rounds]),
    }


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default="baseline", help="baseline | noop | path to a Flower App")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="directory for metrics.jsonl (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, state.db)")
    parser.add_argument("--json", action="store_true", help="last stdout line: summary JSON")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.rounds < 1:
        parser.error("--devices and --rounds must be at least 1")
    try:
        resolve_app(args.app)
    except ValueError as err:
        parser.error(str(err))

    # SIGTERM ends the run like Ctrl-C does, so the fleet is always torn down.
    signal.signal(signal.SIGTERM, _interrupt)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    t0 = time.monotonic()
    fleet = None
    failed = True
    try:
        fleet = start_plain_fleet(args.devices)  # tears itself down if it cannot start
        say(f"fleet up in {time.monotonic() - t0:.1f} s: SuperLink {fleet.address}, "
            f"{args.devices} SuperNodes, work dir {fleet.work_dir}")
        rounds = run_app(fleet, args.app, args.rounds, args.out or fleet.work_dir / "out")
        failed = False
    except (RuntimeError, TimeoutError, ValueError) as err:
        print(f"run_plain: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run_plain: interrupted", file=sys.stderr)
        return 130
    finally:
        if fleet is not None:
            # A second Ctrl-C or SIGTERM must not cut the teardown short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stop_fleet(fleet)
            if failed or args.keep:
                say(f"logs kept in {fleet.log_dir}")
            else:
                shutil.rmtree(fleet.work_dir, ignore_errors=True)

    summary = summarize(args.app, args.devices, rounds)
    say(f"{'round':>5} {'wall_s':>8} {'slowest_train_s':>16} {'overhead_s':>11} {'accuracy':>9}")
    for r in summary["rounds"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        say(f"{r['round']:>5} {r['wall_s']:>8.2f} {r['slowest_train_s']:>16.2f} {r['overhead_s']:>11.2f} {acc:>9}")
    say(f"median: wall {summary['median_wall_s']} s, slowest train {summary['median_slowest_train_s']} s, "
        f"overhead {summary['median_overhead_s']} s")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
