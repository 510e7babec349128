"""What the observer reads off Flower messages and writes to the run record: pure helpers.

Kept apart from flotilla.runtime.observer (the stateful part: exchanges, rounds, emission) so each can be
read and tested alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flotilla.contracts import DeviceStatus


def scalar(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def record_bytes(content: RecordDict | None) -> int:
    """Payload bytes of a message: its arrays' serialized data (configs and metrics are noise beside them)."""
    if content is None:
        return 0
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
    return total


def reply_metrics(content: RecordDict) -> dict[str, float]:
    """Every scalar metric of a reply, keys as the app wrote them: its MetricRecords, and (legacy
    NumPyClient replies) the `fitres.metrics` / `evaluateres.metrics` ConfigRecord with `num_examples`
    also under Flower's Message-API name `num-examples`."""
    out: dict[str, float] = {}
    for key, rec in content.items():
        if isinstance(rec, MetricRecord) or (isinstance(rec, ConfigRecord) and key.endswith("res.metrics")):
            for k, v in rec.items():
                if (x := scalar(v)) is not None:
                    out[k] = x
    if "num_examples" in out:
        out.setdefault("num-examples", out["num_examples"])
    return out


def message_round(msg: Message, current: int) -> int:
    """The round a message belongs to: group_id (legacy API and most loops) or the config's server-round
    (Flower's Message-API strategies), else the round being observed."""
    gid = msg.metadata.group_id
    if gid and gid.isdigit():
        return int(gid)
    if msg.has_content():
        for rec in msg.content.values():
            if isinstance(rec, ConfigRecord) and isinstance(rec.get("server-round"), int):
                return int(rec["server-round"])
    return current


def weighted_mean(rows: list[dict], weight_key: str = "num-examples") -> dict[str, float]:
    """Flower's default aggregation of reply metrics: mean weighted by num-examples (plain mean without it)."""
    keys = {k for r in rows for k in r if k != weight_key}
    out = {}
    for k in sorted(keys):
        pairs = [(r[k], r.get(weight_key, 1.0)) for r in rows if k in r]
        w = sum(max(0.0, p[1]) for p in pairs)
        out[k] = sum(v * max(0.0, wt) for v, wt in pairs) / w if w > 0 else sum(v for v, _ in pairs) / len(pairs)
    return out


def pick_metric(key: str, *sources: dict) -> tuple[float | None, str | None]:
    for name, src in zip(("server", "evaluate", "train"), sources):
        if key in src:
            return src[key], name
    return None, None


def missing_device(name: str, cls: str, node_id: int) -> dict:
    return {"name": name, "class": cls, "node_id": node_id, "status": DeviceStatus.IDLE, "train_s": 0.0,
            "samples": 0, "throughput_sps": None}


def merge_detail(observed: dict, detail: dict) -> dict:
    """The built-in app's round record, with what the grid saw added to each device (bytes, reply times)."""
    seen = {d["name"]: d for d in observed["devices"]}
    devices = []
    for d in detail.get("devices", []):
        o = seen.get(d.get("name"), {})
        devices.append({k: v for k, v in o.items() if k not in ("status", "train_s", "samples", "throughput_sps",
                                                                 "metrics")} | d)
    out = observed | {k: v for k, v in detail.items() if k != "devices"}
    out["devices"] = devices
    if detail.get("accuracy") is not None:
        out["accuracy_source"] = "server"  # the app's own record: its central evaluation
    return out


def save_arrays(path: Path, arrays: ArrayRecord) -> None:
    import numpy as np

    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: a.numpy() for k, a in arrays.items()})
    tmp.replace(path)


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
