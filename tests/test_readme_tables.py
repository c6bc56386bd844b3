"""Every marked README results table equals what the report tool prints from the committed files.

Above each results table whose raw metrics are committed (``results/``) or whose scores the
tuner wrote (``conf/tuned/``), README.md has ``<!-- table: python -m flwr_distreal.report ... -->``.
The test runs that command in process, from the repository root, and compares the printed table
with the README's cell by cell (header, separator and body), whitespace normalised. Bold in a
results table is the author's emphasis and is not compared; in an lr-grid table the tool prints
the chosen lr in bold, and there bold is compared too. A table whose raw metrics were lost has no
marker (the README says so in prose, not here).
"""

from __future__ import annotations

import math
import shlex
import shutil
from pathlib import Path

import pytest

from flwr_distreal.cli import report
from flwr_distreal.cli.report import ReportError
from flwr_distreal.cli import tables, tune
from flwr_distreal.cli.tables import parse_column, parse_method, split_markers, table_cells, tuning_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREFIX = ["python", "-m", "flwr_distreal.report"]


def _markers() -> list[tuple[str, str]]:
    return split_markers(README.read_text(encoding="utf-8"))


def table_differences(readme_table: str, printed: str) -> list[str]:
    """Every cell where the README's table and the printed one differ ([] when they are equal)."""
    strip_bold = "**" not in printed
    mine, theirs = table_cells(readme_table, strip_bold), table_cells(printed, strip_bold)
    out = []
    if len(mine) != len(theirs):
        out.append(f"{len(mine)} rows in the README, {len(theirs)} printed")
    header = theirs[0] if theirs else []
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if len(a) != len(b):
            out.append(f"row {i}: {len(a)} cells in the README, {len(b)} printed")
            continue
        for j, (x, y) in enumerate(zip(a, b)):
            if x != y:
                column = header[j] if j < len(header) else j
                out.append(f"row {i} ({a[0]}), column {column!r}: README {x!r}, report {y!r}")
    return out


def run_marker(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a marker's command in process (the cwd must be the repository root) and return stdout."""
    argv = shlex.split(command)
    assert argv[:3] == PREFIX, f"a marker must run {' '.join(PREFIX)}: {command[:80]}"
    capsys.readouterr()
    code = report.main(argv[3:])
    out, err = capsys.readouterr()
    assert code == 0, f"{command[:80]}... exited {code}: {err}"
    return out


MARKERS = _markers()


def test_the_readme_marks_every_table_with_committed_metrics() -> None:
    sources = " ".join(command for command, _ in MARKERS)
    for source in ("results/main_job", "results/cifar10_resnet20/cmp", "results/precision",
                   "results/tune/cifar10_resnet20_lam2", "conf/tuned/femnist_lam2.yaml",
                   "conf/tuned/femnist_constant.yaml", "conf/tuned/cifar10_lam2.yaml"):
        assert f" {source} " in f" {sources} ", f"no README table is marked with {source}"


@pytest.mark.parametrize("index", range(len(MARKERS)), ids=[shlex.split(c)[3] if shlex.split(c)[3] != "--tuning"
                                                           else shlex.split(c)[4] for c, _ in MARKERS])
def test_a_marked_readme_table_equals_what_the_report_prints(
    index: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    command, table = MARKERS[index]
    monkeypatch.chdir(ROOT)
    printed = run_marker(command, capsys)
    assert table_differences(table, printed) == []


def _copy_runs(src: Path, dst: Path) -> None:
    """The committed files of a results folder: each run's config.yaml and metrics.csv."""
    for path in src.rglob("*"):
        if path.name in ("config.yaml", "metrics.csv") and ".hydra" not in path.parts and "report" not in path.parts:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _edit_accuracy(metrics: Path, round_: int, delta: float) -> None:
    lines = metrics.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("accuracy")
    for i, line in enumerate(lines[1:], start=1):
        cells = line.split(",")
        if int(cells[0]) == round_:
            cells[col] = repr(float(cells[col]) + delta)
            lines[i] = ",".join(cells)
            break
    else:
        raise AssertionError(f"no round {round_} in {metrics}")
    metrics.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("source", "run", "round_", "column"),
    [
        ("results/main_job", "0_distreal_seed0", 20, "@20"),
        ("results/tune/cifar10_resnet20_lam2", "heterofl/lr0.2_seed0", 3, "HeteroFL"),
    ],
)
def test_the_check_fails_when_a_committed_csv_changes(
    source: str, run: str, round_: int, column: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    command, table = next((c, t) for c, t in MARKERS if f" {source} " in f" {c} ")
    copy = tmp_path / "copy"
    _copy_runs(ROOT / source, copy)
    monkeypatch.chdir(ROOT)
    assert table_differences(table, run_marker(command.replace(f" {source} ", f" {copy} "), capsys)) == []
    _edit_accuracy(copy / run / "metrics.csv", round_, -0.03)
    differences = table_differences(table, run_marker(command.replace(f" {source} ", f" {copy} "), capsys))
    assert differences, "a changed metrics.csv left the README table unchanged"
    assert all(repr(column) in d for d in differences), differences


def test_a_changed_cell_is_named() -> None:
    table = "| method | acc |\n|---|---|\n| a | 1.0 |"
    assert table_differences(table, "| method | acc |\n|---|---|\n| a | 1.0 |") == []
    assert table_differences(table, "| method |  acc |\n|---|---|\n|   a | 1.0|") == []
    assert table_differences(table, "| method | acc |\n|---|---|\n| a | 1.1 |") == [
        "row 2 (a), column 'acc': README '1.0', report '1.1'"
    ]
    assert table_differences(table, "| method | acc |\n|---|---|\n| a | 1.0 |\n| b | 2.0 |")
    # bold: ignored against a results table, compared against an lr-grid table (which prints it)
    assert table_differences("| x |\n|---|\n| **1** |", "| x |\n|---|\n| 1 |") == []
    assert table_differences("| x |\n|---|\n| 1 |", "| x |\n|---|\n| **1** |")


def test_column_and_method_specs() -> None:
    c = parse_column("reach@0.7:bare=rounds to 70 %")
    assert (c.kind, c.arg, c.variant, c.header) == ("reach", "0.7", "bare", "rounds to 70 %")
    assert parse_column("lr").align == "---:"
    assert parse_column("acc@5").header == "acc @5"
    for bad in ("accuracy@5", "acc", "acc@0", "reach@1.5", "lr@3", "acc@5:bare", "accmean@5-2"):
        with pytest.raises(ReportError):
            parse_column(bad)
    assert parse_method("Small NN -> small network") == ("Small NN", "small network")
    assert parse_method("DISTREAL precision=fp32 -> fp32") == ("DISTREAL precision=fp32", "fp32")
    assert parse_method("HeteroFL") == ("HeteroFL", "HeteroFL")
    with pytest.raises(ReportError):
        parse_method(" -> x")


def test_metric_columns_total_max_and_run_means() -> None:
    """``total@``, ``max@`` and ``runmean@`` read any metrics.csv column, computed here by hand."""
    import csv

    for good, header in (("runmean@update_norm/1-10", "update_norm, rounds 1-10"), ("total@refused", "refused (all runs)"),
                         ("max@update_norm", "largest update_norm")):
        assert parse_column(good).header == header
    for bad in ("runmean@update_norm", "runmean@update_norm/5-2", "total", "max@Bad-Name", "total@x:mean"):
        with pytest.raises(ReportError):
            parse_column(bad)
    folder = ROOT / "results" / "main_job"
    runs = sorted(folder.glob("*_distreal_paper_seed*"))
    assert len(runs) == 3, runs
    rows = [list(csv.DictReader((r / "metrics.csv").open())) for r in runs]
    total = sum(float(row["stragglers"]) for run in rows for row in run)
    largest = max(float(row["update_norm"]) for run in rows for row in run)
    means = [sum(float(row["update_norm"]) for row in run[:5]) / 5 for run in rows]
    mean = sum(means) / 3
    sd = (sum((m - mean) ** 2 for m in means) / 2) ** 0.5
    table = tables.results_table([folder], ["method", "total@stragglers", "max@update_norm", "runmean@update_norm/1-5"],
                                 ["DISTREAL (paper)"])
    assert table.splitlines()[-1] == f"| DISTREAL (paper) | {total:.0f} | {largest:.2f} | {mean:.2f} ± {sd:.2f} |"
    assert total > 0  # the paper's DISTREAL has stragglers: the sum is not trivially 0
    with pytest.raises(ReportError, match="no_such_column"):
        tables.results_table([folder], ["method", "total@no_such_column"], ["DISTREAL (paper)"])


def test_a_marker_without_a_table_is_refused() -> None:
    with pytest.raises(ReportError, match="not followed by a table"):
        split_markers("<!-- table: python -m flwr_distreal.report x -->\n\ntext\n")
    text = "a\n<!-- table: python -m flwr_distreal.report\n   x --markdown lr -->\n| a |\n|---|\n| 1 |\nb"
    found = split_markers(text)
    assert found == [("python -m flwr_distreal.report x --markdown lr", "| a |\n|---|\n| 1 |")]


def test_the_tuning_table_rounds_a_half_up_and_bolds_the_chosen_lr(tmp_path: Path) -> None:
    tuned = tmp_path / "t.yaml"
    tuned.write_text("setting: t\nstrategies:\n  a:\n    lr: 0.2\n    grid: [0.1, 0.2]\n    scores: [0.1495, 0.5315]\n")
    assert tuning_table(tuned) == "| lr | a |\n|---:|---:|\n| 0.1 | 0.150 |\n| 0.2 | **0.532** |"
    with pytest.raises(ReportError, match="--last-k"):
        tuning_table(tmp_path)
    with pytest.raises(ReportError, match="no such entry"):
        tuning_table(tuned, ["b"])


def test_markdown_refuses_a_group_that_does_not_exist(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    code = report.main(["results/main_job", "--markdown", "method", "--method", "Nonesuch"])
    assert code == 2
    assert "no such group" in capsys.readouterr().err


def test_the_tables_score_and_choose_as_the_tuner_does() -> None:
    rows = [{"round": t, "accuracy": a} for t, a in enumerate([0.1, 0.3, 0.2, 0.5], start=1)]
    for k in (1, 2, 3, 10):
        assert tables.score_rows(rows, k) == tune.score_rows(rows, k)
    nan = float("nan")
    assert math.isnan(tables.score_rows([{"round": 1, "accuracy": nan}], 2))
    for lrs, scores in (([0.1, 0.2, 0.4], [0.3, 0.5, 0.5]), ([0.1, 0.2], [nan, 0.1]), ([0.1], [nan])):
        assert tables.choose_lr(lrs, scores) == tune.choose_lr(lrs, scores)


def test_update_readme_tables_rewrites_a_stale_table_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/update_readme_tables.py: the README as committed comes back byte for byte; a table
    with a changed cell is rewritten from its command, and only that table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme_tables", ROOT / "scripts" / "update_readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(ROOT)
    text = README.read_text(encoding="utf-8")
    same, changed = module.update(text)
    assert same == text and changed == []
    command, table = next((c, t) for c, t in MARKERS if "results/main_job" in c)
    row = table.splitlines()[2]
    stale_row = row.replace(row.split("|")[2], " 0.0 ± 0.0 ", 1)
    assert stale_row != row
    stale = text.replace(row, stale_row, 1)
    fixed, changed = module.update(stale)
    assert changed == [command]
    assert fixed == text
