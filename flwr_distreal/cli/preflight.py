"""``python -m flwr_distreal.cli.preflight``: build a run's experiment in a process of its own.

The runner of ``runtime=flwr-run`` (:mod:`flwr_distreal.run.flwr_runner`) never loads torch; the
check that needs it, building the run's :class:`~flwr_distreal.run.experiment.Experiment` (data,
model, LUT, resources: what refuses a bad input before anything starts), runs here and exits.
Reads ``{"config": <RunConfig as a dict>, "runtime": <name>}`` (JSON) on standard input and
prints one JSON line: ``{"ok": true, "num_devices": N, "start": <start line>}``, or ``{"ok":
false, "refused": <one of the project's refusals>, "error": <class>, "message": <one line>}``
(the traceback on standard error) with exit code 2 (refused) or 1.
"""

from __future__ import annotations

import json
import sys
import traceback

from ..run.config import to_run_config
from ..run.experiment import Experiment
from ..run.recording import start_line
from .main import EXIT_FAILED, EXIT_REFUSED, exit_code, one_line


def main() -> int:
    """Answer one request from standard input; the exit code says how it went."""
    try:
        request = json.loads(sys.stdin.read())
        cfg = to_run_config(request["config"])
        exp = Experiment(cfg)  # one use in this process: no cache, no second conversion of the config
        start = start_line(cfg, exp, str(request["runtime"]))
        answer = {"ok": True, "num_devices": int(exp.num_devices), "start": start}
    except Exception as err:  # noqa: BLE001 - every error is reported to the runner, refusals as such
        traceback.print_exc()
        refused = exit_code(err) == EXIT_REFUSED
        print(json.dumps({"ok": False, "refused": refused, "error": type(err).__name__, "message": one_line(err)}))
        return EXIT_REFUSED if refused else EXIT_FAILED
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
