"""The mechanisms of DISTREAL, free of Flower and Hydra: structured dropout of whole filters
(:mod:`.dropout`, groups traced by :mod:`.channel_graph`), MACs (:mod:`.macs`), the LUT of
Pareto-optimal dropout vectors (:mod:`.lut`), resources that change within a round
(:mod:`.resources`), submodel extraction (:mod:`.submodel`), the client/server contract
(:mod:`.contract`) and the defaults shared by the run schema and the library classes
(:mod:`.defaults`). Every other layer builds on this one; it imports none of them."""
