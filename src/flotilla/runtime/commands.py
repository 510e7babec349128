"""What every target runs: the Flower processes' commands, ports, environment and threads, in one place.

Local processes, Compose services, Swarm services and Kubernetes pods all
run the same two commands (`python -m flotilla.runtime.superlink ...` and
`python -m flotilla.runtime.device ...`); a target only decides where they
run and how they reach each other.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flotilla import contracts

SUPERLINK_PORT = 8000  # Fleet, Control and runtime APIs on one port (flwr >= 1.40)
DEVICE_PORT = 9094  # a device's SuperNode runtime API, inside its container
METRICS_PORT = 9400  # the ServerApp's Prometheus exporter, inside the SuperLink's container

# Offline, no telemetry, no per-run dependency install (images hold the app's dependencies). The
# SuperExec's task poll is a fallback only: a SuperNode wakes its SuperExec on each task.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class ServerTls:
    ca_cert: str
    cert: str
    key: str


@dataclass(frozen=True)
class DeviceTls:
    ca_cert: str
    private_key: str  # the SuperNode's authentication key (flwr derives the public key from it)


def flower_env(base: dict | None = None) -> dict[str, str]:
    """Environment for local Flower processes: FLOWER_ENV (unless set), the venv's bin on PATH."""
    env = dict(os.environ if base is None else base)
    for k, v in FLOWER_ENV.items():
        env.setdefault(k, v)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def record_env(record_dir: str, *, run_id: str, job_name: str, policy: str, accuracy_metric: str,
               loss_metric: str, metrics_port: int = 0, hold_for_fleet: bool = False) -> dict[str, str]:
    """What the SuperLink (and so its ServerApps) needs to observe the app into the run record; with
    hold_for_fleet, its ServerApps wait for the driver's word that the fleet is connected."""
    env = {
        contracts.RECORD_DIR_ENV: record_dir,
        contracts.RUN_ID_ENV: run_id,
        contracts.JOB_NAME_ENV: job_name,
        contracts.POLICY_ENV: policy,
        contracts.ACCURACY_KEY_ENV: accuracy_metric,
        contracts.LOSS_KEY_ENV: loss_metric,
    }
    if metrics_port:
        env[contracts.METRICS_PORT_ENV] = str(metrics_port)
    if hold_for_fleet:
        env[contracts.HOLD_FOR_FLEET_ENV] = "1"
    return env


def superlink_command(python: str = "python", *, host: str = "0.0.0.0", port: int = SUPERLINK_PORT,
                      tls: ServerTls | None = None, database: str | None = None) -> list[str]:
    cmd = [python, "-m", "flotilla.runtime.superlink"]
    if tls:
        cmd += ["--ssl-ca-certfile", tls.ca_cert, "--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key,
                "--enable-supernode-auth"]
    else:
        cmd.append("--insecure")
    cmd.append("--disable-runtime-dependency-installation")
    if database:
        cmd += ["--database", database]
    return cmd + ["--host", host, "--port", str(port)]


def device_command(python: str = "python", *, name: str, device_class: str, superlink: str,
                   node_config: str, port: int = DEVICE_PORT, threads: int | None = None,
                   tls: DeviceTls | None = None, trainer: bool = False, preload_app: str | None = None,
                   record_dir: str | None = None) -> list[str]:
    """One device: a SuperNode (and the built-in app's warm trainer when `trainer`)."""
    cmd = [python, "-m", "flotilla.runtime.device", "--name", name, "--class", device_class,
           "--superlink", superlink, "--port", str(port)]
    if tls:
        cmd += ["--root-certificates", tls.ca_cert, "--auth-private-key", tls.private_key]
    else:
        cmd.append("--insecure")
    if trainer:
        cmd.append("--trainer")
    if threads:
        cmd += ["--threads", str(threads)]
    if preload_app:
        cmd += ["--preload-app", preload_app]
    if record_dir:
        cmd += ["--record", record_dir]
    return cmd + ["--node-config", node_config]


def device_threads(cpus: float | None, n_devices: int = 1, host_cpus: int | None = None) -> int:
    """Compute threads for a device: its whole-CPU quota, or a fair share of the host it shares with
    n_devices. host_cpus: this machine's by default; for a device on a host of its own (swarm, k8s) whose
    size is unknown here, its quota (or 1)."""
    ncpu = host_cpus or len(os.sched_getaffinity(0))
    if cpus is not None:
        return max(1, min(ncpu, int(cpus)))
    return max(1, ncpu // max(1, n_devices))


def remote_device_threads(cpus: float | None) -> int:
    return device_threads(cpus, 1, host_cpus=max(1, int(cpus or 1)))
