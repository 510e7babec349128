"""Bench instrumentation, not part of the app's logic: FedAvg that times each round.

Uses Flower's own hooks: configure_train marks a round's start, aggregate_evaluate (which
Strategy.start calls every round, even with fraction_evaluate=0.0) marks its end. When
output_dir is set, one JSON line per round goes to <output_dir>/metrics.jsonl.
One copy for both bench apps: bench/run_plain.py's prepared_app() puts it into each
app's package when it copies the app for a run (a FAB must be self-contained).
"""

import json
import time
from pathlib import Path

from flwr.serverapp.strategy import FedAvg


class TimedFedAvg(FedAvg):
    def __init__(self, output_dir: str = "", **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.metrics_path = Path(output_dir) / "metrics.jsonl" if output_dir else None
        self._t_start = 0.0
        self._devices: list[dict] = []

    def configure_train(self, server_round, arrays, config, grid):
        self._t_start = time.time()
        self._devices = []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)  # read twice: here and by FedAvg
        for msg in replies:
            if msg.has_error():
                continue
            metrics = msg.content["metrics"]
            name = msg.content["device"]["device"] if "device" in msg.content else ""
            self._devices.append(
                {"name": name or str(msg.metadata.src_node_id),
                 "train_s": float(metrics["train-s"]),
                 "samples": int(metrics["num-examples"])}
            )
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        metrics = super().aggregate_evaluate(server_round, replies)
        t_end = time.time()
        if self.metrics_path is not None:
            line = {
                "round": server_round,
                "t_start": self._t_start,
                "t_end": t_end,
                "wall_s": round(t_end - self._t_start, 3),
                "accuracy": metrics.get("eval_acc") if metrics else None,
                "loss": metrics.get("eval_loss") if metrics else None,
                "devices": self._devices,
            }
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        return metrics
