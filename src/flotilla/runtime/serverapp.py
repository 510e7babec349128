"""`flwr-serverapp`, hosted: any app's ServerApp, observed, with its output in the run record.

The server-side SuperExec (flotilla.runtime.superexec) starts ServerApp tasks
as `python -m flotilla.runtime.serverapp ARGS` instead of `flwr-serverapp
ARGS`. This runs flwr's own `flwr_serverapp` after:
- teeing the process's output into the record's logs/serverapp.log and
  making the record's outputs/serverapp the working directory (files the app
  writes land in the record);
- handing the app an ObservingGrid (flwr.superlink.runtime.run_serverapp.run_
  is wrapped) and hooking Flower's strategy loop and the legacy History, so
  rounds, replies and the app's own evaluation reach metrics.jsonl for any app;
- shortening the reply pull back-off (engine_tuning).
The record directory comes from FLOTILLA_RECORD_DIR; without it the app runs
observed for speed only and nothing is written.
"""

from __future__ import annotations

import atexit
import inspect
import os
import sys
import time
from pathlib import Path

from flotilla import contracts
from flotilla.runtime.observer import Observer
from flotilla.runtime.observing_grid import ObservingGrid

_active: Observer | None = None


def active() -> Observer | None:
    """The observer of this ServerApp process (None under plain `flwr run`)."""
    return _active


def wrap_grid(observer: Observer) -> bool:
    """flwr's ServerApp runtime passes our grid to the app."""
    import importlib

    try:  # by module path: the package re-exports a function of the same name
        rs = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    except ImportError:
        return False
    shipped = getattr(rs, "run_", None)
    if shipped is None or getattr(shipped, "_flotilla", False):
        return shipped is not None

    def run_(*args, **kwargs):
        bound = inspect.signature(shipped).bind(*args, **kwargs)
        bound.arguments["grid"] = ObservingGrid(bound.arguments["grid"], observer)
        try:
            return shipped(*bound.args, **bound.kwargs)
        except BaseException as err:
            observer.close(error=f"{type(err).__name__}: {err}")
            raise
        finally:
            observer.close()

    run_._flotilla = True
    rs.run_ = run_
    return True


def hook_strategy_loop(observer: Observer) -> bool:
    """Flower's Message-API strategies (Strategy.start): their aggregates, central evaluation and final model."""
    try:
        from flwr.serverapp.strategy import Strategy
    except ImportError:
        return False
    shipped = Strategy.start
    if getattr(shipped, "_flotilla", False):
        return True
    sig = inspect.signature(shipped)
    if not {"evaluate_fn", "num_rounds"} <= set(sig.parameters):
        return False

    def start(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        evaluate_fn = bound.arguments.get("evaluate_fn")
        observer.num_rounds = int(bound.arguments["num_rounds"])
        if evaluate_fn is not None:
            def observed_evaluate(server_round, arrays):
                res = evaluate_fn(server_round, arrays)
                if res is not None or not getattr(self, "round_offset", 0):
                    r = server_round + getattr(self, "round_offset", 0)
                    observer.server_evaluated(r, dict(res) if res else None, done=True)
                return res

            bound.arguments["evaluate_fn"] = observed_evaluate
        train, evaluate = self.aggregate_train, self.aggregate_evaluate

        def actual(server_round: int) -> int:  # a resumed Flotilla strategy counts on from its checkpoint
            return server_round + getattr(self, "round_offset", 0)

        def aggregate_train(server_round, replies):
            arrays, metrics = train(server_round, replies)
            observer.aggregated(actual(server_round), "train", dict(metrics) if metrics else None, arrays=arrays)
            return arrays, metrics

        def aggregate_evaluate(server_round, replies):
            metrics = evaluate(server_round, replies)
            observer.aggregated(actual(server_round), "evaluate", dict(metrics) if metrics else None,
                                done=evaluate_fn is None)
            return metrics

        self.aggregate_train, self.aggregate_evaluate = aggregate_train, aggregate_evaluate
        try:
            result = shipped(*bound.args, **bound.kwargs)
        finally:
            del self.aggregate_train, self.aggregate_evaluate
        observer.strategy_finished(getattr(result, "arrays", None))
        return result

    start._flotilla = True
    Strategy.start = start
    return True


def hook_legacy_history(observer: Observer) -> bool:
    """The older server_fn / ServerAppComponents API records its rounds in a History: observe that."""
    try:
        from flwr.server.history import History
        from flwr.server.server import Server
    except ImportError:
        return False
    if getattr(History.add_loss_centralized, "_flotilla", False):
        return True
    names = ("add_loss_centralized", "add_metrics_centralized", "add_loss_distributed", "add_metrics_distributed",
             "add_metrics_distributed_fit")
    if not all(hasattr(History, n) for n in names) or not all(hasattr(Server, n) for n in ("fit", "fit_round")):
        return False
    eval_is_last = {"value": False}  # fraction_evaluate == 0: central evaluation ends the round

    def wrap(name, on_call):
        shipped = getattr(History, name)
        sig = inspect.signature(shipped)

        def hooked(self, *args, **kwargs):
            shipped(self, *args, **kwargs)
            server_round, value = list(sig.bind(self, *args, **kwargs).arguments.values())[1:3]
            on_call(int(server_round), value)

        hooked._flotilla = True
        setattr(History, name, hooked)

    wrap("add_loss_centralized", lambda r, v: observer.server_evaluated(r, None, loss=v, done=eval_is_last["value"]))
    wrap("add_metrics_centralized", lambda r, v: observer.server_evaluated(r, v, done=eval_is_last["value"]))
    wrap("add_loss_distributed", lambda r, v: observer.aggregated(r, "evaluate", {"loss": v}, done=True))
    wrap("add_metrics_distributed", lambda r, v: observer.aggregated(
        r, "evaluate", (observer.rounds[r].app_metrics.get("evaluate", {}) if r in observer.rounds else {}) | dict(v),
        done=True))
    wrap("add_metrics_distributed_fit", lambda r, v: observer.aggregated(r, "train", v))

    shipped_fit, shipped_fit_round = Server.fit, Server.fit_round

    def fit_round(self, server_round, timeout):
        out = shipped_fit_round(self, server_round, timeout)
        if out is not None and out[0] is not None:
            try:
                from flwr.app import ArrayRecord
                from flwr.common import parameters_to_ndarrays

                observer.aggregated(int(server_round), "train", None,
                                    arrays=ArrayRecord(parameters_to_ndarrays(out[0])))
            except Exception:  # noqa: BLE001 - the checkpoint is a bonus; the round stands
                pass
        return out

    Server.fit_round = fit_round

    def fit(self, num_rounds, timeout):
        observer.num_rounds = int(num_rounds)
        eval_is_last["value"] = getattr(self.strategy, "fraction_evaluate", None) == 0
        out = shipped_fit(self, num_rounds, timeout)
        try:
            from flwr.app import ArrayRecord
            from flwr.common import parameters_to_ndarrays

            observer.strategy_finished(ArrayRecord(parameters_to_ndarrays(self.parameters)))
        except Exception:  # noqa: BLE001 - the final model is a bonus; the run's outcome stands
            pass
        return out

    Server.fit = fit
    return True


def hold_until_fleet(paths: contracts.RecordPaths, lease: str | None, poll_s: float = 0.05) -> bool:
    """The app (its ServerApp's main or server_fn) runs once the driver says the fleet is connected
    (paths.fleet): flwr has by then loaded the app's module and its imports while the devices started.
    A driver that is gone (its lease stale) never says so: the app then fails at once."""
    try:
        from flwr.serverapp.server_app import ServerApp
    except ImportError:
        return False
    shipped = ServerApp.__dict__.get("__call__")
    if shipped is None:
        return False
    if getattr(shipped, "_flotilla", False):
        return True

    def __call__(self, *args, **kwargs):  # noqa: N807 (flwr's name)
        from flotilla.runtime.lease import owner_gone

        t0 = time.time()
        while not paths.fleet.exists():
            if owner_gone(lease):
                raise RuntimeError(f"the run's driver is gone (its lease {lease} is stale); not starting the app")
            time.sleep(poll_s)
        print(f"flotilla: the fleet is connected; the app starts (it waited {time.time() - t0:.1f} s for it)", flush=True)
        return shipped(self, *args, **kwargs)

    __call__._flotilla = True
    ServerApp.__call__ = __call__
    return True


def _heartbeat(path: Path, every_s: float = 0.5) -> None:
    """Touch `path` while this process runs: the driver tells a dead or frozen ServerApp by its staleness
    in seconds, where Flower would wait for its run's heartbeat to expire (a minute or more)."""
    import threading

    def beat() -> None:
        while True:
            try:
                path.touch()
            except OSError:
                pass
            time.sleep(every_s)

    threading.Thread(target=beat, name="flotilla-heartbeat", daemon=True).start()


def make_observer() -> Observer:
    record = os.environ.get(contracts.RECORD_DIR_ENV)
    exporter = None
    port = int(os.environ.get(contracts.METRICS_PORT_ENV, "0") or 0)
    if port:
        from flotilla.monitor.metrics import FlotillaExporter

        exporter = FlotillaExporter(run_id=os.environ.get(contracts.RUN_ID_ENV, ""),
                                    job=os.environ.get(contracts.JOB_NAME_ENV, ""))
        exporter.serve(port)
    return Observer(Path(record) if record else None,
                    accuracy_key=os.environ.get(contracts.ACCURACY_KEY_ENV, "accuracy"),
                    loss_key=os.environ.get(contracts.LOSS_KEY_ENV, "loss"),
                    policy=os.environ.get(contracts.POLICY_ENV, ""), exporter=exporter)


def batch_objects_if_enabled() -> bool:
    from flotilla.runtime import object_batches

    return not object_batches.enabled() or object_batches.batch_objects()


def main() -> None:
    global _active
    from flotilla.runtime.engine_tuning import shorten_pull_backoff

    record = os.environ.get(contracts.RECORD_DIR_ENV)
    if record:
        from flotilla.runtime.serverlog import tee_to

        paths = contracts.RecordPaths(Path(record))
        tee_to(paths.logs / "serverapp.log")
        work = paths.outputs / "serverapp"
        work.mkdir(parents=True, exist_ok=True)
        os.chdir(work)
    observer = _active = make_observer()
    if observer.paths is not None:
        from flotilla.runtime.checkpoint import resume_request

        observer.resume = resume_request(observer.paths)
        if observer.resume is not None:
            observer.current = observer.resume.round
            print(f"flotilla: resuming after round {observer.resume.round} (checkpoint of "
                  f"{time.strftime('%H:%M:%S', time.localtime(observer.resume.t))})", flush=True)
        (observer.paths.dir / "serverapp.pid").write_text(str(os.getpid()))
        _heartbeat(observer.paths.dir / "serverapp.heartbeat")
    atexit.register(observer.close)  # a stop (SIGTERM) ends through flwr's exit handlers and sys.exit
    hold = observer.paths is not None and os.environ.get(contracts.HOLD_FOR_FLEET_ENV) == "1"
    if hold and not hold_until_fleet(observer.paths, os.environ.get(contracts.OWNER_LEASE_ENV)):
        print("flotilla: could not hold the app until the fleet is connected; it starts at once", file=sys.stderr,
              flush=True)
    for ok, what in ((wrap_grid(observer), "observe the app's grid"),
                     (hook_strategy_loop(observer), "observe Flower's strategy loop"),
                     (hook_legacy_history(observer), "observe the legacy server loop"),
                     (shorten_pull_backoff(), "shorten the reply pull back-off"),
                     (batch_objects_if_enabled(), "batch the replies' object pulls")):
        if not ok:
            print(f"flotilla: could not {what} for this flwr version; running it as shipped", file=sys.stderr,
                  flush=True)
    from flwr.superlink.cli import flwr_serverapp

    sys.argv[0] = "flwr-serverapp"
    flwr_serverapp()


if __name__ == "__main__":
    # run the module's own copy: the app finds the observer through `flotilla.runtime.serverapp.active()`
    from flotilla.runtime.serverapp import main as _main

    _main()
