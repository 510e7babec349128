"""`flower-supernode` with a shorter idle poll.

flwr 1.4x's SuperNode sleeps a hard-coded 3 s whenever a pull finds no
message (flwr/supernode/start_client_internal.py), and pushes a finished
reply only on its next loop: up to 6 s of idle time per round. This entry
point runs the unmodified SuperNode with that module's `time` replaced by a
proxy whose sleep() is capped at FLOTILLA_POLL_S (default 0.2 s). Pulls are
small HTTP requests to the SuperLink. If a future flwr moves that loop, the
patch finds nothing to patch, says so, and the SuperNode runs as shipped.
"""

from __future__ import annotations

import os
import sys
import time as _time


class _FastTime:
    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name):
        return getattr(_time, name)


def patch_poll(cap_s: float) -> bool:
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if getattr(sci, "time", None) is not _time:
        return False
    sci.time = _FastTime(cap_s)
    return True


def main() -> None:
    cap = float(os.environ.get("FLOTILLA_POLL_S", "0.2"))
    if cap > 0 and not patch_poll(cap):
        print("flotilla: could not shorten the SuperNode poll for this flwr version; running it as shipped",
              file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
