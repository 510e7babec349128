"""Per-device round records (metrics.jsonl device rows) built from the built-in app's replies."""

from __future__ import annotations

from flwr.app import Message

from flotilla.strategy.planner import Assignment


def device_record(msg: Message, node_names: dict[int, str]) -> dict:
    """One device's training report, from its reply."""
    m = msg.content["metrics"]
    dev = msg.content["device"] if "device" in msg.content else {}
    train_s = float(m.get("train-s", 0.0))
    samples = int(m.get("samples", m.get("num-examples", 0)))
    node = msg.metadata.src_node_id
    rec = {
        "name": str(dev.get("device", node_names.get(node, f"node-{node}"))),
        "class": str(dev.get("device-class", "")),
        "node_id": node,
        "train_s": round(train_s, 4),
        "samples": samples,
        "num_examples": int(m.get("num-examples", 0)),
        "steps": int(m.get("steps", 0)),
        "batch_size": int(m.get("batch-size", 0)),
        "lr": float(m.get("lr", 0.0)),
        "throughput_sps": round(samples / train_s, 2) if train_s > 0 else None,
        "started": float(m.get("started", 0.0)),
        "ended": float(m.get("ended", 0.0)),
        "status": "ok",
    }
    if "ahead-steps" in m:  # train-ahead: trained before the message came, part of this update
        rec |= {"ahead_steps": int(m["ahead-steps"]), "ahead_samples": int(m.get("ahead-samples", 0)),
                "ahead_s": round(float(m.get("ahead-s", 0.0)), 4)}
    if m.get("cpus"):  # effective limits, when the device has them (0: none)
        rec["cpus"] = float(m["cpus"])
    if m.get("memory"):
        rec["memory"] = int(m["memory"])
    return rec


def missing_record(name: str, node_id: int, status: str, work: Assignment | None, error: str | None = None) -> dict:
    """A device that trained nothing usable this round: late, busy (still on an older round) or lost."""
    rec = {
        "name": name, "class": "", "node_id": node_id, "train_s": 0.0, "samples": 0, "steps": 0,
        "planned_steps": work.steps if work else None,
        "train_deadline_s": work.train_deadline_s if work else None,
        "batch_size": work.batch if work else None, "lr": work.lr if work else None,
        "throughput_sps": None, "status": status,
    }
    if error:
        rec["error"] = error
    return rec
