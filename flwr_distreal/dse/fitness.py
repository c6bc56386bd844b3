"""The DSE's convergence-speed measurement: short training from a saved snapshot.

Paper, "Design-Time DSE", *Convergence Speed*: instead of a full training per candidate
vector, the model is trained for a few mini-batches (64 of 64) with the candidate's
per-mini-batch random structured dropout, starting from a *snapshot* that was partly trained
on a distorted copy of the data (brightness, contrast and saturation scaled to 0.5), and the
accuracy improvement on held-out data is measured; this is repeated with three seeds and
averaged.

* :class:`DSEData` holds the DSE's data split (in-memory tensors).
* :func:`make_snapshot` trains the snapshot once; :class:`Snapshot` saves/loads it with its
  metadata (model, data, steps, ...), and refuses a snapshot that does not match the model.
* :class:`ShortTrainingFitness` is the :class:`~flwr_distreal.dse.evaluator.FitnessBackend`:
  exact MACs via :func:`flwr_distreal.core.macs.count_macs` and the accuracy gain of the short
  training. Every vector sees, for seed number ``s``, the same mini-batches and the same
  dropout random stream, so two vectors differ only by their dropout. Two vectors with the
  same kept filter counts train identically (the dropout layers draw ``randperm`` only for
  layers that drop), which :meth:`ShortTrainingFitness.training_key` exposes for caching.

No Flower or Hydra imports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.dropout import DropoutModel
from ..core.macs import count_macs, kept_counts
from ..models import build_model
from .problem import DSEError, canonical_vector

__all__ = [
    "DSEData",
    "ShortTrainingSettings",
    "Snapshot",
    "SnapshotError",
    "ShortTrainingFitness",
    "make_snapshot",
    "accuracy",
    "derive_seed",
]

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "flwr-distreal-dse-snapshot/1"


class SnapshotError(DSEError):
    """A snapshot file is missing, malformed or made for another model or dataset."""


def derive_seed(*words: int) -> int:
    """A 63-bit seed derived from integers with ``numpy.random.SeedSequence`` (no collisions
    between streams that differ in any word)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


@dataclass
class DSEData:
    """The data the DSE trains and validates on (in memory).

    Parameters
    ----------
    name : str
        Dataset name (recorded in the snapshot's metadata).
    train_x : Tensor
        Training images, float32 ``(N, C, H, W)``.
    train_y : Tensor
        Training labels, int64 ``(N,)``.
    val_x : Tensor
        Held-out validation images, float32 ``(M, C, H, W)``.
    val_y : Tensor
        Validation labels, int64 ``(M,)``.
    num_classes : int
        Number of classes.
    distort : callable, optional
        ``distort(x) -> x'``: the distortion applied to the training images for the snapshot
        (brightness/contrast/saturation scaled to 0.5). ``None`` disables distortion.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int
    distort: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for label, x, y in (("train", self.train_x, self.train_y), ("val", self.val_x, self.val_y)):
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise DSEError(f"{label} data must be torch tensors")
            if x.ndim != 4:
                raise DSEError(f"{label} images must be (N, C, H, W), got shape {tuple(x.shape)}")
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DSEError(
                    f"{label} labels must be (N,) with N = {x.shape[0]}, got shape {tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                raise DSEError(f"{label} split is empty")
        if self.train_x.shape[1:] != self.val_x.shape[1:]:
            raise DSEError(
                f"train and val image shapes differ: {tuple(self.train_x.shape[1:])} vs {tuple(self.val_x.shape[1:])}"
            )
        if self.num_classes < 2:
            raise DSEError(f"num_classes must be >= 2, got {self.num_classes}")
        self.train_x = self.train_x.float().contiguous()
        self.val_x = self.val_x.float().contiguous()
        self.train_y = self.train_y.long().contiguous()
        self.val_y = self.val_y.long().contiguous()
        for label, y in (("train", self.train_y), ("val", self.val_y)):
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise DSEError(f"{label} labels must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")

    def __getstate__(self) -> dict[str, Any]:
        # The distortion is needed only to make the snapshot, never in worker processes.
        state = dict(self.__dict__)
        state["distort"] = None
        return state


@dataclass(frozen=True)
class ShortTrainingSettings:
    """Settings of the short training (paper: 64 mini-batches of 64, 3 seeds, plain SGD).

    Parameters
    ----------
    batches : int
        Mini-batches per short training.
    batch_size : int
        Samples per mini-batch.
    seeds : tuple of int
        One short training per seed; the accuracy gain is their mean.
    lr : float
        SGD learning rate (no momentum, no weight decay, as in the paper's training). Keep it
        small: on FEMNIST from a 34 % snapshot, 32 batches at lr 0.1 give a per-seed standard
        deviation of the accuracy gain of 4-8 %-points (noise dominates), at 0.02 about 1.
    eval_batch_size : int
        Batch size of the (no-grad) validation pass; does not change results.
    """

    batches: int = 64
    batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 0.02
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DSEError(f"{name} must be an integer >= 1, got {value!r}")
        seeds = tuple(self.seeds)
        if len(seeds) == 0:
            raise DSEError("seeds must name at least one seed")
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
            raise DSEError(f"seeds must be non-negative integers, got {list(seeds)}")
        if len(set(seeds)) != len(seeds):
            raise DSEError(f"seeds must be distinct, got {list(seeds)}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        if not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            raise DSEError(f"lr must be a positive finite number, got {self.lr!r}")


@torch.no_grad()
def accuracy(model: DropoutModel, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of the full model (eval mode never drops) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i : i + batch_size])
            correct += int((logits.argmax(dim=1) == y[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / x.shape[0]


def _batch_indices(n: int, total: int, generator: torch.Generator) -> Tensor:
    """``total`` sample indices: consecutive random permutations of ``range(n)``."""
    parts, have = [], 0
    while have < total:
        perm = torch.randperm(n, generator=generator)
        parts.append(perm)
        have += n
    return torch.cat(parts)[:total]


@dataclass
class Snapshot:
    """A partly trained model state that every short training starts from.

    Parameters
    ----------
    state_dict : dict[str, Tensor]
        The model's state.
    meta : dict
        ``format``, ``model``, ``num_classes``, ``dataset``, ``steps``, ``batch_size``, ``lr``,
        ``seed``, ``distorted``, ``val_accuracy``, ``train_size``, ``val_size``, ``seconds``.
    """

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        """Write the snapshot atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"meta": self.meta, "state_dict": self.state_dict}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        model_name: str | None = None,
        dataset: str | None = None,
        num_classes: int | None = None,
    ) -> Snapshot:
        """Read a snapshot and check that it fits the DSE at hand.

        Parameters
        ----------
        path : str or Path
            File written by :meth:`save`.
        model_name, dataset, num_classes : optional
            Expected metadata; a mismatch raises :class:`SnapshotError`.

        Raises
        ------
        SnapshotError
            If the file is missing, not a snapshot, or made for another model/dataset.
        """
        path = Path(path)
        if not path.is_file():
            raise SnapshotError(f"snapshot file {path} does not exist; create it first (dse.snapshot.create)")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise SnapshotError(f"cannot read snapshot {path}: {err}") from err
        if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
            raise SnapshotError(f"{path} is not a DSE snapshot (keys meta/state_dict missing)")
        meta = blob["meta"]
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{path}: unknown snapshot format {meta.get('format')!r}, expected {SNAPSHOT_FORMAT!r}")
        for key, want in (("model", model_name), ("dataset", dataset), ("num_classes", num_classes)):
            if want is not None and meta.get(key) != want:
                raise SnapshotError(
                    f"snapshot {path} was made for {key}={meta.get(key)!r}, this DSE needs {key}={want!r}"
                )
        return cls(state_dict=blob["state_dict"], meta=meta)


def make_snapshot(
    model_name: str,
    data: DSEData,
    steps: int,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    distorted: bool = True,
    device: str = "cpu",
) -> Snapshot:
    """Train the DSE's snapshot: the full model, ``steps`` SGD mini-batches on distorted data.

    Parameters
    ----------
    model_name : str
        Registry name of the model.
    data : DSEData
        The DSE's data; its ``distort`` is applied to the training images if ``distorted``.
    steps : int
        Mini-batches of pre-training (``0`` keeps the random initialisation).
    batch_size : int
        Samples per mini-batch.
    lr : float
        SGD learning rate.
    seed : int
        Seed of the initialisation and the batch order.
    distorted : bool
        Train on the distorted copy (paper) or on the plain data.
    device : str
        Torch device of the pre-training; the snapshot is stored on the CPU.

    Returns
    -------
    Snapshot
        State and metadata, including the full model's validation accuracy.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise DSEError(f"snapshot steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DSEError(f"snapshot batch_size must be an integer >= 1, got {batch_size!r}")
    if not (np.isfinite(lr) and lr > 0):
        raise DSEError(f"snapshot lr must be positive, got {lr!r}")
    if distorted and data.distort is None:
        raise DSEError(f"dataset {data.name!r} has no distortion; set distorted=False to train on plain data")
    start = time.perf_counter()
    torch.manual_seed(derive_seed(seed, 0x5A5))
    model = build_model(model_name, num_classes=data.num_classes)
    if tuple(model.input_shape) != tuple(data.train_x.shape[1:]):
        raise DSEError(
            f"model {model_name} expects inputs {tuple(model.input_shape)}, data {data.name} has {tuple(data.train_x.shape[1:])}"
        )
    dev = torch.device(device)
    x = data.distort(data.train_x) if distorted and data.distort is not None else data.train_x
    x, y = x.to(dev), data.train_y.to(dev)
    model = model.to(dev)
    model.set_dropout(None)
    model.train()
    gen = torch.Generator().manual_seed(derive_seed(seed, 0xBA7C))
    idx = _batch_indices(x.shape[0], steps * batch_size, gen).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for b in range(steps):
        sel = idx[b * batch_size : (b + 1) * batch_size]
        loss = F.cross_entropy(model(x[sel]), y[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    val_acc = accuracy(model, data.val_x.to(dev), data.val_y.to(dev))
    meta = {
        "format": SNAPSHOT_FORMAT,
        "model": model_name,
        "num_classes": int(data.num_classes),
        "dataset": data.name,
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "distorted": bool(distorted),
        "val_accuracy": float(val_acc),
        "train_size": int(data.train_x.shape[0]),
        "val_size": int(data.val_x.shape[0]),
        "seconds": time.perf_counter() - start,
    }
    log.info(
        "snapshot of %s on %s: %d steps, val accuracy %.4f (%.1f s)",
        model_name, data.name, steps, val_acc, meta["seconds"],
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Snapshot(state_dict=state, meta=meta)


class ShortTrainingFitness:
    """Fitness backend: exact MACs and the short-training accuracy gain of a dropout vector.

    Parameters
    ----------
    model_name : str
        Registry name of the model.
    snapshot : Snapshot
        Start state of every short training.
    data : DSEData
        Training and validation data (undistorted).
    settings : ShortTrainingSettings
        Batches, batch size, seeds, learning rate.
    device : str
        Torch device of the short trainings (``"cpu"``, ``"cuda"``, ``"cuda:1"``); the data is
        copied there once per process. Results differ between devices (other kernels).

    Notes
    -----
    For seed ``s`` the batch order comes from a generator seeded with
    ``derive_seed(s, 1)`` and the dropout filters from the model's private generator seeded
    with ``derive_seed(s, 2)`` (:meth:`DropoutModel.seed_dropout`), so results do not depend on
    PyTorch's global RNG or on which process runs the training. The model is built lazily per
    process and is not pickled.
    """

    def __init__(
        self,
        model_name: str,
        snapshot: Snapshot,
        data: DSEData,
        settings: ShortTrainingSettings,
        device: str = "cpu",
    ) -> None:
        if not isinstance(settings, ShortTrainingSettings):
            raise TypeError("settings must be a ShortTrainingSettings")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise DSEError(f"invalid torch device {device!r}: {err}") from err
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DSEError(f"device {device!r} requested but CUDA is not available")
        if snapshot.meta.get("model") != model_name:
            raise SnapshotError(
                f"snapshot was made for model {snapshot.meta.get('model')!r}, not {model_name!r}"
            )
        if snapshot.meta.get("num_classes") != data.num_classes:
            raise SnapshotError(
                f"snapshot has {snapshot.meta.get('num_classes')} classes, data {data.name} has {data.num_classes}"
            )
        self.model_name = model_name
        self.snapshot = snapshot
        self.data = data
        self.settings = settings
        self._model: DropoutModel | None = None
        self._tensors: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._baseline: float | None = None
        model = self.model  # validates the snapshot against the architecture
        if tuple(model.input_shape) != tuple(data.train_x.shape[1:]):
            raise DSEError(
                f"model {model_name} expects inputs {tuple(model.input_shape)}, data has {tuple(data.train_x.shape[1:])}"
            )
        self.n_layers = model.num_dropout_layers
        self.n_seeds = len(settings.seeds)
        self.layer_names = list(model.dropout_layer_names)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None
        state["_tensors"] = None
        return state

    @property
    def model(self) -> DropoutModel:
        """This process's model instance (built on first use, snapshot loaded)."""
        if self._model is None:
            model = build_model(self.model_name, num_classes=self.data.num_classes)
            try:
                model.load_state_dict(self.snapshot.state_dict)
            except RuntimeError as err:
                raise SnapshotError(f"snapshot does not fit model {self.model_name}: {err}") from err
            self._model = model.to(self.device)
        return self._model

    def _data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(train_x, train_y, val_x, val_y) on this fitness's device (copied once per process)."""
        if self._tensors is None:
            d = self.data
            self._tensors = tuple(t.to(self.device) for t in (d.train_x, d.train_y, d.val_x, d.val_y))  # type: ignore[assignment]
        return self._tensors  # type: ignore[return-value]

    def fingerprint(self) -> dict[str, Any]:
        """Settings that determine every measurement (compared on resume)."""
        s = self.settings
        meta = self.snapshot.meta
        return {
            "model": self.model_name,
            "dataset": self.data.name,
            "train_size": int(self.data.train_x.shape[0]),
            "val_size": int(self.data.val_x.shape[0]),
            "batches": s.batches,
            "batch_size": s.batch_size,
            "seeds": list(s.seeds),
            "lr": s.lr,
            "device": self.device.type,
            "snapshot": {k: meta.get(k) for k in ("model", "dataset", "steps", "batch_size", "lr", "seed", "distorted", "val_accuracy")},
        }

    def macs(self, vector: np.ndarray) -> int:
        """Exact forward MACs per sample (:func:`flwr_distreal.core.macs.count_macs`)."""
        return int(count_macs(self.model, vector))

    def training_key(self, vector: np.ndarray) -> bytes:
        """Kept filter counts per layer: vectors with equal counts train identically."""
        return np.asarray(kept_counts(self.model, vector), dtype=np.int64).tobytes()

    def baseline_accuracy(self) -> float:
        """Validation accuracy of the snapshot (the same starting point for every vector)."""
        if self._baseline is None:
            model = self.model
            model.load_state_dict(self.snapshot.state_dict)
            _, _, val_x, val_y = self._data()
            self._baseline = accuracy(model, val_x, val_y, self.settings.eval_batch_size)
        return self._baseline

    def measure(self, vector: np.ndarray, seed_index: int) -> float:
        """Accuracy gain of the short training under ``vector`` with seed ``seeds[seed_index]``.

        Parameters
        ----------
        vector : np.ndarray
            Dropout rates, one per dropout layer, in ``[0, 0.5]``.
        seed_index : int
            Index into ``settings.seeds``.

        Returns
        -------
        float
            Validation accuracy after the short training minus the snapshot's.
        """
        vec = canonical_vector(vector, self.n_layers)
        if not 0 <= seed_index < self.n_seeds:
            raise DSEError(f"seed_index must be in [0, {self.n_seeds}), got {seed_index}")
        s = self.settings
        seed = s.seeds[seed_index]
        before = self.baseline_accuracy()
        model = self.model
        model.load_state_dict(self.snapshot.state_dict)
        model.set_fixed_subsets(None)
        model.set_dropout(vec)
        model.seed_dropout(derive_seed(seed, 2))
        model.train()
        train_x, train_y, val_x, val_y = self._data()
        gen = torch.Generator().manual_seed(derive_seed(seed, 1))
        idx = _batch_indices(train_x.shape[0], s.batches * s.batch_size, gen).to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=s.lr)
        try:
            for b in range(s.batches):
                sel = idx[b * s.batch_size : (b + 1) * s.batch_size]
                loss = F.cross_entropy(model(train_x[sel]), train_y[sel])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            after = accuracy(model, val_x, val_y, s.eval_batch_size)
        finally:
            model.set_dropout(None)
            model.seed_dropout(None)
        return after - before

