#!/usr/bin/env python
"""The CIFAR-10 Fig. 6 setting on one GPU: a smoke run, then a timed run, time per round and the
hours 7,500 rounds would take.

Examples::

    python scripts/gpu_run.py                                   # GPU: 4 clients share it (0.25 GPU each)
    python scripts/gpu_run.py --gpus-per-client 0.5 --rounds 20
    python scripts/gpu_run.py --plan                            # print what would run, run nothing
    python scripts/gpu_run.py --device cpu --runtime inprocess --data synthetic --synthetic-size 40,40 \\
        --smoke-rounds 1 --rounds 2 -- dataset.num_devices=4 dataset.samples_per_device=8 clients_per_round=2

The setting is ``conf/experiment/fig6_cifar10.yaml`` (DenseNet-BC-40, 100 devices of 500 CIFAR-10
images, 10 a round, time-varying resources at lambda = 2, static BN, one local epoch of batches of
32), run with ``runtime=flwr-run``: Flower's simulation engine starts one Ray actor per client that
fits, and ``num_gpus_per_client=0.25`` lets four clients train on the GPU at once (Ray sets each
actor's ``CUDA_VISIBLE_DEVICES``; ``device=cuda`` puts the clients' and the server's work on it).

1. **Smoke run** (``--smoke-rounds``, default 2, ``--smoke-clients`` a round, default 4): the whole
   path (data, Ray, GPU actors, aggregation, evaluation) must finish, else the script stops there.
2. **Timed run** (``--rounds``, default 10, the preset's 10 clients a round): time per round from
   the run's ``metrics.csv`` (the differences of ``wall_time``); the first round (start-up of the
   actors, layout calibration, CUDA context) is shown apart, the median of the others is the
   steady round, and ``--total-rounds`` (default 7,500) of them give the projected hours.

Data: ``--root`` (default ``../shared/data/cifar10``) when it holds ``cifar-10-batches-py``; with
``--data synthetic`` (or ``auto`` when the real data is absent: a device machine without it)
random images in CIFAR-10's files and sizes are written first (50,000 + 10,000 images): a round
costs the same, the accuracies mean nothing. ``--device cpu`` runs the same path on the CPU (no
GPU share) for testing. Hydra overrides after ``--`` go to both runs. ``summary.json`` in
``--out`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _num(cell: object) -> float:
    """A metrics.csv cell as a number; an empty cell (a round not evaluated: evaluate_every) is nan."""
    return float(cell) if cell not in (None, "") else float("nan")
DEFAULT_ROOT = ROOT.parent / "shared" / "data" / "cifar10"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ----------------------------------------------------------------------------------- data


def has_cifar10(root: Path) -> bool:
    """Whether ``root`` (or ``root/cifar-10-batches-py``) holds CIFAR-10's python files."""
    return any(all((c / f).is_file() for f in CIFAR_FILES) for c in (root / CIFAR_FOLDER, root))


def write_synthetic_cifar10(root: Path, per_batch: int = 10_000, n_test: int = 10_000, seed: int = 0) -> Path:
    """Random CIFAR-10 in its python layout under ``root/cifar-10-batches-py``: five training
    batches of ``per_batch`` images and a test batch of ``n_test``, labels cycling through the
    10 classes; returns ``root``. Same shapes and sizes as the real files, so a round costs the same.
    """
    if per_batch < 1 or n_test < 1:
        raise ValueError(f"per_batch and n_test must be >= 1, got {per_batch} and {n_test}")
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, n) in enumerate([(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]):
        batch = {
            "batch_label": f"synthetic {name}",
            "labels": [int(j % 10) for j in range(i * n, (i + 1) * n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"{j}.png" for j in range(n)],
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh)
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_cases_per_batch": per_batch}, fh)
    return root


# ----------------------------------------------------------------------------------- runs


def run_overrides(args: argparse.Namespace, root: Path, *, smoke: bool, out: Path, extra: Sequence[str] = ()) -> list[str]:
    """The Hydra overrides of the smoke run (``smoke``) or the timed run."""
    gpus = args.gpus_per_client if args.device != "cpu" else 0.0
    overrides = [
        "+experiment=fig6_cifar10", f"method={args.method}", f"resources.lam={args.lam}",
        f"runtime={args.runtime}", f"device={args.device}", f"num_gpus_per_client={gpus:g}",
        f"num_cpus_per_client={args.cpus_per_client}", f"dataset.root={root}", "dataset.download=false",
        f"rounds={args.smoke_rounds if smoke else args.rounds}", f"seed={args.seed}", "plot=false",
        f"hydra.run.dir={out}",
    ]
    if smoke:
        overrides.append(f"clients_per_round={args.smoke_clients}")
    return overrides + list(extra)


def run_command(overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "flwr_distreal.main", *overrides]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def round_times(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """Seconds of each round: the differences of the cumulative ``wall_time`` column."""
    walls = [float(r["wall_time"]) for r in rows]
    return [b - a for a, b in zip([0.0, *walls[:-1]], walls)]


def projection(times: Sequence[float], total_rounds: int) -> dict[str, float]:
    """First round, steady round (median of the rounds after the first; the first itself when it
    is the only one) and the hours ``total_rounds`` steady rounds take (plus the first's extra)."""
    if not times:
        raise ValueError("no round times: the run recorded no rounds")
    if total_rounds < 1:
        raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    hours = (times[0] + steady * (total_rounds - 1)) / 3600.0
    return {"first_round_s": times[0], "steady_round_s": steady, "rounds_timed": len(times), "projected_hours": hours,
            "total_rounds": total_rounds}


class GpuMemorySampler:
    """Samples ``nvidia-smi``'s used memory of every GPU once a second in a thread; ``peak_mib``
    the largest sum seen (None without ``nvidia-smi``)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smi = shutil.which("nvidia-smi")

    def _sample(self) -> float | None:
        try:
            res = subprocess.run([self._smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
            return sum(float(x) for x in res.stdout.split()) if res.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            value = self._sample()
            if value is not None:
                self.peak_mib = max(self.peak_mib or 0.0, value)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemorySampler:
        if self._smi:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)


def run_once(command: Sequence[str], timeout: float, log_path: Path) -> tuple[int, float]:
    """Run the Hydra runner (its own session; output to the console and ``log_path``); on timeout
    SIGTERM (the runner stops its SuperLink and Ray at exit), SIGKILL 30 s later. Returns the exit
    code (124 on timeout) and the wall seconds."""
    t0 = time.perf_counter()
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        timer = threading.Timer(timeout, lambda: _stop(proc))
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log_file.write(line)
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                _stop(proc)
    timed_out = getattr(proc, "_timed_out", False)
    return (124 if timed_out else rc), time.perf_counter() - t0


def _stop(proc: subprocess.Popen) -> None:
    proc._timed_out = True  # type: ignore[attr-defined]
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    except ProcessLookupError:
        pass


#: Run in a child process: the script itself never creates a CUDA context (it would hold GPU
#: memory for the whole run and count in nvidia-smi's figure).
_DEVICE_PROBE = """
import json, os, torch
info = {"torch": torch.__version__, "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
print(json.dumps(info))
"""


def describe_device(device: str) -> dict[str, Any]:
    """torch's version, the CPUs and, where torch sees one, the GPU (name, memory), probed in a
    child process; raises SystemExit(2) when ``device`` is CUDA and torch sees no GPU."""
    res = subprocess.run([sys.executable, "-c", _DEVICE_PROBE], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        print(f"error: could not probe torch's devices:\n{res.stderr[-2000:]}", file=sys.stderr)
        raise SystemExit(2)
    info = {"device": device, **json.loads(res.stdout.strip().splitlines()[-1])}
    if device.startswith("cuda") and not info["cuda_available"]:
        print(f"error: --device {device} but torch {info['torch']} sees no GPU (torch.cuda.is_available() is False); "
              "use --device cpu to test the path on the CPU", file=sys.stderr)
        raise SystemExit(2)
    return info


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="gpu_run.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device of clients and server (default cuda; cpu to test)")
    parser.add_argument("--gpus-per-client", type=float, default=0.25, help="GPU share of a client (default 0.25: 4 clients at once)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray reserves per client (default 1)")
    parser.add_argument("--runtime", choices=("flwr-run", "inprocess"), default="flwr-run",
                        help="flwr-run (Ray: clients share the GPU, default) or inprocess (clients one after another)")
    parser.add_argument("--method", default="distreal", help="conf/method/ of the runs (default distreal)")
    parser.add_argument("--lam", type=float, default=2.0, help="resources.lam (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--smoke-rounds", type=int, default=2, help="rounds of the smoke run (default 2; 0: no smoke run)")
    parser.add_argument("--smoke-clients", type=int, default=4, help="clients a round in the smoke run (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the timed run (default 10; 0: smoke run only)")
    parser.add_argument("--total-rounds", type=int, default=7500, help="rounds of the projection (default 7500, Fig. 6b)")
    parser.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto",
                        help="real CIFAR-10 under --root, synthetic images, or auto: real when present (default)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"CIFAR-10 folder (default {DEFAULT_ROOT})")
    parser.add_argument("--synthetic-size", default="10000,10000", metavar="PER_BATCH,TEST",
                        help="synthetic images per training batch (5 batches) and test images (default 10000,10000)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/gpu_run/<time>)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds each run may take (default 1800)")
    parser.add_argument("--plan", action="store_true", help="print the commands and the setting, run nothing")
    args = parser.parse_args(argv)
    for key in ("smoke_rounds", "rounds"):
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.smoke_rounds == 0 and args.rounds == 0:
        parser.error("--smoke-rounds and --rounds are both 0: nothing to run")
    for key in ("smoke_clients", "total_rounds", "cpus_per_client"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.device != "cpu" and not 0 < args.gpus_per_client <= 1:
        parser.error(f"--gpus-per-client must be in (0, 1] (a share of one GPU), got {args.gpus_per_client}")
    try:
        args.synthetic_size = tuple(int(x) for x in args.synthetic_size.split(","))
        if len(args.synthetic_size) != 2 or min(args.synthetic_size) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--synthetic-size must be two positive integers PER_BATCH,TEST, got {args.synthetic_size!r}")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else list(argv))
    out = (args.out or ROOT / "outputs" / "gpu_run" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    if args.data == "real" or (args.data == "auto" and has_cifar10(args.root)):
        if not has_cifar10(args.root):
            print(f"error: no CIFAR-10 under {args.root} (expected {args.root / CIFAR_FOLDER}); use --data synthetic",
                  file=sys.stderr)
            return 2
        root, synthetic = args.root.resolve(), False
    else:
        root, synthetic = out / "synthetic-cifar10", True
    runs = [("smoke", args.smoke_rounds)] * bool(args.smoke_rounds) + [("timed", args.rounds)] * bool(args.rounds)
    commands = {name: run_command(run_overrides(args, root, smoke=name == "smoke", out=out / name, extra=extra)) for name, _ in runs}
    print(f"data: {'SYNTHETIC random images (accuracies mean nothing) at ' if synthetic else 'CIFAR-10 at '}{root}")
    for name, command in commands.items():
        print(f"{name} run: {shlex.join(command)}")
    if args.plan:
        return 0

    device = describe_device(args.device)
    print("device:", ", ".join(f"{k} {v}" for k, v in device.items()), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if synthetic and not has_cifar10(root):
        t0 = time.perf_counter()
        write_synthetic_cifar10(root, *args.synthetic_size, seed=args.seed)
        print(f"wrote synthetic CIFAR-10 ({5 * args.synthetic_size[0]} + {args.synthetic_size[1]} images) in {time.perf_counter() - t0:.1f} s")

    summary: dict[str, Any] = {"device": device, "data": "synthetic" if synthetic else str(root), "runs": {}}
    rc = 0
    for name, rounds in runs:
        print(f"\n=== {name} run: {rounds} round(s) ===", flush=True)
        with GpuMemorySampler() as sampler:
            code, wall = run_once(commands[name], args.timeout, out / f"{name}.log")
        rows = read_metrics(out / name)
        times = round_times(rows)
        record: dict[str, Any] = {"exit_code": code, "wall_s": round(wall, 1), "rounds_done": len(rows),
                                  "round_s": [round(t, 2) for t in times], "gpu_memory_peak_mib": sampler.peak_mib,
                                  "accuracy": [_num(r["accuracy"]) for r in rows], "command": commands[name]}
        print(f"{name} run: exit code {code}, {wall:.1f} s in all, {len(rows)}/{rounds} rounds")
        for row, t in zip(rows, times):
            print(f"  round {row['round']}: {t:.2f} s  accuracy {_num(row['accuracy']):.4f}  stragglers {row['stragglers']}/{row['received']}")
        if sampler.peak_mib is not None:
            print(f"  GPU memory used at most: {sampler.peak_mib:.0f} MiB (nvidia-smi, all processes)")
        if times:
            record.update(projection(times, args.total_rounds))
            record["startup_s"] = round(wall - float(rows[-1]["wall_time"]), 1)
            basis = f"median of rounds 2-{len(times)}" if len(times) > 1 else "one round: the first stands in"
            print(f"  first round {record['first_round_s']:.2f} s, steady round {record['steady_round_s']:.2f} s "
                  f"({basis}), start-up and exit {record['startup_s']:.1f} s")
            if name == "timed" or len(runs) == 1:
                print(f"  projected: {args.total_rounds} rounds = {record['projected_hours']:.1f} h "
                      f"({'GPU ' + str(device.get('gpu')) if 'gpu' in device else args.device}, "
                      f"{args.gpus_per_client if args.device != 'cpu' else 0:g} GPU per client)")
        summary["runs"][name] = record
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if code != 0 or len(rows) < rounds:
            print(f"error: the {name} run did not finish ({len(rows)}/{rounds} rounds, exit code {code}); log: {out / (name + '.log')}",
                  file=sys.stderr)
            rc = 1
            break
    print(f"summary: {out / 'summary.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
