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
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr_distreal.cli import report  # noqa: E402
from flwr_distreal.cli.tables import ReportError, marked_tables, table_cells  # noqa: E402

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
    for command, old, (start, end) in marked_tables(text):
        new = printed_table(command)
        if table_cells(old, strip_bold=True) != table_cells(new, strip_bold=True):
            changed.append(command)
            parts.append(text[pos:start] + new)
        else:
            parts.append(text[pos:end])
        pos = end
    parts.append(text[pos:])
    return "".join(parts), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    path = Path(args.readme)
    try:
        text, changed = update(path.read_text(encoding="utf-8"))
    except ReportError as err:
        raise SystemExit(f"error: {err}") from None
    for command in changed:
        print(f"{'differs' if args.check else 'rewritten'}: {command[:120]}")
    if not args.check and changed:
        path.write_text(text, encoding="utf-8")
    print(f"{len(changed)} of {len(marked_tables(text))} marked tables "
          f"{'differ' if args.check else 'rewritten'}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
