"""Heterogeneity math of the auto policy: batch sizing, lr scaling, deadlines, FedNova."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flotilla.strategy.hetero import (
    fednova_aggregate,
    fednova_weights,
    memory_safe_batch_size,
    round_deadline,
    scale_lr,
    throughput,
)

MiB = 1024**2


# -- throughput ---------------------------------------------------------------


def test_throughput_guards_against_zero_time_and_no_samples():
    assert throughput(500, 2.0) == 250.0
    assert throughput(500, 0.0) == 0.0
    assert throughput(0, 3.0) == 0.0
    assert throughput(10, float("nan")) == 0.0


# -- memory_safe_batch_size ---------------------------------------------------


def test_no_limit_keeps_the_requested_batch():
    assert memory_safe_batch_size(None, 500 * MiB, 1 * MiB, requested=100) == 100


def test_requested_batch_is_kept_when_it_fits():
    # budget = 0.7 * 1000 MiB - 300 MiB = 400 MiB -> 400 samples of 1 MiB
    assert memory_safe_batch_size(1000 * MiB, 300 * MiB, 1 * MiB, requested=100) == 100
    assert memory_safe_batch_size(1000 * MiB, 300 * MiB, 1 * MiB, requested=400) == 400


def test_too_big_a_batch_shrinks_to_the_largest_power_of_two_that_fits():
    assert memory_safe_batch_size(1000 * MiB, 300 * MiB, 1 * MiB, requested=401) == 256
    assert memory_safe_batch_size(1000 * MiB, 300 * MiB, 1 * MiB, requested=4096) == 256
    # the cap bounds the shrunk size
    assert memory_safe_batch_size(10_000 * MiB, 0, 1 * MiB, requested=8000) == 512
    assert memory_safe_batch_size(10_000 * MiB, 0, 1 * MiB, requested=8000, cap=1024) == 1024


def test_never_below_the_floor_even_when_nothing_fits():
    assert memory_safe_batch_size(300 * MiB, 250 * MiB, 1 * MiB, requested=64) == 8
    assert memory_safe_batch_size(300 * MiB, 250 * MiB, 1 * MiB, requested=64, floor=16) == 16
    # ...but the floor does not raise a small request
    assert memory_safe_batch_size(300 * MiB, 250 * MiB, 1 * MiB, requested=4) == 4


@pytest.mark.parametrize(
    "kwargs",
    [dict(requested=0), dict(bytes_per_sample=0), dict(headroom=0.0), dict(headroom=1.5)],
)
def test_batch_size_rejects_bad_arguments(kwargs):
    args = dict(memory_limit_bytes=1000 * MiB, base_rss_bytes=0, bytes_per_sample=MiB, requested=32) | kwargs
    with pytest.raises(ValueError):
        memory_safe_batch_size(**args)


# -- scale_lr -----------------------------------------------------------------


def test_lr_scales_linearly_for_smaller_and_moderately_larger_batches():
    assert scale_lr(0.1, 32, 32) == pytest.approx(0.1)
    assert scale_lr(0.1, 32, 8) == pytest.approx(0.025)
    assert scale_lr(0.1, 32, 128) == pytest.approx(0.4)


def test_lr_grows_with_the_square_root_beyond_the_linear_range_and_is_continuous():
    assert scale_lr(0.1, 32, 512) == pytest.approx(0.1 * 4 * math.sqrt(16 / 4))  # 0.8, linear would be 1.6
    assert scale_lr(0.1, 32, 129) == pytest.approx(scale_lr(0.1, 32, 128), rel=0.01)
    with pytest.raises(ValueError):
        scale_lr(0.1, 0, 8)


# -- round_deadline -----------------------------------------------------------


def test_deadline_is_factor_times_median():
    assert round_deadline([10.0, 12.0, 40.0], factor=1.5, floor_s=1.0) == pytest.approx(18.0)


def test_deadline_respects_the_floor_and_a_single_device():
    assert round_deadline([2.0], factor=1.5, floor_s=5.0) == 5.0
    assert round_deadline([10.0], factor=1.5, floor_s=0.0) == 15.0


def test_deadline_ignores_devices_that_never_answered():
    assert round_deadline([10.0, math.inf, float("nan"), -1.0], 2.0, 0.0) == 20.0
    assert round_deadline([], 2.0, 0.0) == math.inf
    with pytest.raises(ValueError):
        round_deadline([1.0], factor=0.5, floor_s=0.0)


# -- FedNova ------------------------------------------------------------------


def _model(*values):
    return [np.array(values, dtype=np.float32)]


def test_fednova_equals_fedavg_when_steps_are_equal():
    rng = np.random.default_rng(0)
    g = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    clients = [[a + rng.normal(size=a.shape).astype(np.float32) for a in g] for _ in range(3)]
    n = [100, 300, 600]
    nova = fednova_aggregate(g, clients, n, local_steps=[7, 7, 7])
    p = np.array(n) / sum(n)
    fedavg = [sum(pi * c[k] for pi, c in zip(p, clients)) for k in range(len(g))]
    for a, b in zip(nova, fedavg):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fednova_weights(n, [7, 7, 7]), p)


def test_a_client_with_many_more_steps_no_longer_dominates_the_direction():
    # Equal data. Client A took 1 step along x; client B took 10 steps along y
    # (same per-step movement). FedAvg follows B; FedNova weighs both directions equally.
    g = _model(0.0, 0.0)
    a = _model(1.0, 0.0)
    b = _model(0.0, 10.0)
    fedavg = 0.5 * a[0] + 0.5 * b[0]
    assert fedavg[1] / fedavg[0] == pytest.approx(10.0)
    (nova,) = fednova_aggregate(g, [a, b], num_examples=[50, 50], local_steps=[1, 10])
    assert nova[0] == pytest.approx(nova[1])
    assert nova == pytest.approx([2.75, 2.75])  # tau_eff = 5.5 steps of the averaged direction


def test_fednova_single_client_returns_its_model():
    g = _model(1.0, 2.0)
    c = _model(0.5, 3.0)
    (out,) = fednova_aggregate(g, [c], num_examples=[10], local_steps=[4])
    np.testing.assert_allclose(out, c[0])


def test_fednova_keeps_integer_arrays_integer_and_ignores_empty_clients():
    g = [np.array([10], dtype=np.int64)]
    clients = [[np.array([13], dtype=np.int64)], [np.array([999], dtype=np.int64)]]
    (out,) = fednova_aggregate(g, clients, num_examples=[5, 0], local_steps=[3, 0])
    assert out.dtype == np.int64 and out.tolist() == [13]


def test_fednova_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="equally long"):
        fednova_weights([1, 2], [1])
    with pytest.raises(ValueError, match="local_steps >= 1"):
        fednova_weights([5, 5], [2, 0])
    with pytest.raises(ValueError, match="positive total"):
        fednova_weights([0, 0], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fednova_aggregate(_model(0.0, 0.0), [_model(1.0)], [1], [1])
