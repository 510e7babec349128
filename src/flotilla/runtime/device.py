"""One device: a Flower SuperNode (plus, for the built-in app, its warm trainer) as one process tree.

`python -m flotilla.runtime.device --name pi-1 --class pi --superlink HOST:PORT --node-config '...'`
is what every target runs per device: a local process group (inside the
device's cgroup), or a container's entrypoint. It ends its children on
SIGTERM/SIGINT and exits when one dies, so a dead trainer never leaves a
SuperNode that accepts work it cannot do.

A user's app gets no Flotilla trainer: the SuperNode's fork server preloads
the app's own ClientApp module (--preload-app), so each message runs the
app's code in a fork that starts in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flotilla.contracts import OWNER_LEASE_ENV, SOCKETS_DIR_ENV
from flotilla.plan import format_node_config
from flotilla.runtime.commands import flower_env
from flotilla.runtime.lease import owner_gone
from flotilla.runtime.preload import PRELOAD_ENV, READY_FILE_ENV, THREADS_ENV
from flotilla.runtime.supernode import DEVICE_CLASS_ENV, DEVICE_ENV, NODE_FILE_ENV, WAKE_WRITE_FD_ENV
from flotilla.runtime.zygote import ZYGOTE_ENV

# The agent wakes when a child exits (SIGCHLD) or it is told to stop; otherwise only this often, to look at its
# owner's lease (stale after lease.OWNER_TIMEOUT_S): an idle device's agent costs next to nothing.
LEASE_CHECK_S = 2.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one Flotilla device: a Flower SuperNode (+ the built-in trainer)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--class", dest="device_class", default="")
    ap.add_argument("--superlink", required=True)
    ap.add_argument("--node-config", default="")
    ap.add_argument("--port", type=int, default=9094, help="the SuperNode's runtime API port")
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--root-certificates")
    ap.add_argument("--auth-private-key")
    ap.add_argument("--trainer", action="store_true", help="the built-in app: run its warm trainer beside")
    ap.add_argument("--threads", type=int, default=None, help="compute threads (the device's CPU quota)")
    ap.add_argument("--preload-app", help="a Flower App directory whose ClientApp the fork server imports once")
    ap.add_argument("--record", help="the run record, where the device writes its Flower node id")
    args = ap.parse_args(argv)

    env = flower_env() | {DEVICE_ENV: args.name, DEVICE_CLASS_ENV: args.device_class}
    if args.threads:
        # BLAS and OpenMP pools sized to the quota, not the host: oversubscribed threads under a CFS
        # quota stall each other (where the user set these, theirs stand)
        env[THREADS_ENV] = str(args.threads)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, str(args.threads))
    if args.preload_app:
        env[PRELOAD_ENV] = args.preload_app
    if args.record:
        nodes = Path(args.record) / "nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        env[NODE_FILE_ENV] = str(nodes / f"{args.name}.json")
        if args.trainer or args.preload_app:  # the trainer, or the preloading fork server, says when it is warm
            env[READY_FILE_ENV] = str(nodes / f"{args.name}.ready")
    children: list[tuple[str, subprocess.Popen | Forked]] = []
    stopping = threading.Event()  # set by SIGTERM/SIGINT
    look = threading.Event()  # set by those and by SIGCHLD: the wait below wakes at once, not at its next check

    def stop(*_):
        stopping.set()
        look.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, lambda *_: look.set())

    # short path (AF_UNIX paths are limited to 108 bytes), in the run's sockets dir where the target made one: it
    # goes at the end of the run even when this agent was killed before it could clean up
    sock_dir = tempfile.mkdtemp(prefix="flotilla-", dir=os.environ.get(SOCKETS_DIR_ENV) or None)
    sock = os.path.join(sock_dir, "trainer.sock")
    node_config = args.node_config
    try:
        if args.trainer:
            cmd = [sys.executable, "-m", "flotilla.app.trainer", "--socket", sock]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.record:  # it reports its capability at start-up, from the run's config and the node's
                cmd += ["--record", args.record, "--node-config", node_config]
            # The SuperNode starts right away, in parallel (importing torch takes seconds on a small
            # CPU quota); a ClientApp that arrives before the trainer is ready waits for its socket.
            children.append(("trainer", start(cmd, env)))
            node_config = (node_config + " " + format_node_config({"trainer": sock})).strip()
        cmd = [sys.executable, "-m", "flotilla.runtime.supernode", "--superlink", args.superlink,
               "--port", str(args.port), "--node-config", node_config]
        if args.insecure:
            cmd.append("--insecure")
        if args.root_certificates:
            cmd += ["--root-certificates", args.root_certificates]
        if args.auth_private_key:
            cmd += ["--auth-supernode-private-key", args.auth_private_key]
        if shared():
            children += start_shared_supernode(cmd, env, args.port, insecure=args.insecure)
        else:
            children.append(("supernode", start(cmd, env)))
        print(f"flotilla device {args.name}: started (pids {[c.pid for _, c in children]})", flush=True)
        lease = os.environ.get(OWNER_LEASE_ENV)
        while not stopping.is_set():
            look.clear()  # before looking: a child ending while we look wakes the next wait at once
            if owner_gone(lease):
                print(f"flotilla device {args.name}: its driver is gone (lease {lease} stale); stopping",
                      file=sys.stderr, flush=True)
                return 0
            for what, c in children:
                if c.poll() is not None:
                    print(f"flotilla device {args.name}: {what} exited with code {c.returncode}", file=sys.stderr,
                          flush=True)
                    return c.returncode or 1
            look.wait(LEASE_CHECK_S)
        return 0
    finally:
        _end([c for _, c in children])
        try:
            os.unlink(sock)
        except OSError:
            pass
        if os.path.isdir(sock_dir) and not os.listdir(sock_dir):
            os.rmdir(sock_dir)


def shared() -> bool:
    """Forked from the run's zygote (flotilla.runtime.zygote): children are forks of this warm process too."""
    return os.environ.get(ZYGOTE_ENV) == "1"


class Forked:
    """A child forked from this (warm) process, with the part of Popen's interface the device uses."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if end is not None and time.time() > end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode


def start(cmd: list[str], env: dict, pass_fds: tuple = ()) -> "subprocess.Popen | Forked":
    if shared():
        from flotilla.runtime.zygote import fork_module

        return Forked(fork_module(cmd, env, new_session=False, pass_fds=pass_fds))
    return subprocess.Popen(cmd, env=env, pass_fds=pass_fds)


def start_shared_supernode(cmd: list[str], env: dict, port: int, insecure: bool) -> list[tuple[str, Forked]]:
    """In a shared fleet: the SuperNode (`--isolation process`) and its SuperExec, both forked from here, joined
    by the wake pipe (a new task wakes the SuperExec). A SuperNode would start its SuperExec as a new Python."""
    from flotilla.runtime import engine_tuning
    from flotilla.runtime.superexec import ROLE_ENV

    r, w = os.pipe()
    supernode = start([*cmd, "--isolation", "process", "--host", "127.0.0.1"], env | {WAKE_WRITE_FD_ENV: str(w)},
                      pass_fds=(w,))
    superexec_cmd = [sys.executable, "-m", "flotilla.runtime.superexec", "--runtime-api-address", f"127.0.0.1:{port}"]
    if insecure:
        superexec_cmd.insert(3, "--insecure")
    superexec = start(superexec_cmd, env | {ROLE_ENV: "client", engine_tuning.WAKE_FD_ENV: str(r)}, pass_fds=(r,))
    os.close(r)
    os.close(w)
    return [("supernode", supernode), ("superexec", superexec)]


def _end(children: list[subprocess.Popen]) -> None:
    """Stop children, and everything they started in our process group (superexec, ClientApps)."""
    for c in children:
        if c.poll() is None:
            c.terminate()
    end = time.time() + 5
    for c in children:
        try:
            c.wait(max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            c.kill()
    if os.getpgid(0) == os.getpid():  # we lead the group: sweep orphans (superexec outlives its SuperNode)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            os.killpg(0, signal.SIGTERM)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
