"""``python -m flwr_distreal.report``: the command of :mod:`flwr_distreal.cli.report`, kept at its public path.
Imported (not run), this name is that module itself."""
import sys

from .cli import report as _module

if __name__ == "__main__":
    sys.exit(_module.main())
else:
    sys.modules[__name__] = _module
