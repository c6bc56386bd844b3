"""The examples/ apps: the plain FedAvg quickstart and the same app turned into DISTREAL.

The fast tests check what the README claims of the DISTREAL app (its diff against the FedAvg
app, the user's model and loop untouched) and run its ClientApp's train handler in process.
The slow test runs both apps end to end with ``flwr run`` for 2 rounds on a private local
SuperLink (:class:`flwr_distreal.run.local_runtime.LocalFlwrRuntime`; every process stopped by PID).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLAIN = REPO / "examples" / "quickstart-pytorch"
DISTREAL = REPO / "examples" / "quickstart-distreal"
FILES = ["pyproject.toml", "pytorchexample/client_app.py", "pytorchexample/server_app.py", "pytorchexample/task.py"]


def _changed_lines() -> dict[str, int]:
    out = {}
    for name in FILES:
        a = (PLAIN / name).read_text().splitlines()
        b = (DISTREAL / name).read_text().splitlines()
        out[name] = sum(1 for line in difflib.unified_diff(a, b, lineterm="", n=0)
                        if line.startswith("+") and not line.startswith("+++"))
    return out


def test_the_distreal_app_differs_in_at_most_15_lines_and_keeps_the_users_model_and_loop() -> None:
    changed = _changed_lines()
    assert changed["pytorchexample/task.py"] == 0  # the user's model, data and loop untouched
    assert 0 < sum(changed.values()) <= 15, changed


def _load_example(root: Path):
    """Import the example's package fresh (both examples name it pytorchexample)."""
    for name in [m for m in sys.modules if m == "pytorchexample" or m.startswith("pytorchexample.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("pytorchexample.client_app"), importlib.import_module("pytorchexample.task")
    finally:
        sys.path.remove(str(root))


def _train_message(arrays: ArrayRecord, server_round: int) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1, "server-round": server_round})})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_the_distreal_client_trains_the_users_net_with_dropout_and_reports_what_the_strategy_needs(task_identity) -> None:
    from flwr_distreal import count_macs, make_droppable
    from flwr_distreal.core.contract import MACS, NUM_BATCHES, STRAGGLER

    client, task = _load_example(DISTREAL)
    torch.manual_seed(0)
    arrays = ArrayRecord(task.Net().state_dict())
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(),
                      run_config={"batch-size": 16, "local-epochs": 1, "lr": 0.1, "num-server-rounds": 2, "fraction-train": 0.5})
    reply = client.train(_train_message(arrays, 1), context)  # @app.train() returns the handler
    metrics = reply.content["metrics"]
    trained = reply.content["arrays"].to_torch_state_dict()
    assert list(trained) == list(task.Net().state_dict())  # the user's Net loads it as is
    assert metrics[NUM_BATCHES] > 0 and metrics[STRAGGLER] == 0
    assert 0 < metrics["mean_dropout"] <= 0.5  # sized resources: a weaker device drops filters
    full_macs = count_macs(make_droppable(task.Net(), torch.zeros(1, 1, 8, 8)))
    assert metrics[MACS] < metrics[NUM_BATCHES] * full_macs  # it dropped filters
    assert metrics["num-examples"] > 0


# -- both apps end to end with flwr run (slow) ----------------------------------------------------


@pytest.fixture(scope="module")
def runtime():
    from flwr_distreal.run.local_runtime import FlwrRunError, LocalFlwrRuntime

    if not Path("/proc/self/environ").exists():
        pytest.skip("finding the processes flwr starts needs /proc (Linux)")
    try:
        rt = LocalFlwrRuntime()
    except FlwrRunError as err:
        pytest.skip(str(err))
    try:
        yield rt
    finally:
        survivors = rt.stop()
        assert not survivors, f"processes left running: {survivors}"


@pytest.mark.slow
@pytest.mark.parametrize("app", [pytest.param(PLAIN, marks=pytest.mark.heavy), DISTREAL], ids=["fedavg", "distreal"])
def test_flwr_run_runs_the_example_app_for_2_rounds(runtime, app: Path, tmp_path: Path) -> None:
    pyproject = (app / "pyproject.toml").read_bytes()
    result = runtime.run(app, 4, {"num-server-rounds": 2}, log_path=tmp_path / "run.log", timeout=400)
    log = (tmp_path / "run.log").read_text()
    assert (app / "pyproject.toml").read_bytes() == pyproject, "flwr run rewrote the example's pyproject.toml"
    assert result.status == "finished:completed", (result, log[-3000:])
    assert "final train metrics" in log, log[-3000:]
    if app == PLAIN:
        assert "Traceback" not in log, log[-3000:]
        return
    # DISTREAL in an app without a query handler: one probe query fails (Flower logs its one
    # traceback), the strategy says once what the fallback means, and every round trains.
    assert log.count("Traceback (most recent call last)") <= 1, log
    assert log.count("sampled by node id") == 1 and "This is said once." in log, log
    assert "'accepted': 2" in log and "'refused': 0" in log, log
    evaluated = log.split("final evaluate metrics:", 1)[1].splitlines()[0]
    assert "'eval_acc'" in evaluated, evaluated  # the app's own federated evaluation still runs
    final = log.split("final train metrics:", 1)[1].splitlines()[0]
    assert "'mean_macs'" and "'mean_utilisation'" in final, final
