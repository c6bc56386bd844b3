#!/usr/bin/env python
"""Rewrite every marked table of README.md from its command (the other half of
``tests/test_readme_tables.py``, which checks them).

    .venv/bin/python scripts/update_readme_tables.py            # rewrite README.md in place
    .venv/bin/python scripts/update_readme_tables.py --check    # exit 1 and name the tables that differ

Each ``<!-- table: python -m flwr_distreal.report ... -->`` marker's command is run in process from
the repository root and the Markdown table right below the marker is replaced by what it prints.
A results table's bold (the author's emphasis) is lost where a cell changes; an unchanged table is
left as it is, byte for byte. Run it after rerunning the runs behind a table: a table is a claim,
and its committed metrics are the evidence.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr_distreal.cli import report  # noqa: E402

MARKER = re.compile(r"<!--\s*table:(.*?)-->\n", flags=re.S)


def _cells(table: str) -> list[list[str]]:
    return [[" ".join(c.split()).replace("**", "") for c in line.strip().strip("|").split("|")]
            for line in table.strip().splitlines()]


def printed_table(command: str) -> str:
    """What the marker's command prints (run in process, cwd = the repository root)."""
    argv = shlex.split(" ".join(command.split()))
    if argv[:3] != ["python", "-m", "flwr_distreal.report"]:
        raise SystemExit(f"a marker must run python -m flwr_distreal.report: {command[:80]}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = report.main(argv[3:])
    if code != 0:
        raise SystemExit(f"{' '.join(argv)[:100]}... exited {code}: {err.getvalue().strip()}")
    return out.getvalue().strip()


def update(text: str) -> tuple[str, list[str]]:
    """``text`` with every marked table replaced by its command's output; the changed commands."""
    parts, changed, pos = [], [], 0
    for match in MARKER.finditer(text):
        start = match.end()
        lines = text[start:].split("\n")
        n = next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))
        if n < 2:
            raise SystemExit(f"the marker '{' '.join(match.group(1).split())[:60]}...' is not followed by a table")
        old = "\n".join(lines[:n])
        new = printed_table(match.group(1))
        if _cells(old) != _cells(new):
            changed.append(" ".join(match.group(1).split()))
            parts.append(text[pos:start] + new)
        else:
            parts.append(text[pos:start] + old)
        pos = start + len(old)
    parts.append(text[pos:])
    return "".join(parts), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    path = Path(args.readme)
    text, changed = update(path.read_text(encoding="utf-8"))
    for command in changed:
        print(f"{'differs' if args.check else 'rewritten'}: {command[:120]}")
    if not args.check and changed:
        path.write_text(text, encoding="utf-8")
    print(f"{len(changed)} of {len(MARKER.findall(path.read_text(encoding='utf-8')))} marked tables "
          f"{'differ' if args.check else 'rewritten'}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
