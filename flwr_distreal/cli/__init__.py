"""Commands: ``python -m flwr_distreal.main`` (a run or a Hydra sweep, :mod:`.main`), ``.tune``
(learning rates on a validation split, :mod:`.tune`), ``.report`` (tables and plots of a sweep,
:mod:`.report`), and the Hydra callbacks of the console (:mod:`.callbacks`)."""
