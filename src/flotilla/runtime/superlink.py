"""`flower-superlink` whose SuperExec hosts every ServerApp observed (flotilla.runtime.serverapp).

The SuperLink starts its SuperExec as `flower-superexec ARGS` in a new
session; here it is `python -m flotilla.runtime.superexec ARGS` in the
SuperLink's own process group (so ending the group ends the ServerApp too).
Its ServerApp tasks then run as `python -m flotilla.runtime.serverapp`, which
observes the app and writes the run record named by FLOTILLA_RECORD_DIR.
Everything else is flwr's SuperLink, unmodified, with the same arguments.
"""

from __future__ import annotations

import os
import sys

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


def main() -> None:
    import signal

    from flotilla.contracts import OWNER_LEASE_ENV
    from flotilla.runtime.lease import watch_owner

    def owner_gone() -> None:
        print("flotilla: the run's driver is gone (its lease went stale); stopping the SuperLink",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    watch_owner(os.environ.get(OWNER_LEASE_ENV), owner_gone)
    if os.environ.get("FLOTILLA_FORK_CLIENTAPPS", "1") != "0" and not use_flotilla_superexec():
        print("flotilla: could not host the ServerApp for this flwr version; it runs unobserved",
              file=sys.stderr, flush=True)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
