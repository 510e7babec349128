"""One device: Flotilla's warm trainer plus a Flower SuperNode, as one process tree.

`python -m flotilla.device --name pi-1 --superlink HOST:PORT --node-config '...'`
is what every target runs per device: a local process group (inside the
device's cgroup), or a container's entrypoint. It ends both children on
SIGTERM/SIGINT and exits when either dies, so a dead trainer never leaves a
SuperNode that accepts work it cannot do.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flotilla.plan import format_node_config


def flower_env() -> dict[str, str]:
    """Environment for Flower processes: offline, no telemetry, the venv's bin on PATH."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # superexec asks its SuperNode for new tasks every 1 s by default
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one Flotilla device: warm trainer + Flower SuperNode")
    ap.add_argument("--name", required=True)
    ap.add_argument("--superlink", required=True)
    ap.add_argument("--node-config", default="")
    ap.add_argument("--port", type=int, default=9094, help="the SuperNode's runtime API port")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--root-certificates")
    ap.add_argument("--auth-private-key")
    ap.add_argument("--auth-public-key", help="ignored: flwr >= 1.41 derives it from the private key")
    ap.add_argument("--no-trainer", action="store_true", help="let each ClientApp process train by itself")
    args = ap.parse_args(argv)

    env = flower_env()
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    sock_dir = tempfile.mkdtemp(prefix="flotilla-")  # short path: AF_UNIX paths are limited to 108 bytes
    sock = os.path.join(sock_dir, "trainer.sock")
    node_config = args.node_config
    try:
        if not args.no_trainer:
            cmd = [sys.executable, "-m", "flotilla.app.trainer", "--socket", sock]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            # The SuperNode starts right away, in parallel (importing torch takes seconds on a small
            # CPU quota); a ClientApp that arrives before the trainer is ready waits for its socket.
            children.append(subprocess.Popen(cmd, env=env))
            node_config = (node_config + " " + format_node_config({"trainer": sock})).strip()
        cmd = [sys.executable, "-m", "flotilla.fast_supernode", "--superlink", args.superlink,
               "--port", str(args.port), "--node-config", node_config]
        if args.insecure:
            cmd.append("--insecure")
        if args.root_certificates:
            cmd += ["--root-certificates", args.root_certificates]
        if args.auth_private_key:
            cmd += ["--auth-supernode-private-key", args.auth_private_key]
        children.append(subprocess.Popen(cmd, env=env))
        print(f"flotilla device {args.name}: started (pids {[c.pid for c in children]})", flush=True)
        while not stopping:
            dead = [c for c in children if c.poll() is not None]
            if dead:
                c = dead[0]
                what = "trainer" if (not args.no_trainer and c is children[0]) else "supernode"
                print(f"flotilla device {args.name}: {what} exited with code {c.returncode}", file=sys.stderr,
                      flush=True)
                return c.returncode or 1
            time.sleep(0.2)
        return 0
    finally:
        _end(children)
        try:
            os.unlink(sock)
        except OSError:
            pass
        os.rmdir(sock_dir) if os.path.isdir(sock_dir) and not os.listdir(sock_dir) else None


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
            os.killpg(0, signal.SIGKILL if False else signal.SIGTERM)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
