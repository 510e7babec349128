"""A Grid wrapper that waits for replies the way a small fleet needs.

Flower's HttpGrid.send_and_receive sleeps 3 s between pulls, which adds up
to 3 s to every round. This wrapper pulls every `poll_s` (longer while
many replies are pending) through the public Grid API (push_messages /
pull_messages), gives up on messages to devices the driver reported lost,
and can stop waiting at a round deadline.

A message given up on at the deadline is not forgotten: its device is still
working on it. It stays `outstanding` (the device counts as busy, so the
strategy does not queue more work behind it) and a background thread pulls
it; a late reply goes to `late_replies`, which `harvest` hands to the
strategy (which may still use it, as a stale update). Messages to nodes in
`optional` are not waited for at all: they go straight to `outstanding`.

Late replies are pulled in the background because a pull returns only once
all of a reply's arrays are in: a SuperNode at 0.125 CPU pushes them for a
second or two, and a round that pulled them itself waited that long.
Flower's grid client (httpx) serves both threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

# Each pull is a request the one SuperLink serves and carries every pending id: with many replies pending,
# one arriving a little later costs nothing, so the pause grows with them (100 pending: 1 s; the last: poll_s).
POLL_PER_PENDING_S = 0.01
POLL_CAP_S = 1.0


def poll_pause(poll_s: float, pending: int) -> float:
    return max(poll_s, min(POLL_CAP_S, poll_s + POLL_PER_PENDING_S * pending))


@dataclass(frozen=True)
class Outstanding:
    node_id: int
    pushed_at: float
    tag: int | None = None  # the strategy's label for the exchange (its round)


@dataclass(frozen=True)
class LateReply:
    message: Message
    pushed_at: float
    arrived_at: float
    tag: int | None = None


class FleetGrid:
    def __init__(self, grid: Grid, poll_s: float = 0.1, lost_file: Path | None = None, observer=None) -> None:
        """observer: the hosting ServerApp's (flotilla.runtime.observer): device names and which nodes are
        usable come from it, so a restarted device (a new node) is known by its name and its old node dropped."""
        self._grid = grid
        self.poll_s = poll_s
        self.lost_file = lost_file
        self.observer = observer
        self.node_names: dict[int, str] = _Names(observer)  # node id -> device name
        self.deadline_s: float | None = None  # set per round by the strategy; None: wait for everyone
        self.optional: set[int] = set()  # nodes whose reply the next exchange does not wait for
        self.tag: int | None = None  # label stored with outstanding messages (the strategy's round)
        self.abandoned: list[int] = []  # node ids given up on in the last exchange
        self.abandon_reasons: dict[int, str] = {}  # node id -> "deadline" | "lost" (last exchange)
        self.on_abandon: Callable[[int, str], None] | None = None
        self.pushed_at: float | None = None  # when the last exchange's messages went out
        self.arrived: dict[int, float] = {}  # node id -> when its reply arrived (last exchange)
        self.sent_to: dict[str, int] = {}  # message id -> the node it went to (last exchange)
        self.outstanding: dict[str, Outstanding] = {}  # message id -> past-deadline message still being worked on
        self.late_replies: list[LateReply] = []  # late replies not yet taken by the strategy
        self._lock = threading.Lock()  # outstanding and late_replies, shared with the puller thread
        self._puller: threading.Thread | None = None
        self._closed = threading.Event()

    def __getattr__(self, name):  # everything else is Flower's
        return getattr(self._grid, name)

    def gone(self, node_id: int) -> bool:
        """Is this node's device down (dead, stuck, restarting) or the node a stale incarnation of it?"""
        if self.observer is not None:
            return not self.observer.usable(node_id)
        return self.node_names.get(node_id) in self.lost_devices()

    def lost_devices(self) -> set[str]:
        if not self.lost_file or not self.lost_file.exists():
            return set()
        try:
            return set(json.loads(self.lost_file.read_text()))
        except (json.JSONDecodeError, OSError):
            return set()

    def busy_nodes(self) -> set[int]:
        """Nodes still working on an earlier message (past its deadline, or sent as optional)."""
        with self._lock:
            return {o.node_id for o in self.outstanding.values()}

    def outstanding_now(self) -> list[Outstanding]:
        with self._lock:
            return list(self.outstanding.values())

    def harvest(self) -> list[LateReply]:
        """Hand over the late replies the puller has collected so far (never waits for one)."""
        self._forget_lost()
        with self._lock:
            out, self.late_replies = self.late_replies, []
        return out

    def close(self) -> None:
        self._closed.set()
        if self._puller is not None:
            self._puller.join(timeout=5)

    def _keep_outstanding(self, mid: str, o: Outstanding) -> None:
        with self._lock:
            self.outstanding[mid] = o
        if self._puller is None:
            self._puller = threading.Thread(target=self._pull_late_loop, name="flotilla-late-replies", daemon=True)
            self._puller.start()

    def _pull_late_loop(self) -> None:
        while not self._closed.wait(self.poll_s):
            with self._lock:
                ids = list(self.outstanding)
            if not ids:
                continue
            try:
                got = list(self._grid.pull_messages(ids))
            except Exception as e:  # noqa: BLE001 - a failed pull is retried on the next poll
                print(f"[flotilla] pulling late replies failed, retrying: {e}", flush=True)
                continue
            now = time.time()
            with self._lock:
                for m in got:
                    o = self.outstanding.pop(m.metadata.reply_to_message_id, None)
                    if o is not None:
                        self.late_replies.append(LateReply(m, o.pushed_at, now, o.tag))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.abandoned, self.abandon_reasons, self.arrived = [], {}, {}
        if not messages:
            return []
        ids = list(self._grid.push_messages(messages))
        start = self.pushed_at = time.time()
        dst = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if mid}
        self.sent_to = dst  # an error reply from the SuperLink itself comes from its node, not the device's
        pending = set()
        for mid, node in dst.items():
            if node in self.optional:
                self._keep_outstanding(mid, Outstanding(node, start, self.tag))
            else:
                pending.add(mid)
        limits = [t for t in (timeout, self.deadline_s) if t is not None]
        end = start + min(limits) if limits else None
        replies: list[Message] = []
        last_check = 0.0
        while pending:
            # Only this round's messages: pulling a late reply blocks until its arrays are in (the puller's job)
            got = list(self._grid.pull_messages(list(pending)))
            now = time.time()
            for m in got:
                mid = m.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies.append(m)
                    self.arrived[dst[mid]] = now
            if not pending:
                break
            if end is not None and now >= end:
                for mid in pending:
                    self._keep_outstanding(mid, Outstanding(dst[mid], start, self.tag))
                self._abandon(pending, dst, "deadline")
                break
            if now - last_check > 1.0:
                last_check = now
                gone = {m for m in pending if self.gone(dst[m])}
                if gone:
                    self._abandon(gone, dst, "lost")
                    pending -= gone
            time.sleep(poll_pause(self.poll_s, len(pending)))
        return replies

    def _forget_lost(self) -> None:
        with self._lock:
            for mid, o in list(self.outstanding.items()):
                if self.gone(o.node_id):
                    del self.outstanding[mid]

    def _abandon(self, mids: set[str], dst: dict[str, int], why: str) -> None:
        for m in mids:
            self.abandoned.append(dst[m])
            self.abandon_reasons[dst[m]] = why
            if self.on_abandon:
                self.on_abandon(dst[m], why)


class _Names(dict):
    """node id -> device name: what the strategy set (its capability query), else what the observer knows
    (a device restarted under a new node id keeps its name)."""

    def __init__(self, observer=None) -> None:
        super().__init__()
        self._observer = observer

    def __missing__(self, node_id: int) -> str:
        if self._observer is not None:
            name = self._observer.name_of(node_id)[0]
            if not name.startswith("node-"):
                return name
        raise KeyError(node_id)

    def get(self, node_id, default=None):
        try:
            return self[node_id]
        except KeyError:
            return default
