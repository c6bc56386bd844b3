"""Hydra entry point: one federated simulation per (multi)run.

    python -m flwr_distreal.main strategy=distreal resources=timevarying resources.lam=2
    python -m flwr_distreal.main -m strategy=distreal,feddropout,heterofl resources.lam=0.5,1,2,4 seed=0,1,2

Each run writes, into its Hydra output directory, the resolved ``config.yaml``,
``metrics.csv`` (one row per round) and ``accuracy.png``. The console shows one line per round
and the run's summary (``conf/hydra/job_logging/distreal.yaml``); the job's ``main.log`` keeps
every log record, Flower's included, once.
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .callbacks import route_flower_logs
from .config import register_configs, to_run_config
from .tune import register_resolvers

log = logging.getLogger(__name__)

register_configs()
register_resolvers()  # lr: ${tuned_lr:<setting>} (conf/tuned/)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Validate the composed config, run the simulation, return the final accuracy."""
    route_flower_logs()  # Flower's records through the job's handlers only (no duplicate lines)
    run_cfg = to_run_config(cfg)  # range checks run here, before round 1
    from .experiment import run_experiment, summary_line

    out = run_cfg.output_dir or HydraConfig.get().runtime.output_dir
    from hydra.types import RunMode

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN  # a sweep prints a line per job, not per round
    rows = run_experiment(run_cfg, out, show_rounds=not sweep)
    final = rows[-1]["accuracy"] if rows else float("nan")
    log.info("final accuracy %.4f; metrics, config and plot in %s", final, out)
    if not sweep:
        print(summary_line(run_cfg, rows))
    print(f"Done: final accuracy {final:.4f}. Metrics: {out}/metrics.csv  Plot: {out}/accuracy.png")
    return final


if __name__ == "__main__":
    main()
