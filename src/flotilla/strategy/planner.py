"""The `auto` policy's planner: per-device estimates in, per-device work out (no Flower, no I/O).

AutoPlanner keeps per-device estimates (throughput, fixed per-round overhead
such as starting a ClientApp, partition size, limits) and plans each round:
a memory-safe batch and the learning rate scaled to it; the devices to wait
for (those that do not hold the round up); local steps so that these do
`local_epochs` of the fleet's data in the shortest round their throughputs
allow, with every device busy until about the same time and no device given
over twice the steps of another; and a deadline of deadline_factor x the
median planned device time. Round 1 (nothing measured) is the job's plain
work, and measures everyone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from flotilla.strategy import hetero

MiB = 1024**2
# The built-in app's device before its first batch: SuperNode ~140 MiB, superexec ~125 MiB,
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
FIRST_ROUND_WORK_FACTOR = 2.0  # round 1 (from the initial model) does this many x local_epochs
JUMP = 1.5  # a measurement this far off the estimate replaces it (a throttle, not noise)
WORK_TOLERANCE = 1e-6  # samples: float sums of planned work compare equal within this


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
    if sum(given(hi)) < work_samples - WORK_TOLERANCE:  # the caps (or the ratio) bind: the most it can do
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
    best, best_done = math.inf, 0.0
    for i in order:
        with_i = sync + [i]
        d, given = allocate([throughputs[j] for j in with_i], [overheads[j] for j in with_i], work_samples,
                            [caps[j] for j in with_i])
        # a set whose caps bind cannot do the round's work at all: its (short) round is no fair comparison
        short = best_done < work_samples - WORK_TOLERANCE
        if not sync or short or d <= (1 + slack) * best:
            sync.append(i)
            if short or d < best:
                best, best_done = d, sum(given)
    return sorted(sync)



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

    def state_dict(self) -> dict:
        """The per-device estimates, for a checkpoint (a resumed run plans round r + 1 as it would have)."""
        from dataclasses import asdict

        return {name: asdict(d) for name, d in self.devices.items()}

    def load_state_dict(self, state: dict) -> None:
        self.devices = {name: DeviceEstimate(**d) for name, d in state.items()}

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
        steps = {i: max(1, int((x + WORK_TOLERANCE) // batches[i])) for i, x in zip(sync, samples)}
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
