"""One warm process per run that forks every device's processes: dense fleets share what they have in common.

A device is a SuperNode, a SuperExec, ClientApp processes and, for the
built-in app, a trainer. Started as fresh Pythons, each imports flwr (and
the app: torch, scikit-learn) on its own: ~500 MB of PSS and seconds of CPU
per device. In a shared fleet (job `local: {shared: true}`) the local target
starts this zygote once; it imports all of that, warms torch up, freezes the
GC (so the forks' reference counting does not unshare its pages), and then
forks each device's agent on request. The agent forks its own processes from
the same warm image (`spawn` below), so every device shares the zygote's
read-only pages: imports, the app's code, torch.

Each fork starts its own session (one signal ends a device's tree), enters
the device's cgroup before running anything, and writes to its log. The
device's memory limit then counts what the device itself uses beyond the
shared pages (which are charged to the zygote).

    request (one JSON line on the Unix socket): {"argv": [...], "env": {...}, "cwd": str,
                                                 "log": str, "cgroup_procs": [paths]}
    reply: {"pid": N}
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

ZYGOTE_ENV = "FLOTILLA_ZYGOTE"  # set in every process forked from a zygote
EXITS_DIR_ENV = "FLOTILLA_EXITS_DIR"  # where the zygote writes each child's exit status (<pid>)

# Everything a device's processes import; the app's own imports come with its ClientApp module.
PRELOAD = [
    "flwr.supernode.start_client_internal", "flwr.supernode.cli", "flwr.supernode.main", "flwr.supernode.runtime.run_clientapp",
    "flwr.supercore.superexec.run_superexec", "flwr.supercore.cli", "flwr.supercore.tls",
    "flwr.clientapp", "flwr.app",
    "flotilla.runtime.device", "flotilla.runtime.supernode", "flotilla.runtime.superexec",
    "flotilla.runtime.stamp", "flotilla.runtime.preload", "flotilla.runtime.engine_tuning",
    "flotilla.runtime.object_batches",  # imported by every ClientApp fork: ~50 ms of each one's CPU when it was not
]
# What a SuperNode imports only as it starts (its HTTP client and API server: ~95 modules, a third of a forked
# SuperNode's start-up CPU); some are uvicorn's optional extras, so each is tried.
PRELOAD_IF_PRESENT = [
    "httpx", "httpcore", "h11", "netrc", "cryptography.hazmat.backends.openssl",
    "uvicorn.lifespan.on", "uvicorn.loops.auto", "uvicorn.loops.uvloop", "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.websockets.auto",
    "uvicorn.protocols.websockets.websockets_impl",
    # anyio's asyncio backend, imported on a SuperNode's first request (its runtime API): measured as the
    # largest single part of a forked SuperNode's start-up
    "anyio._backends._asyncio",
]


def run_module(argv: list[str]) -> int:
    """Run `python -m MODULE ARGS` (argv as a command line) in this process: the (already imported) module's
    main(), as its `__main__` would; its exit code."""
    import importlib

    if len(argv) < 3 or argv[1] != "-m":
        raise ValueError(f"zygote: can only run `python -m MODULE ...`, not {argv[:3]}")
    sys.argv = [argv[2], *argv[3:]]
    try:
        code = importlib.import_module(argv[2]).main()
    except SystemExit as e:
        code = e.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def fork_module(argv: list[str], env: dict, cwd: str | None = None, log: str | None = None,
                cgroup_procs: list[str] | None = None, new_session: bool = True, pass_fds: tuple = ()) -> int:
    """Fork this (warm) process to run `python -m MODULE ...`; returns the child's pid. The child enters its
    cgroup first, then its session, log and environment, so nothing it does escapes the device's limits."""
    pid = os.fork()
    if pid:
        return pid
    try:
        for path in cgroup_procs or ():
            with open(path, "w") as fh:
                fh.write(str(os.getpid()))
        if new_session:
            os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        if log:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        _close_fds_but({0, 1, 2, *pass_fds})  # as subprocess does: the zygote's sockets are not the child's
        if cwd:
            os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env | {ZYGOTE_ENV: "1"})
        _name(argv)
        code = run_module(argv)
    except BaseException:  # noqa: BLE001 - a child never returns into the zygote's loop
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _name(argv: list[str]) -> None:
    """`ps` and /proc/<pid>/comm say what a fork is ("fl-supernode"), not the zygote's command line."""
    try:
        import ctypes

        name = ("fl-" + argv[2].rsplit(".", 1)[-1])[:15].encode()
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError, IndexError):
        pass


def _close_fds_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def memory_now() -> dict:
    """This process's resident memory: anonymous (its own heap: what a fresh process importing the same
    would hold again) and in all (with the files it maps, which processes share through the page cache)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                out["anon" if key == "RssAnon" else "rss"] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def warm(app_dir: str | None, builtin: bool, measured: dict | None = None) -> None:
    """Import and warm up everything a device runs. measured, if given, gets this process's memory after
    flwr's device runtime ("runtime") and after the app ("warm") (the device's memory accounting)."""
    import importlib

    from flotilla.runtime.lean_imports import defer_unused_imports

    defer_unused_imports()  # what no device process uses is not in the image every device shares
    for name in PRELOAD:
        importlib.import_module(name)
    for name in PRELOAD_IF_PRESENT:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if measured is not None:
        gc.collect()
        measured["runtime"] = memory_now()
    if builtin:  # the built-in app's ClientApp, and its trainer's torch, model and data
        for name in ("flotilla.app.client_app", "flotilla.app.trainer", "flotilla.app.task", "flotilla.data"):
            importlib.import_module(name)
        from flotilla.data.datasets import load_digits_28, load_mnist_5k

        load_mnist_5k()
        load_digits_28()
    import flwr.supernode.main as supernode_main

    prime_routes(supernode_main.app)
    from flotilla.runtime import engine_tuning, preload

    engine_tuning.skip_unsent_telemetry()
    if app_dir:
        preload.preload(app_dir)  # the app's ClientApp module and its imports; torch warmed up when it has it
    elif "torch" in sys.modules:
        preload.warm_up_frameworks()
    gc.collect()
    gc.freeze()  # the forks' GC passes leave the zygote's objects (and so its pages) alone
    if measured is not None:
        measured["warm"] = memory_now()


def prime_routes(app) -> int:
    """FastAPI (0.13x) works out each included router's routes (their dependencies, signatures) on the first
    request a process serves, and keeps them: done here, in the SuperNode's app that every device's SuperNode
    reuses (engine_tuning.reuse_built_supernode_app), each fork starts with them worked out. Returns how many
    routers it primed (0 where FastAPI does this differently: then each fork does it, as before)."""
    primed, todo = 0, list(getattr(getattr(app, "router", None), "routes", []))
    while todo:
        route = todo.pop()
        if not (hasattr(route, "effective_candidates") and hasattr(route, "effective_low_priority_routes")):
            continue
        try:
            todo += route.effective_candidates()
            route.effective_low_priority_routes()
        except Exception:  # noqa: BLE001 - a later FastAPI: its forks work the routes out themselves
            continue
        primed += 1
    return primed


def serve(sock_path: str, exits_dir: Path) -> None:
    exits_dir.mkdir(parents=True, exist_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    srv.bind(sock_path)
    srv.listen(64)
    threading.Thread(target=_reap, args=(exits_dir,), daemon=True).start()
    print(f"flotilla zygote: ready on {sock_path} (pid {os.getpid()})", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                req = json.loads(conn.makefile().readline())
                env = dict(req["env"]) | {EXITS_DIR_ENV: str(exits_dir)}
                pid = fork_module(req["argv"], env, req.get("cwd"), req.get("log"), req.get("cgroup_procs"))
                conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
            except Exception as err:  # noqa: BLE001 - one bad request must not end the zygote
                conn.sendall((json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n").encode())


def _reap(exits_dir: Path) -> None:
    """Collect exited children; write each one's status where the target reads exit codes."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.2)
            continue
        code = os.waitstatus_to_exitcode(status)
        try:
            (exits_dir / str(pid)).write_text(str(code))
        except OSError:
            pass


def request(sock_path: str, argv: list[str], env: dict, cwd: str, log: str, cgroup_procs: list[str]) -> int:
    """Ask the zygote for a device process; returns its pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock_path)
        s.sendall((json.dumps({"argv": argv, "env": env, "cwd": cwd, "log": log,
                               "cgroup_procs": cgroup_procs}) + "\n").encode())
        reply = json.loads(s.makefile().readline())
    if "error" in reply:
        raise RuntimeError(f"the run's zygote could not start the process: {reply['error']}")
    return int(reply["pid"])


def exit_code(exits_dir: Path, pid: int) -> int | None:
    try:
        return int((Path(exits_dir) / str(pid)).read_text())
    except (OSError, ValueError):
        return None


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Flotilla's per-run zygote: forks warm device processes")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--exits", required=True)
    ap.add_argument("--preload-app")
    ap.add_argument("--builtin", action="store_true")
    ap.add_argument("--measure", help="write this process's memory at its stages here (JSON)")
    args = ap.parse_args()
    measured = {"bare": memory_now()}
    from flotilla.contracts import OWNER_LEASE_ENV
    from flotilla.runtime.lease import watch_owner

    def owner_gone() -> None:  # the driver died unannounced: its forks stop themselves, and so does this
        print("flotilla zygote: the run's driver is gone (its lease went stale); exiting", flush=True)
        os._exit(0)

    watch_owner(os.environ.get(OWNER_LEASE_ENV), owner_gone)
    t0 = time.perf_counter()
    warm(args.preload_app, args.builtin, measured)
    if args.measure:
        tmp = f"{args.measure}.tmp"
        Path(tmp).write_text(json.dumps(measured))
        os.replace(tmp, args.measure)
    print(f"flotilla zygote: warm in {time.perf_counter() - t0:.1f} s (memory: "
          + ", ".join(f"{k} {v.get('anon', 0) / 2**20:.0f} MiB anon" for k, v in measured.items()) + ")", flush=True)
    serve(args.socket, Path(args.exits))


if __name__ == "__main__":
    main()
