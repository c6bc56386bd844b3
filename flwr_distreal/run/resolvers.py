"""The ``tuned_lr`` resolver: a run config takes the learning rate tuned by :mod:`flwr_distreal.cli.tune`.

A run config reads the tuned value with ``lr: ${tuned_lr:<setting>}``
(:func:`register_resolvers`), which picks the entry of the run's ``strategy.name`` (and, for
DISTREAL, its ``lut``, and the keys a variant set) from ``conf/tuned/<setting>.yaml``. A missing
file or entry is an error naming the file and the command that writes it.

This module sits below both the tuning command (:mod:`flwr_distreal.cli.tune`, which writes the
files) and everything that composes a run config (:mod:`flwr_distreal.cli.main`,
:mod:`flwr_distreal.run.flwr_app`), so neither imports the other for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .staging import CONF_DIR
from ..methods import get_method, list_methods

__all__ = ["CONF_DIR", "TUNED_DIR", "TuneError", "load_tuned", "lookup_tuned_lr", "register_resolvers", "tuned_path"]

#: The ``tuned/`` folder of tuned values in the Hydra config folder (:data:`CONF_DIR`, re-exported).
TUNED_DIR = CONF_DIR / "tuned"


class TuneError(ConfigError):
    """A tuning setting is invalid, a run folder does not fit, or a tuned file is missing or wrong."""


def tuned_path(setting: str) -> Path:
    """The tuned file of ``setting``: ``conf/tuned/<setting>.yaml``, or ``setting`` itself when it
    is a path to a ``.yaml`` file."""
    text = str(setting).strip()
    if text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text:
        return Path(text).expanduser()
    return TUNED_DIR / f"{text}.yaml"


def load_tuned(path: Path) -> dict[str, Any]:
    """The parsed tuned file ``path``.

    Raises
    ------
    TuneError
        If it is unreadable or has no ``strategies`` mapping.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TuneError(f"tuned file {path} is unreadable: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("strategies"), dict):
        raise TuneError(f"tuned file {path} has no 'strategies' mapping; rewrite it with python -m flwr_distreal.tune")
    return data


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def lookup_tuned_lr(setting: str, value_of: Callable[[str], Any]) -> float:
    """The tuned lr of a run from the tuned file of ``setting``.

    Parameters
    ----------
    setting : str
        The setting (``conf/tuned/<setting>.yaml``) or a path to a tuned file.
    value_of : callable
        The run's value of a dotted config key (``strategy.name``, ``lut``, ...).

    Returns
    -------
    float
        The lr of the entry that matches the run (its strategy, DISTREAL's LUT and the variant's
        keys); of several, the one that fixes the most keys.

    Raises
    ------
    TuneError
        If the file is missing (naming it and the command that writes it), or it has no entry
        for the run, or that entry's every tuning run failed.
    """
    path = tuned_path(setting)
    strategy = value_of("strategy.name")
    if not path.is_file():
        name = path.stem if path.parent == TUNED_DIR else str(path)
        raise TuneError(
            f"tuned_lr:{setting}: no tuned file {path}; write it with: python -m flwr_distreal.tune "
            f"tune.setting={name} <the comparison's dataset/model/resources/rounds overrides> "
            "(see the README's 'Tuning the learning rate')"
        )
    data = load_tuned(path)
    found = []
    for name, entry in data["strategies"].items():
        match = entry.get("match") or {"strategy.name": str(name).split("@")[0]}
        if all(_same(value_of(key), want) for key, want in match.items()):
            found.append((len(match), name, entry))
    if not found:
        lut = value_of("lut")
        lut_note = strategy in list_methods() and get_method(strategy).uses_lut  # a LUT method: name its LUT
        commands = sorted({str(e.get("command")) for e in data["strategies"].values() if e.get("command")})
        written = f"; it was written by: {commands[0]}" if commands else ""
        raise TuneError(
            f"tuned_lr:{setting}: {path} has no entry for strategy={strategy}"
            f"{f' lut={lut}' if lut_note else ''} (its entries: {list(data['strategies'])}); "
            f"tune it with the same command and 'tune.strategies=[\"{strategy}{f'@lut={lut}' if lut_note else ''}\"]'"
            f"{written}"
        )
    found.sort(key=lambda t: -t[0])
    _, name, entry = found[0]
    lr = entry.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise TuneError(f"tuned_lr:{setting}: entry {name!r} of {path} has no lr (lr: {lr!r}: every tuning run failed?)")
    return float(lr)


def _resolve_tuned_lr(setting: str, *, _root_: DictConfig) -> float:
    return lookup_tuned_lr(str(setting), lambda key: OmegaConf.select(_root_, key, default=None))


def register_resolvers() -> None:
    """Register the ``tuned_lr`` OmegaConf resolver (idempotent): ``lr: ${tuned_lr:<setting>}``
    in a run config takes the lr tuned for the run's strategy (:func:`lookup_tuned_lr`). Called
    by the Hydra runner and wherever the run config is composed, before composing."""
    if not OmegaConf.has_resolver("tuned_lr"):
        OmegaConf.register_new_resolver("tuned_lr", _resolve_tuned_lr, use_cache=False)
