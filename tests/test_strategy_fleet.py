"""FleetFedAvg and FleetAuto (flotilla.strategy.fleet), hook by hook, the way Flower tests its strategies.

Each test calls configure_train / aggregate_train with real flwr Messages: the
messages a hook returns are answered by replies built as the built-in
ClientApp builds them (flotilla.app.client_app.train: arrays, a MetricRecord
with num-examples / samples / steps / train-s / ..., a `device` ConfigRecord),
and the replies go back into aggregate_train. The grid is FakeGrid (Flower's
Grid surface: push_messages / pull_messages / get_node_ids, in process), on
its own or wrapped in flotilla's FleetGrid where the strategy needs deadlines,
optional messages and late replies. A device "still working" is a message
FakeGrid holds until the test releases its reply. No processes, no network.

Expected numbers are computed by hand here (FedAvg's weighted mean, FedNova's
x - tau_eff * sum_i p_i (x - x_i) / tau_i, the planner's allocation), not by
calling the code under test. The pure helpers have their own tests
(test_hetero, test_heterogeneity_e2e, test_grid).
"""

from __future__ import annotations

import itertools
import json
import threading
import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from flotilla.strategy.fleet import FleetAuto, FleetFedAvg
from flotilla.strategy.grid import FleetGrid
from flotilla.strategy.planner import FIRST_ROUND_WORK_FACTOR, AutoPlanner

T0 = 1_000_000.0  # the ClientApp's `started` in every reply (the handler's own clock)


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps every Message with the running task's identity (set by flwr-serverapp in a real run)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def fleet_grid():
    """FleetGrid(FakeGrid) factory; closes each grid (and its late-reply puller) after the test."""
    made: list[FleetGrid] = []

    def make(fake: FakeGrid, **kw) -> FleetGrid:
        g = FleetGrid(fake, poll_s=0.01, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


# -- the fake grid and the replies -------------------------------------------------------------


class FakeGrid(Grid):
    """Flower's Grid surface over in-process devices.

    push_messages gives each message an id and asks `answer(msg)` for the device's reply: a Message,
    or None while the device is still working on it (`release` answers it later). `joins` maps a
    node to the time.time() it connects (default: connected from the start).
    """

    def __init__(self, nodes, answer=None, joins: dict[int, float] | None = None) -> None:
        self.nodes, self.answer, self.joins = list(nodes), answer or (lambda m: None), joins or {}
        self.sent: list[Message] = []
        self.held: dict[int, Message] = {}  # node -> the message it is still working on
        self.ready: dict[str, Message] = {}  # message id -> its reply, to be pulled
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def get_node_ids(self):
        now = time.time()
        return [n for n in self.nodes if self.joins.get(n, 0.0) <= now]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"msg-{next(self._ids)}"
            m.metadata.__dict__["_message_id"] = mid  # the SuperLink's job
            self.sent.append(m)
            reply = self.answer(m)
            with self.lock:
                if reply is None:
                    self.held[m.metadata.dst_node_id] = m
                else:
                    self.ready[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        with self.lock:
            return [self.ready.pop(mid) for mid in list(message_ids) if mid in self.ready]

    def release(self, node: int, make_reply) -> Message:
        """The device `node` finishes its held message: `make_reply(msg)` is its reply."""
        with self.lock:
            msg = self.held.pop(node)
            self.ready[msg.metadata.message_id] = make_reply(msg)
        return msg

    def send_and_receive(self, messages, *, timeout=None):  # as Flower's grids: every reply (or the timeout)
        pending, out = set(self.push_messages(list(messages))), []
        end = time.time() + (timeout if timeout is not None else 5.0)
        while pending and time.time() < end:
            got = self.pull_messages(pending)
            pending -= {m.metadata.reply_to_message_id for m in got}
            out += got
            time.sleep(0.01)
        return out

    def set_run(self, run):  # not used by the strategies
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError


def model(w, b=(0.0,)) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32)), "b": Array(np.asarray(b, dtype=np.float32))})


def np_of(record: ArrayRecord) -> list[np.ndarray]:
    return record.to_numpy_ndarrays()


def train_reply(msg: Message, arrays, *, n: int, steps: int, train_s: float, samples: int | None = None,
                batch: int | None = None, loss: float = 0.5, ahead_steps: int = 0, device: str | None = None,
                cls: str = "", limits: dict | None = None) -> Message:
    """A training reply as the built-in ClientApp builds it (flotilla.app.client_app.train)."""
    cfg = msg.content["config"]
    batch = batch or int(cfg.get("batch-size", 32))
    keys = list(msg.content["arrays"].keys())
    metrics = {
        "num-examples": n, "samples": steps * batch if samples is None else samples, "steps": steps,
        "train-s": float(train_s), "train-loss": float(loss), "batch-size": batch, "lr": float(cfg.get("lr", 0.0)),
        "ahead-steps": ahead_steps, "ahead-samples": ahead_steps * batch, "ahead-s": 0.0,
        "started": T0, "ended": T0 + train_s + 0.05,
        **({"cpus": 0.0, "memory": 0.0} | (limits or {})),  # as the ClientApp: every reply has both (0: no limit)
    }
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(a, dtype=np.float32))
                                                 for k, a in zip(keys, arrays)}),
                          "metrics": MetricRecord(metrics)})
    if device is not None:
        content["device"] = ConfigRecord({"device": device, "device-class": cls})
    return Message(content, reply_to=msg)


def moved(msg: Message, dw, db=(0.0,)) -> list[np.ndarray]:
    """The model the message carried, moved by (dw, db)."""
    w, b = np_of(msg.content["arrays"])
    return [w + np.asarray(dw, dtype=np.float32), b + np.asarray(db, dtype=np.float32)]


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=msg)


def by_node(messages) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in messages}


def rows(strategy, server_round: int, name: str) -> list[dict]:
    return [d for d in strategy.round_devices[server_round] if d["name"] == name]


def row(strategy, server_round: int, name: str, status: str | None = None) -> dict:
    found = [d for d in rows(strategy, server_round, name) if status is None or d["status"] == status]
    assert len(found) == 1, strategy.round_devices[server_round]
    return found[0]


def wait_for_late_reply(grid: FleetGrid, timeout_s: float = 5.0) -> None:
    """Until FleetGrid's background puller has collected a late reply (it does not hand it over)."""
    end = time.time() + timeout_s
    while time.time() < end:
        with grid._lock:
            if grid.late_replies:
                return
        time.sleep(0.005)
    raise AssertionError("no late reply collected")


def fednova_by_hand(g: list[np.ndarray], updates: list[tuple[list[np.ndarray], float, int]]) -> list[np.ndarray]:
    """FedNova (Wang et al. 2020): g - tau_eff * sum_i p_i (g - x_i) / tau_i,
    with p_i = w_i / sum w and tau_eff = sum p_i tau_i."""
    w = np.array([u[1] for u in updates], dtype=np.float64)
    tau = np.array([u[2] for u in updates], dtype=np.float64)
    p = w / w.sum()
    tau_eff = float((p * tau).sum())
    return [gk - tau_eff * sum(pi * (gk - x[k]) / ti for (x, _, _), pi, ti in zip(updates, p, tau))
            for k, gk in enumerate(g)]


# -- FleetFedAvg: Flower's FedAvg plus fleet records -----------------------------------------------


NAMES = {1: "big-1", 2: "big-2", 3: "pi-1"}
CLASSES = {"big-1": "big", "big-2": "big", "pi-1": "pi"}


def fedavg(**kw) -> FleetFedAvg:
    kw = {"expected_devices": 3, "fleet_wait_s": 5.0, "fraction_evaluate": 0.0, "min_available_nodes": 3} | kw
    s = FleetFedAvg(**kw)
    s.node_names, s.device_classes = dict(NAMES), dict(CLASSES)
    return s


def test_fedavg_configure_train_sends_flowers_messages_to_every_node_and_stamps_the_round():
    grid = FakeGrid([1, 2, 3])
    s = fedavg()
    g = model([1.0, 2.0], [3.0])
    t0 = time.time()
    msgs = list(s.configure_train(1, g, ConfigRecord({"seed": 7}), grid))
    t1 = time.time()
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3]
    for m in msgs:
        assert m.metadata.message_type == MessageType.TRAIN
        assert dict(m.content["config"]) == {"seed": 7, "server-round": 1}
        assert [a.tolist() for a in np_of(m.content["arrays"])] == [[1.0, 2.0], [3.0]]
    assert t0 <= s.round_started[1] <= t1
    assert s.round_info[1] == {"policy": "fedavg", "deadline_s": None}
    # what Flower's FedAvg sends for the same round: the same nodes, config and arrays
    plain = list(FedAvg(fraction_evaluate=0.0, min_available_nodes=3).configure_train(
        1, g, ConfigRecord({"seed": 7}), grid))
    assert sorted(m.metadata.dst_node_id for m in plain) == [1, 2, 3]
    assert dict(plain[0].content["config"]) == dict(msgs[0].content["config"])
    # every round is stamped, in order
    s.configure_train(2, g, ConfigRecord(), grid)
    assert t1 <= s.round_started[2] <= time.time() and sorted(s.round_started) == [1, 2]


def test_fedavg_round_1_waits_bounded_for_the_expected_fleet():
    # node 3 connects 0.3 s after the server starts: round 1 waits for it
    grid = FakeGrid([1, 2, 3], joins={3: time.time() + 0.3})
    s = fedavg(min_available_nodes=2, min_train_nodes=2)
    t0 = time.time()
    msgs = list(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    took = time.time() - t0
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3] and 0.25 <= took < 2.0
    # a fourth device never comes: round 1 gives up after fleet_wait_s and trains with those there
    s = fedavg(expected_devices=4, fleet_wait_s=0.3, min_available_nodes=2, min_train_nodes=2)
    t0 = time.time()
    msgs = list(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    took = time.time() - t0
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3] and 0.3 <= took < 2.0
    # only round 1 waits
    t0 = time.time()
    s.configure_train(2, model([0.0, 0.0]), ConfigRecord(), grid)
    assert time.time() - t0 < 0.2


def test_fedavg_aggregate_train_records_each_device_and_returns_flowers_fedavg_average():
    grid = FakeGrid([1, 2, 3])
    s = fedavg()
    msgs = by_node(s.configure_train(1, model([0.0, 0.0], [1.0]), ConfigRecord(), grid))
    # user-app style replies (no `device` record): named by node_names; node 3 failed
    replies = [
        train_reply(msgs[1], [[1.0, 2.0], [2.0]], n=100, steps=10, train_s=0.5, samples=320, loss=0.9),
        train_reply(msgs[2], [[4.0, -1.0], [5.0]], n=300, steps=30, train_s=2.0, samples=960, loss=0.3),
        error_reply(msgs[3], "ClientApp raised: CUDA out of memory"),
    ]
    arrays, metrics = s.aggregate_train(1, replies)

    # FedAvg's result, unchanged: the mean weighted by num-examples, computed by hand ...
    w, b = np_of(arrays)
    assert w == pytest.approx((100 * np.array([1.0, 2.0]) + 300 * np.array([4.0, -1.0])) / 400)
    assert b == pytest.approx([(100 * 2.0 + 300 * 5.0) / 400])
    assert metrics["train-loss"] == pytest.approx((100 * 0.9 + 300 * 0.3) / 400)
    # ... and Flower's FedAvg's for the same replies
    ref_arrays, ref_metrics = FedAvg(fraction_evaluate=0.0).aggregate_train(1, replies)
    assert all(np.array_equal(x, y) for x, y in zip(np_of(arrays), np_of(ref_arrays)))
    assert dict(metrics) == pytest.approx(dict(ref_metrics))

    big1, big2 = row(s, 1, "big-1"), row(s, 1, "big-2")
    assert (big1["node_id"], big1["status"], big1["train_s"], big1["samples"], big1["num_examples"],
            big1["steps"], big1["throughput_sps"]) == (1, "ok", 0.5, 320, 100, 10, 640.0)
    assert (big2["status"], big2["samples"], big2["throughput_sps"]) == ("ok", 960, 480.0)
    assert big1["planned_steps"] is None and big1["train_deadline_s"] is None  # no plan under FedAvg
    lost = row(s, 1, "pi-1")
    assert lost["status"] == "lost" and lost["node_id"] == 3 and lost["samples"] == 0
    assert lost["error"] == "ClientApp raised: CUDA out of memory" and lost["class"] == "pi"
    assert s.round_failures[1] == 1 and len(s.round_devices[1]) == 3


def test_fedavg_with_only_error_replies_returns_no_model_and_counts_every_failure():
    grid = FakeGrid([1, 2])
    s = fedavg(expected_devices=2, min_available_nodes=2)
    msgs = by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    replies = [error_reply(msgs[1], "x" * 500), error_reply(msgs[2], "killed")]
    assert s.aggregate_train(1, replies) == (None, None) == FedAvg().aggregate_train(1, replies)
    assert s.round_failures[1] == 2
    assert [d["status"] for d in s.round_devices[1]] == ["lost", "lost"]
    assert len(row(s, 1, "big-1")["error"]) == 300  # the reason, cut to 300 characters


def test_fedavg_on_a_fleet_grid_records_reply_times_and_the_devices_given_up_on(fleet_grid, tmp_path):
    lost_file = tmp_path / "lost.json"
    lost_file.write_text(json.dumps(["big-2"]))

    def answer(m):  # big-1 answers (with the built-in app's `device` record); big-2 is lost; pi-1 is slow
        if m.metadata.dst_node_id == 1:
            return train_reply(m, moved(m, [1.0, 1.0]), n=200, steps=7, train_s=0.7, samples=224,
                               device="big-1", cls="big")
        return None

    grid = fleet_grid(FakeGrid([1, 2, 3], answer), lost_file=lost_file)
    s = fedavg()
    grid.node_names.update(NAMES)
    msgs = list(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    assert len(msgs) == 3  # FedAvg sends to every node: the lost file is for the grid to give up on
    replies = list(grid.send_and_receive(msgs, timeout=0.2))  # the round's timeout passes for pi-1
    arrays, _ = s.aggregate_train(1, replies)
    assert np_of(arrays)[0] == pytest.approx([1.0, 1.0])
    ok = row(s, 1, "big-1")
    assert ok["status"] == "ok" and ok["class"] == "big" and ok["throughput_sps"] == 320.0
    assert 0 <= ok["reply_s"] < 0.2  # from the grid: push to arrival
    gone, late = row(s, 1, "big-2"), row(s, 1, "pi-1")
    assert (gone["status"], gone["class"], gone["node_id"]) == ("lost", "big", 2) and "error" not in gone
    assert (late["status"], late["class"], late["node_id"]) == ("late", "pi", 3)
    assert s.round_failures[1] == 0  # given up on, not failed


@pytest.mark.parametrize("policy", ["fedavg", "auto"])
def test_replies_from_devices_with_and_without_a_memory_limit_aggregate(policy, fleet_grid):
    grid = fleet_grid(FakeGrid([1, 2]))
    if policy == "fedavg":
        s = fedavg(expected_devices=2, min_available_nodes=2)
    else:
        s = auto_strategy(expected_devices=2, min_available_nodes=2)
    msgs = by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    # a job whose classes give `memory:` to one and not the other (job.py: cpus or memory, or both)
    replies = [train_reply(msgs[1], moved(msgs[1], [1.0, 0.0]), n=100, steps=10, train_s=1.0,
                           limits={"cpus": 1.0, "memory": 2.0**30}),
               train_reply(msgs[2], moved(msgs[2], [0.0, 1.0]), n=100, steps=10, train_s=1.0,
                           limits={"cpus": 0.5})]
    arrays, _ = s.aggregate_train(1, replies)
    assert np_of(arrays)[0] == pytest.approx([0.5, 0.5])


# -- FleetAuto: per-device work, deadlines, FedNova, stale updates ----------------------------------------


def auto_strategy(planner: AutoPlanner | None = None, names: dict[int, str] | None = None, **kw) -> FleetAuto:
    planner = planner or AutoPlanner(batch_size=32, lr=0.1, local_epochs=1, deadline_factor=1.5)
    names = NAMES if names is None else names
    kw = {"expected_devices": len(names), "fleet_wait_s": 5.0, "fraction_evaluate": 0.0,
          "min_available_nodes": 2} | kw
    s = FleetAuto(planner=planner, **kw)
    s.node_names = dict(names)
    s.device_classes = dict(CLASSES)
    return s


def capabilities_fleet(local_epochs: float = 1.5) -> AutoPlanner:
    """The capability query's view: two 1-CPU devices and a 1/4-CPU one with little memory."""
    p = AutoPlanner(batch_size=32, lr=0.1, local_epochs=local_epochs, deadline_factor=1.5,
                    base_bytes=0, bytes_per_sample=1000)  # 1000 B a sample: 20 kB fits 18 -> batch 16
    p.add_capability("big-1", "big", cpus=1.0)
    p.add_capability("big-2", "big", cpus=1.0)
    p.add_capability("pi-1", "pi", cpus=0.25, memory=20_000)
    return p


def test_auto_round_1_gives_every_device_twice_its_epochs_and_does_not_wait_for_the_slow_one(fleet_grid):
    fake = FakeGrid([1, 2, 3], lambda m: None if m.metadata.dst_node_id == 3 else
                    train_reply(m, moved(m, [0.1, 0.1]), n=320, steps=30, train_s=1.0))
    grid = fleet_grid(fake)
    s = auto_strategy(capabilities_fleet(local_epochs=1.5), proximal_mu=0.01, train_ahead=False)
    msgs = by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord({"seed": 5}), grid))
    assert sorted(msgs) == [1, 2, 3]  # one message per node, each with its own config
    for node, m in msgs.items():
        cfg = dict(m.content["config"])
        assert m.metadata.message_type == MessageType.TRAIN
        assert cfg["local-epochs"] == FIRST_ROUND_WORK_FACTOR * 1.5 == 3.0
        assert "local-steps" not in cfg and "deadline-s" not in cfg  # nothing measured: the job's plain work
        assert (cfg["server-round"], cfg["seed"], cfg["proximal-mu"], cfg["train-ahead"]) == (1, 5, 0.01, 0)
        # a memory-safe batch, and the learning rate scaled with it (linearly, down)
        assert (cfg["batch-size"], cfg["lr"]) == ((16, pytest.approx(0.05)) if node == 3 else (32, 0.1))
    # pi-1's quota is under half the top one: sent as optional, the round does not wait for it
    assert grid.optional == {3} and grid.deadline_s is None and grid.tag == 1
    assert s.round_info[1] == {"policy": "auto", "deadline_s": None, "planned_round_s": None}
    t0 = time.time()
    replies = list(grid.send_and_receive(msgs.values()))
    assert time.time() - t0 < 1.0 and sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert grid.busy_nodes() == {3}  # still working on it
    s.aggregate_train(1, replies)
    assert [d["status"] for d in rows(s, 1, "pi-1")] == ["async"]
    assert row(s, 1, "pi-1")["batch_size"] == 16
    assert grid.optional == set() and grid.deadline_s is None  # reset after the round: evaluation waits for all


def test_auto_round_1_replies_are_averaged_with_fednova_and_measure_the_devices(fleet_grid):
    # 2 epochs each, 0.01 a step; big-2 holds three times big-1's data, so it did three times the steps;
    # pi-1 (sent as optional) is still working
    work = {1: {"dw": [0.2, 0.0], "db": [0.0], "n": 320, "steps": 20, "train_s": 0.64, "loss": 0.8, "device": "big-1"},
            2: {"dw": [0.0, 0.6], "db": [0.6], "n": 960, "steps": 60, "train_s": 3.2, "loss": 0.4, "device": "big-2"}}

    def answer(m):
        w = work.get(m.metadata.dst_node_id)
        if w is None or m.content["config"]["server-round"] != 1:
            return None
        w = dict(w)
        return train_reply(m, moved(m, w.pop("dw"), w.pop("db")), cls="big", **w)

    grid = fleet_grid(FakeGrid([1, 2, 3], answer))
    s = auto_strategy(capabilities_fleet(local_epochs=1.0))
    g = [np.zeros(2), np.zeros(1)]
    msgs = by_node(s.configure_train(1, model(*g), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs.values()))
    arrays, metrics = s.aggregate_train(1, replies)
    w, b = np_of(arrays)
    # FedNova: p = (1/4, 3/4), tau_eff = 50, each pulls per step by its data share: 0.25 x 50 x 0.01 = 0.125
    assert w == pytest.approx([0.125, 0.375]) and b == pytest.approx([0.375])
    assert w == pytest.approx(fednova_by_hand(g, [(moved(msgs[1], [0.2, 0]), 320, 20),
                                                  (moved(msgs[2], [0, 0.6], [0.6]), 960, 60)])[0])
    assert metrics["train-loss"] == pytest.approx(0.25 * 0.8 + 0.75 * 0.4)
    assert all(row(s, 1, n)["aggregated"] for n in ("big-1", "big-2"))
    # the replies measured the devices: throughput = samples / train-s, partition = num-examples
    e1, e2 = s.planner.devices["big-1"], s.planner.devices["big-2"]
    assert (e1.throughput_sps, e1.samples, e1.measured_rounds) == (pytest.approx(1000.0), 320, 1)
    assert (e2.throughput_sps, e2.samples) == (pytest.approx(600.0), 960)
    assert row(s, 1, "big-1")["est_throughput_sps"] == 1000.0 and row(s, 1, "big-2")["est_throughput_sps"] == 600.0
    assert row(s, 1, "pi-1", "async")["est_throughput_sps"] is None  # not measured yet
    # round 2 is planned from them: steps instead of epochs; pi-1, still busy, is not sent a message
    msgs2 = by_node(s.configure_train(2, arrays, ConfigRecord(), grid))
    assert sorted(msgs2) == [1, 2] and all("local-steps" in m.content["config"] for m in msgs2.values())
    assert grid.deadline_s is not None and grid.deadline_s > 0
    s.aggregate_train(2, grid.send_and_receive(msgs2.values(), timeout=0.05))
    assert [d["status"] for d in rows(s, 2, "pi-1")] == ["busy"]


def measured_fleet() -> AutoPlanner:
    """Measured: big-1 1000 samples/s, big-2 600, each 0.5 s of fixed cost; pi-1 100 samples/s after 20 s."""
    p = AutoPlanner(batch_size=32, lr=0.1, local_epochs=1, deadline_factor=1.5)
    for name, sps, overhead, n in (("big-1", 1000, 0.5, 2400), ("big-2", 600, 0.5, 2400), ("pi-1", 100, 20.0, 1600)):
        p.observe(name, samples=sps, train_s=1.0, partition_size=n, reply_s=1.0 + overhead)
    return p


def test_auto_plans_each_devices_steps_and_the_deadline_from_the_measurements(fleet_grid):
    grid = fleet_grid(FakeGrid([1, 2, 3]))
    s = auto_strategy(measured_fleet())
    msgs = by_node(s.configure_train(2, model([0.0, 0.0]), ConfigRecord(), grid))
    cfg = {n: dict(m.content["config"]) for n, m in msgs.items()}
    # by hand: the two quick devices share the fleet's 6400 samples (1 local epoch) so both finish at
    # D = 0.5 + 6400 / (1000 + 600) = 4.5 s: 4000 and 2400 samples, 125 and 75 steps of 32
    assert (cfg[1]["local-steps"], cfg[2]["local-steps"]) == (125, 75)
    # deadline = 1.5 x median planned time (4.5 s); each trainer stops 1.25 x its overhead + 0.2 s before it
    assert grid.deadline_s == pytest.approx(6.75, abs=1e-3)
    assert cfg[1]["deadline-s"] == cfg[2]["deadline-s"] == pytest.approx(6.75 - 1.25 * 0.5 - 0.2, abs=1e-3)
    assert s.round_info[2]["deadline_s"] == pytest.approx(6.75, abs=1e-3)
    assert s.round_info[2]["planned_round_s"] == pytest.approx(4.5, abs=1e-3)
    # pi-1's 20 s overhead alone outlasts the round: not waited for; as many steps as a typical device
    # (100) but few enough to arrive fresh: (5 - 1) x 6.75 - 20 = 7 s of training at 100/s -> 21 steps
    assert grid.optional == {3}
    assert cfg[3]["local-steps"] == 21 and cfg[3]["deadline-s"] == pytest.approx(1.5 * 21 * 32 / 100 + 1.0)
    for c in cfg.values():
        assert (c["batch-size"], c["lr"], c["server-round"]) == (32, 0.1, 2) and "local-epochs" not in c


def test_auto_records_partial_work_planned_steps_deadlines_and_estimates(fleet_grid):
    grid = fleet_grid(FakeGrid([1, 2, 3]))
    s = auto_strategy(measured_fleet())
    g = [np.zeros(2), np.zeros(1)]
    msgs = by_node(s.configure_train(2, model(*g), ConfigRecord(), grid))
    # big-1 did its 125 steps; big-2 stopped at its deadline after 60 of 75 (0.01 a step, each its own way)
    replies = [train_reply(msgs[1], moved(msgs[1], [1.25, 0.0]), n=2400, steps=125, train_s=4.0),
               train_reply(msgs[2], moved(msgs[2], [0.0, 0.6]), n=2400, steps=60, train_s=3.2)]
    arrays, _ = s.aggregate_train(2, replies)
    big1, big2, pi = row(s, 2, "big-1"), row(s, 2, "big-2"), row(s, 2, "pi-1")
    assert (big1["status"], big1["planned_steps"], big1["steps"], big1["aggregated"]) == ("ok", 125, 125, True)
    assert (big2["status"], big2["planned_steps"], big2["steps"], big2["aggregated"]) == ("partial", 75, 60, True)
    assert big1["train_deadline_s"] == big2["train_deadline_s"] == pytest.approx(5.925, abs=1e-3)
    assert (pi["status"], pi["planned_steps"]) == ("async", 21)
    assert pi["train_deadline_s"] == pytest.approx(11.08, abs=1e-3)
    assert (big1["est_throughput_sps"], big2["est_throughput_sps"], pi["est_throughput_sps"]) == (1000.0, 600.0, 100.0)
    assert all("est_overhead_s" in d for d in s.round_devices[2])
    # FedNova: tau_eff = (125 + 60) / 2, each device's per-step change (0.01) counts equally
    assert np_of(arrays)[0] == pytest.approx([92.5 * 0.5 * 0.01] * 2)
    assert s.round_info[2]["left_out"] == 0


@pytest.mark.parametrize("steps, ahead", [(20, 0), (10, 10)], ids=["20-steps", "10-steps-and-10-trained-ahead"])
def test_fednova_an_update_of_twice_the_steps_does_not_pull_the_model_twice_as_far(steps, ahead, fleet_grid):
    grid = fleet_grid(FakeGrid([1, 2]))
    s = auto_strategy(names={1: "a", 2: "b"})
    msgs = by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    # both moved 0.1 a step, a along x for 20 steps, b along y for 10; equal data
    replies = [train_reply(msgs[1], moved(msgs[1], [2.0, 0.0]), n=320, steps=steps, ahead_steps=ahead, train_s=1.0),
               train_reply(msgs[2], moved(msgs[2], [0.0, 1.0]), n=320, steps=10, train_s=0.5)]
    arrays, _ = s.aggregate_train(1, replies)
    fedavg_w = np_of(FedAvg().aggregate_train(1, replies)[0])[0]
    assert fedavg_w == pytest.approx([1.0, 0.5])  # FedAvg: pulled twice as far toward a
    assert np_of(arrays)[0] == pytest.approx([0.75, 0.75])  # FedNova: tau_eff (15) x the mean per-step change
    assert row(s, 1, "a")["steps"] == steps and row(s, 1, "a")["aggregated"]


def test_auto_leaves_out_updates_of_few_steps(fleet_grid):
    grid = fleet_grid(FakeGrid([1, 2, 3]))
    s = auto_strategy(names={1: "a", 2: "b", 3: "c"})
    msgs = by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    # 1 local epoch of 320 samples is 10 steps of 32: c's 2 steps are under a quarter of that; b's 3 are not
    replies = [train_reply(msgs[1], moved(msgs[1], [4.0, 0.0]), n=320, steps=40, train_s=1.0),
               train_reply(msgs[2], moved(msgs[2], [0.0, 0.3]), n=320, steps=3, train_s=0.1),
               train_reply(msgs[3], moved(msgs[3], [0.0, -5.0]), n=320, steps=2, train_s=0.1)]
    arrays, _ = s.aggregate_train(1, replies)
    assert [row(s, 1, n)["aggregated"] for n in "abc"] == [True, True, False]
    assert s.round_info[1]["left_out"] == 1
    g = [np.zeros(2), np.zeros(1)]
    expected = fednova_by_hand(g, [(moved(msgs[1], [4.0, 0.0]), 320, 40), (moved(msgs[2], [0.0, 0.3]), 320, 3)])
    assert np_of(arrays)[0] == pytest.approx(expected[0])  # c's -5 is not in it


QUICK = {1: "quick-1", 2: "quick-2"}


def quick_fleet(n: int = 320) -> AutoPlanner:
    """Two measured devices, 3200 samples/s after 0.05 s: with 320 samples each, a round of 10 steps
    (0.15 s) and a deadline of 1.5 x 0.15 = 0.225 s (the floor lowered to 0.1 s for a fast test)."""
    p = AutoPlanner(batch_size=32, lr=0.1, local_epochs=1, deadline_factor=1.5, min_deadline_s=0.1)
    for name in QUICK.values():
        p.observe(name, samples=3200, train_s=1.0, partition_size=n, reply_s=1.05)
    return p


def late_round_1(s: FleetAuto, fleet: FleetGrid, fake: FakeGrid, g: list[np.ndarray]):
    """Round 1: quick-1 answers, quick-2 misses the planned deadline. Returns the new model."""
    msgs = by_node(s.configure_train(1, model(*g), ConfigRecord(), fleet))
    assert fleet.deadline_s == pytest.approx(0.225, abs=1e-3) and fleet.optional == set()
    t0 = time.time()
    replies = list(fleet.send_and_receive(msgs.values()))
    took = time.time() - t0
    assert 0.2 <= took < 1.5 and [r.metadata.src_node_id for r in replies] == [1]  # stopped at the deadline
    assert fleet.abandoned == [2] and fleet.busy_nodes() == {2}
    arrays, _ = s.aggregate_train(1, replies)
    late = row(s, 1, "quick-2")
    assert (late["status"], late["planned_steps"], late["train_deadline_s"]) == ("late", 10, 0.01)
    return arrays


def quick_answer(step, n: int = 320):
    """quick-1 answers at once, its planned steps moving the model by step(round); quick-2 holds its messages."""
    def answer(m):
        if m.metadata.dst_node_id != 1:
            return None
        steps = m.content["config"]["local-steps"]
        return train_reply(m, moved(m, step(m.content["config"]["server-round"])), n=n, steps=steps,
                           train_s=steps * 32 / 3200)
    return answer


def test_auto_stops_at_the_deadline_and_applies_the_late_reply_as_stale_in_the_round_it_arrives(fleet_grid):
    fake = FakeGrid([1, 2], quick_answer(lambda r: [0.3, 0.0]))
    grid = fleet_grid(fake)
    s = auto_strategy(quick_fleet(), names=QUICK)
    grid.node_names.update(QUICK)
    g1 = [np.zeros(2), np.zeros(1)]
    g2 = late_round_1(s, grid, fake, g1)
    assert np_of(g2)[0] == pytest.approx([0.3, 0.0])  # quick-1's update alone

    # round 2: quick-2 is busy (still on round 1): it is not sent a message
    msgs2 = by_node(s.configure_train(2, g2, ConfigRecord(), grid))
    assert sorted(msgs2) == [1]
    replies = list(grid.send_and_receive(msgs2.values()))
    # quick-2's round-1 reply arrives now: 10 steps from round 1's model, along y
    fake.release(2, lambda m: train_reply(m, moved(m, [0.0, 0.6]), n=320, steps=10, train_s=0.1))
    wait_for_late_reply(grid)
    arrays, _ = s.aggregate_train(2, replies)

    assert row(s, 2, "quick-1")["status"] == "ok" and row(s, 2, "quick-2", "busy")
    stale = row(s, 2, "quick-2", "stale")
    assert (stale["sent_round"], stale["staleness"], stale["aggregated"], stale["steps"]) == (1, 1, True, 10)
    assert stale["reply_s"] >= 0.2  # pushed in round 1, arrived after its deadline
    # its change (+0.6 along y, from round 1's model) moved onto the current model, weighed 1 / (1 + 1):
    # fresh (+0.3, 0) at weight 320, stale (0, +0.6) at 160, equal steps
    w = np_of(arrays)[0]
    assert w == pytest.approx([0.3 + 320 * 0.3 / 480, 160 * 0.6 / 480])  # (0.5, 0.2)
    assert w != pytest.approx([0.3 + 0.15, 0.3])  # not as if it were fresh
    assert s.planner.devices["quick-2"].measured_rounds == 2  # its timings refreshed the estimate
    # free again: round 3 sends to both
    assert grid.busy_nodes() == set()
    assert sorted(by_node(s.configure_train(3, arrays, ConfigRecord(), grid))) == [1, 2]


def test_auto_drops_a_late_update_older_than_max_staleness(fleet_grid):
    fake = FakeGrid([1, 2], quick_answer(lambda r: [0.1 * r, 0.0]))
    grid = fleet_grid(fake)
    s = auto_strategy(quick_fleet(), names=QUICK, max_staleness=1)
    arrays = late_round_1(s, grid, fake, [np.zeros(2), np.zeros(1)])
    for r in (2, 3):
        msgs = by_node(s.configure_train(r, arrays, ConfigRecord(), grid))
        assert sorted(msgs) == [1]  # quick-2 still busy
        replies = list(grid.send_and_receive(msgs.values()))
        if r == 3:
            assert 1 not in s._globals  # the model sent in round 1 is too old to keep
            fake.release(2, lambda m: train_reply(m, moved(m, [0.0, 9.0]), n=320, steps=10, train_s=0.1))
            wait_for_late_reply(grid)
        before = np_of(arrays)[0]
        arrays, _ = s.aggregate_train(r, replies)
    stale = row(s, 3, "quick-2", "stale")
    assert (stale["staleness"], stale["aggregated"]) == (2, False)  # recorded, not applied
    assert np_of(arrays)[0] == pytest.approx(before + [0.3, 0.0])  # quick-1's fresh update only


def test_auto_damps_a_round_of_only_stale_updates_and_records_an_error_reply_as_lost(fleet_grid):
    fake = FakeGrid([1, 2], lambda m: (error_reply(m, "trainer died") if m.content["config"]["server-round"] == 2
                                       else quick_answer(lambda r: [0.3, 0.0])(m)))
    grid = fleet_grid(fake)
    s = auto_strategy(quick_fleet(), names=QUICK)
    g1 = [np.zeros(2), np.zeros(1)]
    g2 = late_round_1(s, grid, fake, g1)
    msgs2 = by_node(s.configure_train(2, g2, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs2.values()))
    fake.release(2, lambda m: train_reply(m, moved(m, [0.0, 0.6]), n=320, steps=10, train_s=0.1))
    wait_for_late_reply(grid)
    arrays, metrics = s.aggregate_train(2, replies)
    lost = row(s, 2, "quick-1")
    assert (lost["status"], lost["error"]) == ("lost", "trainer died") and s.round_failures[2] == 1
    assert row(s, 2, "quick-2", "stale")["aggregated"]
    # only a stale update: its change (0, +0.6), damped by its discount 1 / (1 + 1): never as far as a fresh one
    assert np_of(arrays)[0] == pytest.approx(np_of(g2)[0] + [0.0, 0.3])
    assert metrics is None  # no fresh replies to aggregate metrics from


def test_auto_with_every_device_busy_waits_bounded_for_a_late_reply_to_free_one(fleet_grid):
    fake = FakeGrid([1, 2])  # nobody answers in time
    grid = fleet_grid(fake)
    s = auto_strategy(quick_fleet(), names=QUICK, fleet_wait_s=3.0)
    g = model([0.0, 0.0])
    msgs1 = list(s.configure_train(1, g, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs1))
    assert replies == [] and grid.busy_nodes() == {1, 2}
    assert s.aggregate_train(1, replies) == (None, None)
    assert sorted(d["status"] for d in s.round_devices[1]) == ["late", "late"]
    # round 2: both busy; quick-2's reply comes 0.3 s in, and frees it
    timer = threading.Timer(0.3, fake.release,
                            (2, lambda m: train_reply(m, moved(m, [0.0, 1.0]), n=320, steps=10, train_s=0.1)))
    t0 = time.time()
    timer.start()
    msgs2 = by_node(s.configure_train(2, g, ConfigRecord(), grid))
    took = time.time() - t0
    timer.join()
    assert sorted(msgs2) == [2] and 0.25 <= took < 2.0
    s.aggregate_train(2, grid.send_and_receive(msgs2.values(), timeout=0.05))
    assert row(s, 2, "quick-1")["status"] == "busy"
    assert row(s, 2, "quick-2", "stale")["aggregated"]  # the reply that freed it, applied
    # bounded: when no reply comes, the round starts after fleet_wait_s with nobody to train
    grid2 = fleet_grid(FakeGrid([1, 2]))
    s2 = auto_strategy(quick_fleet(), names=QUICK, fleet_wait_s=0.3)
    s2.aggregate_train(1, grid2.send_and_receive(list(s2.configure_train(1, g, ConfigRecord(), grid2))))
    t0 = time.time()
    msgs2 = list(s2.configure_train(2, g, ConfigRecord(), grid2))
    assert msgs2 == [] and 0.3 <= time.time() - t0 < 1.5
    assert s2.aggregate_train(2, grid2.send_and_receive(msgs2)) == (None, None)
    assert sorted(d["status"] for d in s2.round_devices[2]) == ["busy", "busy"]


@pytest.mark.parametrize("released", [True, False], ids=["its-reply-comes", "it-stays-busy"])
def test_auto_without_train_ahead_waits_half_a_round_for_a_quick_busy_device(released, fleet_grid):
    fake = FakeGrid([1, 2], quick_answer(lambda r: [0.1, 0.0], n=6400))
    grid = fleet_grid(fake)
    # 6400 samples each: a planned round of 0.05 + 12800 / 6400 = 2.05 s, 200 steps each
    s = auto_strategy(quick_fleet(n=6400), names=QUICK, train_ahead=False)
    g = model([0.0, 0.0])
    msgs1 = list(s.configure_train(1, g, ConfigRecord(), grid))
    s.aggregate_train(1, grid.send_and_receive(msgs1, timeout=0.05))  # quick-2 misses round 1 (the round's timeout)
    assert grid.busy_nodes() == {2}
    timer = threading.Timer(0.15, fake.release,
                            (2, lambda m: train_reply(m, moved(m, [0.0, 0.1]), n=6400, steps=200, train_s=2.0)))
    if released:
        timer.start()
    t0 = time.time()
    msgs2 = by_node(s.configure_train(2, g, ConfigRecord(), grid))
    took = time.time() - t0
    if released:
        timer.join()
        # the round waited for it (it would be waited for anyway) and plans with it
        assert sorted(msgs2) == [1, 2] and 0.1 <= took < 0.9
        assert msgs2[1].content["config"]["local-steps"] == msgs2[2].content["config"]["local-steps"] == 200
    else:
        # at most half the planned round (1.025 s), then the round starts without it
        assert sorted(msgs2) == [1] and 1.0 <= took < 2.0
        # planned alone: a local epoch of its own data
        assert msgs2[1].content["config"]["local-steps"] == 200
    s.aggregate_train(2, grid.send_and_receive(msgs2.values(), timeout=0.05))
    if released:  # its round-1 reply, applied; its round-2 message missed this exchange's timeout
        assert row(s, 2, "quick-2", "stale")["aggregated"] and row(s, 2, "quick-2", "late")
    else:
        assert [d["status"] for d in rows(s, 2, "quick-2")] == ["busy"]


def test_auto_sends_no_work_to_devices_reported_lost(fleet_grid, tmp_path):
    lost_file = tmp_path / "lost.json"
    lost_file.write_text(json.dumps(["big-2"]))
    grid = fleet_grid(FakeGrid([1, 2, 3]), lost_file=lost_file)
    grid.node_names.update(NAMES)
    s = auto_strategy(capabilities_fleet())
    assert sorted(by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))) == [1, 3]


def test_auto_plans_a_device_by_its_measurements_when_only_its_replies_name_it(fleet_grid):
    grid = fleet_grid(FakeGrid([1, 2, 3]))
    s = auto_strategy(names={1: "big-1", 2: "big-2"})  # pi-1 joined after the capability query
    msgs = by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid))
    # 2 epochs of 320 samples each; pi-1 trains at a tenth of the others' speed
    replies = [train_reply(msgs[n], moved(msgs[n], [0.1, 0.0]), n=320, steps=20, train_s=t, device=name)
               for n, name, t in ((1, "big-1", 0.64), (2, "big-2", 0.64), (3, "pi-1", 6.4))]
    s.aggregate_train(1, replies)
    assert row(s, 1, "pi-1")["est_throughput_sps"] == 100.0  # measured, under the name it reports
    msgs2 = by_node(s.configure_train(2, model([0.0, 0.0]), ConfigRecord(), grid))
    steps = {n: m.content["config"]["local-steps"] for n, m in msgs2.items()}
    # planned from 100 samples/s, pi-1 gets fewer steps than the 1000/s devices, or is not waited for
    assert steps[3] < steps[1] or 3 in grid.optional, (steps, grid.optional)


def test_auto_waits_for_a_device_as_quick_as_the_others_whatever_its_partition_size(fleet_grid):
    p = AutoPlanner(batch_size=32, lr=0.1, local_epochs=1, deadline_factor=1.5, min_deadline_s=0.1)
    # equally quick; quick-2 holds 10x the data and its fixed cost is 10 ms more (0.06 s, in a ~0.75 s round)
    p.observe("quick-1", samples=3200, train_s=1.0, partition_size=320, reply_s=1.05)
    p.observe("quick-2", samples=3200, train_s=1.0, partition_size=3200, reply_s=1.06)
    grid = fleet_grid(FakeGrid([1, 2]))
    s = auto_strategy(p, names=QUICK)
    s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), grid)
    assert grid.optional == set()


def test_a_lone_device_is_planned_exactly_one_local_epoch_of_steps(fleet_grid):
    # 3200 samples/s after 0.05 s, 6400 samples of 32: one local epoch is 200 steps
    s = auto_strategy(quick_fleet(n=6400), names={1: "quick-1"}, min_available_nodes=1, min_train_nodes=1)
    msgs = by_node(s.configure_train(1, model([0.0, 0.0]), ConfigRecord(), fleet_grid(FakeGrid([1]))))
    assert msgs[1].content["config"]["local-steps"] == 200
