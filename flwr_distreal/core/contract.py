"""The client/server contract: every key a client and a server exchange, and the fixed-subset codec.

Defined once, here, and imported by both sides (the legacy ``NumPyClient``/``Strategy`` pair
and the Message-API ``ClientApp``/strategies). No Flower or Hydra imports.

Train config (server to client, kebab-case as in Flower)
--------------------------------------------------------
``server-round`` (int)
    The round, 1-based. Seeds the round's random draws and places the round on the device's
    simulated clock.
``unlimited`` (bool)
    Full resources: train the full model on every mini-batch, ignore the resource limits.
``device-id`` (int)
    The device the server assigned a submodel to (submodel baselines).
``fixed-subsets`` (str)
    The submodel: per dropout layer, the kept filter indices, as JSON made by
    :func:`encode_subsets` (submodel baselines).
``submodel-macs`` (int)
    Forward MACs per sample of the assigned submodel.
``dropout-rate`` (float) / ``width-level`` (int), ``width`` (float)
    What Federated Dropout / HeteroFL chose, for logs.
``round-deadline`` (float)
    Wall-clock seconds the round may take (wall-clock resource mode, not used by the simulated
    clock).
``batch-size`` (int), ``local-epochs`` (int)
    The mini-batch size and local epochs the server configured (DISTREAL, when the strategy is
    given ``batch_size``): what it bounds a reply's ``num_batches`` by, with the node's
    ``round-samples`` or the reply's ``num-examples``. A client should train with them.

Train metrics (client to server)
--------------------------------
``macs``
    The computation ``c`` of Algorithm 1: forward MACs per sample of each mini-batch's
    (sub)model, summed over the mini-batches trained. Weights the update in Algorithm 2.
``num_batches``
    Mini-batches trained.
``num-examples``
    Samples trained (Flower's default ``weighted_by_key``; Message API only, the legacy API
    carries it in ``FitRes.num_examples``).
``straggler``
    True (1) when the device missed the round's deadline: the server discards its update.
``available_macs``
    What the device could have computed in the round, in the unit of ``macs``.
``sim_time``, ``utilisation``, ``mean_dropout``, ``train_loss``, ``incomplete``
    For the record. ``train_loss`` is NaN when the device trained nothing, or when a step's
    loss was not finite (training stopped there; ``incomplete`` counts the batches left).
``lr``
    The learning rate of the round's local steps (the run's recipe, see
    :mod:`flwr_distreal.training.recipe`), for the record.
``partition-id``
    The device (partition) the reply comes from: replies are aggregated in device order and
    every refusal names it.

Properties (asked once per client, legacy ``get_properties`` or a Message-API query)
------------------------------------------------------------------------------------
``partition-id`` and ``round-samples`` (samples processed in one round of local training):
the server needs both for seeded sampling and for the submodel baselines' round-start budget.

What a plain Flower client lacks
--------------------------------
A ClientApp written for Flower's ``FedAvg`` replies with ``"arrays"`` and ``num-examples``
only, and has no query handler. The Message-API strategies then sample its nodes as Flower
does (by node id, warned once). DISTREAL needs more: a reply without ``macs`` and
``num_batches`` (:data:`DISTREAL_TRAIN_METRICS`) is refused, and a round in which every reply
is refused for the same reason ends the run with a :class:`ContractError` naming what is missing.

Message-API records
-------------------
A train message holds the global model as an ``ArrayRecord`` under ``"arrays"`` (keyed by
``state_dict`` names, in ``state_dict`` order) and the train config as a ``ConfigRecord`` under
``"config"``; the reply holds the trained ``ArrayRecord`` under ``"arrays"`` and a
``MetricRecord`` under ``"metrics"`` (the train metrics above, bools as 0/1, and
``num-examples``). A query message (Flower's ``MessageType.QUERY``) asks a node for its
properties; the reply holds them as a ``MetricRecord`` under ``"properties"``.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the contract itself needs no torch: the runner of ``flwr run`` imports it torch-free
    from torch import Tensor

__all__ = [
    "ARRAYS_RECORD",
    "ContractError",
    "DISTREAL_TRAIN_METRICS",
    "OPTIONAL_TRAIN_METRICS",
    "QUERY_PROPERTIES",
    "AVAILABLE_MACS",
    "BATCH_SIZE",
    "CONFIG_RECORD",
    "METRICS_RECORD",
    "PROPERTIES_RECORD",
    "DEVICE_ID",
    "DROPOUT_RATE",
    "FIXED_SUBSETS",
    "INCOMPLETE",
    "LOCAL_EPOCHS",
    "LR",
    "MACS",
    "MEAN_DROPOUT",
    "NUM_BATCHES",
    "NUM_EXAMPLES",
    "PARTITION_ID",
    "ROUND_DEADLINE",
    "ROUND_SAMPLES",
    "SERVER_ROUND",
    "SIM_TIME",
    "STRAGGLER",
    "SUBMODEL_MACS",
    "TRAIN_LOSS",
    "UNLIMITED",
    "UTILISATION",
    "WIDTH",
    "WIDTH_LEVEL",
    "decode_subsets",
    "describe_keys",
    "encode_subsets",
    "finite_or_nan",
    "is_number",
    "is_straggler",
    "metric_values",
]

# -- train config (server to client) -----------------------------------------------------------
SERVER_ROUND = "server-round"
UNLIMITED = "unlimited"
DEVICE_ID = "device-id"
FIXED_SUBSETS = "fixed-subsets"
SUBMODEL_MACS = "submodel-macs"
DROPOUT_RATE = "dropout-rate"
WIDTH_LEVEL = "width-level"
WIDTH = "width"
ROUND_DEADLINE = "round-deadline"
BATCH_SIZE = "batch-size"
LOCAL_EPOCHS = "local-epochs"

# -- train metrics (client to server) ----------------------------------------------------------
MACS = "macs"
NUM_BATCHES = "num_batches"
NUM_EXAMPLES = "num-examples"
STRAGGLER = "straggler"
AVAILABLE_MACS = "available_macs"
SIM_TIME = "sim_time"
UTILISATION = "utilisation"
MEAN_DROPOUT = "mean_dropout"
TRAIN_LOSS = "train_loss"
INCOMPLETE = "incomplete"
LR = "lr"

# -- properties (and a train metric) -----------------------------------------------------------
PARTITION_ID = "partition-id"
ROUND_SAMPLES = "round-samples"

# -- Message-API record keys -------------------------------------------------------------------
ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
PROPERTIES_RECORD = "properties"


#: Train metrics a DISTREAL reply must hold, with what each means (Algorithm 2 weights by ``macs``).
DISTREAL_TRAIN_METRICS: dict[str, str] = {
    MACS: (
        "Algorithm 1's c: per mini-batch, the forward MACs per sample of the (sub)model it trained, "
        "summed over the mini-batches (num_batches x count_macs(model) when every batch trains the "
        "full model)"
    ),
    NUM_BATCHES: "the mini-batches trained (an integer; it bounds macs)",
}

#: Train metrics a reply may add; the strategies use them when present.
OPTIONAL_TRAIN_METRICS: dict[str, str] = {
    NUM_EXAMPLES: "samples trained (FedAvg-type strategies weight by it)",
    PARTITION_ID: "the device id (replies are combined in device order; refusals name it)",
    STRAGGLER: "1 when the device missed the round's deadline (its update is discarded)",
    AVAILABLE_MACS: "what the device could have computed in the round, in the unit of macs",
}

#: Properties a query reply's ``"properties"`` MetricRecord holds (seeded sampling by device,
#: bounds on ``num_batches``, the submodel baselines' round-start budgets).
QUERY_PROPERTIES: dict[str, str] = {
    PARTITION_ID: "the node's device (partition) id, an int",
    ROUND_SAMPLES: "samples of one round of local training (all local epochs)",
}


class ContractError(RuntimeError):
    """The clients do not keep the contract: every reply of a round was refused for the same
    reason (e.g. none reports ``macs``), so every later round would be refused alike.

    Attributes
    ----------
    reason : str
        The refusal reason code shared by every reply (e.g. ``"missing-macs"``).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def describe_keys(keys: Mapping[str, str]) -> str:
    """``'key' (meaning), ...`` for error messages."""
    return "; ".join(f"{key!r} ({meaning})" for key, meaning in keys.items())


def is_number(value: object) -> bool:
    """True for a real number (also NumPy scalars), False for bool, str, bytes, None."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_straggler(metrics: Mapping[str, Any], key: str = STRAGGLER) -> bool:
    """A reply is a straggler when its straggler metric is true (bool or non-zero number)."""
    value = metrics.get(key, False)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if is_number(value):
        return float(value) != 0.0  # type: ignore[arg-type]
    return False


def metric_values(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """Metrics as the values Flower's ``MetricRecord`` accepts: bools become 0/1, NumPy
    scalars Python numbers.

    Raises
    ------
    TypeError
        For a value that is not a number or a bool, naming its key.
    """
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)):
            out[key] = int(bool(value))
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
        else:
            raise TypeError(f"metric {key!r} is {value!r} ({type(value).__name__}); a MetricRecord holds numbers only")
    return out


def encode_subsets(kept: Sequence[Tensor | Sequence[int] | np.ndarray | None]) -> str:
    """Encode per-layer kept-filter indices for the ``"fixed-subsets"`` config key.

    Parameters
    ----------
    kept : Sequence[Tensor | Sequence[int] | np.ndarray | None]
        Per dropout layer, the kept filter indices; ``None`` keeps every filter.

    Returns
    -------
    str
        A JSON list with one entry per layer: a list of ints or ``null``.
    """
    out: list[list[int] | None] = []
    for k in kept:
        if k is None:
            out.append(None)
        elif isinstance(k, getattr(sys.modules.get("torch"), "Tensor", ())):  # no tensor without torch loaded
            out.append([int(i) for i in k.flatten().tolist()])
        else:
            out.append([int(i) for i in np.asarray(k).reshape(-1).tolist()])
    return json.dumps(out, separators=(",", ":"))


def decode_subsets(text: str, widths: Sequence[int]) -> list[Tensor | None]:
    """Decode the ``"fixed-subsets"`` config value for ``model.set_fixed_subsets``.

    Parameters
    ----------
    text : str
        The JSON string made by :func:`encode_subsets`.
    widths : Sequence[int]
        Filters per dropout layer of the full model (``model.layer_widths``).

    Returns
    -------
    list[Tensor | None]
        Per dropout layer, a sorted LongTensor of kept filters or None (all).

    Raises
    ------
    ValueError
        If the text is not JSON, has the wrong number of layers, or a layer's
        list is empty, has non-integers, repeats or out-of-range indices.
    """
    import torch  # deferred: the contract is imported torch-free (the runner of flwr run); its decoder runs on a client

    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"fixed-subsets is not valid JSON: {err}") from err
    if not isinstance(data, list) or len(data) != len(widths):
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise ValueError(f"fixed-subsets must list {len(widths)} layers, got {got}")
    out: list[Tensor | None] = []
    for i, (entry, width) in enumerate(zip(data, widths)):
        if entry is None:
            out.append(None)
            continue
        if (
            not isinstance(entry, list)
            or not entry
            or not all(isinstance(j, int) and not isinstance(j, bool) for j in entry)
        ):
            raise ValueError(f"fixed-subsets layer {i} must be a non-empty list of ints or null")
        if len(set(entry)) != len(entry) or min(entry) < 0 or max(entry) >= width:
            raise ValueError(
                f"fixed-subsets layer {i} has repeated or out-of-range indices for {width} filters"
            )
        out.append(torch.tensor(sorted(entry), dtype=torch.long))
    return out


def finite_or_nan(value: object) -> float:
    """``float(value)`` when it is a finite real number, else NaN."""
    if is_number(value) and math.isfinite(float(value)):  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    return math.nan
