"""msg-numpy: model, data and training loop in plain NumPy."""

import importlib.util
from pathlib import Path

import numpy as np

NUM_FEATURES = 64  # 8x8 pixels
NUM_CLASSES = 10
SEED = 42


def _read_digits():
    """Return scikit-learn's bundled 8x8 digits as (X, y).

    Reads the CSV that ships inside the scikit-learn wheel directly, because
    `import sklearn` alone costs ~2 s in every ClientApp process. Falls back to
    `load_digits` if the file is not where we expect it.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
            if csv.exists():
                data = np.loadtxt(csv, delimiter=",")
                return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    return load_digits(return_X_y=True)


def _shuffled_digits():
    x, y = _read_digits()
    x = (x / 16.0).astype(np.float64)
    order = np.random.default_rng(SEED).permutation(len(x))
    return x[order], y[order]


def load_data(partition_id: int, num_partitions: int):
    """Return (x_train, y_train, x_val, y_val) of one IID partition.

    The first 20% of the shuffled digits are kept aside for the server's
    central evaluation; the rest is split into `num_partitions` parts, and each
    part into 80% train / 20% validation.
    """
    x, y = _shuffled_digits()
    n_central = len(x) // 5
    x, y = x[n_central:], y[n_central:]
    idx = np.array_split(np.arange(len(x)), num_partitions)[partition_id]
    n_train = int(0.8 * len(idx))
    train_idx, val_idx = idx[:n_train], idx[n_train:]
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def load_centralized_dataset():
    """Return the held-out (x, y) the ServerApp evaluates the global model on."""
    x, y = _shuffled_digits()
    n_central = len(x) // 5
    return x[:n_central], y[:n_central]


def get_initial_model():
    """Weights and bias of the softmax regression, as a list of NDArrays."""
    rng = np.random.default_rng(0)
    weights = rng.normal(0.0, 0.01, size=(NUM_FEATURES, NUM_CLASSES))
    bias = np.zeros(NUM_CLASSES)
    return [weights, bias]


def _softmax(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def train(model, x, y, epochs: int, lr: float, batch_size: int = 32):
    """Mini-batch gradient descent on the cross-entropy. Returns mean loss."""
    weights, bias = (m.copy() for m in model)
    rng = np.random.default_rng()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            xb, yb = x[batch], y[batch]
            probs = _softmax(xb @ weights + bias)
            losses.append(-np.mean(np.log(probs[np.arange(len(yb)), yb] + 1e-12)))
            probs[np.arange(len(yb)), yb] -= 1.0
            grad = probs / len(yb)
            weights -= lr * (xb.T @ grad)
            bias -= lr * grad.sum(axis=0)
    return [weights, bias], float(np.mean(losses))


def test(model, x, y):
    """Return (loss, accuracy) of the model on (x, y)."""
    weights, bias = model
    probs = _softmax(x @ weights + bias)
    loss = -np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12))
    accuracy = np.mean(probs.argmax(axis=1) == y)
    return float(loss), float(accuracy)
