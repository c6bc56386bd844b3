"""Bad inputs to the runner, each run as ``python -m flwr_distreal.main ...``: how soon, with which
exit code and which message each is refused (issue 20, item 5, and inputs refused before).

    .venv/bin/python scripts/startup_refusals.py            # a Markdown table on stdout

Every case runs in a scratch folder (its ``output_dir`` and Hydra's run folder; nothing goes
to ``outputs/``). A case that is not refused within ``--timeout`` seconds is stopped and shown
as such. The message column is the first line of stderr; ``traceback`` says whether stdout or
stderr held a Python traceback. On a machine with CUDA the rows that need its absence are
skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases(scratch: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """(label, overrides, extra environment) of every bad input, in the table's order."""
    file = scratch / "a_file"
    file.write_text("not a folder\n")
    used = scratch / "used_run"
    used.mkdir()
    (used / "metrics.csv").write_text("round,accuracy\n1,0.5\n")
    empty = scratch / "empty_dir"
    empty.mkdir()
    # a TMPDIR of a given length that exists (Python ignores a TMPDIR that does not); runtime=flwr-run
    # makes its folder in /tmp where Ray's sockets would not fit under TMPDIR, so only legacy is refused
    tmp42 = scratch / "t42"
    tmp42 = tmp42.with_name(tmp42.name + "t" * (42 - len(str(tmp42))))
    tmp42.mkdir()
    out = []
    import torch

    if not torch.cuda.is_available():
        out += [
            ("`device=cuda` (no CUDA here)", ["device=cuda"], {}),
            ("`num_gpus_per_client=1` (no GPU here)", ["num_gpus_per_client=1"], {}),
        ]
    cpus = os.cpu_count() or 1
    out += [
        (f"`num_cpus_per_client={cpus + 1}` ({cpus} CPUs here)", [f"num_cpus_per_client={cpus + 1}"], {}),
        (f"`TMPDIR` of {len(str(tmp42))} characters, `runtime=legacy`", ["runtime=legacy"], {"TMPDIR": str(tmp42)}),
        ("`output_dir` = an existing file", [f"output_dir={file}"], {}),
        ("`output_dir` inside a file", [f"output_dir={file}/run"], {}),
        ("`output_dir` holding a run, no `resume`", [f"output_dir={used}"], {}),
        ("`resume=true` into an empty folder", [f"output_dir={empty}", "resume=true"], {}),
        ("`round_timeout=5 runtime=legacy`", ["round_timeout=5", "runtime=legacy"], {}),
        ("`rounds=0`", ["rounds=0"], {}),
        ("`seed=-1`", ["seed=-1"], {}),
        ("`failure_threshold=1.5`", ["failure_threshold=1.5"], {}),
        ("`strategy=heterofl strategy.shrink=1.5`", ["strategy=heterofl", "strategy.shrink=1.5"], {}),
        ("`+strategy.polcy=paper` (a typo)", ["+strategy.polcy=paper"], {}),
        ("`resources.margin=1`", ["resources.margin=1"], {}),
        ("`dataset=femnist_leaf dataset.root=/nonexistent`", ["dataset=femnist_leaf", "dataset.root=/nonexistent"], {}),
        ("`clients_per_round=1000` (digits has fewer devices)", ["clients_per_round=1000"], {}),
    ]
    return out


def run_case(overrides: list[str], env: dict[str, str], scratch: Path, n: int, timeout: float) -> dict:
    """Run one case; its time, exit code, first stderr line and whether a traceback was printed."""
    args = list(overrides)
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={scratch / f'run{n}'}")
    args.append(f"hydra.run.dir={scratch / f'hydra{n}'}")
    command = [sys.executable, "-m", "flwr_distreal.main", *args]
    environ = {**os.environ, **env}
    for name in ("DISTREAL_DEBUG", "HYDRA_FULL_ERROR"):
        environ.pop(name, None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": time.perf_counter() - start, "code": "-", "message": f"not refused within {timeout:.0f} s",
                "traceback": "-"}
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {
        "seconds": seconds,
        "code": proc.returncode,
        "message": lines[0] if lines else "(stderr empty)",
        "traceback": "yes" if "Traceback" in proc.stderr + proc.stdout else "no",
        "stderr_lines": len(lines),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds before a case counts as not refused")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="r-", dir="/tmp") as tmp:  # short: TMPDIRs of 30 characters go in it
        scratch = Path(tmp)
        rows = []
        for n, (label, overrides, env) in enumerate(cases(scratch)):
            result = run_case(overrides, env, scratch, n, args.timeout)
            rows.append((label, result))
            print(f"{label}: exit {result['code']} after {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    print("| input | time to refusal (s) | exit code | stderr lines | traceback | message (first line of stderr) |")
    print("|---|---:|---:|---:|---|---|")
    for label, r in rows:
        message = r["message"].replace("|", "\\|").replace(str(ROOT), ".")
        print(f"| {label} | {r['seconds']:.1f} | {r['code']} | {r.get('stderr_lines', '-')} | {r['traceback']} | {message} |")


if __name__ == "__main__":
    main()
