"""scripts/hostile_clients.py: its arguments, its plan (the seeded draw, the roles, the crash set
that ``failure_threshold`` must stop), the Flower app folder it writes for ``flwr run``, and what
each hostile role does to a reply. The full run (``flwr run``, 3 runs) is slow."""

from __future__ import annotations

import importlib.util
import math
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from flwr_distreal.core import contract as C  # noqa: E402
from flwr_distreal.flower.clientapp import arrays_from_record, record_from_arrays  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hostile():
    return _load(ROOT / "scripts" / "hostile_clients.py", "hostile_clients_under_test")


def test_bad_arguments_are_refused(hostile, capsys) -> None:
    for argv, said in (
        (["--timeout", "60", "--sleep", "30"], "--sleep must exceed --timeout"),
        (["--hostile", "1,2,3"], "distinct partition ids"),
        (["--hostile", "1,2,3,4,5,5"], "distinct partition ids"),
        (["--hostile", "a,b"], "comma-separated partition ids"),
        (["--rounds", "0"], "--rounds must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_:
            hostile.parse_args(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err, argv
    args = hostile.parse_args(["--rounds", "2", "--", "seed=1"])
    assert args.rounds == 2 and args.overrides == ["seed=1"] and args.out.parent.name == "hostile_clients"


def test_roles_round_trip_and_unknown_roles_are_refused(hostile) -> None:
    roles = {4: "nan", 17: "raise", 9: "inflate"}
    assert hostile.parse_roles(hostile.format_roles(roles)) == roles
    assert hostile.parse_roles("") == {}
    with pytest.raises(ValueError, match="hostile-roles: '3:explode'"):
        hostile.parse_roles("1:nan,3:explode")


def test_the_crash_set_makes_every_round_fail_beyond_the_threshold(hostile) -> None:
    draws = hostile.replay_draws(20, 10, 4, seed=0)
    assert all(len(d) == 10 == len(set(d)) for d in draws)
    crash = set(hostile.crash_set(draws, 0.5))
    assert all(sum(d in crash for d in draw) > 5 for draw in draws)
    assert len(crash) < 20  # not simply every device
    assert hostile.most_drawn([[1, 2], [2, 3], [2, 3]], 2) == [2, 3]


def test_the_dry_run_plans_three_runs_and_writes_a_flower_app(hostile, tmp_path: Path, capsys) -> None:
    """The setup path: config through Hydra (digits, 4 rounds, round_timeout from --timeout), the
    roles on the most drawn devices, and the app folder flwr run loads (this script as its module)."""
    assert hostile.main(["--dry-run", "--out", str(tmp_path), "--timeout", "30", "--sleep", "45"]) == 0
    printed = capsys.readouterr().out
    assert "20 devices, 10 per round, 4 rounds" in printed and "round_timeout 30 s" in printed
    setup = hostile.plan(hostile.parse_args(["--out", str(tmp_path), "--timeout", "30", "--sleep", "45"]))
    assert setup["cfg"].round_timeout == 30 and setup["cfg"].runtime == "flwr-run"
    labels = [label for label, _ in setup["runs"]]
    assert labels == ["clean", "hostile", "threshold"]
    roles = dict(setup["runs"])["hostile"]
    assert sorted(roles.values()) == sorted(hostile.ROLES)
    assert list(roles) == hostile.most_drawn(setup["draws"], len(hostile.ROLES))
    app = tmp_path / "app"
    project = tomllib.loads((app / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "hostile_app:server_app", "clientapp": "hostile_app:client_app"}
    assert set(project["tool"]["flwr"]["app"]["config"]) == {"config-file", "output-dir", "hostile-roles", "hostile-sleep"}
    module = _load(app / "hostile_app.py", "hostile_app_under_test")
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    assert isinstance(module.server_app, ServerApp) and isinstance(module.client_app, ClientApp)


@pytest.fixture
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their sender from the process's task identity, which Flower sets in a real
    ClientApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _exchange() -> tuple[Message, Message]:
    keys = ["w", "b", "n"]
    start = [np.ones((2, 2), np.float32), np.zeros(2, np.float32), np.array(3, np.int64)]
    trained = [np.full((2, 2), 1.5, np.float32), np.full(2, 0.5, np.float32), np.array(3, np.int64)]
    received = Message(
        content=RecordDict({C.ARRAYS_RECORD: record_from_arrays(keys, start), C.CONFIG_RECORD: ConfigRecord({})}),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    metrics = MetricRecord({C.MACS: 100.0, C.NUM_BATCHES: 2, C.NUM_EXAMPLES: 64})
    honest = RecordDict({C.ARRAYS_RECORD: record_from_arrays(keys, trained), C.METRICS_RECORD: metrics})
    return received, Message(content=honest, reply_to=received)


def test_each_role_tampers_with_the_reply_as_documented(hostile, identity) -> None:
    def arrays(msg: Message) -> list[np.ndarray]:
        return arrays_from_record(msg.content[C.ARRAYS_RECORD], ["w", "b", "n"])

    received, honest = _exchange()
    for role in (None, "sleep", "raise"):
        assert hostile.tamper(role, received, honest, 10.0) is honest
    nan = arrays(hostile.tamper("nan", received, honest, 10.0))
    assert all(np.isnan(a).all() for a in nan[:2]) and int(nan[2]) == 3  # integer buffers kept
    assert all((a == 1e30).all() for a in arrays(hostile.tamper("huge", received, honest, 10.0))[:2])
    scaled = arrays(hostile.tamper("scale50", received, honest, 10.0))
    assert np.allclose(scaled[0], 1 + 50 * 0.5) and np.allclose(scaled[1], 50 * 0.5)
    inflated = hostile.tamper("inflate", received, honest, 10.0)
    metrics = dict(inflated.content[C.METRICS_RECORD])
    assert metrics[C.NUM_BATCHES] == 10**9 and math.isclose(metrics[C.MACS], 1e10)
    assert [a.tolist() for a in arrays(inflated)] == [a.tolist() for a in arrays(honest)]


@pytest.mark.heavy
@pytest.mark.slow
def test_the_hostile_run_through_flwr_run(hostile, tmp_path: Path, capsys) -> None:
    """1 round through flwr run (round timeout 30 s, the sleeper 32 s): the hostile devices are refused or fail, the run completes; the
    threshold run is stopped by failure_threshold."""
    assert hostile.main(["--rounds", "1", "--timeout", "30", "--sleep", "32", "--skip-clean", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    import json

    runs = {r["label"]: r for r in json.loads((tmp_path / "r.json").read_text())["runs"]}
    assert runs["hostile"]["status"] == "finished:completed"
    assert [r["round"] for r in runs["hostile"]["rows"]] == ["1"]
    assert sum(float(r["refused"]) + float(r["failures"]) for r in runs["hostile"]["rows"]) > 0
    assert runs["threshold"]["status"] != "finished:completed"
    assert "failure_threshold" in runs["threshold"]["details"] or "failed" in runs["threshold"]["details"]
