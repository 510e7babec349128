"""`flower-superexec` with Flotilla's executor: warm ClientApp forks, hosted ServerApps.

Flower's SuperExec starts every task as a fresh process (`flwr-clientapp`,
`flwr-serverapp`): a Python start plus `import flwr` and the app's imports,
measured at 3 s on 1.0 CPU and 18 s on 0.125 CPU, for every message. That
cost, not training, dominated a round on small devices. This entry point
runs flwr's unmodified SuperExec loop with its executor (flwr's Executor
protocol: launch/reconcile/close) replaced:
- ClientApp tasks start through a multiprocessing fork server that has
  already imported flwr's ClientApp runtime and, where the device was given
  its app (FLOTILLA_PRELOAD_APP), the user's ClientApp module with its imports
  (flotilla.runtime.preload). Each task is still its own process running
  flwr's `run_clientapp` with its own task token, as Flower intends; it just
  starts in milliseconds. Its reply carries the observation stamp
  (flotilla.runtime.stamp).
- ServerApp tasks run as `python -m flotilla.runtime.serverapp`, flwr's own
  `flwr-serverapp` observed and writing into the run record.
Other task types, and any flwr that lacks the pieces this relies on, go to
flwr's SubprocessExecutor.

The fork server is a child of the SuperExec (same process group and cgroup,
so the device's limits and teardown cover it and its forks); it exits when
the SuperExec does.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

from flotilla.runtime import dead_clientapps
from flotilla.sandbox.procs import pid_alive

# Imported by the fork server once; every ClientApp fork shares them.
PRELOAD = [
    "flwr.supernode.runtime.run_clientapp",
    "flwr.supercore.tls",
    "flotilla.runtime.stamp",
    "flotilla.runtime.superexec",
    "flotilla.runtime.object_batches",
]
BUILTIN_PRELOAD = "flotilla.app.client_app"
FORK_ENV = "FLOTILLA_FORK_CLIENTAPPS"
ZYGOTE_ENV = "FLOTILLA_ZYGOTE"  # (flotilla.runtime.zygote's) this process is a fork of the run's zygote
ROLE_ENV = "FLOTILLA_SUPEREXEC_ROLE"  # "client" (a SuperNode's) or "server" (the SuperLink's)
# a shared fleet's zygote socket: the SuperLink's ServerApps are forks of it (torch and the app's imports loaded)
SERVER_ZYGOTE_ENV = "FLOTILLA_SERVERAPP_ZYGOTE"
SERVER_ZYGOTE_WAIT_S = 120.0  # the zygote warms up while the SuperLink starts


def fork_preload() -> list[str]:
    from flotilla.runtime.preload import PRELOAD_ENV

    extra = ["flotilla.runtime.preload_app"] if os.environ.get(PRELOAD_ENV) else [BUILTIN_PRELOAD]
    return PRELOAD + extra


def prepare_fork(launched_at: float) -> None:
    """A ClientApp fork's set-up before flwr's run_clientapp (everything it uses is in the warm process)."""
    from flotilla.runtime import object_batches
    from flotilla.runtime.engine_tuning import shorten_pull_backoff
    from flotilla.runtime.preload import check_before_load, reseed, set_threads
    from flotilla.runtime.stamp import stamp_replies

    shorten_pull_backoff()  # the task's message arrays may still be on their way to the SuperNode
    if object_batches.enabled():
        object_batches.batch_objects()  # where it cannot, flwr's per-object requests (a fork has nowhere to warn)
    stamp_replies(launched_at)
    check_before_load()
    set_threads()
    reseed()


def run_clientapp_task(address: str, token: str, insecure: bool, root_certificates_path: str | None,
                       parent_pid: int | None, runtime_dependency_install: bool, launched_at: float = 0.0) -> None:
    """What `flwr-clientapp --token ...` does, inside a fork of the warm process."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    prepare_fork(launched_at)
    sys.argv = ["flwr-clientapp"]  # flwr names its exit telemetry event after argv[0]
    run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=runtime_dependency_install,
    )


def task_args(spec, command: list[str]) -> list[str]:
    """The arguments flwr's SubprocessExecutor gives a task process, after `command`."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG

    args = [*command, TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address,
            "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def make_executor_class():
    """FlotillaExecutor, built on flwr's SubprocessExecutor (imported late: flwr is heavy)."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class FlotillaExecutor(SubprocessExecutor):
        """ClientApps as forks of a pre-imported server, ServerApps hosted; anything else as flwr does."""

        def __init__(self, preload: list[str] | None = None) -> None:
            self._ctx = None
            self._preload = fork_preload() if preload is None else preload
            self._live: list[multiprocessing.process.BaseProcess] = []
            self._servers: list[subprocess.Popen] = []
            self._forked_servers: list[int] = []  # ServerApps the run's zygote forked (not our children)
            self._reap_lock = threading.Lock()
            self._memory = None if dead_clientapps.disabled() else dead_clientapps.OwnMemoryGroup()

        def _fork_context(self):
            if self._ctx is None and os.environ.get(ZYGOTE_ENV) == "1":
                # a shared fleet: this process is already a fork of the run's warm zygote (app and torch loaded,
                # single-threaded): ClientApps fork from it directly, sharing its pages
                self._ctx = multiprocessing.get_context("fork")
                from flotilla.runtime.preload import mark_ready

                mark_ready("forked from the run's zygote")
                print("flotilla: ClientApps start as forks of this SuperExec (a fork of the run's zygote)",
                      file=sys.stderr, flush=True)
            if self._ctx is None:
                from multiprocessing import forkserver

                self._ctx = multiprocessing.get_context("forkserver")
                self._ctx.set_forkserver_preload(self._preload)
                forkserver.ensure_running()
                print(f"flotilla: ClientApps start as forks of a warm process ({', '.join(self._preload)})",
                      file=sys.stderr, flush=True)
            return self._ctx

        def warm_up(self) -> None:
            """Start the fork server now: the first task should not pay for its imports."""
            self._fork_context()

        def launch(self, spec):
            if spec.task_type == TaskType.SERVER_APP:
                # flwr keeps a ServerApp's output off the SuperLink's (it uploads its logs); the host also
                # tees it into the record's logs/serverapp.log
                args = task_args(spec, [sys.executable, "-m", "flotilla.runtime.serverapp"])
                pid = fork_serverapp(args, spec.suppress_output)
                if pid is not None:
                    self._forked_servers.append(pid)
                    return LaunchResult.accepted()
                quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if spec.suppress_output else {}
                self._servers.append(subprocess.Popen(args, **quiet))
                return LaunchResult.accepted()
            if spec.task_type != TaskType.CLIENT_APP or spec.suppress_output:
                return super().launch(spec)
            try:
                proc = self._fork_context().Process(
                    target=run_clientapp_task,
                    args=(spec.runtime_api_address, spec.token, spec.insecure, spec.root_certificates_path,
                          spec.parent_pid, spec.runtime_dependency_install, time.time()),
                    name=f"flwr-clientapp-{spec.task_id}",
                )
                proc.start()
            except Exception as err:  # noqa: BLE001 (a broken fork server must not end the SuperExec)
                print(f"flotilla: fork server failed ({err!r}); starting flwr-clientapp instead",
                      file=sys.stderr, flush=True)
                return super().launch(spec)
            with self._reap_lock:
                self._live.append(proc)
            if self._memory is not None:
                threading.Thread(target=self._answer_if_it_dies, args=(proc, spec, self._memory.oom_kills()),
                                 name=f"watch-{proc.name}", daemon=True).start()
            return LaunchResult.accepted()

        def _answer_if_it_dies(self, proc, spec, oom_kills_before: int) -> None:
            """A fork that ends without replying (the kernel's OOM killer, any signal, an exit code) gets its
            message answered at once (flotilla.runtime.dead_clientapps), not after Flower's token expiry."""
            from multiprocessing.connection import wait

            wait([proc.sentinel])
            with self._reap_lock:  # the exit status is read once, here or in reconcile()
                # the sentinel closes as the process exits, a moment before it can be reaped: wait for that
                proc.join(5)
                code = proc.exitcode
            if code is None:
                print(f"flotilla: {proc.name}: closed its sentinel but did not exit; its message is left to Flower",
                      file=sys.stderr, flush=True)
                return
            reason = dead_clientapps.describe_exit(code, self._memory.oom_kills() - oom_kills_before,
                                                   self._memory.limit())
            if reason is None:
                return
            if dead_clientapps.notify_task_failed(spec, reason, quiet=code > 0):
                print(f"flotilla: {proc.name}: {reason.removeprefix(dead_clientapps.REASON_PREFIX)}; "
                      "its message is answered with Flower's error reply now", file=sys.stderr, flush=True)

        def reconcile(self) -> None:
            with self._reap_lock:
                self._live = [p for p in self._live if p.is_alive()]  # is_alive() reaps finished ones
            self._servers = [p for p in self._servers if p.poll() is None]
            self._forked_servers = [pid for pid in self._forked_servers if pid_alive(pid)]

        def close(self) -> None:
            with self._reap_lock:
                live = [p for p in self._live if p.is_alive()]
            for p in live:
                p.terminate()
            for p in self._servers:
                if p.poll() is None:
                    p.terminate()
            for pid in self._forked_servers:
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
            for p in live:
                with self._reap_lock:
                    p.join(5)
            for p in self._servers:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()

    return FlotillaExecutor


def fork_serverapp(args: list[str], quiet: bool) -> int | None:
    """A ServerApp as a fork of the run's warm zygote (SERVER_ZYGOTE_ENV), which has imported flwr, torch and the
    app's ClientApp side: the app's ServerApp starts in well under a second instead of a Python start plus its
    imports (seconds, on cores the starting fleet shares). None where there is no zygote (it runs as a process)."""
    sock = os.environ.get(SERVER_ZYGOTE_ENV)
    if not sock:
        return None
    from flotilla.contracts import RECORD_DIR_ENV
    from flotilla.runtime.zygote import request

    end = time.time() + SERVER_ZYGOTE_WAIT_S
    while not os.path.exists(sock) and time.time() < end:
        time.sleep(0.05)
    record = os.environ.get(RECORD_DIR_ENV)
    log = os.devnull if quiet or not record else os.path.join(record, "logs", "superlink.log")
    try:
        return request(sock, args, dict(os.environ), os.getcwd(), log, [])
    except Exception as err:  # noqa: BLE001 - the zygote is gone or busy: start the ServerApp as a process
        print(f"flotilla: the run's zygote could not start the ServerApp ({err}); starting it as a process",
              file=sys.stderr, flush=True)
        return None


def patch_executor(client_side: bool) -> bool:
    """Make flwr's SuperExec use Flotilla's executor where it would use subprocesses."""
    try:
        from flwr.supercore.constant import ExecutorType
        from flwr.supercore.superexec import run_superexec as rs
        from flwr.supercore.superexec.executor import types

        executor_cls = make_executor_class()
    except ImportError:
        return False
    if not callable(getattr(rs, "get_executor", None)) or not hasattr(types, "ExecutionSpec"):
        return False
    shipped = rs.get_executor

    def get_executor(executor_type, executor_config=None, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS and executor_config is None:
            ex = executor_cls()
            if client_side:
                ex.warm_up()
            return ex
        return shipped(executor_type, executor_config, **kwargs)

    rs.get_executor = get_executor
    return True


def _forget_main_module() -> None:
    """Keep forks from re-running this module as their __main__.

    multiprocessing hands each child the parent's main module to import as
    __mp_main__ (for pickled functions defined there). Ours are pickled by
    module name, so the children need none of it.
    """
    main_module = sys.modules["__main__"]
    main_module.__spec__ = None
    if hasattr(main_module, "__file__"):
        del main_module.__file__


def main() -> None:
    _forget_main_module()
    from flotilla.runtime.lean_imports import defer_unused_imports

    defer_unused_imports()  # before flwr: the other entry points of flwr.supercore.cli (~33 MiB)
    from flotilla.runtime.engine_tuning import WAKE_FD_ENV, superexec_waits_for_wakeups

    client_side = os.environ.get(ROLE_ENV, "client") == "client"
    if os.environ.get(WAKE_FD_ENV) and not superexec_waits_for_wakeups():
        print("flotilla: could not make the SuperExec wait for its SuperNode's wake-ups; it polls",
              file=sys.stderr, flush=True)
    if os.environ.get(FORK_ENV, "1") != "0" and not patch_executor(client_side):
        print("flotilla: could not install Flotilla's executor for this flwr version; "
              "tasks start as separate processes, unobserved", file=sys.stderr, flush=True)
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    # run the module's own copy: the fork server unpickles run_clientapp_task by module name
    from flotilla.runtime.superexec import main as _main

    _main()
