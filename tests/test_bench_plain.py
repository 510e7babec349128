"""The benchmark's plain-Flower reference fleet runs for real and leaves nothing behind."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from run_plain import _leftover_processes, run_app, start_plain_fleet, stop_fleet  # noqa: E402

pytestmark = pytest.mark.e2e


def test_noop_floor_app_runs_one_round(tmp_path):
    fleet = start_plain_fleet(2, tmp_path / "fleet")
    try:
        rounds = run_app(fleet, "noop", 1, tmp_path / "out")
    finally:
        stop_fleet(fleet)
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["wall_s"] > 0 and rounds[0]["slowest_train_s"] == 0.0
    assert {d["name"] for d in rounds[0]["devices"]} == {"dev-0", "dev-1"}
    assert _leftover_processes(fleet) == []
