"""Aggregating fresh and stale updates of unequal local work (FedNova, staleness discount). Pure numpy."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flotilla.strategy import hetero

MIN_STEP_SHARE = 1 / 4  # updates with under this share of the round's most fresh steps are left out
AHEAD_STEP_GAIN = 4.0  # train-ahead may lengthen the global step to this many x local_epochs (aggregate_updates)
STALENESS_EXPONENT = 1.0  # a stale update's weight is divided by (1 + staleness) ** this (FedAsync's polynomial)


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


def update_steps(metrics) -> int:
    """Local steps in a device's update: the round's own plus those trained ahead and carried into it."""
    return int(metrics.get("steps", 0)) + int(metrics.get("ahead-steps", 0))
