"""The client side of Flotilla's `auto` policy for your own ClientApp (standard library only).

`flotilla.strategy.Auto` sizes every device's work for every round (batch
size, learning rate, local steps, a deadline) and sends it in the train
message's ConfigRecord (`msg.content["config"]`), next to what your own
strategy sends. A ClientApp that wants its devices' work sized honours three
things:

1. **Read the round's budget** with your app's own values as the fallback::

       budget = Budget.from_message(msg, context, batch_size=32, lr=0.01, local_epochs=1)

   Keys read, highest first: the message's config, then the device's node
   config (Flotilla's per-class `train:` overrides), then your defaults:

   | key            | Budget attribute | meaning                                             |
   |----------------|------------------|-----------------------------------------------------|
   | `local-steps`  | `local_steps`    | mini-batch steps this round (wins over epochs)      |
   | `local-epochs` | `local_epochs`   | passes over the local data (may be fractional)      |
   | `batch-size`   | `batch_size`     | mini-batch size (Auto may shrink it for memory)     |
   | `lr`           | `lr`             | learning rate (scaled with the batch)               |
   | `deadline-s`   | `deadline_s`     | seconds of *training* after which to stop           |
   | `proximal-mu`  | `proximal_mu`    | FedProx term weight (0: none)                       |

   Without Flotilla's keys (plain FedAvg, plain `flwr run`) the budget is
   your defaults plus whatever your own strategy sends under these names:
   the app trains exactly as it would without this module.

2. **Honour it in your training loop**: iterate
   `budget.batches(trainloader)` instead of looping over epochs yourself. It
   cycles through the loader until the round's steps (or epochs) are done or
   the deadline has passed (always at least one step), counting the steps
   and samples done. For a loop of your own, call `budget.start()` before the
   first step, `budget.step(n_samples)` after each one and stop when
   `budget.done(total_steps)` (or `budget.expired()`) says so;
   `budget.total_steps(batches_per_epoch)` is the round's step count.

3. **Reply with the budget's metrics**: put
   `budget.metrics(num_examples, **your_metrics)` into the reply's
   MetricRecord. It holds `num-examples` (your partition size: FedAvg's
   weight), `samples`, `steps`, `train-s` (time spent in training steps),
   `batch-size`, `lr`, `started`/`ended` (wall clock of the handler), and the
   device's `cpus`/`memory` limits (0 when unknown: every reply carries the
   same keys, as Flower's FedAvg requires). The planner measures each
   device's throughput and per-round overhead from these; FedNova weighs
   each update by the steps it took.

Stopping at the deadline is what lets the server close the round on time:
a device that stops early replies with fewer steps (`partial`), and one that
replies after the round closed is applied as a stale update.

This module imports only the standard library: a ClientApp imports it in
every message's process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

STEPS_KEY = "local-steps"
EPOCHS_KEY = "local-epochs"
BATCH_KEY = "batch-size"
LR_KEY = "lr"
DEADLINE_KEY = "deadline-s"
PROX_KEY = "proximal-mu"
ROUND_KEY = "server-round"
#: keys only Flotilla's planner sends: their presence says the round was planned
PLANNED_KEYS = (STEPS_KEY, DEADLINE_KEY)
#: the node-config keys Flotilla sets for a device's training (per-class `train:` overrides)
NODE_TRAIN_KEYS = (BATCH_KEY, LR_KEY, EPOCHS_KEY, STEPS_KEY)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


@dataclass
class Budget:
    """One round's training work on this device, and what was done of it."""

    batch_size: int
    lr: float
    local_epochs: float | None = 1.0
    local_steps: int | None = None  # when set, the round's steps (local_epochs is then ignored)
    deadline_s: float | None = None  # seconds of training allowed; None: no deadline
    proximal_mu: float = 0.0
    server_round: int | None = None
    planned: bool = False  # the message carried Flotilla's planned work
    cpus: float | None = None  # the device's CPU quota (node config "cpus")
    memory: int | None = None  # the device's memory limit in bytes (node config "memory-bytes")
    started: float = field(default_factory=time.time)  # wall clock when the budget was read
    steps_done: int = 0
    samples_done: int = 0
    _t0: float | None = field(default=None, repr=False)  # perf_counter at the first step
    _t_last: float | None = field(default=None, repr=False)  # perf_counter after the last step

    # -- reading ------------------------------------------------------------------
    @classmethod
    def from_message(cls, msg, context=None, *, batch_size: int, lr: float, local_epochs: float | None = 1.0,
                     local_steps: int | None = None, deadline_s: float | None = None,
                     proximal_mu: float = 0.0, config_key: str = "config") -> "Budget":
        """The budget of a train message (`flwr.app.Message`); `context` gives the node config.

        The keyword arguments are your app's own values, used where neither
        the message nor the device's node config says otherwise.
        """
        config: Mapping = {}
        content = getattr(msg, "content", None)
        if content is not None and config_key in content:
            config = content[config_key]
        node_config = getattr(context, "node_config", None) or {}
        return cls.from_config(config, node_config, batch_size=batch_size, lr=lr, local_epochs=local_epochs,
                               local_steps=local_steps, deadline_s=deadline_s, proximal_mu=proximal_mu)

    @classmethod
    def from_config(cls, config: Mapping, node_config: Mapping | None = None, *, batch_size: int, lr: float,
                    local_epochs: float | None = 1.0, local_steps: int | None = None,
                    deadline_s: float | None = None, proximal_mu: float = 0.0) -> "Budget":
        """As from_message, from the message's config and the node config as plain mappings."""
        node_config = dict(node_config or {})
        config = dict(config or {})
        node = {k: node_config[k] for k in NODE_TRAIN_KEYS if _number(node_config.get(k)) is not None}
        layers = [config, node]  # highest first; the defaults come last

        def pick(key: str, default):
            for layer in layers:
                v = _number(layer.get(key))
                if v is not None:
                    return v
            return default

        steps, epochs = local_steps, local_epochs
        for layer in layers:  # the highest layer that says how much work decides: steps, else epochs
            s, e = _number(layer.get(STEPS_KEY)), _number(layer.get(EPOCHS_KEY))
            if s is not None and s >= 1:
                steps, epochs = int(s), None
                break
            if e is not None and e > 0:
                steps, epochs = None, e
                break
        if steps is None and not (epochs and epochs > 0):
            raise ValueError("a budget needs local_steps >= 1 or local_epochs > 0")
        batch = int(pick(BATCH_KEY, batch_size))
        if batch < 1:
            raise ValueError(f"batch size {batch}: must be >= 1")
        deadline = pick(DEADLINE_KEY, deadline_s)
        rnd = _number(config.get(ROUND_KEY))
        cpus, memory = _number(node_config.get("cpus")), _number(node_config.get("memory-bytes"))
        return cls(batch_size=batch, lr=float(pick(LR_KEY, lr)), local_epochs=epochs, local_steps=steps,
                   deadline_s=float(deadline) if deadline is not None and deadline > 0 else None,
                   proximal_mu=float(pick(PROX_KEY, proximal_mu)),
                   server_round=int(rnd) if rnd is not None else None,
                   planned=any(_number(config.get(k)) is not None for k in PLANNED_KEYS),
                   cpus=cpus if cpus and cpus > 0 else None,
                   memory=int(memory) if memory and memory > 0 else None)

    # -- honouring ----------------------------------------------------------------
    def total_steps(self, batches_per_epoch: int | None = None) -> int | None:
        """The round's steps: local_steps, else local_epochs x batches_per_epoch (None if that is unknown)."""
        if self.local_steps is not None:
            return max(1, int(self.local_steps))
        if batches_per_epoch is None or self.local_epochs is None:
            return None
        return max(1, math.ceil(self.local_epochs * batches_per_epoch))

    def start(self) -> None:
        """Start the training clock (the deadline counts from here); later calls do nothing."""
        if self._t0 is None:
            self._t0 = self._t_last = time.perf_counter()

    def elapsed_s(self) -> float:
        """Seconds since training started (0 before)."""
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def remaining_s(self) -> float | None:
        """Training seconds left before the deadline (None: no deadline)."""
        return None if self.deadline_s is None else self.deadline_s - self.elapsed_s()

    def expired(self) -> bool:
        """The deadline has passed (never, without a deadline)."""
        return self.deadline_s is not None and self._t0 is not None and self.elapsed_s() >= self.deadline_s

    def step(self, samples: int | None = None) -> None:
        """Count one training step of `samples` samples (default: the batch size)."""
        self.start()
        self.steps_done += 1
        self.samples_done += int(self.batch_size if samples is None else samples)
        self._t_last = time.perf_counter()

    def done(self, total_steps: int | None = None) -> bool:
        """Stop training? The round's steps are done, or the deadline passed after at least one step."""
        total = self.total_steps() if total_steps is None else total_steps
        if total is not None and self.steps_done >= total:
            return True
        return self.steps_done > 0 and self.expired()

    def steps(self, batches_per_epoch: int | None = None) -> Iterator[int]:
        """Step indices 0, 1, ... until the budget is done; each step counts `batch_size` samples.

        Without local_steps and batches_per_epoch, only the deadline stops it.
        """
        total = self.total_steps(batches_per_epoch)
        self.start()
        while not self.done(total):
            yield self.steps_done
            self.step()

    def batches(self, loader: Iterable, samples_of: Callable[[Any], int] | None = None) -> Iterator:
        """The loader's batches, epoch after epoch, until the round's steps are done or the deadline passed.

        `loader` is re-iterated for every epoch (a torch DataLoader reshuffles).
        Each batch is counted once your step on it is done (when you ask for
        the next one); its samples are `samples_of(batch)`, else the length of
        the batch (its first element for tuples, first value for dicts).
        Without local_steps and without len(loader), it runs ceil(local_epochs) epochs.
        """
        try:
            per_epoch = len(loader)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        total = self.total_steps(per_epoch)
        max_epochs = None if total is not None else math.ceil(self.local_epochs or 1)
        self.start()
        epochs, it, in_epoch = 0, iter(loader), 0
        while not self.done(total):
            try:
                batch = next(it)
            except StopIteration:
                epochs += 1
                if in_epoch == 0 or (max_epochs is not None and epochs >= max_epochs):
                    return  # an empty loader, or the epochs are done
                it, in_epoch = iter(loader), 0
                continue
            in_epoch += 1
            yield batch
            self.step(samples_of(batch) if samples_of else _batch_len(batch, self.batch_size))

    # -- reporting ----------------------------------------------------------------
    def train_s(self) -> float:
        """Seconds from the first step's start to the last step's end."""
        return 0.0 if self._t0 is None or self._t_last is None else self._t_last - self._t0

    def metrics(self, num_examples: int, *, steps: int | None = None, samples: int | None = None,
                train_s: float | None = None, **extra) -> dict:
        """The reply's metrics: what the planner needs, plus your own (`extra`, e.g. train_loss=...).

        `steps`, `samples` and `train_s` override what the budget counted (for
        a training loop that did not report its steps to it).
        """
        done_steps = self.steps_done if steps is None else int(steps)
        out: dict = {
            "num-examples": int(num_examples),
            "samples": int(self.samples_done if samples is None else samples),
            "steps": done_steps,
            "train-s": float(self.train_s() if train_s is None else train_s),
            "batch-size": int(self.batch_size),
            "lr": float(self.lr),
            "started": float(self.started),
            "ended": float(time.time()),
            "cpus": float(self.cpus or 0.0),
            "memory": int(self.memory or 0),
        }
        out.update(extra)
        return out


def _batch_len(batch: Any, default: int) -> int:
    first = batch
    if isinstance(batch, Mapping):
        first = next(iter(batch.values()), None)
    elif isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], "__len__"):
        first = batch[0]
    try:
        return len(first)  # type: ignore[arg-type]
    except TypeError:
        return default
