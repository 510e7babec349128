"""`Auto`: Flotilla's `auto` heterogeneity policy around your own Flower strategy.

    from flwr.serverapp.strategy import FedAvg
    from flotilla.strategy import Auto

    strategy = Auto(FedAvg(fraction_evaluate=0.0), batch_size=32, lr=0.02, local_epochs=2)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=5, evaluate_fn=central_eval)

Training rounds run as under the built-in app's `auto` policy (it is the same
code: FleetAuto, AutoPlanner, FleetGrid, aggregate_updates): each device gets
its own batch size, learning rate, local steps and training deadline from its
measured throughput and per-round overhead; the round stops waiting at a
deadline; partial work is accepted; late replies are applied as stale
updates (1 / (1 + staleness)); updates are averaged with FedNova.

What stays the wrapped strategy's:
- node sampling and the train config (its `configure_train` runs every round;
  Auto takes the nodes it sampled and the config it built, FedProx's
  `proximal-mu` or your own keys, and adds each device's planned work);
- the server-side step: FedAvg and FedProx take the FedNova average as the
  new model; FedAvgM, FedAdam, FedYogi and FedAdagrad apply their own
  aggregate_train to it (server momentum / adaptive step on top of the
  FedNova average, with their own state);
- evaluation: configure_evaluate / aggregate_evaluate (devices still busy with
  a training message are left out of federated evaluation: their evaluation
  would queue behind it) and `evaluate_fn`;
- the train metrics' aggregation (`train_metrics_aggr_fn`).
Strategies that average replies their own way (FedMedian, Krum, Bulyan,
FedTrimmedAvg, QFedAvg, DP wrappers, XGBoost) are refused.

Settings (explicit arguments win): under Flotilla the defaults come from the
run's job (`$FLOTILLA_RECORD_DIR/job.yaml`): `train.batch_size`, `train.lr`,
`train.local_epochs`, `heterogeneity.deadline_factor` and `.proximal_mu`; the
job's `heterogeneity.policy` switches the policy (anything but `auto` runs the
wrapped strategy unchanged: the same app runs under `none` as a baseline);
the devices' CPU quotas (and memory, with `memory_per_sample`) come from the
job's device classes. Device names come from Flotilla's observer, and each
round's per-device records (statuses ok / partial / stale / async / busy /
late / lost, planned and done steps, deadlines) go into metrics.jsonl.

Under plain `flwr run` (no Flotilla host) the policy still runs: devices are
named node-<id>, limits are what the replies report, nothing is recorded,
and the defaults are batch 32, lr 0.02, 1 local epoch, deadline factor 1.5.

The ClientApp side is `flotilla.client.Budget` (see its docstring).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Result

from flotilla.contracts import RECORD_DIR_ENV, RecordPaths
from flotilla.strategy.fleet import FleetAuto
from flotilla.strategy.grid import FleetGrid
from flotilla.strategy.planner import MAX_STALENESS, AutoPlanner

#: aggregate_train implementations Auto can put on top of its FedNova average, by class
SERVER_STEPS: dict[Callable, str] = {
    FedAvg.aggregate_train: "fedavg",  # also FedProx and FedOpt: the average is the new model
    FedAvgM.aggregate_train: "fedavgm",
    FedAdam.aggregate_train: "fedadam",
    FedYogi.aggregate_train: "fedyogi",
    FedAdagrad.aggregate_train: "fedadagrad",
}

DEFAULTS = {"batch_size": 32, "lr": 0.02, "local_epochs": 1.0, "deadline_factor": 1.5, "proximal_mu": 0.0}


def job_settings(record_dir: str | Path | None = None) -> dict:
    """What a run's job says for Auto: train.*, heterogeneity.*, the fleet's size and device classes.

    Reads `record_dir`/job.yaml (default: $FLOTILLA_RECORD_DIR); {} outside Flotilla.
    """
    record_dir = record_dir or os.environ.get(RECORD_DIR_ENV)
    if not record_dir:
        return {}
    path = Path(record_dir) / "job.yaml"
    try:
        import yaml

        doc = yaml.safe_load(path.read_text()) or {}
    except Exception as err:  # noqa: BLE001 - a missing or broken job.yaml must not stop the app
        print(f"[flotilla] Auto: could not read {path} ({type(err).__name__}: {err}); using Auto's defaults",
              file=sys.stderr, flush=True)
        return {}
    if not isinstance(doc, dict):
        return {}
    train, het = doc.get("train") or {}, doc.get("heterogeneity") or {}
    out: dict = {k: train[k] for k in ("batch_size", "lr", "local_epochs") if train.get(k) is not None}
    out |= {k: het[k] for k in ("policy", "deadline_factor", "proximal_mu") if het.get(k) is not None}
    classes = {}
    for d in doc.get("devices") or []:
        if isinstance(d, dict) and d.get("name"):
            classes[str(d["name"])] = {"cpus": d.get("cpus"), "memory": _bytes(d.get("memory")),
                                       "count": int(d.get("count", 1))}
    if classes:
        out["classes"] = classes
        out["expected_devices"] = sum(c["count"] for c in classes.values())
    return out


def _bytes(v) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return int(v)
    try:
        from flotilla.job import parse_memory

        return parse_memory(v)
    except (ImportError, ValueError):
        return None


def _observer():
    """Flotilla's observer of this ServerApp process; None under plain `flwr run`."""
    mod = sys.modules.get("flotilla.runtime.serverapp")
    return mod.active() if mod is not None else None


class Auto(FleetAuto):
    """Flotilla's `auto` policy for the training rounds of a wrapped FedAvg-family strategy.

    Args:
        strategy: a Message-API strategy from flwr.serverapp.strategy: FedAvg,
            FedProx, FedAvgM, FedAdam, FedYogi or FedAdagrad (or a subclass that
            does not override aggregate_train).
        batch_size, lr: the batch and the learning rate tuned for it (the
            planner scales lr with the batch it gives a device).
        local_epochs: each round's work, in passes over the fleet's data
            (round 1 does twice this, from the initial model).
        deadline_factor: the round deadline is this x the median planned device time (>= 1).
        proximal_mu: FedProx's term, sent as `proximal-mu` (default: the wrapped
            FedProx's, else the job's).
        enabled: run the policy? Default: under Flotilla, when the job's
            heterogeneity.policy is `auto`; without Flotilla, yes.
            Disabled, Auto is the wrapped strategy, unchanged.
        expected_devices: round 1 waits (up to fleet_wait_s) for this many
            devices (default: the job's fleet, else the strategy's min_available_nodes).
        memory_per_sample, memory_base_bytes: size batches to fit each device's
            memory limit (bytes per training sample, bytes before the first
            batch); default: no memory sizing.
        max_staleness: late updates older than this many rounds are dropped.
        record_dir: the run record to read job.yaml from (default $FLOTILLA_RECORD_DIR).
    """

    def __init__(self, strategy: FedAvg, *, batch_size: int | None = None, lr: float | None = None,
                 local_epochs: float | None = None, deadline_factor: float | None = None,
                 proximal_mu: float | None = None, enabled: bool | None = None,
                 expected_devices: int | None = None, fleet_wait_s: float = 60.0,
                 memory_per_sample: int | None = None, memory_base_bytes: int = 0,
                 max_staleness: int = MAX_STALENESS, record_dir: str | Path | None = None) -> None:
        check_wrappable(strategy)
        job = job_settings(record_dir)
        explicit = {"batch_size": batch_size, "lr": lr, "local_epochs": local_epochs,
                    "deadline_factor": deadline_factor, "proximal_mu": proximal_mu}
        inner_mu = getattr(strategy, "proximal_mu", None)
        settings, sources = {}, {}
        for key, value in explicit.items():
            if value is not None:
                settings[key], sources[key] = value, "argument"
            elif key == "proximal_mu" and inner_mu:
                settings[key], sources[key] = float(inner_mu), type(strategy).__name__
            elif key in job:
                settings[key], sources[key] = job[key], "job"
            else:
                settings[key], sources[key] = DEFAULTS[key], "default"
        _check_settings(settings, memory_per_sample)
        if enabled is None:
            enabled = job.get("policy", "auto") == "auto"
            sources["enabled"] = "job" if "policy" in job else "default"
        else:
            sources["enabled"] = "argument"
        self.strategy = strategy
        self.enabled = bool(enabled)
        self.settings = settings | {"enabled": self.enabled}
        self.sources = sources
        self.memory_per_sample = memory_per_sample
        self._classes: dict[str, dict] = job.get("classes", {})
        record = record_dir or os.environ.get(RECORD_DIR_ENV)
        self._record_dir = Path(record) if record else None
        self._server_step_kind = SERVER_STEPS[type(strategy).aggregate_train]
        self._warned: set[str] = set()
        planner = AutoPlanner(batch_size=int(settings["batch_size"]), lr=float(settings["lr"]),
                              local_epochs=float(settings["local_epochs"]),
                              deadline_factor=float(settings["deadline_factor"]),
                              base_bytes=int(memory_base_bytes), bytes_per_sample=int(memory_per_sample or 1),
                              max_staleness=max_staleness)
        super().__init__(
            planner=planner, proximal_mu=float(settings["proximal_mu"]), max_staleness=max_staleness,
            train_ahead=False,  # flotilla.client trains only inside the handler
            expected_devices=int(expected_devices or job.get("expected_devices") or strategy.min_available_nodes),
            fleet_wait_s=fleet_wait_s,
            fraction_train=strategy.fraction_train, fraction_evaluate=strategy.fraction_evaluate,
            min_train_nodes=strategy.min_train_nodes, min_evaluate_nodes=strategy.min_evaluate_nodes,
            min_available_nodes=strategy.min_available_nodes, weighted_by_key=strategy.weighted_by_key,
            arrayrecord_key=strategy.arrayrecord_key, configrecord_key=strategy.configrecord_key,
            train_metrics_aggr_fn=strategy.train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=strategy.evaluate_metrics_aggr_fn,
        )

    # -- the run -------------------------------------------------------------------
    def summary(self) -> None:
        from logging import INFO

        from flwr.supercore import log

        if self.enabled:
            parts = ", ".join(f"{k}={self.settings[k]} ({self.sources[k]})" for k in DEFAULTS)
            log(INFO, "\t├──> Flotilla auto policy: %s", parts)
        else:
            log(INFO, "\t├──> Flotilla auto policy: off (%s); running %s unchanged", self.sources["enabled"],
                type(self.strategy).__name__)
        self.strategy.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's Strategy.start; with the policy on, over a FleetGrid (round deadlines, late replies)."""
        args = dict(initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                    train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        if not self.enabled:
            return self.strategy.start(grid=grid, **args)
        observer = _observer()
        resume = observer.resume if observer is not None else None
        if resume is not None:  # `flotilla resume` / recovery: go on from the checkpoint's model, round, estimates
            self.round_offset = resume.round
            self.load_state_dict(resume.state)
            args["initial_arrays"] = resume.arrays()
        if observer is not None:
            observer.state_provider = self.state_dict
        own = not isinstance(grid, FleetGrid)
        lost_file = RecordPaths(self._record_dir).lost_devices if self._record_dir else None
        fleet = FleetGrid(grid, poll_s=0.1, lost_file=lost_file, observer=observer) if own else grid
        self.node_names = fleet.node_names  # one map: the grid gives up on lost devices by name
        try:
            return super().start(grid=fleet, **args)
        finally:
            if own:
                fleet.close()

    # -- training --------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.enabled:
            return self.strategy.configure_train(server_round, arrays, config, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def _candidates(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    grid: Grid) -> tuple[list[int], dict[int, dict]]:
        """The wrapped strategy samples the nodes and builds their config (and sets its server-step state)."""
        self._learn_names(grid)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        nodes, configs = [], {}
        for m in messages:
            n = m.metadata.dst_node_id
            cfg = m.content[self.configrecord_key] if self.configrecord_key in m.content else {}
            nodes.append(n)
            configs[n] = dict(cfg)
        return nodes, configs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.enabled:
            return self.strategy.aggregate_train(server_round, replies)
        replies = list(replies)
        for m in replies:
            self._complete(m)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._after_round(server_round)
        return arrays, metrics

    def _take_late(self, server_round: int):
        for late in self._late:
            self._complete(late.message)
        return super()._take_late(server_round)

    def _server_step(self, server_round: int, averaged: ArrayRecord) -> ArrayRecord:
        """FedAvg/FedProx: the FedNova average. FedAvgM/FedOpt: their aggregate_train applied to it
        (one reply holding the average, so their own average is the FedNova one)."""
        if self._server_step_kind == "fedavg":
            return averaged
        s = self.strategy
        reply = Message(RecordDict({s.arrayrecord_key: averaged, "metrics": MetricRecord({s.weighted_by_key: 1})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        stepped, _ = s.aggregate_train(server_round, [reply])
        return stepped if stepped is not None else averaged

    # -- evaluation: the wrapped strategy's -----------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        busy = getattr(grid, "busy_nodes", set)() if self.enabled else set()
        return [m for m in messages if m.metadata.dst_node_id not in busy]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # -- helpers ---------------------------------------------------------------------
    def _learn_names(self, grid: Grid) -> None:
        """Device names and classes from Flotilla's observer; their limits from the job's classes."""
        obs = _observer()
        for n in grid.get_node_ids():
            name, cls = obs.name_of(n) if obs is not None else (f"node-{n}", "")
            if dict.get(self.node_names, n) == name:  # set here before (not only known to the observer)
                continue
            self.node_names[n] = name
            if cls:
                self.device_classes[name] = cls
            c = self._classes.get(cls, {})
            self.planner.add_capability(name, cls, c.get("cpus"),
                                        c.get("memory") if self.memory_per_sample else None)

    def _complete(self, msg: Message) -> None:
        """A reply without the contract's `steps`: counted as the work it was given (warned once)."""
        if msg.has_error() or "metrics" not in msg.content:
            return
        m = msg.content["metrics"]
        if "steps" in m:
            return
        name = self._name(msg.metadata.src_node_id)
        a = self._sent.get(msg.metadata.src_node_id)
        n = int(m.get(self.weighted_by_key, 0))
        batch = int(m.get("batch-size", a.batch if a else self.planner.batch_size))
        epochs = a.local_epochs if a and a.local_epochs else self.planner.local_epochs
        m["steps"] = int(a.steps) if a and a.steps else max(1, math.ceil(epochs * n / max(1, batch)))
        if name not in self._warned:
            self._warned.add(name)
            print(f"[flotilla] Auto: the reply from {name} has no 'steps' metric (see flotilla.client); counting "
                  f"it as the {m['steps']} steps it was given. Without 'train-s' its throughput is not measured.",
                  file=sys.stderr, flush=True)

    def _after_round(self, server_round: int) -> None:
        """Fill what a user app's replies do not carry, and hand the round's records to the observer."""
        devices = self.round_devices.get(server_round, [])
        for rec in devices:
            rec["class"] = rec.get("class") or self.device_classes.get(rec["name"], "")
            for k in ("cpus", "memory"):  # flotilla.client reports 0 for unknown
                if k in rec and not rec[k]:
                    del rec[k]
            if rec.get("cpus") and rec["status"] in ("ok", "partial", "stale"):
                self.planner.add_capability(rec["name"], rec["class"], rec["cpus"],
                                            rec.get("memory") if self.memory_per_sample else None)
        info = self.round_info.get(server_round, {})
        detail = {"devices": devices, "failures": self.round_failures.get(server_round, 0),
                  "lost": [d["name"] for d in devices if d["status"] == "lost"], "policy": "auto",
                  "deadline_s": info.get("deadline_s")}
        detail |= {k: info[k] for k in ("planned_round_s", "left_out") if k in info}
        attach_round_detail(_observer(), server_round, detail)


def attach_round_detail(observer, server_round: int, detail: dict) -> bool:
    """Give the observer this round's per-device records, to be merged into its metrics.jsonl row, which is
    still written when the app's evaluation ends the round."""
    return observer is not None and observer.round_detail(server_round, detail, emit=False)


def check_wrappable(strategy) -> None:
    """Refuse, with a reason, a strategy Auto cannot run (raises TypeError)."""
    if isinstance(strategy, FleetAuto):
        raise TypeError("Auto wraps a Flower strategy, not another Flotilla policy: pass the inner FedAvg")
    if not isinstance(strategy, FedAvg):
        mod = type(strategy).__module__
        hint = (" (that is the legacy flwr.server.strategy API: use flwr.serverapp.strategy's Message-API "
                "strategies)" if mod.startswith("flwr.server.") else "")
        raise TypeError(f"Auto wraps a FedAvg-family strategy from flwr.serverapp.strategy (FedAvg, FedProx, "
                        f"FedAvgM, FedAdam, FedYogi, FedAdagrad); got {type(strategy).__name__}{hint}")
    impl = type(strategy).aggregate_train
    if impl not in SERVER_STEPS:
        owner = next((c.__name__ for c in type(strategy).__mro__ if "aggregate_train" in vars(c)), "?")
        raise TypeError(
            f"Auto cannot wrap {type(strategy).__name__}: its aggregate_train ({owner}'s) combines the replies "
            "its own way, and Auto averages them itself (FedNova over devices that did unequal work, with "
            "stale updates). Robust or private aggregation (FedMedian, FedTrimmedAvg, Krum, Bulyan, QFedAvg, "
            "DP wrappers) does not combine with that; wrap FedAvg, FedProx, FedAvgM, FedAdam, FedYogi or "
            "FedAdagrad, or run this strategy without Auto (heterogeneity.policy none/manual)")


def _check_settings(s: dict, memory_per_sample: int | None) -> None:
    def bad(key: str, why: str):
        raise ValueError(f"Auto: {key}={s[key]!r}: {why}")

    if isinstance(s["batch_size"], bool) or not float(s["batch_size"]).is_integer() or s["batch_size"] < 1:
        bad("batch_size", "must be an integer >= 1")
    if not s["lr"] > 0:
        bad("lr", "must be > 0")
    if not s["local_epochs"] > 0:
        bad("local_epochs", "must be > 0")
    if not s["deadline_factor"] >= 1:
        bad("deadline_factor", "must be >= 1 (the median device must make the deadline)")
    if not s["proximal_mu"] >= 0:
        bad("proximal_mu", "must be >= 0")
    if memory_per_sample is not None and memory_per_sample < 1:
        raise ValueError(f"Auto: memory_per_sample={memory_per_sample!r}: must be >= 1 byte")
