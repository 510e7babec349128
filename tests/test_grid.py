"""FleetGrid: the round waits for its own replies only; late replies are pulled in the background.

The grid below has Flower's Grid surface that FleetGrid uses (push_messages,
pull_messages). Its pull of one reply takes seconds, as Flower's does while
a slow SuperNode is still pushing that reply's arrays. The real path (a
SuperLink, a throttled device whose replies come late) runs in
test_heterogeneity_e2e.
"""

import threading
import time
from types import SimpleNamespace

from flotilla.strategy.grid import FleetGrid


def message(node: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))


class SlowPullGrid:
    def __init__(self, reply_after_s: dict[int, float], slow_pull_s: dict[int, float]) -> None:
        self.reply_after_s, self.slow_pull_s = reply_after_s, slow_pull_s
        self.sent: dict[str, tuple[int, float]] = {}  # message id -> (node, pushed at)
        self.lock = threading.Lock()

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.sent)}"
            self.sent[mid] = (m.metadata.dst_node_id, time.time())
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            with self.lock:
                node, pushed = self.sent.get(mid, (None, 0.0))
                if node is None or time.time() < pushed + self.reply_after_s[node]:
                    continue
                del self.sent[mid]
            time.sleep(self.slow_pull_s.get(node, 0.0))  # its arrays are still on their way
            out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node)))
        return out


def test_a_late_reply_that_is_slow_to_pull_does_not_hold_up_later_rounds():
    inner = SlowPullGrid(reply_after_s={1: 0.05, 2: 0.5}, slow_pull_s={2: 2.0})
    grid = FleetGrid(inner, poll_s=0.02)
    try:
        grid.deadline_s, grid.tag = 0.3, 1
        replies = grid.send_and_receive([message(1), message(2)])
        assert [r.metadata.src_node_id for r in replies] == [1]
        assert grid.abandoned == [2] and grid.busy_nodes() == {2}

        time.sleep(0.4)  # node 2's reply is in; pulling it takes 2 s
        for rnd in (2, 3):
            t0 = time.time()
            grid.tag = rnd
            replies = grid.send_and_receive([message(1)])
            late = grid.harvest()
            assert [r.metadata.src_node_id for r in replies] == [1]
            assert time.time() - t0 < 1.0, "a round waited for another round's late reply"
            assert late == [] and grid.busy_nodes() == {2}

        end = time.time() + 5
        while not (late := grid.harvest()) and time.time() < end:
            time.sleep(0.05)
        assert [(x.message.metadata.src_node_id, x.tag) for x in late] == [(2, 1)]
        assert grid.busy_nodes() == set()
    finally:
        grid.close()
    assert not grid._puller.is_alive()


def test_the_pull_pause_grows_with_the_replies_pending_and_is_short_for_the_last():
    from flotilla.strategy.grid import POLL_CAP_S, poll_pause

    assert poll_pause(0.1, 1) < 0.12  # the round's last reply is noticed at once
    assert poll_pause(0.1, 10) < poll_pause(0.1, 50) <= POLL_CAP_S
    assert poll_pause(0.1, 1000) == POLL_CAP_S
    assert poll_pause(2.0, 5) == 2.0  # never shorter than asked
