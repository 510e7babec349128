"""legacy-numpy: a one-hidden-layer MLP written in NumPy, and the digits data."""

import importlib.util
from pathlib import Path

import numpy as np

NUM_FEATURES = 64
NUM_CLASSES = 10


def _read_digits():
    """scikit-learn's bundled digits, read without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
            if csv.exists():
                data = np.loadtxt(csv, delimiter=",")
                return data[:, :-1] / 16.0, data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def load_data(partition_id: int, num_partitions: int):
    """Return the (train, val) split of one partition; 15% of all data is central."""
    x, y = _read_digits()
    order = np.random.default_rng(2024).permutation(len(x))
    n_central = int(0.15 * len(x))
    part = np.array_split(order[n_central:], num_partitions)[partition_id]
    n_train = int(0.8 * len(part))
    return (x[part[:n_train]], y[part[:n_train]]), (x[part[n_train:]], y[part[n_train:]])


def load_central_data():
    """The 15% of the digits no client holds."""
    x, y = _read_digits()
    order = np.random.default_rng(2024).permutation(len(x))
    central = order[: int(0.15 * len(x))]
    return x[central], y[central]


def init_weights(hidden_units: int):
    """Glorot-initialised [W1, b1, W2, b2]."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(0, np.sqrt(2 / (NUM_FEATURES + hidden_units)), (NUM_FEATURES, hidden_units))
    w2 = rng.normal(0, np.sqrt(2 / (hidden_units + NUM_CLASSES)), (hidden_units, NUM_CLASSES))
    return [w1, np.zeros(hidden_units), w2, np.zeros(NUM_CLASSES)]


def _forward(weights, x):
    w1, b1, w2, b2 = weights
    hidden = np.maximum(x @ w1 + b1, 0.0)
    logits = hidden @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return hidden, probs


def train(weights, data, epochs: int, lr: float, batch_size: int = 16):
    """SGD with manual backprop; returns the new weights and the mean batch loss."""
    x, y = data
    w1, b1, w2, b2 = (w.copy() for w in weights)
    rng = np.random.default_rng()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            hidden, probs = _forward([w1, b1, w2, b2], xb)
            losses.append(float(-np.mean(np.log(probs[np.arange(len(yb)), yb] + 1e-12))))
            d_logits = probs
            d_logits[np.arange(len(yb)), yb] -= 1.0
            d_logits /= len(yb)
            d_hidden = (d_logits @ w2.T) * (hidden > 0)
            w2 -= lr * hidden.T @ d_logits
            b2 -= lr * d_logits.sum(axis=0)
            w1 -= lr * xb.T @ d_hidden
            b1 -= lr * d_hidden.sum(axis=0)
    return [w1, b1, w2, b2], float(np.mean(losses))


def test(weights, data):
    """Return (loss, accuracy)."""
    x, y = data
    _, probs = _forward(weights, x)
    loss = float(-np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12)))
    return loss, float(np.mean(probs.argmax(axis=1) == y))
