"""Flower's legacy API (``NumPyClient``, ``Strategy``, ``start_simulation``): the strategies
(:mod:`.strategy`), the client adapter (:mod:`.client`) and the seeded client manager
(:mod:`.client_manager`)."""
