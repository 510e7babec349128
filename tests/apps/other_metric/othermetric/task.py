"""other-metric: softmax regression on Gaussian blobs, in NumPy."""

import numpy as np

NUM_CLASSES = 4
NUM_FEATURES = 8


def _centers():
    return np.random.default_rng(99).normal(0.0, 2.0, size=(NUM_CLASSES, NUM_FEATURES))


def load_data(partition_id: int, num_partitions: int, n: int = 500):
    """Blobs drawn with a per-partition seed; returns (x_train, y_train, x_val, y_val)."""
    rng = np.random.default_rng(1000 + partition_id * 7 + num_partitions)
    y = rng.integers(0, NUM_CLASSES, size=n)
    x = _centers()[y] + rng.normal(0.0, 1.5, size=(n, NUM_FEATURES))
    n_train = int(0.8 * n)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def init_model():
    return [np.zeros((NUM_FEATURES, NUM_CLASSES)), np.zeros(NUM_CLASSES)]


def _probs(model, x):
    logits = x @ model[0] + model[1]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def train(model, x, y, epochs: int, lr: float, shuffle: bool, batch_size: int = 50):
    w, b = model[0].copy(), model[1].copy()
    rng = np.random.default_rng()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            p = _probs([w, b], x[idx])
            losses.append(-np.mean(np.log(p[np.arange(len(idx)), y[idx]] + 1e-12)))
            p[np.arange(len(idx)), y[idx]] -= 1.0
            w -= lr * x[idx].T @ p / len(idx)
            b -= lr * p.mean(axis=0)
    return [w, b], float(np.mean(losses))


def test(model, x, y):
    p = _probs(model, x)
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
    return loss, float(np.mean(p.argmax(axis=1) == y))
