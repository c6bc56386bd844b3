"""Data for the DSE: a train/validation split of a dataset's pooled training data.

The paper's DSE "does not require access to the devices' data, but only access to a small
amount of similar (or even synthetic) data". Here the DSE pools the training data of a
dataset from :func:`flwr_distreal.data.load_federated` (``centralized_train()``), holds out a
seeded validation fraction for measuring accuracy gains, and trains the snapshot on a
distorted copy (:func:`flwr_distreal.data.distort`). ``synthetic`` needs no files at all
(class prototypes plus noise) and serves tests and first tries.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import distort, load_federated
from .fitness import DSEData
from .problem import DSEError

__all__ = ["split_dse_data", "synthetic_data", "load_dse_data", "default_distort"]

log = logging.getLogger(__name__)


def default_distort(
    factor: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Tensor], Tensor]:
    """The DSE's distortion (brightness, contrast and, for colour, saturation scaled by ``factor``;
    :func:`flwr_distreal.data.distort`), for images normalised with ``mean``/``std`` if given."""
    return functools.partial(distort, factor=float(factor), mean=mean, std=std)


def split_dse_data(
    name: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    val_fraction: float = 0.2,
    max_samples: int | None = None,
    seed: int = 0,
    distort: Callable[[Tensor], Tensor] | None = None,
) -> DSEData:
    """Shuffle ``(x, y)`` with ``seed``, optionally cap it, and split off a validation part.

    Parameters
    ----------
    name : str
        Dataset name recorded in the snapshot.
    x, y : Tensor
        Images ``(N, C, H, W)`` and labels ``(N,)``.
    num_classes : int
        Number of classes.
    val_fraction : float
        Fraction held out for validation, in ``(0, 1)``.
    max_samples : int, optional
        Use at most this many samples (after shuffling).
    seed : int
        Seed of the shuffle.
    distort : callable, optional
        Distortion for the snapshot's training data.

    Returns
    -------
    DSEData
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise DSEError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = int(x.shape[0])
    if max_samples is not None:
        if int(max_samples) < 2:
            raise DSEError(f"max_samples must be >= 2, got {max_samples!r}")
        n_use = min(n, int(max_samples))
    else:
        n_use = n
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)[:n_use]
    n_val = max(1, int(round(val_fraction * n_use)))
    if n_val >= n_use:
        raise DSEError(f"{n_use} samples leave nothing to train on with val_fraction={val_fraction}")
    val, train = perm[:n_val], perm[n_val:]
    return DSEData(
        name=name,
        train_x=x[train],
        train_y=y[train],
        val_x=x[val],
        val_y=y[val],
        num_classes=int(num_classes),
        distort=distort,
    )


def synthetic_data(
    n_samples: int = 2048,
    num_classes: int = 10,
    shape: tuple[int, int, int] = (1, 28, 28),
    noise: float = 0.35,
    seed: int = 0,
    val_fraction: float = 0.25,
    distort: Callable[[Tensor], Tensor] | None = None,
) -> DSEData:
    """Generated images: a smooth random prototype per class plus pixel noise, in [0, 1].

    Parameters
    ----------
    n_samples : int
        Total samples (train + validation).
    num_classes : int
        Classes.
    shape : tuple of int
        (C, H, W) of each image.
    noise : float
        Standard deviation of the pixel noise.
    seed : int
        Seed of prototypes, samples and split.
    val_fraction : float
        Validation fraction.
    distort : callable, optional
        Snapshot distortion (default: none).
    """
    if n_samples < 2 * num_classes:
        raise DSEError(f"n_samples must be at least 2 * num_classes, got {n_samples}")
    gen = torch.Generator().manual_seed(int(seed))
    c, h, w = shape
    coarse = torch.rand((num_classes, c, max(2, h // 4), max(2, w // 4)), generator=gen)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    y = torch.arange(n_samples) % num_classes
    x = protos[y] + noise * torch.randn((n_samples, c, h, w), generator=gen)
    x = x.clamp(0.0, 1.0)
    return split_dse_data("synthetic", x, y, num_classes, val_fraction=val_fraction, seed=seed, distort=distort)


def load_dse_data(
    name: str,
    root: str | Path | None = None,
    val_fraction: float = 0.2,
    max_samples: int | None = None,
    seed: int = 0,
    distort_factor: float = 0.5,
    options: dict[str, Any] | None = None,
) -> DSEData:
    """The DSE's data for a dataset name.

    Parameters
    ----------
    name : str
        ``synthetic`` (generated, no files) or a name known to
        :func:`flwr_distreal.data.load_federated` (e.g. ``femnist_leaf``/``femnist``,
        ``mnist``, ``cifar10``, ``cifar100``, ``digits``).
    root : str or Path, optional
        Dataset directory passed to the loader as ``root``.
    val_fraction : float
        Fraction of the pooled training data held out for validation.
    max_samples : int, optional
        Cap on the pooled samples used (after a seeded shuffle).
    seed : int
        Seed of shuffle and split.
    distort_factor : float
        Brightness/contrast/saturation factor of the snapshot's distortion (paper: 0.5).
    options : dict, optional
        Extra keyword arguments for the loader.

    Raises
    ------
    DSEError
        If the dataset cannot be loaded (the loader's message is included).
    """
    if name == "synthetic":
        opts = dict(options or {})
        return synthetic_data(
            n_samples=int(opts.pop("n_samples", max_samples or 2048)),
            num_classes=int(opts.pop("num_classes", 10)),
            seed=seed,
            val_fraction=val_fraction,
            distort=default_distort(distort_factor),
            **opts,
        )
    loader_name = "femnist" if name == "femnist_leaf" else name
    kwargs = {k: v for k, v in (options or {}).items() if v is not None}
    if root is not None:
        kwargs["root"] = str(root)
    try:
        fed = load_federated(loader_name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise DSEError(f"cannot load dataset {name!r} (root {root}): {err}") from err
    x, y = _tensors_of(fed.centralized_train())
    if fed.mean is not None and fed.std is not None:
        log.info("DSE data %s is normalised (mean %s, std %s); the distortion accounts for it", name, fed.mean, fed.std)
    distort = default_distort(distort_factor, fed.mean, fed.std)
    log.info("DSE data %s: %d pooled training samples from %d devices", name, x.shape[0], len(fed.partitions))
    return split_dse_data(
        name, x, y, fed.num_classes, val_fraction=val_fraction, max_samples=max_samples, seed=seed, distort=distort
    )


def _tensors_of(dataset: Any) -> tuple[Tensor, Tensor]:
    """Images and labels of an in-memory dataset (TensorDataset-like or indexable)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[0].float(), tensors[1].long()
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(v) for v in xs]).float(), torch.as_tensor(np.asarray(ys)).long()
