"""Which Flower node is which device, and which nodes an app may still use, from the run record.

Devices write nodes/<device>.json when their SuperNode registers; the driver
writes lost_devices.json (devices that are down: dead, stuck, restarting). A
restarted device registers again as a new node: its old node id is stale
(Flower still lists it until 2 x 30 s of missed heartbeats) and must get no
work. A node is usable when its device is not down and, where devices write
node files (local, compose), it is the device's current node. Both files are
re-read when they change, and at least every second (a directory's mtime
ticks coarsely: two writes in one tick look like one).
"""

from __future__ import annotations

import json
import threading
import time

from flotilla.contracts import RecordPaths

REREAD_S = 1.0


class FleetView:
    def __init__(self, paths: RecordPaths | None) -> None:
        self.paths = paths
        self.names: dict[int, tuple[str, str]] = {}  # node id -> (device, class), every incarnation
        self.current: dict[str, int] = {}  # device -> its node id now (from its node file)
        self._lock = threading.Lock()
        self._nodes_mtime = None
        self._nodes_read_at = 0.0
        self._lost: set[str] = set()
        self._lost_mtime = None

    def learn(self, node_id: int, device: str, cls: str = "") -> None:
        """A name learned from a reply (targets without node files: swarm, k8s)."""
        with self._lock:
            self.names[node_id] = (device, cls or self.names.get(node_id, ("", ""))[1])

    def name_of(self, node_id: int) -> tuple[str, str]:
        if node_id not in self.names:
            self.refresh()
        return self.names.get(node_id, (f"node-{node_id}", ""))

    def lost(self) -> set[str]:
        self.refresh()
        return set(self._lost)

    def usable(self, node_id: int) -> bool:
        """May the app send this node work? No for a down device or a stale incarnation of one."""
        self.refresh()
        name = self.names.get(node_id, (None, ""))[0]
        if name is None:
            # Where devices write node files, a node none of them names is a dead incarnation whose file
            # went before it was read (Flower lists it for 60 s more); elsewhere Flower's own view stands.
            return not self._has_node_files()
        if name in self._lost:
            return False
        if self._has_node_files():
            return self.current.get(name) == node_id
        return True

    def refresh(self) -> None:
        if self.paths is None:
            return
        with self._lock:
            mtime, now = _mtime(self.paths.nodes), time.monotonic()
            if mtime != self._nodes_mtime or now - self._nodes_read_at >= REREAD_S:
                self._nodes_mtime, self._nodes_read_at = mtime, now
                self.current = {}
                for f in self.paths.nodes.glob("*.json") if mtime is not None else ():
                    try:
                        doc = json.loads(f.read_text())
                        node, device = int(doc["node_id"]), str(doc["device"])
                    except (OSError, ValueError, KeyError, TypeError):
                        continue
                    self.names[node] = (device, str(doc.get("class", "")))
                    self.current[device] = node
            mtime = _mtime(self.paths.lost_devices)
            if mtime != self._lost_mtime:
                self._lost_mtime = mtime
                try:
                    self._lost = set(json.loads(self.paths.lost_devices.read_text()))
                except (OSError, ValueError):
                    self._lost = set()

    def _has_node_files(self) -> bool:
        return self._nodes_mtime is not None


def _mtime(path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
