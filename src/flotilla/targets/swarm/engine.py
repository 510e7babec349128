"""Talk: the docker CLI on a swarm manager (`Docker`), the swarm's nodes, placement checks, task states.

The driver calls the docker CLI (subprocess), not the docker SDK: `docker
stack deploy` exists only in the CLI (the SDK has no stacks), and the CLI
honours the user's contexts, DOCKER_HOST and registry logins exactly as the
commands the README shows.
"""

from __future__ import annotations

import json
import socket
import subprocess

from flotilla.job import format_memory
from flotilla.plan import Plan
from flotilla.targets.base import TargetError
from flotilla.targets.swarm.render import class_constraints, swarm_arch

_TASK_STATE = {"running": "running", "new": "starting", "pending": "starting", "assigned": "starting",
               "accepted": "starting", "preparing": "starting", "ready": "starting", "starting": "starting",
               "complete": "exited", "failed": "exited", "rejected": "exited", "orphaned": "exited",
               "shutdown": "stopped", "remove": "stopped"}


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

    def stack_tasks(self, stack: str) -> dict[str, list[dict]]:
        """Service (without the stack prefix) -> its tasks, newest first."""
        res = self.run("stack", "ps", stack, "--no-trunc", "--format", "{{json .}}", check=False)
        out: dict[str, list[dict]] = {}
        for line in res.stdout.splitlines():
            if not line.strip():
                continue
            t = json.loads(line)
            # Name is "<stack>_<service>.<slot>" (history rows may carry a "\_ " prefix)
            name = t["Name"].lstrip("\\_ ").rsplit(".", 1)[0].removeprefix(f"{stack}_")
            out.setdefault(name, []).append(t)
        return out

    def service_limits(self, service: str) -> dict | None:
        """The service's resource limits as the engine holds them (NanoCPUs, MemoryBytes); None: no such service."""
        res = self.run("service", "inspect", service, check=False)
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)[0]["Spec"]["TaskTemplate"].get("Resources", {}).get("Limits", {})


def current_task(tasks: list[dict]) -> dict | None:
    for t in tasks:
        if t.get("DesiredState", "").lower() in ("running", "ready", "accepted"):
            return t
    return tasks[0] if tasks else None


def task_state(tasks: list[dict]) -> str:
    """A device service's tasks -> running | starting | exited | stopped."""
    if not tasks:
        return "starting"
    cur = current_task(tasks)
    state = cur["CurrentState"].split(" ", 1)[0].lower()
    if cur.get("DesiredState", "").lower() == "running":
        # a failed task about to be replaced by the restart policy is still "starting"
        return "running" if state == "running" else "starting"
    return _TASK_STATE.get(state, "exited")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- nodes and placement ----------------------------------------------------------------

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
