"""Checkpoints of federated runs: atomic on disk, refused when they do not match the config.

A checkpoint (``checkpoint.npz`` in the run directory) holds everything a run needs to continue
as if it had not stopped: the global model (``state_dict`` keys and arrays) after round ``k``,
``k``, the state of the server's seeded sampling, the metrics rows so far and the run's config.
It is written to a temporary file in the same folder, flushed to disk and moved over the old one
with ``os.replace``, so a crash mid-write leaves the previous checkpoint intact and a checkpoint
on disk is always whole. Clients keep no state between rounds (every round reseeds its draws
from ``(seed, round, device)``), so a resumed run gives the same per-round metrics as an
uninterrupted one.

No Flower or Hydra imports.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECKPOINT_FILE",
    "IGNORED_KEYS",
    "Checkpoint",
    "CheckpointError",
    "config_differences",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.npz"
#: Config keys that may differ between a run and its resumption: where results go, how the run is
#: executed or shown, and how many rounds it runs in total (a run may be extended).
IGNORED_KEYS = frozenset(
    {"output_dir", "resume", "plot", "rounds", "runtime", "checkpoint_every", "node_wait", "evaluate_every"}
)  # evaluate_every: when the server evaluates, not what it trains
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not belong to this run's config."""


@dataclass
class Checkpoint:
    """The state of a run after round ``round``.

    Attributes
    ----------
    round : int
        Rounds completed.
    keys : list of str
        ``state_dict`` keys of the global model, in order.
    arrays : list of np.ndarray
        The global model after ``round``.
    config : dict
        The run's config (``dataclasses.asdict`` of the RunConfig).
    rows : list of dict
        The ``metrics.csv`` rows of rounds ``1..round``.
    strategy : dict
        The server strategy's state (e.g. its sampling generators), JSON-able.
    """

    round: int
    keys: list[str]
    arrays: list[np.ndarray]
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    strategy: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(directory: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``directory/checkpoint.npz`` atomically; returns the path."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / CHECKPOINT_FILE
    tmp = folder / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    meta = {
        "format": _FORMAT,
        "round": int(ckpt.round),
        "keys": list(ckpt.keys),
        "config": ckpt.config,
        "rows": ckpt.rows,
        "strategy": ckpt.strategy,
    }
    payload = {f"a{i}": np.asarray(a, order="C") for i, a in enumerate(ckpt.arrays)}  # keeps 0-d shapes
    payload["meta"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)
    with tmp.open("wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def load_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none.

    Raises
    ------
    CheckpointError
        If the file exists but is truncated, not a checkpoint, or of another format version.
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode())
            arrays = [np.array(npz[f"a{i}"]) for i in range(len(meta["keys"]))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {err}") from err
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {_FORMAT}")
    return Checkpoint(
        round=int(meta["round"]),
        keys=list(meta["keys"]),
        arrays=arrays,
        config=dict(meta["config"]),
        rows=list(meta.get("rows", [])),
        strategy=dict(meta.get("strategy", {})),
    )


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Sequence[str] = tuple(IGNORED_KEYS), prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ between two config dicts (nested), except ``ignore``d
    top-level keys: ``["lr: 0.1 -> 0.2", ...]``."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, ignore, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
