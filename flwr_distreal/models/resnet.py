"""ResNets for 32x32 images: CIFAR ResNet-20 (He et al. 2016) and the CIFAR ResNet-18 of the
heterogeneous-FL benchmarks (HeteroFL, FjORD, FedRolex).

Plain ``nn.Module`` files in timm's manner; :func:`~flwr_distreal.models.build_model` makes them
droppable by tracing. The residual sums couple channels: a stage's output channels (the block
outputs and the shortcut that feeds them) form one dropout group, each block's inner
convolution another. Shortcuts that change shape are 1x1 convolutions with BatchNorm ("option
B" of He et al.; the CIFAR ResNet-20 paper pads with zeros instead, "option A", which adds no
parameters: option B here adds 2,592 + 10,368 weights to ResNet-20's 0.27 M and 0.6 % MACs).

* ``resnet20``: 3 stages of 3 basic blocks, 16/32/64 filters; 12 dropout groups,
  40.8 M forward MACs per 32x32 sample.
* ``resnet20_small``: 8/16/31 filters, the "small network" for variability 4 (0.248 of the
  MACs: it fits the weakest device's quarter of the full model's budget).
* ``resnet18``: 4 stages of 2 basic blocks, 64/128/256/512 filters, stride-1 3x3 stem and no
  max-pool (the CIFAR variant of HeteroFL, FjORD and FedRolex); 12 dropout groups, 0.56 G MACs.
* ``resnet18_small``: 32/64/128/254 filters, the "small network" for variability 4 (0.2499 of
  the MACs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet18", "resnet18_small", "resnet20", "resnet20_small"]


class BasicBlock(nn.Module):
    """3x3 conv - BN - ReLU - 3x3 conv - BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet of basic blocks for 32x32 inputs: 3x3 stem, stages, global pooling, classifier.

    Parameters
    ----------
    blocks : sequence of int
        Basic blocks per stage (``(3, 3, 3)`` for ResNet-20, ``(2, 2, 2, 2)`` for ResNet-18).
    widths : sequence of int
        Filters per stage; the stem has ``widths[0]``. Every stage after the first halves the
        resolution.
    num_classes : int
        Classifier outputs.
    in_chans : int
        Input channels.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or min(widths) < 1 or min(blocks) < 1:
            raise ValueError(f"CifarResNet needs one positive width per stage, got blocks={list(blocks)} widths={list(widths)}")
        self.input_shape = (in_chans, 32, 32)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and stages: the last stage's feature map."""
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return out

    def forward_head(self, h: Tensor) -> Tensor:
        """Global average pooling and the classifier."""
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(input_shape=(3, 32, 32))
def resnet20(num_classes: int = 10, widths: Sequence[int] | None = None, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016, section 4.2): 16/32/64 filters, 3 blocks per stage."""
    return CifarResNet((3, 3, 3), widths or (16, 32, 64), num_classes=num_classes, **kwargs)


@register_model(input_shape=(3, 32, 32))
def resnet20_small(num_classes: int = 10, widths: Sequence[int] | None = None, **kwargs) -> CifarResNet:
    """"Small network" for ResNet-20 at variability 4: 8/16/31 filters, 10.12 M MACs, 0.248 of
    ResNet-20's, so it fits the weakest device (1/4 of the full model's budget); half the
    filters (8/16/32) would need 0.253."""
    return CifarResNet((3, 3, 3), widths or (8, 16, 31), num_classes=num_classes, **kwargs)


@register_model(input_shape=(3, 32, 32))
def resnet18(num_classes: int = 10, widths: Sequence[int] | None = None, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 (HeteroFL, FjORD, FedRolex): 64/128/256/512 filters, 2 blocks per stage."""
    return CifarResNet((2, 2, 2, 2), widths or (64, 128, 256, 512), num_classes=num_classes, **kwargs)


@register_model(input_shape=(3, 32, 32))
def resnet18_small(num_classes: int = 10, widths: Sequence[int] | None = None, **kwargs) -> CifarResNet:
    """"Small network" for ResNet-18 at variability 4: 32/64/128/254 filters, 138,817,708 MACs,
    0.2499 of ResNet-18's 555,422,720, so it fits the weakest device (1/4 of the full model's
    budget); half the filters (32/64/128/256) would need 0.2508 (the stem reads 3 channels, so
    its cost only halves)."""
    return CifarResNet((2, 2, 2, 2), widths or (32, 64, 128, 254), num_classes=num_classes, **kwargs)
