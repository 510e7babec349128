"""Faults injected into real runs on the local target: each is noticed in seconds, recovered, nothing left.

Detection is measured from the injection (faults.jsonl) to the driver noticing
(recovery.jsonl); bounds are generous: the machine is shared and busy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FLOTILLA, cgroups_of, flotilla, processes_of, wait_until
from flotilla.runs import find_run, read_jsonl

pytestmark = pytest.mark.e2e

DEVICES = [{"name": "dev", "count": 3, "cpus": 1.0, "memory": "1g"}]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run_with_faults(job_file, tmp_path, faults, rounds=6, **over):
    job = job_file(rounds=rounds, devices=DEVICES, faults=faults, **over)
    res = flotilla("run", job, "--json", cwd=tmp_path, timeout=900)
    s = last_json(res.stdout)
    run = find_run(tmp_path / "runs", s["run_id"])
    return res, s, run


def detections(run) -> list[tuple[dict, dict]]:
    """(fault, the driver's first event after it) pairs."""
    faults = [f for f in read_jsonl(run.dir / "faults.jsonl") if "error" not in f]
    events = read_jsonl(run.dir / "recovery.jsonl")
    out = []
    for f in faults:
        after = [e for e in events if e["t"] >= f["t"] and e["event"].endswith("_down")]
        out.append((f, after[0] if after else None))
    return out


def test_serverapp_and_superlink_killed_mid_run_the_run_resumes_and_completes(job_file, tmp_path):
    res, s, run = run_with_faults(job_file, tmp_path, [{"at_round": 2, "kill": "serverapp"},
                                                       {"at_round": 4, "kill": "superlink"}])
    assert res.returncode == 0, res.stderr[-3000:]
    assert s["status"] == "completed" and [r["round"] for r in s["rounds"]] == [1, 2, 3, 4, 5, 6]
    assert [r["what"] for r in s["recoveries"]] == ["serverapp", "superlink"]
    for fault, seen in detections(run):
        assert seen is not None, fault
        assert seen["t"] - fault["t"] < 5.0, (fault, seen)  # the heartbeat / the process, not a 30 s poll
    # at most the round in flight is lost: each resumes from the round before the fault's
    for rec, fault in zip(s["recoveries"], [2, 4]):
        assert rec["from_round"] >= fault - 1
    assert s["final_accuracy"] > 0.9
    assert processes_of(run.dir) == [] and cgroups_of(s["run_id"]) == []


# Rounds of this job take ~1 s here; a restarted device needs several seconds (a fresh Python importing flwr and
# torch) before it trains again, and the killed driver's fleet goes on for the lease's 10 s: enough rounds that
# neither run ends first, on a busy machine too.
MANY_ROUNDS = 40


def test_a_hung_device_is_noticed_restarted_and_trained_again(job_file, tmp_path):
    res, s, run = run_with_faults(job_file, tmp_path, [{"at_round": 2, "pause": "dev-2"}], rounds=MANY_ROUNDS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert s["status"] == "completed" and len(s["rounds"]) == MANY_ROUNDS and s["lost_devices"] == []
    fault = read_jsonl(run.dir / "faults.jsonl")[0]
    events = read_jsonl(run.dir / "recovery.jsonl")
    down = next(e for e in events if e["event"] == "device_down" and e["device"] == "dev-2")
    assert down["stuck"] and "stopped" in down["why"]
    assert down["t"] - fault["t"] < 10.0  # by its processes' state, not Flower's 60 s heartbeat patience
    up = next(e for e in events if e["event"] == "device_restarted" and e["device"] == "dev-2")
    later = [r for r in run.rounds() if r["t_start"] > up["t"]]
    assert any(d["name"] == "dev-2" and d["status"] == "ok" for r in later for d in r["devices"]), later
    assert not any(d["name"].startswith("node-") for r in run.rounds() for d in r["devices"])
    assert processes_of(run.dir) == [] and cgroups_of(s["run_id"]) == []


def test_a_killed_driver_leaves_no_fleet_and_the_run_resumes(job_file, tmp_path):
    job = job_file(rounds=MANY_ROUNDS, devices=DEVICES)
    runs = tmp_path / "runs"
    run_id = flotilla("submit", job, cwd=tmp_path, timeout=60).stdout.strip()
    run = find_run(runs, run_id)
    wait_until(lambda: len([r for r in run.rounds() if r["round"] >= 1]) >= 2, 300, "round 2")
    os.kill(run.state()["driver_pid"], signal.SIGKILL)
    killed = time.time()
    wait_until(lambda: processes_of(run.dir) == [], 40, "the fleet to stop itself")
    assert time.time() - killed < 30  # its lease goes stale after 10 s
    wait_until(lambda: cgroups_of(run_id) == [] and not Path(run.state()["sockets_dir"]).exists(), 20,
               "the SuperLink to remove the run's cgroups and sockets")
    res = flotilla("resume", run_id, "--runs-dir", runs, "--json", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = last_json(res.stdout)
    assert s["status"] == "completed" and [r["round"] for r in s["rounds"]] == list(range(1, MANY_ROUNDS + 1))
    assert s["final_accuracy"] > 0.9
    assert processes_of(run.dir) == [] and cgroups_of(run_id) == []


def test_resume_after_flotilla_stop_continues_where_it_stopped(job_file, tmp_path):
    job = job_file(rounds=MANY_ROUNDS, devices=DEVICES)  # the stop lands before the run could end by itself
    runs = tmp_path / "runs"
    proc = subprocess.Popen(FLOTILLA + ["run", str(job), "--json"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = wait_until(lambda: next(iter(runs.glob("*/state.json")), None), 60, "the run record").parent
    run = find_run(runs, run_dir.name)
    wait_until(lambda: len([r for r in run.rounds() if r["round"] >= 1]) >= 2, 300, "round 2")
    assert flotilla("stop", run.run_id, "--runs-dir", runs, timeout=120).returncode == 0
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and run.state()["status"] == "stopped"
    done = max(r["round"] for r in run.rounds())
    res = flotilla("resume", run.run_id, "--runs-dir", runs, "--json", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = last_json(res.stdout)
    assert s["status"] == "completed" and [r["round"] for r in s["rounds"]] == list(range(1, MANY_ROUNDS + 1))
    assert f"resuming after round {done}" in res.stderr or f"resuming after round {done - 1}" in res.stderr
    assert processes_of(run.dir) == [] and cgroups_of(run.run_id) == []


def test_resume_refuses_what_it_cannot_do(job_file, tmp_path):
    from pathlib import Path

    app = Path(__file__).parent / "apps" / "msg_numpy"
    job = job_file(rounds=2, app=str(app), devices=DEVICES)
    res = flotilla("run", job, "--json", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    s = last_json(res.stdout)
    assert (find_run(tmp_path / "runs", s["run_id"]).dir / "checkpoint.json").exists()  # observed, every round
    res = flotilla("resume", s["run_id"], "--runs-dir", tmp_path / "runs", cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and "uses no Flotilla strategy" in res.stderr and "Traceback" not in res.stderr
