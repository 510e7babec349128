"""The driver's lease: a file it touches every second; the fleet stops itself when it goes stale.

A driver killed with SIGKILL cannot tear its fleet down. Every device and the
SuperLink watch the lease (FLOTILLA_OWNER_LEASE, in the run record) and end
themselves, with everything they started, once it is older than
OWNER_TIMEOUT_S: no fleet outlives its owner unattended. A later `flotilla
resume` or `stop` finds the record and cleans up what is left. No lease file
(commands run by hand from `flotilla render`) means no owner to watch.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from flotilla.contracts import OWNER_TIMEOUT_S

TOUCH_S = 1.0


def owner_gone(path: str | Path | None, timeout_s: float = OWNER_TIMEOUT_S) -> bool:
    if not path:
        return False
    try:
        return time.time() - os.stat(path).st_mtime > timeout_s
    except FileNotFoundError:
        return False


def watch_owner(path: str | Path | None, on_gone, every_s: float = TOUCH_S) -> threading.Thread | None:
    """Call on_gone() (once) from a daemon thread when the lease goes stale."""
    if not path:
        return None

    def loop():
        while not owner_gone(path):
            time.sleep(every_s)
        on_gone()

    t = threading.Thread(target=loop, name="flotilla-owner-watch", daemon=True)
    t.start()
    return t


class Lease:
    """The driver's side: touch the lease every second while the run is ours."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lease":
        self.path.touch()
        self._thread = threading.Thread(target=self._keep, name="flotilla-lease", daemon=True)
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(TOUCH_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.path.touch()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
