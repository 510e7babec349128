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
The math lives in flotilla.app.hetero and in the pure helpers below.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
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
SYNC_SLACK = 0.25  # the round waits for a device if that makes it at most 25% longer
MAX_STEP_RATIO = 2.0  # planned steps of any two devices differ at most 2x (FedNova stays well-conditioned)
MAX_STALENESS = 5  # rounds; an older late update is dropped
FIRST_ROUND_SYNC_QUOTA = 0.5  # round 1 waits for devices with at least this share of the top CPU quota
MIN_TIMED_S = 0.05  # training shorter than this says little about throughput (timer, first-step costs)
MIN_STEP_SHARE = 1 / 4  # updates with under this share of the round's most fresh steps are left out
AHEAD_STEP_GAIN = 4.0  # train-ahead may lengthen the global step to this many x local_epochs (aggregate_updates)
FIRST_ROUND_WORK_FACTOR = 2.0  # round 1 (from the initial model) does this many x local_epochs
STALENESS_EXPONENT = 1.0  # a stale update's weight is divided by (1 + staleness) ** this (FedAsync's polynomial)
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


def allocate(throughputs: Sequence[float], overheads: Sequence[float], work_samples: float,
             caps: Sequence[float] | None = None, max_ratio: float = MAX_STEP_RATIO) -> tuple[float, list[float]]:
    """The shortest round D and the samples each device trains in it.

    Device i starts training after its fixed overhead o_i (message, ClientApp
    start) and trains at throughputs[i] samples/s, so by D it can do
    thr_i * (D - o_i), at most caps[i]. No device is given more than
    `max_ratio` times the samples of the least-given one: FedNova divides each
    update by its steps, and large step ratios scale the few-step updates' noise
    up. D is the smallest round in which the samples add up to `work_samples`
    (or to what the caps allow). Work done by D grows with D: bisection.
    """
    n = len(throughputs)
    if n == 0 or len(overheads) != n:
        raise ValueError("need equally many throughputs and overheads, at least one")
    if any(not t > 0 for t in throughputs):
        raise ValueError("throughputs must be > 0")
    caps = [math.inf] * n if caps is None else list(caps)

    def given(d: float) -> list[float]:
        can = [min(c, t * max(0.0, d - o)) for t, o, c in zip(throughputs, overheads, caps)]
        top = max_ratio * min(can)
        return [min(x, top) for x in can]

    lo = max(overheads)
    hi = max(o + min(c, work_samples) / t for t, o, c in zip(throughputs, overheads, caps))
    if sum(given(hi)) < work_samples:  # the caps (or the ratio) bind: the most this fleet can do
        return hi, given(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(given(mid)) < work_samples else (lo, mid)
        if hi - lo < 1e-4:
            break
    return hi, given(hi)


def sync_devices(throughputs: Sequence[float], overheads: Sequence[float], work_samples: float,
                 caps: Sequence[float] | None = None, slack: float = SYNC_SLACK) -> list[int]:
    """Indices of the devices the round waits for; the others work asynchronously.

    Devices join in order of their fixed per-round overhead (e.g. starting a
    ClientApp, slow at a small CPU quota); one joins if the round with it
    (`allocate`) is at most `slack` longer than the shortest round so far. A
    device left out would hold the round up: it trains anyway and its update
    is applied when it arrives. The device with the least overhead always joins.
    """
    caps = [math.inf] * len(throughputs) if caps is None else list(caps)
    order = sorted((i for i, t in enumerate(throughputs) if t > 0), key=lambda i: overheads[i])
    sync: list[int] = []
    best = math.inf
    for i in order:
        with_i = sync + [i]
        d, _ = allocate([throughputs[j] for j in with_i], [overheads[j] for j in with_i], work_samples,
                        [caps[j] for j in with_i])
        if not sync or d <= (1 + slack) * best:
            sync.append(i)
            best = min(best, d)
    return sorted(sync)


def reply_status(steps_done: int, steps_planned: int | None) -> str:
    """ok: did the planned work; partial: stopped at its deadline with fewer steps."""
    return "partial" if steps_planned is not None and steps_done < steps_planned else "ok"


@dataclass(frozen=True)
class Update:
    """A device's trained model: from the current global model, or (stale) from `base`, `staleness` rounds ago."""

    arrays: list
    num_examples: int
    steps: int
    base: list | None = None
    staleness: int = 0
    ahead_steps: int = 0  # of `steps`, those trained ahead (before this round's model arrived)
    epoch_steps: int = 0  # steps of the job's local_epochs over this device's data (its planned work)


def aggregate_updates(global_arrays: list, updates: Sequence[Update],
                      min_step_share: float = MIN_STEP_SHARE,
                      ahead_step_gain: float = AHEAD_STEP_GAIN,
                      staleness_exponent: float = STALENESS_EXPONENT) -> tuple[list, list[bool]]:
    """FedNova over fresh and stale updates; returns the new model and which updates were used.

    Steps trained ahead refine each update's direction; the global step's
    length (FedNova's tau_eff) is held to `ahead_step_gain` x the job's
    local_epochs of steps (`epoch_steps`), so seconds of carried work cannot
    make the server overshoot (seen as accuracy noise between rounds).

    A stale update's change (base - x) is moved onto the current model and its
    data weight divided by (1 + staleness) ** staleness_exponent (FedAsync's
    polynomial staleness function). With 1/sqrt(1 + staleness) (FedBuff's),
    round 1's stale updates, trained from the initial model and still carrying
    its large first steps, pulled round 2's model back (replayed offline: 1-3
    points lower test accuracy than with 1/(1 + staleness)). Updates
    with fewer than `min_step_share` of the most steps among the fresh ones
    (among all, if none is fresh; at most their own local_epochs of steps)
    are left out: FedNova would scale them up.
    With only stale updates the step is damped by their mean discount, so an
    old update never moves the model as far as a fresh one would.
    """
    fresh_steps = [u.steps for u in updates if u.base is None]
    most = max(fresh_steps or [u.steps for u in updates])
    # against the most steps, but never more than the update's own local_epochs: a device that did
    # its full share is kept however far others trained ahead (its data would otherwise be lost)
    used = [u.steps > 0 and u.steps >= min_step_share * min(most, u.epoch_steps or most) for u in updates]
    kept = [u for u, ok in zip(updates, used) if ok]
    if not kept:
        return list(global_arrays), used
    discount = [1 / (1 + u.staleness) ** staleness_exponent for u in kept]
    clients, weights = [], []
    for u, d in zip(kept, discount):
        if u.base is None:
            clients.append(u.arrays)
            weights.append(float(u.num_examples))
        else:
            clients.append([g - (b - x) for g, b, x in zip(global_arrays, u.base, u.arrays)])
            weights.append(u.num_examples * d)
    cap = None
    if any(u.ahead_steps for u in kept):
        w = np.asarray(weights) / sum(weights)
        planned = [u.epoch_steps or (u.steps - u.ahead_steps) for u in kept]
        cap = ahead_step_gain * float((w * np.asarray(planned)).sum())
    new = hetero.fednova_aggregate(global_arrays, clients, weights, [u.steps for u in kept], cap)
    if all(u.base is not None for u in kept):
        damp = statistics.mean(discount)
        new = [(g + damp * (n - g)).astype(np.asarray(g).dtype) for g, n in zip(global_arrays, new)]
    return new, used


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
        max_staleness: int = MAX_STALENESS,
    ) -> None:
        self.batch_size, self.lr, self.local_epochs = batch_size, lr, local_epochs
        self.deadline_factor = deadline_factor
        self.base_bytes, self.bytes_per_sample = base_bytes, bytes_per_sample
        self.min_deadline_s, self.max_work_factor = min_deadline_s, max_work_factor
        self.max_staleness = max_staleness
        self.devices: dict[str, DeviceEstimate] = {}

    def device(self, name: str) -> DeviceEstimate:
        return self.devices.setdefault(name, DeviceEstimate(name))

    def add_capability(self, name: str, cls: str = "", cpus: float | None = None, memory: int | None = None,
                       throughput_sps: float | None = None, samples: int | None = None) -> None:
        d = self.device(name)
        d.samples = samples if samples and samples > 0 else d.samples
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

    def observe_late(self, name: str, waited_s: float, planned_train_s: float) -> None:
        """A device's reply is still out after `waited_s`: its overhead is at least waited_s - planned_train_s.

        Raising the estimate to that bound lets the next plan stop waiting for a
        device that slowed down (throttled) before its late reply says by how much.
        """
        d = self.device(name)
        bound = waited_s - planned_train_s
        if d.overhead_s is None or bound > d.overhead_s:
            d.overhead_s = bound

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
        work = self.local_epochs * sum(n)
        caps = [self.max_work_factor * self.local_epochs * max(ni, b) for ni, b in zip(n, batches)]
        sync = sync_devices(thr, ovh, work, caps)
        round_s, samples = allocate([thr[i] for i in sync], [ovh[i] for i in sync], work, [caps[i] for i in sync])
        steps = {i: max(1, int(x // batches[i])) for i, x in zip(sync, samples)}
        predicted = {i: ovh[i] + steps[i] * batches[i] / thr[i] for i in sync}
        deadline = hetero.round_deadline(list(predicted.values()), self.deadline_factor, self.min_deadline_s)
        typical = statistics.median(steps.values())
        out = {}
        for i, d in enumerate(devs):
            b = batches[i]
            lr = hetero.scale_lr(self.lr, self.batch_size, b)
            if i in sync:
                # stop training early enough for the reply to make the deadline
                train_deadline = max(0.01, deadline - 1.25 * ovh[i] - 0.2)
                out[d.name] = Assignment(b, lr, steps[i], None, round(train_deadline, 3), round(predicted[i], 3))
            else:
                # not waited for: as many steps as a typical waited-for device (its update then
                # counts like theirs when it arrives), but few enough to arrive while still fresh
                fresh_s = (self.max_staleness - 1) * deadline - ovh[i]
                s = max(1, min(int(typical), int(caps[i] // b), int(fresh_s * thr[i] // b)))
                train_s = s * b / thr[i]
                out[d.name] = Assignment(b, lr, s, None, round(1.5 * train_s + 1.0, 3), round(ovh[i] + train_s, 3),
                                         wait=False)
        return RoundPlan(deadline_s=deadline, round_s=round_s, work=out)

    def _first_plan(self, devs: list[DeviceEstimate]) -> RoundPlan:
        """Nothing measured yet: every device gets FIRST_ROUND_WORK_FACTOR x the job's local_epochs.

        Round 1 starts from the initial model, where long local runs cost little
        (the local models still move the same way: AdaComm's "communicate
        rarely first, more often later"), and measures everyone; the later,
        planned rounds are sized from those measurements. Replayed offline with
        this job's data, 2 x local_epochs lifted round 1 from 0.84-0.87 to
        0.88-0.95 test accuracy.

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
            out[d.name] = Assignment(b, hetero.scale_lr(self.lr, self.batch_size, b), None,
                                     FIRST_ROUND_WORK_FACTOR * self.local_epochs, None, None, wait=wait)
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
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
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
        base = dict(config) | {"server-round": server_round, "proximal-mu": float(self.proximal_mu),
                               "train-ahead": int(self.train_ahead)}
        messages = []
        for n in send:
            cfg = ConfigRecord(base | plan.work[self._name(n)].config())
            messages.append(Message(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg}),
                                    message_type=MessageType.TRAIN, dst_node_id=n))
        return messages

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


def update_steps(metrics) -> int:
    """Local steps in a device's update: the round's own plus those trained ahead and carried into it."""
    return int(metrics.get("steps", 0)) + int(metrics.get("ahead-steps", 0))


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
    if "ahead-steps" in m:  # train-ahead: trained before the message came, part of this update
        rec |= {"ahead_steps": int(m["ahead-steps"]), "ahead_samples": int(m.get("ahead-samples", 0)),
                "ahead_s": round(float(m.get("ahead-s", 0.0)), 4)}
    if "cpus" in m:  # effective limits, when the device reports them per round
        rec["cpus"] = float(m["cpus"])
    if "memory" in m:
        rec["memory"] = int(m["memory"])
    return rec


def missing_record(name: str, node_id: int, status: str, work: Assignment | None, error: str | None = None) -> dict:
    """A device that trained nothing usable this round: late, busy (still on an older round) or lost."""
    rec = {
        "name": name, "class": "", "node_id": node_id, "train_s": 0.0, "samples": 0, "steps": 0,
        "planned_steps": work.steps if work else None,
        "train_deadline_s": work.train_deadline_s if work else None,
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
