"""The Grid a hosted ServerApp is handed: Flower's, observed, and quick to notice lost devices.

Every message the app sends and every reply it receives passes through it
(Observer.sent / received). HttpGrid's send_and_receive sleeps 3 s between
pulls; this one pulls every POLL_S. A message to a device the driver reported
lost is answered at once with Flower's own NODE_UNAVAILABLE error instead of
being waited for until the app's timeout, and such devices are not offered
for sampling (get_node_ids leaves them out).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from flotilla.contracts import MEMORY_PROBE_ENV, OWNER_LEASE_ENV, DeviceStatus
from flotilla.runtime.observer import Observer

POLL_S = 0.1  # pulls while waiting for replies (HttpGrid: 3 s)
LOST_CHECK_S = 1.0  # how often the lost-device list is re-read while waiting
PROBE_WAIT_S = 240.0  # the driver's verdict on round 1's messages (memory_check.PROBE_TIMEOUT_S and some)


class ObservingGrid(Grid):
    """Flower's Grid, observed: what the app sends and receives is recorded; replies are pulled every POLL_S."""

    def __init__(self, grid: Grid, observer: Observer, poll_s: float = POLL_S) -> None:
        self._grid, self.observer, self.poll_s = grid, observer, poll_s
        # memory_check: round 1's first train messages are measured before they go (once per run)
        self._probe_pending = (os.environ.get(MEMORY_PROBE_ENV) == "1" and observer.paths is not None
                               and not (observer.paths.probe / "verdict.json").exists())

    # the abstract Grid API, delegated
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Flower's nodes, without those of devices that are down or replaced (restarted under a new id)."""
        return [n for n in self._grid.get_node_ids() if self.observer.usable(n)]

    def get_nodes(self):
        return self._grid.get_nodes()

    def __getattr__(self, name):  # anything else HttpGrid has (close, ...)
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if self._probe_pending and any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            self._probe_pending = False
            probe_before_sending(messages, self.observer)
        ids = [str(i) for i in self._grid.push_messages(messages)]
        self.observer.sent(messages, ids, time.time())
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        t = time.time()
        for r in replies:
            self.observer.received(r, t)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """HttpGrid's semantics (replies until all are in or `timeout`), pulling every poll_s, and Flower's
        NODE_UNAVAILABLE error at once for a message whose device the driver reported lost."""
        messages = list(messages)
        ids = list(self.push_messages(messages))
        by_id = {mid: m for mid, m in zip(ids, messages) if mid}
        pending = set(by_id)
        end = time.time() + timeout if timeout is not None else None
        replies: list[Message] = []
        last_lost_check = 0.0
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            now = time.time()
            if not pending:
                break
            if end is not None and now >= end:
                for mid in pending:
                    self.observer.given_up(mid, DeviceStatus.LATE, f"no reply within the app's timeout ({timeout} s)",
                                           now)
                break
            if now - last_lost_check >= LOST_CHECK_S:
                last_lost_check = now
                replies += self._answer_for_lost(pending, by_id, now)
            time.sleep(self.poll_s)
        return replies

    def _answer_for_lost(self, pending: set[str], by_id: dict[str, Message], now: float) -> list[Message]:
        out = []
        for mid in list(pending):
            msg = by_id[mid]
            name = self.observer.name_of(msg.metadata.dst_node_id)[0]
            if not self.observer.usable(msg.metadata.dst_node_id):
                pending.discard(mid)
                reason = f"Flotilla: device {name} is lost (its process exited or stopped answering)"
                self.observer.given_up(mid, DeviceStatus.LOST, reason, now)
                out.append(node_unavailable_reply(msg, reason))
        return out


def probe_before_sending(messages: list[Message], observer: Observer) -> None:
    """Leave, per device class, the message for one of its devices for the driver to measure
    (flotilla.memory_check), and wait for its verdict before round 1 goes out. A driver that refuses the run
    stops it meanwhile; a driver that is gone (its lease stale) or silent past the wait lets the round go."""
    import pickle

    from flotilla.runtime.lease import owner_gone

    d = observer.paths.probe
    d.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, str] = {}
    for m in messages:
        if m.metadata.message_type != MessageType.TRAIN:
            continue
        device, cls = observer.name_of(m.metadata.dst_node_id)
        if cls and cls not in chosen:
            (d / f"{device}.msg").write_bytes(pickle.dumps(m))
            chosen[cls] = device
    if not chosen:
        return
    tmp = d / "request.json.tmp"
    tmp.write_text(json.dumps({"devices": chosen, "t": time.time()}))
    os.replace(tmp, d / "request.json")
    print(f"flotilla: measuring one train message per device class before round 1 ({', '.join(chosen)})",
          flush=True)
    lease, end = os.environ.get(OWNER_LEASE_ENV), time.time() + PROBE_WAIT_S
    while not (d / "verdict.json").exists() and time.time() < end and not owner_gone(lease):
        time.sleep(0.1)


def node_unavailable_reply(msg: Message, reason: str) -> Message:
    """The reply Flower's SuperLink itself gives for a message to an offline node."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=msg)
