"""fixed-rounds: binary logistic regression on synthetic Gaussian data."""

import numpy as np

NUM_FEATURES = 10
SAMPLES_PER_PARTITION = 400


def _true_weights():
    return np.random.default_rng(1234).normal(size=NUM_FEATURES)


def make_data(seed: int, n: int):
    """Points drawn from N(0, I), labelled by a fixed hyperplane with 5% noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES))
    y = (x @ _true_weights() > 0).astype(np.float64)
    flip = rng.random(n) < 0.05
    y[flip] = 1.0 - y[flip]
    return x, y


def load_data(partition_id: int, num_partitions: int):
    """Each partition draws its own sample; returns (x_train, y_train, x_val, y_val)."""
    x, y = make_data(seed=100 + partition_id, n=SAMPLES_PER_PARTITION)
    n_train = int(0.8 * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def initial_model():
    return [np.zeros(NUM_FEATURES), np.zeros(1)]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def train(model, x, y, steps: int, lr: float):
    """Full-batch gradient descent; returns (model, final training loss)."""
    w, b = model[0].copy(), model[1].copy()
    for _ in range(steps):
        p = _sigmoid(x @ w + b)
        w -= lr * x.T @ (p - y) / len(y)
        b -= lr * np.array([np.mean(p - y)])
    loss, _ = evaluate(w, b, x, y)
    return [w, b], loss


def evaluate(w, b, x, y):
    """Return (log loss, accuracy)."""
    p = np.clip(_sigmoid(x @ w + b), 1e-12, 1 - 1e-12)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(loss), float(np.mean((p > 0.5) == (y > 0.5)))
