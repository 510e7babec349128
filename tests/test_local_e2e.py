"""The local target for real: flower-superlink, SuperNodes, trainers, cgroups; then nothing left."""

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FLOTILLA, cgroups_of, flotilla, processes_of, wait_until
from flotilla.runs import find_run, read_jsonl

pytestmark = pytest.mark.e2e


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_run_two_devices_two_rounds(job_file, tmp_path, shared):
    res = flotilla("run", job_file(local={"shared": shared}), "--json", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = last_json(res.stdout)
    assert s["status"] == "completed" and s["error"] is None
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    assert s["final_accuracy"] > 0.6  # chance is 0.1
    assert {d["name"] for d in s["devices"]} == {"dev-1", "dev-2"}
    assert all(d["train_s"] > 0 for d in s["devices"])

    run = find_run(tmp_path / "runs", s["run_id"])
    rounds = run.rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert {d["name"] for d in r["devices"]} == {"dev-1", "dev-2"}
        assert all(d["samples"] > 0 and d["train_s"] > 0 for d in r["devices"])
        assert r["wall_s"] >= max(d["train_s"] for d in r["devices"])
    assert (run.dir / "weights.npz").stat().st_size > 10_000
    for name in ("superlink", "dev-1", "dev-2", "serverapp"):
        assert run.log_path(name).stat().st_size > 0, name
    caps = {c["name"]: c for c in run.device_reports() if "round" not in c}
    assert set(caps) == {"dev-1", "dev-2"}
    assert all(c["partition_size"] > 0 for c in caps.values())
    # reported by the devices as they started (no query message), and the app ran once the fleet was connected
    assert not [m for m in read_jsonl(run.dir / "messages.jsonl") if m.get("type") == "query"]
    server_log = run.log_path("serverapp").read_text()
    assert "the fleet is connected; the app starts" in server_log and "could not hold" not in server_log
    assert json.loads((run.dir / "fleet_connected.json").read_text())["connected"] == 2
    if s["limits_enforced"]:
        assert caps["dev-1"]["cpus"] == pytest.approx(1.0) and caps["dev-1"]["memory"] == 2**30
    assert (run.dir / "report" / "index.html").exists()
    if s["limits_enforced"]:  # per-device CPU and memory read from the cgroups during the run
        usage = [json.loads(line) for line in (run.dir / "usage.jsonl").read_text().splitlines()]
        assert {u["device"] for u in usage} == {"dev-1", "dev-2"}
        assert max(u["cpu_seconds_total"] for u in usage) > 0 and max(u["memory_bytes"] for u in usage) > 50e6

    st = flotilla("status", s["run_id"], "--runs-dir", tmp_path / "runs", "--json")
    assert json.loads(st.stdout)["status"] == "completed"
    lg = flotilla("logs", s["run_id"], "--device", "dev-1", "--runs-dir", tmp_path / "runs")
    assert "flotilla device dev-1: started" in lg.stdout
    # ClientApps were forks of the warm process (the run's zygote where shared), and every latency patch applied
    # (none fell back)
    assert ("ClientApps start as forks of this SuperExec (a fork of the run's zygote)" if shared else
            "ClientApps start as forks of a warm process") in lg.stdout
    assert "as shipped" not in lg.stdout and "starting flwr-clientapp instead" not in lg.stdout
    for log in (lg.stdout, run.log_path("superlink").read_text()):
        assert "request of its own" not in log and "HTTP/1.1\" 404" not in log  # objects moved in batches

    assert processes_of(run.dir) == []
    assert cgroups_of(s["run_id"]) == []
    assert not Path(run.state()["sockets_dir"]).exists()  # the devices' sockets went with them


def test_devices_that_did_not_report_their_capability_are_asked_by_query(job_file, tmp_path):
    res = flotilla("run", job_file(rounds=1), "--json", cwd=tmp_path, timeout=600,
                   env=os.environ | {"FLOTILLA_QUERY_CAPABILITIES": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    run = find_run(tmp_path / "runs", last_json(res.stdout)["run_id"])
    queries = [m for m in read_jsonl(run.dir / "messages.jsonl") if m.get("type") == "query"]
    assert {m["name"] for m in queries if m["event"] == "reply"} == {"dev-1", "dev-2"}
    caps = {c["name"]: c for c in run.device_reports() if "round" not in c}
    assert set(caps) == {"dev-1", "dev-2"} and all(c["partition_size"] > 0 for c in caps.values())
    assert processes_of(run.dir) == []


def test_submit_status_stop_from_another_terminal(job_file, tmp_path):
    job = job_file(rounds=50)
    runs = tmp_path / "runs"
    res = flotilla("submit", job, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.strip()
    run = find_run(runs, run_id)
    wait_until(lambda: len(run.rounds()) >= 2, 300, "round 1 to finish")
    st = json.loads(flotilla("status", run_id, "--runs-dir", runs, "--json").stdout)
    assert st["status"] == "running" and st["round"] >= 1
    assert flotilla("logs", run_id, "--runs-dir", runs).stdout  # the ServerApp log, while running
    assert processes_of(run.dir)  # it really runs

    res = flotilla("stop", run_id, "--runs-dir", runs, timeout=120)
    assert res.returncode == 0 and "stopped" in res.stdout, res.stdout + res.stderr
    assert run.state()["status"] == "stopped"
    assert run.summary()["status"] == "stopped"
    wait_until(lambda: processes_of(run.dir) == [], 15, "processes to go")
    assert cgroups_of(run_id) == []


def test_ctrl_c_cleans_up(job_file, tmp_path):
    proc = subprocess.Popen(FLOTILLA + ["run", str(job_file(rounds=50)), "--json"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    run = wait_until(lambda: next(iter(runs.glob("*/state.json")), None), 60, "the run record").parent
    wait_until(lambda: (run / "metrics.jsonl").exists(), 300, "round 0")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130  # stopped (0 completed, 1 failed, 2 bad input)
    s = last_json(out)
    assert s["status"] == "stopped" and "SIGINT" in s["error"]
    assert processes_of(run) == []
    assert cgroups_of(run.name) == []


def _kill_after_round_1(job, tmp_path, victim_name: str):
    proc = subprocess.Popen(FLOTILLA + ["run", str(job), "--json"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    run_dir = wait_until(lambda: next(iter(runs.glob("*/state.json")), None), 60, "the run record").parent
    wait_until(lambda: len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
               if (run_dir / "metrics.jsonl").exists() else False, 300, "round 1")
    victim = json.loads((run_dir / "state.json").read_text())["groups"][victim_name]
    killed_at = time.time()
    os.killpg(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    return proc, out, err, run_dir, killed_at


def test_a_killed_device_is_restarted_and_trained_again(job_file, tmp_path):
    # A restarted device rejoins once its processes have started again: 8-13 s measured while the other
    # two train on this 2-core machine; 40 short rounds (~0.5-1 s each now) leave it ~2-3x that on a busier one.
    job = job_file(rounds=40, devices=[{"name": "dev", "count": 3, "cpus": 1.0, "memory": "1g"}],
                   train={"batch_size": 32, "lr": 0.02, "local_epochs": 0.3})
    proc, out, err, run_dir, killed_at = _kill_after_round_1(job, tmp_path, "dev-3")
    assert proc.returncode == 0, err[-3000:]
    s = last_json(out)
    assert s["status"] == "completed" and s["lost_devices"] == [] and len(s["rounds"]) == 40
    assert "device dev-3 exited: killed by SIGKILL" in err and "restarting it" in err
    events = [json.loads(line) for line in (run_dir / "recovery.jsonl").read_text().splitlines()]
    down = next(e for e in events if e["event"] == "device_down" and e["device"] == "dev-3")
    up = next(e for e in events if e["event"] == "device_restarted" and e["device"] == "dev-3")
    assert down["t"] - killed_at < 10  # noticed in seconds (its process is watched), not Flower's 60 s
    assert up["t"] > down["t"]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained_after = [r["round"] for r in rounds if r["t_start"] > up["t"]
                     and any(d["name"] == "dev-3" and d["status"] == "ok" for d in r["devices"])]
    assert trained_after, "dev-3 never trained again after its restart"
    assert processes_of(run_dir) == []


def test_without_restarts_a_dead_device_is_lost_and_the_run_goes_on(job_file, tmp_path):
    job = job_file(rounds=4, devices=[{"name": "dev", "count": 3, "cpus": 1.0, "memory": "1g"}],
                   recovery={"device_restarts": 0})
    proc, out, err, run_dir, _ = _kill_after_round_1(job, tmp_path, "dev-3")
    assert proc.returncode == 0, err[-3000:]
    s = last_json(out)
    assert s["status"] == "completed" and s["lost_devices"] == ["dev-3"]
    assert s["lost_reasons"]["dev-3"] == "killed by SIGKILL"
    assert "device dev-3 exited" in err and "lost for good" in err
    assert len(s["rounds"]) == 4
    assert processes_of(run_dir) == []


def test_fit_cpus_scales_the_fleet_to_the_cores_and_keeps_relative_speeds(job_file, tmp_path):
    from flotilla.capacity import SERVER_CPUS, machine_cores
    from flotilla.sandbox.cgroups import cgroups_available

    if not cgroups_available()[0]:
        pytest.skip("no cgroups here: limits are not enforced, so there is nothing to scale")
    # 4 devices of half the machine and 2 of an eighth declare 2.25x its cores: shared, every busy device
    # would get about the same (on 2 cores ~0.4 CPU, fast or slow); scaled to fit, the slow ones must
    # stay about 4x slower, as declared
    cores = machine_cores()
    fast, slow = cores / 2, cores / 8
    devices = [{"name": "fast", "count": 4, "cpus": fast, "memory": "1g"},
               {"name": "slow", "count": 2, "cpus": slow, "memory": "1g"}]
    res = flotilla("run", job_file(devices=devices, local={"shared": True, "fit_cpus": True}), "--json",
                   cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = last_json(res.stdout)
    assert s["status"] == "completed" and s["error"] is None
    scale = (cores - SERVER_CPUS) / (4 * fast + 2 * slow)
    run = find_run(tmp_path / "runs", s["run_id"])
    assert run.state()["cpu_scale"] == pytest.approx(scale)
    assert any(n.startswith(f"devices: CPU limits scaled by {scale:.3g}") for n in s["notes"]), s["notes"]
    caps = {c["name"]: c for c in run.device_reports() if "round" not in c}  # each read its limit from the kernel
    assert caps["fast-1"]["cpus"] == pytest.approx(fast * scale, rel=0.01)
    assert caps["slow-2"]["cpus"] == pytest.approx(slow * scale, rel=0.01)
    train = {c: [d["train_s"] for r in run.rounds()[1:] for d in r["devices"] if d["class"] == c and d["train_s"]]
             for c in ("fast", "slow")}
    ratio = statistics.median(train["slow"]) / statistics.median(train["fast"])
    assert ratio >= 2.5, f"slow devices trained only {ratio:.2f}x as long as fast ones (declared 4x): {train}"
    assert processes_of(run.dir) == [] and cgroups_of(s["run_id"]) == []
