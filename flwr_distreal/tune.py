"""``python -m flwr_distreal.tune``: the command of :mod:`flwr_distreal.cli.tune`, kept at its public path.
Imported (not run), this name is that module itself."""
import sys

from .cli import tune as _module

if __name__ == "__main__":
    sys.exit(_module.main())
else:
    sys.modules[__name__] = _module
