"""The lookup table D of dropout vectors (paper, section "Run Time", Algorithm 1).

A LUT holds Pareto-optimal dropout vectors (from the DSE, :mod:`flwr_distreal.dse`) or
equal-rate vectors (:meth:`LUT.uniform`), each with its exact forward MACs per sample, sorted by
MACs. A device selects, before every mini-batch, the vector with the most MACs that fits its
current budget (:meth:`LUT.select`).

Rates are kept at float32 precision (the paper stores the LUT in 32-bit values), so the
vectors in memory and in the file are identical and MACs stay exact after a round trip.

Two file formats, chosen by the extension: ``.npz`` (binary, float32; 64 vectors x 99 rates is
~25 kB, as in the paper) and JSON otherwise (compact, human-readable)::

    {"format": "flwr-distreal-lut", "version": 1,
     "model": "densenet_bc_40", "num_classes": 10, "input_shape": [3, 32, 32],
     "layers": ["conv0", "block1.0.conv1", ...],
     "entries": [{"macs": 18257556, "vector": [0.5, ...]}, ...],
     "meta": {...}}
"""

from __future__ import annotations

import bisect
import json
import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dropout import MAX_RATE, DropoutModel, require_droppable
from .macs import count_macs

#: Where the LUTs this project's DSE produced for the reference models are shipped.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "luts"  # flwr_distreal/luts

__all__ = ["LUT", "LUTError", "BudgetError", "LUT_FORMAT", "LUT_VERSION"]

LUT_FORMAT = "flwr-distreal-lut"
LUT_VERSION = 1


class LUTError(ValueError):
    """A LUT is malformed or does not match the model it is used with."""


class BudgetError(ValueError):
    """Not even the cheapest vector of the LUT fits the budget."""


class LUT:
    """Dropout vectors with their forward MACs per sample, sorted by MACs.

    Parameters
    ----------
    model_name : str
        Registry name of the model the vectors belong to.
    layer_names : sequence of str
        The model's dropout-layer names, in vector order.
    vectors : array-like, shape (n, k)
        One dropout vector per row, rates in [0, 0.5].
    macs : array-like of int, shape (n,)
        Exact forward MACs per sample of each vector.
    num_classes : int, optional
        Classifier outputs of the model the MACs were counted on.
    input_shape : sequence of int, optional
        (C, H, W) input of that model.
    meta : dict, optional
        Free-form provenance (e.g. DSE settings), stored as is.

    Raises
    ------
    LUTError
        If the table is empty, shapes disagree, a rate is outside [0, 0.5] or a MAC count is
        not a non-negative integer.
    """

    def __init__(
        self,
        model_name: str,
        layer_names: Sequence[str],
        vectors: Any,
        macs: Any,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        meta: dict | None = None,
    ) -> None:
        self.model_name = str(model_name)
        self.layer_names = [str(n) for n in layer_names]
        if isinstance(layer_names, (str, bytes)) or not all(isinstance(n, str) for n in layer_names):
            raise LUTError("LUT layer names must be a list of strings")
        try:
            vec = np.asarray(vectors, dtype=np.float64)
            mac = np.asarray(macs, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise LUTError(f"LUT vectors and MACs must be numeric: {err}") from err
        k = len(self.layer_names)
        if vec.ndim != 2 or vec.shape[0] == 0:
            raise LUTError(f"LUT needs a non-empty 2-D array of vectors, got shape {vec.shape}")
        if vec.shape[1] != k:
            raise LUTError(f"LUT vectors have {vec.shape[1]} rates but {k} layer names")
        if mac.shape != (vec.shape[0],):
            raise LUTError(f"LUT has {vec.shape[0]} vectors but {mac.size} MAC counts")
        if not np.isfinite(vec).all():
            raise LUTError("LUT holds a non-finite dropout rate")
        bad = np.argwhere((vec < 0) | (vec > MAX_RATE))
        if bad.size:
            i, j = bad[0]
            raise LUTError(
                f"LUT entry {i} has rate {vec[i, j]} for layer {self.layer_names[j]!r}, outside [0, {MAX_RATE}]"
            )
        if not np.isfinite(mac).all() or (mac < 0).any() or (mac != np.round(mac)).any() or (mac >= 2.0**62).any():
            raise LUTError("LUT MAC counts must be non-negative integers below 2**62")
        vec = vec.astype(np.float32).astype(np.float64)  # the LUT's storage precision (32-bit)
        order = np.argsort(mac, kind="stable")
        self.vectors = vec[order]
        self.macs = mac[order].astype(np.int64)
        self.vectors.setflags(write=False)
        self.macs.setflags(write=False)
        self._macs_list = self.macs.tolist()
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1):
            raise LUTError(f"LUT num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        if input_shape is not None and (
            isinstance(input_shape, (str, bytes))
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in input_shape)
        ):
            raise LUTError(f"LUT input_shape must be a list of positive integers, got {input_shape!r}")
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if meta is not None and not isinstance(meta, dict):
            raise LUTError(f"LUT meta must be a mapping, got {type(meta).__name__}")
        self.meta = dict(meta or {})

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_vectors(cls, model: DropoutModel, vectors: Iterable[Sequence[float]], meta: dict | None = None) -> "LUT":
        """A LUT of the given vectors for ``model``, with their exact MACs.

        Parameters
        ----------
        model : DropoutModel
            The model the vectors are for (name, layer names and MACs are taken from it).
        vectors : iterable of sequences of float
            Dropout vectors, one rate per dropout layer.
        meta : dict, optional
            Provenance to store in the file.

        Raises
        ------
        TypeError
            If ``model`` was not made droppable (:func:`~flwr_distreal.core.dropout.make_droppable`).
        """
        require_droppable(model, "LUT.from_vectors")
        vecs = [np.asarray(v, dtype=np.float64) for v in vectors]
        macs = [count_macs(model, v) for v in vecs]
        return cls(
            model.model_name,
            model.dropout_layer_names,
            np.stack(vecs) if vecs else np.zeros((0, model.num_dropout_layers)),
            macs,
            num_classes=model.num_classes,
            input_shape=model.input_shape,
            meta=meta,
        )

    from_front = from_vectors

    @classmethod
    def learned(cls, model: DropoutModel) -> "LUT":
        """The LUT this project's DSE produced for ``model``'s architecture (shipped in
        ``flwr_distreal/luts/<model>.json``; ``luts/README.md`` gives the command that regenerates
        each and its revalidation).

        The dropout vectors are per convolutional layer, so a LUT learned with another classifier
        size (e.g. FEMNIST's 62 classes, used for a 10-class dataset) fits the same architecture:
        its vectors are kept and their MACs recomputed exactly for ``model``
        (``meta["recosted_from_classes"]`` says so).

        Raises
        ------
        LUTError
            If no LUT is shipped for the model, or its layers do not match the model's.
        TypeError
            If ``model`` was not made droppable (:func:`~flwr_distreal.core.dropout.make_droppable`).
        """
        require_droppable(model, "LUT.learned")
        path = SHIPPED_DIR / f"{model.model_name}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))
            raise LUTError(
                f"no learned LUT is shipped for model {model.model_name!r} (shipped: {shipped}); run the DSE "
                f"(python -m flwr_distreal.dse model=<name> dataset=<data>) and pass lut=<its lut.json>, or use lut=uniform"
            )
        lut = cls.load(path)
        if list(lut.layer_names) != list(model.dropout_layer_names):
            raise LUTError(f"the shipped LUT {path} does not match the dropout layers of {model.model_name!r}")
        if lut.num_classes is not None and lut.num_classes != model.num_classes:
            meta = {**lut.meta, "recosted_from_classes": lut.num_classes}
            return cls.from_vectors(model, lut.vectors, meta=meta)
        lut.check_model(model)
        return lut

    @classmethod
    def uniform(cls, model: DropoutModel, rates: Iterable[float] | None = None) -> "LUT":
        """Equal-rate vectors (the same rate in every layer), the state-of-the-art choice.

        Parameters
        ----------
        model : DropoutModel
            The model.
        rates : iterable of float, optional
            The rates; default 0, 0.05, ..., 0.5.

        Raises
        ------
        TypeError
            If ``model`` was not made droppable (:func:`~flwr_distreal.core.dropout.make_droppable`).
        """
        require_droppable(model, "LUT.uniform")
        grid = np.round(np.linspace(0.0, MAX_RATE, 11), 10) if rates is None else list(rates)
        return cls.from_vectors(
            model, [np.full(model.num_dropout_layers, float(r)) for r in grid], meta={"kind": "uniform"}
        )

    # -- use -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.macs.shape[0])

    @property
    def min_macs(self) -> int:
        """MACs of the cheapest vector."""
        return int(self.macs[0])

    @property
    def max_macs(self) -> int:
        """MACs of the most expensive vector."""
        return int(self.macs[-1])

    def select(self, budget: float, fallback_to_cheapest: bool = False) -> tuple[np.ndarray, int]:
        """The vector with the most MACs not above ``budget`` (Algorithm 1, ``D[r]``).

        Parameters
        ----------
        budget : float
            Forward MACs per sample the device can afford for the next mini-batch.
        fallback_to_cheapest : bool
            If no vector fits, return the cheapest instead of raising.

        Returns
        -------
        (np.ndarray, int)
            The dropout vector (read-only) and its MACs.

        Raises
        ------
        BudgetError
            If even the cheapest vector needs more than ``budget`` (and no fallback).
        ValueError
            If ``budget`` is NaN.
        """
        b = float(budget)
        if math.isnan(b):
            raise ValueError("budget is NaN")
        i = bisect.bisect_right(self._macs_list, b) - 1
        if i < 0:
            if not fallback_to_cheapest:
                raise BudgetError(
                    f"budget {b:.12g} MACs is below the cheapest LUT vector ({self.min_macs} MACs)"
                )
            i = 0
        return self.vectors[i], self._macs_list[i]

    def check_model(self, model: DropoutModel) -> None:
        """Refuse a model this LUT was not made for.

        Raises
        ------
        LUTError
            Naming the first difference: model name, number of classes, input shape, number
            or names of dropout layers, or a stored MAC count that the model does not give.
        TypeError
            If ``model`` was not made droppable (:func:`~flwr_distreal.core.dropout.make_droppable`).
        """
        require_droppable(model, "LUT.check_model")
        if model.model_name and self.model_name != model.model_name:
            raise LUTError(f"LUT is for model {self.model_name!r}, not {model.model_name!r}")
        names = model.dropout_layer_names
        if len(names) != len(self.layer_names):
            raise LUTError(
                f"LUT has {len(self.layer_names)} dropout layers, model {model.model_name!r} has {len(names)}"
            )
        for i, (a, b) in enumerate(zip(self.layer_names, names)):
            if a != b:
                raise LUTError(f"LUT layer {i} is {a!r} but the model's is {b!r}")
        if self.num_classes is not None and self.num_classes != model.num_classes:
            raise LUTError(f"LUT was made for {self.num_classes} classes, the model has {model.num_classes}")
        if self.input_shape is not None and tuple(self.input_shape) != tuple(model.input_shape):
            raise LUTError(f"LUT was made for input {self.input_shape}, the model takes {model.input_shape}")
        for i, (v, m) in enumerate(zip(self.vectors, self._macs_list)):
            actual = count_macs(model, v)
            if actual != m:
                raise LUTError(f"LUT entry {i} says {m} MACs but the model needs {actual}")

    # -- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON-serialisable file content."""
        return {
            "format": LUT_FORMAT,
            "version": LUT_VERSION,
            "model": self.model_name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "layers": self.layer_names,
            "entries": [
                {"macs": int(m), "vector": [float(str(x)) for x in v.astype(np.float32)]}
                for v, m in zip(self.vectors, self.macs)
            ],
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the LUT (``.npz``: binary; otherwise JSON), atomically: a temporary file,
        then a rename, so an interrupted save never leaves a truncated LUT behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = self.to_dict()
        if path.suffix == ".npz":
            header = {k: v for k, v in data.items() if k != "entries"}
            with tmp.open("wb") as f:
                np.savez_compressed(
                    f,
                    header=np.array(json.dumps(header)),
                    vectors=self.vectors.astype(np.float32),
                    macs=self.macs.astype(np.int64),
                )
        else:
            entries = ",\n  ".join(json.dumps(e, separators=(",", ":")) for e in data.pop("entries"))
            head = json.dumps(data, separators=(",", ":"))[:-1]
            tmp.write_text(f'{head},"entries":[\n  {entries}\n]}}\n')
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "LUT") -> "LUT":
        """Build a LUT from parsed file content, refusing anything that is not a valid LUT."""
        if not isinstance(data, dict) or data.get("format") != LUT_FORMAT:
            raise LUTError(f"{source} is not a flwr-distreal LUT (missing format {LUT_FORMAT!r})")
        if data.get("version") != LUT_VERSION:
            raise LUTError(f"{source} has LUT version {data.get('version')!r}; this reader knows {LUT_VERSION}")
        for key in ("model", "layers", "entries"):
            if key not in data:
                raise LUTError(f"{source} lacks the key {key!r}")
        if not isinstance(data["layers"], list) or not all(isinstance(n, str) for n in data["layers"]):
            raise LUTError(f"{source}: 'layers' must be a list of layer names")
        if not isinstance(data["model"], str):
            raise LUTError(f"{source}: 'model' must be a model name")
        entries = data["entries"]
        if not isinstance(entries, list) or not entries:
            raise LUTError(f"{source} has no entries")
        vectors, macs = [], []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "vector" not in e or "macs" not in e:
                raise LUTError(f"{source} entry {i} needs 'vector' and 'macs'")
            if not isinstance(e["vector"], list) or len(e["vector"]) != len(data["layers"]):
                raise LUTError(
                    f"{source} entry {i} has {len(e['vector']) if isinstance(e['vector'], list) else '?'} "
                    f"rates for {len(data['layers'])} layers"
                )
            vectors.append(e["vector"])
            macs.append(e["macs"])
        try:
            return cls(
                data["model"],
                data["layers"],
                vectors,
                macs,
                num_classes=data.get("num_classes"),
                input_shape=data.get("input_shape"),
                meta=data.get("meta"),
            )
        except LUTError as err:
            raise LUTError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike, model: DropoutModel | None = None) -> "LUT":
        """Read a LUT file; with ``model``, also refuse it if it does not match the model.

        Raises
        ------
        LUTError
            If the file is missing, truncated, not JSON, not a LUT, malformed, or does not
            match ``model``.
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise LUTError(f"cannot read LUT file {path}: {err}") from err
        expected = "expected a LUT written by LUT.save or the DSE: an .npz archive (header, vectors, macs) or JSON"
        if raw[:2] == b"PK":  # a zip archive: the .npz format
            data = cls._npz_dict(path)
        elif raw[:6] == b"\x93NUMPY":
            raise LUTError(f"LUT file {path} is a .npy file (a single NumPy array, np.save), not a LUT; {expected}")
        elif path.suffix.lower() == ".npz":
            raise LUTError(f"LUT file {path} has the .npz extension but is not an .npz (zip) archive; {expected}")
        else:
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise LUTError(f"LUT file {path} is binary, neither an .npz LUT nor JSON text ({err}); {expected}") from err
            except json.JSONDecodeError as err:
                raise LUTError(f"LUT file {path} is truncated or not JSON ({err})") from err
        lut = cls.from_dict(data, source=f"LUT file {path}")
        if model is not None:
            try:
                lut.check_model(model)
            except LUTError as err:
                raise LUTError(f"LUT file {path}: {err}") from err
        return lut

    @staticmethod
    def _npz_dict(path: Path) -> dict:
        """Read the ``.npz`` format into the JSON layout."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(str(npz["header"]))
                vectors = np.asarray(npz["vectors"], dtype=np.float64)
                macs = np.asarray(npz["macs"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as err:
            raise LUTError(f"LUT file {path} is not a valid .npz LUT ({err})") from err
        if not isinstance(header, dict):
            raise LUTError(f"LUT file {path} has no header mapping")
        if vectors.ndim != 2 or macs.shape != (vectors.shape[0],):
            raise LUTError(f"LUT file {path} has vectors of shape {vectors.shape} and {macs.size} MAC counts")
        # MACs go through the same checks as JSON (the constructor refuses NaN, fractions, ...).
        header["entries"] = [{"macs": m, "vector": v.tolist()} for v, m in zip(vectors, macs.tolist())]
        return header

    def __repr__(self) -> str:
        return (
            f"LUT(model={self.model_name!r}, vectors={len(self)}, layers={len(self.layer_names)}, "
            f"macs={self.min_macs}..{self.max_macs})"
        )
