"""Public import path ``flwr_distreal.loop`` (the README's examples): the module
:mod:`flwr_distreal.training.loop` itself, not a copy (so patching and isinstance checks see one module)."""
import sys

from .training import loop as _module

sys.modules[__name__] = _module
