"""A real multi-node Docker Swarm on one machine, for tests.

The host engine is the manager; each worker is a real dockerd in its own
network namespace with its own hostname and IP on a Linux bridge (recipe in
shared/notes/containers-on-ci.md):

    host  flbr-<id> 10.199.0.1/24 ── veth ── netns flw<id>-1: eth0 10.199.0.11, dockerd, hostname worker-node-1
                                   └─ veth ── netns flw<id>-2: eth0 10.199.0.12, dockerd, hostname worker-node-2

Every resource is registered for undo the moment it exists, so the swarm is
torn down (leave, engines stopped by PID, namespaces, bridge, iptables rules)
even when a step in the middle fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUBNET = "10.199.0"  # /24 for the bridge; the host is .1, worker i is .(10+i)
TOOLS = ("docker", "dockerd", "ip", "iptables", "nsenter", "unshare")


class Unavailable(Exception):
    """This machine cannot host the cluster (a reason to skip, not a failure)."""


@dataclass
class Worker:
    hostname: str
    netns: str
    addr: str
    sock: str
    pid: int
    root: Path

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run(["docker", "-H", self.host, *args], check=check, timeout=timeout)


@dataclass
class SwarmCluster:
    manager_addr: str
    manager_hostname: str
    workers: list[Worker] = field(default_factory=list)

    @property
    def hostnames(self) -> list[str]:
        return [self.manager_hostname, *(w.hostname for w in self.workers)]


def _run(cmd: list[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        why = (res.stderr or res.stdout).strip()[-400:]
        raise RuntimeError(f"{' '.join(cmd[:6])} failed ({res.returncode}): {why}")
    return res


def check_available() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces, a second dockerd)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise Unavailable(f"missing tools: {', '.join(missing)}")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise Unavailable("no Docker engine answers (`docker info`); start one with .ci/docker-up.sh")
    state = json.loads(_run(["docker", "info", "--format", "{{json .Swarm}}"]).stdout).get("LocalNodeState")
    if state != "inactive":
        raise Unavailable(f"the host engine is already in a swarm ({state}); not touching someone else's swarm")


def _wait(pred, timeout: float, what: str, interval: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        got = pred()
        if got:
            return got
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop_pid(pid: int, timeout: float = 30) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _unmount_below(root: Path) -> None:
    """Mounts a killed dockerd may leave (overlay layers, netns files) under its roots."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(str(root) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


@contextlib.contextmanager
def swarm_cluster(n_workers: int = 2, images: list[str] | tuple[str, ...] = (),
                  log=lambda msg: None) -> Iterator[SwarmCluster]:
    """A swarm of the host engine (manager) and n_workers worker engines; images are copied onto each."""
    check_available()
    tag = f"{os.getpid() % 10000}"
    bridge = f"flbr{tag}"
    host_addr = f"{SUBNET}.1"
    undo = contextlib.ExitStack()
    base = Path(tempfile.mkdtemp(prefix="flotilla-swarm-"))
    undo.callback(shutil.rmtree, base, ignore_errors=True)
    try:
        # -- network: a bridge, forwarded despite docker's FORWARD DROP policy ------------------------
        _run(["ip", "link", "add", bridge, "type", "bridge"])
        undo.callback(_run, ["ip", "link", "del", bridge], check=False)
        _run(["ip", "addr", "add", f"{host_addr}/24", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        rules = [["FORWARD", "-i", bridge, "-j", "ACCEPT"],
                 ["FORWARD", "-o", bridge, "-m", "state", "--state", "RELATED,ESTABLISHED", "-j", "ACCEPT"]]
        for rule in rules:
            _run(["iptables", "-I", *rule])
            undo.callback(_run, ["iptables", "-D", *rule], check=False)

        # -- the manager: the host engine ------------------------------------------------------------
        had_gwbridge = _run(["docker", "network", "inspect", "docker_gwbridge"], check=False).returncode == 0
        _run(["docker", "swarm", "init", "--advertise-addr", host_addr, "--listen-addr", f"{host_addr}:2377"])
        undo.callback(_leave_host_swarm, had_gwbridge)
        token = _run(["docker", "swarm", "join-token", "-q", "worker"]).stdout.strip()
        cluster = SwarmCluster(host_addr, socket.gethostname())
        log(f"swarm manager {cluster.manager_hostname} at {host_addr}")

        # -- workers: a dockerd per network namespace, each with its own hostname ----------------------
        for i in range(1, n_workers + 1):
            ns, addr, hostname = f"flw{tag}-{i}", f"{SUBNET}.{10 + i}", f"worker-node-{i}"
            _run(["ip", "netns", "add", ns])
            undo.callback(_run, ["ip", "netns", "del", ns], check=False)
            veth = f"flv{tag}-{i}"
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            undo.callback(_run, ["ip", "link", "del", veth], check=False)
            _run(["ip", "link", "set", veth, "master", bridge, "up"])
            for cmd in (["ip", "addr", "add", f"{addr}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", host_addr]):
                _run(["ip", "netns", "exec", ns, *cmd])
            root = base / f"w{i}"
            root.mkdir()
            sock = str(root / "docker.sock")
            logf = open(root / "dockerd.log", "wb")
            undo.callback(logf.close)
            # nsenter, not `ip netns exec`: the latter remounts /sys and dockerd then finds no devices cgroup.
            inner = (f"hostname {hostname}; exec dockerd --data-root {root}/data --exec-root {root}/exec "
                     f"-H unix://{sock} --pidfile {root}/dockerd.pid --bip 172.31.{i}.1/24")
            proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{ns}", "unshare", "--uts", "sh", "-c", inner],
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            undo.callback(_unmount_below, root)
            undo.callback(_stop_pid, proc.pid)
            w = Worker(hostname, ns, addr, sock, proc.pid, root)
            def engine_up(proc=proc, w=w) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"dockerd of {w.hostname} exited; see {w.root / 'dockerd.log'}")
                return w.docker("info", check=False, timeout=10).returncode == 0

            _wait(engine_up, 60, f"dockerd of {hostname} (log {root / 'dockerd.log'})")
            w.docker("swarm", "join", "--token", token, "--advertise-addr", addr, f"{host_addr}:2377")
            undo.callback(w.docker, "swarm", "leave", "--force", check=False, timeout=60)
            cluster.workers.append(w)
            log(f"worker {hostname} at {addr} joined")

        def load(w: Worker, image: str) -> None:
            t0 = time.time()
            save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
            _run(["docker", "-H", w.host, "load", "-q"], stdin=save.stdout, timeout=600)
            save.stdout.close()
            if save.wait() != 0:
                raise RuntimeError(f"docker save {image} failed")
            log(f"image {image} loaded on {w.hostname} in {time.time() - t0:.0f} s")

        # every worker loads at once: the loads wait on disk and on each dockerd, not on each other
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(cluster.workers))) as pool:
            for f in [pool.submit(load, w, image) for w in cluster.workers for image in images]:
                f.result()

        def all_ready():
            nodes = _run(["docker", "node", "ls", "--format", "{{json .}}"]).stdout.splitlines()
            states = [json.loads(n) for n in nodes]
            return len(states) == n_workers + 1 and all(s["Status"] == "Ready" for s in states)

        _wait(all_ready, 60, "all swarm nodes Ready")
        yield cluster
    finally:
        undo.close()


def _leave_host_swarm(had_gwbridge: bool) -> None:
    _run(["docker", "swarm", "leave", "--force"], check=False, timeout=60)
    if not had_gwbridge:  # swarm mode made it; leave the engine as we found it
        _run(["docker", "network", "rm", "docker_gwbridge"], check=False)
