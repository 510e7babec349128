"""The ServerApp writes its own log into the run record.

Following it with `flwr log --stream` costs a long-lived CLI process (a third
of a core here, on a 2-core machine that is training); writing the file from
the ServerApp costs nothing and works on every target whose run directory is
mounted where the ServerApp runs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class _Tee:
    def __init__(self, stream, fh) -> None:
        self.stream, self.fh = stream, fh

    def write(self, data: str) -> int:
        self.fh.write(data)
        self.fh.flush()
        return self.stream.write(data)

    def flush(self) -> None:
        self.fh.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def tee_to(path: Path) -> None:
    """Copy Flower's log records and this process's stdout/stderr into `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a", buffering=1)
    handler = logging.StreamHandler(fh)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("flwr").addHandler(handler)
    sys.stdout = _Tee(sys.stdout, fh)
    sys.stderr = _Tee(sys.stderr, fh)
