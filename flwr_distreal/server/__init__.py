"""The server's decisions, free of Flower and Hydra: the reply gate (validation, straggler and
claim checks), the round's outlier bounds, node sampling, the aggregation maths (Algorithm 2's
MACs-weighted average; per-weight averaging of submodels) and the round-start planners of the
submodel baselines. The Flower strategies of :mod:`flwr_distreal.flower` are thin adapters over it.
"""
