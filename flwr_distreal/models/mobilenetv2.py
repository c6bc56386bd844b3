"""MobileNetV2 (Sandler et al., CVPR 2018) for 32x32 images.

The common CIFAR variant: the stem convolution has stride 1 and the first stride-2 stage of the
ImageNet network (24 filters) has stride 1, so the three remaining stride-2 stages take a 32x32
input to a **4x4** final map (the ImageNet network's 32x down-sampling becomes 8x). Everything
else is the paper's Table 2: inverted residual blocks (1x1 expansion by ``t`` - BN - ReLU6,
3x3 depthwise - BN - ReLU6, 1x1 linear projection - BN), a residual sum when the block keeps
the shape (stride 1 and equal channels), a final 1x1 convolution to 1280 channels, global
average pooling, dropout and the classifier. Channels are ``width_mult`` times the paper's,
rounded to multiples of 8 as torchvision does; the last 1x1 convolution keeps 1280 channels for
``width_mult <= 1``.

A plain ``nn.Module`` (timm's one-file-per-architecture manner);
:func:`~flwr_distreal.models.build_model` makes it droppable by tracing. The tracer finds 25
dropout groups: each block's expansion with its depthwise convolution (a depthwise convolution
couples its output with its input; the first block, without expansion, couples the stem), each
stage's projections (coupled by the residual sums), and the final 1x1 convolution.

* ``mobilenet_v2``: width 1.0, 87,976,448 forward MACs per 32x32 sample.
* ``mobilenet_v2_small``: width 0.3725, 21,784,576 MACs, 0.2476 of the full model's: the "small
  network" that fits the weakest device at resource variability 4 (a quarter of the full
  model's budget). Channel rounding to multiples of 8 makes the MACs a step function of the
  width: 0.3725 is the widest it allows under a quarter (widths in (0.3704, 0.375) give the
  same channels; 0.375 needs 0.2545, 0.5 needs 0.318 since the last 1x1 convolution keeps
  1280 channels, and the paper's 0.35 only 0.177).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._registry import register_model

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2", "mobilenet_v2_small"]

#: (expansion t, channels c, blocks n, stride s) per stage: the paper's Table 2, with the
#: second stage's stride 2 made 1 for 32x32 inputs.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never by more than 10 % downwards
    (MobileNet's channel rounding, as in the TensorFlow and torchvision implementations)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU6(nn.Sequential):
    """Convolution without bias, BatchNorm, ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise (3x3) - project (1x1, linear), plus the input when shapes match.

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output channels.
    stride : int
        Stride of the depthwise convolution (1 or 2).
    expand_ratio : int
        Expansion factor ``t``; 1 drops the expansion convolution.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (stride-1 stem, stride-1 second stage; 4x4 final map).

    Parameters
    ----------
    width_mult : float
        Multiplier of every layer's channels (rounded to multiples of 8); the last 1x1
        convolution has ``1280 * max(1, width_mult)`` channels.
    num_classes : int
        Classifier outputs.
    in_chans : int
        Input channels.
    drop_rate : float
        Dropout before the classifier (0.2, as in the paper's implementation).
    settings : sequence of (t, c, n, s), optional
        Stages; default :data:`CIFAR_SETTINGS`.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        settings: Sequence[tuple[int, int, int, int]] | None = None,
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"MobileNetV2 width_mult must be positive, got {width_mult}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"MobileNetV2 drop_rate must be in [0, 1), got {drop_rate}")
        settings = tuple(settings or CIFAR_SETTINGS)
        self.input_shape = (in_chans, 32, 32)
        self.num_classes = num_classes
        in_ch = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_chans, in_ch, kernel=3, stride=1)]
        self.feature_info = [dict(num_chs=in_ch, reduction=1, module="features.0")]
        reduction = 1
        for t, c, n, s in settings:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
            reduction *= s
            self.feature_info.append(dict(num_chs=out_ch, reduction=reduction, module=f"features.{len(features) - 1}"))
        features.append(ConvBNReLU6(in_ch, self.num_features, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, inverted residual stages and the last 1x1 convolution: the 4x4 feature map."""
        return self.features(x)

    def forward_head(self, h: Tensor) -> Tensor:
        """Global average pooling, dropout and the classifier."""
        return self.classifier(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(input_shape=(3, 32, 32))
def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2 (width 1.0) for 32x32 inputs: 25 dropout groups, 87.98 M forward MACs."""
    return MobileNetV2(width_mult=width_mult, num_classes=num_classes, **kwargs)


@register_model(input_shape=(3, 32, 32))
def mobilenet_v2_small(num_classes: int = 10, width_mult: float = 0.3725, **kwargs) -> MobileNetV2:
    """"Small network" for MobileNetV2 at variability 4: width 0.3725, 21.78 M MACs, 0.2476 of
    ``mobilenet_v2``'s, so it fits the weakest device (1/4 of the full model's budget); the
    next channel step (width 0.375) would need 0.2545."""
    return MobileNetV2(width_mult=width_mult, num_classes=num_classes, **kwargs)
