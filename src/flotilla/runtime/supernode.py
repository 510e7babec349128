"""`flower-supernode` with its waits shortened and Flotilla's SuperExec.

Runs the unmodified SuperNode after engine_tuning's patches: its idle poll
(3 s) capped at FLOTILLA_POLL_S (default 0.2 s; pulls are small HTTP requests
to the SuperLink), its in-process reply checks (0.5 s) at 20 ms, object
pulls retried after 50 ms instead of 1 s, and its runtime API's handlers run
on its event loop (inline_handlers). The SuperNode starts its SuperExec
as `flower-superexec ARGS`; here that becomes `python -m
flotilla.runtime.superexec ARGS`, whose ClientApps are forks of a warm
process and which sleeps until the SuperNode wakes it through a pipe on each
new task. When the SuperNode learns its node id it writes it to
FLOTILLA_NODE_FILE (the run record's nodes/<device>.json), so the server can
name a device before its first reply. Whatever a future flwr moved is
reported on stderr and left as shipped.
"""

from __future__ import annotations

import json
import os
import sys

from flotilla.runtime import engine_tuning
from flotilla.runtime.superexec import ROLE_ENV

NODE_FILE_ENV = "FLOTILLA_NODE_FILE"
SERVER_TASK_POLL_S = "0.5"
WAKE_WRITE_FD_ENV = "FLOTILLA_TASK_WAKE_WRITE_FD"  # a shared fleet's SuperExec reads this pipe's other end
WAKE_PORT_ENV = "FLOTILLA_WAKE_PORT"  # this SuperNode's UDP port the SuperLink wakes (in its node file)
DEVICE_ENV = "FLOTILLA_DEVICE"
DEVICE_CLASS_ENV = "FLOTILLA_DEVICE_CLASS"


class SuperExecPopen:
    """subprocess stand-in: `flower-superexec ARGS` becomes `python -m flotilla.runtime.superexec ARGS`.

    role: "client" (a SuperNode's SuperExec, woken through a pipe on each task) or "server" (the
    SuperLink's). keep_group: drop flwr's start_new_session so the SuperExec stays in its parent's
    process group (one signal to the group ends the whole tree).
    """

    def __init__(self, subprocess_module, role: str, keep_group: bool = True) -> None:
        self._subprocess, self.role, self.keep_group = subprocess_module, role, keep_group

    def Popen(self, args, *a, **kw):  # noqa: N802 (subprocess's name)
        if not (isinstance(args, list) and args and args[0] == "flower-superexec"):
            return self._subprocess.Popen(args, *a, **kw)
        args = [sys.executable, "-m", "flotilla.runtime.superexec", *args[1:]]
        if self.keep_group:
            kw.pop("start_new_session", None)
        env = dict(kw.pop("env", None) or os.environ) | {ROLE_ENV: self.role}
        if self.role == "server":  # it waits for ServerApp tasks, one per run: no need to ask 10 times a second
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = SERVER_TASK_POLL_S
        if self.role != "client" or not engine_tuning.wake_superexec_on_tasks():
            return self._subprocess.Popen(args, *a, env=env, **kw)
        r = engine_tuning.superexec_wake_pipe()  # the SuperExec sleeps until a task is created
        env[engine_tuning.WAKE_FD_ENV] = str(r)
        try:
            return self._subprocess.Popen(args, *a, env=env, pass_fds=(*kw.pop("pass_fds", ()), r), **kw)
        finally:
            os.close(r)

    def __getattr__(self, name):
        return getattr(self._subprocess, name)


def use_flotilla_superexec() -> bool:
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if not hasattr(getattr(sci, "subprocess", None), "Popen"):
        return False
    sci.subprocess = SuperExecPopen(sci.subprocess, "client")
    return True


def report_node_id() -> bool:
    """When the SuperNode stores its node id, write it where the server and the driver can read it."""
    try:
        from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    except ImportError:
        return False
    shipped = getattr(InMemoryNodeState, "set_node_id", None)
    if shipped is None:
        return False
    if getattr(shipped, "_flotilla", False):
        return True
    device, cls, path = os.environ.get(DEVICE_ENV, ""), os.environ.get(DEVICE_CLASS_ENV, ""), os.environ.get(
        NODE_FILE_ENV)

    def set_node_id(self, node_id, *args, **kwargs):
        out = shipped(self, node_id, *args, **kwargs)
        print(f"flotilla device {device}: node id {node_id}", flush=True)
        if path and node_id is not None:
            try:
                tmp = f"{path}.tmp"
                doc = {"device": device, "class": cls, "node_id": int(node_id), "pid": os.getpid()}
                if os.environ.get(WAKE_PORT_ENV):
                    doc["wake_port"] = int(os.environ[WAKE_PORT_ENV])
                with open(tmp, "w") as fh:
                    json.dump(doc, fh)
                os.replace(tmp, path)
            except OSError as err:
                print(f"flotilla: could not write {path}: {err}", file=sys.stderr, flush=True)
        return out

    set_node_id._flotilla = True
    InMemoryNodeState.set_node_id = set_node_id
    return True


def _warn(what: str) -> None:
    print(f"flotilla: {what} for this flwr version; running it as shipped", file=sys.stderr, flush=True)


def main() -> None:
    from flotilla.runtime.lean_imports import defer_unused_imports

    defer_unused_imports()  # before flwr: what a SuperNode never uses is not imported (~28 MiB)
    from flotilla.runtime.keep_alive import longer_keep_alive

    wake_port = None
    if os.environ.get(engine_tuning.WAKE_ENV) == "1":
        wake_port = engine_tuning.wake_on_messages()
        if wake_port is None:
            _warn("could not make the SuperNode wait for the SuperLink's wake-ups")
        else:
            os.environ[WAKE_PORT_ENV] = str(wake_port)
    if wake_port is None and engine_tuning.poll_cap_s() > 0 and not engine_tuning.shorten_supernode_poll():
        _warn("could not shorten the SuperNode poll")
    if not engine_tuning.shorten_pull_backoff():
        _warn("could not shorten the object pull back-off")
    if not report_node_id():
        _warn("could not report the node id")
    from flotilla.runtime import dead_clientapps

    if not dead_clientapps.disabled() and not dead_clientapps.answer_failed_clientapps():
        _warn("could not answer a dead ClientApp's message at once (Flower answers it when its heartbeat expires)")
    if not engine_tuning.reuse_built_supernode_app():
        _warn("could not reuse the SuperNode's built API app")
    from flotilla.runtime import object_batches

    if object_batches.enabled(serving=True) and not object_batches.serve_batches_supernode():
        _warn("could not serve batched object transfers; each object is a request of its own")
    if object_batches.enabled() and not object_batches.batch_objects():
        _warn("could not batch object transfers; each object is a request of its own")
    from flotilla.runtime.inline_handlers import run_handlers_inline

    if not run_handlers_inline():
        _warn("could not run the runtime API's handlers on its event loop")
    if not engine_tuning.slower_uvicorn_tick():
        _warn("could not slow uvicorn's idle tick")
    if not longer_keep_alive():
        _warn("could not lengthen uvicorn's keep-alive")
    if os.environ.get(WAKE_WRITE_FD_ENV, "").isdigit():  # its SuperExec was forked beside it (shared fleet)
        if engine_tuning.wake_superexec_on_tasks():
            engine_tuning.wake_pipe_from(int(os.environ[WAKE_WRITE_FD_ENV]))
    if os.environ.get("FLOTILLA_FORK_CLIENTAPPS", "1") != "0" and not use_flotilla_superexec():
        _warn("could not start Flotilla's SuperExec")
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
