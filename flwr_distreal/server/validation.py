"""The one validation gate a reply passes before it is aggregated (pure NumPy, no Flower, no Hydra).

:func:`validate_arrays` checks a reply's arrays against the broadcast model (count, shapes,
dtype kinds, finiteness); :func:`validate_reply` also checks the MACs ``c_i`` a DISTREAL reply
claims, which weight its update in Algorithm 2 (Rapp et al., AAAI 2022): a claim above
``num_batches`` times the full model's MACs per mini-batch is refused or clipped. A refused
reply gets a typed :class:`RefusalReason` and a message naming the problem, in a
:class:`ValidationResult`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from .aggregate import _NUMERIC_KINDS, _is_real_number

log = logging.getLogger(__name__)

__all__ = [
    "OnExcess",
    "RefusalReason",
    "ValidationResult",
    "validate_arrays",
    "validate_reply",
]

#: Allowed values of ``on_excess``: refuse a reply whose MACs exceed the maximum a
#: client could have spent, or clip them to that maximum.
OnExcess = Literal["refuse", "clip"]
_ON_EXCESS_CHOICES = ("refuse", "clip")


class RefusalReason(str, Enum):
    """Why a client reply was refused by :func:`validate_reply`.

    The value is a short kebab-case code suitable for logs and metrics.
    ``UNASSIGNED_CLIENT`` and ``DEVICE_MISMATCH`` are used by the submodel strategies: a
    reply from a client that was given no submodel this round, or one whose reported
    device is not the one assigned. ``INVALID_WEIGHT`` refuses a FedAvg-type reply whose
    number of examples is not a non-negative number; ``MALFORMED_ARRAYS`` and
    ``WRONG_ARRAY_KEYS`` a Message-API reply without a decodable ``ArrayRecord`` or whose
    array names are not the global model's. ``EXCESS_BATCHES`` refuses a DISTREAL reply
    that claims more mini-batches than the server's configuration allows its device;
    ``OUTLIER_UPDATE`` and ``OUTLIER_CLAIM`` a reply whose update norm or MACs claim lies
    far outside its round's (see :class:`flwr_distreal.server.bounds.RoundBounds`).
    """

    MISSING_MACS = "missing-macs"
    NON_NUMERIC_MACS = "non-numeric-macs"
    NON_FINITE_MACS = "non-finite-macs"
    NEGATIVE_MACS = "negative-macs"
    EXCESS_MACS = "excess-macs"
    MISSING_NUM_BATCHES = "missing-num-batches"
    INVALID_NUM_BATCHES = "invalid-num-batches"
    WRONG_ARRAY_COUNT = "wrong-array-count"
    WRONG_SHAPE = "wrong-shape"
    WRONG_DTYPE = "wrong-dtype"
    NON_FINITE_ARRAYS = "non-finite-arrays"
    UNASSIGNED_CLIENT = "unassigned-client"
    DEVICE_MISMATCH = "device-mismatch"
    INVALID_WEIGHT = "invalid-weight"
    MALFORMED_ARRAYS = "malformed-arrays"
    WRONG_ARRAY_KEYS = "wrong-array-keys"
    EXCESS_BATCHES = "excess-batches"
    OUTLIER_UPDATE = "outlier-update"
    OUTLIER_CLAIM = "outlier-claim"


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of validating one client reply.

    Attributes
    ----------
    ok : bool
        True when the reply may be aggregated.
    reason : RefusalReason | None
        Why the reply was refused; when ``ok``, what was clipped (with ``clipped``),
        else None.
    message : str
        Human-readable explanation (empty when accepted without remark).
    macs : float | None
        The MACs to weight the reply with: the reported value, or the clipped
        value when ``on_excess="clip"`` lowered it. None when refused or when
        MACs were not validated.
    clipped : bool
        True when the reported MACs were clipped to the maximum possible.
    """

    ok: bool
    reason: RefusalReason | None = None
    message: str = ""
    macs: float | None = None
    clipped: bool = False

    @classmethod
    def refuse(cls, reason: RefusalReason, message: str) -> ValidationResult:
        """Build a refusal with a reason and a message."""
        return cls(ok=False, reason=reason, message=message)


def validate_arrays(
    arrays: Sequence[NDArray],
    expected_shapes: Sequence[tuple[int, ...]],
    expected_kinds: Sequence[str] | None = None,
) -> ValidationResult:
    """Check a reply's arrays: count, shapes, dtype kinds and finiteness.

    Parameters
    ----------
    arrays : Sequence[NDArray]
        The arrays a client returned.
    expected_shapes : Sequence[tuple[int, ...]]
        The shape of every global array, in order.
    expected_kinds : Sequence[str] | None, optional
        The NumPy dtype kind (``"f"``, ``"i"``, ``"u"``) of every global array.
        A float32 reply for a float64 global array is accepted (same kind); an
        integer or boolean reply for a floating array is not. Defaults to None:
        any numeric kind is accepted.

    Returns
    -------
    ValidationResult
        ``ok=True`` or a refusal with :attr:`RefusalReason.WRONG_ARRAY_COUNT`,
        :attr:`~RefusalReason.WRONG_SHAPE`, :attr:`~RefusalReason.WRONG_DTYPE`
        or :attr:`~RefusalReason.NON_FINITE_ARRAYS`.

    Raises
    ------
    ValueError
        If ``expected_kinds`` does not have one entry per expected shape.
    """
    if expected_kinds is not None and len(expected_kinds) != len(expected_shapes):
        raise ValueError(
            f"expected_kinds has {len(expected_kinds)} entries for "
            f"{len(expected_shapes)} arrays"
        )
    if len(arrays) != len(expected_shapes):
        return ValidationResult.refuse(
            RefusalReason.WRONG_ARRAY_COUNT,
            f"reply has {len(arrays)} arrays, expected {len(expected_shapes)}",
        )
    for j, (arr, shape) in enumerate(zip(arrays, expected_shapes)):
        a = np.asarray(arr)
        if a.shape != tuple(shape):
            return ValidationResult.refuse(
                RefusalReason.WRONG_SHAPE,
                f"array {j} has shape {a.shape}, expected {tuple(shape)}",
            )
        kind = a.dtype.kind
        if kind not in _NUMERIC_KINDS or (
            expected_kinds is not None
            and kind != expected_kinds[j]
            and not (kind in "iu" and expected_kinds[j] in "iu")
        ):
            expected = "numeric" if expected_kinds is None else f"kind '{expected_kinds[j]}'"
            return ValidationResult.refuse(
                RefusalReason.WRONG_DTYPE,
                f"array {j} has dtype {a.dtype}, expected {expected}",
            )
        if kind == "f" and not np.all(np.isfinite(a)):
            return ValidationResult.refuse(
                RefusalReason.NON_FINITE_ARRAYS,
                f"array {j} contains {int(np.count_nonzero(~np.isfinite(a)))} NaN/inf values",
            )
    return ValidationResult(ok=True)


def validate_reply(
    arrays: Sequence[NDArray],
    expected_shapes: Sequence[tuple[int, ...]],
    macs: object,
    num_batches: object,
    full_step_macs: float,
    *,
    expected_kinds: Sequence[str] | None = None,
    on_excess: OnExcess = "refuse",
) -> ValidationResult:
    """Validate a DISTREAL reply: its arrays and the MACs it claims to have spent.

    The MACs ``c_i`` a client reports weight its update (Algorithm 2), so a
    client could dominate the aggregate by over-reporting. A reply is refused
    when its MACs are missing, not a number (``bool``, ``str`` ...), NaN or
    infinite, negative, or above the most the client could have spent,
    ``num_batches * full_step_macs`` (every mini-batch trained with the full
    model). With ``on_excess="clip"`` an excess value is clipped to that maximum
    instead (``clipped=True``, ``reason=EXCESS_MACS``; the server's gate logs it).

    Parameters
    ----------
    arrays : Sequence[NDArray]
        The arrays the client returned.
    expected_shapes : Sequence[tuple[int, ...]]
        The shape of every global array, in order.
    macs : object
        The reported MACs (the client's ``macs`` metric), or None if absent.
    num_batches : object
        The reported number of mini-batches trained (``num_batches`` metric), or
        None if absent. Must be a non-negative integer (``3.0`` is accepted).
    full_step_macs : float
        The most MACs one mini-batch can cost, in the unit the client reports:
        the full model's MACs for one mini-batch step.
    expected_kinds : Sequence[str] | None, optional
        Dtype kind of every global array; see :func:`validate_arrays`.
        Defaults to None.
    on_excess : {"refuse", "clip"}, optional
        What to do with MACs above the maximum possible. Defaults to "refuse".

    Returns
    -------
    ValidationResult
        On acceptance, ``macs`` holds the value to weight the update by
        (clipped if it was clipped).

    Raises
    ------
    ValueError
        If ``full_step_macs`` is not a positive finite number or ``on_excess`` is
        not "refuse" or "clip" (caller errors, not client errors).
    """
    if not _is_real_number(full_step_macs) or not (
        math.isfinite(float(full_step_macs)) and float(full_step_macs) > 0
    ):
        raise ValueError(f"full_step_macs must be a positive finite number, got {full_step_macs!r}")
    if on_excess not in _ON_EXCESS_CHOICES:
        raise ValueError(f"on_excess must be one of {_ON_EXCESS_CHOICES}, got {on_excess!r}")

    if macs is None:
        return ValidationResult.refuse(RefusalReason.MISSING_MACS, "reply reports no MACs")
    if not _is_real_number(macs):
        return ValidationResult.refuse(
            RefusalReason.NON_NUMERIC_MACS,
            f"reported MACs {macs!r} ({type(macs).__name__}) is not a number",
        )
    c = float(macs)  # type: ignore[arg-type]
    if not math.isfinite(c):
        return ValidationResult.refuse(
            RefusalReason.NON_FINITE_MACS, f"reported MACs is {c}"
        )
    if c < 0:
        return ValidationResult.refuse(
            RefusalReason.NEGATIVE_MACS, f"reported MACs {c:g} is negative"
        )
    if num_batches is None:
        return ValidationResult.refuse(
            RefusalReason.MISSING_NUM_BATCHES,
            "reply reports no number of mini-batches, so its MACs cannot be bounded",
        )
    if (
        not _is_real_number(num_batches)
        or not math.isfinite(float(num_batches))  # type: ignore[arg-type]
        or float(num_batches) < 0  # type: ignore[arg-type]
        or float(num_batches) != int(float(num_batches))  # type: ignore[arg-type]
    ):
        return ValidationResult.refuse(
            RefusalReason.INVALID_NUM_BATCHES,
            f"reported number of mini-batches {num_batches!r} is not a non-negative integer",
        )

    arrays_result = validate_arrays(arrays, expected_shapes, expected_kinds)
    if not arrays_result.ok:
        return arrays_result

    max_macs = int(float(num_batches)) * float(full_step_macs)  # type: ignore[arg-type]
    if c > max_macs:
        message = (
            f"reported MACs {c:g} exceed the most possible, {num_batches} mini-batches x "
            f"{float(full_step_macs):g} MACs of the full model = {max_macs:g}"
        )
        if on_excess == "refuse":
            return ValidationResult.refuse(RefusalReason.EXCESS_MACS, message)
        log.debug("clipping: %s", message)
        return ValidationResult(
            ok=True, reason=RefusalReason.EXCESS_MACS, message=message, macs=max_macs, clipped=True
        )
    return ValidationResult(ok=True, macs=c)
