"""FjORD (Horvath et al., NeurIPS 2021): ordered dropout, a width drawn per mini-batch.

Everything method-specific of FjORD is importable from here: its ``strategy.*`` schema
(:class:`FjORDStrategyConfig`, YAML ``conf/strategy/fjord.yaml``), the server's round-start
planner (:class:`FjORDPlanner`), the client's trainer (:class:`OrderedDropoutTrainer`), the
per-batch round plan on the simulated clock (:func:`plan_width_round`) and its registration
(:data:`FJORD`). The last three need torch and live in :mod:`._fjord`, loaded on first use
(PEP 562), so that this module, like every method's schema, imports without torch.

What FjORD does, and where the reference code says so (Flower's baseline
``adap/flower baselines/fjord/fjord/``, written by the FjORD authors' group; the SamsungLabs
repository was not available):

* A width set ``P`` (default ``{0.2, 0.4, 0.6, 0.8, 1.0}``, ``conf/common.yaml: p_s``). Width
  ``p`` keeps the FIRST ``ceil(p * C)`` output channels of a layer with ``C`` (ordered, nested
  prefixes; ``od/layers/conv.py: od_conv_forward``). The stem's input channels and the
  classifier's outputs stay full (``models.py: ResNet.__init__``, ``create_linear_layer(od,
  False, ...)``). Here one prefix per dropout group: channels coupled by a residual sum share one
  index set, and the model's input and class outputs are never dropped (they are not dropout
  groups of a :class:`~flwr_distreal.core.dropout.DroppableModel`).
* Each device has a maximum width ``p_max``; before EVERY mini-batch the device draws one
  ``p`` uniformly from ``{p in P : p <= p_max}`` and the whole forward pass runs at it
  (``od/samplers/fixed_od.py: ODSampler.width_sampler``). No ``1/p`` scaling
  (``od_conv_forward`` has none).
* Aggregation: every weight averaged over the devices whose ``p_max`` slice holds it, weighted
  by examples (``strategy.py: fjord_average``). This is
  :func:`flwr_distreal.server.aggregate.masked_average` with the ``p_max``-prefix masks, i.e.
  :class:`~flwr_distreal.server.SubmodelCore`'s ``per_weight`` rule unchanged.

Where the project differs (and why):

* ``p_max`` is the widest width whose submodel's forward MACs fit the device's budget at round
  start (:meth:`SubmodelCore.forward_budget <flwr_distreal.server.SubmodelCore.forward_budget>`),
  the narrowest when none fits: the rule of the project's HeteroFL
  (:meth:`HeteroFLPlanner.level_for_budget <flwr_distreal.server.HeteroFLPlanner.level_for_budget>`),
  so that the comparison is fair. FjORD's ``p_max`` is a static tier per client (``main.py``,
  ``cid_to_max_p``).
* BatchNorm: FjORD keeps running statistics per width with one shared affine
  (``od/layers/batch_norm.py: ODBatchNorm2d``). The project has no per-width statistics; the
  method's defaults use static BatchNorm (statistics recomputed on the full model before
  evaluation), as the project's HeteroFL does.
* Self-distillation (FjORD's optional KD) is not implemented: its extra ``p_max`` pass per
  mini-batch would break the MAC budget.
* Stragglers: as every submodel baseline here, the device trains its whole round; when its
  resources drop during the round so that it finishes after the deadline, it is a straggler and
  its update is discarded (``p_max`` does not follow the drop: the widths were fixed at round
  start). On the measured (wall) clock each mini-batch trains its drawn width the same way
  (:meth:`OrderedDropoutTrainer.measured_choice`).

No Flower or Hydra imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List

from ..core import contract as C
from ..core.lazy import lazy_exports
from .base import ConfigError, Method, SubmodelStrategyConfig
from .registry import register_method

if TYPE_CHECKING:
    from ..core.dropout import DropoutModel
    from ._fjord import FjORDPlanner, OrderedDropoutTrainer, plan_width_round

__all__ = [
    "FJORD",
    "FJORD_WIDTHS",
    "FjORDStrategyConfig",
    "WIDTHS_KEY",
    "FjORDPlanner",
    "OrderedDropoutTrainer",
    "check_widths",
    "format_widths",
    "parse_widths",
    "plan_width_round",
    "prefix_counts",
]


#: FjORD's default width set P (Flower baseline ``conf/common.yaml: p_s``; the paper's uniform
#: discrete distribution over 5 widths).
FJORD_WIDTHS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)

#: Train-config key (server to client): the widths a device may draw this round,
#: ``P`` intersected with ``(0, p_max]``, comma-separated and ascending (e.g. ``"0.2,0.4,0.6"``).
WIDTHS_KEY = "fjord-widths"


def check_widths(widths: object) -> tuple[float, ...]:
    """The width set as an ascending tuple of floats in (0, 1].

    Raises
    ------
    ValueError
        If ``widths`` is not a non-empty sequence of distinct finite numbers in (0, 1].
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
        raise ValueError(f"widths must be a non-empty sequence of numbers in (0, 1], got {widths!r}")
    values = list(widths)
    if not values:
        raise ValueError("widths must be a non-empty sequence of numbers in (0, 1], got an empty one")
    out: list[float] = []
    for w in values:
        if not C.is_number(w) or not math.isfinite(float(w)) or not 0.0 < float(w) <= 1.0:
            raise ValueError(f"every width must be a number in (0, 1], got {w!r} in {values!r}")
        out.append(float(w))
    if len(set(out)) != len(out):
        raise ValueError(f"widths must be distinct, got {values!r}")
    return tuple(sorted(out))


def format_widths(widths: Sequence[float]) -> str:
    """The :data:`WIDTHS_KEY` value of a width set (ascending, comma-separated, ``repr`` floats)."""
    return ",".join(repr(float(w)) for w in check_widths(widths))


def parse_widths(text: object) -> tuple[float, ...]:
    """The width set a :data:`WIDTHS_KEY` value names.

    Raises
    ------
    ValueError
        If it is not a comma-separated list of distinct numbers in (0, 1].
    """
    if not isinstance(text, str):
        raise ValueError(f"{WIDTHS_KEY} must be a comma-separated string of widths, got {text!r}")
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError as err:
        raise ValueError(f"{WIDTHS_KEY} must be a comma-separated string of widths, got {text!r}") from err
    return check_widths(values)


def prefix_counts(layer_widths: Sequence[int], width: float) -> list[int]:
    """Filters kept per dropout group at width ``width``: ``ceil(width * C)``, at least 1.

    The rule of :meth:`HeteroFLPlanner.counts_for_width
    <flwr_distreal.server.HeteroFLPlanner.counts_for_width>` (the client cannot import the
    server layer): it equals FjORD's ``int(np.ceil(C * p))`` for every ``p`` of the default set.
    """
    return [min(c, max(1, math.ceil(round(width * c, 9)))) for c in layer_widths]


# ----------------------------------------------------------------------- schema, registration


@dataclass
class FjORDStrategyConfig(SubmodelStrategyConfig):
    """FjORD (Horvath et al., NeurIPS 2021); see
    :class:`~flwr_distreal.methods.base.SubmodelStrategyConfig`.

    ``widths``: the width set ``P`` (numbers in (0, 1], distinct). A device's ``p_max`` is the
    widest whose submodel fits its budget at round start; each mini-batch trains a width drawn
    uniformly from those ``<= p_max``. Defaults: unscaled ordered dropout, per-weight averaging
    weighted by examples, static BatchNorm.
    """

    name: str = "fjord"
    # P (Flower's FjORD baseline, conf/common.yaml p_s; the paper's uniform distribution over 5
    # widths for CIFAR-10/ResNet-18 and FEMNIST/CNN)
    widths: List[float] = field(default_factory=lambda: list(FJORD_WIDTHS))
    # false: no 1/p scaling (od/layers/conv.py od_conv_forward and ODLinear have none).
    # aggregation per_weight: each weight averaged over the devices whose p_max slice holds it,
    # weighted by examples (strategy.py fjord_average). static_bn true: a DEVIATION. FjORD keeps
    # running statistics per width with one shared affine (od/layers/batch_norm.py ODBatchNorm2d)
    # and tests the full model with the p = 1 statistics. Here training normalises with batch
    # statistics and the server recomputes the full model's statistics before each evaluation,
    # as for HeteroFL. The affine parameters are sliced as in FjORD. Per-width statistics would
    # add state_dict entries, so they are not offered. static_bn false averages running
    # statistics trained at mixed widths.
    inverted_scaling: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_widths(self.widths)
        except ValueError as err:
            raise ConfigError(f"strategy.widths: {err}") from None


def _fjord_planner(model: DropoutModel, *, seed: int, widths: Sequence[float] = FJORD_WIDTHS) -> FjORDPlanner:
    """FjORD's planner (deterministic: ``seed`` is not used; the client draws the widths)."""
    return __getattr__("FjORDPlanner")(model, widths=widths)  # the torch side, loaded on first use


def _fjord_trainer(
    model: DropoutModel, loader: Any, device_id: int, resources: Any, method_options: Mapping[str, Any], **common: Any
) -> OrderedDropoutTrainer:
    """The FjORD device (``method_options``: ``widths``, used when the server sends none)."""
    return __getattr__("OrderedDropoutTrainer")(model, loader, device_id, resources, **dict(method_options), **common)


#: Names of :mod:`._fjord` (torch) this module exports on first use.
_TORCH_SIDE = ("FjORDPlanner", "OrderedDropoutTrainer", "plan_width_round")


__getattr__, __dir__ = lazy_exports(globals(), dict.fromkeys(_TORCH_SIDE, "._fjord"))


FJORD = register_method(
    Method(
        name="fjord",
        label="FjORD (Horvath 2021)",
        schema=FjORDStrategyConfig,
        rule="submodel",
        planner=_fjord_planner,
        planner_options=("widths",),
        client_options=("widths",),
        trainer=_fjord_trainer,
        description="ordered dropout: a width per mini-batch up to the widest that fits at round start",
    )
)
