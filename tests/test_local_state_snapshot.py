"""The local target's read-only view of a run's state: parsed once per change of state.json, never stale."""

from flotilla.runs import RunRecord
from flotilla.targets.local import LocalTarget


def test_the_snapshot_follows_every_write_and_is_reused_between_them(tmp_path):
    run = RunRecord(tmp_path)
    target = LocalTarget()
    assert target._state_snapshot(run) == {}  # no state yet
    run.write_state(groups={"dev-1": 100})
    first = target._state_snapshot(run)
    assert first == {"groups": {"dev-1": 100}}
    assert target._state_snapshot(run) is first  # unchanged file: not parsed again
    run.write_state(groups={"dev-1": 101})  # a restarted device: a new process group
    assert target._state_snapshot(run)["groups"] == {"dev-1": 101}
