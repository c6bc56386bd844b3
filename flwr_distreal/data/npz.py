"""Any dataset stored as an ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

The array helpers here (layout, scaling, file sniffing) are shared with
:func:`~flwr_distreal.data.node_data.node_data_from_npz`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError, _check_int
from .federated import FederatedData, federate
from .registry import register_dataset

__all__ = ["load_npz"]

def _images_to_nchw(x: np.ndarray, layout: str, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{what} must have 3 (N, H, W) or 4 dimensions, got shape {x.shape}")
    if layout == "auto":
        nhwc = x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        layout = "nhwc" if nhwc else "nchw"
    if layout == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    return x


def _images_to_float(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        out = x.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise DataError(f"{what} holds NaN or infinite values")
        return out
    raise DataError(f"{what} must be uint8 (0..255) or float, got dtype {x.dtype}")


def _npz_problem(file: Path) -> str | None:
    """Why ``file`` is not an ``.npz`` archive (``None`` when it starts like one: a zip file)."""
    try:
        with file.open("rb") as fh:
            head = fh.read(8)
    except OSError as err:
        return f"cannot be read ({err})"
    if head.startswith(b"PK"):
        return None
    if head.startswith(b"\x93NUMPY"):
        return "is a .npy file (a single NumPy array, np.save), not an .npz archive of named arrays (np.savez)"
    if not head:
        return "is empty, not an .npz archive"
    return "is not an .npz archive (a zip of named arrays written by np.savez)"


@register_dataset("npz")
def load_npz(
    path: str | Path,
    num_devices: int = 10,
    samples_per_device: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    layout: str = "auto",
    num_classes: int | None = None,
    name: str = "npz",
) -> FederatedData:
    """A dataset from a ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Images may be (N, H, W) (one channel), NCHW or NHWC; ``layout="auto"`` treats a
    4-D array as NHWC when its last axis has 1, 3 or 4 entries and its second does not.
    uint8 images are scaled to [0, 1]; float images are kept as they are. Labels must be
    integers in ``[0, num_classes)``.

    Parameters
    ----------
    path : str | Path
        The ``.npz`` file.
    num_devices : int (default: 10)
        Number of devices.
    samples_per_device : int | None (default: None)
        Training samples per device for the IID split; None divides all samples.
    partition : {"iid", "dirichlet", "shards"} (default: "iid")
        Partition scheme (see :func:`split_indices`).
    alpha : float (default: 0.5)
        Dirichlet concentration for ``partition="dirichlet"``.
    shards_per_device : int (default: 2)
        Shards per device for ``partition="shards"``.
    seed : int (default: 0)
        Seed of the split.
    layout : {"auto", "nchw", "nhwc"} (default: "auto")
        Axis order of 4-D image arrays.
    num_classes : int | None (default: None)
        Number of classes; None infers ``max(label) + 1`` over both splits.
    name : str (default: "npz")
        Name of the resulting dataset.
    """
    file = Path(path)
    if layout not in ("auto", "nchw", "nhwc"):
        raise DataError(f"layout must be 'auto', 'nchw' or 'nhwc', got {layout!r}")
    if not file.is_file():
        raise DataError(f"npz dataset {file} not found; expected a .npz file with x_train, y_train, x_test, y_test")
    problem = _npz_problem(file)
    if problem is not None:
        raise DataError(
            f"npz dataset {file} {problem}; expected an .npz file with x_train, y_train, x_test, y_test "
            "(np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))"
        )
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
            if missing:
                raise DataError(f"npz dataset {file}: missing arrays {missing}; it has {sorted(npz.files)}")
            arrays = {k: np.asarray(npz[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"npz dataset {file} is not a readable .npz file: {err}") from err
    xs = {}
    for split in ("train", "test"):
        x = _images_to_nchw(arrays[f"x_{split}"], layout, f"npz dataset {file}: x_{split}")
        xs[split] = _images_to_float(x, f"npz dataset {file}: x_{split}")
        y = arrays[f"y_{split}"]
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"npz dataset {file}: y_{split} must have shape ({x.shape[0]},), got {y.shape}")
        integral = np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.floating) and bool(np.all(y == np.round(y)))
        )
        if not integral:
            raise DataError(f"npz dataset {file}: y_{split} must hold integer labels, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise DataError(f"npz dataset {file}: y_{split} has negative labels")
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise DataError(
            f"npz dataset {file}: train images {xs['train'].shape[1:]} and test images {xs['test'].shape[1:]} "
            "differ in shape"
        )
    y_train = arrays["y_train"].astype(np.int64)
    y_test = arrays["y_test"].astype(np.int64)
    inferred = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    classes = inferred if num_classes is None else _check_int("num_classes", num_classes, 2)
    if classes < inferred:
        raise DataError(f"npz dataset {file}: labels go up to {inferred - 1} but num_classes is {classes}")
    return federate(
        name,
        xs["train"],
        y_train,
        xs["test"],
        y_test,
        num_classes=max(classes, 2),
        num_devices=num_devices,
        partition=partition,
        seed=seed,
        samples_per_device=samples_per_device if partition == "iid" else None,
        alpha=alpha,
        shards_per_device=shards_per_device,
    )
