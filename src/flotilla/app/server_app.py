"""The ServerApp: FedAvg (or the `auto` policy) over the fleet, central evaluation every round.

Under Flotilla it runs hosted (flotilla.runtime.serverapp): its round
records (accuracy, loss, each device's training seconds, samples, steps,
status under the policy) go to the host's observer, which merges them with
what it saw on the grid and writes metrics.jsonl, round_starts.jsonl and
the exporter, as for any app. The app itself adds devices.jsonl (capability
reports) and weights.npz to the run record (FLOTILLA_RECORD_DIR).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch  # here, not in main: flwr loads the app while the fleet still starts (the hosted ServerApp holds it)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from flotilla.app.task import Net, evaluate, get_weights, set_weights, to_tensors
from flotilla.contracts import RECORD_DIR_ENV, BuiltinConfig, RecordPaths
from flotilla.data import load_test
from flotilla.runtime.engine_tuning import shorten_pull_backoff
from flotilla.runtime.serverapp import active
from flotilla.strategy.fleet import FleetAuto, FleetFedAvg, wait_for_fleet
from flotilla.strategy.grid import FleetGrid
from flotilla.strategy.planner import AutoPlanner

app = ServerApp()
ASK_ENV = "FLOTILLA_QUERY_CAPABILITIES"  # "1": ask every device by query even where it wrote its capability


def _append(path: Path | None, record: dict) -> None:
    if path is not None:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def capability_row(name: str, device_class: str, node_id: int, m: dict, t: float) -> dict:
    """A devices.jsonl row from a capability report (the query's metrics or a ready file's capability)."""
    return {
        "name": name,
        "class": device_class,
        "node_id": node_id,
        "cpus": m.get("cpus"),
        "memory": int(m["memory"]) if m.get("memory") is not None else None,
        "threads": int(m.get("threads") or 0),
        "throughput_sps": m.get("throughput_sps"),
        "partition_size": int(m["partition_size"]) if m.get("partition_size") is not None else None,
        "t": t,
    }


def recorded_capabilities(paths: RecordPaths, node_ids: list[int]) -> dict[int, dict]:
    """What the connected devices reported as they started (their trainer's ready file, next to the node id
    file), where the run record is shared (local, compose): a query message to each would cost a full
    round's worth of exchanges (~15 s on 100 devices sharing 2 cores) for the same answer."""
    from flotilla.runtime.preload import read_ready

    wanted, out = set(node_ids), {}
    for f in paths.nodes.glob("*.json"):
        try:
            node = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        ready = read_ready(f.with_suffix(".ready")) or {}
        if node.get("node_id") in wanted and isinstance(ready.get("capability"), dict):
            out[node["node_id"]] = capability_row(
                str(node["device"]),
                str(node.get("class", "")),
                node["node_id"],
                ready["capability"],
                float(ready.get("t") or time.time()),
            )
    return out


def query_capabilities(grid: FleetGrid, node_ids: list[int]) -> list[dict]:
    """Ask these devices for their limits and throughput (Flower query message)."""
    msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    out = []
    for reply in grid.send_and_receive(msgs, timeout=60):
        if reply.has_error():
            continue
        dev = reply.content["device"]
        grid.node_names[reply.metadata.src_node_id] = str(dev["device"])
        out.append(
            capability_row(
                str(dev["device"]),
                str(dev.get("device-class", "")),
                reply.metadata.src_node_id,
                dict(reply.content["metrics"]),
                time.time(),
            )
        )
    return out


def fleet_capabilities(grid: FleetGrid, expected: int, wait_s: float, paths: RecordPaths | None) -> list[dict]:
    """Every connected device's capability: from the record where the devices wrote it, by query otherwise."""
    wait_for_fleet(grid, expected, wait_s)
    nodes = list(grid.get_node_ids())
    known = recorded_capabilities(paths, nodes) if paths is not None and os.environ.get(ASK_ENV) != "1" else {}
    for node_id, row in known.items():
        grid.node_names[node_id] = row["name"]
    missing = [n for n in nodes if n not in known]
    return list(known.values()) + (query_capabilities(grid, missing) if missing else [])


def make_strategy(cfg: BuiltinConfig, expected: int, caps: list[dict]) -> FleetFedAvg:
    """FedAvg for policies none/manual (every device, equal footing); FleetAuto for auto."""
    common = dict(
        expected_devices=expected,
        fleet_wait_s=cfg.fleet_wait_s,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,  # evaluation is central: no evaluate messages, no round-trip
        min_train_nodes=cfg.min_devices,
        min_available_nodes=cfg.min_devices,
    )
    if cfg.policy != "auto":
        return FleetFedAvg(**common)
    planner = AutoPlanner(batch_size=cfg.batch_size, lr=cfg.lr, local_epochs=cfg.local_epochs,
                          deadline_factor=cfg.deadline_factor)
    for c in caps:
        planner.add_capability(c["name"], c["class"], c.get("cpus"), c.get("memory"), c.get("throughput_sps"),
                               c.get("partition_size"))
    return FleetAuto(planner=planner, proximal_mu=cfg.proximal_mu, train_ahead=bool(cfg.train_ahead), **common)


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
    shorten_pull_backoff()  # replies are pulled while their SuperNode may still be pushing them
    cfg = BuiltinConfig.from_flower(context.run_config)
    torch.manual_seed(cfg.seed)
    record = os.environ.get(RECORD_DIR_ENV)
    paths = RecordPaths(Path(record)) if record else None
    observer = active()
    expected = cfg.expected_devices or cfg.min_devices
    fleet = FleetGrid(grid, poll_s=0.1, lost_file=paths.lost_devices if paths else None, observer=observer)

    caps = fleet_capabilities(fleet, expected, cfg.fleet_wait_s, paths)
    for cap in caps:
        _append(paths.devices if paths else None, cap)

    x_test, y_test = to_tensors(*load_test(cfg.dataset, cfg.data_path or None, cfg.test_fraction, cfg.partition_seed))
    model = Net()
    keys, _ = get_weights(model)
    strategy = make_strategy(cfg, expected, caps)
    resume = observer.resume if observer is not None else None
    if resume is not None:  # continue from the checkpoint: its model, the planner's estimates, its round
        strategy.round_offset = resume.round
        strategy.load_state_dict(resume.state)
    if observer is not None:
        observer.state_provider = strategy.state_dict
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
            "policy": cfg.policy, "deadline_s": info.get("deadline_s"),
        }
        for k in ("planned_round_s", "left_out"):
            if k in info:
                record[k] = info[k]
        if observer is not None:
            observer.round_detail(server_round, record)
        for row in round_capabilities(server_round, devices, last_caps, t_end):
            _append(paths.devices if paths else None, row)
        print(f"[flotilla] round {server_round}: accuracy={acc:.4f} loss={loss:.4f}", flush=True)
        return MetricRecord({"accuracy": acc, "loss": loss})

    try:
        result = strategy.start(
            grid=fleet,
            initial_arrays=resume.arrays() if resume is not None else ArrayRecord(model.state_dict()),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout_s,
            train_config=ConfigRecord({"seed": cfg.seed}),
            evaluate_fn=central_evaluate,
        )
    finally:
        fleet.close()
    if paths is not None and result.arrays is not None:
        np.savez(paths.weights, **dict(zip(keys, result.arrays.to_numpy_ndarrays())))
    print(f"[flotilla] done in {time.time() - t_run:.1f}s", flush=True)
