"""``python -m flwr_distreal.main``: the command of :mod:`flwr_distreal.cli.main`, kept at its public path.
Imported (not run), this name is that module itself."""
import sys

from .cli import main as _module

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
