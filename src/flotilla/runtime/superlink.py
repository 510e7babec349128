"""`flower-superlink` whose SuperExec hosts every ServerApp observed (flotilla.runtime.serverapp).

The SuperLink starts its SuperExec as `flower-superexec ARGS` in a new
session; here it is `python -m flotilla.runtime.superexec ARGS` in the
SuperLink's own process group (so ending the group ends the ServerApp too).
Its ServerApp tasks then run as `python -m flotilla.runtime.serverapp`, which
observes the app and writes the run record named by FLOTILLA_RECORD_DIR.
Everything else is flwr's SuperLink, unmodified, with the same arguments.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flotilla.runtime.supernode import SuperExecPopen


def use_flotilla_superexec() -> bool:
    import importlib

    try:  # by module path: the package re-exports a function of the same name
        fsl = importlib.import_module("flwr.superlink.cli.flower_superlink")
    except ImportError:
        return False
    if not hasattr(getattr(fsl, "subprocess", None), "Popen"):
        return False
    fsl.subprocess = SuperExecPopen(fsl.subprocess, "server")
    return True


class Waker:
    """Wakes a SuperNode on this machine when a message for it is stored (its node file has its UDP port)."""

    def __init__(self, nodes_dir: Path) -> None:
        import socket

        self.nodes_dir = nodes_dir
        self.ports: dict[int, int] = {}
        self._mtime = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def __call__(self, node_id: int) -> None:
        port = self.ports.get(node_id) or self._refresh().get(node_id)
        if port:
            try:
                self.sock.sendto(b"w", ("127.0.0.1", port))
            except OSError:
                pass

    def _refresh(self) -> dict[int, int]:
        try:
            mtime = self.nodes_dir.stat().st_mtime_ns
        except OSError:
            return self.ports
        if mtime != self._mtime:
            self._mtime, ports = mtime, {}
            for f in self.nodes_dir.glob("*.json"):
                try:
                    doc = json.loads(f.read_text())
                    if doc.get("wake_port"):
                        ports[int(doc["node_id"])] = int(doc["wake_port"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
            self.ports = ports
        return self.ports


def wake_supernodes(nodes_dir: Path) -> bool:
    """When the ServerApp's message for a node is stored, wake that node's SuperNode (it sleeps until then)."""
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return False
    shipped = getattr(InMemoryLinkState, "store_message_ins", None)
    if shipped is None:
        return False
    waker = Waker(nodes_dir)

    def store_message_ins(self, message):
        out = shipped(self, message)
        if out is not None:
            waker(message.metadata.dst_node_id)
        return out

    InMemoryLinkState.store_message_ins = store_message_ins
    return True


def _remove_fleet_leftovers() -> None:
    """The devices stop themselves when the lease goes stale, but their (local) cgroups and sockets dir would
    stay until a `flotilla stop` or `resume`: the SuperLink, last of the fleet, kills what is left in them and
    removes them."""
    import shutil

    from flotilla.contracts import RECORD_DIR_ENV, RUN_ID_ENV

    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        return
    from flotilla.runs import RunRecord

    if os.environ.get(RECORD_DIR_ENV) and (sockets := RunRecord(Path(os.environ[RECORD_DIR_ENV])).state().get(
            "sockets_dir")):
        shutil.rmtree(sockets, ignore_errors=True)
    try:
        from flotilla.sandbox.cgroups import cleanup_run, run_prefix

        # the last process of the run standing: time enough for a large fleet's groups to empty on a busy machine
        # (5 s once left a 50-device fleet's empty groups behind)
        cleanup_run(run_prefix(run_id), timeout=30.0)
    except Exception as err:  # noqa: BLE001 - best effort: `flotilla stop` removes them too
        print(f"flotilla: could not remove the run's cgroups: {err}", file=sys.stderr, flush=True)


def main() -> None:
    import signal

    from flotilla.contracts import OWNER_LEASE_ENV
    from flotilla.runtime.lease import watch_owner

    def owner_gone() -> None:
        print("flotilla: the run's driver is gone (its lease went stale); stopping the fleet and the SuperLink",
              file=sys.stderr, flush=True)
        _remove_fleet_leftovers()
        os.kill(os.getpid(), signal.SIGTERM)

    watch_owner(os.environ.get(OWNER_LEASE_ENV), owner_gone)
    from flotilla.contracts import RECORD_DIR_ENV
    from flotilla.runtime.engine_tuning import WAKE_ENV

    if os.environ.get(WAKE_ENV) == "1" and os.environ.get(RECORD_DIR_ENV):
        if not wake_supernodes(Path(os.environ[RECORD_DIR_ENV]) / "nodes"):
            print("flotilla: could not wake SuperNodes on new messages for this flwr version; they poll",
                  file=sys.stderr, flush=True)
    from flotilla.runtime.whole_replies import list_whole_replies_only

    if not list_whole_replies_only():
        print("flotilla: could not hold replies until their objects are in for this flwr version; the ServerApp "
              "retries its pulls", file=sys.stderr, flush=True)
    from flotilla.runtime import object_batches

    if object_batches.enabled(serving=True) and not object_batches.serve_batches_superlink():
        print("flotilla: could not serve batched object transfers for this flwr version; each object is a request "
              "of its own", file=sys.stderr, flush=True)
    from flotilla.runtime.engine_tuning import slower_uvicorn_tick

    slower_uvicorn_tick()
    from flotilla.runtime.keep_alive import longer_keep_alive

    if not longer_keep_alive():
        print("flotilla: could not lengthen the SuperLink's keep-alive for this uvicorn", file=sys.stderr, flush=True)
    from flotilla.runtime.lean_middleware import gate_superlink_middleware

    if not gate_superlink_middleware():
        print("flotilla: could not gate the SuperLink's middleware for this flwr version; it runs as shipped",
              file=sys.stderr, flush=True)
    from flotilla.runtime.inline_handlers import run_handlers_inline

    # state in memory (no --database): no handler waits for a lock
    if not any(a.startswith("--database") for a in sys.argv) and not run_handlers_inline():
        print("flotilla: could not run the SuperLink's handlers on its event loop for this flwr version",
              file=sys.stderr, flush=True)
    if os.environ.get("FLOTILLA_FORK_CLIENTAPPS", "1") != "0" and not use_flotilla_superexec():
        print("flotilla: could not host the ServerApp for this flwr version; it runs unobserved",
              file=sys.stderr, flush=True)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
