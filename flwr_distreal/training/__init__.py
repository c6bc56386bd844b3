"""Local training on a device: the recipe (:mod:`.recipe`), the per-mini-batch choice of a
dropout vector (Algorithm 1: :mod:`.schedule`, :mod:`.loop`), the trainers of DISTREAL and the
baselines (:mod:`.trainers`, one local step in :mod:`.step`), the clock of a round as a strategy
of the trainers (:mod:`.clock`: simulated or measured), the wall-clock mode (:mod:`.wallclock`,
with :mod:`.throughput` and :mod:`.steptimes`), the records and metrics of a round
(:mod:`.records`) and the memory layout (:mod:`.layout`). Imports :mod:`flwr_distreal.core` only;
no Flower, no Hydra.

``from flwr_distreal.training import DistrealTrainer, evaluate_model`` (the README's examples)
keeps working: the trainers are re-exported here.
"""
from .trainers import *  # noqa: F401,F403  (the public trainers, as before the move)
from .trainers import __all__  # noqa: F401
