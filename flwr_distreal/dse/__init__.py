"""Design-time DSE (paper, "Design-Time DSE"): NSGA-II over per-layer dropout vectors.

* :mod:`.problem`: the pygmo UDP and equation (1)'s normalisation;
* :mod:`.fitness`: the short-training accuracy gain from a saved snapshot;
* :mod:`.evaluator`: evaluation cache and process-parallel measurement;
* :mod:`.front`: non-dominated front, hypervolume, even spreading;
* :mod:`.driver`: the NSGA-II loop with checkpoint/resume, writing the LUT;
* ``python -m flwr_distreal.dse``: the Hydra command.

No Flower imports; Hydra is used only by ``__main__``.
"""

from .driver import DSEResult, DSESettings, run_dse
from .evaluator import CachedEvaluator, EvalRecord, FitnessBackend
from .fitness import DSEData, ShortTrainingFitness, ShortTrainingSettings, Snapshot, SnapshotError, make_snapshot
from .front import hypervolume, non_dominated, spread_evenly
from .problem import DropoutProblem, DSEError, Normaliser, SharedEvaluator

__all__ = [
    "CachedEvaluator",
    "DSEData",
    "DSEError",
    "DSEResult",
    "DSESettings",
    "DropoutProblem",
    "EvalRecord",
    "FitnessBackend",
    "Normaliser",
    "SharedEvaluator",
    "ShortTrainingFitness",
    "ShortTrainingSettings",
    "Snapshot",
    "SnapshotError",
    "hypervolume",
    "make_snapshot",
    "non_dominated",
    "run_dse",
    "spread_evenly",
]
