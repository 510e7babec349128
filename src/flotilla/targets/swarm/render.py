"""Describe: a Plan + SwarmOptions as a stack file (and the script that makes its secrets). Pure: no engine.

What the seeds do by hand (overlay network, placement constraints, registry
images, NFS data, secrets) comes from the job file:

- one overlay network (attachable, subnet configurable: Swarm's default pool
  10.0.0.0/8 collides with many site LANs);
- the SuperLink on this manager (it writes the run's records into the run
  directory, a bind mount), published in `host` mode by default;
- one service per device, pinned by the class's placement
  (node.hostname, node.labels.*, node.platform.arch), with its CPU/memory
  limits and a restart policy. One service per device, not `replicas`: each
  device has its own partition, auth key and log, and `docker service logs
  <stack>_<device>` is that device's log;
- `endpoint_mode: dnsrr` + `mode: host` by default: they work on every
  kernel; `vip` + `ingress` need IPVS (absent on some kernels, this CI's too);
- TLS + SuperNode authentication unless `insecure`: certificates and keys
  are Docker secrets created by `up` from the bundle's files (names carry a
  hash of the content; secrets are immutable). The stack file only names
  them: no key material is ever rendered.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from flotilla.images.build import image_app_dir
from flotilla.job import format_memory
from flotilla.plan import DevicePlan, Plan, format_node_config
from flotilla.runtime.commands import (
    DEVICE_PORT,
    FLOWER_ENV,
    SUPERLINK_PORT,
    DeviceTls,
    ServerTls,
    device_command,
    remote_device_threads,
    superlink_command,
)
from flotilla.targets.base import TargetError
from flotilla.targets.containers import SUPERLINK_HEALTHCHECK, dump_plain, superlink_env, target_image

RUN_MOUNT = "/flotilla/run"  # the run directory in the SuperLink container (the ServerApp writes the record)
SECRETS_DIR = "/run/secrets"
NETWORK = "flotilla"
LABEL = "io.flotilla"
# job spellings -> what `node.platform.arch` holds (the engine's uname -m)
SWARM_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
              "arm": "armv7l", "armhf": "armv7l", "armv7": "armv7l", "armv7l": "armv7l", "ppc64le": "ppc64le",
              "s390x": "s390x", "riscv64": "riscv64"}


@dataclass
class SwarmOptions:
    stack: str | None = None  # default: the job's name
    image: str | None = None  # default flotilla:<version>, under `registry` when given
    registry: str | None = None
    insecure: bool = False  # plain HTTP and no SuperNode auth: only for trusted networks
    cert_dir: Path | None = None  # default certs/<job>
    subnet: str | None = None  # e.g. 10.213.0.0/24; None lets the engine pick from its pool
    endpoint_mode: str = "dnsrr"  # dnsrr | vip
    publish_mode: str = "host"  # host | ingress
    port: int = SUPERLINK_PORT  # the SuperLink's published port on the manager
    control_host: str = "127.0.0.1"  # how this machine reaches that port
    nfs: str | None = None  # "server:/export/path": shared data, mounted at the job's data.path
    nfs_options: str = "ro,nfsvers=4"
    restart_condition: str = "on-failure"  # none | on-failure | any
    restart_max_attempts: int = 5
    restart_delay: str = "5s"
    reserve: bool = False  # also reserve cpus/memory (the scheduler then refuses to overcommit a node)
    docker_host: str | None = None  # -H for every docker call (default: the CLI's context)


def swarm_arch(arch: str) -> str:
    return SWARM_ARCH.get(arch.lower(), arch.lower())


def class_constraints(placement) -> list[str]:
    out = []
    if placement.hostname:
        out.append(f"node.hostname == {placement.hostname}")
    for k, v in placement.labels.items():
        out.append(f"node.labels.{k} == {v}")
    if placement.arch:
        out.append(f"node.platform.arch == {swarm_arch(placement.arch)}")
    return out


def _content_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


class StackRenderer:
    """Plan + options -> a stack file (dict). Pure: no engine needed."""

    def __init__(self, plan: Plan, opts: SwarmOptions, bundle=None, run_dir: str | None = None,
                 superlink_constraints: list[str] | None = None, run_id: str = "") -> None:
        self.plan, self.opts, self.bundle, self.run_id = plan, opts, bundle, run_id
        self.job = plan.job
        self.stack = opts.stack or self.job.name
        self.image = target_image(opts.image, opts.registry)
        self.tls = not opts.insecure
        self.run_dir = run_dir
        self.superlink_constraints = superlink_constraints or ["node.role == manager"]
        self._check()

    def _check(self) -> None:
        o = self.opts
        if o.endpoint_mode not in ("dnsrr", "vip"):
            raise TargetError(f"swarm endpoint_mode {o.endpoint_mode!r}: use dnsrr or vip")
        if o.publish_mode not in ("host", "ingress"):
            raise TargetError(f"swarm publish mode {o.publish_mode!r}: use host or ingress")
        if o.endpoint_mode == "dnsrr" and o.publish_mode == "ingress":
            raise TargetError("swarm endpoint_mode dnsrr cannot publish in ingress mode (the routing mesh needs a "
                              "VIP); use publish mode host, or endpoint_mode vip on kernels with IPVS")
        if o.restart_condition not in ("none", "on-failure", "any"):
            raise TargetError(f"swarm restart condition {o.restart_condition!r}: use none, on-failure or any")
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", self.stack):
            raise TargetError(f"swarm stack name {self.stack!r}: use letters, digits, '-', '_' and '.'")
        longest = max(len(d.name) for d in self.plan.devices)
        if len(self.stack) + 1 + longest > 63:
            raise TargetError(f"swarm stack name {self.stack!r} + device names exceed 63 characters "
                              "(Docker's limit for service names); choose a shorter stack name")
        if o.nfs and self.job.data.path is None:
            raise TargetError("swarm nfs option needs data.path in the job: the path the share is mounted at")
        if o.nfs and not re.fullmatch(r"[^:\s]+:/\S*", o.nfs):
            raise TargetError(f"swarm nfs {o.nfs!r}: write it as SERVER:/export/path")
        if self.tls and self.bundle is None:
            raise TargetError("swarm TLS needs a certificate bundle (flotilla certs JOB), or pass --insecure")

    # secrets: logical key -> (real docker secret name, file)
    def secrets(self) -> dict[str, tuple[str, Path]]:
        if not self.tls:
            return {}
        b = self.bundle
        files = {"ca-crt": b.ca_cert, "superlink-crt": b.server_cert, "superlink-key": b.server_key}
        for d in self.plan.devices:
            nk = b.node(d.name)
            files[f"{d.name}-key"] = nk.private_key
        # The content hash in the name: secrets are immutable, new certificates need new names.
        return {k: (f"{self.stack}_{k}-{_content_hash(p)}", Path(p)) for k, p in files.items()}

    def secret_commands(self) -> list[str]:
        """The shell lines of create-secrets.sh: each secret made from its file unless it exists."""
        return [f"docker secret inspect {name} >/dev/null 2>&1 || "
                f"docker secret create --label {LABEL}.stack={self.stack} {name} {file.resolve()}"
                for name, file in self.secrets().values()]

    def _secret_refs(self, mapping: dict[str, str]) -> list[dict]:
        return [{"source": k, "target": target, "mode": 0o400} for k, target in mapping.items()]

    def _restart(self) -> dict:
        o = self.opts
        pol = {"condition": o.restart_condition, "delay": o.restart_delay, "window": "30s"}
        if o.restart_max_attempts:
            pol["max_attempts"] = o.restart_max_attempts
        return pol

    def _data_mounts(self) -> list[dict]:
        path = self.job.data.path
        if path is None:
            return []  # mnist-5k and digits are inside the image
        if self.opts.nfs:
            return [{"type": "volume", "source": "data", "target": str(path), "read_only": True}]
        # The same path on every node (like the seeds' data_path), mounted at the same path inside.
        return [{"type": "bind", "source": str(path), "target": str(path), "read_only": True}]

    def _labels(self, role: str, d: DevicePlan | None = None) -> dict[str, str]:
        labels = {f"{LABEL}.stack": self.stack, f"{LABEL}.job": self.job.name, f"{LABEL}.role": role}
        if d is not None:
            labels |= {f"{LABEL}.device": d.name, f"{LABEL}.device-class": d.device_class}
        return labels

    def superlink_service(self) -> dict:
        tls = ServerTls(f"{SECRETS_DIR}/ca.crt", f"{SECRETS_DIR}/superlink.crt", f"{SECRETS_DIR}/superlink.key")
        cmd = superlink_command(tls=tls if self.tls else None, database="/tmp/superlink-state.db")
        records = self.run_dir or "./run"
        svc = {
            "image": self.image,
            "init": True,  # tini as PID 1: forwards SIGTERM, reaps ServerApp processes
            "hostname": "superlink",
            "command": cmd,
            "working_dir": f"{RUN_MOUNT}/outputs/superlink",
            "environment": superlink_env(self.job, RUN_MOUNT, self.run_id),
            "ports": [{"target": SUPERLINK_PORT, "published": self.opts.port, "protocol": "tcp",
                       "mode": self.opts.publish_mode}],
            "networks": [NETWORK],
            "volumes": [{"type": "bind", "source": records, "target": RUN_MOUNT}, *self._data_mounts()],
            "healthcheck": {"test": SUPERLINK_HEALTHCHECK, "interval": "2s", "timeout": "3s", "retries": 30,
                            "start_period": "60s"},
            "stop_grace_period": "10s",
            "labels": self._labels("superlink"),
            "deploy": {
                "endpoint_mode": self.opts.endpoint_mode,
                "placement": {"constraints": list(self.superlink_constraints)},
                "restart_policy": self._restart(),
                "labels": self._labels("superlink"),
            },
        }
        if self.tls:
            svc["secrets"] = self._secret_refs(
                {"ca-crt": "ca.crt", "superlink-crt": "superlink.crt", "superlink-key": "superlink.key"})
        return svc

    def device_service(self, d: DevicePlan) -> dict:
        app = self.plan.app
        # Devices run on their own hosts: a user's app is preloaded from the image (`flotilla images build --app`).
        cmd = device_command(
            name=d.name, device_class=d.device_class, superlink=f"superlink:{SUPERLINK_PORT}", port=DEVICE_PORT,
            node_config=format_node_config(d.node_config()), threads=remote_device_threads(d.cpus),
            tls=DeviceTls(f"{SECRETS_DIR}/ca.crt", f"{SECRETS_DIR}/supernode.key") if self.tls else None,
            trainer=app.builtin, preload_app=None if app.builtin else image_app_dir(app.name))
        deploy: dict = {
            "endpoint_mode": self.opts.endpoint_mode,
            "restart_policy": self._restart(),
            "labels": self._labels("device", d),
        }
        if cons := class_constraints(d.placement):
            deploy["placement"] = {"constraints": cons}
        limits = {}
        if d.cpus is not None:
            limits["cpus"] = f"{d.cpus:g}"
        if d.memory is not None:
            limits["memory"] = format_memory(d.memory).upper()
        if limits:
            deploy["resources"] = {"limits": limits} | ({"reservations": dict(limits)} if self.opts.reserve else {})
        svc = {
            "image": self.image,
            "init": True,
            "hostname": d.name,
            "command": cmd,
            "environment": dict(FLOWER_ENV),
            "networks": [NETWORK],
            "stop_grace_period": "10s",
            "labels": self._labels("device", d),
            "deploy": deploy,
        }
        if mounts := self._data_mounts():
            svc["volumes"] = mounts
        if self.tls:
            svc["secrets"] = self._secret_refs({"ca-crt": "ca.crt", f"{d.name}-key": "supernode.key"})
        return svc

    def document(self, devices: bool = True) -> dict:
        """The stack file; devices=False gives the SuperLink alone (deployed first, see up)."""
        services = {"superlink": self.superlink_service()}
        if devices:
            services |= {d.name: self.device_service(d) for d in self.plan.devices}
        net: dict = {"driver": "overlay", "attachable": True, "labels": self._labels("network")}
        if self.opts.subnet:
            net["ipam"] = {"config": [{"subnet": self.opts.subnet}]}
        doc: dict = {"version": "3.8", "services": services, "networks": {NETWORK: net}}
        if self.opts.nfs and self.job.data.path is not None:
            server, export = self.opts.nfs.split(":", 1)
            doc["volumes"] = {"data": {"driver": "local", "driver_opts": {
                "type": "nfs", "o": f"addr={server},{self.opts.nfs_options}", "device": f":{export}"}}}
        used = {s["source"] for svc in services.values() for s in svc.get("secrets", [])}
        if used:
            doc["secrets"] = {k: {"external": True, "name": name} for k, (name, _) in self.secrets().items()
                              if k in used}
        return doc

    def header(self) -> str:
        lines = [f"# Flotilla job {self.job.name!r} as a Docker Swarm stack. Generated: edit the job file, not this."]
        if self.tls:
            lines.append("# Secrets are external: create them from the certificate bundle first (create-secrets.sh).")
        lines += [f"#   docker stack deploy --with-registry-auth -c stack.yml {self.stack}",
                  f"#   docker stack rm {self.stack}", ""]
        return "\n".join(lines)

    def stack_file(self, devices: bool = True) -> str:
        """The stack file's text: header + document."""
        return self.header() + dump_plain(self.document(devices))
