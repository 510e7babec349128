"""A reply is listed to the ServerApp once its objects are all stored, and never held past HOLD_S."""

import hashlib
from types import SimpleNamespace

from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=no-name-in-module
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

from flotilla.runtime.whole_replies import ReplyHold, is_complete


def _oid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _reply_tree() -> ObjectTree:
    """message -> record dict -> two arrays, the shape of a small model reply."""
    arrays = [ObjectTree(object_id=_oid(f"array{i}")) for i in range(2)]
    record = ObjectTree(object_id=_oid("record"), children=arrays)
    return ObjectTree(object_id=_oid("message"), children=[record])


def _store_with_reply() -> InMemoryObjectStore:
    store = InMemoryObjectStore(verify=False)
    store.preregister(1, _reply_tree())
    return store


def test_a_tree_is_complete_only_when_every_object_has_its_content():
    store = _store_with_reply()
    assert not is_complete(store, _oid("message"))
    for name in ("message", "record", "array0"):
        store.put(_oid(name), name.encode())
    assert not is_complete(store, _oid("message"))  # one array still on its way
    store.put(_oid("array1"), b"array1")
    assert is_complete(store, _oid("message"))
    assert not is_complete(store, _oid("never-registered"))


def _state(store, delivered: str = ""):
    reply = SimpleNamespace(metadata=SimpleNamespace(delivered_at=delivered))
    return SimpleNamespace(object_store=store, message_ins_id_to_message_res_id={"ins": _oid("message")},
                           message_res_store={_oid("message"): reply})


def test_an_uploading_reply_is_held_then_listed_when_whole():
    store = _store_with_reply()
    hold = ReplyHold(hold_s=30.0, clock=lambda: 0.0)
    state = _state(store)
    assert hold.held(state, {"ins", "no-reply-yet"}) == {"ins"}
    for name in ("message", "record", "array0", "array1"):
        store.put(_oid(name), name.encode())
    assert hold.held(state, {"ins"}) == set()
    assert hold.since == {}


def test_a_reply_that_never_completes_goes_to_flowers_path_after_hold_s():
    store = _store_with_reply()
    now = [0.0]
    hold = ReplyHold(hold_s=30.0, clock=lambda: now[0])
    state = _state(store)
    assert hold.held(state, {"ins"}) == {"ins"}
    now[0] = 29.0
    assert hold.held(state, {"ins"}) == {"ins"}
    now[0] = 30.5  # its device died mid-upload: Flower's retries and its "unavailable" error reply take over
    assert hold.held(state, {"ins"}) == set()


def test_delivered_replies_and_other_stores_are_left_alone():
    store = _store_with_reply()
    assert ReplyHold().held(_state(store, delivered="2026-12-01T00:00:00"), {"ins"}) == set()
    assert ReplyHold().held(SimpleNamespace(object_store=object()), {"ins"}) == set()  # not the in-memory store
