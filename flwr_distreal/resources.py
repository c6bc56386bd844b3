"""Public import path ``flwr_distreal.resources`` (the README's examples): the module
:mod:`flwr_distreal.core.resources` itself, not a copy (so patching and isinstance checks see one module)."""
import sys

from .core import resources as _module

sys.modules[__name__] = _module
