"""The warm per-device trainer.

Flower 1.4x spawns a fresh ClientApp process for every message; importing
torch and loading data in each would cost seconds per round. Instead each
device runs one trainer process (inside the device's sandbox, next to its
SuperNode) that keeps torch, the model and its partition loaded; the thin
ClientApp hands it work over a Unix socket. Without a trainer (plain
`flwr run`) the ClientApp runs the same `Trainer` in-process.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import tomllib
import traceback
from functools import lru_cache
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np

from flotilla.contracts import DEVICE_MEMORY_ENV, RUN_CONFIG_FILE


def _f(cfg: dict, key: str, default=None):
    v = cfg.get(key, default)
    return default if v in (None, "") else v


AHEAD_MAX_S = 120.0  # a device whose next message never comes (the run ended) stops by itself
NOTHING_AHEAD = {"steps": 0, "samples": 0, "train_s": 0.0}
AHEAD_MAX_FACTOR = 16  # steps trained ahead: at most this many times the last round's own steps


class TrainAhead:
    """Training between a reply and the device's next train message (policy auto's `train-ahead`).

    Between rounds a device would idle while its reply travels, the server
    aggregates and the next message arrives (the per-round overhead). Instead
    it keeps training its local model, at the lowest CPU priority so the
    SuperNode and ClientApp still get the device's quota first. When the next
    round's global model arrives, the progress made meanwhile (local model now
    minus the model it replied with) is carried onto it, as in Overlap
    Local-SGD / delayed averaging (Wang et al. 2020, Zhou et al. 2020), and
    its steps count in the round's update. At most `max_steps` (the last
    round's own steps x AHEAD_MAX_FACTOR by default): the carried part stays bounded.
    """

    def __init__(self, model, x, y, cfg: dict, max_steps: int, seed: int) -> None:
        self.model = model
        self.sent = {k: t.detach().clone() for k, t in model.state_dict().items()}
        self.stop = threading.Event()
        self.result = NOTHING_AHEAD
        self.thread = threading.Thread(target=self._run, args=(x, y, cfg, max_steps, seed), name="train-ahead",
                                       daemon=True)
        self.thread.start()

    def _run(self, x, y, cfg: dict, max_steps: int, seed: int) -> None:
        from flotilla.app.task import train

        try:  # Linux: nice applies per thread; lowering it needs no privilege
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        self.result = train(
            self.model, x, y, batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
            momentum=float(_f(cfg, "momentum", 0.0)), steps=max_steps, seed=seed,
            deadline_s=float(_f(cfg, "ahead-max-s", AHEAD_MAX_S)), proximal_mu=float(_f(cfg, "proximal-mu", 0.0)),
            stop=self.stop,
        )

    def halt(self, timeout: float | None = None) -> None:
        self.stop.set()
        self.thread.join(timeout)

    def finish(self) -> tuple[dict, dict]:
        """Stop; return (the local progress since the reply, per float tensor; steps/samples/seconds done)."""
        self.halt()
        now = self.model.state_dict()
        delta = {k: now[k] - v for k, v in self.sent.items() if v.is_floating_point()}
        return delta, self.result


class Trainer:
    def __init__(self, threads: int | None = None) -> None:
        import torch

        from flotilla.app.task import Net

        if threads:
            torch.set_num_threads(threads)
        self.model = Net()
        self.throughput_sps: float | None = None
        self._ahead: TrainAhead | None = None
        self._next_ahead: tuple | None = None  # what to train ahead on once the reply is out
        self._warm_up()

    def _warm_up(self) -> None:
        """Two SGD steps at start-up, so the first round does not pay for torch's lazy init:
        the first optimizer alone imports ~1 s of torch internals (9 s at 0.125 CPU)."""
        import torch

        from flotilla.app.task import Net, train

        train(Net(), torch.zeros(16, 1, 28, 28), torch.zeros(16, dtype=torch.long), batch_size=8, lr=0.01,
              momentum=0.9, steps=2, seed=0)

    @staticmethod
    @lru_cache(maxsize=4)
    def _partition(dataset, path, test_fraction, kind, alpha, shards, seed, pid, n):
        from flotilla.app.task import to_tensors
        from flotilla.data import load_partition

        x, y = load_partition(dataset, path or None, test_fraction, kind, alpha, shards, seed, pid, n)
        return to_tensors(x, y)

    def partition(self, cfg: dict):
        return self._partition(
            cfg["dataset"], _f(cfg, "data-path", ""), float(cfg["test-fraction"]), cfg["partition"],
            float(cfg["alpha"]), int(cfg["shards-per-device"]), int(cfg["partition-seed"]),
            int(cfg["partition-id"]), int(cfg["num-partitions"]),
        )

    def train(self, keys: list[str], arrays: list[np.ndarray], cfg: dict) -> tuple[list[np.ndarray], dict]:
        """Train from the global model `arrays`; under train-ahead, with the progress made since the last reply."""
        from flotilla.app.task import get_weights, set_weights, steps_for, train

        ahead = self._ahead.finish() if self._ahead else None
        self._ahead = None
        x, y = self.partition(cfg)
        set_weights(self.model, keys, arrays)
        carried = NOTHING_AHEAD
        if ahead and _f(cfg, "train-ahead", 0) and ahead[1]["steps"] > 0:
            delta, done = ahead
            state = self.model.state_dict()
            if all(k in state and state[k].shape == d.shape for k, d in delta.items()):  # else a new model: drop it
                for k, d in delta.items():
                    state[k].add_(d)
                carried = done
        batch = int(cfg["batch-size"])
        steps = int(_f(cfg, "local-steps", 0)) or steps_for(len(x), batch, float(cfg["local-epochs"]))
        deadline = _f(cfg, "deadline-s")
        seed = int(_f(cfg, "seed", 0)) * 100003 + int(cfg["partition-id"]) * 1009 + int(_f(cfg, "server-round", 0))
        res = train(
            self.model, x, y, batch_size=batch, lr=float(cfg["lr"]), momentum=float(_f(cfg, "momentum", 0.0)),
            steps=steps, seed=seed, deadline_s=float(deadline) if deadline else None,
            proximal_mu=float(_f(cfg, "proximal-mu", 0.0)),
        )
        self.throughput_sps = res["samples"] / res["train_s"] if res["train_s"] > 0 else None
        _, out = get_weights(self.model)
        out = [a.copy() for a in out]  # the model trains on (ahead) while these are sent
        res |= {"ahead_steps": carried["steps"], "ahead_samples": carried["samples"],
                "ahead_s": round(carried["train_s"], 4)}
        res |= {"batch_size": min(batch, len(x)), "lr": float(cfg["lr"]), "partition_size": len(x)}
        res |= {k: v for k, v in self.limits().items() if v is not None}  # a throttle shows in the next reply
        if _f(cfg, "train-ahead", 0):
            max_steps = int(_f(cfg, "ahead-max-steps", 0)) or AHEAD_MAX_FACTOR * max(res["steps"], 1)
            self._next_ahead = (x, y, cfg, max_steps, seed + 7919)
        return out, res

    def exit_now(self) -> None:
        """SIGTERM: stop training ahead, then leave at once. (Raising SystemExit could land in a
        __del__ and be ignored, and torch aborts an interpreter shutdown with a thread mid-step.)"""
        if self._ahead is not None:
            self._ahead.halt(timeout=5)
        os._exit(0)

    def after_reply(self) -> None:
        """The reply is out: train ahead if the round asked for it."""
        if self._next_ahead is not None and self._ahead is None:
            self._ahead = TrainAhead(self.model, *self._next_ahead)
        self._next_ahead = None

    @staticmethod
    def limits() -> dict:
        """Effective CPU quota and memory limit of this process (cgroups); None where unknown."""
        try:
            from flotilla.sandbox.cgroups import effective_limits_of_self

            limits = effective_limits_of_self()
        except Exception:  # no cgroup view (macOS, odd containers): report unknown limits
            return {"cpus": None, "memory": None}
        if limits.get("memory") and os.environ.get(DEVICE_MEMORY_ENV):  # a shared fleet: the device's own limit
            limits["memory"] = int(os.environ[DEVICE_MEMORY_ENV])
        return limits

    def capability(self, cfg: dict | None = None) -> dict:
        """Limits and throughput; given the run's config, also loads the device's partition now
        (the query before round 1), so round 1 does not pay for it: at 0.125 CPU that is ~10 s."""
        cap: dict = {"pid": os.getpid(), "threads": _threads()}
        cap |= self.limits()
        cap["throughput_sps"] = self.throughput_sps
        if cfg and "dataset" in cfg and "partition-id" in cfg:
            cap["partition_size"] = len(self.partition(cfg)[0])
        return cap


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# flwr's `key=value key2="text"` syntax for a node config (flwr.common.config.parse_config_args), parsed here
# with the standard library: importing flwr would add ~33 MB to every trainer that does not share a zygote
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def startup_config(record: str | None, node_config: str) -> dict | None:
    """The config the device's messages will carry (the run's config file under the node's; the query adds
    nothing to it), or None without the run's config file in the record."""
    path = Path(record or "") / RUN_CONFIG_FILE
    if not record or not path.is_file():
        return None
    from flotilla.appspec import flatten

    with open(path, "rb") as fh:
        run_config = flatten(tomllib.load(fh))
    return run_config | flatten(tomllib.loads("\n".join(f"{k} = {v}" for k, v in _PAIR.findall(node_config))))


def startup_capability(trainer: Trainer, cfg: dict | None) -> dict | None:
    """The capability report the server's query would get, made before any message (the partition loaded
    with it): the ServerApp reads it from the ready file instead of asking each device over the grid."""
    if cfg is None:
        return None
    try:
        return trainer.capability(cfg)
    except Exception as err:  # noqa: BLE001 - the server asks by query instead; say why here
        print(
            f"flotilla trainer: no start-up capability ({type(err).__name__}: {err}); the server will ask",
            file=sys.stderr,
            flush=True,
        )
        return None


def serve(socket_path: str, threads: int | None, record: str | None = None, node_config: str = "") -> None:
    trainer = Trainer(threads)
    cap = startup_capability(trainer, startup_config(record, node_config))
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    old_umask = os.umask(0o177)  # socket readable by this user only
    listener = Listener(socket_path, family="AF_UNIX")
    os.umask(old_umask)
    signal.signal(signal.SIGTERM, lambda *_: trainer.exit_now())
    print(f"trainer ready on {socket_path} (threads={_threads()})", flush=True)
    from flotilla.runtime.preload import mark_ready

    mark_ready("trainer ready", **({"capability": cap} if cap else {}))
    try:
        while True:
            with listener.accept() as conn:
                try:
                    op, payload = conn.recv()
                    if op == "train":
                        reply = ("ok", trainer.train(payload["keys"], payload["arrays"], payload["config"]))
                    elif op == "capability":
                        reply = ("ok", trainer.capability((payload or {}).get("config")))
                    elif op == "ping":
                        reply = ("ok", "pong")
                    else:
                        reply = ("error", f"unknown operation {op!r}")
                except Exception:
                    reply = ("error", traceback.format_exc())
                    print(reply[1], file=sys.stderr, flush=True)
                try:
                    conn.send(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the ClientApp went away (run stopped); keep serving
                trainer.after_reply()
    finally:
        listener.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="Flotilla warm trainer (one per device)")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--record", help="the run record (its run config: the capability is reported at start-up)")
    ap.add_argument("--node-config", default="", help="the device's node config (its partition)")
    args = ap.parse_args()
    serve(args.socket, args.threads, args.record, args.node_config)


if __name__ == "__main__":
    main()
