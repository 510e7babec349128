"""Synthetic two-class data and logistic regression in NumPy."""

import numpy as np

DIM = 20


def load_data(partition_id: int, num_partitions: int, n: int = 400):
    rng = np.random.default_rng(1000 + partition_id)
    w_true = np.random.default_rng(7).normal(size=DIM)
    x = rng.normal(size=(n, DIM))
    y = (x @ w_true + 0.1 * rng.normal(size=n) > 0).astype(np.float64)
    return x, y


def initial_model():
    return [np.zeros(DIM), np.zeros(1)]


def train(model, x, y, lr: float, work_mib: int):
    # the step's working memory: a buffer of work_mib MiB, written so every page is really used
    buffer = np.ones(work_mib * 2**20 // 8)
    scale = float(buffer[::4096].sum()) / len(buffer[::4096])
    w, b = (m.copy() for m in model)
    for _ in range(5):
        p = 1 / (1 + np.exp(-(x @ w + b[0])))
        w -= lr * scale * x.T @ (p - y) / len(y)
        b -= lr * scale * np.mean(p - y)
    loss = float(-np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9)))
    return [w, b], loss


def accuracy(model, x, y) -> float:
    w, b = model
    return float(np.mean(((x @ w + b[0]) > 0) == (y > 0.5)))
