"""A ClientApp that dies before replying is answered at once with Flower's own error reply."""

import signal

from flotilla.runtime.dead_clientapps import REASON_PREFIX, answer_failed_clientapps, describe_exit


def test_why_a_clientapp_died_is_said_in_its_error_reply():
    assert describe_exit(0, 0, None) is None
    oom = describe_exit(-signal.SIGKILL, 1, 768 * 2**20)
    assert oom == f"{REASON_PREFIX}the kernel killed the ClientApp at the device's memory limit (768 MiB) before it replied"
    assert "(1 GiB)" in describe_exit(-signal.SIGKILL, 2, 2**30)
    assert describe_exit(-signal.SIGKILL, 0, 2**30).endswith("killed by SIGKILL before it replied")  # not the kernel's OOM
    assert "killed by SIGSEGV" in describe_exit(-signal.SIGSEGV, 0, None)
    assert describe_exit(3, 0, None).endswith("exited with code 3 before it replied")
    from flwr.supercore.exit import ExitCode

    assert describe_exit(ExitCode.TASK_PROC_EXCEPTION % 256, 0, None) is None  # it replied with the app's error


def _node_with_a_retrieved_message():
    """A real SuperNode state holding one train message its ClientApp has pulled, and that ClientApp's task."""
    from flwr.app import Message, RecordDict
    from flwr.common import Metadata, now
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    state = InMemoryNodeState(ObjectStoreFactory().store())
    metadata = Metadata(run_id=11, message_id="", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=now().timestamp(), ttl=3600.0, message_type="train")
    msg = Message(metadata=metadata, content=RecordDict())
    msg.metadata.__dict__["_message_id"] = msg.object_id
    state.store_message(msg)
    assert [m.metadata.message_id for m in state.get_messages_legacy(run_ids=[11], is_reply=False)] == [
        msg.metadata.message_id]  # pulled by its ClientApp
    task_id = state.create_task(TaskType.CLIENT_APP, 11)
    return state, msg, task_id


def _replies(state):
    return [e.message for e in state.msg_store.values() if e.message.metadata.reply_to_message_id]


def test_a_failed_clientapp_task_reported_by_flotilla_answers_its_message_with_flowers_error():
    from flwr.common.constant import ErrorCode, SubStatus

    assert answer_failed_clientapps() and answer_failed_clientapps()  # idempotent: installed once
    state, msg, task_id = _node_with_a_retrieved_message()
    reason = describe_exit(-signal.SIGKILL, 1, 768 * 2**20)
    assert state.finish_task(task_id, SubStatus.FAILED, reason)
    (reply,) = _replies(state)
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.error.code == ErrorCode.CLIENT_APP_CRASHED and reply.error.reason == reason
    assert not state.finish_task(task_id, SubStatus.FAILED, reason) and len(_replies(state)) == 1  # once


def test_other_failed_tasks_are_left_to_flower():
    from flwr.common.constant import SubStatus

    answer_failed_clientapps()
    state, _, task_id = _node_with_a_retrieved_message()
    assert state.finish_task(task_id, SubStatus.FAILED, "ClientApp raised: its own error reply is the answer")
    assert _replies(state) == []
