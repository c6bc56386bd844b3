"""DISTREAL with hostile clients through ``flwr run`` (the default runtime), next to the same run
without them, and a run that ``failure_threshold`` stops.

Every run is the project's own ServerApp (:func:`flwr_distreal.run.flwr_app.server_main`: the run's
Message-API strategy with its reply gate and round bounds, ``round_timeout``, ``metrics.csv``,
``draws.csv``, checkpoints and the ``failure_threshold`` check) on a private local SuperLink
(:class:`flwr_distreal.run.local_runtime.LocalFlwrRuntime`), one simulated SuperNode per device, with
a ClientApp whose train handler lets some devices tamper with their reply. The app is this file:
``flwr run`` loads it from a Flower app folder the script writes (``pyproject.toml`` naming
``hostile_app:server_app`` and ``hostile_app:client_app``, and this file as ``hostile_app.py``);
the hostile devices travel in the run config (``hostile-roles``).

Roles (by default the devices the seeded draw picks most often over the run's rounds, so that
each shows up as often as possible; every method and run draws the same devices for a seed):

``nan``      every floating weight set to NaN, honest MACs;
``huge``     every floating weight set to ``1e30``, honest MACs;
``inflate``  ``num_batches = 1e9`` and ``macs = 1e9 x`` the full model's MACs per sample;
``scale50``  the honest update scaled 50 times, honest MACs;
``sleep``    sleeps ``--sleep`` seconds before answering: past the round timeout (``--timeout``,
             the run's ``round_timeout``), a failure;
``raise``    raises in the train handler: an error reply, a failure.

Runs: ``clean`` (no hostile device), ``hostile`` (the roles above; ``failure_threshold`` at the
config's value, 0.5, which the run stays under), and ``threshold`` (``raise`` on the fewest devices
that make more than ``failure_threshold`` of every round's draws fail, replayed from the seeded
draw: the server must end the run with its ``RunFailedError`` after the last round).

Printed: per run and round, the counts of ``metrics.csv`` (received, failures, refused, clipped,
accepted), the devices drawn (``draws.csv``) and what the server did with each hostile one (from
its log: refused with the reason, clipped, no reply, error reply); the test accuracy of all runs
side by side; how each run ended (Flower's status, the server's message).

    python scripts/hostile_clients.py                       # digits, 4 rounds, 10 of 20 per round
    python scripts/hostile_clients.py --rounds 2 --skip-threshold
    python scripts/hostile_clients.py --json results/hostile.json -- dataset=femnist_leaf clients_per_round=35
    python scripts/hostile_clients.py --dry-run             # the plan and the app folder, no run

Arguments after ``--`` are Hydra overrides of ``conf/config.yaml`` (defaults here:
``dataset=digits rounds=4 strategy=distreal``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import random
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if (REPO / "flwr_distreal").is_dir():  # run from the repository (not from flwr run's app folder)
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

ROLES = ("nan", "huge", "inflate", "scale50", "sleep", "raise")
DEFAULTS = ["dataset=digits", "rounds=4", "strategy=distreal"]
#: Run-config keys of this app (the project's ServerApp and ClientApp do not know them).
ROLES_KEY, SLEEP_KEY = "hostile-roles", "hostile-sleep"
#: Where the server writes what it did with each reply (in the run's output directory).
EVENTS_FILE = "hostile_events.json"
APP_MODULE = "hostile_app"

# "round 3: refused reply of node 123 (partition-id 41): outlier-update: ..."
_GATE = re.compile(r"round (\d+): (refused|clipped) reply of node \S+ \(partition-id (\S+)\): ([\w-]+)")
# "round 3: node 123 (partition-id 41) sent no reply" / "... replied with an error: ..."
_NODE = re.compile(r"round (\d+): node \S+ \(partition-id (\S+)\) (.*)")


# ----------------------------------------------------------------------------- the Flower app


def parse_roles(text: str) -> dict[int, str]:
    """``"3:nan,5:raise"`` as ``{3: "nan", 5: "raise"}``.

    Raises
    ------
    ValueError
        For an entry that is not ``<partition id>:<role>`` with a known role.
    """
    roles: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        device, sep, role = item.partition(":")
        if not sep or not device.strip().isdigit() or role.strip() not in ROLES:
            raise ValueError(f"{ROLES_KEY}: {item!r} is not <partition id>:<role> with a role of {list(ROLES)}")
        roles[int(device)] = role.strip()
    return roles


def format_roles(roles: Mapping[int, str]) -> str:
    """The inverse of :func:`parse_roles`."""
    return ",".join(f"{d}:{r}" for d, r in sorted(roles.items()))


def _own_context(context: Context) -> Context:
    """``context`` without this app's run-config keys (the project's app refuses unknown keys)."""
    run_config = {k: v for k, v in context.run_config.items() if k not in (ROLES_KEY, SLEEP_KEY)}
    return Context(
        run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
        state=context.state, run_config=run_config,
    )


def tamper(role: str | None, received: Message, honest: Message, full_macs_per_sample: float) -> Message:
    """The reply a device with ``role`` sends instead of ``honest`` (unchanged for no role, and for
    ``sleep`` and ``raise``, which act before training)."""
    from flwr_distreal.core import contract as C
    from flwr_distreal.flower.clientapp import arrays_from_record, record_from_arrays

    if role not in ("nan", "huge", "inflate", "scale50"):
        return honest
    record = honest.content[C.ARRAYS_RECORD]
    keys = list(record.keys())
    arrays = arrays_from_record(record, keys)
    metrics = dict(honest.content[C.METRICS_RECORD])
    if role in ("nan", "huge"):
        value = math.nan if role == "nan" else 1e30
        arrays = [np.full_like(a, value) if a.dtype.kind == "f" else a for a in arrays]
    elif role == "scale50":
        start = arrays_from_record(received.content[C.ARRAYS_RECORD], keys)
        arrays = [
            (b + 50.0 * (a.astype(np.float64) - b)).astype(a.dtype) if a.dtype.kind == "f" else a
            for a, b in zip(arrays, start)
        ]
    else:  # inflate: a claim consistent in itself, num_batches x full MACs per sample
        metrics[C.NUM_BATCHES] = 10**9
        metrics[C.MACS] = 1e9 * float(full_macs_per_sample)
    content = RecordDict(
        {C.ARRAYS_RECORD: record_from_arrays(keys, arrays), C.METRICS_RECORD: MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=received)


def _trainer(context: Context):
    """The project's trainer of the node (its device's DISTREAL trainer)."""
    from flwr_distreal.run import flwr_app as project_app

    return project_app._trainer_fn(_own_context(context))


def _build_client_app() -> ClientApp:
    """The project's ClientApp (its trainers, query handler) whose train handler lets the devices
    in ``hostile-roles`` tamper with their reply."""
    from flwr_distreal.run import flwr_app as project_app
    from flwr_distreal.flower.clientapp import TrainerCache, make_query_handler, make_train_handler

    cache = TrainerCache(_trainer)
    honest = make_train_handler(cache)
    client = ClientApp()
    client.query()(make_query_handler(cache))

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        roles = parse_roles(str(context.run_config.get(ROLES_KEY, "")))
        role = roles.get(int(context.node_config["partition-id"]))
        if role == "raise":
            raise RuntimeError("hostile client: raising in the train handler")
        if role == "sleep":
            time.sleep(float(context.run_config.get(SLEEP_KEY, 0) or 0))
        out = honest(msg, context)
        if role is None:
            return out
        _, exp = project_app._experiment(_own_context(context))
        return tamper(role, msg, out, exp.full_forward_macs)

    return client


class _Events(logging.Handler):
    """Collects the server's refusals, clips, missing and error replies per round and device."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_round: dict[int, list[list[str]]] = defaultdict(list)  # [device, event]

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if m := _GATE.search(text):
            self.by_round[int(m.group(1))].append([m.group(3), f"{m.group(2)} {m.group(4)}"])
        elif m := _NODE.search(text):
            tail = m.group(3)
            what = "no reply" if "no reply" in tail else "error reply" if "error" in tail else tail[:60]
            self.by_round[int(m.group(1))].append([m.group(2), what])


def _build_server_app() -> ServerApp:
    """The project's ServerApp, with the server's per-device events written to the output
    directory (``hostile_events.json``) however the run ends."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from flwr_distreal.run.flwr_app import server_main

        events = _Events()
        gate_log = logging.getLogger("flwr_distreal")
        gate_log.addHandler(events)
        level = gate_log.level
        gate_log.setLevel(logging.INFO)
        try:
            server_main(grid, _own_context(context))
        finally:
            gate_log.removeHandler(events)
            gate_log.setLevel(level)
            out = context.run_config.get("output-dir")
            if out:
                Path(str(out), EVENTS_FILE).write_text(json.dumps(events.by_round, indent=1))

    return server


client_app = _build_client_app()
server_app = _build_server_app()


# ----------------------------------------------------------------------------- the driver


def write_app(folder: Path) -> Path:
    """A Flower app folder for ``flwr run``: ``pyproject.toml`` and this file as ``hostile_app.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).resolve(), folder / f"{APP_MODULE}.py")
    (folder / "pyproject.toml").write_text(
        "\n".join(
            [
                "[build-system]",
                'requires = ["setuptools>=77", "wheel"]',
                'build-backend = "setuptools.build_meta"',
                "",
                "[project]",
                'name = "hostile-clients"',
                'version = "1.0.0"',
                'description = "DISTREAL with hostile clients (scripts/hostile_clients.py of flwr-distreal)"',
                'license = "Apache-2.0"',
                'dependencies = ["flwr-distreal"]',
                "",
                "[tool.setuptools]",
                f'py-modules = ["{APP_MODULE}"]',
                "",
                "[tool.flwr.app]",
                'publisher = "flwr-distreal"',
                "",
                "[tool.flwr.app.components]",
                f'serverapp = "{APP_MODULE}:server_app"',
                f'clientapp = "{APP_MODULE}:client_app"',
                "",
                "[tool.flwr.app.config]",
                'config-file = ""',
                'output-dir = ""',
                f'{ROLES_KEY} = ""',
                f"{SLEEP_KEY} = 0.0",
                "",
            ]
        )
    )
    return folder


def _config(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flwr_distreal.run.config import register_configs, to_run_config
    from flwr_distreal.cli.tune import register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=[*DEFAULTS, *overrides]))


def replay_draws(num_devices: int, clients_per_round: int, rounds: int, seed: int) -> list[list[int]]:
    """The devices the strategies draw each round for ``seed`` (one SuperNode per device)."""
    from flwr_distreal.server import sample_size, seeded_draw

    k = sample_size(num_devices, clients_per_round / num_devices, clients_per_round)
    rng = random.Random(seed)
    return [sorted(seeded_draw(rng, {d: d for d in range(num_devices)}, k)) for _ in range(rounds)]


def most_drawn(draws: Sequence[Sequence[int]], n: int) -> list[int]:
    """The ``n`` devices drawn most often (ties: lower id first)."""
    counts = Counter(d for draw in draws for d in draw)
    return [d for d, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def crash_set(draws: Sequence[Sequence[int]], threshold: float) -> list[int]:
    """Few devices whose crashing makes more than ``threshold`` of every round's draws fail
    (greedy over the rounds, most drawn devices first)."""
    order = {d: i for i, d in enumerate(most_drawn(draws, 10**9))}
    crash: set[int] = set()
    for draw in draws:
        for device in sorted(draw, key=order.__getitem__):
            if sum(d in crash for d in draw) > threshold * len(draw):
                break
            crash.add(device)
    return sorted(crash)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_one(runtime, app_dir: Path, cfg, num_devices: int, roles: Mapping[int, str], args, label: str) -> dict[str, Any]:
    """One ``flwr run`` of the app; returns its metrics rows, draws, events and how it ended."""
    from omegaconf import OmegaConf

    out = (args.out / label).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config_file = out / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
    print(f"[{label}] flwr run {app_dir} local: {num_devices} SuperNodes; hostile {format_roles(roles) or 'none'}; "
          f"output {out}", flush=True)
    start = time.monotonic()
    result = runtime.run(
        app_dir,
        num_devices,
        {"config-file": str(config_file), "output-dir": str(out), ROLES_KEY: format_roles(roles), SLEEP_KEY: float(args.sleep)},
        federation_config={"client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0},
        log_path=out / "flwr.log",
        timeout=args.run_timeout,
    )
    wall = time.monotonic() - start
    events_path = out / EVENTS_FILE
    events = json.loads(events_path.read_text()) if events_path.is_file() else {}
    details = "" if result.details in ("", "N/A") else result.details
    print(f"[{label}] {result.status} after {wall:.0f} s{': ' + details if details else ''}", flush=True)
    return {
        "label": label,
        "roles": {str(d): r for d, r in roles.items()},
        "status": result.status,
        "details": details,
        "wall_s": round(wall, 1),
        "out": str(out),
        "rows": _read_csv(out / "metrics.csv"),
        "draws": _read_csv(out / "draws.csv"),
        "events": events,
    }


def report(runs: Sequence[Mapping[str, Any]], failure_threshold: float) -> None:
    """Print per run and round the counts, the draws and the hostile devices' fate; the accuracy
    side by side; how each run ended."""
    for run in runs:
        role_of = run["roles"]
        print(f"\n== {run['label']} ({run['wall_s']:.0f} s, {run['status']}): per round counts | drawn | hostile devices")
        draws = {row["round"]: row["train_devices"] for row in run["draws"]}
        for row in run["rows"]:
            rnd = row["round"]
            counts = ", ".join(f"{k} {int(float(row[k]))}" for k in ("received", "failures", "refused", "clipped", "accepted"))
            sampled = float(row["received"]) + float(row["failures"])
            share = float(row["failures"]) / sampled if sampled else 1.0
            evs = run["events"].get(str(rnd), [])
            shown = [f"{role_of.get(d, 'honest')} {d}: {e}" for d, e in evs]
            hostile_drawn = [f"{role_of[d]} {d}" for d in draws.get(rnd, "").split() if d in role_of]
            print(
                f"round {rnd:>2}: {counts} (failed {share:.0%}) | drawn {draws.get(rnd, '?')}"
                + (f" | hostile drawn: {', '.join(hostile_drawn)}" if hostile_drawn else "")
                + (f" | server: {'; '.join(shown)}" if shown else "")
            )
        if run["rows"]:
            fractions = [
                float(r["failures"]) / (float(r["failures"]) + float(r["received"]))
                if float(r["failures"]) + float(r["received"]) else 1.0
                for r in run["rows"]
            ]
            verdict = "every round above: the run fails" if all(f > failure_threshold for f in fractions) else "passes"
            print(f"failure_threshold {failure_threshold}: least failing round {min(fractions):.0%}, most {max(fractions):.0%}: {verdict}")
    print("\n== test accuracy (server-side, full model)")
    print(f"{'round':>5} | " + " | ".join(f"{r['label']:>10}" for r in runs))
    rounds = sorted({int(row["round"]) for r in runs for row in r["rows"]})
    for rnd in rounds:
        cells = []
        for r in runs:
            acc = next((float(x["accuracy"]) for x in r["rows"] if int(x["round"]) == rnd), math.nan)
            cells.append(f"{acc:>10.4f}")
        print(f"{rnd:>5} | " + " | ".join(cells))
    print("\n== how the runs ended")
    for r in runs:
        print(f"{r['label']:>10}: {r['status']}{' - ' + r['details'] if r['details'] else ''}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="override rounds (default here: 4)")
    parser.add_argument(
        "--hostile", default=None, help="comma-separated partition ids for " + ", ".join(ROLES) + " (in this order)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="round_timeout, seconds (above an honest round's time)")
    parser.add_argument("--sleep", type=float, default=90.0, help="seconds the sleeper sleeps (> --timeout)")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds before a flwr run is stopped")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/hostile_clients/<time>)")
    parser.add_argument("--skip-clean", action="store_true", help="no clean run")
    parser.add_argument("--skip-threshold", action="store_true", help="no run that failure_threshold stops")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and write the app folder only")
    parser.add_argument("--json", default=None, help="write all numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args(argv)
    if args.sleep <= args.timeout:
        parser.error("--sleep must exceed --timeout, or the sleeper is no failure")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.hostile is not None:
        try:
            args.hostile = [int(x) for x in args.hostile.split(",")]
        except ValueError:
            parser.error(f"--hostile takes comma-separated partition ids, got {args.hostile!r}")
        if len(args.hostile) != len(ROLES) or len(set(args.hostile)) != len(ROLES):
            parser.error(f"--hostile needs {len(ROLES)} distinct partition ids ({', '.join(ROLES)})")
    if args.out is None:
        args.out = REPO / "outputs" / "hostile_clients" / time.strftime("%Y%m%d-%H%M%S")
    return args


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The config, devices and roles of each run (no Flower run started)."""
    from flwr_distreal.run.experiment import Experiment, with_absolute_paths

    overrides = [*args.overrides, *([f"rounds={args.rounds}"] if args.rounds else [])]
    cfg = with_absolute_paths(_config([*overrides, f"round_timeout={args.timeout}"]))  # the app runs elsewhere
    if cfg.strategy.name != "distreal":
        raise SystemExit("this script runs DISTREAL (strategy=distreal)")
    if cfg.runtime != "flwr-run" or cfg.deployment:
        raise SystemExit(f"this script runs through flwr run (runtime=flwr-run, deployment=false), got runtime={cfg.runtime}")
    num_devices = Experiment(cfg).num_devices
    draws = replay_draws(num_devices, cfg.clients_per_round, cfg.rounds, cfg.seed)
    ids = args.hostile or most_drawn(draws, len(ROLES))
    for d in ids:
        if not 0 <= d < num_devices:
            raise SystemExit(f"--hostile: partition id {d} is not a device of {cfg.dataset.name} (0..{num_devices - 1})")
    runs: list[tuple[str, dict[int, str]]] = []
    if not args.skip_clean:
        runs.append(("clean", {}))
    runs.append(("hostile", dict(zip(ids, ROLES))))
    if not args.skip_threshold:
        runs.append(("threshold", {d: "raise" for d in crash_set(draws, cfg.failure_threshold)}))
    return {"cfg": cfg, "num_devices": num_devices, "draws": draws, "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup = plan(args)
    cfg, num_devices = setup["cfg"], setup["num_devices"]
    print(
        f"DISTREAL on {cfg.dataset.name} through flwr run: {num_devices} devices, {cfg.clients_per_round} per round, "
        f"{cfg.rounds} rounds, seed {cfg.seed}, round_timeout {cfg.round_timeout:g} s (sleeper {args.sleep:g} s), "
        f"failure_threshold {cfg.failure_threshold}; draws {setup['draws']}",
        flush=True,
    )
    for label, roles in setup["runs"]:
        by_role: dict[str, list[int]] = defaultdict(list)
        for device, role in roles.items():
            by_role[role].append(device)
        said = "; ".join(f"{r} = partition-id{'s' if len(d) > 1 else ''} {', '.join(map(str, d))}" for r, d in by_role.items())
        print(f"  {label}: {said or 'no hostile device'}")
    app_dir = write_app(args.out / "app")
    if args.dry_run:
        print(f"app folder: {app_dir} (dry run: nothing started)")
        return 0
    from flwr_distreal.run.local_runtime import LocalFlwrRuntime

    runs = []
    with LocalFlwrRuntime() as runtime:
        for label, roles in setup["runs"]:
            runs.append(run_one(runtime, app_dir, cfg, num_devices, roles, args, label))
    report(runs, cfg.failure_threshold)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": dataclasses.asdict(cfg), "draws": setup["draws"], "runs": runs}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
