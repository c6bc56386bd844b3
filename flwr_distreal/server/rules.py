"""The full-model aggregation rules over the gate: DISTREAL's Algorithm 2 and FedAvg.

:class:`DistrealCore` weights every accepted update by the MACs ``c_i`` its client spent
(Algorithm 2 of Rapp et al., AAAI 2022), after bounding the claim by what the server knows: the
full model's forward MACs per sample (:func:`full_macs_argument`) times the mini-batches the
device could train (:func:`max_batches_for`). :class:`FedAvgCore` weights by examples (the
full-resources and small-network baselines). Both are :class:`flwr_distreal.server.gate.ReplyGate`
subclasses; the submodel baselines' rule is :mod:`flwr_distreal.server.submodels`. No Flower or
Hydra imports.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..core import contract as C
from ..core.contract import is_number
from .bounds import RoundBounds
from .gate import ReplyGate
from .replies import Accepted, Arrays, Reply, as_device_id
from .validation import OnExcess, RefusalReason, ValidationResult, validate_reply

__all__ = [
    "DistrealCore",
    "FedAvgCore",
    "brief_list",
    "full_macs_argument",
    "max_batches_for",
]

log = logging.getLogger(__name__)


def _examples_update(gate: ReplyGate, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
    """FedAvg over the accepted replies, weighted by their examples (or the gate's robust rule)."""
    weights = [a.reply.num_examples for a in accepted]
    if sum(weights) <= 0:
        log.warning("every accepted reply reports zero examples: nothing to weight by")
        return None
    return gate.weighted_rule(global_arrays, accepted, weights)


def max_batches_for(round_samples: int, batch_size: int, local_epochs: int = 1) -> int:
    """The most mini-batches a round of local training can have.

    ``round_samples`` is the ``round-samples`` property: the samples of one round over all
    local epochs (:meth:`flwr_distreal.training.trainers.DeviceTrainer.properties`), so an epoch has
    ``ceil(round_samples / local_epochs)`` samples, hence at most
    ``local_epochs * ceil(ceil(round_samples / local_epochs) / batch_size)`` mini-batches (a
    partial last batch per epoch included).
    """
    per_epoch = -(-int(round_samples) // int(local_epochs))
    return int(local_epochs) * -(-per_epoch // int(batch_size))


def brief_list(items: Sequence[object], most: int = 10) -> str:
    """``a, b, c`` (the first ``most``, then how many more), for a log line."""
    shown = ", ".join(str(i) for i in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _positive_int(name: str, value: object, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int >= 1, got {value!r}")
    return int(value)


def full_macs_argument(full_macs_per_sample: object, full_macs_per_batch: object, *, stacklevel: int = 3) -> object:
    """The value of ``full_macs_per_sample``, or of its deprecated name ``full_macs_per_batch``.

    The bound of a DISTREAL reply's MACs is ``num_batches * full_macs_per_sample``: Algorithm 1
    adds, once per mini-batch, the forward MACs *per sample* of the (sub)model it trained, so
    the most one mini-batch adds is the full model's forward MACs per sample,
    ``count_macs(model)``. The old name said "per batch" of that per-sample count.

    Parameters
    ----------
    full_macs_per_sample, full_macs_per_batch : object
        The two keywords as given (None: not given).
    stacklevel : int, optional
        ``warnings.warn``'s stack level: 3 points at the caller of the constructor that calls
        this. Defaults to 3.

    Returns
    -------
    object
        The value given (validated by the caller).

    Raises
    ------
    TypeError
        If both or neither are given.
    """
    if full_macs_per_batch is not None:
        if full_macs_per_sample is not None:
            raise TypeError("pass full_macs_per_sample only: full_macs_per_batch is its deprecated name")
        warnings.warn(
            "full_macs_per_batch is deprecated, pass full_macs_per_sample: the value is the full model's "
            "forward MACs per sample (count_macs(model)), the most Algorithm 1 adds to 'macs' per mini-batch",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return full_macs_per_batch
    if full_macs_per_sample is None:
        raise TypeError(
            "missing keyword argument full_macs_per_sample: the full model's forward MACs per sample, "
            "count_macs(model)"
        )
    return full_macs_per_sample


class DistrealCore(ReplyGate):
    """DISTREAL's gate and rule: Algorithm 2 of Rapp et al. (AAAI 2022).

    ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i`` over the accepted
    replies (:func:`flwr_distreal.server.aggregate.mac_weighted_update`), where ``c_i`` is the MACs
    client ``i`` reports. A reply is refused when its MACs are missing, not a number, NaN/inf,
    negative or above ``num_batches * full_macs_per_sample`` (or clipped to that, with
    ``on_excess="clip"``), or its arrays do not match the broadcast model
    (:func:`flwr_distreal.server.validation.validate_reply`).

    The client's ``num_batches`` is bounded by what the server knows, not only by the client's
    word: with ``max_batches_fn`` or ``batch_size`` (and ``local_epochs``) and the node's
    ``round-samples`` (handed over by the strategy, :meth:`limit_round`), or with
    ``batch_size`` and the reply's example count when the node's ``round-samples`` is unknown
    (:meth:`limit_of`), a reply claiming more mini-batches than its device could train is
    refused (``excess-batches``), or with ``on_excess="clip"`` weighted by at most
    ``max_batches * full_macs_per_sample``. Every train message states the batch size and
    local epochs the server bounds by (:meth:`train_config`). The round-level bounds
    (:class:`~flwr_distreal.server.bounds.RoundBounds`) then bound the claim against the round's
    median, its share of the round's weight (``share_bound``) and the update norm.

    Parameters
    ----------
    full_macs_per_sample : float
        The full model's forward MACs per sample, ``count_macs(model)``: Algorithm 1 adds the
        (sub)model's forward MACs per sample once per mini-batch, so this is the most one
        mini-batch can add to a reply's ``macs`` (in the unit of the clients' MACs metric).
    full_macs_per_batch : float, optional
        Deprecated name of ``full_macs_per_sample`` (a ``DeprecationWarning``; the value is
        the same per-sample count).
    on_excess : {"refuse", "clip"}, optional
        What to do with MACs above the maximum, and with ``num_batches`` above the server's
        limit. Defaults to "refuse".
    batch_size : int | None, optional
        The mini-batch size the clients train with (the run's configuration); with the node's
        ``round-samples`` it bounds ``num_batches`` (:func:`max_batches_for`). None (default):
        no such bound unless ``max_batches_fn`` is given.
    local_epochs : int, optional
        Local epochs per round (with ``batch_size``). Defaults to 1.
    max_batches_fn : Callable[[int], int] | None, optional
        ``max_batches_fn(device_id)``: the most mini-batches a device can train in a round;
        takes precedence over ``batch_size``. Defaults to None.
    bounds : RoundBounds | None, optional
        The round-level bounds; None (default) uses ``RoundBounds()``.
    **keys : str
        Metric keys, see :class:`~flwr_distreal.server.gate.ReplyGate`.

    Raises
    ------
    ValueError
        If ``full_macs_per_sample`` is not a positive finite number, ``on_excess`` is not
        "refuse" or "clip", ``batch_size`` or ``local_epochs`` is not a positive int, or
        ``max_batches_fn`` is not callable.
    TypeError
        If both or neither of ``full_macs_per_sample`` and ``full_macs_per_batch`` are given.
    """

    weighs_by_claim = True

    def __init__(
        self,
        *,
        full_macs_per_sample: float | None = None,
        on_excess: OnExcess = "refuse",
        batch_size: int | None = None,
        local_epochs: int = 1,
        max_batches_fn: Callable[[int], int] | None = None,
        bounds: RoundBounds | None = None,
        full_macs_per_batch: float | None = None,
        **keys: str,
    ) -> None:
        full = full_macs_argument(full_macs_per_sample, full_macs_per_batch)
        if not is_number(full) or not (math.isfinite(float(full)) and float(full) > 0):  # type: ignore[arg-type]
            raise ValueError(
                f"full_macs_per_sample must be a positive finite number (the full model's forward MACs "
                f"per sample, count_macs(model)), got {full!r}"
            )
        if on_excess not in ("refuse", "clip"):
            raise ValueError(f"on_excess must be 'refuse' or 'clip', got {on_excess!r}")
        self.check_limits(batch_size, local_epochs, max_batches_fn)
        super().__init__(bounds=bounds, **keys)
        self.full_macs_per_sample = float(full)  # type: ignore[arg-type]
        self.on_excess: OnExcess = on_excess
        self.batch_size = None if batch_size is None else int(batch_size)
        self.local_epochs = int(local_epochs)
        self.max_batches_fn = max_batches_fn
        self.limits: dict[str, tuple[int, str]] = {}
        self._unbounded: set[str] = set()

    @property
    def full_macs_per_batch(self) -> float:
        """Deprecated name of :attr:`full_macs_per_sample` (a ``DeprecationWarning``)."""
        warnings.warn(
            "full_macs_per_batch is deprecated, read full_macs_per_sample", DeprecationWarning, stacklevel=2
        )
        return self.full_macs_per_sample

    @staticmethod
    def check_limits(batch_size: object, local_epochs: object, max_batches_fn: object) -> None:
        """Raise ValueError unless ``batch_size`` is None or an int >= 1, ``local_epochs`` an
        int >= 1 and ``max_batches_fn`` None or callable."""
        _positive_int("batch_size", batch_size, allow_none=True)
        _positive_int("local_epochs", local_epochs, allow_none=False)
        if max_batches_fn is not None and not callable(max_batches_fn):
            raise ValueError("max_batches_fn must be None or a callable (device_id) -> max mini-batches")

    @property
    def bounds_batches(self) -> bool:
        """True when the server can bound ``num_batches`` (``batch_size`` or ``max_batches_fn``)."""
        return self.batch_size is not None or self.max_batches_fn is not None

    def limit_round(
        self,
        server_round: int,
        nodes: Mapping[str, tuple[object, object]],
        *,
        logger: logging.Logger | None = None,
    ) -> dict[str, int]:
        """Set the round's ``num_batches`` limit of every selected node from what the server knows.

        Parameters
        ----------
        server_round : int
            The round.
        nodes : Mapping[str, tuple[object, object]]
            ``(device id, round samples)`` of every selected node, by node key, as the server
            learnt them (properties; unvalidated, None when unknown).
        logger : logging.Logger | None, optional
            Where a node without a limit is logged (once per node).

        Returns
        -------
        dict[str, int]
            The limit of every node that has one.
        """
        logger = logger or log
        self.limits = {}
        unbounded: list[str] = []
        for node, (raw_device, raw_samples) in nodes.items():
            limit: int | None = None
            why = ""
            if self.max_batches_fn is not None and as_device_id(raw_device) is not None:
                value = self.max_batches_fn(int(raw_device))  # type: ignore[arg-type]
                if is_number(value) and math.isfinite(float(value)) and float(value) >= 0:
                    limit, why = int(value), f"max_batches_fn({raw_device})"
            elif self.batch_size is not None and is_number(raw_samples) and float(raw_samples) >= 0:  # type: ignore[arg-type]
                samples = int(math.ceil(float(raw_samples)))  # type: ignore[arg-type]
                limit = max_batches_for(samples, self.batch_size, self.local_epochs)
                why = (
                    f"round-samples {samples}, batch size {self.batch_size}, "
                    f"{self.local_epochs} local epoch{'s' if self.local_epochs != 1 else ''}"
                )
            if limit is not None:
                self.limits[node] = (limit, why)
            elif self.bounds_batches and node not in self._unbounded:
                self._unbounded.add(node)
                unbounded.append(f"{node} (device {raw_device})")
        if unbounded:  # one line per round, each node named once per run
            logger.warning(
                "round %s: %s node%s with no known %s, num_batches bounded only by the reply's own %s: %s",
                server_round,
                len(unbounded),
                "s" if len(unbounded) != 1 else "",
                "device id" if self.max_batches_fn is not None else "round-samples",
                "claim" if self.max_batches_fn is not None else "num-examples",
                brief_list(unbounded),
            )
        return {node: limit for node, (limit, _) in self.limits.items()}

    def check(self, reply: Reply) -> ValidationResult:
        """Validate the reply's MACs, mini-batches (also against the server's limit) and arrays."""
        g = self.global_arrays
        result = validate_reply(
            reply.arrays,
            [a.shape for a in g],
            reply.metrics.get(self.macs_key),
            reply.metrics.get(self.num_batches_key),
            self.full_macs_per_sample,
            expected_kinds=[a.dtype.kind for a in g],
            on_excess=self.on_excess,
        )
        found = self.limit_of(reply) if result.ok else None
        if found is None:
            return result
        limit, why = found
        batches = int(float(reply.metrics[self.num_batches_key]))  # validated above
        if batches <= limit:
            return result
        message = f"reports {batches} mini-batches, the server's configuration allows at most {limit} ({why})"
        if self.on_excess == "refuse":
            return ValidationResult.refuse(RefusalReason.EXCESS_BATCHES, message)
        macs = min(float(result.macs or 0.0), limit * self.full_macs_per_sample)
        return ValidationResult(
            ok=True,
            reason=RefusalReason.EXCESS_BATCHES,
            message=f"{message}; weighted by at most {limit} x {self.full_macs_per_sample:g} MACs",
            macs=macs,
            clipped=True,
        )

    def limit_of(self, reply: Reply) -> tuple[int, str] | None:
        """The most mini-batches the server allows a reply, and why; None when it knows none.

        The node's round limit (:meth:`limit_round`: ``round-samples`` or ``max_batches_fn``);
        else, with ``batch_size`` known, the reply's own examples: ``n`` samples in batches of
        at most ``batch_size``, at most one partial batch per local epoch, make at most
        ``local_epochs * (floor(n / batch_size) + 1)`` mini-batches, whether ``n`` counts one
        epoch's samples (Flower's quickstart) or every epoch's (:class:`~flwr_distreal.training.loop.DistrealRound`).
        A reply without a positive example count has no such limit.
        """
        if reply.node in self.limits:
            return self.limits[reply.node]
        n = reply.num_examples
        if self.batch_size is None or self.max_batches_fn is not None:
            return None
        if not is_number(n) or not math.isfinite(float(n)) or float(n) <= 0:
            return None
        limit = self.local_epochs * (int(float(n)) // self.batch_size + 1)
        return limit, (
            f"{int(float(n))} examples in batches of at most {self.batch_size}, "
            f"{self.local_epochs} local epoch{'s' if self.local_epochs != 1 else ''}"
        )

    def train_config(self) -> dict[str, int]:
        """What every train message states of the server's configuration: ``batch-size`` and
        ``local-epochs`` (:data:`flwr_distreal.core.contract.BATCH_SIZE`, ``LOCAL_EPOCHS``) when
        ``batch_size`` is known, the numbers ``num_batches`` is bounded by; else nothing."""
        if self.batch_size is None:
            return {}
        return {C.BATCH_SIZE: self.batch_size, C.LOCAL_EPOCHS: self.local_epochs}

    def work_of(self, reply: Reply) -> float | None:
        """``num_batches``, capped by the server's limit for the reply (:meth:`limit_of`)."""
        b = super().work_of(reply)
        found = self.limit_of(reply)
        if b is not None and found is not None:
            b = min(b, float(found[0]))
        return b

    def combine(self, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
        """Algorithm 2: the MAC-weighted update (or the robust rule); None when every reply
        spent zero MACs."""
        macs = [float(a.macs or 0.0) for a in accepted]
        if sum(macs) <= 0.0:
            log.warning("every accepted reply reports zero MACs: nothing to weight by")
            return None
        return self.weighted_rule(global_arrays, accepted, macs)


class FedAvgCore(ReplyGate):
    """FedAvg's gate and rule (full resources, small network): arrays validated, the round's
    bounds applied (:class:`~flwr_distreal.server.bounds.RoundBounds`, without claims), the
    accepted replies averaged weighted by their examples (or by the robust rule)."""

    def check(self, reply: Reply) -> ValidationResult:
        """Validate the reply's examples and arrays."""
        n = reply.num_examples
        if not is_number(n) or not math.isfinite(float(n)) or float(n) < 0:
            return ValidationResult.refuse(
                RefusalReason.INVALID_WEIGHT, f"number of examples {n!r} is not a non-negative number"
            )
        return self.check_arrays(reply.arrays)

    def combine(self, global_arrays: Arrays, accepted: list[Accepted]) -> Arrays | None:
        """FedAvg weighted by examples; None when every reply has zero examples."""
        return _examples_update(self, global_arrays, accepted)
