"""pytorchexample: the user's own model, data and training loop (nothing Flower here)."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A small CNN for 8x8 greyscale digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 32 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """The node's share of scikit-learn's bundled digits: a train and a test loader."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    part = order[partition_id::num_partitions]
    cut = int(0.8 * len(part))
    train, test = part[:cut], part[cut:]
    trainloader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True)
    testloader = DataLoader(TensorDataset(x[test], y[test]), batch_size=batch_size)
    return trainloader, testloader


def train(net: nn.Module, trainloader, epochs: int, lr: float, device: torch.device) -> float:
    """The user's training loop: Adam, cross-entropy with label smoothing."""
    net.to(device)
    net.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr * 0.1)
    running_loss, steps = 0.0, 0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            steps += 1
    return running_loss / max(steps, 1)


def test(net: nn.Module, testloader, device: torch.device) -> tuple[float, float]:
    """Loss and accuracy on the test loader."""
    net.to(device)
    net.eval()
    criterion = nn.CrossEntropyLoss()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item() * len(labels)
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
            n += len(labels)
    return loss / max(n, 1), correct / max(n, 1)
