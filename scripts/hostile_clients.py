"""DISTREAL on FEMNIST with five hostile clients, next to the same run without them.

Both runs use the Message-API strategy (:class:`flwr_distreal.serverapp.Distreal`, with the
round's bounds at their defaults and ``batch_size``/``local_epochs`` from the run config, so
``num_batches`` is bounded by each node's ``round-samples``) on Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray backend), one SuperNode per FEMNIST writer, the same
seed, hence the same devices drawn every round. The ClientApp's train handler wraps
:func:`flwr_distreal.clientapp.make_train_handler`; in the hostile run five partition ids
tamper with their reply (by default the five devices the seeded draw picks most often over the
run's rounds, so that each shows up as often as possible):

``huge``     every floating weight set to ``1e30``, honest MACs;
``inflate``  ``num_batches = 1e9`` and ``macs = 1e9 x`` the full model's MACs per batch;
``scale50``  the honest update scaled 50 times, honest MACs;
``sleep``    sleeps ``--sleep`` seconds (60) before answering: past the round ``--timeout``, a
             failure;
``raise``    raises in the train handler: an error reply, a failure.

Printed: per round, the counts (received, failures, refused, clipped, accepted) and what
happened to each hostile device that was drawn (refused with the reason, clipped, timed out,
error); the test accuracy every ``--eval-every`` rounds of both runs side by side; a summary
per hostile role. ``--unprotected`` adds a third run with the hostile clients and the bounds
off (``update_bound=None, claim_bound=None``, no batch size), to show what they prevent.

    python scripts/hostile_clients.py                      # 30 rounds, 35 per round (long)
    python scripts/hostile_clients.py --rounds 3           # a quick check
    python scripts/hostile_clients.py --json results/hostile.json -- resources.lam=2

Arguments after ``--`` are Hydra overrides of ``conf/config.yaml`` (defaults here:
``dataset=femnist_leaf clients_per_round=35 rounds=30 strategy=distreal``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from flwr_distreal.config import RunConfig, register_configs, to_run_config  # noqa: E402

ROLES = ("huge", "inflate", "scale50", "sleep", "raise")
DEFAULTS = ["dataset=femnist_leaf", "clients_per_round=35", "rounds=30", "strategy=distreal"]

# "round 3: refused reply of node 123 (partition-id 41): outlier-update: ..."
_EVENT = re.compile(
    r"round (\d+): (?:(refused|clipped) reply of node \d+ \(partition-id (\S+)\): ([\w-]+)"
    r"|node \d+ \(partition-id (\S+)\) (sent no reply|replied with an error))"
)


def _config(overrides: list[str]) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=[*DEFAULTS, *overrides]))


class _Events(logging.Handler):
    """Collects the gate's refusals, clips, missing and error replies per round and device."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_round: dict[int, list[tuple[str, str]]] = defaultdict(list)  # (device, event)

    def emit(self, record: logging.LogRecord) -> None:
        m = _EVENT.search(record.getMessage())
        if m is None:
            return
        rnd = int(m.group(1))
        if m.group(2):
            self.by_round[rnd].append((m.group(3), f"{m.group(2)} {m.group(4)}"))
        else:
            what = "timed out" if m.group(6) == "sent no reply" else "error"
            self.by_round[rnd].append((m.group(5), what))


# ----------------------------------------------------------------------------- ClientApp


def _make_client_app(cfg_json: str, roles: dict[int, str], sleep_s: float, max_trainers: int):
    """A ClientApp of honest trainers (the run's DISTREAL devices) whose train handler lets the
    devices in ``roles`` tamper with their reply."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from flwr_distreal import contract as C
    from flwr_distreal.clientapp import (
        TrainerCache,
        arrays_from_record,
        make_query_handler,
        make_train_handler,
        record_from_arrays,
    )

    def trainer_fn(context):
        from flwr_distreal.experiment import _experiment_for

        return _experiment_for(cfg_json).make_trainer(int(context.node_config["partition-id"]))

    cache = TrainerCache(trainer_fn, max_trainers)
    honest = make_train_handler(cache)
    app = ClientApp()
    app.query()(make_query_handler(cache))

    @app.train()
    def train(msg: Message, context) -> Message:
        role = roles.get(int(context.node_config["partition-id"]))
        if role == "raise":
            raise RuntimeError("hostile client: raising in the train handler")
        if role == "sleep":
            time.sleep(sleep_s)
        out = honest(msg, context)
        if role not in ("huge", "inflate", "scale50"):
            return out
        record = out.content[C.ARRAYS_RECORD]
        keys = list(record.keys())
        arrays = arrays_from_record(record, keys)
        metrics = dict(out.content[C.METRICS_RECORD])
        if role == "huge":
            arrays = [np.full_like(a, 1e30) if a.dtype.kind == "f" else a for a in arrays]
        elif role == "scale50":
            g = arrays_from_record(msg.content[C.ARRAYS_RECORD], keys)
            arrays = [
                (b + 50.0 * (a.astype(np.float64) - b)).astype(a.dtype) if a.dtype.kind == "f" else a
                for a, b in zip(arrays, g)
            ]
        else:  # inflate: a claim that passes the client's own bound, num_batches x full MACs
            from flwr_distreal.experiment import _experiment_for

            metrics[C.NUM_BATCHES] = 10**9
            metrics[C.MACS] = 1e9 * float(_experiment_for(cfg_json).full_forward_macs)
        content = RecordDict(
            {C.ARRAYS_RECORD: record_from_arrays(keys, arrays), C.METRICS_RECORD: MetricRecord(metrics)}
        )
        return Message(content=content, reply_to=msg)

    return app


# ----------------------------------------------------------------------------- one run


def run(cfg: RunConfig, exp, roles: dict[int, str], args, *, protected: bool, label: str) -> dict[str, Any]:
    """One simulation; returns per-round metrics, events and accuracies."""
    from flwr.app import Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from flwr_distreal import serverapp
    from flwr_distreal.clientapp import record_from_arrays

    cfg_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    own, _ = exp.strategy_kwargs()
    if protected:
        own.update(batch_size=cfg.batch_size, local_epochs=cfg.local_epochs)
    else:
        own.update(update_bound=None, claim_bound=None)
    accuracy: dict[int, float] = {}
    out: dict[str, Any] = {}

    def evaluate_fn(server_round: int, arrays) -> MetricRecord | None:
        if server_round % args.eval_every and server_round != cfg.rounds:
            return None
        loss, acc, _ = exp.evaluate([a.numpy() for a in arrays.values()])
        accuracy[server_round] = acc
        print(f"  [{label}] round {server_round}: accuracy {acc:.4f}, loss {loss:.4g}", flush=True)
        return MetricRecord({"accuracy": acc, "loss": float(loss) if np.isfinite(loss) else -1.0})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = serverapp.Distreal(
            **own,
            seed=cfg.seed,
            fraction_train=cfg.clients_per_round / exp.num_devices,
            min_train_nodes=cfg.clients_per_round,
            min_available_nodes=exp.num_devices,
            fraction_evaluate=0.0,
            min_evaluate_nodes=0,
        )
        keys, arrays = exp.initial_arrays()
        result = strategy.start(
            grid=grid,
            initial_arrays=record_from_arrays(keys, arrays),
            num_rounds=cfg.rounds,
            timeout=args.timeout,
            evaluate_fn=evaluate_fn,
        )
        out["train"] = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}

    events = _Events()
    gate_log = logging.getLogger("flwr_distreal.serverapp")
    gate_log.addHandler(events)
    gate_log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server,
                _make_client_app(cfg_json, roles, args.sleep, args.max_trainers),
                num_supernodes=exp.num_devices,
                backend_config={
                    "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                    "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False},
                },
            )
    finally:
        gate_log.removeHandler(events)
    return {
        "label": label,
        "train": out.get("train", {}),
        "events": {r: list(v) for r, v in events.by_round.items()},
        "accuracy": accuracy,
        "wall_s": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- report


def _report(runs: list[dict[str, Any]], roles: dict[int, str], rounds: int) -> None:
    hostile = next((r for r in runs if r["label"] == "hostile"), None)
    role_of = {str(d): role for d, role in roles.items()}
    for run_ in runs:
        print(f"\n== {run_['label']} ({run_['wall_s']:.0f} s): per round counts; hostile devices drawn")
        for rnd in range(1, rounds + 1):
            m = run_["train"].get(rnd, {})
            counts = ", ".join(f"{k} {int(m.get(k, 0))}" for k in ("received", "failures", "refused", "clipped", "accepted"))
            evs = run_["events"].get(rnd, [])
            shown = [f"{role_of.get(d, 'device')} {d}: {e}" for d, e in evs if d in role_of or run_["label"] == "clean"]
            others = [f"{d}: {e}" for d, e in evs if d not in role_of and run_["label"] != "clean"]
            line = f"round {rnd:>2}: {counts}"
            if shown:
                line += " | " + "; ".join(shown)
            if others:
                line += " | honest devices: " + "; ".join(others)
            print(line)
    print("\n== test accuracy")
    eval_rounds = sorted(set().union(*(r["accuracy"] for r in runs)))
    print(f"{'round':>5} | " + " | ".join(f"{r['label']:>12}" for r in runs))
    for rnd in eval_rounds:
        print(f"{rnd:>5} | " + " | ".join(f"{r['accuracy'].get(rnd, float('nan')):>12.4f}" for r in runs))
    if hostile is not None:
        print("\n== hostile devices in the protected run: what the server did with them")
        per: dict[str, Counter] = defaultdict(Counter)
        for evs in hostile["events"].values():
            for d, e in evs:
                if d in role_of:
                    per[d][e] += 1
        for d, role in sorted(role_of.items(), key=lambda kv: ROLES.index(kv[1])):
            seen = ", ".join(f"{e} x{n}" for e, n in sorted(per[d].items())) or "never drawn (or accepted)"
            print(f"{role:>8} (partition-id {d}): {seen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="override rounds (default: the config's, 30)")
    parser.add_argument("--hostile", default=None, help="comma-separated partition ids for " + ", ".join(ROLES))
    parser.add_argument(
        "--timeout", type=float, default=40.0, help="round timeout in seconds (above an honest round's time)"
    )
    parser.add_argument("--sleep", type=float, default=60.0, help="seconds the sleeper sleeps (> --timeout)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--cpus-per-client", type=float, default=0.5, help="Ray CPUs per client (0.5: 2 actors per core)")
    parser.add_argument("--max-trainers", type=int, default=64, help="trainers kept per Ray worker")
    parser.add_argument("--unprotected", action="store_true", help="add a hostile run with the bounds off")
    parser.add_argument("--skip-clean", action="store_true", help="only the hostile run(s)")
    parser.add_argument("--json", default=None, help="write all numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args()
    if args.sleep <= args.timeout:
        parser.error("--sleep must exceed --timeout, or the sleeper is no failure")
    overrides = list(args.overrides) + ([f"rounds={args.rounds}"] if args.rounds else [])
    from flwr_distreal.experiment import with_absolute_paths

    cfg = with_absolute_paths(_config(overrides))  # Ray workers may start elsewhere
    if cfg.strategy.name != "distreal":
        parser.error("this script runs DISTREAL (strategy=distreal)")

    from flwr_distreal.experiment import _experiment_for
    from flwr_distreal.server_core import sample_size, seeded_draw

    exp = _experiment_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    if args.hostile:
        ids = [int(x) for x in args.hostile.split(",")]
        if len(ids) != len(ROLES):
            parser.error(f"--hostile needs {len(ROLES)} partition ids")
    else:  # replay the strategy's seeded draw (one SuperNode per device): the most drawn devices
        k = sample_size(exp.num_devices, cfg.clients_per_round / exp.num_devices, cfg.clients_per_round)
        rng, drawn = random.Random(cfg.seed), Counter()
        for _ in range(cfg.rounds):
            drawn.update(seeded_draw(rng, {d: d for d in range(exp.num_devices)}, k))
        ids = [d for d, _ in sorted(drawn.items(), key=lambda kv: (-kv[1], kv[0]))[: len(ROLES)]]
    roles = dict(zip(ids, ROLES))
    print(
        f"DISTREAL on {cfg.dataset.name}: {exp.num_devices} devices, {cfg.clients_per_round} per round, "
        f"{cfg.rounds} rounds, round timeout {args.timeout:g} s; hostile: "
        + ", ".join(f"{role} = partition-id {d}" for d, role in roles.items()),
        flush=True,
    )
    runs = []
    if not args.skip_clean:
        runs.append(run(cfg, exp, {}, args, protected=True, label="clean"))
    runs.append(run(cfg, exp, roles, args, protected=True, label="hostile"))
    if args.unprotected:
        runs.append(run(cfg, exp, roles, args, protected=False, label="unprotected"))
    _report(runs, roles, cfg.rounds)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        report = {"config": dataclasses.asdict(cfg), "roles": {str(d): r for d, r in roles.items()}, "runs": runs}
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
