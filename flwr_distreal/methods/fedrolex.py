"""FedRolex (Alam et al., NeurIPS 2022): rolling sub-model extraction.

Everything method-specific of FedRolex lives here: its ``strategy.*`` schema
(:class:`FedRolexStrategyConfig`, YAML ``conf/strategy/fedrolex.yaml``), the server's
round-start planner (:class:`FedRolexPlanner`) and its registration (:data:`FEDROLEX`). The client is the submodel baselines' trainer unchanged
(:class:`~flwr_distreal.training.trainers.BaselineTrainer`, ``fixed-subsets``) and the
aggregation is :class:`~flwr_distreal.server.SubmodelCore`'s ``per_weight`` rule.

What FedRolex does, and where the reference code says so (``AIoT-MLSys-Lab/FedRolex``):

* Capacity levels ``beta in {1, 1/2, 1/4, 1/8, 1/16}`` (``utils.py: process_control``,
  ``model_split_rate``): here ``beta_p = shrink ** (p - 1)``, ``shrink = 0.5``, 5 levels.
* The rolling window (``resnet_server.py: ResnetServerRoll.split_model``, default
  ``overlap=None``): a layer with ``C`` output channels at level ``beta`` keeps
  ``k = ceil(beta * C)`` channels, ``model_idx = torch.roll(arange(C), t % C)[:k]``, i.e.
  ``S_t = {(j - t) mod C : j < k}`` with ``t = self.rounds``, 0 in the first round and
  incremented after each aggregation. The window moves by ONE channel per round, whatever
  ``beta``, wraps modulo ``C``, and is the same for every client of a round (nested across
  levels). This module uses the reference code's direction (backwards: round ``t`` keeps
  ``C - t, ..., C - 1, 0, ..., k - t - 1``); the paper writes it forwards, ``{t, t + 1, ...}``;
  over ``C`` rounds both cover every channel exactly ``k`` times. Project round ``r`` (1-based)
  is ``t = r - 1``.
* The classifier's outputs and the stem's inputs stay full; channels coupled by residual sums
  share one window (one index set per dropout group of
  :class:`~flwr_distreal.core.dropout.DroppableModel`, ``C`` = the group's width).
* Aggregation (``ResnetServerRoll.combine``): every weight averaged over the clients whose
  window holds it, UNWEIGHTED; an entry no client holds keeps its global value
  (:func:`flwr_distreal.server.aggregate.masked_average`).

Where the project differs (and why): a device's level is the widest whose forward MACs fit its
budget at round start (the rule of the project's HeteroFL,
:meth:`HeteroFLPlanner.level_for_budget <flwr_distreal.server.HeteroFLPlanner.level_for_budget>`),
not FedRolex's random ``dynamic`` draw; aggregation is weighted by examples by default, as
every submodel baseline here (``weighting: uniform`` is FedRolex's); the label masking of the
classifier (``mask=1``, HeteroFL's non-IID trick) is not applied, as for the project's HeteroFL.

No Flower or Hydra imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..core.lazy import lazy_exports
from .base import ConfigError, Method, SubmodelStrategyConfig, check_choice
from .registry import register_method

if TYPE_CHECKING:
    from ..core.dropout import DropoutModel
    from ._fedrolex import FedRolexPlanner

__all__ = [
    "FEDROLEX",
    "FEDROLEX_LEVELS",
    "FEDROLEX_SHRINK",
    "OFFSET_KEY",
    "WEIGHTINGS",
    "FedRolexPlanner",
    "FedRolexStrategyConfig",
    "rolling_window",
]

#: FedRolex's capacity levels: ``beta = 0.5 ** (p - 1)``, ``p = 1 .. 5`` (reference code
#: ``utils.py: process_control``, ``model_split_rate`` a..e = 1, 1/2, 1/4, 1/8, 1/16).
FEDROLEX_SHRINK = 0.5
FEDROLEX_LEVELS = 5

#: Train-config key (server to client, for logs): the window offset ``t`` of the round.
OFFSET_KEY = "rolex-offset"

#: How the clients holding a weight are weighted: ``examples`` (the project's submodel
#: baselines, FedAvg's weights) or ``uniform`` (FedRolex's ``ResnetServerRoll.combine``).
WEIGHTINGS: tuple[str, ...] = ("examples", "uniform")


def rolling_window(channels: int, kept: int, offset: int) -> np.ndarray:
    """The channels a layer of ``channels`` keeps at window offset ``offset``, sorted.

    ``{(j - offset) mod channels : j < kept}``: FedRolex's ``torch.roll(arange(C), offset)[:k]``
    (``resnet_server.py: split_model``).

    Raises
    ------
    ValueError
        If ``channels < 1``, ``kept`` is not in ``[1, channels]`` or ``offset`` is negative or
        not an int.
    """
    for name, value in (("channels", channels), ("kept", kept), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if not 1 <= kept <= channels:
        raise ValueError(f"kept must be in [1, {channels}], got {kept}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return np.sort((np.arange(kept) - int(offset)) % int(channels))


# ----------------------------------------------------------------------- schema, registration


@dataclass
class FedRolexStrategyConfig(SubmodelStrategyConfig):
    """FedRolex (Alam et al., NeurIPS 2022); see
    :class:`~flwr_distreal.methods.base.SubmodelStrategyConfig`.

    ``shrink``, ``levels``: capacity levels ``beta = shrink ** (p - 1)``, ``p = 1 .. levels``
    (FedRolex: 1, 1/2, 1/4, 1/8, 1/16). ``weighting``: ``examples`` (default, the project's
    convention for every submodel baseline) or ``uniform`` (FedRolex's). Defaults: scaled
    submodels, per-weight averaging, static BatchNorm.
    """

    name: str = "fedrolex"
    # beta = shrink^(p-1), p = 1..levels (FedRolex utils.py process_control, model_split_rate
    # a..e = 1, 0.5, 0.25, 0.125, 0.0625)
    shrink: float = FEDROLEX_SHRINK
    levels: int = FEDROLEX_LEVELS
    # examples: each weight averaged over the clients holding it, weighted by examples, as the
    # project's HeteroFL and Federated Dropout (equal partitions make both the same); uniform:
    # FedRolex's unweighted per-element average (resnet_server.py ResnetServerRoll.combine)
    weighting: str = "examples"
    # true: FedRolex's Scaler (control ..._bn_1_1, scale=1: modules/modules.py Scaler divides by
    # the rate in training), folded into the consumer as C/k. static_bn true: FedRolex builds
    # every BatchNorm with track_running_stats=False (models/resnet.py); here batch statistics in
    # training and the full model's statistics recomputed before each evaluation (as HeteroFL).
    inverted_scaling: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.shrink < 1:
            raise ConfigError(f"strategy.shrink must be in (0, 1), got {self.shrink}")
        if self.levels < 1:
            raise ConfigError(f"strategy.levels must be >= 1, got {self.levels}")
        check_choice("weighting", self.weighting, WEIGHTINGS)


def _fedrolex_planner(
    model: DropoutModel,
    *,
    seed: int,
    shrink: float = FEDROLEX_SHRINK,
    levels: int = FEDROLEX_LEVELS,
    weighting: str = "examples",
) -> FedRolexPlanner:
    """FedRolex's planner (deterministic: ``seed`` is not used)."""
    return __getattr__("FedRolexPlanner")(model, shrink=shrink, levels=levels, weighting=weighting)


FEDROLEX = register_method(
    Method(
        name="fedrolex",
        label="FedRolex (Alam 2022)",
        schema=FedRolexStrategyConfig,
        rule="submodel",
        planner=_fedrolex_planner,
        planner_options=("shrink", "levels", "weighting"),
        description="capacity levels at round start, a channel window rolling by one per round",
    )
)


#: :class:`FedRolexPlanner` (its torch side, :mod:`._fedrolex`), loaded on first use (PEP 562).
__getattr__, __dir__ = lazy_exports(globals(), {"FedRolexPlanner": "._fedrolex"})
