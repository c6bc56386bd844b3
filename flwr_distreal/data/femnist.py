"""FEMNIST (62 classes, 28x28 greyscale), one device per writer: LEAF json shards or the Flower hub.

The paper's FEMNIST setting (Table 1 of Rapp et al., AAAI 2022): partitioned by writer
(non-IID, 181 +- 70.7 samples per device). Offline from a LEAF folder (``conf/dataset/
femnist_leaf.yaml``, e.g. ``../shared/data/femnist_leaf``); online from ``flwrlabs/femnist``
through ``flwr_datasets`` (``conf/dataset/femnist.yaml``, imported lazily).
"""

from __future__ import annotations

import json
import re
from logging import getLogger
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import TensorDataset

from .errors import DataError, _check_int
from .federated import FederatedData, _to_dataset
from .registry import register_dataset

__all__ = ["FEMNIST_CLASSES", "load_femnist"]

log = getLogger(__name__)

FEMNIST_CLASSES = 62


def _natural_key(path: Path) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def _read_leaf_dir(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every LEAF json shard of one split; returns writer -> (x (n, 784), y (n,))."""
    if not directory.is_dir():
        raise DataError(f"FEMNIST LEAF directory {directory} not found; expected a folder of LEAF json shards")
    files = sorted(directory.glob("*.json"), key=_natural_key)
    if not files:
        raise DataError(f"FEMNIST LEAF directory {directory} holds no *.json shards")
    users: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for file in files:
        try:
            with file.open(encoding="utf-8") as fh:
                shard = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"FEMNIST LEAF shard {file} is not readable json: {err}") from err
        if not isinstance(shard, dict) or "users" not in shard or "user_data" not in shard:
            keys = sorted(shard) if isinstance(shard, dict) else type(shard).__name__
            raise DataError(f"FEMNIST LEAF shard {file}: expected keys 'users' and 'user_data', got {keys}")
        names, user_data = shard["users"], shard["user_data"]
        if not isinstance(names, list) or not isinstance(user_data, dict):
            raise DataError(f"FEMNIST LEAF shard {file}: 'users' must be a list and 'user_data' a mapping")
        counts = shard.get("num_samples")
        if counts is not None and (not isinstance(counts, list) or len(counts) != len(names)):
            raise DataError(f"FEMNIST LEAF shard {file}: 'num_samples' must list one count per user")
        for pos, user in enumerate(names):
            record = user_data.get(user)
            if not isinstance(record, dict) or "x" not in record or "y" not in record:
                raise DataError(f"FEMNIST LEAF shard {file}: user {user!r} needs 'x' and 'y' in 'user_data'")
            try:
                x = np.asarray(record["x"], dtype=np.float32)
                y = np.asarray(record["y"], dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise DataError(f"FEMNIST LEAF shard {file}: user {user!r} has ragged or non-numeric x/y") from err
            if x.size == 0 and y.size == 0:  # a user without samples in this split
                x, y = x.reshape(0, 784), y.reshape(0)
            if x.ndim != 2 or x.shape[1] != 784 or y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"FEMNIST LEAF shard {file}: user {user!r} needs x of shape (n, 784) and y of shape (n,), "
                    f"got {x.shape} and {y.shape}"
                )
            if counts is not None and counts[pos] != x.shape[0]:
                raise DataError(
                    f"FEMNIST LEAF shard {file}: user {user!r} has {x.shape[0]} samples "
                    f"but num_samples says {counts[pos]}"
                )
            if not np.all(np.isfinite(x)) or (x.size and (x.min() < 0 or x.max() > 1)):
                raise DataError(f"FEMNIST LEAF shard {file}: user {user!r} has pixel values outside [0, 1]")
            if y.size and (np.any(y != np.round(y)) or y.min() < 0 or y.max() >= FEMNIST_CLASSES):
                raise DataError(
                    f"FEMNIST LEAF shard {file}: user {user!r} has labels outside the integers 0..{FEMNIST_CLASSES - 1}"
                )
            xs, ys = users.setdefault(str(user), ([], []))
            xs.append(x)
            ys.append(y.astype(np.int64))
    return {u: (np.concatenate(xs), np.concatenate(ys)) for u, (xs, ys) in users.items()}


def _load_femnist_leaf(root: Path, max_devices: int | None) -> FederatedData:
    if not root.is_dir():
        raise DataError(f"FEMNIST LEAF root {root} not found; expected a folder with train/ and test/ json shards")
    train = _read_leaf_dir(root / "train")
    test = _read_leaf_dir(root / "test")
    writers = list(train)
    if max_devices is not None:
        writers = writers[: _check_int("max_devices", max_devices, 1)]
    parts = []
    for w in writers:
        x, y = train[w]
        if x.shape[0] == 0:
            raise DataError(f"FEMNIST LEAF root {root}: writer {w!r} has no training samples")
        parts.append(_to_dataset(x.reshape(-1, 1, 28, 28), y))
    if sum(y.size for _, y in test.values()) == 0:
        raise DataError(
            f"FEMNIST LEAF test split {root / 'test'} holds no samples (its json shards list no users or only "
            "users without samples); the server evaluates on it, so it needs at least one sample"
        )
    x_test = np.concatenate([x for x, _ in test.values()]).reshape(-1, 1, 28, 28)
    y_test = np.concatenate([y for _, y in test.values()])
    data = FederatedData(
        name="femnist",
        num_classes=FEMNIST_CLASSES,
        input_shape=(1, 28, 28),
        partitions=parts,
        test=_to_dataset(x_test, y_test),
        device_names=writers,
    )
    log.info("Loaded %s from %s", data.summary(), root)
    return data


def _load_femnist_hub(max_devices: int | None, seed: int, test_fraction: float) -> FederatedData:
    try:
        from flwr_datasets import FederatedDataset
        from flwr_datasets.partitioner import NaturalIdPartitioner
    except ImportError as err:
        raise DataError(
            "load_femnist without root downloads flwrlabs/femnist through flwr_datasets, which is not "
            "installed (pip install 'flwr-datasets[vision]'); or pass root=<folder with LEAF train/ and test/ json>"
        ) from err
    fds = FederatedDataset(
        dataset="flwrlabs/femnist", partitioners={"train": NaturalIdPartitioner(partition_by="writer_id")}
    )
    first = fds.load_partition(0)
    total = fds.partitioners["train"].num_partitions
    count = total if max_devices is None else min(total, _check_int("max_devices", max_devices, 1))
    parts: list[TensorDataset] = []
    names: list[str] = []
    x_tests: list[np.ndarray] = []
    y_tests: list[np.ndarray] = []
    for pid in range(count):
        part = first if pid == 0 else fds.load_partition(pid)
        x = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in part["image"]]).reshape(-1, 1, 28, 28)
        y = np.asarray(part["character"], dtype=np.int64)
        perm = np.random.default_rng([seed, pid]).permutation(y.size)
        n_test = int(round(test_fraction * y.size))
        if y.size - n_test < 1:
            continue
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        parts.append(_to_dataset(x[train_idx], y[train_idx]))
        names.append(str(part["writer_id"][0]))
        x_tests.append(x[test_idx])
        y_tests.append(y[test_idx])
    data = FederatedData(
        name="femnist",
        num_classes=FEMNIST_CLASSES,
        input_shape=(1, 28, 28),
        partitions=parts,
        test=_to_dataset(np.concatenate(x_tests), np.concatenate(y_tests)),
        device_names=names,
    )
    log.info("Loaded %s from flwrlabs/femnist", data.summary())
    return data


@register_dataset("femnist")
def load_femnist(
    root: str | Path | None = None,
    max_devices: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
) -> FederatedData:
    """FEMNIST (62 classes, 28x28 greyscale) with one device per writer.

    Offline (``root`` given): a LEAF-format directory with ``train/*.json`` and
    ``test/*.json`` shards (e.g. ``../shared/data/femnist_leaf``), each json holding
    ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]],
    "y": [int]}}}``. Every writer in the train shards becomes a device (in shard order);
    the test set is all writers' test data. LEAF pixels are kept as they are: values in
    [0, 1] with **1 = white background and 0 = ink** (LEAF stores the NIST scans
    un-inverted).

    Online (``root`` None): ``flwrlabs/femnist`` through ``flwr_datasets`` with a
    ``NaturalIdPartitioner(partition_by="writer_id")`` (optional dependency, imported
    here only); each writer's samples are split into train and a ``test_fraction`` held
    out for the centralized test set. Pixels are the PNG's grey levels / 255.

    Parameters
    ----------
    root : str | Path | None (default: None)
        LEAF directory; None downloads through ``flwr_datasets``.
    max_devices : int | None (default: None)
        Keep only the first ``max_devices`` writers (the test set stays complete for LEAF).
    seed : int (default: 0)
        Seed of the per-writer train/test split (online source only).
    test_fraction : float (default: 0.1)
        Share of each writer's samples held out for testing (online source only).

    Returns
    -------
    FederatedData
        One partition per writer; ``device_names`` holds the writer ids.
    """
    frac = float(test_fraction)
    if not 0.0 <= frac < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if root is not None:
        return _load_femnist_leaf(Path(root), max_devices)
    return _load_femnist_hub(max_devices, int(seed), frac)
