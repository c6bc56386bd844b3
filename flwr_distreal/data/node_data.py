"""A real node's own data in a deployment: the dataset regrouped over SuperNodes, or a node's own npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .errors import DataError, _check_int
from .federated import FederatedData
from .npz import _images_to_float, _images_to_nchw, _npz_problem

__all__ = ["node_data_from_npz", "regroup"]


def regroup(data: FederatedData, num_partitions: int) -> FederatedData:
    """The dataset's devices regrouped into ``num_partitions`` partitions, for a deployment with
    that many SuperNodes: partition ``p`` holds the devices ``d`` with ``d % num_partitions == p``
    (so each keeps whole devices: FEMNIST writers stay together, non-IID stays non-IID).

    Raises
    ------
    DataError
        If ``num_partitions`` is not an int in ``[1, data.num_devices]``.
    """
    n = _check_int("num-partitions", num_partitions, 1)
    if n > data.num_devices:
        raise DataError(
            f"num-partitions={n} but {data.name} has only {data.num_devices} devices to share out; "
            f"give the dataset more devices (dataset.num_devices) or each node its own data-path"
        )
    if n == data.num_devices:
        return data
    parts = []
    for p in range(n):
        members = [data.partitions[d] for d in range(p, data.num_devices, n)]
        parts.append(
            TensorDataset(torch.cat([m.tensors[0] for m in members]), torch.cat([m.tensors[1] for m in members]))
        )
    names = None
    if data.device_names is not None:
        names = ["+".join(data.device_names[d] for d in range(p, data.num_devices, n)) for p in range(n)]
    return FederatedData(
        data.name, data.num_classes, data.input_shape, parts, data.test, data.augment, data.mean, data.std, names
    )


def node_data_from_npz(path: str | Path, reference: FederatedData, layout: str = "auto") -> FederatedData:
    """One node's own training data from an ``.npz`` with ``x_train`` and ``y_train``, as a
    one-partition dataset that shares ``reference``'s classes, image shape, augmentation and
    test set (the server evaluates on the reference's test set).

    Images may be (N, H, W), NCHW or NHWC, uint8 (scaled to [0, 1]) or float; when the reference
    is normalised (``mean``/``std``), images in [0, 1] are normalised the same way.

    Raises
    ------
    DataError
        If the file is missing or unreadable, lacks an array, or its images or labels do not fit
        the reference (shape, label range), naming the file and the problem.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data-path {file} not found; expected an .npz file with x_train and y_train")
    problem = _npz_problem(file)
    if problem is not None:
        raise DataError(f"data-path {file}: {problem}; expected an .npz file with x_train and y_train")
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train") if k not in npz.files]
            if missing:
                raise DataError(f"data-path {file}: missing arrays {missing}; it has {sorted(npz.files)}")
            x_raw, y = np.asarray(npz["x_train"]), np.asarray(npz["y_train"])
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"data-path {file} is not a readable .npz file: {err}") from err
    x = _images_to_float(_images_to_nchw(x_raw, layout, f"data-path {file}: x_train"), f"data-path {file}: x_train")
    if tuple(x.shape[1:]) != tuple(reference.input_shape):
        raise DataError(
            f"data-path {file}: images of shape {tuple(x.shape[1:])}, but the run's model takes {reference.input_shape}"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"data-path {file}: y_train must be {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
    if y.size == 0:
        raise DataError(f"data-path {file}: no training samples")
    if y.min() < 0 or y.max() >= reference.num_classes:
        raise DataError(
            f"data-path {file}: labels in [{y.min()}, {y.max()}] but the run has {reference.num_classes} classes"
        )
    images = torch.as_tensor(x, dtype=torch.float32)
    if reference.mean is not None and reference.std is not None:
        mean = torch.tensor(reference.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(reference.std, dtype=torch.float32).view(1, -1, 1, 1)
        images = (images - mean) / std
    part = TensorDataset(images.contiguous(), torch.as_tensor(y.astype(np.int64)))
    return FederatedData(
        reference.name, reference.num_classes, reference.input_shape, [part], reference.test, reference.augment,
        reference.mean, reference.std, [file.stem],
    )
