"""The methods of the comparison, behind a registry (like models and datasets).

A method is one file here (its ``strategy.*`` schema, its server rule and planner, its client
trainer, its label; see :class:`~flwr_distreal.methods.base.Method`) plus its YAML
``conf/strategy/<name>.yaml``; importing this package registers every method below. The
runner and both Flower APIs look methods up with :func:`get_method`.

Layer: above ``core``, ``models``, ``training`` and ``server`` (it combines them), below
``flower`` and ``run``; no Flower, no Hydra.
"""

import importlib
import pkgutil

from .base import (
    CLIENTS,
    RULES,
    ConfigError,
    Method,
    StrategyConfig,
    SubmodelStrategyConfig,
    build_core,
    core_arguments,
)
from .registry import MethodView, get_method, list_methods, register_method, schema_of, unregister_method

#: The modules of this package that are not methods.
_NOT_METHODS = frozenset({"base", "binding", "registry"})

# Every other module here is a method and registers itself when imported: adding a method is
# one file here (plus its YAML), no list to edit. A private module (``_fjord``) holds a method's
# torch side, which its method module loads on first use. The paper's five first (the order of the
# listings), then the rest alphabetically.
_FIRST = ("distreal", "full", "small", "feddropout", "heterofl")
for _name in sorted(
    (m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_METHODS and not m.name.startswith("_")),
    key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n),
):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "CLIENTS",
    "RULES",
    "ConfigError",
    "Method",
    "MethodView",
    "StrategyConfig",
    "SubmodelStrategyConfig",
    "build_core",
    "core_arguments",
    "get_method",
    "list_methods",
    "register_method",
    "schema_of",
    "unregister_method",
]
