"""Observe any Flower App from its ServerApp process, without touching the app.

The ServerApp host (flotilla.runtime.serverapp) hands the app an
`ObservingGrid` instead of Flower's HttpGrid. Every message the app sends
and every reply it receives passes through it, so Flotilla records, per
round and per device: when each message was sent and answered, the bytes
down and up, the reply's metrics (its MetricRecords), errors, and the
device-side timing stamp (compute time, CPU seconds) that the device's
ClientApp runtime adds to each reply (flotilla.runtime.stamp) and that is
removed here before the app sees the reply. Hooks on Flower's strategy loop
(`Strategy.start`) and the legacy `History` add the app's own aggregates
and its server-side (central) evaluation. Rounds go to the run record's
metrics.jsonl in the same shape the built-in app's rounds have, so status,
the live view, Prometheus and the report read every app alike.

The grid (flotilla.runtime.observing_grid) also gives the app the engine's
speed and answers for lost devices at once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Message

from flotilla.contracts import STAMP_KEY, DeviceStatus, RecordPaths
from flotilla.runtime.fleetview import FleetView
from flotilla.runtime.observed import (
    append_row,
    merge_detail,
    message_round,
    missing_device,
    pick_metric,
    record_bytes,
    reply_metrics,
    save_arrays,
    scalar,
    weighted_mean,
)


@dataclass
class Exchange:
    """One message and its reply."""

    mid: str
    round: int
    kind: str  # Flower message type: train, evaluate, query, ...
    node_id: int
    sent: float
    bytes_down: int
    answered: float | None = None
    bytes_up: int = 0
    status: str = "pending"
    metrics: dict = field(default_factory=dict)
    stamp: dict = field(default_factory=dict)
    error: str | None = None

    def row(self, name: str, cls: str) -> dict:
        compute = scalar(self.stamp.get("compute_s"))
        row = {
            "name": name, "class": cls, "node_id": self.node_id, "status": self.status,
            "sent": round(self.sent, 4), "answered": round(self.answered, 4) if self.answered else None,
            "reply_s": round(self.answered - self.sent, 4) if self.answered else None,
            "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
            "compute_s": round(compute, 4) if compute is not None else None,
            "cpu_s": scalar(self.stamp.get("cpu_s")), "queued_s": scalar(self.stamp.get("queued_s")),
            "metrics": self.metrics,
        }
        if self.error:
            row["error"] = self.error
        return row


@dataclass
class RoundObs:
    number: int
    t_start: float
    exchanges: dict[str, Exchange] = field(default_factory=dict)
    server_metrics: dict[str, float] = field(default_factory=dict)
    app_metrics: dict[str, dict] = field(default_factory=dict)  # "train" / "evaluate": the app's own aggregates
    detail: dict | None = None  # the built-in app's own round record (richer statuses), merged in
    emitted: bool = False


class Observer:
    """Collects what the grid and the hooks see; writes rounds, messages, the final model and a summary."""

    def __init__(self, record_dir: Path | None, accuracy_key: str = "accuracy", loss_key: str = "loss",
                 policy: str = "", exporter=None) -> None:
        self.paths = RecordPaths(Path(record_dir)) if record_dir else None
        self.accuracy_key, self.loss_key, self.policy = accuracy_key, loss_key, policy
        self.exporter = exporter
        self.fleet = FleetView(self.paths)  # node id <-> device, and which nodes are usable
        self.rounds: dict[int, RoundObs] = {}
        self.current = 0
        self.num_rounds: int | None = None  # what the app's strategy was started with, when it says
        self.metrics_seen: dict[str, set[str]] = {"server": set(), "train": set(), "evaluate": set()}
        self.final_arrays: ArrayRecord | None = None
        self.last_sent_arrays: ArrayRecord | None = None
        self.round_arrays: dict[int, ArrayRecord] = {}  # the app's aggregate of each round, where hooked
        self.state_provider = None  # a Flotilla strategy's state_dict(), saved with each round's checkpoint
        self.resume = None  # the checkpoint (flotilla.runtime.checkpoint) this ServerApp continues from
        self.app_writes_rounds = False  # the built-in app hands its own round records to round_detail()
        self._lock = threading.RLock()
        self._exchanges: dict[str, Exchange] = {}
        self._closed = False

    # -- names ---------------------------------------------------------------
    @property
    def names(self) -> dict[int, tuple[str, str]]:
        return self.fleet.names

    def name_of(self, node_id: int) -> tuple[str, str]:
        return self.fleet.name_of(node_id)

    def lost_devices(self) -> set[str]:
        return self.fleet.lost()

    def usable(self, node_id: int) -> bool:
        return self.fleet.usable(node_id)

    # -- traffic -----------------------------------------------------------------
    def sent(self, messages: list[Message], ids: list[str], t: float) -> None:
        with self._lock:
            for msg, mid in zip(messages, ids):
                if not mid:
                    continue
                r = message_round(msg, self.current)
                if r > self.current:
                    self._emit_before(r)
                    self.current = r
                rnd = self._round(r, t)
                ex = Exchange(mid, r, str(msg.metadata.message_type), msg.metadata.dst_node_id, t,
                              record_bytes(msg.content if msg.has_content() else None))
                self._exchanges[mid] = ex
                rnd.exchanges[mid] = ex
                if msg.has_content():
                    for rec in msg.content.values():
                        if isinstance(rec, ArrayRecord):
                            self.last_sent_arrays = rec
                self._log({"event": "sent", "mid": mid, "round": r, "type": ex.kind, "node_id": ex.node_id,
                           "device": self.name_of(ex.node_id)[0], "t": round(t, 4), "bytes_down": ex.bytes_down})

    def received(self, reply: Message, t: float) -> None:
        """A reply pulled for the app: note it, and take Flotilla's stamp off it."""
        with self._lock:
            ex = self._exchanges.pop(reply.metadata.reply_to_message_id, None)
            stamp = {}
            if reply.has_content() and STAMP_KEY in reply.content:
                stamp = dict(reply.content[STAMP_KEY])
                del reply.content[STAMP_KEY]
            if stamp.get("device"):
                self.fleet.learn(reply.metadata.src_node_id, str(stamp["device"]), str(stamp.get("class", "")))
            if ex is None:
                return
            ex.answered, ex.stamp = t, stamp
            if reply.has_error():
                ex.status, ex.error = DeviceStatus.FAILED, str(reply.error.reason)[:300]
            else:
                ex.status = DeviceStatus.OK
                ex.bytes_up = record_bytes(reply.content)
                ex.metrics = reply_metrics(reply.content)
                self.metrics_seen["evaluate" if ex.kind == "evaluate" else "train"].update(ex.metrics)
            self._log_reply(ex)

    def given_up(self, mid: str, status: str, reason: str, t: float) -> None:
        with self._lock:
            ex = self._exchanges.pop(mid, None)
            if ex is None:
                return
            ex.status, ex.error, ex.answered = status, reason, None
            self._log_reply(ex, t)

    def _log_reply(self, ex: Exchange, t: float | None = None) -> None:
        name, cls = self.name_of(ex.node_id)
        self._log({"event": "reply", "mid": ex.mid, "round": ex.round, "type": ex.kind} | ex.row(name, cls)
                  | ({"t": round(t, 4)} if t else {}))

    # -- hooks ------------------------------------------------------------------
    def server_evaluated(self, server_round: int, metrics: dict | None, loss: float | None = None,
                         done: bool = False) -> None:
        """The app's central evaluation of round `server_round` (0: the initial model)."""
        with self._lock:
            rnd = self._round(server_round, time.time())
            if metrics:
                rnd.server_metrics.update({k: x for k, v in dict(metrics).items() if (x := scalar(v)) is not None})
            if loss is not None and scalar(loss) is not None:
                rnd.server_metrics.setdefault("loss", float(loss))
            self.metrics_seen["server"].update(rnd.server_metrics)
            if done or server_round == 0:
                self._emit(rnd)

    def aggregated(self, server_round: int, kind: str, metrics: dict | None, done: bool = False,
                   arrays: ArrayRecord | None = None) -> None:
        """The app's own aggregate of a round's train or evaluate replies (and, for train, its new model)."""
        with self._lock:
            rnd = self._round(server_round, time.time())
            if metrics:
                rnd.app_metrics[kind] = {k: x for k, v in dict(metrics).items() if (x := scalar(v)) is not None}
            if arrays is not None:
                self.round_arrays[server_round] = arrays
                for r in [r for r in self.round_arrays if r < server_round - 1]:
                    del self.round_arrays[r]
            if done:
                self._emit(rnd)

    def round_detail(self, server_round: int, record: dict, emit: bool = True) -> bool:
        """Flotilla's strategy's own record of a round (richer device statuses), merged with what was observed.

        emit: write the row now (the built-in app, whose evaluation made the record); else it is written when
        the round ends as for any app (flotilla.strategy.Auto: the app's own evaluation still follows).
        False if the round's row was already written."""
        with self._lock:
            if emit:
                self.app_writes_rounds = True
            rnd = self._round(server_round, record.get("t_start") or time.time())
            if rnd.emitted:
                return False
            rnd.detail = record
            if emit:
                self._emit(rnd)
            return True

    # -- rounds -------------------------------------------------------------------
    def _round(self, r: int, t: float) -> RoundObs:
        if r not in self.rounds:
            self.rounds[r] = RoundObs(r, t)
            if self.resume is not None and r <= self.resume.round:  # recorded before the restart
                self.rounds[r].emitted = True
                return self.rounds[r]
            if r >= 1 and self.paths is not None:
                append_row(self.paths.round_starts, {"round": r, "t_start": t})
        return self.rounds[r]

    def _emit_before(self, r: int) -> None:
        if self.app_writes_rounds:
            return
        for n in sorted(self.rounds):
            if n < r:
                self._emit(self.rounds[n])

    def _emit(self, rnd: RoundObs) -> None:
        if rnd.emitted:
            return
        if rnd.number >= 1 and not rnd.exchanges and rnd.detail is None:
            return  # nothing was sent in it (e.g. a strategy's round that sampled no one): not a round
        rnd.emitted = True
        row = self.round_row(rnd)
        if self.paths is not None:
            append_row(self.paths.metrics, row)
            self._checkpoint(rnd.number)
        if self.exporter is not None:
            self.exporter.observe_round(row)

    def _checkpoint(self, server_round: int) -> None:
        """The model after this round (the app's aggregate, else what it sent last) and a Flotilla strategy's
        state: what `flotilla resume` and automatic recovery continue from."""
        from flotilla.runtime.checkpoint import write_checkpoint

        if server_round < 1:
            return
        arrays = self.round_arrays.get(server_round)
        if arrays is None:
            older = [r for r in self.round_arrays if r < server_round]
            arrays = self.round_arrays[max(older)] if older else self.last_sent_arrays
        if arrays is None:
            return
        try:
            state = self.state_provider() if self.state_provider else {}
            write_checkpoint(self.paths, server_round, arrays, state)
        except Exception as err:  # noqa: BLE001 - a failed checkpoint must not fail the app's round
            print(f"flotilla: could not checkpoint round {server_round}: {err}", flush=True)

    def round_row(self, rnd: RoundObs) -> dict:
        t_end = time.time()
        devices: dict[str, dict] = {}
        failures = 0
        evals, trains = [], []
        for ex in sorted(rnd.exchanges.values(), key=lambda e: e.sent):
            name, cls = self.name_of(ex.node_id)
            if ex.kind == "evaluate":
                d = devices.setdefault(name, missing_device(name, cls, ex.node_id))
                d["evaluate"] = {"status": ex.status, "reply_s": ex.row(name, cls)["reply_s"],
                                 "compute_s": ex.row(name, cls)["compute_s"], "metrics": ex.metrics}
                if ex.status == DeviceStatus.OK:
                    evals.append(ex.metrics)
                continue
            if ex.kind != "train":
                continue
            row = ex.row(name, cls)
            if ex.status == "pending":  # still out when the round ended (the app stopped waiting)
                row["status"] = DeviceStatus.LATE
            trained = row["status"] == DeviceStatus.OK
            if row["status"] == DeviceStatus.FAILED:
                failures += 1
            samples = int(ex.metrics.get("num-examples", 0)) if trained else 0
            train_s = row["compute_s"] or 0.0
            row |= {"train_s": train_s, "samples": samples,
                    "throughput_sps": round(samples / train_s, 2) if trained and train_s > 0 and samples else None}
            devices[name] = devices.get(name, {}) | row if name in devices else row
            if trained:
                trains.append(ex.metrics)
        evaluate = rnd.app_metrics.get("evaluate") or (weighted_mean(evals) if evals else {})
        train = rnd.app_metrics.get("train") or (weighted_mean(trains) if trains else {})
        acc, acc_src = pick_metric(self.accuracy_key, rnd.server_metrics, evaluate, train)
        loss, _ = pick_metric(self.loss_key, rnd.server_metrics, evaluate, train)
        ends = [e.answered for e in rnd.exchanges.values() if e.answered]
        row = {
            "round": rnd.number, "accuracy": acc, "loss": loss, "accuracy_source": acc_src,
            "t_start": rnd.t_start, "t_end": max(ends) if ends and rnd.number >= 1 else t_end,
            "devices": list(devices.values()), "failures": failures,
            "lost": [d["name"] for d in devices.values() if d["status"] in (DeviceStatus.LOST, DeviceStatus.LATE)],
            "policy": self.policy, "server_metrics": rnd.server_metrics, "train_metrics": train,
            "evaluate_metrics": evaluate,
            "bytes_down": sum(e.bytes_down for e in rnd.exchanges.values()),
            "bytes_up": sum(e.bytes_up for e in rnd.exchanges.values()),
        }
        row["t_end"] = max(row["t_end"], t_end) if rnd.server_metrics and rnd.number >= 1 else row["t_end"]
        row["wall_s"] = round(row["t_end"] - row["t_start"], 4)
        if rnd.detail is not None:
            row = merge_detail(row, rnd.detail)
        return row

    # -- the end ----------------------------------------------------------------
    def strategy_finished(self, arrays: ArrayRecord | None) -> None:
        if arrays is not None:
            self.final_arrays = arrays

    def close(self, error: str | None = None) -> None:
        """Write what is still open: the last rounds, the final model, the summary of what was seen."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.app_writes_rounds:
                for n in sorted(self.rounds):
                    self._emit(self.rounds[n])
            if self.paths is None:
                return
            arrays = self.final_arrays or self.last_sent_arrays
            if arrays is not None and not self.paths.weights.exists():
                save_arrays(self.paths.weights, arrays)
            trained = [r for r in self.rounds.values() if r.number >= 1 and r.emitted]
            doc = {"rounds_run": max((r.number for r in trained), default=0), "num_rounds": self.num_rounds,
                   "metrics_seen": {k: sorted(v) for k, v in self.metrics_seen.items()},
                   "accuracy_metric": self.accuracy_key, "weights": arrays is not None, "error": error,
                   "t": time.time()}
            tmp = self.paths.observed.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=2))
            tmp.replace(self.paths.observed)

    def _log(self, row: dict) -> None:
        if self.paths is not None:
            append_row(self.paths.messages, row)
