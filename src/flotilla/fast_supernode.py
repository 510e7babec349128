"""`flower-supernode` with its waits shortened and a fork-server SuperExec.

Runs the unmodified SuperNode after engine_tuning's patches: its idle poll
(3 s) capped at FLOTILLA_POLL_S (default 0.2 s; pulls are small HTTP requests
to the SuperLink), its in-process reply checks (0.5 s) at 20 ms, and object
pulls retried after 50 ms instead of 1 s. The SuperNode starts its SuperExec
as `flower-superexec ARGS`; here that becomes `python -m flotilla.fast_superexec
ARGS`, whose ClientApps are forks of a warm process and which sleeps until the
SuperNode wakes it through a pipe on each new task. Whatever a future flwr
moved is reported on stderr and left as shipped.
"""

from __future__ import annotations

import os
import sys

from flotilla import engine_tuning


class _SuperExecPopen:
    """subprocess stand-in: `flower-superexec ARGS` becomes `python -m flotilla.fast_superexec ARGS`."""

    def __init__(self, subprocess_module) -> None:
        self._subprocess = subprocess_module

    def Popen(self, args, *a, **kw):  # noqa: N802 (subprocess's name)
        if not (isinstance(args, list) and args and args[0] == "flower-superexec"):
            return self._subprocess.Popen(args, *a, **kw)
        args = [sys.executable, "-m", "flotilla.fast_superexec", *args[1:]]
        if not engine_tuning.wake_superexec_on_tasks():
            return self._subprocess.Popen(args, *a, **kw)
        r = engine_tuning.superexec_wake_pipe()  # the SuperExec sleeps until a task is created
        env = dict(kw.pop("env", None) or os.environ) | {engine_tuning.WAKE_FD_ENV: str(r)}
        try:
            return self._subprocess.Popen(args, *a, env=env, pass_fds=(*kw.pop("pass_fds", ()), r), **kw)
        finally:
            os.close(r)

    def __getattr__(self, name):
        return getattr(self._subprocess, name)


def use_fast_superexec() -> bool:
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if not hasattr(getattr(sci, "subprocess", None), "Popen"):
        return False
    sci.subprocess = _SuperExecPopen(sci.subprocess)
    return True


def _warn(what: str) -> None:
    print(f"flotilla: {what} for this flwr version; running it as shipped", file=sys.stderr, flush=True)


def main() -> None:
    if engine_tuning.poll_cap_s() > 0 and not engine_tuning.shorten_supernode_poll():
        _warn("could not shorten the SuperNode poll")
    if not engine_tuning.shorten_pull_backoff():
        _warn("could not shorten the object pull back-off")
    if os.environ.get("FLOTILLA_FORK_CLIENTAPPS", "1") != "0" and not use_fast_superexec():
        _warn("could not start the fork-server SuperExec")
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
