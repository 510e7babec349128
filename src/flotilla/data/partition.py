"""Split a dataset's sample indices among devices: iid, Dirichlet non-IID, or label shards.

Pure numpy. Every partitioner is deterministic by seed, returns disjoint index
arrays that together cover every sample, and leaves no partition empty.
"""

from __future__ import annotations

import numpy as np

PARTITION_KINDS = ("iid", "dirichlet", "shards")

# Dirichlet draws are repeated until every partition holds this many samples
# (the usual value in NIID-Bench / FedMA code), or fewer when data is tiny.
DIRICHLET_MIN_SIZE = 10
DIRICHLET_MAX_DRAWS = 100


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    kind: str,
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 42,
) -> list[np.ndarray]:
    """Indices into `labels` for each of `num_partitions` partitions (int64 arrays)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    n = len(labels)
    if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > n:
        raise ValueError(
            f"cannot split {n} samples among {num_partitions} devices; use fewer devices or a larger dataset"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif kind == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"partition.alpha must be > 0, got {alpha!r}")
        parts = _dirichlet(labels, num_partitions, float(alpha), rng)
    elif kind == "shards":
        if not isinstance(shards_per_device, (int, np.integer)) or shards_per_device < 1:
            raise ValueError(f"partition.shards_per_device must be a positive integer, got {shards_per_device!r}")
        parts = _shards(labels, num_partitions, int(shards_per_device), rng)
    else:
        raise ValueError(f"partition.kind {kind!r} is unknown; use one of {', '.join(PARTITION_KINDS)}")
    return [np.asarray(p, dtype=np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) shares across partitions (Hsu et al. 2019; NIID-Bench variant).

    Partitions already above the mean size get no more of later classes, which
    keeps sizes from running away when alpha is small (the NIID-Bench rule).
    """
    n = len(labels)
    min_size = min(DIRICHLET_MIN_SIZE, n // num_partitions)
    classes = np.unique(labels)
    best: list[list[int]] | None = None
    for _ in range(DIRICHLET_MAX_DRAWS):
        buckets: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            sizes = np.array([len(b) for b in buckets])
            shares = shares * (sizes < n / num_partitions)
            if shares.sum() == 0:  # every partition at the mean already: spread evenly
                shares = np.ones(num_partitions)
            cuts = (np.cumsum(shares / shares.sum()) * len(idx)).astype(int)[:-1]
            for bucket, chunk in zip(buckets, np.split(idx, cuts)):
                bucket.extend(chunk.tolist())
        smallest = min(len(b) for b in buckets)
        if smallest >= min_size:
            return [rng.permutation(b) for b in buckets]
        if best is None or smallest > min(len(b) for b in best):
            best = buckets
    # Too few classes for too many partitions at this alpha: top up the
    # smallest partitions from the largest rather than fail the run.
    assert best is not None
    _top_up(best, min_size, rng)
    return [rng.permutation(b) for b in best]


def _top_up(buckets: list[list[int]], min_size: int, rng: np.random.Generator) -> None:
    for small in sorted(range(len(buckets)), key=lambda i: len(buckets[i])):
        while len(buckets[small]) < min_size:
            largest = max(range(len(buckets)), key=lambda i: len(buckets[i]))
            donor = buckets[largest]
            buckets[small].append(donor.pop(int(rng.integers(len(donor)))))


def _shards(labels: np.ndarray, num_partitions: int, per_device: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into equal shards, deal `per_device` shards to each partition."""
    n = len(labels)
    num_shards = num_partitions * per_device
    if num_shards > n:
        raise ValueError(
            f"shards: {num_partitions} devices x {per_device} shards_per_device = {num_shards} shards "
            f"but only {n} samples; lower partition.shards_per_device or use fewer devices"
        )
    # Shuffle first so the stable sort leaves each class in random order.
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards)
    return [
        np.concatenate([shards[s] for s in order[i * per_device : (i + 1) * per_device]])
        for i in range(num_partitions)
    ]


def partition_report(labels: np.ndarray, parts: list[np.ndarray]) -> list[dict]:
    """Size and per-label counts of each partition, for the run record."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    report = []
    for i, idx in enumerate(parts):
        counts = {int(c): int(k) for c, k in zip(classes, _count(labels[idx], classes))}
        report.append(
            {
                "partition": i,
                "size": int(len(idx)),
                "labels": counts,
                "distinct_labels": sum(1 for k in counts.values() if k),
            }
        )
    return report


def _count(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return (values[:, None] == classes[None, :]).sum(axis=0)


def label_entropy(labels: np.ndarray, idx: np.ndarray) -> float:
    """Shannon entropy (bits) of one partition's label mix: log2(10) when balanced, 0 when single-label."""
    _, counts = np.unique(np.asarray(labels)[idx], return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())
