"""Policy auto: the planner's math (fast unit tests) and a real run with a device throttled mid-run.

The real run (marked e2e) starts `flotilla run` and, from this process, applies
the job's throttle schedule with a Throttler, as the driver's follow loop does.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from conftest import FLOTILLA, cgroups_of, processes_of
from flotilla.runs import RunRecord, read_jsonl
from flotilla.sandbox.cgroups import DeviceCgroup
from flotilla.strategy.aggregate import Update, aggregate_updates, reply_status, update_steps
from flotilla.strategy.planner import AutoPlanner, allocate, sync_devices, update_estimate
from flotilla.throttle import Throttler

MiB = 1024**2


# -- pure helpers ---------------------------------------------------------------


def test_estimates_average_noise_but_jump_on_a_real_change():
    assert update_estimate(None, 100.0) == 100.0
    assert update_estimate(100.0, 120.0) == pytest.approx(110.0)  # noise: blended
    assert update_estimate(100.0, 10.0) == 10.0  # throttled: taken at once
    assert update_estimate(10.0, 100.0) == 100.0  # freed: taken at once
    assert update_estimate(100.0, 0.0) == 100.0  # no measurement keeps the estimate


def test_allocation_shares_the_work_by_throughput_after_each_overhead():
    # equal overheads, throughputs 1:3 within the step ratio of 2? no: 1:3 is capped to 1:2
    d, given = allocate([100, 300], [1.0, 1.0], 800, max_ratio=10)
    assert d == pytest.approx(3.0, abs=1e-3) and given == pytest.approx([200, 600], abs=0.1)
    # with the default ratio 2 the fast device may do only twice the slow one's samples: the round is longer
    d2, given2 = allocate([100, 300], [1.0, 1.0], 800)
    assert d2 > d and given2[1] == pytest.approx(2 * given2[0], rel=1e-3) and sum(given2) == pytest.approx(800, rel=1e-3)
    # everyone finishes by the round's end
    thr, ovh = [100, 50, 25], [1.0, 2.0, 4.0]
    d3, given3 = allocate(thr, ovh, 1000, max_ratio=100)
    assert all(g <= t * (d3 - o) + 1e-6 for g, t, o in zip(given3, thr, ovh))
    assert sum(given3) == pytest.approx(1000, rel=1e-3)


def test_allocation_stops_at_the_caps():
    d, given = allocate([1000, 1000], [1.0, 1.0], 10_000, caps=[2000, 3000])
    assert given == pytest.approx([2000, 3000], abs=1) and d == pytest.approx(4.0, abs=1e-3)


def test_devices_that_would_hold_the_round_up_work_asynchronously():
    # two quick devices finish the work in ~5 s; one whose fixed cost is 30 s is not waited for
    assert sync_devices([1000, 1000, 100], [1.0, 1.0, 30.0], 8000) == [0, 1]
    # overheads that differ a little are all waited for, even when they are most of the round
    assert sync_devices([1000, 1000, 1000], [3.0, 3.2, 3.4], 8000) == [0, 1, 2]
    assert sync_devices([2000, 1800, 1600], [7.1, 7.6, 7.3], 4000) == [0, 1, 2]
    # quotas 1, 1/2, 1/4, 1/8 (overhead and throughput both scale with the quota)
    assert sync_devices([3800, 1900, 950, 475], [1.0, 2.0, 4.0, 8.0], 8000) == [0, 1]
    # the device with the least overhead is always waited for, however slow
    assert sync_devices([10, 10], [30.0, 100.0], 20) == [0]


def test_aggregation_is_fednova_over_fresh_and_stale_updates():
    g = [np.zeros(3)]
    fresh = [Update([np.full(3, 2.0)], 100, 20), Update([np.full(3, 1.0)], 100, 10)]
    new, used = aggregate_updates(g, fresh)
    # FedNova: each update counts per step (both moved 0.1 per step), times the mean steps (15)
    assert used == [True, True] and new[0] == pytest.approx(np.full(3, 1.5))
    # a stale update's change is moved onto the current model and weighed down by staleness
    base, now = [np.zeros(3)], [np.full(3, 10.0)]
    stale = Update([np.full(3, 1.0)], 100, 10, base=base, staleness=3)
    new, used = aggregate_updates(now, [Update([np.full(3, 11.0)], 100, 10), stale])
    assert used == [True, True] and new[0] == pytest.approx(np.full(3, 11.0))  # both moved +1
    # updates with under a quarter of the most fresh steps are left out, fresh or stale
    tiny = Update([np.full(3, 5.0)], 100, 4)
    new, used = aggregate_updates(g, fresh + [tiny])
    assert used == [True, True, False] and new[0] == pytest.approx(np.full(3, 1.5))
    # ...but an update with its full local_epochs of steps is kept, however far others trained ahead
    long_ahead = Update([np.full(3, 40.0)], 100, 400, ahead_steps=380, epoch_steps=20)
    full_share = Update([np.full(3, 2.0)], 100, 20, epoch_steps=20)
    short = Update([np.full(3, 0.4)], 100, 4, epoch_steps=20)
    _, used = aggregate_updates(g, [long_ahead, full_share, short])
    assert used == [True, True, False]


def test_steps_trained_ahead_refine_the_direction_but_cap_the_step_length():
    g = [np.zeros(2)]
    # each device moved 0.1 per step; one trained 90 of its 100 steps ahead of the round
    a = Update([np.array([10.0, 0.0])], 100, 100, ahead_steps=90)
    b = Update([np.array([0.0, 3.0])], 100, 30)
    new, used = aggregate_updates(g, [a, b], ahead_step_gain=2.0)
    # per-step directions averaged: (0.1, 0) and (0, 0.1) -> (0.05, 0.05); the step is the rounds'
    # own steps (mean of 10 and 30 = 20) x gain 2 = 40 long, not FedNova's 65 (mean of 100 and 30)
    assert used == [True, True] and new[0] == pytest.approx([2.0, 2.0])
    new, _ = aggregate_updates(g, [a, b], ahead_step_gain=100.0)  # a cap above tau_eff changes nothing
    assert new[0] == pytest.approx([3.25, 3.25])
    # the length is measured against the job's local_epochs of steps when the updates carry it
    a30, b30 = (Update(u.arrays, u.num_examples, u.steps, ahead_steps=u.ahead_steps, epoch_steps=30) for u in (a, b))
    new, _ = aggregate_updates(g, [a30, b30], ahead_step_gain=2.0)
    assert new[0] == pytest.approx([3.0, 3.0])  # 2 x 30 = 60 steps of (0.05, 0.05)
    without, _ = aggregate_updates(g, [Update([np.array([1.0, 0.0])], 100, 10), Update([np.array([0.0, 1.0])], 100, 10)])
    assert without[0] == pytest.approx([0.5, 0.5])  # no train-ahead: plain FedNova


def test_a_lone_stale_update_moves_the_model_less_than_a_fresh_one():
    g = [np.full(2, 10.0)]
    stale = Update([np.full(2, 2.0)], 100, 10, base=[np.zeros(2)], staleness=3)  # moved +2 from its base
    new, used = aggregate_updates(g, [stale])
    assert used == [True] and new[0] == pytest.approx(np.full(2, 10.5))  # +2 x 1/(1 + 3)


def test_reply_status():
    assert reply_status(10, 10) == "ok"
    assert reply_status(4, 10) == "partial"
    assert reply_status(63, None) == "ok"


def test_steps_trained_ahead_count_in_the_update_but_not_in_the_rounds_status():
    assert update_steps({"steps": 40, "ahead-steps": 120}) == 160  # FedNova divides the change by all of them
    assert update_steps({"steps": 40}) == 40  # a device without train-ahead (or an older app)
    assert reply_status(40, 40) == "ok"  # the round's own work decides ok/partial


def _planner(**kw) -> AutoPlanner:
    return AutoPlanner(batch_size=32, lr=0.02, local_epochs=2, deadline_factor=1.5, **kw)


def test_first_round_is_twice_the_jobs_work_and_waits_only_for_the_larger_quotas():
    p = _planner()
    for name, cpus in [("a", 1.0), ("b", 0.5), ("c", 0.25), ("d", 0.125)]:
        p.add_capability(name, "x", cpus, 2 * 1024 * MiB)
    plan = p.plan(["a", "b", "c", "d"])
    assert plan.deadline_s is None  # nothing measured: no deadline
    assert [w.local_epochs for w in plan.work.values()] == [4, 4, 4, 4]  # 2 x the job's 2: long runs are cheap early
    assert all(w.steps is None and w.train_deadline_s is None for w in plan.work.values())
    assert {n: w.wait for n, w in plan.work.items()} == {"a": True, "b": True, "c": False, "d": False}
    # without quotas nothing is known: wait for all
    q = _planner()
    assert all(w.wait for w in q.plan(["x", "y"]).work.values())


def _measured(p: AutoPlanner, devices) -> None:
    for name, thr, overhead in devices:
        p.add_capability(name, "x", None, None)
        p.observe(name, samples=1000, train_s=1000 / thr, partition_size=1000, reply_s=overhead + 1000 / thr)


def test_measured_work_follows_throughput_and_everyone_ends_together():
    p = _planner()
    _measured(p, [("fast", 3000, 1.0), ("mid", 2000, 1.0), ("slow", 1500, 1.0)])
    plan = p.plan(["fast", "mid", "slow"])
    w = plan.work
    assert w["fast"].steps > w["mid"].steps > w["slow"].steps
    assert w["fast"].steps / w["slow"].steps == pytest.approx(2, rel=0.05)
    # the fleet does local_epochs over all data (2 x 3000 samples) in the planned round
    assert sum(a.steps * a.batch for a in w.values()) == pytest.approx(6000, rel=0.02)
    assert plan.round_s == pytest.approx(1.0 + 6000 / 6500, rel=0.01)
    for a in w.values():
        assert a.wait and a.predicted_s == pytest.approx(plan.round_s, rel=0.05)
        assert a.train_deadline_s < plan.deadline_s
    assert plan.deadline_s == pytest.approx(max(2.0, 1.5 * plan.round_s), rel=0.05)


def test_step_counts_stay_within_twice_each_other():
    p = _planner()
    _measured(p, [("fast", 4000, 1.0), ("slow", 1000, 1.0)])
    w = p.plan(["fast", "slow"]).work
    assert w["fast"].steps == pytest.approx(2 * w["slow"].steps, abs=1)
    assert w["fast"].predicted_s < w["slow"].predicted_s  # the fast one idles rather than out-step the other 4:1


def test_a_throttled_device_is_resized_at_once_and_then_left_asynchronous():
    p = _planner()
    _measured(p, [("a", 3000, 1.0), ("b", 3000, 1.0)])
    before = p.plan(["a", "b"]).work["b"].steps
    # b was throttled to a tenth: its reply shows a tenth of the throughput and ten times the overhead
    p.observe("b", samples=300, train_s=1.0, partition_size=1000, reply_s=11.0)
    plan = p.plan(["a", "b"])
    assert not plan.work["b"].wait  # its overhead alone is longer than the round: not waited for
    assert plan.work["a"].wait and plan.deadline_s < 10
    assert plan.work["b"].steps < before
    # it is given little enough work to arrive within MAX_STALENESS rounds
    assert plan.work["b"].predicted_s <= (p.max_staleness - 1) * plan.deadline_s


def test_a_device_long_overdue_is_not_waited_for_before_its_reply():
    p = _planner()
    _measured(p, [("a", 3000, 1.0), ("b", 3000, 1.0), ("c", 3000, 1.0)])
    first = p.plan(["a", "b", "c"])
    assert all(w.wait for w in first.work.values())
    # c missed the deadline: its overhead is at least the time it has been out minus its training
    w = first.work["c"]
    p.observe_late("c", first.deadline_s, w.steps * w.batch / 3000)
    assert p.devices["c"].overhead_s == pytest.approx(first.deadline_s - w.steps * w.batch / 3000)
    p.observe_late("c", 1.0, 0.5)  # a weaker bound changes nothing
    assert p.devices["c"].overhead_s > 1.0
    # still out after three deadlines: the round stops planning around it
    p.observe_late("c", 3 * first.deadline_s, w.steps * w.batch / 3000)
    assert not p.plan(["a", "b", "c"]).work["c"].wait


def test_a_tight_memory_limit_shrinks_the_batch_and_scales_the_lr():
    p = _planner()
    p.add_capability("small", "x", 1.0, 640 * MiB)
    p.add_capability("big", "x", 1.0, 4096 * MiB)
    w = p.plan(["small", "big"]).work
    assert w["big"].batch == 32 and w["big"].lr == pytest.approx(0.02)
    assert w["small"].batch < 32 and w["small"].lr == pytest.approx(0.02 * w["small"].batch / 32)


def test_unmeasured_devices_get_the_fleet_per_cpu_figures():
    p = _planner()
    p.add_capability("a", "x", 1.0, None)
    p.observe("a", samples=1000, train_s=0.5, partition_size=5000, reply_s=1.5)  # 2000 sps, 1 s overhead
    p.add_capability("new", "x", 0.5, None)
    plan = p.plan(["a", "new"])
    # half the CPU: half the throughput and twice the overhead, so fewer steps
    assert plan.work["new"].steps < plan.work["a"].steps
    assert plan.work["new"].predicted_s == pytest.approx(plan.round_s, rel=0.1)


# -- a real run -----------------------------------------------------------------


def _quota(run: RunRecord, device: str) -> float | None:
    cg = run.state().get("cgroups", {}).get(device)
    return DeviceCgroup.from_state(cg).read_limits()["cpus"] if cg else None


@pytest.mark.e2e
def test_auto_does_not_wait_for_a_device_throttled_mid_run(job_file, tmp_path):
    job = job_file(
        rounds=3,
        train={"batch_size": 32, "lr": 0.02, "local_epochs": 1},
        heterogeneity={"policy": "auto", "throttle": [{"device": "dev-3", "at_round": 2, "cpus": 0.1}]},
        devices=[{"name": "dev", "count": 3, "cpus": 1.0, "memory": "1g"}],
    )
    proc = subprocess.Popen(FLOTILLA + ["run", str(job), "--json"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    quotas: list[tuple[int, float | None]] = []  # (rounds complete, dev-3's CPU quota read from its cgroup)
    try:
        while not list(runs.glob("*/state.json")) and proc.poll() is None:
            time.sleep(0.2)
        run = RunRecord(next(runs.glob("*/state.json")).parent)
        throttler = Throttler(run)
        while proc.poll() is None:
            throttler.tick()
            if "dev-3" in run.state().get("cgroups", {}):
                try:
                    quotas.append((len(run.rounds()) - 1, _quota(run, "dev-3")))
                except Exception:  # noqa: BLE001 - the group goes away at teardown
                    pass
            time.sleep(0.25)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    s = json.loads(out.strip().splitlines()[-1])
    assert s["status"] == "completed" and len(s["rounds"]) == 3 and s["limits_enforced"]

    # the limit was really rewritten: 1.0 CPU during round 1, 0.1 from round 2 on
    assert (0, 1.0) in [(r, q) for r, q in quotas if r == 0]
    assert any(q == pytest.approx(0.1) for r, q in quotas if r >= 1)
    [step] = {json.dumps(r["applied"]) for r in read_jsonl(run.dir / "throttle.jsonl")}
    assert json.loads(step)["cpus"] == pytest.approx(0.1)

    rounds = {r["round"]: r for r in run.rounds()}
    dev3 = {n: next(d for d in rounds[n]["devices"] if d["name"] == "dev-3") for n in (1, 2, 3)}
    assert dev3[1]["status"] == "ok"  # round 1 measures everyone at full speed
    for n in (2, 3):
        assert rounds[n]["deadline_s"] is not None
        # the round ended at its deadline, without dev-3's full work: then aggregation and evaluation, which
        # took 3.5 s past a 10 s deadline during a full test run on this 2-core machine
        assert rounds[n]["wall_s"] < rounds[n]["deadline_s"] + max(3.0, 0.6 * rounds[n]["deadline_s"])
        # not waited for with its full work: cut at the deadline, left running, or (on a machine so busy that every
        # device is slow and the deadline long) its work resized to its new speed and done in time
        resized = dev3[n]["status"] == "ok" and dev3[n].get("steps", 0) <= 0.5 * dev3[1]["steps"]
        assert dev3[n]["status"] in ("late", "partial", "busy", "async") or resized, dev3[n]
        others = [d for d in rounds[n]["devices"] if d["name"] != "dev-3"]
        # the others' work reached the model this round: fresh, partial, or a late (stale) update
        assert any(d["status"] in ("ok", "partial", "stale") and d["steps"] > 0 for d in others), others
    # dev-3's full round-1 work at a tenth of the CPU takes ~10x its round-1 time; rounds 2-3 took far less
    full_work_at_tenth = 10 * (dev3[1]["reply_s"])
    assert max(rounds[2]["wall_s"], rounds[3]["wall_s"]) < 0.6 * full_work_at_tenth
    assert rounds[3]["accuracy"] > 0.8

    assert processes_of(run.dir) == []
    assert cgroups_of(run.run_id) == []
