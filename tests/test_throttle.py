"""Live throttling: the schedule (at_s / at_round, once only) and `throttle_now`, against a real cgroup."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from flotilla.job import ThrottleStep
from flotilla.runs import RunRecord, append_jsonl, read_jsonl
from flotilla.sandbox.cgroups import DeviceCgroup, cgroups_available, cleanup_run, group_name, run_prefix
from flotilla.throttle import JsonlTail, ThrottleError, Throttler, step_due, throttle_now

MiB = 1024**2
_ok, _reason = cgroups_available() if os.geteuid() == 0 else (False, "not root")
real = pytest.mark.skipif(not _ok, reason=f"cgroups not writable here: {_reason}")


@pytest.fixture
def run(tmp_path):
    """A running run record whose device dev-1 is a sleeping process in its own cgroup (cpus 1.0, 512m)."""
    run_id = f"throttle-test-{os.getpid()}-{secrets.token_hex(3)}"
    rec = RunRecord.create(tmp_path / "runs", run_id, {"name": "t"}, {"devices": [{"name": "dev-1"}, {"name": "dev-2"}]})
    cg = DeviceCgroup.create(group_name(run_id, "dev-1"), 1.0, 512 * MiB)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=cg.enter)
    rec.write_state(status="running", driver_pid=os.getpid(), devices=["dev-1", "dev-2"], limits_enforced=True,
                    cgroups={"dev-1": cg.to_state()}, groups={"dev-1": child.pid})
    yield rec, cg
    child.kill()
    child.wait()
    cleanup_run(run_prefix(run_id))


def quota_us(cg: DeviceCgroup) -> int:
    """What the kernel enforces, read from the files (v1 cpu.cfs_quota_us, v2 cpu.max)."""
    if cg.version == 1:
        return int((cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text())
    q = (cg.dirs["unified"] / "cpu.max").read_text().split()[0]
    return -1 if q == "max" else int(q)


def start_round(rec: RunRecord, rnd: int, t: float) -> None:
    append_jsonl(rec.dir / "round_starts.jsonl", {"round": rnd, "t_start": t})


# -- pure schedule logic -------------------------------------------------------


def test_at_s_counts_from_the_start_of_round_1():
    step = ThrottleStep(device="d-1", at_s=10, cpus=0.1)
    assert not step_due(step, now=1000.0, t_round1=None, started=0, completed=0)  # round 1 not started
    assert not step_due(step, now=1009.9, t_round1=1000.0, started=1, completed=0)
    assert step_due(step, now=1010.0, t_round1=1000.0, started=1, completed=0)


def test_at_round_is_due_when_the_previous_round_is_complete_or_the_round_started():
    step = ThrottleStep(device="d-1", at_round=3, cpus=0.1)
    assert not step_due(step, now=0, t_round1=0, started=2, completed=1)
    assert step_due(step, now=0, t_round1=0, started=2, completed=2)  # round 2 done: round 3 is next
    assert step_due(step, now=0, t_round1=0, started=3, completed=1)
    first = ThrottleStep(device="d-1", at_round=1, cpus=0.1)
    assert not step_due(first, now=0, t_round1=None, started=0, completed=-1)
    assert step_due(first, now=0, t_round1=None, started=0, completed=0)  # initial evaluation done


def test_tail_reads_only_complete_new_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    tail = JsonlTail(p)
    assert tail.read_new() == []  # no file yet
    p.write_text('{"round": 0}\n{"round": 1')
    assert tail.read_new() == [{"round": 0}]
    with open(p, "a") as fh:
        fh.write(', "x": 2}\n')
    assert tail.read_new() == [{"round": 1, "x": 2}]
    assert tail.read_new() == []


# -- against a real cgroup -----------------------------------------------------


@real
def test_schedule_rewrites_the_cgroup_once_per_step(run):
    rec, cg = run
    steps = [ThrottleStep(device="dev-1", at_round=2, cpus=0.25),
             ThrottleStep(device="dev-1", at_s=30, cpus=0.5, memory="256m")]
    th = Throttler(rec, steps)
    assert quota_us(cg) == 100_000
    assert th.tick() == []  # nothing started yet
    t0 = time.time()
    start_round(rec, 1, t0)
    assert th.tick(now=t0 + 1) == []
    start_round(rec, 2, t0 + 5)
    [applied] = th.tick(now=t0 + 6)
    assert applied["step"] == 0 and applied["round"] == 2 and applied["applied"]["cpus"] == pytest.approx(0.25)
    assert quota_us(cg) == 25_000
    assert th.tick(now=t0 + 7) == []  # applied once
    [second] = th.tick(now=t0 + 31)
    assert second["step"] == 1 and quota_us(cg) == 50_000
    assert cg.read_limits()["memory"] == 256 * MiB

    records = read_jsonl(rec.dir / "throttle.jsonl")
    assert [(r["device"], r["cpus"], r["source"]) for r in records] == [("dev-1", 0.25, "schedule"),
                                                                        ("dev-1", 0.5, "schedule")]
    # a restarted driver reads the record and does not apply the steps again
    cg.set_limits(cpus=1.0)
    again = Throttler(rec, steps)
    assert again.tick(now=t0 + 60) == [] and quota_us(cg) == 100_000


@real
def test_schedule_reads_the_steps_from_the_run_job_file(run):
    rec, cg = run
    job = {"name": "t", "devices": [{"name": "dev", "count": 2, "cpus": 1.0}],
           "heterogeneity": {"policy": "auto", "throttle": [{"device": "dev-1", "at_round": 1, "cpus": 0.2}]}}
    (rec.dir / "job.yaml").write_text(json.dumps(job))
    th = Throttler(rec)
    append_jsonl(rec.metrics_path, {"round": 0, "t_start": time.time(), "devices": []})
    [applied] = th.tick()
    assert applied["applied"]["cpus"] == pytest.approx(0.2) and quota_us(cg) == 20_000


@real
def test_a_step_for_a_device_without_a_cgroup_is_recorded_as_an_error_not_raised(run, capsys):
    rec, cg = run
    th = Throttler(rec, [ThrottleStep(device="dev-2", at_round=1, cpus=0.2)])
    append_jsonl(rec.metrics_path, {"round": 0, "t_start": time.time()})
    [r] = th.tick()
    assert "dev-2" in r["error"] and "unlimited" in r["error"]
    assert "throttle schedule step 0 (dev-2)" in capsys.readouterr().err
    assert th.tick() == []  # not retried every tick


@real
def test_throttle_now_changes_a_running_device_and_records_it(run):
    rec, cg = run
    r = throttle_now(rec, "dev-1", cpus=0.1, memory="300m")
    assert quota_us(cg) == 10_000 and cg.read_limits()["memory"] == 300 * MiB
    assert r["source"] == "manual" and r["applied"] == {"cpus": pytest.approx(0.1), "memory": 300 * MiB}
    assert read_jsonl(rec.dir / "throttle.jsonl")[-1]["device"] == "dev-1"
    throttle_now(rec, "dev-1", cpus=2)
    assert quota_us(cg) == 200_000 and cg.read_limits()["memory"] == 300 * MiB  # memory left as it was


@real
def test_throttle_in_a_fleet_scaled_to_fit_applies_the_runs_factor(run):
    rec, cg = run
    rec.write_state(cpu_scale=0.25)  # local.fit_cpus scaled the fleet's limits by 0.25
    r = throttle_now(rec, "dev-1", cpus=0.2)  # the job's units, as the job and the schedule give them
    assert quota_us(cg) == 5_000 and r["applied"]["cpus"] == pytest.approx(0.05)


@real
def test_throttle_now_errors_are_one_line_and_change_nothing(run):
    rec, cg = run
    cases = [
        (dict(device="dev-9", cpus=0.5), "unknown device 'dev-9'"),
        (dict(device="dev-2", cpus=0.5), "no cgroup"),
        (dict(device="dev-1"), "give --cpus or --memory"),
        (dict(device="dev-1", cpus=0.001), "--cpus"),
        (dict(device="dev-1", memory="lots"), "--memory"),
        (dict(device="dev-1", memory="10m"), "at least 64m"),
    ]
    for kw, text in cases:
        with pytest.raises(ThrottleError, match=text.replace("-", r"\-")) as e:
            throttle_now(rec, **kw)
        assert "\n" not in str(e.value)
    assert quota_us(cg) == 100_000
    rec.write_state(status="completed")
    with pytest.raises(ThrottleError, match="is completed, not running"):
        throttle_now(rec, "dev-1", cpus=0.5)
    rec.write_state(status="running", cgroups={}, limits_enforced=False, limits_note="not root")
    with pytest.raises(ThrottleError, match=r"limits are not enforced .*\(not root\)"):
        throttle_now(rec, "dev-1", cpus=0.5)
    assert not (rec.dir / "throttle.jsonl").exists()


def test_throttle_now_refuses_a_run_whose_driver_is_gone(tmp_path):
    rec = RunRecord.create(tmp_path / "runs", "r-1", {"name": "t"}, {"devices": [{"name": "dev-1"}]})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec.write_state(status="running", driver_pid=dead.pid, devices=["dev-1"])
    with pytest.raises(ThrottleError, match="driver is gone"):
        throttle_now(rec, "dev-1", cpus=0.5)
