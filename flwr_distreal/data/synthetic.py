"""A FEMNIST-shaped synthetic federation of any size, made lazily per device (no download).

``dataset=synthetic``: 3,550 devices by default (the paper's FEMNIST setting, Table 1 of Rapp et
al., AAAI 2022: 62 classes, 1x28x28 images, 181 +- 70.7 samples per device), but any number of
devices, each with its own label mix. A device's samples are made from ``(seed, device)`` only
when the device is used (:class:`~flwr_distreal.data.lazy.LazyPartitions`), so a federation of
10,000 devices costs its sizes up front and nothing per device after; every process (server,
simulation workers) makes the same samples for the same device.

The images are learnable but not real handwriting: each class has a smooth random prototype
(8x8 noise upsampled bilinearly), a device draws its labels from its own Dirichlet(``alpha``)
class mix (non-IID, like FEMNIST's writers) and adds its own brightness offset and pixel noise.
It is meant for measuring what a federation's size costs, not for accuracy claims.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .errors import DataError, _check_int
from .federated import FederatedData
from .lazy import LazyPartitions
from .registry import register_dataset

__all__ = ["SyntheticDevices", "load_synthetic", "synthetic_sizes"]

#: FEMNIST's samples per device in the paper's Table 1 (mean, standard deviation).
FEMNIST_SIZE = (181.0, 70.7)


def synthetic_sizes(
    num_devices: int, seed: int, samples_per_device: int | None = None, min_samples: int = 10
) -> np.ndarray:
    """Samples of every device: ``samples_per_device`` each, or FEMNIST's 181 +- 70.7 (normal,
    rounded, at least ``min_samples``), drawn from ``seed``."""
    n = _check_int("num_devices", num_devices, 1)
    if samples_per_device is not None:
        return np.full(n, _check_int("samples_per_device", samples_per_device, 1), dtype=np.int64)
    low = _check_int("min_samples", min_samples, 1)
    mean, std = FEMNIST_SIZE
    sizes = np.rint(np.random.default_rng([int(seed), 0x512E]).normal(mean, std, n)).astype(np.int64)
    return np.maximum(sizes, low)


class SyntheticDevices:
    """Makes one device's samples from ``(seed, device)`` (picklable; used by :class:`LazyPartitions`).

    Parameters
    ----------
    prototypes : torch.Tensor
        One (C, H, W) image per class, in [0, 1].
    sizes : np.ndarray
        Samples of every device.
    seed : int
        The dataset's seed.
    alpha : float
        Dirichlet concentration of every device's class mix.
    noise : float
        Standard deviation of the pixel noise.
    """

    def __init__(self, prototypes: torch.Tensor, sizes: np.ndarray, seed: int, alpha: float, noise: float) -> None:
        self.prototypes = prototypes
        self.sizes = sizes
        self.seed = int(seed)
        self.alpha = float(alpha)
        self.noise = float(noise)

    def samples(self, rng: np.random.Generator, labels: np.ndarray, offset: float) -> torch.Tensor:
        """Images of ``labels``: the class prototypes plus ``offset`` and pixel noise, in [0, 1]."""
        base = self.prototypes[torch.as_tensor(labels, dtype=torch.int64)]
        noise = torch.as_tensor(rng.standard_normal(base.shape, dtype=np.float32) * self.noise)
        return (base + offset + noise).clamp_(0.0, 1.0).contiguous()

    def __call__(self, device: int) -> TensorDataset:
        rng = np.random.default_rng([self.seed, 0xD7, int(device)])
        num_classes = self.prototypes.shape[0]
        mix = rng.dirichlet(np.full(num_classes, self.alpha))
        labels = rng.choice(num_classes, size=int(self.sizes[device]), p=mix).astype(np.int64)
        x = self.samples(rng, labels, float(rng.uniform(-0.1, 0.1)))
        return TensorDataset(x, torch.as_tensor(labels))


@register_dataset("synthetic")
def load_synthetic(
    num_devices: int = 3550,
    samples_per_device: int | None = None,
    num_classes: int = 62,
    image_size: int = 28,
    channels: int = 1,
    alpha: float = 0.5,
    noise: float = 0.3,
    test_samples: int = 1000,
    seed: int = 0,
    lazy: bool = True,
    cache_size: int = 64,
) -> FederatedData:
    """A FEMNIST-shaped synthetic federation (see the module docstring).

    Parameters
    ----------
    num_devices : int (default: 3550)
        Number of devices (FEMNIST's writers in the paper: 3,550).
    samples_per_device : int | None (default: None)
        Samples of every device; None draws FEMNIST's 181 +- 70.7 (at least 10).
    num_classes : int (default: 62)
        Classes (FEMNIST: 62).
    image_size : int (default: 28)
        Side of the square images.
    channels : int (default: 1)
        Image channels.
    alpha : float (default: 0.5)
        Dirichlet concentration of each device's class mix (smaller: more skewed).
    noise : float (default: 0.3)
        Pixel noise (standard deviation) on top of the class prototype.
    test_samples : int (default: 1000)
        Size of the centralized test set (classes uniform).
    seed : int (default: 0)
        Seed of everything: prototypes, sizes, every device's samples, the test set.
    lazy : bool (default: True)
        Make a device's samples when it is used (:class:`~flwr_distreal.data.lazy.LazyPartitions`);
        False makes every device's up front, as the array-backed sources do.
    cache_size : int (default: 64)
        Lazy: devices kept in memory after use.

    Returns
    -------
    FederatedData
        ``name="synthetic"``, images in [0, 1] (not normalised), no augmentation.
    """
    n = _check_int("num_devices", num_devices, 1)
    classes = _check_int("num_classes", num_classes, 2)
    side = _check_int("image_size", image_size, 8)
    chans = _check_int("channels", channels, 1)
    a, sd = float(alpha), float(noise)
    if not (math.isfinite(a) and a > 0):
        raise DataError(f"alpha must be finite and > 0, got {alpha!r}")
    if not (math.isfinite(sd) and sd >= 0):
        raise DataError(f"noise must be finite and >= 0, got {noise!r}")
    s = _check_int("seed", seed, 0)
    sizes = synthetic_sizes(n, s, samples_per_device)
    rng = np.random.default_rng([s, 0x9A7])
    coarse = torch.as_tensor(rng.uniform(0.0, 1.0, (classes, chans, 8, 8)).astype(np.float32))
    prototypes = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False).contiguous()
    make = SyntheticDevices(prototypes, sizes, s, a, sd)
    test_rng = np.random.default_rng([s, 0x7E57])
    test_labels = test_rng.integers(0, classes, _check_int("test_samples", test_samples, 1)).astype(np.int64)
    test = TensorDataset(make.samples(test_rng, test_labels, 0.0), torch.as_tensor(test_labels))
    partitions = LazyPartitions(sizes, make, cache_size) if lazy else [make(i) for i in range(n)]
    return FederatedData(
        name="synthetic",
        num_classes=classes,
        input_shape=(chans, side, side),
        partitions=partitions,
        test=test,
    )
