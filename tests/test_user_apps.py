"""Apps Flotilla did not write, run through `flotilla run` on the local target, unchanged.

tests/apps/ holds six small Flower Apps of the kinds users bring (Message API
and legacy API, NumPy, PyTorch, scikit-learn, an app that fixes its own
rounds, one whose accuracy metric has another name). Each must complete with
every round recorded per device (times, bytes, the reply's own metrics), its
run config typed as it declares, its output files in the record, and nothing
left running.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import cgroups_of, flotilla, processes_of
from flotilla.runs import find_run

APPS = Path(__file__).parent / "apps"

pytestmark = pytest.mark.e2e


def write_job(tmp_path: Path, app: str, **over) -> Path:
    doc = {
        "name": app.replace("_", "-"),
        "app": f"apps/{app}",  # relative: taken from the job file's folder
        "rounds": 2,
        "strategy": {"min_devices": 2},
        "devices": [{"name": "dev", "count": 2, "cpus": 1.0, "memory": "1g"}],
        "runs_dir": "runs",
    }
    doc.update(over)
    (tmp_path / "apps").mkdir(exist_ok=True)
    if not (tmp_path / "apps" / app).exists():
        (tmp_path / "apps" / app).symlink_to(APPS / app)
    path = tmp_path / f"{app}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_app(tmp_path: Path, app: str, **over) -> tuple[dict, object]:
    job = write_job(tmp_path, app, **over)
    # from another directory: relative paths in the job are the job file's, not the shell's
    res = flotilla("run", job, "--json", cwd="/", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    run = find_run(tmp_path / "runs", summary["run_id"])
    assert processes_of(run.dir) == []
    assert cgroups_of(summary["run_id"]) == []
    return summary, run


def check_rounds(run, n: int, devices=("dev-1", "dev-2")) -> list[dict]:
    rounds = [r for r in run.rounds() if r["round"] >= 1]
    assert [r["round"] for r in rounds] == list(range(1, n + 1))
    for r in rounds:
        rows = {d["name"]: d for d in r["devices"]}
        assert set(rows) == set(devices), r
        for d in rows.values():
            assert d["status"] == "ok"
            assert d["compute_s"] > 0 and d["reply_s"] >= d["compute_s"]
            assert d["bytes_down"] > 0 and d["bytes_up"] > 0  # model arrays both ways
            assert "train_loss" in d["metrics"] and d["metrics"]["num-examples"] > 0
        assert r["wall_s"] > 0 and r["t_end"] >= r["t_start"]
    return rounds


@pytest.mark.parametrize("app", ["msg_numpy", "legacy_numpy"])
def test_numpy_apps_message_and_legacy_api(tmp_path, app):
    s, run = run_app(tmp_path, app)
    assert s["status"] == "completed" and s["rounds_target"] == 2
    rounds = check_rounds(run, 2)
    # both evaluate centrally: accuracy is the server's, every round, and it learns (chance is 0.1)
    assert all(r["accuracy_source"] == "server" for r in rounds)
    assert s["final_accuracy"] > 0.5
    assert "accuracy" in s["metrics_seen"]["server"]
    assert (run.dir / "weights.npz").stat().st_size > 1000  # the global model, observed
    assert run.log_path("serverapp").stat().st_size > 0
    devices = {d["name"]: d for d in s["devices"]}
    assert all(devices[n]["train_s"] > 0 for n in ("dev-1", "dev-2"))


def test_pytorch_quickstart_with_client_evaluation_and_its_own_output_file(tmp_path):
    s, run = run_app(tmp_path, "torch_quickstart")
    assert s["status"] == "completed"
    rounds = check_rounds(run, 2)
    for r in rounds:  # no central evaluation: accuracy is FedAvg's weighted mean of the clients' evaluate replies
        assert r["accuracy_source"] == "evaluate"
        assert all(d["evaluate"]["status"] == "ok" and "accuracy" in d["evaluate"]["metrics"] for d in r["devices"])
    assert s["final_accuracy"] > 0.3
    assert "serverapp/final_model.pt" in s["outputs"]  # written by the app to its working directory
    assert (run.dir / "outputs" / "serverapp" / "final_model.pt").stat().st_size > 1000
    # the run's warm process (every device's processes fork from it) and a device
    log = run.log_path("zygote").read_text() + run.log_path("dev-1").read_text()
    assert "preloaded ClientApp module torchquickstart.client" in log  # no Flotilla trainer; the app's own code
    assert "trainer ready" not in log


def test_sklearn_app_gets_its_int_config_as_int(tmp_path):
    # the job sets local_epochs (a float field in the job file); the app declares an int and gets an int
    s, run = run_app(tmp_path, "sklearn_ints", train={"local_epochs": 2})
    assert s["status"] == "completed"  # LogisticRegression(max_iter=2.0) would have failed every reply
    assert "local-epochs = 2\n" in (run.dir / "run_config.toml").read_text()
    check_rounds(run, 2)
    assert s["final_accuracy"] > 0.5


def test_sklearn_app_config_of_the_wrong_type_is_refused_before_anything_starts(tmp_path):
    job = write_job(tmp_path, "sklearn_ints", app_config={"local-epochs": 1.5})
    res = flotilla("run", job, "--json", cwd="/", timeout=120)
    assert res.returncode == 2
    assert "app_config.local-epochs" in res.stderr and "declares local-epochs as int" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()
    job = write_job(tmp_path, "sklearn_ints", app_config={"no-such-key": 1})
    res = flotilla("validate", job)
    assert res.returncode == 2 and "does not declare 'no-such-key'" in res.stderr


def test_an_app_that_fixes_its_own_rounds_reports_the_rounds_it_ran(tmp_path):
    s, run = run_app(tmp_path, "fixed_rounds", rounds=2)
    assert s["status"] == "completed"
    assert s["rounds_target"] is None
    check_rounds(run, 3)  # the app's own 3, not the job's 2
    assert any("rounds: not applied" in n for n in s["notes"])
    assert not (run.dir / "run_config.toml").exists()  # nothing the app declares was set: nothing sent


def test_accuracy_named_otherwise_and_client_files_in_the_record(tmp_path):
    s, run = run_app(tmp_path, "other_metric", metrics={"accuracy": "eval_acc", "loss": "eval_loss"})
    assert s["status"] == "completed" and s["accuracy_metric"] == "eval_acc"
    rounds = check_rounds(run, 2)
    assert all(r["accuracy"] is not None and r["loss"] is not None for r in rounds)
    assert s["final_accuracy"] > 0.3
    for dev in ("dev-1", "dev-2"):  # the ClientApp appends a line per round in its working directory
        lines = (run.dir / "outputs" / dev / "client_rounds.txt").read_text().splitlines()
        assert len(lines) == 2
    # the same app without the mapping still completes, and says which metrics it saw
    s, _ = run_app(tmp_path, "other_metric", name="other-metric-unmapped")
    assert s["status"] == "completed" and s["final_accuracy"] is None
    note = next(n for n in s["notes"] if "no metric named 'accuracy'" in n)
    assert "eval_acc" in note and "metrics.accuracy" in note


def test_a_failing_app_is_failed_with_its_own_error(tmp_path):
    """A run Flower reports failed is failed, and the message quotes the app's exception."""
    s_job = write_job(tmp_path, "sklearn_ints", app_config={"reg-c": -1.0})  # LogisticRegression(C=-1) raises
    res = flotilla("run", s_job, "--json", cwd="/", timeout=600)
    assert res.returncode == 1
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["status"] == "failed"
    assert "ServerApp raised" in s["error"] or "ClientApp on dev-" in s["error"]
    assert "InvalidParameterError" in s["error"] or "RuntimeError" in s["error"], s["error"]
    run = find_run(tmp_path / "runs", s["run_id"])
    assert processes_of(run.dir) == []
