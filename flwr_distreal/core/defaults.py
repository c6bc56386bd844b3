"""The defaults that the run schema and the library classes share, stated once.

A setting that exists both as a key of the run configuration (the schemas of
:mod:`flwr_distreal.run.config`, which the YAMLs of ``conf/`` extend and do not restate) and as an
argument of a library class (:class:`~flwr_distreal.training.recipe.Recipe`, the trainers of
:mod:`flwr_distreal.training.trainers`, the strategies of :mod:`flwr_distreal.flower.serverapp` and
:mod:`flwr_distreal.flower.legacy.strategy`) takes its default from here, so that ``python -m
flwr_distreal.main`` and a user who builds ``Recipe()``, ``DistrealTrainer(...)`` or
``Distreal(...)`` by hand get the same value. ``tests/test_defaults.py`` checks that the YAMLs,
the schema and the classes agree.

The values are the ones the runner has always run with (``conf/config.yaml`` and
``conf/strategy/*.yaml`` before the defaults moved here): e.g. the learning rate 0.1 with
gradient-norm clipping at 1.0 (README, "Training recipe") and the ``deadline`` budget policy.
The paper's own setting is one argument away: plain SGD is ``Recipe(clip_norm=None)`` or
:meth:`Recipe.constant <flwr_distreal.training.recipe.Recipe.constant>`, the paper's per-batch budget
``r(t) * T / B`` is ``policy="paper"``.

Only the standard library is imported: the schema (Hydra) and the core modules (no Flower, no
Hydra) both read this module.
"""

from __future__ import annotations

__all__ = [
    "AGGREGATION",
    "CLIP_NORM",
    "HETEROFL_LEVELS",
    "HETEROFL_SHRINK",
    "LOCAL_EPOCHS",
    "LR",
    "LR_GAMMA",
    "LR_MIN",
    "LR_SCHEDULE",
    "LR_STEP_ROUNDS",
    "MOMENTUM",
    "NODE_WAIT",
    "ON_EXCESS",
    "POLICY",
    "PRECISION",
    "SEED",
    "SKIP_STRAGGLER_TRAINING",
    "STEP_MACS_FACTOR",
    "STOP_AT_DEADLINE",
    "WEIGHT_DECAY",
]

# -- the training recipe (flwr_distreal.training.recipe.Recipe; run keys lr, momentum, ...) -------------

#: Learning rate of local SGD (run key ``lr``; ``Recipe.lr``).
LR: float = 0.1
#: SGD momentum (``momentum``); the paper: 0.
MOMENTUM: float = 0.0
#: SGD weight decay (``weight_decay``); the paper: 0.
WEIGHT_DECAY: float = 0.0
#: Gradient-norm clipping of every local step (``clip_norm``; ``None``: none, as in the paper).
CLIP_NORM: float | None = 1.0
#: Learning-rate schedule over the server rounds (``lr_schedule``; ``Recipe.schedule``).
LR_SCHEDULE: str = "constant"
#: Learning rate of the last round of the cosine schedule (``lr_min``).
LR_MIN: float = 0.0
#: Rounds between two decays of the step schedule (``lr_step_rounds``; ``Recipe.step_rounds``).
LR_STEP_ROUNDS: int = 50
#: Decay factor of the step schedule (``lr_gamma``; ``Recipe.gamma``).
LR_GAMMA: float = 0.1

# -- local training (flwr_distreal.training.trainers) ---------------------------------------------------

#: Passes over the local data per round (``local_epochs``).
LOCAL_EPOCHS: int = 1
#: Cost of a training step relative to its forward pass (``resources.step_macs_factor``).
STEP_MACS_FACTOR: float = 3.0
#: Do not train a round the clock says will miss the deadline (``skip_straggler_training``).
SKIP_STRAGGLER_TRAINING: bool = True
#: Autocast precision of the forward passes (``precision``).
PRECISION: str = "fp32"

# -- DISTREAL (strategy=distreal) ---------------------------------------------------------------

#: Per-batch budget rule (``strategy.policy``): ``deadline`` (time left * r(t) / batches left);
#: ``paper`` is the paper's ``r(t) * T / B``.
POLICY: str = "deadline"
#: Stop at the deadline and send the completed steps (``strategy.stop_at_deadline``).
STOP_AT_DEADLINE: bool = True
#: What the server does with a reply claiming more MACs than possible (``strategy.on_excess``).
ON_EXCESS: str = "refuse"

# -- the submodel baselines (strategy=feddropout, heterofl) ------------------------------------

#: How submodel updates are averaged (``strategy.aggregation``).
AGGREGATION: str = "per_weight"
#: HeteroFL's shrinking ratio ``s`` (``strategy.shrink``; the DISTREAL paper's choice).
HETEROFL_SHRINK: float = 0.7
#: HeteroFL's number of width levels (``strategy.levels``).
HETEROFL_LEVELS: int = 5

#: Bytes of device trainers (model and in-memory data, :meth:`DeviceTrainer.nbytes
#: <flwr_distreal.training.trainers.DeviceTrainer.nbytes>`) a ClientApp process keeps for devices
#: drawn again (:class:`flwr_distreal.flower.clientapp.TrainerCache`); older ones are rebuilt.
TRAINER_CACHE_BYTES: int = 64 * 2**20

# -- the server ----------------------------------------------------------------------------------

#: Run seed (``seed``): the strategies' seeded client sampling.
SEED: int = 0
#: Seconds a round waits for nodes when ``node_wait`` and ``round_timeout`` are both unset
#: (``flwr_distreal.flower.serverapp.DEFAULT_NODE_WAIT``).
NODE_WAIT: float = 60.0
