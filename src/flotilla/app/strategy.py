"""Flotilla's FedAvg: Flower's FedAvg plus the records a fleet operator needs.

Subclasses Flower's strategy and only adds to its hooks:
- configure_train waits (bounded) for the whole fleet before round 1 and
  stamps the round's start;
- aggregate_train records, per device, its training time, samples, steps
  and throughput, and counts failures and devices given up on.
The heterogeneity policies (flotilla.app.hetero) plug in here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class FleetFedAvg(FedAvg):
    def __init__(self, *, expected_devices: int, fleet_wait_s: float = 60.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.expected_devices = expected_devices
        self.fleet_wait_s = fleet_wait_s
        self.round_started: dict[int, float] = {}
        self.round_devices: dict[int, list[dict]] = {}
        self.round_failures: dict[int, int] = {}
        self.node_names: dict[int, str] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round == 1:
            wait_for_fleet(grid, self.expected_devices, self.fleet_wait_s)
        self.round_started[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        devices, failures = [], 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                continue
            devices.append(device_record(msg, self.node_names))
        self.round_devices[server_round] = devices
        self.round_failures[server_round] = failures
        return super().aggregate_train(server_round, replies)


def device_record(msg: Message, node_names: dict[int, str]) -> dict:
    """One device's training report, from its reply."""
    m = msg.content["metrics"]
    dev = msg.content["device"] if "device" in msg.content else {}
    train_s = float(m.get("train-s", 0.0))
    samples = int(m.get("samples", m.get("num-examples", 0)))
    return {
        "name": str(dev.get("device", node_names.get(msg.metadata.src_node_id, msg.metadata.src_node_id))),
        "class": str(dev.get("device-class", "")),
        "node_id": msg.metadata.src_node_id,
        "train_s": round(train_s, 4),
        "samples": samples,
        "steps": int(m.get("steps", 0)),
        "batch_size": int(m.get("batch-size", 0)),
        "lr": float(m.get("lr", 0.0)),
        "throughput_sps": round(samples / train_s, 2) if train_s > 0 else None,
        "started": float(m.get("started", 0.0)),
        "ended": float(m.get("ended", 0.0)),
        "status": "ok",
    }


def wait_for_fleet(grid: Grid, expected: int, timeout_s: float) -> int:
    """Wait until `expected` nodes are connected or the timeout passes; return how many are."""
    end = time.time() + timeout_s
    while (n := len(list(grid.get_node_ids()))) < expected and time.time() < end:
        time.sleep(0.2)
    return n
