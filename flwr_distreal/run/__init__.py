"""One run from a config: the schemas (:mod:`.config`), resolvers, the experiment that builds
trainers and strategies (:mod:`.experiment`), recording and checkpoints, start-up checks, and the
runtimes (``flwr run`` simulation, in process, legacy, deployment). The composition root."""
