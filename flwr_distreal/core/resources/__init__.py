"""Resource availability r_i(t) and the simulated clock.

The paper's device resource model ("System Model" / "Device Resource Model" sections of
Rapp et al., AAAI 2022) abstracts a device's compute as the number of multiply-accumulate
operations (MACs) it can execute per second, ``r_i(t)``. Availability differs between
devices and changes over time, also in the middle of a round. This package provides:

* :class:`ResourceTrace`, the per-device availability ``r_i(t)`` as a piecewise-constant,
  right-continuous function of simulated time (seconds), with exact integration:
  :meth:`ResourceTrace.advance` answers "when are ``m`` MACs done if I start at ``t0``" and
  :meth:`ResourceTrace.macs_between` answers "how many MACs fit into ``[t0, t1]``".
* Three kinds of traces: :class:`ConstantResources` (one level per device, drawn uniformly
  from ``[r_max / v, r_max]``, the paper's "Heterogeneity Across Devices"),
  :class:`TimeVaryingResources` (a new level from the same range after exponentially
  distributed waits with rate ``lam`` changes per round, the paper's "Heterogeneity Across
  Devices and Over Time") and :class:`TraceResources` (replay of a recorded trace, see
  :func:`load_trace_csv`).
* :class:`ResourceModel`, the configuration-level object: it hands out a device's trace,
  deterministically from ``(seed, device_id)``, and defines the round timing (round ``t``
  runs in global simulated time ``[(t - 1) * T, t * T]``).
* :func:`size_resources`, one call that sizes ``r_max`` from a model and its workload (the
  full model's round ends exactly at the deadline) and returns what :class:`ResourceModel` and
  the DISTREAL strategy take.
* :class:`RoundClock`, the straggler logic: a device trains mini-batch after mini-batch, its
  clock advances by ``MACs(step) / r(t)`` integrated across level changes, and it is a
  straggler when its training does not finish by the round's deadline. The rounds the
  clients run are planned on this clock by :mod:`flwr_distreal.training.schedule`
  (``plan_distreal_round``, ``plan_fixed_round``).

The package is the public import path of all of this (``from flwr_distreal.core.resources import
...``; ``flwr_distreal.resources`` is the same module); its parts, by concern:
:mod:`.errors` (the errors and argument checks), :mod:`.costs` (step costs, ``r_max``),
:mod:`.traces` (the availability traces and trace files), :mod:`.clock` (:class:`RoundClock`,
:class:`RoundResult`), :mod:`.model` (:class:`ResourceModel`) and :mod:`.sizing`
(:func:`size_resources`).

Time is in seconds of simulated time; availability in MACs per second; work in MACs.
Nothing here imports Flower or Hydra, and nothing keeps module-level state: Ray reuses
worker processes across clients, so every trace derives its randomness from its own
``numpy.random.SeedSequence([seed, device_id])``.

Cost of a training step. A look-up table stores *forward* MACs per sample. A training
step on a mini-batch of ``b`` samples costs about ``step_macs_factor * b * forward`` MACs,
where ``step_macs_factor = 3.0`` accounts for the forward pass plus a backward pass that
costs about twice the forward pass (gradients w.r.t. activations and w.r.t. weights); see
:func:`step_macs` and :func:`forward_macs_budget`.
"""

from __future__ import annotations

from .clock import DEADLINE_RTOL, RoundClock, RoundResult
from .costs import batch_sizes, forward_macs_budget, r_max_for, step_macs
from .errors import ResourceError, TraceFileError
from .model import RESOURCE_KINDS, ResourceKind, ResourceModel  # noqa: F401 - public constants, not in __all__
from .sizing import ResourceSizing, size_resources
from .traces import (
    TRACE_COLUMNS,  # noqa: F401 - a public constant, not in __all__
    ConstantResources,
    ResourceTrace,
    TimeVaryingResources,
    TraceResources,
    load_trace_csv,
)

__all__ = [
    "DEADLINE_RTOL",
    "ConstantResources",
    "ResourceError",
    "batch_sizes",
    "ResourceModel",
    "ResourceSizing",
    "ResourceTrace",
    "RoundClock",
    "RoundResult",
    "TimeVaryingResources",
    "TraceFileError",
    "TraceResources",
    "forward_macs_budget",
    "load_trace_csv",
    "r_max_for",
    "size_resources",
    "step_macs",
]
