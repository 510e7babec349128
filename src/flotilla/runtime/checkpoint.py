"""Per-round checkpoints in the run record, and the request to resume from one.

After every round the ServerApp's observer writes, atomically:
    checkpoints/round-<r>.npz   the global model after round r (the last KEEP rounds are kept)
    checkpoint.json             {"round", "model", "keys", "state", "t"}: the newest, and the
                                strategy's own state when it is Flotilla's (planner estimates, RNG)
For any app the model is observed (its strategy's aggregate, or what it sent
next); a Flotilla strategy (the built-in app's, flotilla.strategy.Auto) adds
its state and can resume from it.

To resume, the driver writes resume.json ({"round", "checkpoint"}) before it
submits the app again; the next ServerApp host reads it (`resume_request`),
and Flotilla's strategies start from that model, state and round.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from flotilla.contracts import RecordPaths

KEEP = 3


@dataclass(frozen=True)
class Checkpoint:
    round: int
    model: Path
    keys: list[str]
    state: dict
    t: float

    def arrays(self):
        """The model as a Flower ArrayRecord (keys and order as the app had them)."""
        import numpy as np
        from flwr.app import Array, ArrayRecord

        with np.load(self.model) as npz:
            return ArrayRecord(array_dict={k: Array(np.asarray(npz[k])) for k in self.keys}, keep_input=False)


def write_checkpoint(paths: RecordPaths, server_round: int, arrays, state: dict | None = None) -> Path:
    """The model after `server_round` (a flwr ArrayRecord) and the strategy's state; returns checkpoint.json."""
    import numpy as np

    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    model = paths.checkpoints / f"round-{server_round}.npz"
    keys = list(arrays.keys())
    tmp = model.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: a.numpy() for k, a in arrays.items()})
    os.replace(tmp, model)
    doc = {"round": server_round, "model": model.name, "keys": keys, "state": state or {}, "t": time.time()}
    _write_json(paths.checkpoint, doc)
    for old in paths.checkpoints.glob("round-*.npz"):  # keep the newest KEEP
        n = _round_of(old)
        if n is not None and n <= server_round - KEEP:
            old.unlink(missing_ok=True)
    return paths.checkpoint


def read_checkpoint(paths: RecordPaths) -> Checkpoint | None:
    try:
        doc = json.loads(paths.checkpoint.read_text())
        model = paths.checkpoints / doc["model"]
        if not model.exists():
            return None
        return Checkpoint(int(doc["round"]), model, list(doc["keys"]), dict(doc.get("state") or {}),
                          float(doc.get("t", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def request_resume(paths: RecordPaths) -> Checkpoint | None:
    """The driver: ask the next ServerApp to continue from the newest checkpoint (None: there is none)."""
    cp = read_checkpoint(paths)
    if cp is not None:
        _write_json(paths.resume, {"round": cp.round, "checkpoint": paths.checkpoint.name, "t": time.time()})
    return cp


def resume_request(paths: RecordPaths) -> Checkpoint | None:
    """The ServerApp host: the checkpoint the driver asked it to continue from, if any."""
    if not paths.resume.exists():
        return None
    try:
        want = int(json.loads(paths.resume.read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cp = read_checkpoint(paths)
    return cp if cp is not None and cp.round == want else None


def _round_of(path: Path) -> int | None:
    try:
        return int(path.stem.split("-", 1)[1].split(".")[0])
    except (IndexError, ValueError):
        return None


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
