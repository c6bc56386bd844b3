"""The server's decisions, free of Flower and Hydra: the reply gate (validation, straggler and
claim checks), the round's outlier bounds, node sampling, the aggregation maths (Algorithm 2's
MACs-weighted average; per-weight averaging of submodels) and the round-start planners of the
submodel baselines. The Flower strategies of :mod:`flwr_distreal.flower` are thin adapters over it.
"""

from .aggregate import *  # noqa: F401,F403  (the layer's public names: import them from flwr_distreal.server)
from .aggregate import __all__ as _aggregate_all
from .core import *  # noqa: F401,F403
from .core import __all__ as _core_all

__all__ = [*_aggregate_all, *_core_all]
