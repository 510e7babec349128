"""Act: the compose target's lifecycle (up, status, logs, down), driving `docker compose`.

render() writes a compose.yaml that a user can `docker compose up` by hand
(plus Prometheus/Grafana provisioning for `--profile monitoring`); up() renders
into the run directory and starts it; down() removes containers, network and
volumes. Everything `down` needs (project name, file) is in the run's
state.json, so any process can stop a run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flotilla.plan import Plan
from flotilla.runs import RunRecord
from flotilla.runtime.commands import METRICS_PORT, SUPERLINK_PORT
from flotilla.targets.base import Federation, Target, TargetError
from flotilla.targets.compose.engine import Compose, docker, docker_root, engine_answers, project_containers
from flotilla.targets.compose.render import DEFAULT_HOST_PORT, RUN_MOUNT, project_name, write_project
from flotilla.targets.containers import check_image, limits_applied, target_image

_STATE_MAP = {"running": "running", "created": "starting", "restarting": "starting",
              "exited": "exited", "dead": "exited", "removing": "stopped", "paused": "running"}


class ComposeTarget(Target):
    name = "compose"
    devices_share_record = True
    holds_app_for_fleet = True  # the record is mounted in the superlink container (render: under the driver)
    capabilities = frozenset({"restart", "faults"})

    def __init__(self, image: str | None = None, registry: str | None = None, insecure: bool = True) -> None:
        # insecure is accepted for CLI symmetry: this target runs one host's private network without TLS.
        if insecure is False:
            raise TargetError("target compose runs without TLS on one host's private network; drop the TLS option "
                              "or use target swarm/k8s")
        self.image = target_image(image or os.environ.get("FLOTILLA_IMAGE"), registry)
        self._ps_cache: tuple[float, str, dict[str, dict]] | None = None

    # -- render ---------------------------------------------------------------------
    def render(self, plan: Plan, out_dir: Path, *, run_dir: str = "./run",
               host_port: int | str = DEFAULT_HOST_PORT, run_id: str | None = None) -> list[Path]:
        return write_project(plan, out_dir, image=self.image, run_dir=run_dir, host_port=host_port, run_id=run_id,
                             docker_root=docker_root())

    # -- up -------------------------------------------------------------------------
    def up(self, plan: Plan, run: RunRecord) -> Federation:
        project = project_name(run.run_id)
        out_dir = run.dir / "compose"
        compose = Compose(project, str(out_dir / "compose.yaml"))
        if not engine_answers():
            raise TargetError("the Docker engine does not answer (`docker info` fails); start it, "
                              "or point DOCKER_HOST at one")
        # The image is here and has the app's dependencies, or one line says what is missing.
        check_image(self.image, plan, must_be_local=True)
        # Record first: a `down` from another process must find the project even if `up` dies half-way.
        run.write_state(compose_project=project, compose_file=str(out_dir / "compose.yaml"), compose_image=self.image)
        self.render(plan, out_dir, run_dir=str(run.dir), host_port=0, run_id=run.run_id)
        try:
            compose.up(wait_timeout=180)
        except TargetError as err:
            self._dump_logs(run, compose)
            raise TargetError(f"{err} (logs in {run.logs})") from None
        port = compose.published_port("superlink", SUPERLINK_PORT)
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
        out = project_containers(project)
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

    # -- health, recovery, faults (through the Docker engine) ----------------------------
    def device_health(self, run: RunRecord, device: str):
        """A paused container is a stopped device (the watchdog's hang rule); the rest the engine does not say."""
        from flotilla.watchdog import Health

        c = self._containers(run).get(device)
        if c is None or c["State"]["Status"] not in ("running", "paused"):
            return None
        return Health(t=time.time(), stopped=c["State"]["Status"] == "paused")

    def superlink_alive(self, run: RunRecord) -> bool | None:
        c = self._containers(run, max_age=0.5).get("superlink")
        return None if c is None else c["State"]["Status"] in ("running", "paused")

    def stop_device(self, run: RunRecord, device: str) -> None:
        c = self._containers(run, max_age=0).get(device)
        if c is not None:
            docker("unpause", c["Id"], check=False)
            docker("kill", c["Id"], check=False)
        self._ps_cache = None

    def restart_device(self, plan: Plan, run: RunRecord, device: str) -> None:
        c = self._containers(run, max_age=0).get(device)
        if c is None:
            raise TargetError(f"no container for device {device} in project {run.state().get('compose_project')}")
        docker("unpause", c["Id"], check=False)
        docker("restart", "-t", "2", c["Id"])
        self._ps_cache = None

    def inject(self, run: RunRecord, action: str, process: str) -> str:
        """kill | pause | resume a device's or the SuperLink's container; the ServerApp inside the SuperLink's."""
        containers = self._containers(run, max_age=0)
        if process == "serverapp":
            sl = containers.get("superlink")
            try:
                pid = int((run.dir / "serverapp.pid").read_text())
            except (OSError, ValueError) as err:
                raise TargetError(f"no ServerApp process to {action} ({err})") from None
            if sl is None:
                raise TargetError("no superlink container")
            sig = {"kill": "SIGKILL", "pause": "SIGSTOP", "resume": "SIGCONT"}[action]
            # the image's own Python (a minimal base image may have no `kill` binary)
            docker("exec", sl["Id"], "python", "-c", f"import os, signal; os.kill({pid}, signal.{sig})")
            return f"{action} serverapp (pid {pid} in the superlink container)"
        c = containers.get(process)
        if c is None:
            raise TargetError(f"no container {process!r} in project {run.state().get('compose_project')}")
        docker({"kill": "kill", "pause": "pause", "resume": "unpause"}[action], c["Id"])
        self._ps_cache = None
        return f"docker {action} {process} ({c['Name'].lstrip('/')})"

    # -- logs -----------------------------------------------------------------------
    def log_path(self, run: RunRecord, device: str | None) -> Path:
        """Container logs dumped to run.logs/<service>.log (refreshed while the container exists)."""
        service = device or "superlink"
        path = run.log_path(service)
        project = run.state().get("compose_project")
        if project and not run.state().get("compose_down"):
            try:
                Compose(project, run.state()["compose_file"]).dump_log(service, path)
            except TargetError:
                pass
        return path

    def _dump_logs(self, run: RunRecord, compose: Compose) -> None:
        for service in ["superlink", *[d["name"] for d in run.plan().get("devices", [])]]:
            compose.dump_log(service, run.log_path(service))

    # -- down -----------------------------------------------------------------------
    def down(self, run: RunRecord) -> None:
        st = run.state()
        project = st.get("compose_project")
        if not project:
            return
        compose_file = st.get("compose_file")
        compose = Compose(project, compose_file if compose_file and Path(compose_file).is_file() else None)
        if not st.get("compose_down"):
            self._dump_logs(run, compose)  # containers and their logs are about to go
        compose.down()
        self._ps_cache = None
        run.write_state(compose_down=True)

    # -- checks ---------------------------------------------------------------------
    @staticmethod
    def _limits_applied(plan: Plan, project: str) -> bool:
        """What the engine really set (docker inspect), not what the file asked for."""
        host_configs = {svc: c["HostConfig"] for svc, c in project_containers(project).items()}
        return limits_applied(plan, lambda name: host_configs.get(name, {}), "NanoCpus", "Memory")
