"""Splitting a dataset's samples over devices: IID, Dirichlet non-IID and label shards."""

from __future__ import annotations

import math

import numpy as np

from .errors import DataError, _check_int

__all__ = ["PARTITIONS", "dirichlet_partition", "iid_partition", "shard_partition", "split_indices"]

#: Partition schemes understood by :func:`split_indices`.
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")


def iid_partition(
    num_samples: int, num_devices: int, seed: int = 0, samples_per_device: int | None = None
) -> list[np.ndarray]:
    """Split sample indices uniformly at random into equally sized device shards.

    Parameters
    ----------
    num_samples : int
        Number of samples to split.
    num_devices : int
        Number of devices.
    seed : int (default: 0)
        Seed of the permutation.
    samples_per_device : int | None (default: None)
        Samples per device (paper: 500 for CIFAR; left-over samples are unused); None
        splits all samples, device sizes differing by at most one.

    Returns
    -------
    list[np.ndarray]
        One int64 index array per device, disjoint.
    """
    n = _check_int("num_samples", num_samples, 0)
    k = _check_int("num_devices", num_devices, 1)
    if samples_per_device is None:
        if n < k:
            raise DataError(f"cannot give {k} devices at least one sample each from {n} samples")
        perm = np.random.default_rng(seed).permutation(n)
        return [np.sort(chunk).astype(np.int64) for chunk in np.array_split(perm, k)]
    per = _check_int("samples_per_device", samples_per_device, 1)
    if per * k > n:
        raise DataError(f"cannot give {k} devices {per} samples each from {n} samples")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i * per : (i + 1) * per]).astype(np.int64) for i in range(k)]


def dirichlet_partition(
    labels: np.ndarray, num_devices: int, alpha: float, seed: int = 0, min_samples: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Non-IID split: each class is divided among devices with Dirichlet(alpha) proportions.

    Smaller ``alpha`` gives more skewed label distributions per device. Every sample is
    assigned to exactly one device. Splits leaving a device with fewer than
    ``min_samples`` samples are redrawn (up to ``max_tries`` times).

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    num_devices : int
        Number of devices.
    alpha : float
        Dirichlet concentration (> 0).
    seed : int (default: 0)
        Seed of the draws.
    min_samples : int (default: 1)
        Minimum number of samples per device.
    max_tries : int (default: 100)
        Redraws before giving up.

    Returns
    -------
    list[np.ndarray]
        One int64 index array per device, disjoint, covering all samples.
    """
    y = np.asarray(labels)
    k = _check_int("num_devices", num_devices, 1)
    a = float(alpha)
    if not math.isfinite(a) or a <= 0:
        raise DataError(f"alpha must be finite and > 0, got {alpha!r}")
    _check_int("min_samples", min_samples, 0)
    if y.ndim != 1 or y.size < k * min_samples:
        raise DataError(f"need a 1-D label array with at least {k * min_samples} samples, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(_check_int("max_tries", max_tries, 1)):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(y == cls))
            props = rng.dirichlet(np.full(k, a))
            cuts = (np.cumsum(props)[:-1] * idx.size).astype(np.int64)
            for dev, chunk in enumerate(np.split(idx, cuts)):
                parts[dev].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(o.size for o in out) >= min_samples:
            return out
    raise DataError(
        f"dirichlet_partition: could not give every one of {k} devices >= {min_samples} samples "
        f"with alpha={a} in {max_tries} tries; use fewer devices or a larger alpha"
    )


def shard_partition(
    labels: np.ndarray, num_devices: int, shards_per_device: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Label-sorted shards (McMahan et al. 2017): each device gets a few label-homogeneous shards.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    num_devices : int
        Number of devices.
    shards_per_device : int (default: 2)
        Shards per device; the sorted data is cut into ``num_devices * shards_per_device``
        equal shards (a remainder of samples is left out).
    seed : int (default: 0)
        Seed of the shard assignment.

    Returns
    -------
    list[np.ndarray]
        One int64 index array per device, disjoint.
    """
    y = np.asarray(labels)
    k = _check_int("num_devices", num_devices, 1)
    s = _check_int("shards_per_device", shards_per_device, 1)
    n_shards = k * s
    if y.ndim != 1 or y.size < n_shards:
        raise DataError(f"need a 1-D label array with at least {n_shards} samples, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    # sort by label, ties broken randomly
    order = np.lexsort((rng.random(y.size), y))
    size = y.size // n_shards
    shards = [order[i * size : (i + 1) * size] for i in range(n_shards)]
    assign = rng.permutation(n_shards)
    return [
        np.sort(np.concatenate([shards[j] for j in assign[d * s : (d + 1) * s]])).astype(np.int64) for d in range(k)
    ]


def split_indices(
    labels: np.ndarray,
    num_devices: int,
    partition: str = "iid",
    seed: int = 0,
    samples_per_device: int | None = None,
    alpha: float = 0.5,
    shards_per_device: int = 2,
) -> list[np.ndarray]:
    """Split samples into devices with one of the schemes in :data:`PARTITIONS`.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of every sample.
    num_devices : int
        Number of devices.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Scheme: :func:`iid_partition`, :func:`dirichlet_partition` or :func:`shard_partition`.
    seed : int (default: 0)
        Seed of the split.
    samples_per_device : int | None (default: None)
        Samples per device, only for ``"iid"``.
    alpha : float (default: 0.5)
        Dirichlet concentration, only for ``"dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device, only for ``"shards"``.

    Returns
    -------
    list[np.ndarray]
        One index array per device.
    """
    if partition not in PARTITIONS:
        raise DataError(f"unknown partition scheme {partition!r}; valid: {list(PARTITIONS)}")
    if samples_per_device is not None and partition != "iid":
        raise DataError(f"samples_per_device applies to the 'iid' partition only, not {partition!r}")
    y = np.asarray(labels)
    if partition == "iid":
        return iid_partition(y.size, num_devices, seed, samples_per_device)
    if partition == "dirichlet":
        return dirichlet_partition(y, num_devices, alpha, seed)
    return shard_partition(y, num_devices, shards_per_device, seed)
