"""The embedded default: scikit-learn's bundled 8x8 digits upsampled to 28x28 (no download).

So the FEMNIST CNN runs on it unchanged; ``conf/dataset/digits.yaml``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, _check_int
from .federated import FederatedData, federate
from .registry import register_dataset

__all__ = ["load_digits"]


@register_dataset("digits")
def load_digits(
    num_devices: int = 20,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int = 28,
) -> FederatedData:
    """The embedded default: scikit-learn's bundled digits, no download needed.

    1,797 8x8 greyscale digits (10 classes, values 0..16) are scaled to [0, 1] (ink = 1)
    and upsampled bilinearly to ``image_size`` x ``image_size`` so the FEMNIST CNN
    (1x28x28 input) runs on them unchanged. A ``test_fraction`` of the samples, drawn
    with ``seed``, is held out as the centralized test set; the rest is split over
    devices.

    Parameters
    ----------
    num_devices : int (default: 20)
        Number of devices.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme; ``"dirichlet"`` with a small ``alpha`` gives non-IID label
        distributions.
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the test split and of the device split.
    test_fraction : float (default: 0.2)
        Share of samples held out for testing, in (0, 1).
    image_size : int (default: 28)
        Side of the upsampled images.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    frac = float(test_fraction)
    if not 0.0 < frac < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    size = _check_int("image_size", image_size, 8)
    bunch = sk_load_digits()
    images = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    x = images.clamp(0.0, 1.0).numpy()
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng([int(seed), 1797]).permutation(y.size)
    n_test = int(round(frac * y.size))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return federate(
        "digits",
        x[train_idx],
        y[train_idx],
        x[test_idx],
        y[test_idx],
        num_classes=10,
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=None,
        alpha=alpha,
        shards_per_device=shards_per_device,
    )
