"""DenseNet-BC (Huang et al. 2017) for 32x32 images, built from structured-dropout layers.

Growth rate k = 12, bottleneck 4k, compression 0.5, first convolution 2k filters, three dense
blocks (32x32, 16x16, 8x8) separated by transitions, pre-activation (BN-ReLU-Conv) layers.
Every convolution is a dropout layer: the first convolution, both convolutions of every dense
layer and each transition convolution. Layers per block: ``n = (depth - 4) // 6``, so
DenseNet-BC-40 has 6 (39 dropout layers, 72.4 M forward MACs), DenseNet-BC-100 has 16
(99 dropout layers, 288 M MACs); depths that are not ``6n + 4`` round down (DenseNet-BC-19
has 2 layers per block: 15 dropout layers).

A plain ``nn.Module``: :func:`~flwr_distreal.models.build_model` makes it droppable by tracing.
Dropping filters of a dense layer shrinks the channels that every later layer of its block and
the following transition read; the tracer finds that from the concatenations (offset ranges),
so nothing here declares which layer reads which channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["DenseNetBC", "densenet_bc", "densenet_bc_19", "densenet_bc_40", "densenet_bc_100", "default_widths"]


def _layers_per_block(depth: int) -> int:
    n = (depth - 4) // 6
    if n < 1:
        raise ValueError(f"DenseNet-BC depth must be at least 10 (6n + 4 with n >= 1), got {depth}")
    return n


def default_widths(depth: int, growth: int = 12, compression: float = 0.5) -> list[int]:
    """Filters per dropout layer of the full DenseNet-BC, in forward order."""
    n = _layers_per_block(depth)
    widths = [2 * growth]
    channels = 2 * growth
    for block in range(3):
        for _ in range(n):
            widths += [4 * growth, growth]
            channels += growth
        if block < 2:
            channels = int(channels * compression)
            widths.append(channels)
    return widths


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(4k) - BN-ReLU-Conv3x3(k), output concatenated to the input."""

    def __init__(self, in_ch: int, bottleneck: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, bottleneck, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return torch.cat([x, h], 1)


class _Transition(nn.Module):
    """BN-ReLU-Conv1x1 (compression) - 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNetBC(nn.Module):
    """DenseNet-BC for 32x32 inputs (every convolution is a dropout group once made droppable).

    Parameters
    ----------
    depth : int
        Network depth; ``(depth - 4) // 6`` dense layers per block.
    growth : int
        Growth rate k (filters of each 3x3 convolution).
    compression : float
        Transition compression factor.
    num_classes : int
        Classifier outputs.
    widths : sequence of int, optional
        Filters per convolution in forward order, overriding the architecture's (natively
        narrow reference networks, HeteroFL submodels). Input channels follow from them.
    in_chans : int
        Input channels.
    """

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        compression: float = 0.5,
        num_classes: int = 10,
        widths: Sequence[int] | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        n = _layers_per_block(depth)
        full = default_widths(depth, growth, compression)
        widths = list(full if widths is None else widths)
        if len(widths) != len(full) or min(widths) < 1:
            raise ValueError(
                f"densenet_bc depth {depth} needs {len(full)} positive widths, got {len(widths)}"
            )
        self.input_shape = (in_chans, 32, 32)
        self.num_classes = num_classes
        self.depth = depth
        it = iter(widths)
        w0 = next(it)
        self.conv0 = nn.Conv2d(in_chans, w0, 3, padding=1, bias=False)
        channels = w0
        # Registered in forward order (block1, trans1, block2, ...): the dropout-vector order.
        self._stages: list[str] = []
        for block in range(3):
            layers = nn.ModuleList()
            for _ in range(n):
                w1, w2 = next(it), next(it)
                layers.append(_DenseLayer(channels, w1, w2))
                channels += w2
            self.add_module(f"block{block + 1}", layers)
            self._stages.append(f"block{block + 1}")
            if block < 2:
                wt = next(it)
                self.add_module(f"trans{block + 1}", _Transition(channels, wt))
                self._stages.append(f"trans{block + 1}")
                channels = wt
        self.norm_final = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Everything up to the final BN-ReLU: the 8x8 feature map."""
        h = self.conv0(x)
        for stage in self._stages:
            module = getattr(self, stage)
            if isinstance(module, nn.ModuleList):
                for layer in module:
                    h = layer(h)
            else:
                h = module(h)
        return F.relu(self.norm_final(h))

    def forward_head(self, h: Tensor) -> Tensor:
        """Global average pooling and the classifier."""
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def densenet_bc(depth: int, num_classes: int = 10, **kwargs) -> DenseNetBC:
    """DenseNet-BC with k = 12 of any depth (``(depth - 4) // 6`` layers per block)."""
    return DenseNetBC(depth=depth, num_classes=num_classes, **kwargs)


@register_model(input_shape=(3, 32, 32))
def densenet_bc_19(num_classes: int = 10, **kwargs) -> DenseNetBC:
    """DenseNet-BC-19: the paper's "small network" for CIFAR-10 (2 layers per block)."""
    return densenet_bc(19, num_classes=num_classes, **kwargs)


@register_model(input_shape=(3, 32, 32))
def densenet_bc_40(num_classes: int = 10, **kwargs) -> DenseNetBC:
    """DenseNet-BC-40, k = 12: the paper's CIFAR-10 model (39 dropout layers, 72.4 M MACs)."""
    return densenet_bc(40, num_classes=num_classes, **kwargs)


@register_model(input_shape=(3, 32, 32))
def densenet_bc_100(num_classes: int = 100, **kwargs) -> DenseNetBC:
    """DenseNet-BC-100, k = 12: the paper's CIFAR-100 model (99 dropout layers, 288 M MACs)."""
    return densenet_bc(100, num_classes=num_classes, **kwargs)
