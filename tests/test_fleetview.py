"""Which nodes an app may use, from the run record's node files and lost-device list."""

import json

from flotilla.contracts import RecordPaths
from flotilla.runtime.fleetview import FleetView


def _node(paths: RecordPaths, device: str, node_id: int) -> None:
    paths.nodes.mkdir(parents=True, exist_ok=True)
    tmp = paths.nodes / f"{device}.json.tmp"  # as the SuperNode writes it: whole, then renamed
    tmp.write_text(json.dumps({"device": device, "class": "dev", "node_id": node_id}))
    tmp.replace(paths.nodes / f"{device}.json")


def test_a_restarted_device_s_old_node_is_stale_and_its_new_node_usable(tmp_path):
    paths = RecordPaths(tmp_path)
    _node(paths, "dev-1", 11)
    view = FleetView(paths)
    assert view.usable(11)
    _node(paths, "dev-1", 12)  # the device restarted: a new Flower node
    assert view.usable(12) and not view.usable(11)
    assert view.name_of(11) == ("dev-1", "dev")  # old incarnations keep their name for the records


def test_a_node_no_device_names_is_not_used_where_devices_write_node_files(tmp_path):
    paths = RecordPaths(tmp_path)
    _node(paths, "dev-1", 11)
    view = FleetView(paths)
    # dev-2 died and its file was removed before the ServerApp read it: Flower still lists its node
    assert view.usable(11) and not view.usable(99)


def test_without_node_files_flower_s_view_stands_and_lost_devices_are_left_out(tmp_path):
    paths = RecordPaths(tmp_path)
    view = FleetView(paths)
    view.learn(5, "pi-1", "pi")
    assert view.usable(5) and view.usable(6)
    paths.lost_devices.write_text(json.dumps(["pi-1"]))
    assert not view.usable(5) and view.usable(6)
