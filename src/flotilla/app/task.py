"""Model, training and evaluation on numpy data. Imports torch: keep it out of the ClientApp."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Net(nn.Module):
    """A small LeNet-style CNN for 28x28 single-channel digits (~44k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32).copy()).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    return xt, torch.from_numpy(y.astype(np.int64))


def get_weights(model: nn.Module) -> tuple[list[str], list[np.ndarray]]:
    sd = model.state_dict()
    return list(sd.keys()), [v.detach().cpu().numpy() for v in sd.values()]


def set_weights(model: nn.Module, keys: list[str], arrays: list[np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays)}, strict=True)


def steps_for(num_samples: int, batch_size: int, local_epochs: float) -> int:
    return max(1, math.ceil(local_epochs * num_samples / batch_size))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    momentum: float,
    steps: int,
    seed: int,
    deadline_s: float | None = None,
    proximal_mu: float = 0.0,
    stop=None,
) -> dict:
    """SGD for `steps` mini-batches (epochs wrap around), stopping early at `deadline_s`
    or when `stop` (a threading.Event) is set.

    Returns what the server needs to weigh and time the update: steps and
    samples actually done, training seconds, mean loss.
    """
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    n = len(x)
    batch_size = min(batch_size, n)
    order = torch.randperm(n, generator=g)
    pos, done, samples, loss_sum = 0, 0, 0, 0.0
    t0 = time.perf_counter()
    while done < steps:
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if global_params is not None:  # FedProx: keep local models near the global one
            prox = sum((p - g0).pow(2).sum() for p, g0 in zip(model.parameters(), global_params))
            loss = loss + 0.5 * proximal_mu * prox
        loss.backward()
        opt.step()
        done += 1
        samples += len(idx)
        loss_sum += loss.detach().item()
        if deadline_s is not None and time.perf_counter() - t0 >= deadline_s:
            break  # partial work: the server weighs it by steps done
        if stop is not None and stop.is_set():
            break
    train_s = time.perf_counter() - t0
    return {"steps": done, "samples": samples, "train_s": train_s, "train_loss": loss_sum / max(done, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(loss, accuracy) over the whole set."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        loss += float(F.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    return loss / len(x), correct / len(x)
