"""Describe: a Plan as a Docker Compose project (compose.yaml + monitoring provisioning). Pure: no engine."""

from __future__ import annotations

import shutil
from pathlib import Path

from flotilla.contracts import HOLD_FOR_FLEET_ENV, OWNER_LEASE_ENV
from flotilla.job import format_memory
from flotilla.plan import DevicePlan, Plan, format_node_config
from flotilla.runtime.commands import (
    DEVICE_PORT,
    FLOWER_ENV,
    METRICS_PORT,
    SUPERLINK_PORT,
    device_command,
    device_threads,
    superlink_command,
)
from flotilla.targets.containers import SUPERLINK_HEALTHCHECK, dump_plain, superlink_env

RUN_MOUNT = "/flotilla/run"  # the run directory inside every container (the ServerApp writes the record there)
STATE_MOUNT = "/state"
LABEL = "io.flotilla"
MONITORING_IMAGES = {
    "prometheus": "prom/prometheus:v2.53.2",
    "cadvisor": "gcr.io/cadvisor/cadvisor:v0.49.1",
    "grafana": "grafana/grafana:11.2.0",
}
DEFAULT_HOST_PORT = "${FLOTILLA_SUPERLINK_PORT:-8000}"


def project_name(run_id: str) -> str:
    """Compose project names allow [a-z0-9_-]; run ids already fit (job names are hostname-like)."""
    return "flotilla-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id.lower())


def _labels(run_id: str | None, role: str, device: DevicePlan | None = None) -> dict[str, str]:
    labels = {f"{LABEL}.role": role}
    if run_id:
        labels[f"{LABEL}.run-id"] = run_id
    if device is not None:
        labels[f"{LABEL}.device"] = device.name
        labels[f"{LABEL}.device-class"] = device.device_class
    return labels


def compose_document(
    plan: Plan,
    *,
    image: str,
    run_dir: str = "./run",
    host_port: int | str = DEFAULT_HOST_PORT,
    run_id: str | None = None,
    docker_root: str = "/var/lib/docker",
) -> dict:
    """The compose.yaml content for `plan`.

    host_port: the SuperLink's published port on 127.0.0.1; 0 lets the engine pick a free one.
    run_dir: host directory mounted at RUN_MOUNT for the ServerApp's records.
    """
    job = plan.job
    app = plan.app
    data_volumes = []
    if job.data.dataset == "mnist" and job.data.path is not None:
        # Same path inside as outside: the run config's data-path is valid in every container.
        data_volumes.append({"type": "bind", "source": str(job.data.path), "target": str(job.data.path),
                             "read_only": True})
    # mnist-5k and digits need no volume: the image holds their extracted cache (see images/Dockerfile).

    services: dict[str, dict] = {}
    run_mount = {"type": "bind", "source": run_dir, "target": RUN_MOUNT, "bind": {"create_host_path": True}}
    services["superlink"] = {
        "image": image,
        "init": True,  # tini as PID 1: forwards SIGTERM, reaps the ServerApp processes superexec leaves behind
        "command": superlink_command(database=f"{STATE_MOUNT}/state.db"),
        "working_dir": f"{RUN_MOUNT}/outputs/superlink",
        # the run's lease: a fleet whose driver died stops itself (the containers stay until `down`); under the
        # driver (a run id) the ServerApp holds the app until the driver says the fleet is connected; a project
        # rendered to run by hand has no driver to wait for
        "environment": superlink_env(job, RUN_MOUNT, run_id or "") | {OWNER_LEASE_ENV: f"{RUN_MOUNT}/owner.lease"}
        | ({HOLD_FOR_FLEET_ENV: "1"} if run_id else {}),
        "ports": [{"target": SUPERLINK_PORT, "host_ip": "127.0.0.1", "protocol": "tcp",
                   **({"published": str(host_port)} if host_port != 0 else {})}],
        "expose": [str(METRICS_PORT)],
        "volumes": [
            {"type": "volume", "source": "superlink-state", "target": STATE_MOUNT},
            run_mount,
            *data_volumes,
        ],
        "healthcheck": {"test": SUPERLINK_HEALTHCHECK, "interval": "1s", "timeout": "3s", "retries": 60,
                        "start_period": "60s"},
        "stop_grace_period": "5s",
        "labels": _labels(run_id, "superlink"),
    }
    for d in plan.devices:
        # One host: every device mounts the record (its node id, its working directory, the app to preload).
        svc: dict = {
            "image": image,
            "init": True,
            "hostname": d.name,
            "command": device_command(
                name=d.name, device_class=d.device_class, superlink=f"superlink:{SUPERLINK_PORT}",
                port=DEVICE_PORT, node_config=format_node_config(d.node_config()),
                threads=device_threads(d.cpus, len(plan.devices)), trainer=app.builtin,
                preload_app=None if app.builtin else f"{RUN_MOUNT}/app", record_dir=RUN_MOUNT),
            "working_dir": f"{RUN_MOUNT}/outputs/{d.name}",
            "environment": FLOWER_ENV | {OWNER_LEASE_ENV: f"{RUN_MOUNT}/owner.lease"},
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "stop_grace_period": "5s",
            "labels": _labels(run_id, "device", d),
            "volumes": [run_mount, *data_volumes],
        }
        limits = {}
        if d.cpus is not None:
            limits["cpus"] = str(d.cpus)
        if d.memory is not None:
            limits["memory"] = format_memory(d.memory)  # exact: '512m', '1g'
        if limits:
            # Compose v2 applies deploy.resources.limits to plain `up` (NanoCpus, Memory), not only to Swarm.
            svc["deploy"] = {"resources": {"limits": limits}}
        services[d.name] = svc

    services.update(_monitoring_services(run_id, docker_root))
    return {
        "name": project_name(run_id) if run_id else f"flotilla-{job.name}",
        "services": services,
        "volumes": {"superlink-state": {"labels": _labels(run_id, "superlink-state")}},
        "networks": {"default": {"labels": _labels(run_id, "network")}},
    }


def _monitoring_services(run_id: str | None, docker_root: str) -> dict[str, dict]:
    """cAdvisor + Prometheus + Grafana, in the `monitoring` profile (started only with --profile monitoring)."""
    return {
        "prometheus": {
            "profiles": ["monitoring"],
            "image": MONITORING_IMAGES["prometheus"],
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.retention.time=7d"],
            "volumes": [{"type": "bind", "source": "./prometheus/prometheus.yml",
                         "target": "/etc/prometheus/prometheus.yml", "read_only": True}],
            "ports": [{"target": 9090, "published": "${FLOTILLA_PROMETHEUS_PORT:-9090}", "host_ip": "127.0.0.1"}],
            "labels": _labels(run_id, "prometheus"),
        },
        "cadvisor": {
            "profiles": ["monitoring"],
            "image": MONITORING_IMAGES["cadvisor"],
            "privileged": True,  # cAdvisor's documented setup: it reads every container's cgroups
            "devices": ["/dev/kmsg:/dev/kmsg"],
            "volumes": [
                {"type": "bind", "source": "/", "target": "/rootfs", "read_only": True},
                {"type": "bind", "source": "/var/run", "target": "/var/run", "read_only": True},
                {"type": "bind", "source": "/sys", "target": "/sys", "read_only": True},
                {"type": "bind", "source": docker_root, "target": "/var/lib/docker", "read_only": True},
                {"type": "bind", "source": "/dev/disk", "target": "/dev/disk", "read_only": True},
            ],
            "expose": ["8080"],
            "labels": _labels(run_id, "cadvisor"),
        },
        "grafana": {
            "profiles": ["monitoring"],
            "image": MONITORING_IMAGES["grafana"],
            "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                            "GF_USERS_ALLOW_SIGN_UP": "false"},
            "volumes": [
                {"type": "bind", "source": "./grafana/provisioning", "target": "/etc/grafana/provisioning",
                 "read_only": True},
                {"type": "bind", "source": "./grafana/dashboards", "target": "/var/lib/grafana/dashboards",
                 "read_only": True},
            ],
            "ports": [{"target": 3000, "published": "${FLOTILLA_GRAFANA_PORT:-3000}", "host_ip": "127.0.0.1"}],
            "depends_on": ["prometheus"],
            "labels": _labels(run_id, "grafana"),
        },
    }


def header(plan: Plan, run_id: str | None) -> str:
    cfg = plan.run_config()
    app = "<flotilla>/app/fab" if plan.app.builtin else str(plan.app.dir)
    return "\n".join([
        f"# Flotilla job {plan.job.name!r}: SuperLink + {len(plan.devices)} devices"
        + (f" (run {run_id})" if run_id else "") + ". Generated: edit the job file, not this.",
        "#   docker compose up -d --wait                      # SuperLink on 127.0.0.1:${FLOTILLA_SUPERLINK_PORT:-8000}",
        "#   docker compose --profile monitoring up -d --wait # + cAdvisor, Prometheus :9090, Grafana :3000",
        f"#   flwr run {app} <superlink>" + (" --run-config \\" if cfg else ""),
        *([f"#     '{format_node_config(cfg)}'"] if cfg else []),
        "#   docker compose down -v                           # remove containers, network and state volume",
        "",
    ])


def write_project(plan: Plan, out_dir: Path, *, image: str, run_dir: str = "./run",
                  host_port: int | str = DEFAULT_HOST_PORT, run_id: str | None = None,
                  docker_root: str = "/var/lib/docker") -> list[Path]:
    """compose.yaml, the monitoring provisioning and (when run by hand: run_dir ./run) the run directory with the
    app the devices preload; returns the files written."""
    from flotilla.monitor.dashboards import write_monitoring

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = compose_document(plan, image=image, run_dir=run_dir, host_port=host_port, run_id=run_id,
                           docker_root=docker_root)
    path = out_dir / "compose.yaml"
    path.write_text(header(plan, run_id) + dump_plain(doc))
    files = [path]
    files += write_monitoring(out_dir, {"flotilla": [f"superlink:{METRICS_PORT}"]}, "cadvisor:8080",
                              job_name="flotilla")
    if run_dir == "./run":
        (out_dir / "run").mkdir(exist_ok=True)  # where the ServerApp's records land when run by hand
        if not plan.app.builtin and not (out_dir / "run" / "app").exists():  # what the devices preload
            shutil.copytree(plan.app.dir, out_dir / "run" / "app",
                            ignore=shutil.ignore_patterns("__pycache__", ".venv", "*.pyc", "runs"))
    return files
