"""Prometheus exporter for one Flotilla run.

The exporter is fed from the run record (one metrics.jsonl line per round) and,
for targets without cAdvisor (the local target), from per-device resource
samples. It owns its CollectorRegistry so several runs, or tests, can live in
one process without touching prometheus_client's global registry.

Every series carries `run`; per-device series also `device` and
`device_class`. Units follow Prometheus conventions (seconds, bytes, ratio,
`_total` only on counters).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from flotilla.runs import JsonlTail

log = logging.getLogger(__name__)

RUN_STATES = ("starting", "running", "completed", "failed", "stopped")
DEVICE_LABELS = ("run", "device", "device_class")
# Rounds of a few hundred ms (tiny models) up to many minutes (real devices).
ROUND_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, math.inf)
MAX_REASON_LEN = 64  # failure reasons are label values: keep them short categories


class _UsageCollector:
    """Per-device resource usage, exported as the latest absolute values.

    cpu_seconds_total arrives as an absolute count (from psutil / cgroups), so
    it is exposed through a CounterMetricFamily instead of Counter.inc();
    Prometheus' rate() handles the reset when a device process restarts.
    """

    def __init__(self, run_id: str):
        self._run_id = run_id
        self._lock = threading.Lock()
        self._usage: dict[str, dict] = {}

    def update(self, device: str, **values) -> None:
        with self._lock:
            self._usage[device] = values

    def collect(self):
        with self._lock:
            usage = dict(self._usage)
        cpu = CounterMetricFamily(
            "flotilla_device_cpu_seconds", "CPU time used by the device's processes.", labels=DEVICE_LABELS
        )
        mem = GaugeMetricFamily(
            "flotilla_device_memory_bytes", "Resident memory of the device's processes.", labels=DEVICE_LABELS
        )
        mem_limit = GaugeMetricFamily(
            "flotilla_device_memory_limit_bytes", "Memory limit of the device (absent: unlimited).",
            labels=DEVICE_LABELS,
        )
        quota = GaugeMetricFamily(
            "flotilla_device_cpu_quota_cores", "CPU quota of the device in cores (absent: unlimited).",
            labels=DEVICE_LABELS,
        )
        for device, u in sorted(usage.items()):
            labels = [self._run_id, device, u["device_class"]]
            cpu.add_metric(labels, u["cpu_seconds_total"])
            mem.add_metric(labels, u["memory_bytes"])
            if u["memory_limit_bytes"] is not None:
                mem_limit.add_metric(labels, u["memory_limit_bytes"])
            if u["cpu_quota"] is not None:
                quota.add_metric(labels, u["cpu_quota"])
        return [cpu, mem, mem_limit, quota]


class FlotillaExporter:
    """Prometheus metrics of one run, in a registry of its own."""

    def __init__(self, run_id: str, job: str, target_rounds: int | None = None):
        self.run_id = run_id
        self.job = job
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._seen_rounds: set[int] = set()
        self._device_class: dict[str, str] = {}
        self._server = None
        self._server_thread: threading.Thread | None = None
        r = self.registry
        run = ("run",)

        self._info = Info("flotilla_run", "The run and the job it runs.", run, registry=r)
        # Not "job": Prometheus would rename it to exported_job next to its own job label.
        self._info.labels(run_id).info({"flotilla_job": job})
        self._status = Enum("flotilla_run_status", "Run status.", run, states=list(RUN_STATES), registry=r)
        self._status.labels(run_id).state("starting")

        self._round = Gauge("flotilla_round", "Last finished round (0: initial evaluation).", run, registry=r)
        self._rounds_target = Gauge("flotilla_rounds_target", "Rounds the run is configured for.", run, registry=r)
        self._accuracy = Gauge(
            "flotilla_global_accuracy_ratio", "Central accuracy of the global model (0..1).", run, registry=r
        )
        self._loss = Gauge("flotilla_global_loss", "Central loss of the global model.", run, registry=r)
        self._round_hist = Histogram(
            "flotilla_round_duration_seconds", "Wall time of training rounds.", run, buckets=ROUND_BUCKETS, registry=r
        )
        self._round_last = Gauge(
            "flotilla_last_round_duration_seconds", "Wall time of the last training round.", run, registry=r
        )
        self._round_failures = Counter(
            "flotilla_round_failures", "Failed replies counted by the server, over all rounds.", run, registry=r
        )

        self._train_last = Gauge(
            "flotilla_device_round_train_seconds", "Training time of the device in the last round it trained.",
            DEVICE_LABELS, registry=r,
        )
        self._train_total = Counter(
            "flotilla_device_train_seconds", "Training time of the device over all rounds.", DEVICE_LABELS, registry=r
        )
        self._samples = Counter(
            "flotilla_device_samples", "Samples the device trained on, over all rounds.", DEVICE_LABELS, registry=r
        )
        self._rounds_trained = Counter(
            "flotilla_device_rounds", "Rounds the device took part in.", DEVICE_LABELS, registry=r
        )
        self._throughput = Gauge(
            "flotilla_device_throughput_samples_per_second", "Training throughput of the device in its last round.",
            DEVICE_LABELS, registry=r,
        )
        self._failures = Counter(
            "flotilla_device_failures", "Failures of the device, by reason.", (*DEVICE_LABELS, "reason"), registry=r
        )
        self._usage = _UsageCollector(run_id)
        r.register(self._usage)

        # Counters and histograms exist from the start at 0, so queries and rate() see them before the first event.
        self._round_failures.labels(run_id)
        self._round_hist.labels(run_id)

        if target_rounds is not None:
            self.set_target_rounds(target_rounds)

    # -- feeding ---------------------------------------------------------------
    def set_target_rounds(self, rounds: int) -> None:
        self._rounds_target.labels(self.run_id).set(rounds)

    def set_status(self, status: str) -> None:
        if status not in RUN_STATES:
            raise ValueError(f"status: {status!r} is not one of {', '.join(RUN_STATES)}")
        self._status.labels(self.run_id).state(status)

    def observe_round(self, record: dict) -> bool:
        """Feed one metrics.jsonl record. Returns False for a round already seen.

        Idempotent per round number, so a follower that re-reads the file
        (restart, truncation) never counts a round twice.
        """
        rnd = int(record["round"])
        with self._lock:
            if rnd in self._seen_rounds:
                return False
            self._seen_rounds.add(rnd)
            latest = rnd == max(self._seen_rounds)
        run = self.run_id
        if latest:  # gauges describe the newest round even if lines arrive out of order
            self._round.labels(run).set(rnd)
            if _is_number(record.get("accuracy")):
                self._accuracy.labels(run).set(record["accuracy"])
            if _is_number(record.get("loss")):
                self._loss.labels(run).set(record["loss"])
        devices = record.get("devices") or []
        if rnd > 0 and _is_number(record.get("wall_s")):  # round 0 is the initial evaluation only
            self._round_hist.labels(run).observe(record["wall_s"])
            if latest:
                self._round_last.labels(run).set(record["wall_s"])
        if record.get("failures"):
            self._round_failures.labels(run).inc(record["failures"])
        for d in devices:
            name, cls = str(d["name"]), str(d.get("class") or "unknown")
            self._device_class[name] = cls
            labels = (run, name, cls)
            if d.get("status", "ok") not in ("ok", "partial", "stale"):
                if d["status"] in ("late", "lost"):  # busy/async: by design, not failures
                    self.observe_failure(name, str(d["status"]))
                continue
            self._rounds_trained.labels(*labels).inc()
            if _is_number(d.get("train_s")):
                self._train_total.labels(*labels).inc(max(0.0, d["train_s"]))
                if latest:
                    self._train_last.labels(*labels).set(d["train_s"])
            if _is_number(d.get("samples")):
                self._samples.labels(*labels).inc(max(0, d["samples"]))
            if latest and _is_number(d.get("throughput_sps")):
                self._throughput.labels(*labels).set(d["throughput_sps"])
        return True

    def observe_device_usage(
        self,
        device: str,
        device_class: str,
        cpu_seconds_total: float,
        memory_bytes: float,
        memory_limit_bytes: float | None = None,
        cpu_quota: float | None = None,
    ) -> None:
        self._device_class[device] = device_class
        self._usage.update(
            device,
            device_class=device_class,
            cpu_seconds_total=float(cpu_seconds_total),
            memory_bytes=float(memory_bytes),
            memory_limit_bytes=None if memory_limit_bytes is None else float(memory_limit_bytes),
            cpu_quota=None if cpu_quota is None else float(cpu_quota),
        )

    def observe_failure(self, device: str, reason: str) -> None:
        cls = self._device_class.get(device, "unknown")
        self._failures.labels(self.run_id, device, cls, reason[:MAX_REASON_LEN] or "unknown").inc()

    # -- introspection ---------------------------------------------------------
    def metric_names(self) -> set[str]:
        """Every sample name this exporter can expose (e.g. flotilla_device_samples_total).

        Derived from the registry's families and their types, so it also lists
        series that have no samples yet.
        """
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"),
            "info": ("_info",),
        }
        names = set()
        for family in self.registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        return names

    # -- serving ---------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics in a daemon thread; return the bound port (port 0 picks a free one)."""
        if self._server is not None:
            raise RuntimeError(f"exporter for {self.run_id} already serves on port {self._server.server_port}")
        try:
            self._server, self._server_thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise OSError(f"metrics port {addr}:{port}: {e.strerror or e}; pick another port or 0 for any") from e
        return self._server.server_port

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_port

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, thread = self._server, self._server_thread
        self._server = self._server_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def follow_run(
    run_dir: str | Path,
    exporter: FlotillaExporter,
    stop_event: threading.Event,
    usage_fn: Callable[[], Iterable[dict]] | None = None,
    interval: float = 1.0,
    usage_log: bool = True,
) -> int:
    """Tail a run record into `exporter` until `stop_event` is set; return rounds observed.

    Every `interval` seconds: new metrics.jsonl lines go to observe_round,
    state.json's status to set_status, and (if given) usage_fn() -> [{"device",
    "device_class", "cpu_seconds_total", "memory_bytes", "memory_limit_bytes"?,
    "cpu_quota"?}] to observe_device_usage. With usage_log, usage samples are
    also appended to run_dir/usage.jsonl for the report. After the stop event,
    one last read picks up the final round.
    """
    run_dir = Path(run_dir)
    metrics = JsonlTail(run_dir / "metrics.jsonl")
    observed = 0
    last_status = None
    while True:
        final = stop_event.is_set()  # set while we slept: this pass is the last read
        for record in metrics.read_new():
            try:
                observed += bool(exporter.observe_round(record))
            except (KeyError, TypeError, ValueError) as e:
                log.warning("%s: skipping a round record without the expected fields (%s)", metrics.path, e)
        status = _read_status(run_dir)
        if status in RUN_STATES and status != last_status:
            exporter.set_status(status)
            last_status = status
        if usage_fn is not None:
            _feed_usage(run_dir, exporter, usage_fn, usage_log)
        if final:
            return observed
        stop_event.wait(interval)


def _read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "state.json").read_text()).get("status")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return None


def _feed_usage(run_dir: Path, exporter: FlotillaExporter, usage_fn, usage_log: bool) -> None:
    try:
        samples = list(usage_fn())
    except Exception:  # a process that just exited must not end the follower
        log.warning("usage sampling failed; trying again next interval", exc_info=True)
        return
    now = time.time()
    lines = []
    for u in samples:
        try:
            exporter.observe_device_usage(
                u["device"],
                u.get("device_class") or u.get("class") or "unknown",
                u["cpu_seconds_total"],
                u["memory_bytes"],
                u.get("memory_limit_bytes"),
                u.get("cpu_quota"),
            )
        except (KeyError, TypeError, ValueError) as e:
            log.warning("usage sample %r lacks a field: %s", u, e)
            continue
        lines.append(json.dumps({"t": u.get("t", now), **{k: v for k, v in u.items() if k != "t"}}))
    if usage_log and lines:
        with open(run_dir / "usage.jsonl", "a") as fh:
            fh.write("\n".join(lines) + "\n")
