"""The ServerApp: FedAvg (or the `auto` policy) over the fleet, central evaluation every round.

Writes the run's records into run config `output-dir` (metrics.jsonl,
devices.jsonl, round_starts.jsonl, weights.npz) and, when `metrics-port` is
set, serves them as Prometheus metrics. round_starts.jsonl has one line per
round as it begins ({"round", "t_start"}), for readers that act during a
round (the throttle schedule); metrics.jsonl gets a round only at its end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from flotilla.app.grid import FleetGrid
from flotilla.app.strategy import AutoPlanner, FleetAuto, FleetFedAvg, wait_for_fleet

app = ServerApp()


def _append(path: Path | None, record: dict) -> None:
    if path is not None:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def query_capabilities(grid: FleetGrid, expected: int, wait_s: float) -> list[dict]:
    """Ask every connected device for its limits and throughput (Flower query message)."""
    wait_for_fleet(grid, expected, wait_s)
    msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in grid.get_node_ids()]
    out = []
    for reply in grid.send_and_receive(msgs, timeout=60):
        if reply.has_error():
            continue
        dev = reply.content["device"]
        grid.node_names[reply.metadata.src_node_id] = str(dev["device"])
        m = reply.content["metrics"]
        out.append(
            {
                "name": str(dev["device"]),
                "class": str(dev.get("device-class", "")),
                "node_id": reply.metadata.src_node_id,
                "cpus": m.get("cpus"),
                "memory": int(m["memory"]) if "memory" in m else None,
                "threads": int(m.get("threads", 0)),
                "throughput_sps": m.get("throughput_sps"),
                "partition_size": int(m["partition_size"]) if "partition_size" in m else None,
                "t": time.time(),
            }
        )
    return out


def make_strategy(cfg, expected: int, caps: list[dict], on_round_start=None) -> FleetFedAvg:
    """FedAvg for policies none/manual (every device, equal footing); FleetAuto for auto."""
    common = dict(
        expected_devices=expected,
        fleet_wait_s=float(cfg.get("fleet-wait-s", 60)),
        on_round_start=on_round_start,
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=0.0,  # evaluation is central: no evaluate messages, no round-trip
        min_train_nodes=int(cfg["min-devices"]),
        min_available_nodes=int(cfg["min-devices"]),
    )
    if str(cfg.get("policy", "manual")) != "auto":
        return FleetFedAvg(**common)
    planner = AutoPlanner(batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
                          local_epochs=float(cfg["local-epochs"]), deadline_factor=float(cfg["deadline-factor"]))
    for c in caps:
        planner.add_capability(c["name"], c["class"], c.get("cpus"), c.get("memory"), c.get("throughput_sps"),
                               c.get("partition_size"))
    return FleetAuto(planner=planner, proximal_mu=float(cfg.get("proximal-mu", 0.0)),
                     train_ahead=bool(int(cfg.get("train-ahead", 0))), **common)


def round_capabilities(server_round: int, devices: list[dict], last: dict[str, dict], t: float) -> list[dict]:
    """devices.jsonl rows from a round's train replies: measured throughput, limits as last reported."""
    rows = []
    for d in devices:
        if d["status"] not in ("ok", "partial", "stale") or not d.get("throughput_sps"):
            continue
        prev = last.get(d["name"], {})
        row = {"name": d["name"], "class": d.get("class") or prev.get("class", ""), "node_id": d["node_id"],
               "cpus": d.get("cpus", prev.get("cpus")), "memory": d.get("memory", prev.get("memory")),
               "threads": prev.get("threads", 0), "throughput_sps": d["throughput_sps"], "round": server_round,
               "t": t}
        last[d["name"]] = row
        rows.append(row)
    return rows


@app.main()
def main(grid: Grid, context: Context) -> None:
    import torch

    from flotilla.app.task import Net, evaluate, get_weights, set_weights, to_tensors
    from flotilla.data import load_test

    from flotilla.engine_tuning import shorten_pull_backoff

    shorten_pull_backoff()  # replies are pulled while their SuperNode may still be pushing them
    cfg = context.run_config
    policy = str(cfg.get("policy", "manual"))
    torch.manual_seed(int(cfg.get("seed", 0)))
    out_dir = Path(str(cfg["output-dir"])) if cfg.get("output-dir") else None
    if out_dir is not None:
        from flotilla.app.serverlog import tee_to

        tee_to(out_dir / "logs" / "serverapp.log")
    metrics_path = out_dir / "metrics.jsonl" if out_dir else None
    expected = int(cfg.get("expected-devices", 0)) or int(cfg["min-devices"])
    fleet = FleetGrid(grid, poll_s=0.1, lost_file=out_dir / "lost_devices.json" if out_dir else None)

    exporter = None
    if int(cfg.get("metrics-port", 0)):
        from flotilla.monitor.metrics import FlotillaExporter

        exporter = FlotillaExporter(run_id=str(cfg.get("run-id", "")), job=str(cfg.get("job-name", "")))
        exporter.serve(int(cfg["metrics-port"]))

    caps = query_capabilities(fleet, expected, float(cfg.get("fleet-wait-s", 60)))
    for cap in caps:
        _append(out_dir / "devices.jsonl" if out_dir else None, cap)

    x_test, y_test = to_tensors(
        *load_test(str(cfg["dataset"]), str(cfg.get("data-path", "")) or None, float(cfg["test-fraction"]),
                   int(cfg["partition-seed"]))
    )
    model = Net()
    keys, _ = get_weights(model)
    strategy = make_strategy(cfg, expected, caps,
                             on_round_start=lambda r, t: _append(out_dir / "round_starts.jsonl" if out_dir else None,
                                                                 {"round": r, "t_start": t}))
    strategy.node_names = fleet.node_names
    strategy.device_classes = {c["name"]: c["class"] for c in caps}
    last_caps = {c["name"]: c for c in caps}
    t_run = time.time()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(model, keys, arrays.to_numpy_ndarrays())
        loss, acc = evaluate(model, x_test, y_test)
        t_end = time.time()
        t_start = strategy.round_started.get(server_round, t_end)
        devices = strategy.round_devices.get(server_round, [])
        info = strategy.round_info.get(server_round, {})
        record = {
            "round": server_round, "accuracy": acc, "loss": loss,
            "t_start": t_start, "t_end": t_end, "wall_s": round(t_end - t_start, 4),
            "devices": devices,
            "failures": strategy.round_failures.get(server_round, 0),
            "lost": [d["name"] for d in devices if d["status"] == "lost"],
            "policy": policy, "deadline_s": info.get("deadline_s"),
        }
        for k in ("planned_round_s", "left_out"):
            if k in info:
                record[k] = info[k]
        _append(metrics_path, record)
        for row in round_capabilities(server_round, devices, last_caps, t_end):
            _append(out_dir / "devices.jsonl" if out_dir else None, row)
        if exporter:
            exporter.observe_round(record)
        print(f"[flotilla] round {server_round}: accuracy={acc:.4f} loss={loss:.4f}", flush=True)
        return MetricRecord({"accuracy": acc, "loss": loss})

    try:
        result = strategy.start(
            grid=fleet,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=int(cfg["num-server-rounds"]),
            timeout=float(cfg.get("round-timeout-s", 600)),
            train_config=ConfigRecord({"seed": int(cfg.get("seed", 0))}),
            evaluate_fn=central_evaluate,
        )
    finally:
        fleet.close()
    if out_dir is not None and result.arrays is not None:
        np.savez(out_dir / "weights.npz", **dict(zip(keys, result.arrays.to_numpy_ndarrays())))
    print(f"[flotilla] done in {time.time() - t_run:.1f}s", flush=True)
    if exporter:
        exporter.close()
