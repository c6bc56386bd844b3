"""Dataset registry by name, like the model registry (:mod:`flwr_distreal.models`).

A *source* is a loader function that returns a :class:`~flwr_distreal.data.federated.FederatedData`
and takes keyword arguments only (each with a default, except what the user must give, such as
``root`` or ``path``). It is registered under the name that ``dataset.name`` in the config (and
``conf/dataset/<file>.yaml``) uses::

    from flwr_distreal.data import FederatedData, register_dataset

    @register_dataset("my_data")
    def load_my_data(num_devices: int = 10, seed: int = 0) -> FederatedData:
        ...

:func:`build_dataset` (also importable as :func:`load_federated`) looks the name up, drops
keyword arguments whose value is None (unset config keys keep the loader's defaults), refuses
keyword arguments the loader does not take, and calls it. The runner passes the run's ``seed``
to every loader, plus the ``dataset.*`` keys that are set.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .errors import DataError
from .federated import FederatedData

__all__ = ["build_dataset", "is_dataset", "list_datasets", "load_federated", "register_dataset", "unregister_dataset"]

#: Registered loaders by dataset name.
_DATASETS: dict[str, Callable[..., FederatedData]] = {}

L = TypeVar("L", bound=Callable[..., Any])


def register_dataset(name: str, *, replace: bool = False) -> Callable[[L], L]:
    """Register a dataset loader under ``name`` (a decorator; the function is returned unchanged).

    Parameters
    ----------
    name : str
        The dataset's name, as ``dataset.name`` in the config gives it.
    replace : bool (default: False)
        Replace a loader already registered under ``name`` (otherwise that is refused).

    Returns
    -------
    Callable[[L], L]
        The decorator.

    Raises
    ------
    TypeError
        If ``name`` is not a string, or the decorated object is not callable.
    DataError
        If ``name`` is empty or has surrounding whitespace, or is already registered and
        ``replace`` is False (the message names the loader registered under it).
    """
    if not isinstance(name, str):
        raise TypeError(f"a dataset name must be a str, got {type(name).__name__} {name!r}")
    if not name or name != name.strip():
        raise DataError(f"a dataset name must be non-empty without surrounding whitespace, got {name!r}")

    def add(loader: L) -> L:
        if not callable(loader):
            raise TypeError(f"register_dataset({name!r}) needs a callable loader, got {type(loader).__name__}")
        old = _DATASETS.get(name)
        if old is not None and not replace:
            raise DataError(
                f"dataset {name!r} is already registered (loader {_qualified(old)}); pick another name, "
                f"or pass replace=True to override it; registered datasets: {list_datasets()}"
            )
        _DATASETS[name] = loader
        return loader

    return add


def unregister_dataset(name: str) -> None:
    """Remove the loader registered under ``name``.

    Raises
    ------
    DataError
        If ``name`` is not registered (the message lists the registered names).
    """
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {list_datasets()}")
    del _DATASETS[name]


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted (those :func:`build_dataset` accepts)."""
    return sorted(_DATASETS)


def is_dataset(name: str) -> bool:
    """Whether ``name`` is a registered dataset."""
    return name in _DATASETS


def _qualified(loader: Callable[..., Any]) -> str:
    return f"{getattr(loader, '__module__', '?')}.{getattr(loader, '__qualname__', repr(loader))}"


def build_dataset(name: str, **kwargs: Any) -> FederatedData:
    """Load a registered federated dataset by name.

    Keyword arguments whose value is None are dropped, so unset config entries keep the
    loader's defaults. Unknown keyword arguments are refused with the accepted ones listed
    (a loader with ``**kwargs`` accepts any).

    Parameters
    ----------
    name : str
        One of :func:`list_datasets`; built in: ``"digits"`` (embedded default),
        ``"femnist"``, ``"cifar10"``, ``"cifar100"``, ``"mnist"``, ``"npz"``.
    **kwargs : Any
        Arguments of the loader (:func:`~flwr_distreal.data.load_digits`,
        :func:`~flwr_distreal.data.load_femnist`, ...).

    Returns
    -------
    FederatedData
        The loaded and partitioned dataset.

    Raises
    ------
    DataError
        If ``name`` is not registered (the message lists the registered names), a keyword
        argument is not accepted, a required one is missing, or ``seed`` is not an int >= 0.
    TypeError
        If the loader returns something other than a ``FederatedData``.
    """
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {list_datasets()}")
    loader = _DATASETS[name]
    params = inspect.signature(loader).parameters
    named = {
        p.name: p
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(given) - set(named))
    if unknown and not open_ended:
        raise DataError(f"dataset {name!r} does not accept {unknown}; accepted: {sorted(named)}")
    missing = [p.name for p in named.values() if p.default is inspect.Parameter.empty and p.name not in given]
    if missing:
        raise DataError(f"dataset {name!r} needs {missing}")
    if "seed" in given:
        seed = given["seed"]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(
                f"seed must be an integer >= 0 (numpy's random generators refuse negative seeds), got {seed!r}"
            )
    data = loader(**given)
    if not isinstance(data, FederatedData):
        raise TypeError(
            f"dataset {name!r}: loader {_qualified(loader)} returned {type(data).__name__}, not a FederatedData"
        )
    return data


#: The runner's name for :func:`build_dataset` (kept for existing code).
load_federated = build_dataset
