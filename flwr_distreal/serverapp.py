"""Public import path ``flwr_distreal.serverapp`` (the README's examples): the module
:mod:`flwr_distreal.flower.serverapp` itself, not a copy (so patching and isinstance checks see one module)."""
import sys

from .flower import serverapp as _module

sys.modules[__name__] = _module
