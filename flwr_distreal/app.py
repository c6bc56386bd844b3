"""ServerApp and ClientApp for ``flwr run .`` (the ``[tool.flwr.app]`` section of pyproject.toml).

The run config (``[tool.flwr.app.config]``, overridable with ``flwr run . --run-config
"strategy='heterofl' lam=2.0"``) maps onto the same Hydra composition as
``python -m flwr_distreal.main``: each key is a Hydra override, so both entry points run the
same experiment for the same settings. Keys: ``dataset``, ``model``, ``strategy``,
``resources`` (group choices), ``lam``, ``rounds``, ``clients-per-round``, ``seed``,
``deadline``, ``lr``, ``batch-size``, ``local-epochs``, ``lut``, ``output-dir``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flwr.client import ClientApp
from flwr.common import Context
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from .config import RunConfig, register_configs, to_run_config

__all__ = ["client_app", "overrides_from_run_config", "run_config_from_flower", "server_app"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

_GROUPS = {"dataset": "dataset", "model": "model", "strategy": "strategy", "resources": "resources"}
_VALUES = {
    "lam": "resources.lam",
    "rounds": "rounds",
    "clients-per-round": "clients_per_round",
    "seed": "seed",
    "deadline": "deadline",
    "lr": "lr",
    "batch-size": "batch_size",
    "local-epochs": "local_epochs",
    "lut": "lut",
    "output-dir": "output_dir",
}


def overrides_from_run_config(run_config: dict[str, Any]) -> list[str]:
    """Hydra overrides for a Flower run config.

    Raises
    ------
    ValueError
        For a key that is not a known setting (the message lists the known ones).
    """
    overrides = []
    for key, value in run_config.items():
        if key in _GROUPS:
            overrides.append(f"{_GROUPS[key]}={value}")
        elif key in _VALUES:
            if value in ("", None):
                continue
            overrides.append(f"{_VALUES[key]}={json.dumps(value) if isinstance(value, str) else value}")
        else:
            raise ValueError(f"unknown run-config key {key!r}; known: {sorted({**_GROUPS, **_VALUES})}")
    return overrides


def run_config_from_flower(run_config: dict[str, Any]) -> RunConfig:
    """Compose ``conf/config.yaml`` with the run config's overrides and validate it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides_from_run_config(dict(run_config)))
    return to_run_config(cfg)


def _server_fn(context: Context) -> ServerAppComponents:
    from .experiment import MetricsRecorder, RecordingStrategy, _experiment_for

    cfg = run_config_from_flower(context.run_config)
    exp = _experiment_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    out = Path(cfg.output_dir or "outputs/flwr_run")
    recorder = MetricsRecorder(out / "metrics.csv", cfg.deadline)
    strategy = RecordingStrategy(exp.make_strategy(), recorder)
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.rounds))


def _client_fn(context: Context):
    from .experiment import _experiment_for

    cfg = run_config_from_flower(context.run_config)
    exp = _experiment_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    return exp.make_client(int(context.node_config["partition-id"])).to_client()


server_app = ServerApp(server_fn=_server_fn)
client_app = ClientApp(client_fn=_client_fn)
