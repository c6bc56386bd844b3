"""The methods registry: ``strategy.name`` -> :class:`~flwr_distreal.methods.base.Method`.

Like the models and datasets registries: a method file registers its record once, at import
(``register_method(Method(...))``); the runner, the config schema and both Flower APIs look
methods up here and nowhere dispatch on a method's name. An unknown name is refused with the
registered ones listed, and so is a second registration of a name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from . import base
from .base import ConfigError, Method

__all__ = ["MethodView", "get_method", "list_methods", "register_method", "schema_of", "unregister_method"]

_METHODS: dict[str, Method] = {}
base._REGISTERED = lambda: MappingProxyType(_METHODS)  # what StrategyConfig checks names against


def register_method(method: Method) -> Method:
    """Register ``method`` under ``method.name`` and return it.

    Raises
    ------
    TypeError
        If ``method`` is not a :class:`Method`.
    ValueError
        If a method of that name is registered already.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a Method, got {type(method).__name__}")
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already ({_METHODS[method.name].label})")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove a registered method (for tests and for replacing one on purpose)."""
    if name not in _METHODS:
        raise ConfigError(f"no method named {name!r}; registered: {list_methods()}")
    return _METHODS.pop(name)


def get_method(name: str | Method) -> Method:
    """The registered method ``name`` (a :class:`Method` is returned as it is).

    Raises
    ------
    ConfigError
        If no method of that name is registered (the message lists the registered ones).
    """
    if isinstance(name, Method):
        return name
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; registered methods: {list_methods()}") from None


def list_methods() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_METHODS)


def schema_of(name: str) -> type:
    """The ``strategy.*`` schema of method ``name``."""
    return get_method(name).schema


class MethodView(Mapping):
    """A read-only mapping ``strategy.name`` -> one attribute of each registered method (e.g.
    ``MethodView("schema")``, ``MethodView("label")``), read live: a method registered later is
    in it."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __getitem__(self, name: str) -> Any:
        if name not in _METHODS:
            raise KeyError(name)
        return getattr(_METHODS[name], self.attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_METHODS))

    def __len__(self) -> int:
        return len(_METHODS)
