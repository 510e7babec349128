"""sklearn-ints: model helpers and data for a LogisticRegression on the digits."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

N_CLASSES = 10
N_FEATURES = 64
UNIQUE_LABELS = list(range(N_CLASSES))


def create_model(local_epochs: int, c: float) -> LogisticRegression:
    """A LogisticRegression that continues from whatever coef_ it is given.

    `local_epochs` goes straight into `max_iter`, which scikit-learn validates
    as an int: a float such as 1.0 raises InvalidParameterError in `fit`.
    """
    model = LogisticRegression(
        C=c,
        max_iter=local_epochs,  # local epochs
        warm_start=True,  # start from the received coef_/intercept_
    )
    set_initial_params(model)
    return model


def set_initial_params(model: LogisticRegression) -> None:
    """Zero parameters: scikit-learn has none until `fit` has run once."""
    model.classes_ = np.arange(N_CLASSES)
    model.coef_ = np.zeros((N_CLASSES, N_FEATURES))
    if model.fit_intercept:
        model.intercept_ = np.zeros((N_CLASSES,))


def get_model_params(model: LogisticRegression):
    if model.fit_intercept:
        return [model.coef_, model.intercept_]
    return [model.coef_]


def set_model_params(model: LogisticRegression, params) -> LogisticRegression:
    model.coef_ = params[0]
    if model.fit_intercept:
        model.intercept_ = params[1]
    return model


def _shuffled():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]


def load_data(partition_id: int, num_partitions: int):
    """(X_train, y_train, X_test, y_test) of one partition; the first 300 are central."""
    x, y = _shuffled()
    x, y = x[300:], y[300:]
    xs, ys = np.array_split(x, num_partitions), np.array_split(y, num_partitions)
    xp, yp = xs[partition_id], ys[partition_id]
    n_train = int(0.8 * len(xp))
    return xp[:n_train], yp[:n_train], xp[n_train:], yp[n_train:]


def load_central_data():
    x, y = _shuffled()
    return x[:300], y[:300]
