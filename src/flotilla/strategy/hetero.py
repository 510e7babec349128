"""Heterogeneity math for the `auto` policy: pure functions on numbers and numpy arrays.

No torch, no flwr: the planner (flotilla.strategy.planner), the aggregation
(flotilla.strategy.aggregate) and the tests share them:
- `throughput`, `round_deadline` (factor x median of planned times);
- `memory_safe_batch_size` (a batch that fits the device's memory) and
  `scale_lr` (the learning rate for that batch);
- `fednova_aggregate`, so that devices that took more steps do not pull the
  model their way (FedNova, Wang et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# scale_lr: the linear rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
# holds for moderate batch growth; far beyond it, without warm-up, it diverges,
# so past this ratio the rate grows with the square root (Krizhevsky 2014,
# Hoffer et al. 2017). Shrinking a batch (the usual case: memory) stays linear.
LINEAR_LR_UP_TO = 4.0


def throughput(samples: int, seconds: float) -> float:
    """Samples per second; 0.0 when nothing was measured (no samples or no time)."""
    if samples <= 0 or not seconds > 0 or not math.isfinite(seconds):
        return 0.0
    return samples / seconds


def memory_safe_batch_size(
    memory_limit_bytes: int | None,
    base_rss_bytes: int,
    bytes_per_sample: int,
    requested: int,
    floor: int = 8,
    cap: int = 512,
    headroom: float = 0.7,
) -> int:
    """The batch a device can train with inside its memory limit.

    The budget is headroom x limit - base_rss (the process before its first
    batch). The requested batch is kept when it fits (or there is no limit);
    otherwise it shrinks to the largest power of two that fits, kept within
    [floor, cap] and never above the request. When not even `floor` fits the
    result is `floor`: the caller should warn that the device may be OOM-killed.
    """
    if requested < 1:
        raise ValueError(f"requested batch {requested}: must be >= 1")
    if bytes_per_sample <= 0:
        raise ValueError(f"bytes_per_sample {bytes_per_sample}: must be > 0")
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom {headroom}: must be in (0, 1]")
    if memory_limit_bytes is None:
        return requested
    fits = int((headroom * memory_limit_bytes - base_rss_bytes) // bytes_per_sample)
    if requested <= fits:
        return requested
    pow2 = 1 << (fits.bit_length() - 1) if fits >= 1 else 0
    return min(requested, max(floor, min(pow2, cap)))


def scale_lr(base_lr: float, base_batch: int, batch: int, linear_up_to: float = LINEAR_LR_UP_TO) -> float:
    """Learning rate for `batch` when `base_lr` was tuned for `base_batch`.

    Linear in batch/base_batch up to `linear_up_to`, then square-root growth
    (continuous at the switch), so a big device cannot get a runaway rate.
    """
    if base_batch < 1 or batch < 1:
        raise ValueError(f"batch sizes must be >= 1 (got base {base_batch}, batch {batch})")
    ratio = batch / base_batch
    if ratio <= linear_up_to:
        return base_lr * ratio
    return base_lr * linear_up_to * math.sqrt(ratio / linear_up_to)


def round_deadline(observed_times: Sequence[float], factor: float, floor_s: float) -> float:
    """Straggler deadline: factor x the median device time, at least floor_s.

    Times that are missing, negative or infinite (a device that never answered)
    are ignored; with none left there is no deadline (inf).
    """
    if factor < 1:
        raise ValueError(f"deadline factor {factor}: must be >= 1 (the median device must make it)")
    times = [t for t in observed_times if t is not None and math.isfinite(t) and t >= 0]
    if not times:
        return math.inf
    return max(floor_s, factor * float(np.median(times)))


def fednova_weights(num_examples: Sequence[int], local_steps: Sequence[int],
                    max_tau_eff: float | None = None) -> np.ndarray:
    """Coefficients c_i with FedNova's result = x_global - sum_i c_i (x_global - x_i).

    p_i = n_i / sum n (data weights), tau_i = local steps, tau_eff = sum p_i tau_i;
    c_i = tau_eff p_i / tau_i. With equal steps c_i = p_i (FedAvg). Clients with
    no examples get 0; a client with examples but 0 steps made no update: drop it.
    tau_eff is the global step's length in local steps; FedNova lets the server
    choose it (Wang et al. 2020, Sec. 4): `max_tau_eff` caps it.
    """
    n = np.asarray(num_examples, dtype=np.float64)
    tau = np.asarray(local_steps, dtype=np.float64)
    if n.ndim != 1 or n.shape != tau.shape or n.size == 0:
        raise ValueError(f"num_examples ({n.size}) and local_steps ({tau.size}) must be non-empty and equally long")
    if (n < 0).any() or n.sum() <= 0:
        raise ValueError("num_examples must be >= 0 with a positive total")
    if ((tau <= 0) & (n > 0)).any():
        raise ValueError("every client with examples needs local_steps >= 1; drop clients that did not train")
    p = n / n.sum()
    tau_safe = np.where(tau > 0, tau, 1.0)
    tau_eff = float((p * tau).sum())
    if max_tau_eff is not None:
        tau_eff = min(tau_eff, max(float(max_tau_eff), 0.0))
    return tau_eff * p / tau_safe


def fednova_aggregate(
    global_arrays: Sequence[np.ndarray],
    client_arrays: Sequence[Sequence[np.ndarray]],
    num_examples: Sequence[int],
    local_steps: Sequence[int],
    max_tau_eff: float | None = None,
) -> list[np.ndarray]:
    """FedNova (vanilla local SGD): x_global - tau_eff * sum_i p_i (x_global - x_i) / tau_i.

    Arrays keep the global model's dtypes; integer arrays (e.g. BatchNorm's
    num_batches_tracked) are rounded.
    """
    c = fednova_weights(num_examples, local_steps, max_tau_eff)
    if len(client_arrays) != len(c):
        raise ValueError(f"{len(client_arrays)} clients' arrays but {len(c)} example counts")
    out = []
    for k, g in enumerate(global_arrays):
        g64 = np.asarray(g, dtype=np.float64)
        step = np.zeros_like(g64)
        for ci, arrays in zip(c, client_arrays):
            x = np.asarray(arrays[k], dtype=np.float64)
            if x.shape != g64.shape:
                raise ValueError(f"array {k}: client shape {x.shape} != global shape {g64.shape}")
            step += ci * (g64 - x)
        new = g64 - step
        dtype = np.asarray(g).dtype
        out.append((np.rint(new) if np.issubdtype(dtype, np.integer) else new).astype(dtype))
    return out
