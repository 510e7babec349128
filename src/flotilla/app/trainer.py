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
import signal
import sys
import traceback
from functools import lru_cache
from multiprocessing.connection import Listener

import numpy as np


def _f(cfg: dict, key: str, default=None):
    v = cfg.get(key, default)
    return default if v in (None, "") else v


class Trainer:
    def __init__(self, threads: int | None = None) -> None:
        import torch

        from flotilla.app.task import Net

        if threads:
            torch.set_num_threads(threads)
        self.model = Net()
        self.throughput_sps: float | None = None
        self._warm_up()

    def _warm_up(self) -> None:
        """One forward/backward pass at start-up, so the first round does not pay for torch's lazy init."""
        import torch
        import torch.nn.functional as F

        from flotilla.app.task import Net

        m = Net()
        F.cross_entropy(m(torch.zeros(8, 1, 28, 28)), torch.zeros(8, dtype=torch.long)).backward()

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
        from flotilla.app.task import get_weights, set_weights, steps_for, train

        x, y = self.partition(cfg)
        set_weights(self.model, keys, arrays)
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
        res |= {"batch_size": min(batch, len(x)), "lr": float(cfg["lr"]), "partition_size": len(x)}
        res |= {k: v for k, v in self.limits().items() if v is not None}  # a throttle shows in the next reply
        return out, res

    @staticmethod
    def limits() -> dict:
        """Effective CPU quota and memory limit of this process (cgroups); None where unknown."""
        try:
            from flotilla.sandbox.cgroups import effective_limits_of_self

            return effective_limits_of_self()
        except Exception:  # no cgroup view (macOS, odd containers): report unknown limits
            return {"cpus": None, "memory": None}

    def capability(self) -> dict:
        cap: dict = {"pid": os.getpid(), "threads": _threads()}
        cap |= self.limits()
        cap["throughput_sps"] = self.throughput_sps
        return cap


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def serve(socket_path: str, threads: int | None) -> None:
    trainer = Trainer(threads)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    old_umask = os.umask(0o177)  # socket readable by this user only
    listener = Listener(socket_path, family="AF_UNIX")
    os.umask(old_umask)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"trainer ready on {socket_path} (threads={_threads()})", flush=True)
    try:
        while True:
            with listener.accept() as conn:
                try:
                    op, payload = conn.recv()
                    if op == "train":
                        reply = ("ok", trainer.train(payload["keys"], payload["arrays"], payload["config"]))
                    elif op == "capability":
                        reply = ("ok", trainer.capability())
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
    finally:
        listener.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="Flotilla warm trainer (one per device)")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    serve(args.socket, args.threads)


if __name__ == "__main__":
    main()
