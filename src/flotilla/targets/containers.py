"""What the container targets (compose, swarm, k8s) share.

- YAML for people to read: no &anchors/*aliases (`PlainDumper`);
- the SuperLink's environment and health check, the same in every container;
- `create-secrets.sh`, the by-hand equivalent of the secrets `up` makes from a
  certificate bundle (each target supplies its own commands);
- the certificate bundle and SuperNode key registration (TLS runs);
- the image checks before anything starts (present locally, holds the app's dependencies);
- the check that the engine really applied each device's CPU/memory limits.

Nothing here imports docker or kubernetes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

from flotilla.job import Job
from flotilla.plan import Plan
from flotilla.runtime.commands import FLOWER_ENV, METRICS_PORT, SUPERLINK_PORT, record_env
from flotilla.targets.base import TargetError

# Plain TCP connect with the image's Python: no curl/grpc tools needed in the image.
SUPERLINK_HEALTHCHECK = ["CMD", "python", "-c",
                         f"import socket; socket.create_connection(('127.0.0.1', {SUPERLINK_PORT}), 2).close()"]


class PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases: the files are for people to read."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump_plain(doc: dict, width: int = 1000) -> str:
    return yaml.dump(doc, Dumper=PlainDumper, sort_keys=False, width=width)


def superlink_env(job: Job, record_dir: str, run_id: str) -> dict[str, str]:
    """The SuperLink container's environment: Flower's, and where the ServerApp writes the record."""
    return FLOWER_ENV | record_env(record_dir, run_id=run_id, job_name=job.name, policy=job.heterogeneity.policy,
                                   accuracy_metric=job.metrics.accuracy, loss_metric=job.metrics.loss,
                                   metrics_port=METRICS_PORT)


def write_secret_script(out_dir: Path, comment: str, commands: list[str]) -> Path:
    """`create-secrets.sh`: `commands` (which name the bundle's files, never their content), executable."""
    path = Path(out_dir) / "create-secrets.sh"
    path.write_text("\n".join(["#!/bin/sh", f"# {comment}", "set -e", *commands]) + "\n")
    path.chmod(0o755)
    return path


# -- TLS --------------------------------------------------------------------------------

def cert_bundle(plan: Plan, cert_dir: Path | None, namespace: str | None = None):
    """The job's certificate bundle (made or completed as needed; see flotilla.security)."""
    from flotilla.security import bundle_for_plan

    return bundle_for_plan(plan, cert_dir, namespace=namespace)


def register_supernodes(control_address: str, bundle, plan: Plan) -> None:
    """Register every device's SuperNode key with the SuperLink (an unregistered SuperNode is refused)."""
    from flotilla.security import CertError, register_nodes

    try:
        register_nodes(control_address, bundle, [d.name for d in plan.devices])
    except CertError as err:
        raise TargetError(str(err)) from None


# -- the image --------------------------------------------------------------------------

def target_image(image: str | None, registry: str | None) -> str:
    """The image a target runs: the one given, else flotilla:<version> (under `registry` when given)."""
    from flotilla.images.build import default_image

    return image or default_image(registry)


def image_present(image: str, docker_host: str | None = None) -> bool:
    docker = ["docker"] + (["-H", docker_host] if docker_host else [])
    return subprocess.run([*docker, "image", "inspect", image], capture_output=True).returncode == 0


def check_image(image: str, plan: Plan, *, docker_host: str | None = None, must_be_local: bool = False) -> None:
    """TargetError (one line) before anything starts: the image is missing (when it must be in the local
    engine: an image without a registry in its name) or lacks what the app needs (checked when it is local;
    never pulled to look)."""
    from flotilla.images.appdeps import check_image_has_app

    if must_be_local and "/" not in image.split(":")[0] and not image_present(image, docker_host):
        raise TargetError(f"image {image} is not in the local engine; build it with `flotilla images build` "
                          "(or set FLOTILLA_IMAGE to an image you have)")
    check_image_has_app(image, plan.app, docker_host=docker_host)


# -- limits -----------------------------------------------------------------------------

def limits_applied(plan: Plan, limits_of: Callable[[str], Mapping | None], cpu_key: str, memory_key: str) -> bool:
    """What the engine really set matches each device's limits (not what the file asked for).

    limits_of(device) -> the engine's limits of its container or service (None: the engine has none to show,
    which fails the check); cpu_key in nano-CPUs, memory_key in bytes. False too when no device is limited.
    """
    ok = any(d.cpus is not None or d.memory is not None for d in plan.devices)
    for d in plan.devices:
        got = limits_of(d.name)
        if got is None:
            return False
        if d.cpus is not None and got.get(cpu_key) != round(d.cpus * 1e9):
            ok = False
        if d.memory is not None and got.get(memory_key) != d.memory:
            ok = False
    return ok
