"""Hydra command of the design-time DSE.

Usage (from the repository root)::

    python -m flwr_distreal.dse model=femnist_cnn dataset=femnist_leaf
    python -m flwr_distreal.dse dse=quick                              # about a minute
    python -m flwr_distreal.dse task=snapshot                          # only make the snapshot
    python -m flwr_distreal.dse dse.generations=80 resume=true         # continue a run

``conf/dse_config.yaml`` composes the shared ``model`` and ``dataset`` groups (the same as the
federated runs, :mod:`flwr_distreal.run.config`) with the DSE's own ``dse`` group
``conf/dse/{default,quick}.yaml`` (population, generations, batches, batch_size, seeds,
workers, output, snapshot, ...), typed by :class:`DSEConfig`; everything is validated before
any work starts. Relative paths are resolved against the directory the command was started in.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import MISSING, DictConfig, OmegaConf

from ..run.checks import StartupError, check_output_dir, check_torch_device
from ..run.resolvers import CONF_DIR
from ..run.config import DatasetConfig, ModelConfig, register_configs, unknown_keys
from ..core.allocator import keep_freed_memory
from ..models import build_model, list_models
from .datasets import load_dse_data
from .driver import CHECKPOINT_NAME, DSESettings, run_dse
from .evaluator import CachedEvaluator
from .fitness import ShortTrainingFitness, ShortTrainingSettings, Snapshot, SnapshotError, make_snapshot
from .problem import DSEError

log = logging.getLogger("flwr_distreal.dse")

@dataclass
class NSGA2Config:
    """pygmo ``nsga2`` operator settings (pygmo's defaults)."""

    cr: float = 0.95
    eta_c: float = 10.0
    m: float = 0.01
    eta_m: float = 50.0


@dataclass
class SnapshotConfig:
    """The snapshot every short training starts from."""

    path: str | None = None  # default: <output>/snapshot.pt
    required: bool = False  # true: refuse to run if the snapshot file does not exist
    steps: int = 800
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 0
    distorted: bool = True


@dataclass
class DSEConfig:
    """Schema of the ``dse`` config group."""

    population: int = 64
    generations: int = 50
    seed: int = 0
    lut_size: int = 64
    batches: int = 64
    batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float = 0.02
    workers: int = 2
    threads: int = 1
    device: str = "cpu"
    output: str = MISSING
    progress: bool = True
    val_fraction: float = 0.2
    max_samples: int | None = None
    distort_factor: float = 0.5
    reference: list[float] = field(default_factory=lambda: [1.1, 1.1])
    uniform_rates: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(11)])
    plot_generations: int = 5
    nsga2: NSGA2Config = field(default_factory=NSGA2Config)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)


register_configs()  # the shared model/dataset schemas of conf/model and conf/dataset
ConfigStore.instance().store(group="dse", name="base_dse", node=DSEConfig)


def _abs(path: str) -> Path:
    return Path(to_absolute_path(path))


_TOP_KEYS = {"dse", "model", "dataset", "task", "resume"}


def _validate_top(cfg: DictConfig) -> None:
    unknown = sorted(set(cfg.keys()) - _TOP_KEYS) + [
        path
        for key, schema in (("dse", DSEConfig), ("model", ModelConfig), ("dataset", DatasetConfig))
        for path in unknown_keys(cfg[key], schema, f"{key}.")
    ]
    if unknown:
        raise DSEError(f"unknown DSE setting(s) {unknown}; see conf/dse_config.yaml and conf/dse/default.yaml")
    if cfg.model.name not in list_models():
        raise DSEError(f"unknown model {cfg.model.name!r}; registered models: {', '.join(list_models())}")
    if cfg.task not in ("run", "snapshot"):
        raise DSEError(f"task must be 'run' or 'snapshot', got {cfg.task!r}")


def _settings(d: DSEConfig) -> tuple[DSESettings, ShortTrainingSettings]:
    """Build (and thereby validate) the library settings from the config."""
    search = DSESettings(
        population=d.population,
        generations=d.generations,
        seed=d.seed,
        lut_size=d.lut_size,
        cr=d.nsga2.cr,
        eta_c=d.nsga2.eta_c,
        m=d.nsga2.m,
        eta_m=d.nsga2.eta_m,
        reference=tuple(d.reference),
        uniform_rates=tuple(d.uniform_rates),
        plot_generations=d.plot_generations,
    )
    short = ShortTrainingSettings(batches=d.batches, batch_size=d.batch_size, seeds=tuple(d.seeds), lr=d.lr)
    for name in ("workers", "threads"):
        value = getattr(d, name)
        if value < 1:
            raise DSEError(f"dse.{name} must be >= 1, got {value}")
    return search, short


def _check_paths_and_device(d: DSEConfig, task: str, output: Path, snapshot_path: Path) -> None:
    """Refuse, before loading data or training, a ``dse.device`` this machine lacks and a
    ``dse.output`` (or ``dse.snapshot.path``) that cannot be written."""
    try:
        check_torch_device(d.device, "dse.device")
        if task == "run" or snapshot_path.parent == output:
            check_output_dir(output, "dse.output")
        made_here = not snapshot_path.is_file() and not (task == "run" and d.snapshot.required)
        if made_here and d.snapshot.path:  # the snapshot will be made and saved there
            key = "dse.snapshot.path"
            if snapshot_path.is_dir():
                raise StartupError(f"{key}={d.snapshot.path} is a folder; expected a file name (e.g. snapshot.pt)")
            check_output_dir(snapshot_path.parent, f"the folder of {key}")
    except StartupError as err:
        raise DSEError(str(err)) from err


def run(cfg: DictConfig) -> dict[str, Any]:
    """Execute the command for a composed config; returns a small summary (for tests)."""
    _validate_top(cfg)
    keep_freed_memory()
    d: DSEConfig = OmegaConf.to_object(cfg.dse)  # type: ignore[assignment]
    mcfg: ModelConfig = OmegaConf.to_object(cfg.model)  # type: ignore[assignment]
    dcfg: DatasetConfig = OmegaConf.to_object(cfg.dataset)  # type: ignore[assignment]
    model_name = mcfg.name
    search, short = _settings(d)
    output = _abs(d.output)
    snapshot_path = _abs(d.snapshot.path) if d.snapshot.path else output / "snapshot.pt"
    _check_paths_and_device(d, cfg.task, output, snapshot_path)
    if cfg.task == "run" and d.snapshot.required and not snapshot_path.is_file():
        raise SnapshotError(
            f"dse.snapshot.required is true but {snapshot_path} does not exist; make it with task=snapshot"
        )
    if (output / CHECKPOINT_NAME).exists() and not cfg.resume and cfg.task == "run":
        raise DSEError(f"{output / CHECKPOINT_NAME} exists; pass resume=true or choose another dse.output")
    loader_kwargs = dcfg.loader_kwargs(d.seed)
    root_as_given = loader_kwargs.pop("root", None)
    root = _abs(root_as_given) if root_as_given is not None else None
    if "path" in loader_kwargs:
        loader_kwargs["path"] = str(_abs(loader_kwargs["path"]))

    torch.set_num_threads(max(d.threads, d.workers))  # data loading and the snapshot
    data = load_dse_data(
        dcfg.name, root=root, val_fraction=d.val_fraction, max_samples=d.max_samples,
        seed=d.seed, distort_factor=d.distort_factor, options=loader_kwargs,
    )
    num_classes = mcfg.num_classes if mcfg.num_classes is not None else data.num_classes
    if num_classes != data.num_classes:
        raise DSEError(f"model.num_classes={num_classes} but dataset {dcfg.name} has {data.num_classes} classes")

    if snapshot_path.is_file():
        snapshot = Snapshot.load(snapshot_path, model_name=model_name, dataset=data.name, num_classes=num_classes)
        log.info("using snapshot %s (val accuracy %.4f)", snapshot_path, snapshot.meta["val_accuracy"])
    else:
        s = d.snapshot
        snapshot = make_snapshot(model_name, data, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                 seed=s.seed, distorted=s.distorted, device=d.device)
        snapshot.save(snapshot_path)
        log.info("saved snapshot to %s", snapshot_path)
    if cfg.task == "snapshot":
        return {"snapshot": str(snapshot_path), "val_accuracy": snapshot.meta["val_accuracy"]}

    fitness = ShortTrainingFitness(model_name, snapshot, data, short, device=d.device)
    model = build_model(model_name, num_classes=num_classes)
    start = time.perf_counter()
    with CachedEvaluator(fitness, workers=d.workers, threads=d.threads) as evaluator:
        result = run_dse(
            evaluator, model, search, output, resume=bool(cfg.resume), progress=d.progress,
            # Paths as the user wrote them (relative to where the command ran), not this machine's
            # absolute ones: a shipped LUT's meta must not name the folders of the machine it came from.
            extra_meta={
                "dataset": data.name,
                "data_root": str(root_as_given) if root_as_given is not None else None,
                "snapshot": d.snapshot.path or str(Path(d.output) / "snapshot.pt"),
            },
        )
    if result is None:  # run_dse returns None only with stop_after, which is not used here
        raise RuntimeError("the DSE stopped without a result")
    log.info(
        "LUT %s (%d vectors); hypervolume DSE %.4f vs uniform %.4f; %.1f s",
        result.paths["lut"], len(result.lut), result.hypervolume_dse, result.hypervolume_uniform,
        time.perf_counter() - start,
    )
    return {
        "lut": str(result.paths["lut"]),
        "hypervolume_dse": result.hypervolume_dse,
        "hypervolume_uniform": result.hypervolume_uniform,
        "generations": result.generations_done,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="dse_config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run(cfg)


if __name__ == "__main__":
    main()
