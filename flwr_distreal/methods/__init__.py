"""The methods of the comparison, behind a registry (like models and datasets).

A method is one file here (its ``strategy.*`` schema, its server rule and planner, its client
trainer, its label; see :class:`~flwr_distreal.methods.base.Method`) plus its YAML
``conf/strategy/<name>.yaml``; importing this package registers every method below. The
runner and both Flower APIs look methods up with :func:`get_method`.

Layer: above ``core``, ``models``, ``training`` and ``server`` (it combines them), below
``flower`` and ``run``; no Flower, no Hydra.
"""

# Registration order is the order of listings (reports, the tuner's default methods): the
# paper's comparison first, then the methods added later.
from . import distreal  # noqa: F401  (each import registers its method)
from . import full  # noqa: F401
from . import small  # noqa: F401
from . import feddropout  # noqa: F401
from . import heterofl  # noqa: F401
from . import distreal_paper  # noqa: F401
from . import fjord  # noqa: F401
from . import fedrolex  # noqa: F401
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
from .registry import get_method, list_methods, register_method, schema_of, unregister_method

__all__ = [
    "CLIENTS",
    "RULES",
    "ConfigError",
    "Method",
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
