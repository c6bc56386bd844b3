"""Names a module exports on first use (PEP 562): :func:`lazy_exports`.

A module that re-exports a heavy module's names (torch, Flower) this way stays light to import:
the package root (``import flwr_distreal`` loads neither torch nor Flower), the server and
training layers and the methods whose planners or trainers need torch (the config schemas and the
method registry import without it: the runner of ``flwr run`` never loads torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    namespace: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` for ``names`` loaded on first use.

    Parameters
    ----------
    namespace : dict
        The module's ``globals()``: a loaded name is stored there, so it is looked up once.
    names : Mapping[str, str]
        Name -> the module that defines it, relative to the module's package (``".submodels"``).

    Returns
    -------
    tuple
        ``(__getattr__, __dir__)``, to assign at the module's top level.

    Examples
    --------
    >>> __getattr__, __dir__ = lazy_exports(globals(), {"HeteroFLPlanner": ".submodels"})  # doctest: +SKIP
    """
    package = namespace.get("__package__") or namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
