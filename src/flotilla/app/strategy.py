"""Flotilla's strategies: Flower's FedAvg plus fleet records, and the `auto` policy.

FleetFedAvg (policies none and manual) is Flower's FedAvg, unchanged in what
it sends and how it averages; it only adds to the hooks:
- configure_train waits (bounded) for the whole fleet before round 1 and
  stamps the round's start;
- aggregate_train records, per device, its training time, samples, steps,
  throughput and status, and counts failures and devices given up on.

FleetAuto (policy auto) sizes each device's work from measurements:
- AutoPlanner keeps per-device estimates (throughput, fixed per-round
  overhead, partition size, limits) and plans each round: a memory-safe
  batch, the learning rate scaled to it, local steps so that the fleet does
  `local_epochs` of its data in the shortest round its summed throughput
  allows (every device busy until about the same time), and a deadline of
  deadline_factor x the median planned device time;
- configure_train sends each device its own config (one message per node);
  the trainer stops at its deadline-s and reports the steps it did;
- FleetGrid stops waiting at the deadline; a device still working is `busy`
  and gets no new work until its late reply (timings only) arrives;
- aggregate_train averages with FedNova weights (hetero.fednova_aggregate):
  each update counts per local step, so devices that did more steps do not
  pull the model their way. Updates of few steps (under 1/4 of the round's
  most) are left out: FedNova scales them up by up to 4x, and scaled-up
  noise costs more accuracy than their few steps bring.
The math lives in flotilla.app.hetero and in the pure helpers below.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flotilla.app import hetero

MiB = 1024**2
# The whole device before its first batch: SuperNode ~140 MiB, superexec ~125 MiB,
# warm trainer with torch and its data ~320 MiB, a ClientApp ~100 MiB (measured RSS).
DEVICE_BASE_BYTES = 600 * MiB
# Training memory per sample of the built-in CNN: ~190 KiB measured (batch 32 -> 512), rounded up.
BYTES_PER_SAMPLE = 256 * 1024
MEMORY_HEADROOM = 0.9  # the base above is measured, so only a small margin on top
MAX_WORK_FACTOR = 4.0  # a fast device does at most this many times its own local_epochs
MIN_DEADLINE_S = 2.0  # below this, polling jitter alone would make devices late
SYNC_SHARE = 0.25  # a device that would train under 1/4 of the busiest device's samples works asynchronously
MAX_STALENESS = 5  # rounds; an older late update is dropped
FIRST_ROUND_SYNC_QUOTA = 0.5  # round 1 waits for devices with at least this share of the top CPU quota
MIN_TIMED_S = 0.05  # training shorter than this says little about throughput (timer, first-step costs)
MIN_STEP_SHARE = 1 / 4  # updates with fewer steps than this share of the round's most are left out
JUMP = 1.5  # a measurement this far off the estimate replaces it (a throttle, not noise)


# -- pure helpers -------------------------------------------------------------


def update_estimate(old: float | None, new: float, jump: float = JUMP, weight: float = 0.5) -> float:
    """Blend a new measurement into an estimate, weighing the recent round.

    A measurement more than `jump` times above or below the estimate replaces
    it (a device was throttled or freed: adapt at once); otherwise the two are
    averaged with `weight` on the new one (smooths noise).
    """
    if old is None or not old > 0 or not math.isfinite(old):
        return new
    if not new > 0 or not math.isfinite(new):
        return old
    if new >= old * jump or new <= old / jump:
        return new
    return weight * new + (1 - weight) * old


def fleet_round_time(throughputs: Sequence[float], overheads: Sequence[float], work_samples: float) -> float:
    """The shortest round T in which the fleet trains `work_samples` samples.

    Device i trains at throughputs[i] samples/s after a fixed overheads[i]
    seconds, so it contributes thr_i * max(0, T - o_i); T solves
    sum_i thr_i * max(0, T - o_i) = work (piecewise linear, increasing).
    inf when no device has a positive throughput.
    """
    if len(throughputs) != len(overheads):
        raise ValueError("throughputs and overheads must be equally long")
    if work_samples <= 0:
        return min((o for o, t in zip(overheads, throughputs) if t > 0), default=0.0)
    pts = sorted((max(0.0, o), t) for o, t in zip(overheads, throughputs) if t > 0)
    rate = offset = 0.0  # trained(T) = rate * T - offset between breakpoints
    for k, (o, t) in enumerate(pts):
        rate += t
        offset += t * o
        t_solve = (work_samples + offset) / rate
        nxt = pts[k + 1][0] if k + 1 < len(pts) else math.inf
        if t_solve <= nxt:
            return t_solve
    return math.inf


def sync_devices(throughputs: Sequence[float], overheads: Sequence[float], work_samples: float,
                 min_share: float = SYNC_SHARE) -> list[int]:
    """Indices of the devices the round waits for; the others work asynchronously.

    Devices join in order of their fixed per-round overhead (e.g. starting a
    ClientApp, slow at a small CPU quota). One joins if, in the round the
    devices so far plus it need for the work, it would still train at least
    `min_share` of the samples of the busiest of them: otherwise it would hold
    the round up or train almost nothing in it (and FedNova would scale its
    few steps up), and it does better training a whole round's length and
    arriving later. The device with the least overhead always joins.
    """
    order = sorted((i for i, t in enumerate(throughputs) if t > 0), key=lambda i: overheads[i])
    sync: list[int] = []
    for i in order:
        with_i = sync + [i]
        t_round = fleet_round_time([throughputs[j] for j in with_i], [overheads[j] for j in with_i], work_samples)
        share = [throughputs[j] * max(0.0, t_round - overheads[j]) for j in with_i]
        if not sync or share[-1] >= min_share * max(share):
            sync.append(i)
    return sorted(sync)


def reply_status(steps_done: int, steps_planned: int | None) -> str:
    """ok: did the planned work; partial: stopped at its deadline with fewer steps."""
    return "partial" if steps_planned is not None and steps_done < steps_planned else "ok"


# -- the auto planner ---------------------------------------------------------


@dataclass
class DeviceEstimate:
    name: str
    cls: str = ""
    cpus: float | None = None  # effective CPU quota reported by the device
    memory: int | None = None  # effective memory limit (bytes)
    samples: int | None = None  # its partition size
    throughput_sps: float | None = None
    overhead_s: float | None = None  # fixed per-round cost: message, ClientApp start, reply
    measured_rounds: int = 0


@dataclass(frozen=True)
class Assignment:
    """One device's work for one round."""

    batch: int
    lr: float
    steps: int | None  # None: local_epochs instead (before anything is measured)
    local_epochs: float | None
    train_deadline_s: float | None  # the trainer stops after this much training
    predicted_s: float | None  # planned reply time (overhead + training)
    wait: bool = True  # False: the round does not wait; the update is applied when it arrives

    def config(self) -> dict:
        cfg: dict = {"batch-size": self.batch, "lr": self.lr}
        if self.steps is not None:
            cfg["local-steps"] = self.steps
        if self.local_epochs is not None:
            cfg["local-epochs"] = self.local_epochs
        if self.train_deadline_s is not None:
            cfg["deadline-s"] = self.train_deadline_s
        return cfg


@dataclass(frozen=True)
class RoundPlan:
    deadline_s: float | None  # the server stops waiting; None: wait for every device
    round_s: float | None  # the planned round (every device busy until about then)
    work: dict[str, Assignment]


class AutoPlanner:
    """Per-device estimates in, per-device work out. No Flower, no I/O: unit-testable."""

    def __init__(
        self,
        *,
        batch_size: int,
        lr: float,
        local_epochs: float,
        deadline_factor: float,
        base_bytes: int = DEVICE_BASE_BYTES,
        bytes_per_sample: int = BYTES_PER_SAMPLE,
        min_deadline_s: float = MIN_DEADLINE_S,
        max_work_factor: float = MAX_WORK_FACTOR,
    ) -> None:
        self.batch_size, self.lr, self.local_epochs = batch_size, lr, local_epochs
        self.deadline_factor = deadline_factor
        self.base_bytes, self.bytes_per_sample = base_bytes, bytes_per_sample
        self.min_deadline_s, self.max_work_factor = min_deadline_s, max_work_factor
        self.devices: dict[str, DeviceEstimate] = {}

    def device(self, name: str) -> DeviceEstimate:
        return self.devices.setdefault(name, DeviceEstimate(name))

    def add_capability(self, name: str, cls: str = "", cpus: float | None = None, memory: int | None = None,
                       throughput_sps: float | None = None) -> None:
        d = self.device(name)
        d.cls = cls or d.cls
        d.cpus = cpus if cpus and cpus > 0 else d.cpus
        d.memory = memory if memory and memory > 0 else d.memory
        if throughput_sps and throughput_sps > 0:
            d.throughput_sps = update_estimate(d.throughput_sps, throughput_sps)

    def observe(self, name: str, *, samples: int, train_s: float, partition_size: int,
                reply_s: float | None, handler_s: float | None = None) -> None:
        """A training reply: `samples` trained in `train_s`, the whole exchange took `reply_s`.

        handler_s is the ClientApp's own time (its `ended - started`); on a
        device's first reply, what it spent besides training there (loading
        its data) is a one-time cost and is not counted as overhead.
        """
        d = self.device(name)
        thr = hetero.throughput(samples, train_s)
        if thr > 0 and train_s >= MIN_TIMED_S:
            d.throughput_sps = update_estimate(d.throughput_sps, thr)
        if reply_s is not None and reply_s >= 0:
            overhead = reply_s - max(train_s, 0.0)
            if d.measured_rounds == 0 and handler_s is not None and handler_s > train_s:
                overhead -= handler_s - train_s
            # overheads jitter by a poll interval or two: only a doubling counts as a jump
            d.overhead_s = update_estimate(d.overhead_s, max(0.05, overhead), jump=2.0)
        d.measured_rounds += 1
        if partition_size > 0:
            d.samples = partition_size

    def batch_for(self, d: DeviceEstimate) -> int:
        batch = hetero.memory_safe_batch_size(d.memory, self.base_bytes, self.bytes_per_sample, self.batch_size,
                                              headroom=MEMORY_HEADROOM)
        return max(1, min(batch, d.samples)) if d.samples else batch

    def _imputed(self, devs: list[DeviceEstimate]) -> tuple[list[float], list[float], list[int]]:
        """Throughput, overhead and samples per device; gaps filled from the measured devices.

        Both throughput and overhead are CPU work inside the device's quota, so
        an unmeasured device with a known quota gets the fleet's per-CPU median.
        """
        thr_per_cpu = [d.throughput_sps / d.cpus for d in devs if d.throughput_sps and d.cpus]
        thr_any = [d.throughput_sps for d in devs if d.throughput_sps]
        ovh_cpu = [d.overhead_s * d.cpus for d in devs if d.overhead_s is not None and d.cpus]
        ovh_any = [d.overhead_s for d in devs if d.overhead_s is not None]
        sizes = [d.samples for d in devs if d.samples]
        thr, ovh, n = [], [], []
        for d in devs:
            if d.throughput_sps:
                thr.append(d.throughput_sps)
            elif d.cpus and thr_per_cpu:
                thr.append(statistics.median(thr_per_cpu) * d.cpus)
            else:
                thr.append(statistics.median(thr_any))
            if d.overhead_s is not None:
                ovh.append(d.overhead_s)
            elif d.cpus and ovh_cpu:
                ovh.append(statistics.median(ovh_cpu) / d.cpus)
            else:
                ovh.append(statistics.median(ovh_any) if ovh_any else 0.0)
            n.append(d.samples or (int(statistics.median(sizes)) if sizes else 0))
        return thr, ovh, n

    def plan(self, names: Sequence[str]) -> RoundPlan:
        """Work for the devices in `names` (those free to take work this round)."""
        devs = [self.device(n) for n in names]
        if not devs:
            return RoundPlan(None, None, {})
        if not any(d.throughput_sps for d in devs):
            return self._first_plan(devs)
        thr, ovh, n = self._imputed(devs)
        batches = [self.batch_for(d) for d in devs]
        caps = [max(1, math.ceil(self.max_work_factor * self.local_epochs * max(ni, b) / b)) for ni, b in zip(n, batches)]
        sync = sync_devices(thr, ovh, self.local_epochs * sum(n))
        round_s = fleet_round_time([thr[i] for i in sync], [ovh[i] for i in sync], self.local_epochs * sum(n))
        steps = {i: hetero.local_steps_for(thr[i], batches[i], round_s, caps[i], overhead_s=ovh[i]) for i in sync}
        predicted = {i: ovh[i] + steps[i] * batches[i] / thr[i] for i in sync}
        deadline = hetero.round_deadline(list(predicted.values()), self.deadline_factor, self.min_deadline_s)
        out = {}
        for i, d in enumerate(devs):
            b = batches[i]
            lr = hetero.scale_lr(self.lr, self.batch_size, b)
            if i in sync:
                # stop training early enough for the reply to make the deadline
                train_deadline = max(0.01, deadline - 1.25 * ovh[i] - 0.2)
                out[d.name] = Assignment(b, lr, steps[i], None, round(train_deadline, 3), round(predicted[i], 3))
            else:
                # not waited for: train a round's length, or enough steps to stay within
                # MIN_STEP_SHARE of the busiest device (so its update is kept), and arrive
                # a few rounds later as a stale update
                floor = math.ceil(MIN_STEP_SHARE * max(steps.values()))
                s = max(hetero.local_steps_for(thr[i], b, round_s, caps[i]), min(floor, caps[i]))
                train_s = s * b / thr[i]
                out[d.name] = Assignment(b, lr, s, None, round(1.5 * train_s, 3), round(ovh[i] + train_s, 3),
                                         wait=False)
        return RoundPlan(deadline_s=deadline, round_s=round_s, work=out)

    def _first_plan(self, devs: list[DeviceEstimate]) -> RoundPlan:
        """Nothing measured yet: every device gets the job's local_epochs (as under `none`).

        The round waits only for devices with at least half the largest CPU
        quota; those below are expected to take over twice as long and work
        asynchronously from the start. Their replies, and everyone's, give the
        measurements the next rounds are planned with. Equal work, not work by
        quota: FedNova extrapolates updates of few steps, and guessed 8:1 step
        ratios cost more accuracy than they save time.
        """
        top = max((d.cpus for d in devs if d.cpus), default=None)
        out = {}
        for d in devs:
            b = self.batch_for(d)
            wait = top is None or d.cpus is None or d.cpus >= FIRST_ROUND_SYNC_QUOTA * top
            out[d.name] = Assignment(b, hetero.scale_lr(self.lr, self.batch_size, b), None, self.local_epochs,
                                     None, None, wait=wait)
        return RoundPlan(deadline_s=None, round_s=None, work=out)


# -- strategies ---------------------------------------------------------------


class FleetFedAvg(FedAvg):
    def __init__(self, *, expected_devices: int, fleet_wait_s: float = 60.0,
                 on_round_start: Callable[[int, float], None] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.expected_devices = expected_devices
        self.fleet_wait_s = fleet_wait_s
        self.on_round_start = on_round_start
        self.round_started: dict[int, float] = {}
        self.round_devices: dict[int, list[dict]] = {}
        self.round_failures: dict[int, int] = {}
        self.round_info: dict[int, dict] = {}
        self.node_names: dict[int, str] = {}
        self.device_classes: dict[str, str] = {}  # device name -> class (from the capability query)
        self._grid = None

    def _start_round(self, server_round: int, grid: Grid) -> None:
        if server_round == 1:
            wait_for_fleet(grid, self.expected_devices, self.fleet_wait_s)
        self._grid = grid
        self.round_started[server_round] = time.time()
        if self.on_round_start:
            self.on_round_start(server_round, self.round_started[server_round])

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
            if msg.has_error():
                failures += 1
                devices.append(self._missing(node, "lost", plan, error=str(msg.error.reason)[:300]))
                continue
            rec = device_record(msg, self.node_names)
            a = plan.get(rec["name"])
            rec["planned_steps"] = a.steps if a else None
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
    relative to the model they trained from and weighed down by 1/sqrt(1 + staleness).
    """

    def __init__(self, *, planner: AutoPlanner, proximal_mu: float = 0.0, max_staleness: int = MAX_STALENESS,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.planner = planner
        self.proximal_mu = proximal_mu
        self.max_staleness = max_staleness
        self._globals: dict[int, ArrayRecord] = {}  # round -> the model sent that round (for stale updates)
        self._plan: RoundPlan | None = None
        self._busy: list[int] = []
        self._async: list[int] = []
        self._late: list = []  # late replies not yet aggregated
        self.late_seen: dict[int, list[dict]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start_round(server_round, grid)
        self._late += getattr(grid, "harvest", list)()
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        lost = getattr(grid, "lost_devices", set)()
        node_ids = [n for n in node_ids if self._name(n) not in lost]
        busy = self._wait_for_a_free_device(grid, node_ids)
        self._busy = [n for n in node_ids if n in busy]
        send = [n for n in node_ids if n not in busy]
        plan = self._plan = self.planner.plan([self._name(n) for n in send])
        self._async = [n for n in send if not plan.work[self._name(n)].wait]
        if hasattr(grid, "optional"):
            grid.deadline_s, grid.optional, grid.tag = plan.deadline_s, set(self._async), server_round
        self._globals[server_round] = arrays
        for r in [r for r in self._globals if r < server_round - self.max_staleness]:
            del self._globals[r]
        self.round_info[server_round] = {
            "policy": "auto", "deadline_s": _round(plan.deadline_s), "planned_round_s": _round(plan.round_s),
        }
        base = dict(config) | {"server-round": server_round, "proximal-mu": float(self.proximal_mu)}
        messages = []
        for n in send:
            cfg = ConfigRecord(base | plan.work[self._name(n)].config())
            messages.append(Message(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg}),
                                    message_type=MessageType.TRAIN, dst_node_id=n))
        return messages

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
        stale = self._take_late(server_round)
        for rec in records:
            e = self.planner.devices.get(rec["name"])
            rec["est_throughput_sps"] = _round(e.throughput_sps if e else None, 2)
            rec["est_overhead_s"] = _round(e.overhead_s if e else None, 3)

        valid, _ = self._check_and_log_replies(replies, is_train=True)
        valid = [m for m in valid if int(m.content["metrics"].get("steps", 0)) > 0]
        current = self._globals.get(server_round)
        if (not valid and not stale) or current is None:
            return None, None
        g = current.to_numpy_ndarrays()
        clients, weights, steps = [], [], []
        for m in valid:
            clients.append(m.content[self.arrayrecord_key].to_numpy_ndarrays())
            weights.append(float(m.content["metrics"][self.weighted_by_key]))
            steps.append(int(m.content["metrics"]["steps"]))
        for m, base, staleness in stale:
            # its change, moved onto the current model: g - (base - x)
            x = m.content[self.arrayrecord_key].to_numpy_ndarrays()
            clients.append([gk - (bk - xk) for gk, bk, xk in zip(g, base.to_numpy_ndarrays(), x)])
            weights.append(float(m.content["metrics"][self.weighted_by_key]) / math.sqrt(1 + staleness))
            steps.append(int(m.content["metrics"]["steps"]))
        keep = [i for i, st in enumerate(steps) if st >= MIN_STEP_SHARE * max(steps)]
        self.round_info[server_round]["left_out"] = len(steps) - len(keep)
        new = hetero.fednova_aggregate(g, [clients[i] for i in keep], [weights[i] for i in keep],
                                       [steps[i] for i in keep])
        arrays = ArrayRecord(array_dict={k: Array(a) for k, a in zip(current.keys(), new)}, keep_input=False)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key) if valid else None
        return arrays, metrics

    def _take_late(self, server_round: int) -> list[tuple[Message, ArrayRecord, int]]:
        """Late replies: their timings update the planner; usable ones become stale updates."""
        usable, seen = [], []
        for late in self._late:
            msg = late.message
            name = self._name(msg.metadata.src_node_id)
            if msg.has_error():
                seen.append({"name": name, "sent_round": late.tag, "used": False, "error": str(msg.error.reason)[:300]})
                continue
            m = msg.content["metrics"]
            train_s, samples, steps = float(m.get("train-s", 0.0)), int(m.get("samples", 0)), int(m.get("steps", 0))
            ended = float(m.get("ended", 0.0))
            reply_s = ended - late.pushed_at if ended > late.pushed_at else None
            started = float(m.get("started", 0.0))
            self.planner.observe(name, samples=samples, train_s=train_s, partition_size=int(m.get("num-examples", 0)),
                                 reply_s=reply_s, handler_s=ended - started if started else None)
            staleness = server_round - late.tag if late.tag is not None else None
            base = self._globals.get(late.tag) if late.tag is not None else None
            used = base is not None and staleness is not None and 0 <= staleness <= self.max_staleness and steps > 0
            if used:
                usable.append((msg, base, staleness))
            seen.append({"name": name, "sent_round": late.tag, "staleness": staleness, "used": used,
                         "train_s": round(train_s, 4), "samples": samples, "steps": steps,
                         "reply_s": _round(reply_s)})
        self._late = []
        self.late_seen[server_round] = seen
        return usable


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def device_record(msg: Message, node_names: dict[int, str]) -> dict:
    """One device's training report, from its reply."""
    m = msg.content["metrics"]
    dev = msg.content["device"] if "device" in msg.content else {}
    train_s = float(m.get("train-s", 0.0))
    samples = int(m.get("samples", m.get("num-examples", 0)))
    node = msg.metadata.src_node_id
    rec = {
        "name": str(dev.get("device", node_names.get(node, f"node-{node}"))),
        "class": str(dev.get("device-class", "")),
        "node_id": node,
        "train_s": round(train_s, 4),
        "samples": samples,
        "num_examples": int(m.get("num-examples", 0)),
        "steps": int(m.get("steps", 0)),
        "batch_size": int(m.get("batch-size", 0)),
        "lr": float(m.get("lr", 0.0)),
        "throughput_sps": round(samples / train_s, 2) if train_s > 0 else None,
        "started": float(m.get("started", 0.0)),
        "ended": float(m.get("ended", 0.0)),
        "status": "ok",
    }
    for k in ("cpus", "memory"):  # effective limits, when the device reports them per round
        if k in m:
            rec[k] = m[k]
    return rec


def missing_record(name: str, node_id: int, status: str, work: Assignment | None, error: str | None = None) -> dict:
    """A device that trained nothing usable this round: late, busy (still on an older round) or lost."""
    rec = {
        "name": name, "class": "", "node_id": node_id, "train_s": 0.0, "samples": 0, "steps": 0,
        "planned_steps": work.steps if work else None,
        "batch_size": work.batch if work else None, "lr": work.lr if work else None,
        "throughput_sps": None, "status": status,
    }
    if error:
        rec["error"] = error
    return rec


def wait_for_fleet(grid: Grid, expected: int, timeout_s: float) -> int:
    """Wait until `expected` nodes are connected or the timeout passes; return how many are."""
    end = time.time() + timeout_s
    while (n := len(list(grid.get_node_ids()))) < expected and time.time() < end:
        time.sleep(0.2)
    return n
