"""MNIST (10 classes, 1x28x28) from torchvision's raw idx files, gzipped or not; downloads through torchvision."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .errors import DataError
from .federated import FederatedData, federate
from .registry import register_dataset

__all__ = ["load_mnist"]

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read an idx file (gzipped or not) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise DataError(f"MNIST file {path} is not readable: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"MNIST file {path} is not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"MNIST file {path}: expected unsigned-byte data (type 0x08), got type {raw[2]:#04x}")
    dims = raw[3]
    if dims != expected_dims:
        raise DataError(f"MNIST file {path}: expected {expected_dims} dimensions, got {dims}")
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"MNIST file {path}: header says shape {shape} but the file has {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_mnist_raw(root: Path) -> Path | None:
    for candidate in (root / "MNIST" / "raw", root / "raw", root):
        if all(
            (candidate / f).is_file() or (candidate / f"{f}.gz").is_file()
            for pair in _MNIST_FILES.values()
            for f in pair
        ):
            return candidate
    return None


@register_dataset("mnist")
def load_mnist(
    root: str | Path,
    download: bool = False,
    num_devices: int = 100,
    samples_per_device: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
) -> FederatedData:
    """MNIST (10 classes, 1x28x28) split over devices.

    Reads torchvision's layout ``<root>/MNIST/raw`` (also ``<root>/raw`` or ``root``
    itself): the four official idx files, gzipped or not (a read-only folder with only the
    ``.gz`` files, such as ``../shared/data/MNIST/raw``, works; torchvision itself would
    need them extracted). With ``download`` True and no files present, they are fetched
    through ``torchvision.datasets.MNIST``. Pixels are scaled to [0, 1] (ink = 1).

    Parameters
    ----------
    root : str | Path
        Folder containing ``MNIST/raw``.
    download : bool (default: False)
        Download through torchvision when the files are missing.
    num_devices : int (default: 100)
        Number of devices.
    samples_per_device : int | None (default: None)
        Training samples per device for the IID split; None divides all 60,000.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        ``"shards"`` is the by-label shard split of McMahan et al. (2017).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    """
    base = Path(root)
    raw = _find_mnist_raw(base)
    if raw is None and download:
        try:
            import torchvision.datasets as tvd
        except ImportError as err:
            raise DataError("downloading MNIST needs torchvision (pip install 'flwr-distreal[vision]')") from err
        tvd.MNIST(str(base), train=True, download=True)
        raw = _find_mnist_raw(base)
    if raw is None:
        names = [f for pair in _MNIST_FILES.values() for f in pair]
        raise DataError(
            f"MNIST not found under {base}: expected {base / 'MNIST' / 'raw'} with the idx files {names} "
            f"(optionally .gz); pass download=True to fetch them"
        )
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (img_name, lbl_name) in _MNIST_FILES.items():
        img_path = raw / img_name if (raw / img_name).is_file() else raw / f"{img_name}.gz"
        lbl_path = raw / lbl_name if (raw / lbl_name).is_file() else raw / f"{lbl_name}.gz"
        images = _read_idx(img_path, 3)
        labels = _read_idx(lbl_path, 1)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(
                f"MNIST {split} files in {raw}: expected images (n, 28, 28) and n labels, "
                f"got {images.shape} and {labels.shape}"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"MNIST {split} labels in {lbl_path} must be 0..9")
        arrays[split] = (images.astype(np.float32)[:, None] / 255.0, labels.astype(np.int64))
    return federate(
        "mnist",
        *arrays["train"],
        *arrays["test"],
        num_classes=10,
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=samples_per_device if partition == "iid" else None,
        alpha=alpha,
        shards_per_device=shards_per_device,
    )
