"""The server's decisions, free of Flower and Hydra: the reply gate (validation, straggler and
claim checks), the round's outlier bounds, node sampling, the aggregation maths (Algorithm 2's
MACs-weighted average; per-weight averaging of submodels) and the round-start planners of the
submodel baselines. The Flower strategies of :mod:`flwr_distreal.flower` are thin adapters over it:
they unpack Flower's types into a neutral :class:`Reply`, call the layer and pack the result, so
that both APIs produce bit-identical global models from the same replies.

Import the layer's names from here (``from flwr_distreal.server import DistrealCore``); the
modules, lowest first:

:mod:`~flwr_distreal.server.aggregate`
    The aggregation maths (pure NumPy): Algorithm 2, FedAvg, the submodel rules, update norms
    and scaling, the coordinate-wise robust rules.
:mod:`~flwr_distreal.server.validation`
    The per-reply checks: arrays against the broadcast model, a DISTREAL reply's MACs claim.
:mod:`~flwr_distreal.server.replies`
    A reply whatever its API, what the gate made of it, the combination order, the round's
    resource metrics.
:mod:`~flwr_distreal.server.sampling`
    The seeded client draw both APIs share.
:mod:`~flwr_distreal.server.bounds`
    The round-level bounds: outlier updates and claims, the share cap.
:mod:`~flwr_distreal.server.gate`
    :class:`ReplyGate`, the round's gate: stragglers, checks, bounds, logs, counts, combine.
:mod:`~flwr_distreal.server.rules`
    The full-model rules over the gate: :class:`DistrealCore` (Algorithm 2), :class:`FedAvgCore`.
:mod:`~flwr_distreal.server.submodels`
    The submodel baselines: Federated Dropout and HeteroFL planners, :class:`SubmodelCore`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.lazy import lazy_exports

from .aggregate import *  # noqa: F401,F403  (the layer's public names: import them from flwr_distreal.server)
from .aggregate import __all__ as _aggregate_all
from .bounds import *  # noqa: F401,F403
from .bounds import __all__ as _bounds_all
from .gate import *  # noqa: F401,F403
from .gate import __all__ as _gate_all
from .replies import *  # noqa: F401,F403
from .replies import __all__ as _replies_all
from .rules import *  # noqa: F401,F403
from .rules import __all__ as _rules_all
from .sampling import *  # noqa: F401,F403
from .sampling import __all__ as _sampling_all
from .validation import *  # noqa: F401,F403
from .validation import __all__ as _validation_all

#: :mod:`.submodels`' names (``submodels.__all__``), loaded on first use: they build masks on a torch
#: model, while the rest of the layer is NumPy; the config schemas (the runner of ``flwr run``)
#: use the rest without loading torch.
_SUBMODELS = (
    "Assignment",
    "AvailabilityFn",
    "FederatedDropoutPlanner",
    "HeteroFLPlanner",
    "SubmodelCore",
    "SubmodelPlanner",
    "check_device",
)

__all__ = [
    *_aggregate_all,
    *_validation_all,
    *_replies_all,
    *_sampling_all,
    *_bounds_all,
    *_gate_all,
    *_rules_all,
    *_SUBMODELS,
]

if TYPE_CHECKING:
    from .submodels import (
        Assignment,
        AvailabilityFn,
        FederatedDropoutPlanner,
        HeteroFLPlanner,
        SubmodelCore,
        SubmodelPlanner,
        check_device,
    )


__getattr__, __dir__ = lazy_exports(globals(), dict.fromkeys(_SUBMODELS, ".submodels"))
