"""The SuperLink hands the ServerApp a device's reply once the reply's objects are all in.

A SuperNode sends its reply in two steps: `push-messages` registers the
message and its object tree, then one `push-object` request per object
(each model array and chunk, ~20 for the example's small CNN). flwr 1.42's
SuperLink lists the reply to the ServerApp's next `pull-messages` right after
the first step, and the ServerApp then pulls its objects while they are still
arriving, retrying each missing one with back-off. Measured on a 10-device
round: 369 `pull-object` requests from the ServerApp for 10 replies of ~22
objects, so ~17 retries per reply, each a full request at the one SuperLink
(~6 ms of its CPU), worst for the slowest devices, which upload slowest.

Here a reply whose objects are not all stored stays out of `pull-messages`
until they are, so the ServerApp's pulls find every object on the first try.
A reply held longer than HOLD_S (its device died mid-upload, say) is listed
as shipped, and Flower's own retries and its "objects unavailable" error
take over: a reply is never lost or held for good here.
"""

from __future__ import annotations

import time

HOLD_S = 30.0  # then Flower's own path: pull with retries, an error reply if the objects never come


def is_complete(store, object_id: str) -> bool:
    """Every object of the tree rooted at object_id is stored with its content (flwr's in-memory store)."""
    todo = [object_id]
    entries = store.store  # read without the store's lock: dict reads are atomic, and no new lock order

    while todo:
        entry = entries.get(todo.pop())
        if entry is None or not entry.is_available:
            return False
        todo.extend(entry.child_object_ids)
    return True


class ReplyHold:
    """Which inquired messages have a reply that is registered but still uploading (held since when)."""

    def __init__(self, hold_s: float = HOLD_S, clock=time.monotonic) -> None:
        self.hold_s, self.clock = hold_s, clock
        self.since: dict[str, float] = {}  # reply message id -> first seen incomplete

    def held(self, state, message_ids) -> set[str]:
        store = getattr(state, "object_store", None)
        if store is None or not hasattr(store, "store"):
            return set()
        out, now = set(), self.clock()
        for mid in message_ids:
            res_id = state.message_ins_id_to_message_res_id.get(mid)
            res = state.message_res_store.get(res_id) if res_id else None
            if res is None or res.metadata.delivered_at != "":
                continue
            if is_complete(store, res_id):
                self.since.pop(res_id, None)
                continue
            first = self.since.setdefault(res_id, now)
            if now - first < self.hold_s:
                out.add(mid)
            else:
                self.since.pop(res_id, None)  # Flower's path from here
        return out


def list_whole_replies_only(hold_s: float = HOLD_S) -> bool:
    """Patch flwr's in-memory LinkState; False (flwr as shipped) where its names moved."""
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return False
    shipped = getattr(InMemoryLinkState, "get_message_res", None)
    if shipped is None or getattr(shipped, "_flotilla_whole", False):
        return shipped is not None
    hold = ReplyHold(hold_s)

    def get_message_res(self, message_ids, run_id):
        if not all(hasattr(self, n) for n in ("lock", "message_ins_id_to_message_res_id", "message_res_store")):
            return shipped(self, message_ids, run_id)
        with self.lock:  # the same lock flwr's get_message_res takes (an RLock)
            held = hold.held(self, message_ids)
            return shipped(self, set(message_ids) - held if held else message_ids, run_id)

    get_message_res._flotilla_whole = True
    InMemoryLinkState.get_message_res = get_message_res
    return True
