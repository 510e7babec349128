"""A Grid wrapper that waits for replies the way a small fleet needs.

Flower's HttpGrid.send_and_receive sleeps 3 s between pulls, which adds up
to 3 s to every round. This wrapper pulls every `poll_s` through the public
Grid API (push_messages / pull_messages), gives up on messages to devices
the driver reported lost, and can stop waiting at a round deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid


class FleetGrid:
    def __init__(self, grid: Grid, poll_s: float = 0.1, lost_file: Path | None = None) -> None:
        self._grid = grid
        self.poll_s = poll_s
        self.lost_file = lost_file
        self.node_names: dict[int, str] = {}  # node id -> device name (from the capability query)
        self.deadline_s: float | None = None  # set per round by the strategy
        self.abandoned: list[int] = []  # node ids given up on in the last exchange
        self.on_abandon: Callable[[int, str], None] | None = None

    def __getattr__(self, name):  # everything else is Flower's
        return getattr(self._grid, name)

    def lost_devices(self) -> set[str]:
        if not self.lost_file or not self.lost_file.exists():
            return set()
        try:
            return set(json.loads(self.lost_file.read_text()))
        except (json.JSONDecodeError, OSError):
            return set()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # e.g. no evaluate round: keep the last exchange's record of who was given up on
            return []
        dst = {}
        ids = list(self._grid.push_messages(messages))
        for mid, msg in zip(ids, messages):
            dst[mid] = msg.metadata.dst_node_id
        pending = set(ids)
        self.abandoned = []
        start = time.time()
        limits = [t for t in (timeout, self.deadline_s) if t is not None]
        end = start + min(limits) if limits else None
        replies: list[Message] = []
        last_check = 0.0
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending:
                break
            now = time.time()
            if end is not None and now >= end:
                self._abandon(pending, dst, "deadline")
                break
            if now - last_check > 1.0:
                last_check = now
                lost = self.lost_devices()
                gone = {m for m in pending if self.node_names.get(dst[m]) in lost}
                if gone:
                    self._abandon(gone, dst, "lost")
                    pending -= gone
            time.sleep(self.poll_s)
        return replies

    def _abandon(self, mids: set[str], dst: dict[str, int], why: str) -> None:
        for m in mids:
            self.abandoned.append(dst[m])
            if self.on_abandon:
                self.on_abandon(dst[m], why)
