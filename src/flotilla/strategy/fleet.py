"""Flotilla's strategies: Flower's FedAvg plus fleet records, and the `auto` policy.

FleetFedAvg (policies none and manual) is Flower's FedAvg, unchanged in what
it sends and how it averages; it only adds to the hooks:
- configure_train waits (bounded) for the whole fleet before round 1 and
  stamps the round's start;
- aggregate_train records, per device, its training time, samples, steps,
  throughput and status, and counts failures and devices given up on.

FleetAuto (policy auto) sizes each device's work from measurements:
- AutoPlanner keeps per-device estimates (throughput, fixed per-round
  overhead such as starting a ClientApp, partition size, limits) and plans
  each round: a memory-safe batch and the learning rate scaled to it; the
  devices to wait for (those that do not hold the round up); local steps so
  that these do `local_epochs` of the fleet's data in the shortest round
  their throughputs allow, with every device busy until about the same time
  and no device given over twice the steps of another; and a deadline of
  deadline_factor x the median planned device time. Round 1 (nothing
  measured) is the job's plain work, and measures everyone.
- configure_train sends each device its own config (one message per node);
  the trainer stops at its deadline-s and reports the steps it did.
- FleetGrid stops waiting at the deadline. A device that missed it, or one
  planned not to be waited for, is `busy` until its reply arrives; the reply
  is then applied as a stale update (its change moved onto the current model,
  weighed down by staleness) and its timings refresh the estimates.
- aggregate_train averages with FedNova weights (hetero.fednova_aggregate):
  each update counts per local step, so devices that did more steps do not
  pull the model their way. Updates of few steps (under 1/4 of the round's
  most, or of their own local_epochs) are left out: FedNova scales them up,
  and scaled-up noise costs more accuracy than their few steps bring.
The math lives in flotilla.strategy.planner, .aggregate and .hetero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flotilla.strategy.aggregate import Update, aggregate_updates, reply_status, update_steps
from flotilla.strategy.planner import MAX_STALENESS, Assignment, AutoPlanner, RoundPlan
from flotilla.strategy.records import device_record, missing_record

# -- strategies ---------------------------------------------------------------


class FleetFedAvg(FedAvg):
    round_offset = 0  # rounds done before this start: a resumed run goes on from its checkpoint's round

    def __init__(self, *, expected_devices: int, fleet_wait_s: float = 60.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.expected_devices = expected_devices
        self.fleet_wait_s = fleet_wait_s
        self.round_started: dict[int, float] = {}
        self.round_devices: dict[int, list[dict]] = {}
        self.round_failures: dict[int, int] = {}
        self.round_info: dict[int, dict] = {}
        self.node_names: dict[int, str] = {}
        self.device_classes: dict[str, str] = {}  # device name -> class (from the capability query)
        self._grid = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None):
        """Flower's Strategy.start. Resumed (round_offset r > 0): num_rounds is still the run's total; the
        rounds go on from r + 1 (every hook and evaluate_fn sees the run's own round numbers) and the
        initial evaluation is not repeated."""
        off = self.round_offset
        if not off:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                 evaluate_fn)
        hooks = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
        for h in hooks:
            setattr(self, h, _shifted(getattr(self, h), off))
        shifted_eval = None if evaluate_fn is None else (
            lambda r, arrays: None if r == 0 else evaluate_fn(r + off, arrays))
        try:
            return super().start(grid, initial_arrays, max(0, num_rounds - off), timeout, train_config,
                                 evaluate_config, shifted_eval)
        finally:
            for h in hooks:
                self.__dict__.pop(h, None)

    def state_dict(self) -> dict:
        """What a checkpoint keeps to resume this strategy: the sampling RNG (and FleetAuto its planner)."""
        import random

        version, internal, gauss = random.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        import random

        if state.get("rng"):
            version, internal, gauss = state["rng"]
            random.setstate((version, tuple(internal), gauss))

    def _start_round(self, server_round: int, grid: Grid) -> None:
        if server_round == self.round_offset + 1:
            wait_for_fleet(grid, self.expected_devices, self.fleet_wait_s)
        self._grid = grid
        self.round_started[server_round] = time.time()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start_round(server_round, grid)
        self.round_info[server_round] = {"policy": "fedavg", "deadline_s": None}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record_round(server_round, replies, {})
        return super().aggregate_train(server_round, replies)

    def _name(self, node_id: int) -> str:
        return self.node_names.get(node_id, f"node-{node_id}")

    def _record_round(self, server_round: int, replies: list[Message], plan: dict[str, Assignment]) -> list[dict]:
        """Per-device records of this round: replies (ok|partial), errors and devices given up on."""
        grid = self._grid
        pushed = getattr(grid, "pushed_at", None)
        arrived = getattr(grid, "arrived", {})
        devices, failures = [], 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # (Flower's own NODE_UNAVAILABLE comes from the SuperLink's node: name the device)
                node = getattr(grid, "sent_to", {}).get(msg.metadata.reply_to_message_id, node)
                failures += 1
                devices.append(self._missing(node, "lost", plan, error=str(msg.error.reason)[:300]))
                continue
            rec = device_record(msg, self.node_names)
            if node not in self.node_names and not rec["name"].startswith("node-"):
                self.node_names[node] = rec["name"]  # a device the capability query missed names itself
            a = plan.get(rec["name"])
            rec["planned_steps"] = a.steps if a else None
            rec["train_deadline_s"] = a.train_deadline_s if a else None
            rec["status"] = reply_status(rec["steps"], a.steps if a else None)
            if pushed is not None and node in arrived:
                rec["reply_s"] = round(arrived[node] - pushed, 4)
            devices.append(rec)
        for node in getattr(grid, "abandoned", []):
            why = getattr(grid, "abandon_reasons", {}).get(node, "deadline")
            devices.append(self._missing(node, "late" if why == "deadline" else "lost", plan))
        self.round_devices[server_round] = devices
        self.round_failures[server_round] = failures
        return devices

    def _missing(self, node: int, status: str, plan: dict[str, Assignment], error: str | None = None) -> dict:
        name = self._name(node)
        rec = missing_record(name, node, status, plan.get(name), error)
        rec["class"] = self.device_classes.get(name, "")
        return rec


class FleetAuto(FleetFedAvg):
    """Policy auto: per-device work sized by measured throughput, a round deadline, FedNova averaging.

    Replies that come after their round (a device that missed the deadline, or
    one planned asynchronous because its overhead alone fills a round) are
    applied in the round they arrive, as stale updates: their change is taken
    relative to the model they trained from and weighed down by 1/(1 + staleness).
    """

    def __init__(self, *, planner: AutoPlanner, proximal_mu: float = 0.0, max_staleness: int = MAX_STALENESS,
                 train_ahead: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.planner = planner
        self.proximal_mu = proximal_mu
        self.train_ahead = train_ahead
        self.max_staleness = max_staleness
        self._globals: dict[int, ArrayRecord] = {}  # round -> the model sent that round (for stale updates)
        self._plan: RoundPlan | None = None
        self._busy: list[int] = []
        self._async: list[int] = []
        self._sent: dict[int, Assignment] = {}  # node -> the work last sent to it
        self._late: list = []  # late replies not yet aggregated

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start_round(server_round, grid)
        self._late += getattr(grid, "harvest", list)()
        node_ids, configs = self._candidates(server_round, arrays, config, grid)
        lost = getattr(grid, "lost_devices", set)()
        node_ids = [n for n in node_ids if self._name(n) not in lost]
        busy = self._wait_for_a_free_device(grid, node_ids)
        if not self.train_ahead:  # (training ahead, free devices never idle: waiting would only delay the sync)
            busy = self._wait_for_quick_busy_devices(grid, node_ids, busy)
        self._busy = [n for n in node_ids if n in busy]
        send = [n for n in node_ids if n not in busy]
        plan = self._plan = self.planner.plan([self._name(n) for n in send])
        self._async = [n for n in send if not plan.work[self._name(n)].wait]
        self._sent |= {n: plan.work[self._name(n)] for n in send}
        if hasattr(grid, "optional"):
            grid.deadline_s, grid.optional, grid.tag = plan.deadline_s, set(self._async), server_round
        self._globals[server_round] = arrays
        for r in [r for r in self._globals if r < server_round - self.max_staleness]:
            del self._globals[r]
        self.round_info[server_round] = {
            "policy": "auto", "deadline_s": _round(plan.deadline_s), "planned_round_s": _round(plan.round_s),
        }
        extra = {"server-round": server_round, "proximal-mu": float(self.proximal_mu),
                 "train-ahead": int(self.train_ahead)}
        messages = []
        for n in send:
            cfg = ConfigRecord(configs[n] | extra | plan.work[self._name(n)].config())
            messages.append(Message(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg}),
                                    message_type=MessageType.TRAIN, dst_node_id=n))
        return messages

    def state_dict(self) -> dict:
        return super().state_dict() | {"planner": self.planner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("planner"):
            self.planner.load_state_dict(state["planner"])

    def _candidates(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    grid: Grid) -> tuple[list[int], dict[int, dict]]:
        """The nodes sampled for this round and each one's config before its planned work
        (flotilla.strategy.auto.Auto takes both from the strategy it wraps)."""
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        return node_ids, {n: dict(config) for n in node_ids}

    def _server_step(self, server_round: int, averaged: ArrayRecord) -> ArrayRecord:
        """The new global model from the FedNova average (Auto: the wrapped strategy's server optimizer)."""
        return averaged

    def _wait_for_quick_busy_devices(self, grid: Grid, node_ids: list[int], busy: set[int]) -> set[int]:
        """Wait (at most half a planned round) for busy devices the round would wait for anyway.

        A quick device that just missed a deadline is usually seconds from its
        reply; starting the round without it would plan the round around the
        slow devices that happen to be free.
        """
        if not busy:
            return busy
        self._censor_busy(grid, busy)
        everyone = self.planner.plan([self._name(n) for n in node_ids])
        wanted = {n for n in busy if everyone.work[self._name(n)].wait}
        if not wanted or everyone.round_s is None:
            return busy
        end = time.time() + 0.5 * everyone.round_s
        while wanted & busy and time.time() < end:
            time.sleep(0.1)
            self._late += grid.harvest()
            busy = grid.busy_nodes()
        return busy

    def _censor_busy(self, grid: Grid, busy: set[int]) -> None:
        """A busy device's reply takes at least as long as it has been out: tell the planner."""
        now = time.time()
        for o in getattr(grid, "outstanding_now", list)():
            a = self._sent.get(o.node_id)
            e = self.planner.devices.get(self._name(o.node_id))
            if o.node_id in busy and a and a.steps and e and e.throughput_sps:
                self.planner.observe_late(self._name(o.node_id), now - o.pushed_at, a.steps * a.batch / e.throughput_sps)

    def _wait_for_a_free_device(self, grid: Grid, node_ids: list[int]) -> set[int]:
        """The busy nodes; when every node is busy, wait (bounded) for a late reply to free one.

        Without this a fleet of stragglers would burn through rounds that train nothing.
        """
        busy = getattr(grid, "busy_nodes", set)()
        end = time.time() + self.fleet_wait_s
        while node_ids and set(node_ids) <= busy and time.time() < end:
            time.sleep(0.2)
            self._late += grid.harvest()
            busy = grid.busy_nodes()
        return busy

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        plan = self._plan.work if self._plan else {}
        records = self._record_round(server_round, replies, plan)
        records += [self._missing(node, "async", plan) for node in self._async]
        records += [self._missing(node, "busy", {}) for node in self._busy]
        for rec in records:
            if rec["status"] in ("ok", "partial"):
                self.planner.observe(rec["name"], samples=rec["samples"], train_s=rec["train_s"],
                                     partition_size=rec.get("num_examples", 0), reply_s=rec.get("reply_s"),
                                     handler_s=rec["ended"] - rec["started"] if rec.get("started") else None)

        grid = self._grid
        if grid is not None and hasattr(grid, "optional"):
            self._late += grid.harvest()
            grid.deadline_s, grid.optional = None, set()
        stale_records, stale = self._take_late(server_round)
        records += stale_records
        for rec in records:
            e = self.planner.devices.get(rec["name"])
            rec["est_throughput_sps"] = _round(e.throughput_sps if e else None, 2)
            rec["est_overhead_s"] = _round(e.overhead_s if e else None, 3)

        valid, _ = self._check_and_log_replies(replies, is_train=True)
        valid = [m for m in valid if update_steps(m.content["metrics"]) > 0]
        current = self._globals.get(server_round)
        if (not valid and not stale) or current is None:
            return None, None
        g = current.to_numpy_ndarrays()
        metric = self.weighted_by_key
        fresh = [self._update(m) for m in valid]
        old = [self._update(m, base.to_numpy_ndarrays(), staleness) for _, m, base, staleness in stale]
        new, used = aggregate_updates(g, fresh + old)
        for (rec, *_), ok in zip(stale, used[len(fresh):]):
            rec["aggregated"] = ok
        in_average = {m.metadata.src_node_id: ok for m, ok in zip(valid, used)}
        for rec in records:
            if rec["status"] in ("ok", "partial"):
                rec["aggregated"] = in_average.get(rec["node_id"], False)
        self.round_info[server_round]["left_out"] = used.count(False)
        arrays = ArrayRecord(array_dict={k: Array(a) for k, a in zip(current.keys(), new)}, keep_input=False)
        arrays = self._server_step(server_round, arrays)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], metric) if valid else None
        return arrays, metrics

    def _update(self, msg: Message, base: list | None = None, staleness: int = 0) -> Update:
        m = msg.content["metrics"]
        n, batch = int(m[self.weighted_by_key]), max(1, int(m.get("batch-size", 1)))
        return Update(msg.content[self.arrayrecord_key].to_numpy_ndarrays(), n, update_steps(m), base, staleness,
                      ahead_steps=int(m.get("ahead-steps", 0)),
                      epoch_steps=math.ceil(self.planner.local_epochs * n / batch))

    def _take_late(self, server_round: int) -> tuple[list[dict], list[tuple[dict, Message, ArrayRecord, int]]]:
        """Late replies: records (status stale) for this round, their timings to the planner,
        and the usable ones as (record, message, the model it trained from, staleness)."""
        records, usable = [], []
        for late in self._late:
            msg = late.message
            node = msg.metadata.src_node_id
            if msg.has_error():
                records.append(self._missing(node, "lost", {}, error=str(msg.error.reason)[:300]))
                continue
            rec = device_record(msg, self.node_names)
            # arrival, not the ClientApp's end: the way back (push to the SuperNode, then to the SuperLink)
            # is a second or more at a small quota, and an estimate without it makes the round wait for this device
            reply_s = late.arrived_at - late.pushed_at if late.arrived_at > late.pushed_at else None
            self.planner.observe(rec["name"], samples=rec["samples"], train_s=rec["train_s"],
                                 partition_size=rec["num_examples"], reply_s=reply_s,
                                 handler_s=rec["ended"] - rec["started"] if rec["started"] else None)
            staleness = server_round - late.tag if late.tag is not None else None
            base = self._globals.get(late.tag) if late.tag is not None else None
            rec |= {"status": "stale", "sent_round": late.tag, "staleness": staleness, "aggregated": False,
                    "reply_s": _round(reply_s)}
            if base is not None and staleness is not None and 0 <= staleness <= self.max_staleness and rec["steps"]:
                usable.append((rec, msg, base, staleness))
            records.append(rec)
        self._late = []
        return records, usable


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def _shifted(hook, offset: int):
    """A strategy hook called with Flower's round numbers, seeing the run's (Flower's + offset)."""
    def shifted(server_round: int, *args, **kwargs):
        return hook(server_round + offset, *args, **kwargs)

    return shifted


def wait_for_fleet(grid: Grid, expected: int, timeout_s: float) -> int:
    """Wait until `expected` nodes are connected or the timeout passes; return how many are."""
    end = time.time() + timeout_s
    while (n := len(list(grid.get_node_ids()))) < expected and time.time() < end:
        time.sleep(0.2)
    return n
