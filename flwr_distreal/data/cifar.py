"""CIFAR-10 and CIFAR-100 (3x32x32) from the extracted python-pickle archives, downloaded through torchvision.

The paper's CIFAR setting (Table 1 of Rapp et al., AAAI 2022): IID with 500 samples per
device, standard augmentation (random crop 32 with padding 4, horizontal flip) and channel
normalisation. Both archives share one reader, so both live in this file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .federated import FederatedData, federate
from .registry import register_dataset
from .transforms import RandomCropFlip

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10", "load_cifar100"]

#: Per-channel mean and standard deviation of the CIFAR-10 training images (in [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: Per-channel mean and standard deviation of the CIFAR-100 training images (in [0, 1]).
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

_CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "classes": 10,
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "classes": 100,
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "torchvision": "CIFAR100",
    },
}


def _read_cifar_batch(file: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> (uint8 images (n, 3, 32, 32), int64 labels (n,))."""
    if not file.is_file():
        raise DataError(f"CIFAR batch file {file} not found")
    try:
        with file.open("rb") as fh:
            # the official archives are python pickles (as read by torchvision); only load
            # files you trust
            batch = pickle.load(fh, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"CIFAR batch file {file} is not a readable python pickle: {err}") from err
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"CIFAR batch file {file}: expected keys 'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR batch file {file}: expected 'data' of shape (n, 3072) and {label_key!r} of length n, "
            f"got {data.shape} and {labels.shape}"
        )
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255 or np.any(data != np.round(data))):
            raise DataError(f"CIFAR batch file {file}: 'data' must hold bytes 0..255")
        data = data.astype(np.uint8)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"CIFAR batch file {file}: labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_dir(name: str, root: Path, download: bool) -> Path:
    layout = _CIFAR_LAYOUT[name]
    for candidate in (root / layout["folder"], root):
        if all((candidate / f).is_file() for f in layout["train"] + layout["test"]):
            return candidate
    if download:
        try:
            import torchvision.datasets as tvd
        except ImportError as err:
            raise DataError(f"downloading {name} needs torchvision (pip install 'flwr-distreal[vision]')") from err
        getattr(tvd, layout["torchvision"])(str(root), train=True, download=True)
        return root / layout["folder"]
    raise DataError(
        f"{name} not found under {root}: expected the extracted archive {root / layout['folder']} with files "
        f"{layout['train'] + layout['test']} (pass download=True to fetch it)"
    )


def _load_cifar(
    name: str,
    root: str | Path,
    download: bool,
    num_devices: int,
    samples_per_device: int | None,
    partition: str,
    alpha: float,
    shards_per_device: int,
    seed: int,
    augment: bool,
    normalize: bool,
) -> FederatedData:
    layout = _CIFAR_LAYOUT[name]
    folder = _cifar_dir(name, Path(root), download)
    splits = {}
    for split in ("train", "test"):
        batches = [_read_cifar_batch(folder / f, layout["label_key"], layout["classes"]) for f in layout[split]]
        splits[split] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))

    def prep(x: np.ndarray) -> np.ndarray:
        img = x.astype(np.float32) / 255.0
        if normalize:
            img = (img - np.asarray(layout["mean"], np.float32)[None, :, None, None]) / np.asarray(
                layout["std"], np.float32
            )[None, :, None, None]
        return img

    mean = tuple(layout["mean"]) if normalize else None
    std = tuple(layout["std"]) if normalize else None
    fill = tuple((0.0 - m) / s for m, s in zip(layout["mean"], layout["std"])) if normalize else None
    x_train, y_train = splits["train"]
    x_test, y_test = splits["test"]
    return federate(
        name,
        prep(x_train),
        y_train,
        prep(x_test),
        y_test,
        num_classes=layout["classes"],
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=samples_per_device,
        alpha=alpha,
        shards_per_device=shards_per_device,
        augment=RandomCropFlip(padding=4, flip=True, fill=fill) if augment else None,
        mean=mean,
        std=std,
    )


@register_dataset("cifar10")
def load_cifar10(
    root: str | Path,
    download: bool = False,
    num_devices: int = 100,
    samples_per_device: int | None = 500,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    augment: bool = True,
    normalize: bool = True,
) -> FederatedData:
    """CIFAR-10 (10 classes, 3x32x32), IID over devices as in the paper (100 x 500 samples).

    Reads the extracted python archive ``<root>/cifar-10-batches-py`` (``data_batch_1``
    .. ``data_batch_5``, ``test_batch``; ``root`` may also be that folder itself), after
    downloading it through ``torchvision.datasets.CIFAR10`` when ``download`` is True.
    Images are scaled to [0, 1] and normalised with :data:`CIFAR10_MEAN` /
    :data:`CIFAR10_STD`; training batches get :class:`RandomCropFlip` (crop 32, padding
    4, horizontal flip).

    Parameters
    ----------
    root : str | Path
        Folder holding (or receiving) ``cifar-10-batches-py``.
    download : bool (default: False)
        Download the archive when it is not under ``root``.
    num_devices : int (default: 100)
        Number of devices.
    samples_per_device : int | None (default: 500)
        Training samples per device for the IID split; None divides all samples.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme (see :func:`split_indices`).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    augment : bool (default: True)
        Attach the standard training augmentation.
    normalize : bool (default: True)
        Normalise with the channel means and stds (otherwise images stay in [0, 1]).
    """
    spd = samples_per_device if partition == "iid" else None
    return _load_cifar(
        "cifar10", root, download, num_devices, spd, partition, alpha, shards_per_device, seed, augment, normalize
    )


@register_dataset("cifar100")
def load_cifar100(
    root: str | Path,
    download: bool = False,
    num_devices: int = 100,
    samples_per_device: int | None = 500,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    augment: bool = True,
    normalize: bool = True,
) -> FederatedData:
    """CIFAR-100 (100 fine classes, 3x32x32), IID over devices as in the paper (100 x 500).

    Reads ``<root>/cifar-100-python`` (``train``, ``test``; fine labels), downloading it
    through ``torchvision.datasets.CIFAR100`` when ``download`` is True. Otherwise as
    :func:`load_cifar10`, with :data:`CIFAR100_MEAN` / :data:`CIFAR100_STD`.

    Parameters
    ----------
    root : str | Path
        Folder holding (or receiving) ``cifar-100-python``.
    download : bool (default: False)
        Download the archive when it is not under ``root``.
    num_devices : int (default: 100)
        Number of devices.
    samples_per_device : int | None (default: 500)
        Training samples per device for the IID split; None divides all samples.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme (see :func:`split_indices`).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    augment : bool (default: True)
        Attach the standard training augmentation.
    normalize : bool (default: True)
        Normalise with the channel means and stds.
    """
    spd = samples_per_device if partition == "iid" else None
    return _load_cifar(
        "cifar100", root, download, num_devices, spd, partition, alpha, shards_per_device, seed, augment, normalize
    )
