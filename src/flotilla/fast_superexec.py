"""`flower-superexec` whose ClientApp processes are forks of a warm process.

Flower's SuperExec starts every ClientApp task as a fresh `flwr-clientapp`
process: a Python start plus `import flwr`, measured at 3 s on 1.0 CPU and
18 s on 0.125 CPU, for every message. That cost, not training, dominated a
round on small devices. This entry point runs flwr's unmodified SuperExec
loop with one change: its executor (flwr's own Executor protocol:
launch/reconcile/close) starts ClientApp tasks through a multiprocessing
fork server that has already imported flwr's ClientApp runtime and the
built-in app. Each task is still its own process running flwr's
`run_clientapp` with its own task token, as Flower intends; it just starts
in milliseconds. Other task types, and any flwr that lacks the pieces this
relies on, fall back to flwr's SubprocessExecutor.

The fork server is a child of the SuperExec (same process group and cgroup,
so the device's limits and teardown cover it and its forks); it exits when
the SuperExec does.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

# Imported by the fork server once; every ClientApp fork shares them.
PRELOAD = [
    "flwr.supernode.runtime.run_clientapp",
    "flwr.supercore.tls",
    "flotilla.app.client_app",
    "flotilla.fast_superexec",
]


def run_clientapp_task(address: str, token: str, insecure: bool, root_certificates_path: str | None,
                       parent_pid: int | None, runtime_dependency_install: bool) -> None:
    """What `flwr-clientapp --token ...` does, inside a fork of the warm process."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    from flotilla.engine_tuning import shorten_pull_backoff

    shorten_pull_backoff()  # the task's message arrays may still be on their way to the SuperNode

    sys.argv = ["flwr-clientapp"]  # flwr names its exit telemetry event after argv[0]
    run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=runtime_dependency_install,
    )


def make_executor_class():
    """ForkServerExecutor, built on flwr's SubprocessExecutor (imported late: flwr is heavy)."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ForkServerExecutor(SubprocessExecutor):
        """Start ClientApp tasks as forks of a pre-imported server; anything else as flwr does."""

        def __init__(self, preload: list[str] | None = None) -> None:
            self._ctx = multiprocessing.get_context("forkserver")
            self._preload = PRELOAD if preload is None else preload
            self._ctx.set_forkserver_preload(self._preload)
            # start it now: the first task should not pay for the server's imports
            from multiprocessing import forkserver

            forkserver.ensure_running()
            self._live: list[multiprocessing.process.BaseProcess] = []
            print(f"flotilla: ClientApps start as forks of a warm process ({', '.join(self._preload)})",
                  file=sys.stderr, flush=True)

        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP or spec.suppress_output:
                return super().launch(spec)
            proc = self._ctx.Process(
                target=run_clientapp_task,
                args=(spec.runtime_api_address, spec.token, spec.insecure, spec.root_certificates_path,
                      spec.parent_pid, spec.runtime_dependency_install),
                name=f"flwr-clientapp-{spec.task_id}",
            )
            try:
                proc.start()
            except Exception as err:  # noqa: BLE001 (a broken fork server must not end the SuperExec)
                print(f"flotilla: fork server failed ({err!r}); starting flwr-clientapp instead",
                      file=sys.stderr, flush=True)
                return super().launch(spec)
            self._live.append(proc)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            self._live = [p for p in self._live if p.is_alive()]  # is_alive() reaps finished ones

        def close(self) -> None:
            for p in self._live:
                if p.is_alive():
                    p.terminate()
            for p in self._live:
                p.join(5)

    return ForkServerExecutor


def patch_executor() -> bool:
    """Make flwr's SuperExec use the fork-server executor where it would use subprocesses."""
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
            return executor_cls()
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
    from flotilla.engine_tuning import WAKE_FD_ENV, superexec_waits_for_wakeups

    if os.environ.get(WAKE_FD_ENV) and not superexec_waits_for_wakeups():
        print("flotilla: could not make the SuperExec wait for its SuperNode's wake-ups; it polls",
              file=sys.stderr, flush=True)
    if os.environ.get("FLOTILLA_FORK_CLIENTAPPS", "1") != "0" and not patch_executor():
        print("flotilla: could not install the fork-server executor for this flwr version; "
              "ClientApps start as separate processes", file=sys.stderr, flush=True)
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    # run the module's own copy: the fork server unpickles run_clientapp_task by module name
    from flotilla.fast_superexec import main as _main

    _main()
