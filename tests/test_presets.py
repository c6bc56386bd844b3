"""Tests of the figure presets (conf/experiment, conf/method) and the runner's Hydra wiring.

Each preset composes as ``python -m flwr_distreal.main -m +experiment=<preset>`` does, and its
settings and sweep are the paper's (Table 1; Fig. 5 and 6 and their captions). The job logging
config shows people warnings and progress only and writes Flower's records once.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flwr_distreal.cli.callbacks import ConsoleFilter, SweepReport, count_sweep_jobs, route_flower_logs
from flwr_distreal.methods import get_method
from flwr_distreal.run.config import register_configs, to_run_config

from conftest import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("fig*.yaml"))  # the figures; main_digits: see test_main_job
ALL_METHODS = {"full", "small", "distreal", "distreal_paper", "distreal_uniform", "heterofl", "feddropout", "fjord", "fedrolex"}

register_configs()


@functools.lru_cache(maxsize=None)
def test_the_figures_have_presets():
    assert set(PRESETS) >= {"fig5_femnist", "fig5_cifar10", "fig6_femnist", "fig6_cifar10"}
    for name in PRESETS:
        assert (CONF / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_\n"), name


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    run = to_run_config(compose_config(f"+experiment={preset}", "lr=0.1"))
    assert run.runtime == "inprocess"  # the fast sequential runtime for sweeps
    assert run.rounds == 7500  # Fig. 5b/6b: accuracy after 7,500 rounds
    assert run.local_epochs == 1 and run.batch_size == 32
    assert (run.strategy.name, run.lut) == ("distreal", "learned")  # the method a single run gets


# Table 1 (devices, samples per device, devices per round, variability) and the models
TABLE1 = {
    "femnist": dict(dataset="femnist", model="femnist_cnn", per_round=35, variability=3.0, devices=None, samples=None),
    "cifar10": dict(dataset="cifar10", model="densenet_bc_40", per_round=10, variability=4.0, devices=100, samples=500),
    "cifar100": dict(dataset="cifar100", model="densenet_bc_100", per_round=10, variability=4.0, devices=100, samples=500),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_use_the_papers_system_configuration(preset):
    want = TABLE1[preset.split("_", 1)[1]]
    run = to_run_config(compose_config(f"+experiment={preset}", "lr=0.1"))
    assert run.dataset.name == want["dataset"]
    assert run.model.name == want["model"]
    assert run.clients_per_round == want["per_round"]
    assert run.resources.variability == want["variability"]
    assert run.dataset.num_devices == want["devices"]
    assert run.dataset.samples_per_device == want["samples"]
    if want["dataset"] == "femnist":  # the local LEAF sample by default (the hub loader at full scale)
        assert run.dataset.root.endswith("femnist_leaf")
    assert run.model.small == {"femnist_cnn": "femnist_cnn_small", "densenet_bc_40": "densenet_bc_19",
                               "densenet_bc_100": "densenet_bc_40"}[run.model.name]


@pytest.mark.parametrize("preset", PRESETS)
def test_bn_models_evaluate_every_method_alike(preset):
    # a BatchNorm model (DenseNet): static BN for every method, so no method is evaluated with
    # running statistics while the others get recomputed ones; FEMNIST's CNN has no BN
    bn_model = "cifar" in preset
    for method in sorted(ALL_METHODS):
        run = to_run_config(compose_config(f"+experiment={preset}", "lr=0.1", f"method={method}"))
        # the submodel methods keep static BN on (their sources' sBN) on the BN-free CNN too
        assert run.strategy.static_bn is bn_model or get_method(run.strategy.name).assigns_submodels, method
        assert run.strategy.bn_recompute_devices() == (10 if run.strategy.static_bn else 0)
    assert not to_run_config(
        compose_config(f"+experiment={preset}", "lr=0.1", "method=distreal", "strategy.static_bn=false")
    ).strategy.static_bn


def _sweep(preset: str) -> dict[str, list[str]]:
    params = compose_config(f"+experiment={preset}", hydra_node=True).hydra.sweeper.params
    return {k: str(v).split(",") for k, v in params.items()}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("fig5")])
def test_fig5_sweeps_every_method_under_constant_resources(preset):
    sweep = _sweep(preset)
    assert sweep == {"method": sweep["method"], "seed": ["0", "1", "2"]}
    assert set(sweep["method"]) == ALL_METHODS  # with DISTREAL's uniform-LUT variant
    # Fig. 5 studies heterogeneity across devices only: no change over time
    assert to_run_config(compose_config(f"+experiment={preset}", "lr=0.1")).resources.kind == "constant"


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("fig6")])
def test_fig6_sweeps_lambda_for_distreal_and_the_submodel_baselines(preset):
    sweep = _sweep(preset)
    assert sweep["resources.lam"] == ["0.5", "1", "2", "4"]
    assert sweep["seed"] == ["0", "1", "2"]
    # the paper's Fig. 6 methods, the paper-literal DISTREAL and the two closest peers
    assert set(sweep["method"]) == {"distreal", "distreal_paper", "heterofl", "feddropout", "fjord", "fedrolex"}
    assert to_run_config(compose_config(f"+experiment={preset}", "lr=0.1")).resources.kind == "timevarying"


@pytest.mark.parametrize(("preset", "jobs"), [("fig5_femnist", 27), ("fig5_cifar10", 27), ("fig6_cifar10", 72)])
def test_sweep_size_and_directory(preset, jobs):
    cfg = compose_config(f"+experiment={preset}", hydra_node=True)
    assert count_sweep_jobs(cfg) == jobs
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep["dir"].startswith(f"multirun/{preset}/")
    assert "${hydra.runtime.choices.method}" in sweep["subdir"] and "${seed}" in sweep["subdir"]
    # a sweep given on the command line replaces the preset's list of that key
    assert count_sweep_jobs(compose_config(f"+experiment={preset}", "seed=0", hydra_node=True)) == jobs // 3


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_attach_the_report_callback(preset):
    callbacks = compose_config(f"+experiment={preset}", hydra_node=True).hydra.callbacks
    cb = instantiate(callbacks.sweep_report)
    assert isinstance(cb, SweepReport) and cb.report
    assert all(0 < t <= 1 for t in cb.targets) and cb.at_rounds


def test_any_sweep_can_attach_the_report_callback():
    cfg = compose_config("hydra/callbacks=sweep_report", hydra_node=True)
    assert isinstance(instantiate(cfg.hydra.callbacks.sweep_report), SweepReport)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_take_the_tuned_lr_per_setting(preset):
    lr = OmegaConf.to_container(compose_config(f"+experiment={preset}"), resolve=False)["lr"]
    dataset = preset.split("_", 1)[1]
    assert lr == "${tuned_lr:" + (f"{dataset}_constant" if preset.startswith("fig5") else f"{dataset}_lam2") + "}"


def test_the_tuned_lr_resolves_per_method(tmp_path, monkeypatch):
    tune = pytest.importorskip("flwr_distreal.run.resolvers")  # the tuned_lr resolver and its TUNED_DIR
    tune.register_resolvers()
    monkeypatch.setattr(tune, "TUNED_DIR", tmp_path)
    lrs = {"distreal": 0.07, "distreal@lut=uniform": 0.2, "heterofl": 0.3, "feddropout": 0.15}
    match = {"distreal": {"strategy.name": "distreal", "lut": "learned"},
             "distreal@lut=uniform": {"strategy.name": "distreal", "lut": "uniform"}}
    data = {"setting": "cifar10_lam2", "strategies": {
        name: {"lr": lr, "match": match.get(name, {"strategy.name": name})} for name, lr in lrs.items()}}
    (tmp_path / "cifar10_lam2.yaml").write_text(yaml.safe_dump(data))
    got = {m: to_run_config(compose_config("+experiment=fig6_cifar10", f"method={m}")).lr
           for m in ("distreal", "distreal_uniform", "heterofl", "feddropout")}
    assert got == {"distreal": 0.07, "distreal_uniform": 0.2, "heterofl": 0.3, "feddropout": 0.15}


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_method_options_set_strategy_and_lut(method):
    run = to_run_config(compose_config(f"+method={method}"))
    assert run.strategy.name == ("distreal" if method == "distreal_uniform" else method)
    if get_method(run.strategy.name).uses_lut:
        assert run.lut == ("uniform" if method == "distreal_uniform" else "learned")


def test_command_line_overrides_win_over_a_preset():
    run = to_run_config(compose_config("+experiment=fig5_femnist", "lr=0.1", "method=heterofl", "resources=timevarying",
                                 "resources.lam=2", "rounds=100", "dataset=femnist", "dataset.max_devices=3550"))
    assert (run.strategy.name, run.resources.kind, run.resources.lam, run.rounds) == ("heterofl", "timevarying", 2.0, 100)
    assert (run.dataset.name, run.dataset.max_devices, run.clients_per_round) == ("femnist", 3550, 35)


# ---------------------------------------------------------------------------------------------
# console and log file


def _record(name: str, level: int, msg: str = "m"):
    import logging

    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_console_filter_passes_warnings_and_the_named_loggers_info_only():
    import logging

    f = ConsoleFilter(info_from=["hydra", "flwr_distreal.cli.callbacks"])
    assert f.filter(_record("flwr", logging.WARNING))
    assert not f.filter(_record("flwr", logging.INFO))
    assert not f.filter(_record("flwr_distreal.run.experiment", logging.INFO))  # the per-round log line: file only
    assert f.filter(_record("flwr_distreal.cli.callbacks", logging.INFO))
    assert f.filter(_record("hydra._internal.core_plugins.basic_launcher", logging.INFO))
    assert not f.filter(_record("hydra_other", logging.INFO))  # a name covers its children, not prefixes
    assert not f.filter(_record("flwr_distreal.cli.callbacks", logging.DEBUG))
    assert ConsoleFilter(level="ERROR").filter(_record("x", logging.WARNING)) is False
    with pytest.raises(ValueError, match="unknown log level"):
        ConsoleFilter(level="LOUD")


def test_the_runner_uses_the_console_job_logging():
    cfg = compose_config(hydra_node=True)
    assert cfg.hydra.runtime.choices["hydra/job_logging"] == "distreal"
    logging_cfg = cfg.hydra.job_logging
    assert list(logging_cfg.root.handlers) == ["console", "file"]
    assert list(logging_cfg.handlers.console.filters) == ["console"]


@pytest.fixture
def restore_logging():
    """Put the root and ``flwr`` loggers back as they were (the test applies a dictConfig)."""
    import logging

    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    saved = (root.handlers[:], root.level, flwr.handlers[:], flwr.propagate, flwr.level)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], flwr.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    flwr.propagate = saved[3]
    flwr.setLevel(saved[4])


def test_flower_records_reach_the_console_filtered_and_the_log_file_once(tmp_path, capsys, restore_logging):
    """The job logging config applied as Hydra applies it, then main.py's route_flower_logs:
    Flower's INFO goes to the file only, once; its warnings to both, once."""
    import logging
    import logging.config

    import flwr.supercore.logger
    from flwr.common.logger import log as flwr_log

    cfg = compose_config(f"hydra.runtime.output_dir={tmp_path}", "hydra.job.name=main", hydra_node=True)
    logging.config.dictConfig(OmegaConf.to_container(cfg.hydra.job_logging, resolve=True))
    flwr_logger = logging.getLogger("flwr")
    assert flwr_logger.handlers == []  # Flower was imported first: the config took its handler off
    # Flower imported after Hydra configured logging attaches its console handler again
    flwr_logger.addHandler(flwr.supercore.logger.console_handler)
    assert route_flower_logs()
    assert flwr_logger.handlers == [] and not route_flower_logs()
    flwr_log(logging.INFO, "flower info line")
    flwr_log(logging.WARNING, "flower warning line")
    logging.getLogger("flwr_distreal.cli.callbacks").info("[1/2] job finished")
    logging.getLogger("flwr_distreal.run.experiment").info("round 1: accuracy 0.5")
    for handler in logging.getLogger().handlers:
        handler.flush()
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert console.count("flower warning line") == 1
    assert "WARNING [flwr] flower warning line" in console
    assert "flower info line" not in console
    assert "round 1: accuracy" not in console
    assert "[1/2] job finished" in captured.out.splitlines()
    log_file = (tmp_path / "main.log").read_text()
    for line in ("flower info line", "flower warning line", "round 1: accuracy 0.5", "[1/2] job finished"):
        assert log_file.count(line) == 1, line


def test_route_flower_logs_keeps_flower_output_without_hydra_logging(restore_logging):
    import importlib
    import logging

    importlib.import_module("flwr.common.logger")  # Flower's console handler is attached
    root = logging.getLogger()
    root.handlers[:] = []
    before = logging.getLogger("flwr").handlers[:]
    assert route_flower_logs() is False
    assert logging.getLogger("flwr").handlers == before
