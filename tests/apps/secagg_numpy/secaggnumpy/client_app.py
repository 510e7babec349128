"""secagg-numpy: ClientApp (legacy NumPyClient, wrapped by Flower's secaggplus_mod)."""

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context

DIM = 20


def load_data(partition_id: int, n: int = 300):
    rng = np.random.default_rng(500 + partition_id)
    w_true = np.random.default_rng(3).normal(size=DIM)
    x = rng.normal(size=(n, DIM))
    return x, (x @ w_true > 0).astype(np.float64)


class LogRegClient(NumPyClient):
    def __init__(self, partition_id: int, lr: float, work_mib: int) -> None:
        self.x, self.y = load_data(partition_id)
        self.lr, self.work_mib = lr, work_mib

    def fit(self, parameters, config):
        buffer = np.ones(self.work_mib * 2**20 // 8)  # the step's working memory, every page written
        w = parameters[0] * float(buffer[::4096].mean())
        for _ in range(5):
            p = 1 / (1 + np.exp(-(self.x @ w)))
            w = w - self.lr * self.x.T @ (p - self.y) / len(self.y)
        return [w], len(self.x), {}

    def evaluate(self, parameters, config):
        acc = float(np.mean(((self.x @ parameters[0]) > 0) == (self.y > 0.5)))
        return 1.0 - acc, len(self.x), {"accuracy": acc}


def client_fn(context: Context):
    return LogRegClient(context.node_config["partition-id"], context.run_config["lr"],
                        context.run_config["work-mib"]).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
