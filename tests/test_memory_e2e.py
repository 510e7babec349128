"""An app that needs more memory than a device class has, on the example job's fleet (real Flower processes).

tests/apps/hungry_numpy holds `work-mib` MiB in every training step. At 600 MiB
the `pi` class (768m) cannot hold one message, the `server` class (1g) can.
Before round 1 Flotilla measures one message per class and says so (or
refuses, by default); during the run the pi devices' ClientApps are OOM-killed
on every message, and each such message is answered at once with Flower's
error reply, so rounds last as long as the healthy devices take (Flower alone
waits ~60 s per round for a heartbeat to expire). The outcome names the
devices that never trained and marks the run degraded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import cgroups_of, flotilla, processes_of
from flotilla.runs import find_run

APPS = Path(__file__).parent / "apps"
FLEET = [{"name": "server", "count": 2, "cpus": 1.0, "memory": "1g"},
         {"name": "pi", "count": 2, "cpus": 0.5, "memory": "768m"}]
# Flower answers a dead ClientApp's message when its task heartbeat expires: rounds of ~60 s were measured
# without Flotilla's answer (FLOTILLA_ANSWER_DEAD_CLIENTAPPS=0). Rounds here must end long before that.
ROUND_SLACK_S = 20.0

pytestmark = pytest.mark.e2e


def _job(tmp_path: Path, app: str = "hungry_numpy", **over) -> Path:
    doc = {"name": app.replace("_", "-"), "app": str(APPS / app), "rounds": 3, "strategy": {"min_devices": 2},
           "devices": FLEET, "local": {"fit_cpus": True}, "runs_dir": str(tmp_path / "runs")}
    doc.update(over)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(tmp_path: Path, code: int, **over) -> tuple[dict, object, str]:
    res = flotilla("run", _job(tmp_path, **over), "--json", timeout=900)
    assert res.returncode == code, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    run = find_run(tmp_path / "runs", summary["run_id"])
    assert processes_of(run.dir) == []
    assert cgroups_of(summary["run_id"]) == []
    return summary, run, res.stderr


def _check_rounds_do_not_wait_for_the_killed(run, summary: dict) -> None:
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] >= 1]
    assert len(rounds) == 3
    for r in rounds:
        by_class = {}
        for d in r["devices"]:
            by_class.setdefault(d["class"], []).append(d)
        assert {d["status"] for d in by_class["pi"]} == {"failed"}, r
        assert all("memory limit (768 MiB)" in d["error"] for d in by_class["pi"]), r
        assert {d["status"] for d in by_class["server"]} == {"ok"}, r
        healthy = max(d["reply_s"] for d in by_class["server"])
        assert r["wall_s"] <= healthy + ROUND_SLACK_S, (r["wall_s"], healthy)
    assert summary["degraded"] is True
    assert set(summary["untrained_devices"]) == {"pi-1", "pi-2"}
    assert all("memory limit" in why for why in summary["untrained_devices"].values())
    (warning,) = summary["warnings"]
    assert warning.startswith("class pi: none of its 2 devices trained in 3 rounds") and "devices[1].memory" in warning
    page = (run.dir / "report" / "index.html").read_text()
    assert "completed, degraded" in page and "<strong>Degraded:</strong> class pi: none of its 2 devices" in page


@pytest.mark.parametrize("loop", ["strategy", "own"])
def test_devices_that_cannot_hold_a_message_cost_seconds_and_are_named(tmp_path, loop):
    summary, run, err = _run(tmp_path, 0, memory_check="note",
                             app_config={"work-mib": 600, "server-loop": loop})
    assert summary["status"] == "completed"
    note = next(n for n in summary["notes"] if n.startswith("pi: this app needs"))
    assert "measured" in note and "the class has 768m: its 2 devices will fail every message" in note, note
    assert "raise devices[1].memory to" in note
    assert not any(n.startswith("server:") for n in summary["notes"])  # the server class holds it
    assert "flotilla: note: pi: this app needs" in err  # said before round 1, as it was measured
    _check_rounds_do_not_wait_for_the_killed(run, summary)


def test_a_class_that_cannot_hold_a_message_is_refused_before_round_1(tmp_path):
    summary, run, err = _run(tmp_path, 2, app_config={"work-mib": 600})
    assert summary["status"] == "refused" and summary["rounds"] == []
    assert summary["error"].startswith("memory_check: pi: this app needs ~")
    assert "the class has 768m" in summary["error"] and "raise devices[1].memory to 1g" in summary["error"]
    assert "\n" not in summary["error"]
    assert not (run.dir / "metrics.jsonl").exists() or all(
        json.loads(line)["round"] < 1 for line in (run.dir / "metrics.jsonl").read_text().splitlines())
    verdict = json.loads((run.dir / "probe" / "verdict.json").read_text())
    assert verdict["refused"] and any(line.startswith("server: ") and line.endswith("the class has 1g")
                                      for line in verdict["lines"])


def test_a_fleet_that_holds_the_app_is_measured_and_runs(tmp_path):
    summary, run, _ = _run(tmp_path, 0, app_config={"work-mib": 64}, rounds=2)
    assert summary["status"] == "completed" and not summary["degraded"] and summary["untrained_devices"] == {}
    verdict = json.loads((run.dir / "probe" / "verdict.json").read_text())
    assert not verdict["refused"] and len(verdict["lines"]) == 2


def test_secure_aggregation_goes_on_without_a_killed_device(tmp_path):
    fleet = [{"name": "server", "count": 3, "cpus": 1.0, "memory": "1g"},
             {"name": "pi", "count": 1, "cpus": 0.5, "memory": "768m"}]
    summary, run, _ = _run(tmp_path, 0, app="secagg_numpy", devices=fleet, rounds=2, memory_check="note",
                           app_config={"work-mib": 600, "num-shares": 4, "reconstruction-threshold": 2})
    log = (run.dir / "logs" / "serverapp.log").read_text()
    assert "Insufficient available nodes" not in log, log[-3000:]
    assert summary["untrained_devices"].keys() == {"pi-1"}
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["round"] >= 1] == [1, 2]
    assert all(r["wall_s"] < 60 for r in rows if r["round"] >= 1), [r["wall_s"] for r in rows]


def test_devices_that_import_everything_themselves_fail_the_same_way(tmp_path):
    """The shared fleet holds each device as if its processes held their own copies: the unshared layout (every
    process a Python of its own) fails the same class and no other."""
    summary, run, _ = _run(tmp_path, 0, app_config={"work-mib": 600}, local={"fit_cpus": True, "shared": False})
    _check_rounds_do_not_wait_for_the_killed(run, summary)
