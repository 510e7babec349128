"""A ClientApp process that dies before replying is answered at once, with Flower's own error reply.

Flower answers the message of a ClientApp that died only when the task's
token expires for want of heartbeats (`ClientApp stopped responding.`, about
two minutes later): every round waits that long for a device whose ClientApp
the kernel killed at its memory limit. Flotilla's executor (in the device's
SuperExec) sees the fork exit at once, so:

- the SuperExec (`notify_task_failed`) tells its SuperNode the task FAILED,
  with why (the memory limit, or the signal), over the runtime API with the
  task's own token, as a ClientApp that catches an exception does;
- the SuperNode (`answer_failed_clientapps`) answers a failed ClientApp task's
  unanswered message with Flower's CLIENT_APP_CRASHED error carrying that
  reason: the same reply Flower gives when the token expires, minutes
  earlier. The ServerApp's strategy, its own push/pull loop or a workflow
  (SecAgg+) sees an error reply and goes on without the device.

Like Flower's token-expiry path, the reply goes to the run's messages the
node has handed out and not answered (a ClientApp that replied before dying
is left alone). A message whose ClientApp replied with its own error is
untouched: that error is already the reply.
"""

from __future__ import annotations

import os
import signal
import sys

from flotilla.contracts import DEVICE_MEMORY_ENV

REASON_PREFIX = "Flotilla: "


def describe_exit(exitcode: int, oom_kills_during: int, memory_limit: int | None) -> str | None:
    """Why a ClientApp process ended without replying, for its error reply; None for a clean exit.

    exitcode as multiprocessing reports it (-N: killed by signal N); oom_kills_during: OOM kills the
    kernel counted in the device's memory group while the process ran."""
    if exitcode == 0:
        return None
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL and oom_kills_during > 0:
            limit = f" ({_mib(memory_limit)})" if memory_limit else ""
            return (f"{REASON_PREFIX}the kernel killed the ClientApp at the device's memory limit{limit} "
                    "before it replied")
        return f"{REASON_PREFIX}the ClientApp was killed by {name} before it replied"
    if exitcode in _finished_itself():
        return None  # flwr's run_clientapp replied with the app's error and finished its task before exiting
    return f"{REASON_PREFIX}the ClientApp exited with code {exitcode} before it replied"


def _finished_itself() -> set[int]:
    """Exit statuses of a ClientApp process that caught the app's exception, replied with it and finished its
    task (flwr's ExitCode, as the kernel reports it: modulo 256)."""
    try:
        from flwr.supercore.exit import ExitCode
    except ImportError:
        return set()
    names = ("TASK_PROC_EXCEPTION", "COMMON_APP_IMPORT_ERROR", "COMMON_RUNTIME_DEPENDENCY_INSTALLATION_ERROR")
    return {getattr(ExitCode, n) % 256 for n in names if hasattr(ExitCode, n)}


def _mib(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n % 2**30 == 0 else f"{round(n / 2**20)} MiB"


class OwnMemoryGroup:
    """This process's memory cgroup (v1 or v2; inside a container, the container's): its OOM kills and limit,
    read as the device's group (sandbox.DeviceCgroup)."""

    def __init__(self) -> None:
        self.group = _own_group()

    def oom_kills(self) -> int:
        try:
            return self.group.oom_kills() if self.group is not None else 0
        except Exception:  # noqa: BLE001 - unreadable: no kill seen
            return 0

    def limit(self) -> int | None:
        if os.environ.get(DEVICE_MEMORY_ENV, "").isdigit():  # a shared fleet's device: its limit as declared
            return int(os.environ[DEVICE_MEMORY_ENV])
        try:
            return self.group.read_limits()["memory"] if self.group is not None else None
        except Exception:  # noqa: BLE001
            return None


def _own_group():
    try:
        from flotilla.sandbox.cgroup_layout import detect_layout
        from flotilla.sandbox.device_cgroup import DeviceCgroup
    except ImportError:
        return None
    layout, _ = detect_layout()
    if layout is None:
        return None
    return DeviceCgroup("self", layout.version, dict(layout.bases))


def notify_task_failed(spec, reason: str, quiet: bool = False) -> bool:
    """Tell the SuperNode that the ClientApp task `spec` (flwr's ExecutionSpec) FAILED, and why. quiet: a
    refusal is expected (a ClientApp that exits with a code after an exception has finished its task itself)."""
    try:
        from flwr.common.constant import SubStatus
        from flwr.proto.runtime_pb2 import PushTaskOutputRequest
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.tls import validate_and_resolve_root_certificates
    except ImportError as err:
        print(f"flotilla: cannot report the dead ClientApp to the SuperNode ({err}); Flower answers its message "
              "when the task's heartbeat expires", file=sys.stderr, flush=True)
        return False
    retry = make_simple_http_retry_invoker()
    retry.max_tries = 2
    try:
        client = RuntimeHttpClient.from_server_address(
            server_address=spec.runtime_api_address, insecure=spec.insecure,
            root_certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(spec.token)],
            retry_invoker=retry)
        try:
            client.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED, details=reason))
        finally:
            client.close()
    except Exception as err:  # noqa: BLE001 - the task is finished already, or the SuperNode is gone too
        if not quiet:
            print(f"flotilla: could not report the dead ClientApp to the SuperNode: {err!r}", file=sys.stderr,
                  flush=True)
        return False
    return True


def answer_failed_clientapps() -> bool:
    """SuperNode side: a ClientApp task finished FAILED gets its unanswered message answered with Flower's
    CLIENT_APP_CRASHED error (the reason the task reported), as Flower does when its token expires."""
    try:
        from flwr.app import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.constant import TaskType
        from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    except ImportError:
        return False
    shipped = InMemoryNodeState.__dict__.get("finish_task")
    store = getattr(InMemoryNodeState, "_store_error_replies", None)
    if shipped is None or store is None or not hasattr(ErrorCode, "CLIENT_APP_CRASHED"):
        return False
    if getattr(shipped, "_flotilla", False):
        return True

    def finish_task(self, task_id, sub_status, details, *args, **kwargs):
        finished = shipped(self, task_id, sub_status, details, *args, **kwargs)
        if finished and sub_status == SubStatus.FAILED and str(details).startswith(REASON_PREFIX):
            tasks = self.get_tasks(task_ids=[task_id])
            if tasks and tasks[0].type == TaskType.CLIENT_APP:
                self._store_error_replies({tasks[0].run_id}, Error(ErrorCode.CLIENT_APP_CRASHED, str(details)))
        return finished

    finish_task._flotilla = True
    InMemoryNodeState.finish_task = finish_task
    return True


def disabled() -> bool:
    return os.environ.get("FLOTILLA_ANSWER_DEAD_CLIENTAPPS", "1") == "0"
