"""The FEMNIST CNN of Federated Dropout (Caldas et al. 2018) as used by DISTREAL.

5x5 conv 32 -> ReLU -> 2x2 max-pool -> 5x5 conv 64 -> ReLU -> 2x2 max-pool -> FC 256 -> ReLU
-> FC classes, on 28x28x1 input with valid padding: 4,015,616 forward MACs per sample (the
paper: 4.0 M). A plain ``nn.Module``: :func:`~flwr_distreal.models.build_model` makes it
droppable by tracing, which finds two dropout groups (the two convolutions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["FemnistCNN", "femnist_cnn", "femnist_cnn_small"]


class FemnistCNN(nn.Module):
    """Two-conv CNN for 28x28 greyscale images.

    Parameters
    ----------
    widths : sequence of int
        Filters of the two convolutions (full model: 32, 64).
    hidden : int
        Units of the hidden fully-connected layer.
    num_classes : int
        Classifier outputs (62 for FEMNIST).
    in_chans : int
        Input channels.
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64),
        hidden: int = 256,
        num_classes: int = 62,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 2 or min(widths) < 1:
            raise ValueError(f"femnist_cnn needs two positive widths, got {list(widths)}")
        w1, w2 = (int(w) for w in widths)
        self.input_shape = (in_chans, 28, 28)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, w1, 5)
        self.conv2 = nn.Conv2d(w1, w2, 5)
        self.fc1 = nn.Linear(w2 * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Convolutional part: the 4x4 feature map."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return F.max_pool2d(F.relu(self.conv2(h)), 2)

    def forward_head(self, h: Tensor) -> Tensor:
        """Classifier on the flattened feature map."""
        return self.fc2(F.relu(self.fc1(h.flatten(1))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(input_shape=(1, 28, 28))
def femnist_cnn(num_classes: int = 62, widths: Sequence[int] | None = None, **kwargs) -> FemnistCNN:
    """FEMNIST CNN, 32/64 filters, 4.02 M forward MACs."""
    return FemnistCNN(widths=widths or (32, 64), num_classes=num_classes, **kwargs)


@register_model(input_shape=(1, 28, 28))
def femnist_cnn_small(num_classes: int = 62, widths: Sequence[int] | None = None, **kwargs) -> FemnistCNN:
    """"Small network" baseline for FEMNIST: 16/32 filters, 1.20 M forward MACs, which fits the
    weakest device at 3x resource variability (4.02 M / 3 = 1.34 M)."""
    return FemnistCNN(widths=widths or (16, 32), num_classes=num_classes, **kwargs)
