"""The ClientApp. Thin on purpose: flwr spawns a fresh process per message,
so this module imports only flwr and the standard library, and hands the
work to the device's warm trainer (node config `trainer`) when it has one.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Client

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
_local_trainer = None


def _call(ctx: Context, op: str, payload: dict | None = None):
    sock = ctx.node_config.get("trainer")
    if sock:
        _wait_for_trainer(str(sock))
        with Client(str(sock), family="AF_UNIX") as conn:
            conn.send((op, payload))
            status, result = conn.recv()
        if status != "ok":
            raise RuntimeError(f"trainer failed:\n{result}")
        return result
    global _local_trainer  # plain `flwr run` without Flotilla's device agent
    if _local_trainer is None:
        from flotilla.app.trainer import Trainer

        _local_trainer = Trainer(threads=None)
    if op == "train":
        return _local_trainer.train(payload["keys"], payload["arrays"], payload["config"])
    return _local_trainer.capability(payload["config"])


def _wait_for_trainer(sock: str, timeout_s: float = 300.0) -> None:
    """The device starts its trainer and SuperNode together; the first message may beat the trainer."""
    end = time.time() + timeout_s
    while not os.path.exists(sock):
        if time.time() > end:
            raise RuntimeError(f"the device's trainer did not open {sock} within {timeout_s:.0f} s")
        time.sleep(0.05)


def _config(msg: Message, ctx: Context) -> dict:
    """Run config < device's node config < this round's message config."""
    cfg = dict(ctx.run_config) | dict(ctx.node_config)
    if "config" in msg.content:
        cfg |= dict(msg.content["config"])
    return cfg


def _device(ctx: Context) -> dict:
    return {
        "device": str(ctx.node_config.get("device", f"node-{ctx.node_id}")),
        "device-class": str(ctx.node_config.get("device-class", "")),
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    arrays = msg.content["arrays"]
    keys = list(arrays.keys())
    cfg = _config(msg, context)
    out, res = _call(context, "train", {"keys": keys, "arrays": arrays.to_numpy_ndarrays(), "config": cfg})
    record = ArrayRecord(array_dict={k: Array(a) for k, a in zip(keys, out)}, keep_input=False)
    metrics = MetricRecord(
        {
            "num-examples": int(res["partition_size"]),
            "samples": int(res["samples"]),
            "steps": int(res["steps"]),
            "train-s": float(res["train_s"]),
            "train-loss": float(res["train_loss"]),
            "batch-size": int(res["batch_size"]),
            "lr": float(res["lr"]),
            # trained before this message arrived (train-ahead), carried into this update
            "ahead-steps": int(res.get("ahead_steps", 0)),
            "ahead-samples": int(res.get("ahead_samples", 0)),
            "ahead-s": float(res.get("ahead_s", 0.0)),
            "started": started,
            "ended": time.time(),
            # effective limits now (a throttle shows here), 0 where the device has none: every reply carries
            # the same keys (Flower refuses to aggregate replies whose metrics differ in keys)
            **{k: float(res.get(k) or 0.0) for k in ("cpus", "memory")},
        }
    )
    return Message(RecordDict({"arrays": record, "metrics": metrics, "device": ConfigRecord(_device(context))}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Capability report: the device's effective limits and measured throughput."""
    cap = _call(context, "capability", {"config": _config(msg, context)})
    cfg = ConfigRecord(_device(context))
    metrics = MetricRecord({k: float(v) for k, v in cap.items() if isinstance(v, (int, float)) and v is not None})
    return Message(RecordDict({"device": cfg, "metrics": metrics}), reply_to=msg)
