"""Public import path ``flwr_distreal.clientapp`` (the README's examples): the module
:mod:`flwr_distreal.flower.clientapp` itself, not a copy (so patching and isinstance checks see one module)."""
import sys

from .flower import clientapp as _module

sys.modules[__name__] = _module
