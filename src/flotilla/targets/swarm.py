"""Docker Swarm: the Plan as a stack file, deployed across the swarm's nodes.

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

The driver calls the docker CLI (subprocess), not the docker SDK: `docker
stack deploy` exists only in the CLI (the SDK has no stacks), and the CLI
honours the user's contexts, DOCKER_HOST and registry logins exactly as the
commands the README shows.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
import yaml

from flotilla.images.appdeps import check_image_has_app
from flotilla.images.build import image_app_dir
from flotilla.job import format_memory
from flotilla.plan import DevicePlan, Plan, format_node_config
from flotilla.runs import RunRecord
from flotilla.runtime.commands import (
    DEVICE_PORT, FLOWER_ENV, METRICS_PORT, SUPERLINK_PORT, DeviceTls, ServerTls, device_command, record_env,
    remote_device_threads, superlink_command,
)
from flotilla.targets.base import Federation, Target, TargetError

RUN_MOUNT = "/flotilla/run"  # the run directory in the SuperLink container (the ServerApp writes the record)
SECRETS_DIR = "/run/secrets"
NETWORK = "flotilla"
LABEL = "io.flotilla"
# job spellings -> what `node.platform.arch` holds (the engine's uname -m)
SWARM_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
              "arm": "armv7l", "armhf": "armv7l", "armv7": "armv7l", "armv7l": "armv7l", "ppc64le": "ppc64le",
              "s390x": "s390x", "riscv64": "riscv64"}
_TASK_STATE = {"running": "running", "new": "starting", "pending": "starting", "assigned": "starting",
               "accepted": "starting", "preparing": "starting", "ready": "starting", "starting": "starting",
               "complete": "exited", "failed": "exited", "rejected": "exited", "orphaned": "exited",
               "shutdown": "stopped", "remove": "stopped"}


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


# -- helpers ----------------------------------------------------------------------

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


def _default_image(registry: str | None) -> str:
    from flotilla.images import default_image

    return default_image(registry)


class _Dumper(yaml.SafeDumper):
    """Readable output: no anchors/aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


# -- rendering ----------------------------------------------------------------------

class StackRenderer:
    """Plan + options -> a stack file (dict). Pure: no engine needed."""

    def __init__(self, plan: Plan, opts: SwarmOptions, bundle=None, run_dir: str | None = None,
                 superlink_constraints: list[str] | None = None, run_id: str = "") -> None:
        self.plan, self.opts, self.bundle, self.run_id = plan, opts, bundle, run_id
        self.job = plan.job
        self.stack = opts.stack or self.job.name
        self.image = opts.image or _default_image(opts.registry)
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
        job = self.job
        svc = {
            "image": self.image,
            "init": True,  # tini as PID 1: forwards SIGTERM, reaps ServerApp processes
            "hostname": "superlink",
            "command": cmd,
            "working_dir": f"{RUN_MOUNT}/outputs/superlink",
            "environment": FLOWER_ENV | record_env(RUN_MOUNT, run_id=self.run_id, job_name=job.name,
                                                   policy=job.heterogeneity.policy,
                                                   accuracy_metric=job.metrics.accuracy,
                                                   loss_metric=job.metrics.loss, metrics_port=METRICS_PORT),
            "ports": [{"target": SUPERLINK_PORT, "published": self.opts.port, "protocol": "tcp",
                       "mode": self.opts.publish_mode}],
            "networks": [NETWORK],
            "volumes": [{"type": "bind", "source": records, "target": RUN_MOUNT}, *self._data_mounts()],
            "healthcheck": {
                "test": ["CMD", "python", "-c",
                         f"import socket; socket.create_connection(('127.0.0.1', {SUPERLINK_PORT}), 2).close()"],
                "interval": "2s", "timeout": "3s", "retries": 30, "start_period": "60s",
            },
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


def dump_stack(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000)


# -- the docker CLI -------------------------------------------------------------------

class Docker:
    def __init__(self, host: str | None = None) -> None:
        self.base = ["docker"] + (["-H", host] if host else [])

    def run(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
            ) -> subprocess.CompletedProcess:
        try:
            res = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, input=input)
        except FileNotFoundError:
            raise TargetError("the swarm target needs the docker CLI on PATH") from None
        except subprocess.TimeoutExpired:
            raise TargetError(f"`docker {' '.join(args[:3])}` did not finish within {timeout:.0f} s") from None
        if check and res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise TargetError(f"`docker {' '.join(args[:3])}` failed: {msg[-1] if msg else res.returncode}")
        return res

    def json_lines(self, *args: str) -> list[dict]:
        out = self.run(*args, "--format", "{{json .}}").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def swarm(self) -> dict:
        res = self.run("info", "--format", "{{json .Swarm}}", check=False, timeout=30)
        if res.returncode != 0:
            why = (res.stderr or res.stdout).strip().splitlines()
            raise TargetError(f"the Docker engine does not answer ({why[-1] if why else 'docker info failed'}); "
                              "start it or set DOCKER_HOST")
        return json.loads(res.stdout)

    def require_manager(self) -> dict:
        sw = self.swarm()
        if sw.get("LocalNodeState") != "active":
            raise TargetError("Docker Swarm is not active on this engine; run `docker swarm init` here "
                              "(and `docker swarm join` on each device), or point DOCKER_HOST at a manager")
        if not sw.get("ControlAvailable"):
            raise TargetError("this engine is a swarm worker; run flotilla on a manager (or set DOCKER_HOST to one)")
        return sw


def cluster_nodes(docker_host: str | None = None) -> list[dict]:
    """Swarm nodes as {hostname, arch, cpus, memory, labels, role, state, availability, id, leader}."""
    d = Docker(docker_host)
    d.require_manager()
    ids = d.run("node", "ls", "--format", "{{.ID}}").stdout.split()
    if not ids:
        return []
    nodes = []
    for n in json.loads(d.run("node", "inspect", *ids).stdout):
        desc, spec, status = n.get("Description", {}), n.get("Spec", {}), n.get("Status", {})
        nodes.append({
            "id": n["ID"],
            "hostname": desc.get("Hostname", ""),
            "arch": desc.get("Platform", {}).get("Architecture", ""),
            "os": desc.get("Platform", {}).get("OS", ""),
            "cpus": desc.get("Resources", {}).get("NanoCPUs", 0) / 1e9,
            "memory": desc.get("Resources", {}).get("MemoryBytes", 0),
            "labels": spec.get("Labels") or {},
            "role": spec.get("Role", ""),
            "availability": spec.get("Availability", ""),
            "state": status.get("State", ""),
            "addr": status.get("Addr", ""),
            "leader": bool(n.get("ManagerStatus", {}).get("Leader")),
            "engine_labels": desc.get("Engine", {}).get("Labels") or {},
        })
    return sorted(nodes, key=lambda x: (x["role"] != "manager", x["hostname"]))


def _node_matches(node: dict, placement) -> bool:
    if placement.hostname and node["hostname"] != placement.hostname:
        return False
    if placement.arch and node["arch"] != swarm_arch(placement.arch):
        return False
    return all(node["labels"].get(k) == v for k, v in placement.labels.items())


def check_placement(plan: Plan, nodes: list[dict]) -> dict[str, list[str]]:
    """Class -> hostnames it may run on; TargetError (one line) if a class fits no usable node."""
    usable = [n for n in nodes if n["state"] == "ready" and n["availability"] == "active"]
    if not usable:
        raise TargetError("the swarm has no ready, active node; see `docker node ls`")
    if not any(n["role"] == "manager" for n in usable):
        raise TargetError("no ready manager node to run the SuperLink on; see `docker node ls`")
    out: dict[str, list[str]] = {}
    for i, cls in enumerate(plan.job.devices):
        cons = class_constraints(cls.placement)
        match = [n for n in usable if _node_matches(n, cls.placement)]
        if not match:
            have = ", ".join(f"{n['hostname']} ({n['arch']}"
                             + "".join(f", {k}={v}" for k, v in sorted(n["labels"].items())) + ")" for n in usable)
            hint = ("label a node: docker node update --label-add KEY=VALUE NODE" if cls.placement.labels
                    else "fix the placement")
            raise TargetError(f"devices[{i}] ({cls.name}): placement {' && '.join(cons)} matches no ready node "
                              f"of the swarm [{have}]; {hint}")
        if cls.cpus is not None and not any(n["cpus"] >= cls.cpus for n in match):
            raise TargetError(f"devices[{i}] ({cls.name}): cpus {cls.cpus:g} exceeds every matching node "
                              f"(at most {max(n['cpus'] for n in match):g}); lower devices[{i}].cpus")
        if cls.memory is not None and not any(n["memory"] >= cls.memory for n in match):
            raise TargetError(f"devices[{i}] ({cls.name}): memory {format_memory(cls.memory)} exceeds every "
                              f"matching node (at most {format_memory(max(n['memory'] for n in match))}); "
                              f"lower devices[{i}].memory")
        out[cls.name] = [n["hostname"] for n in match]
    return out


# -- the target ------------------------------------------------------------------------

class SwarmTarget(Target):
    name = "swarm"

    def __init__(self, **options) -> None:
        self.opts = SwarmOptions(**options)

    def _bundle(self, plan: Plan):
        if self.opts.insecure:
            return None
        from flotilla.security import bundle_for_plan

        return bundle_for_plan(plan, self.opts.cert_dir)

    # -- render -------------------------------------------------------------------------
    def render(self, plan: Plan, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        r = StackRenderer(plan, self.opts, self._bundle(plan), run_dir=str(out_dir / "run"))
        (out_dir / "run").mkdir(exist_ok=True)
        path = out_dir / "stack.yml"
        path.write_text(r.header() + dump_stack(r.document()))
        paths = [path]
        if r.tls:
            lines = ["#!/bin/sh", "# Docker secrets from the certificate bundle's files "
                     "(`flotilla submit --target swarm` does this itself).", "set -e"]
            for name, file in r.secrets().values():
                lines.append(f"docker secret inspect {name} >/dev/null 2>&1 || "
                             f"docker secret create --label {LABEL}.stack={r.stack} {name} {file.resolve()}")
            script = out_dir / "create-secrets.sh"
            script.write_text("\n".join(lines) + "\n")
            script.chmod(0o755)
            paths.append(script)
        return paths

    # -- up -----------------------------------------------------------------------------
    def up(self, plan: Plan, run: RunRecord) -> Federation:
        # the app's dependencies are in the image (checked when the image is local; never pulled to look)
        check_image_has_app(self.opts.image or _default_image(self.opts.registry), plan.app,
                            docker_host=self.opts.docker_host)
        docker = Docker(self.opts.docker_host)
        sw = docker.require_manager()
        check_placement(plan, cluster_nodes(self.opts.docker_host))
        bundle = self._bundle(plan)
        # The SuperLink writes the records into run.dir: it must run on this engine's node.
        r = StackRenderer(plan, self.opts, bundle, run_dir=str(run.dir),
                          superlink_constraints=[f"node.id == {sw['NodeID']}"], run_id=run.run_id)
        stacks = [s["Name"] for s in docker.json_lines("stack", "ls")]
        if r.stack in stacks:
            raise TargetError(f"stack {r.stack} is already deployed: a run of this job is active; "
                              f"stop it (flotilla stop) or `docker stack rm {r.stack}`")
        out = run.dir / "swarm"
        out.mkdir(exist_ok=True)
        run.write_state(swarm_stack=r.stack, docker_host=self.opts.docker_host, image=r.image, tls=r.tls,
                        superlink_port=self.opts.port, swarm_network=f"{r.stack}_{NETWORK}")
        for name, file in r.secrets().values():
            if docker.run("secret", "inspect", name, check=False).returncode != 0:
                docker.run("secret", "create", "--label", f"{LABEL}.stack={r.stack}", name, str(file))
        deploy = ["stack", "deploy", "--with-registry-auth", "--prune",
                  "--resolve-image", "always" if self._image_in_registry(r.image) else "never"]
        # SuperLink first; devices once their keys are registered (an unregistered SuperNode is refused).
        first, full = out / "stack-superlink.yml", out / "stack.yml"
        first.write_text(r.header() + dump_stack(r.document(devices=False)))
        full.write_text(r.header() + dump_stack(r.document()))
        docker.run(*deploy, "-c", str(first), r.stack, timeout=300)
        address = f"{self.opts.control_host}:{self.opts.port}"
        self._wait_superlink(docker, r.stack, run, timeout=240)
        if bundle is not None:
            from flotilla.security import CertError, register_nodes

            try:
                register_nodes(address, bundle, [d.name for d in plan.devices])
            except CertError as err:
                raise TargetError(str(err)) from None
        docker.run(*deploy, "-c", str(full), r.stack, timeout=300)
        limits_ok = self._limits_applied(docker, r.stack, plan)
        run.write_state(limits_enforced=limits_ok, limits_note="swarm: NanoCPUs/MemoryBytes on each device service")
        return Federation(control_address=address, insecure=not r.tls,
                          root_certificates=str(bundle.ca_cert.resolve()) if bundle else None, output_dir=RUN_MOUNT)

    def _image_in_registry(self, image: str) -> bool:
        first = image.split("/")[0]
        return "/" in image and ("." in first or ":" in first or first == "localhost") or bool(self.opts.registry)

    def _wait_superlink(self, docker: Docker, stack: str, run: RunRecord, timeout: float) -> None:
        end = time.time() + timeout
        why = "no task yet"
        while time.time() < end:
            tasks = self._tasks(docker, stack).get("superlink", [])
            cur = _current_task(tasks)
            if cur is not None:
                why = f"{cur['CurrentState']}" + (f": {cur['Error']}" if cur.get("Error") else "")
                if cur["CurrentState"].lower().startswith("running") and _port_open(self.opts.control_host,
                                                                                    self.opts.port):
                    return
                if "No such image" in cur.get("Error", "") or "pull access denied" in cur.get("Error", ""):
                    raise TargetError(f"the SuperLink task cannot get its image ({cur['Error']}); push the image to "
                                      "a registry the nodes can reach (--registry) or load it on each node")
            time.sleep(1)
        self.log_path(run, None)
        raise TargetError(f"the SuperLink of stack {stack} is not reachable at "
                          f"{self.opts.control_host}:{self.opts.port} after {timeout:.0f} s ({why}); "
                          f"see {run.log_path('superlink')}")

    @staticmethod
    def _tasks(docker: Docker, stack: str) -> dict[str, list[dict]]:
        """Service (without the stack prefix) -> its tasks, newest first."""
        res = docker.run("stack", "ps", stack, "--no-trunc", "--format", "{{json .}}", check=False)
        out: dict[str, list[dict]] = {}
        for line in res.stdout.splitlines():
            if not line.strip():
                continue
            t = json.loads(line)
            # Name is "<stack>_<service>.<slot>" (history rows may carry a "\_ " prefix)
            name = t["Name"].lstrip("\\_ ").rsplit(".", 1)[0].removeprefix(f"{stack}_")
            out.setdefault(name, []).append(t)
        return out

    # -- status -------------------------------------------------------------------------
    def device_states(self, run: RunRecord) -> dict[str, str]:
        st = run.state()
        names = st.get("devices") or [d["name"] for d in run.plan()["devices"]]
        stack = st.get("swarm_stack")
        if not stack or st.get("swarm_removed"):
            return {n: "stopped" for n in names}
        tasks = self._tasks(Docker(st.get("docker_host")), stack)
        states = {n: task_state(tasks.get(n, [])) for n in names}
        # Where each device runs (the node's hostname), for `flotilla status` and the record.
        nodes = dict(st.get("device_nodes") or {})
        for n in names:
            cur = _current_task(tasks.get(n, []))
            if states[n] == "running" and cur and cur.get("Node") and nodes.get(n) != cur["Node"]:
                nodes[n] = cur["Node"]
        if nodes != (st.get("device_nodes") or {}):
            run.write_state(device_nodes=nodes)
        return states

    def exit_code(self, run: RunRecord, device: str) -> int | None:
        name = device
        st = run.state()
        docker = Docker(st.get("docker_host"))
        tasks = self._tasks(docker, st.get("swarm_stack", ""))
        for t in tasks.get(name, []):
            res = docker.run("inspect", t["ID"], check=False)
            if res.returncode == 0:
                code = json.loads(res.stdout)[0].get("Status", {}).get("ContainerStatus", {}).get("ExitCode")
                if code is not None:
                    return int(code)
        return None

    # -- logs ---------------------------------------------------------------------------
    def log_path(self, run: RunRecord, device: str | None) -> Path:
        service = device or "superlink"
        path = run.log_path(service)
        st = run.state()
        if st.get("swarm_stack") and not st.get("swarm_removed"):
            res = Docker(st.get("docker_host")).run(
                "service", "logs", "--raw", "--no-task-ids", f"{st['swarm_stack']}_{service}", check=False)
            if res.returncode == 0:
                path.write_text(res.stdout + res.stderr)
        return path

    # -- down ---------------------------------------------------------------------------
    def down(self, run: RunRecord) -> None:
        st = run.state()
        stack = st.get("swarm_stack")
        if not stack or st.get("swarm_removed"):
            return
        docker = Docker(st.get("docker_host"))
        for name in ["superlink", *(st.get("devices") or [])]:
            self.log_path(run, name if name != "superlink" else None)
        docker.run("stack", "rm", stack, check=False)
        network = st.get("swarm_network", f"{stack}_{NETWORK}")
        end = time.time() + 120
        while time.time() < end:
            services = docker.run("service", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={stack}",
                                  check=False).stdout.split()
            nets = docker.run("network", "ls", "-q", "--filter", f"name=^{network}$", check=False).stdout.split()
            if not services and not nets:
                break
            time.sleep(1)
        else:
            raise TargetError(f"stack {stack} was not fully removed within 120 s; check `docker stack ps {stack}`")
        # External secrets outlive `stack rm`; ours carry the stack label. In use until the tasks are gone.
        secrets = docker.run("secret", "ls", "-q", "--filter", f"label={LABEL}.stack={stack}", check=False).stdout
        end = time.time() + 60
        for sid in secrets.split():
            while docker.run("secret", "rm", sid, check=False).returncode != 0 and time.time() < end:
                time.sleep(1)
        run.write_state(swarm_removed=True)

    # -- checks -------------------------------------------------------------------------
    @staticmethod
    def _limits_applied(docker: Docker, stack: str, plan: Plan) -> bool:
        ok = any(d.cpus is not None or d.memory is not None for d in plan.devices)
        for d in plan.devices:
            res = docker.run("service", "inspect", f"{stack}_{d.name}", check=False)
            if res.returncode != 0:
                return False
            lim = json.loads(res.stdout)[0]["Spec"]["TaskTemplate"].get("Resources", {}).get("Limits", {})
            if d.cpus is not None and lim.get("NanoCPUs") != round(d.cpus * 1e9):
                ok = False
            if d.memory is not None and lim.get("MemoryBytes") != d.memory:
                ok = False
        return ok


def _current_task(tasks: list[dict]) -> dict | None:
    for t in tasks:
        if t.get("DesiredState", "").lower() in ("running", "ready", "accepted"):
            return t
    return tasks[0] if tasks else None


def task_state(tasks: list[dict]) -> str:
    """A device service's tasks -> running | starting | exited | stopped."""
    if not tasks:
        return "starting"
    cur = _current_task(tasks)
    state = cur["CurrentState"].split(" ", 1)[0].lower()
    if cur.get("DesiredState", "").lower() == "running":
        # a failed task about to be replaced by the restart policy is still "starting"
        return "running" if state == "running" else "starting"
    return _TASK_STATE.get(state, "exited")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def nodes_table(nodes: list[dict]) -> list[list[str]]:
    """Rows for `flotilla cluster nodes`."""
    rows = []
    for n in nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"
        rows.append([n["hostname"], n["role"] + ("*" if n["leader"] else ""), n["state"], n["availability"],
                     n["arch"], f"{n['cpus']:g}", format_memory(n["memory"]) if n["memory"] else "-", labels])
    return rows


NODES_HEADER = ["HOSTNAME", "ROLE", "STATE", "AVAILABILITY", "ARCH", "CPUS", "MEMORY", "LABELS"]


def cluster_nodes_command(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON list instead of a table.")] = False,
    docker_host: Annotated[str | None, typer.Option("-H", "--host", help="Docker daemon of a swarm manager.")] = None,
) -> None:
    """`flotilla cluster nodes`: the swarm's nodes (hostname, arch, CPUs, memory, labels) placement can match."""

    try:
        nodes = cluster_nodes(docker_host)
    except TargetError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(nodes, indent=2))
        return
    rows = [NODES_HEADER, *nodes_table(nodes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(NODES_HEADER))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())

__all__ = ["NODES_HEADER", "StackRenderer", "SwarmOptions", "SwarmTarget", "check_placement", "cluster_nodes",
           "cluster_nodes_command", "nodes_table", "task_state"]
