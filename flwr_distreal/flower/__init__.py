"""The Flower edge: Message-API strategies (:mod:`.serverapp`) and ClientApp pieces
(:mod:`.clientapp`); the legacy NumPyClient + Strategy pair in :mod:`.legacy`. Adapters over
:mod:`flwr_distreal.server` and :mod:`flwr_distreal.training`; the only layer below the runner
that imports Flower."""
