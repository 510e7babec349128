"""Latency fixes for flwr 1.4x's deployment engine, applied in-process.

Measured on a round of the built-in app (4 devices): of 3.5 s per round,
0.5 s was training. The rest was waiting in three places, none of which is
work:

- the SuperNode sleeps a hard-coded 3 s whenever a poll finds no message,
  and 0.5 s between checks for a finished reply (start_client_internal);
- an object pull that finds the object not there yet (the SuperNode creates
  the ClientApp's task before it has pulled the message's arrays; the
  ServerApp pulls replies while the SuperNode still pushes them) backs off
  1 s, doubling up to 10 s (inflatable_utils.pull_objects);
- each ClientApp is a new Python process importing flwr (fast_superexec).

Each patch here changes a timing constant of unmodified flwr code and
returns whether it found what it patches; callers say so when a future flwr
moved it, and the engine then runs as shipped.
"""

from __future__ import annotations

import os
import time as _time

# First retry of a missing object after 50 ms, backing off to 1 s; flwr's
# PULL_MAX_TIME (2 h) still bounds the whole pull, so allow the tries for it.
PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 1.0
PULL_MAX_TRIES = 7200


class CappedSleepTime:
    """Stands in for a module's `time`: sleep() is capped, everything else is time's."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name):
        return getattr(_time, name)


def poll_cap_s() -> float:
    return float(os.environ.get("FLOTILLA_POLL_S", "0.2"))


def shorten_supernode_poll(cap_s: float | None = None) -> bool:
    """Cap the SuperNode loop's sleeps (3 s idle poll, 0.5 s reply check) at cap_s."""
    cap_s = poll_cap_s() if cap_s is None else cap_s
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if isinstance(getattr(sci, "time", None), CappedSleepTime):
        return True
    if getattr(sci, "time", None) is not _time:
        return False
    sci.time = CappedSleepTime(cap_s)
    return True


def shorten_pull_backoff(initial_s: float = PULL_INITIAL_BACKOFF_S, cap_s: float = PULL_BACKOFF_CAP_S) -> bool:
    """Retry a not-yet-available object after initial_s (not 1 s), backing off to cap_s (not 10 s)."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        return False
    funcs = [getattr(iu, n, None) for n in ("pull_objects", "pull_and_inflate_object_from_tree")]
    wanted = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if not all(f is not None and wanted <= set(f.__kwdefaults__ or {}) for f in funcs):
        return False
    for f in funcs:
        f.__kwdefaults__.update(initial_backoff=initial_s, backoff_cap=cap_s, max_tries_per_object=PULL_MAX_TRIES)
    return True
