"""Batch-wise tensor transforms: the CIFAR training augmentation and the DSE's distortion.

:class:`RandomCropFlip` is the standard CIFAR augmentation (random crop with padding 4,
horizontal flip) on a whole NCHW batch; :func:`distort` is the DSE's distorted copy of the
data (brightness, contrast and saturation scaled by 0.5, section "Convergence Speed" of the
paper's DSE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import DataError

__all__ = ["RandomCropFlip", "distort"]

_LUMA = (0.299, 0.587, 0.114)


class RandomCropFlip:
    """Random crop with zero padding plus random horizontal flip, applied batch-wise.

    The standard CIFAR training augmentation (``RandomCrop(32, padding=4)`` and
    ``RandomHorizontalFlip()``), but on a whole NCHW tensor batch at once, each sample
    getting its own crop offset and flip.

    Parameters
    ----------
    padding : int (default: 4)
        Pixels added on every side before cropping back to the input size.
    flip : bool (default: True)
        Whether to flip each sample horizontally with probability 0.5.
    fill : Sequence[float] | None (default: None)
        Per-channel value of the padding. For normalised images pass the normalised value
        of black, ``(0 - mean) / std``, which is what torchvision's pipeline (pad before
        normalising) produces. None pads with 0.
    """

    def __init__(self, padding: int = 4, flip: bool = True, fill: Sequence[float] | None = None) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise DataError(f"padding must be an int >= 0, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)
        self.fill = None if fill is None else tuple(float(v) for v in fill)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch.

        Parameters
        ----------
        x : Tensor
            Images, shape (N, C, H, W).
        generator : torch.Generator | None (default: None)
            Source of randomness; None uses torch's global generator.

        Returns
        -------
        Tensor
            Augmented images, same shape and dtype.
        """
        if x.ndim != 4:
            raise DataError(f"RandomCropFlip expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if self.fill is not None and len(self.fill) != c:
            raise DataError(f"fill has {len(self.fill)} values but the batch has {c} channels")
        out = x
        if self.padding > 0 and n > 0:
            p = self.padding
            padded = x.new_empty((n, c, h + 2 * p, w + 2 * p))
            if self.fill is None:
                padded.zero_()
            else:
                padded.copy_(torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1).expand_as(padded))
            padded[:, :, p : p + h, p : p + w] = x
            oy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            rows = (oy[:, None] + torch.arange(h)[None, :]).to(x.device)
            cols = (ox[:, None] + torch.arange(w)[None, :]).to(x.device)
            idx_n = torch.arange(n, device=x.device)[:, None, None, None]
            idx_c = torch.arange(c, device=x.device)[None, :, None, None]
            out = padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip and n > 0:
            mask = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
            out = torch.where(mask, out.flip(3), out)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill})"


def _grayscale(x: Tensor) -> Tensor:
    """Luma of an (N, C, H, W) batch as (N, 1, H, W); identity for one channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def distort(
    x: Tensor,
    factor: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """The DSE's distorted copy of the data: brightness, contrast and saturation times ``factor``.

    The paper pre-trains the DSE's snapshot "on a distorted version of the dataset", with
    "brightness, contrast, and saturation [reduced] to 0.5 of the original value" for
    CIFAR. The operations follow torchvision's ``adjust_brightness``, ``adjust_contrast``
    and ``adjust_saturation`` (in this order) on images in [0, 1]: brightness blends with
    black, contrast with the image's mean grey level, saturation with the image's
    greyscale version; each clamps to [0, 1]. Greyscale images get brightness and contrast
    only.

    Parameters
    ----------
    x : Tensor
        Images, shape (N, C, H, W) with C = 1 or 3.
    factor : float (default: 0.5)
        Blend factor of every operation: 1 leaves the images unchanged, 0.5 halves
        brightness, contrast and saturation.
    mean : Sequence[float] | None (default: None)
        Per-channel normalisation mean when ``x`` is normalised (``FederatedData.mean``);
        the images are un-normalised, distorted and normalised again.
    std : Sequence[float] | None (default: None)
        Per-channel normalisation std, given together with ``mean``.

    Returns
    -------
    Tensor
        Distorted images, same shape and dtype as ``x``.
    """
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"distort expects an (N, C, H, W) float tensor with C in (1, 3), got {shape}")
    if not x.is_floating_point():
        raise DataError(f"distort expects float images in [0, 1], got dtype {x.dtype}")
    fac = float(factor)
    if not math.isfinite(fac) or fac < 0:
        raise DataError(f"factor must be finite and >= 0, got {factor!r}")
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither")
    c = x.shape[1]
    if mean is not None and std is not None:
        if len(mean) != c or len(std) != c:
            raise DataError(f"mean and std need {c} values, got {len(mean)} and {len(std)}")
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        img = x * s + m
    else:
        img = x
    img = (img * fac).clamp(0.0, 1.0)  # brightness
    grey_mean = _grayscale(img).mean(dim=(1, 2, 3), keepdim=True)
    img = (fac * img + (1.0 - fac) * grey_mean).clamp(0.0, 1.0)  # contrast
    if c == 3:
        img = (fac * img + (1.0 - fac) * _grayscale(img)).clamp(0.0, 1.0)  # saturation
    if mean is not None and std is not None:
        img = (img - m) / s
    return img
