"""A sweep's runs: reading run folders, grouping them by method and setting, the maths over seeds.

Shared by the report (:mod:`flwr_distreal.cli.report`, which re-exports every public name here)
and the README tables (:mod:`flwr_distreal.cli.tables`). The maths (:func:`mean_sd`,
:func:`band`, :func:`first_round_reaching`, :func:`value_at_round`) are pure functions of
metrics rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import MethodView, get_method, list_methods
from ..run.plotting import read_metrics

__all__ = [
    "METHOD_NAMES",
    "Group",
    "ReportError",
    "Run",
    "Stat",
    "band",
    "first_round_reaching",
    "last_k_score",
    "group_runs",
    "load_sweep",
    "mean_sd",
    "method_label",
    "setting_label",
    "value_at_round",
]

log = logging.getLogger(__name__)

#: The methods' labels, from the registry (Fig. 5b's names for the paper's comparison).
METHOD_NAMES: Mapping[str, str] = MethodView("label")
#: Fig. 5b's order (full, small, DISTREAL, Diao 2021, Caldas 2018); other methods follow in
#: registration order.
_METHOD_ORDER = ("full", "small", "distreal", "heterofl", "feddropout")
_DATASET_ORDER = ("femnist", "cifar10", "cifar100")
_RESOURCE_ORDER = ("full", "constant", "timevarying", "trace", "measured")
#: Keys that differ between the runs of one group by design: not reasons to split it.
_IGNORED_KEYS = ("seed", "output_dir", "resume")


class ReportError(ValueError):
    """The sweep directory holds nothing to report, or an option is out of range."""


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of ``n`` finite values (``sd`` NaN when ``n < 2``)."""

    mean: float
    sd: float
    n: int


@dataclass
class Run:
    """One job of the sweep: where it is, its flattened config and its metrics rows."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, float]]

    @property
    def planned_rounds(self) -> int:
        """The ``rounds`` the run was configured for (its last row's round when unknown)."""
        rounds = self.config.get("rounds")
        return int(rounds) if rounds is not None else self.last_round

    @property
    def last_round(self) -> int:
        """The last round it recorded (0 when none)."""
        return int(self.rows[-1]["round"]) if self.rows else 0

    @property
    def stopped_early(self) -> bool:
        """Whether it recorded fewer rounds than configured."""
        return self.last_round < self.planned_rounds


@dataclass
class Group:
    """The runs (seeds) of one method in one setting."""

    method: str
    setting: str
    runs: list[Run] = field(default_factory=list)
    sort_key: tuple = ()

    @property
    def planned_rounds(self) -> int:
        """The most rounds any run of the group was configured for."""
        return max(r.planned_rounds for r in self.runs)

    @property
    def stopped(self) -> list[Run]:
        """The runs that stopped before :attr:`planned_rounds`."""
        return [r for r in self.runs if r.last_round < self.planned_rounds]


# ----------------------------------------------------------------------------------------------
# The maths: pure functions of values and metrics rows


def mean_sd(values: Iterable[float | None]) -> Stat:
    """Mean and sample standard deviation (ddof = 1) of the finite values.

    Parameters
    ----------
    values : iterable of float or None
        One value per seed; ``None`` and NaN are left out (and not counted in ``n``).

    Returns
    -------
    Stat
        ``mean`` NaN when no value is finite; ``sd`` NaN with fewer than two values.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Stat(mean, sd, n)


#: The columns a round the server did not evaluate leaves empty (``evaluate_every``).
EVALUATION_KEYS = ("accuracy", "loss")


def _cell(row: Mapping[str, Any], key: str) -> float | None:
    """A row's ``key`` as a float; None for an empty cell (missing, None, ``""``, NaN: a round the
    server did not evaluate, ``evaluate_every``, reads as any of these) or a non-number."""
    value = row.get(key)
    if value is None or value == "":
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if not math.isnan(value) else None


def value_at_round(rows: Sequence[Mapping[str, float]], round_: int, key: str = "accuracy") -> float | None:
    """The ``key`` of the row of round ``round_``; ``None`` when the run has no such row.

    For an evaluation column (accuracy, loss) at a round the server did not evaluate
    (``evaluate_every`` = k: it evaluates rounds k, 2k, ... and the last), the value of the last
    evaluated round at or before ``round_``: the global model's most recent score as of that
    round (``None`` when no round up to it was evaluated). With the default k = 1 every round is
    evaluated and this is the round's own value.
    """
    ordered = sorted(rows, key=lambda r: int(r["round"]))
    if not any(int(r["round"]) == round_ for r in ordered):
        return None
    if key not in EVALUATION_KEYS:
        row = next(r for r in ordered if int(r["round"]) == round_)
        value = row.get(key)
        return None if value is None else float(value)
    scored = [v for v in (_cell(r, key) for r in ordered if int(r["round"]) <= round_) if v is not None]
    return scored[-1] if scored else None


def first_round_reaching(rows: Sequence[Mapping[str, float]], target: float, key: str = "accuracy") -> int | None:
    """The first round whose ``key`` is at least ``target``; ``None`` when no round reached it.
    Over the rounds with a value only: with ``evaluate_every`` = k the first *evaluated* round at
    the target (the model may have reached it up to k - 1 rounds earlier)."""
    for row in sorted(rows, key=lambda r: r["round"]):
        value = _cell(row, key)
        if value is not None and math.isfinite(value) and value >= target:
            return int(row["round"])
    return None


def last_k_score(rows: Sequence[Mapping[str, Any]], last_k: int) -> float:
    """A tuning run's score: its mean accuracy over its last ``last_k`` rounds (all if fewer),
    over the rounds among them the server evaluated (``evaluate_every``, an accuracy of None or
    ``""``; the last round always is); NaN without rows, without an evaluated round among them, or
    with a non-finite accuracy (a failed run)."""
    tail = list(rows)[-int(last_k):]
    scored = [float(r["accuracy"]) for r in tail if r.get("accuracy") not in (None, "")]  # None, "": not evaluated
    if not scored or not all(math.isfinite(v) for v in scored):
        return float("nan")
    return sum(scored) / len(scored)


def band(runs: Sequence[Sequence[Mapping[str, float]]], key: str = "accuracy") -> tuple[list[int], list[float], list[float]]:
    """Mean and s.d. over runs, per round, on the rounds that *every* run recorded (a value for
    ``key``: rounds the server did not evaluate, ``evaluate_every``, are skipped).

    A run that stopped early shortens the band to its rounds: curves of unequal lengths are
    never averaged into one line.

    Parameters
    ----------
    runs : sequence of metrics rows
        One list of rows per seed.
    key : str
        The column.

    Returns
    -------
    rounds, mean, sd : lists
        ``sd`` is NaN for a single run.
    """
    if not runs:
        return [], [], []
    # rounds without a value (evaluate_every: not evaluated) are left out: the curve joins the others
    per_run = [{int(r["round"]): v for r in rows if (v := _cell(r, key)) is not None} for rows in runs]
    common = sorted(set.intersection(*(set(d) for d in per_run)))
    stats = [mean_sd(d[t] for d in per_run) for t in common]
    return common, [s.mean for s in stats], [s.sd for s in stats]


# ----------------------------------------------------------------------------------------------
# Reading and grouping a sweep


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _load_config(job: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for candidate in (job / "config.yaml", job / ".hydra" / "config.yaml"):
        if candidate.is_file():
            data = OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)
            return _flatten(data)  # type: ignore[arg-type]
    raise FileNotFoundError(f"no config.yaml in {job}")


def load_sweep(sweep_dir: str | Path) -> tuple[list[Run], list[str]]:
    """Every job directory under ``sweep_dir`` (any depth) holding a ``metrics.csv``.

    Parameters
    ----------
    sweep_dir : path
        A Hydra multirun directory, or any folder of run directories.

    Returns
    -------
    runs : list of Run
        In directory order.
    skipped : list of str
        ``"<job>: <reason>"`` for each job directory that could not be read (no config, a
        broken metrics file) or that has a config but no ``metrics.csv`` (failed before round 1).

    Raises
    ------
    ReportError
        If ``sweep_dir`` is not a directory or holds no readable run.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReportError(f"no sweep directory at {root}")
    runs: list[Run] = []
    skipped: list[str] = []
    report_dir = root / "report"
    for metrics in sorted(root.rglob("metrics.csv")):
        job = metrics.parent
        if report_dir in job.parents or job == report_dir:
            continue
        try:
            runs.append(Run(job, _load_config(job), read_metrics(metrics)))
        except (OSError, ValueError) as err:
            skipped.append(f"{job.relative_to(root)}: {err}")
    for job in sorted(p for p in root.iterdir() if p.is_dir() and p != report_dir):
        is_job = any((job / name).exists() for name in ("config.yaml", ".hydra", "main.log"))
        if is_job and not (job / "metrics.csv").exists():
            skipped.append(f"{job.name}: no metrics.csv (the job failed before its first round; see its main.log)")
    if not runs:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise ReportError(f"no job directory with a readable metrics.csv and config.yaml under {root}{detail}")
    return runs, skipped


def method_label(strategy: str, lut: str | None = None) -> str:
    """The method's name as in the paper; DISTREAL's names its LUT.

    ``lut`` ``None``, ``""`` or ``"uniform"``: the uniform LUT (equal rates in every layer);
    ``"learned"``: the DSE's LUT ("DISTREAL"); a file: "DISTREAL (LUT <folder>/<file>)".
    """
    base = METHOD_NAMES.get(strategy, strategy)
    if strategy not in METHOD_NAMES or not get_method(strategy).uses_lut:
        return base
    name = Path(str(lut)).name if lut else "uniform"
    if name == "learned":
        return base
    if name == "uniform":
        what = "uniform LUT"
    else:
        path = Path(str(lut))
        what = f"LUT {path.parent.name}/{path.name}" if path.parent.name else f"LUT {path.name}"
    if base.endswith(")"):  # "DISTREAL (paper)" -> "DISTREAL (paper, uniform LUT)"
        return f"{base[:-1]}, {what})"
    return f"{base} ({what})"


def setting_label(config: Mapping[str, Any]) -> str:
    """The setting of a run: its dataset and resources (``"femnist, constant"``, ``"cifar10, λ=2"``)."""
    dataset = config.get("dataset.name", "?")
    kind = config.get("resources.kind", "?")
    if kind == "timevarying":
        resources = f"λ={float(config.get('resources.lam', math.nan)):g}"
    elif kind == "trace":
        resources = f"trace {Path(str(config.get('resources.trace_path'))).name}"
    else:
        resources = str(kind)
    return f"{dataset}, {resources}"


def _setting_key(config: Mapping[str, Any]) -> tuple:
    dataset = config.get("dataset.name", "")
    kind = config.get("resources.kind", "")
    lam = float(config.get("resources.lam", 0.0)) if kind == "timevarying" else 0.0
    d = _DATASET_ORDER.index(dataset) if dataset in _DATASET_ORDER else len(_DATASET_ORDER)
    k = _RESOURCE_ORDER.index(kind) if kind in _RESOURCE_ORDER else len(_RESOURCE_ORDER)
    return (d, str(dataset), k, lam)


def _method_key(config: Mapping[str, Any], label: str) -> tuple:
    strategy = config.get("strategy.name", "")
    order = [*_METHOD_ORDER, *(m for m in list_methods() if m not in _METHOD_ORDER)]
    s = order.index(strategy) if strategy in order else len(order)
    return (s, "uniform" in label, label)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by method and setting over seeds, in the paper's order.

    Runs of one method and setting whose configs differ in a key other than ``seed`` (and the
    output directory) are split, the differing keys appended to the method's label
    (``"DISTREAL lr=0.05"``), so nothing unlike is averaged.
    """
    first: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        method = method_label(run.config.get("strategy.name", "?"), run.config.get("lut"))
        first.setdefault((method, setting_label(run.config)), []).append(run)
    groups: list[Group] = []
    for (method, setting), members in first.items():
        keys = sorted({k for r in members for k in r.config} - set(_IGNORED_KEYS))
        varying = [k for k in keys if len({repr(r.config.get(k)) for r in members}) > 1]
        split: dict[tuple, list[Run]] = {}
        for run in members:
            split.setdefault(tuple(run.config.get(k) for k in varying), []).append(run)
        for values, sub in split.items():
            label = " ".join([method, *(f"{k}={v}" for k, v in zip(varying, values))])
            key = (_setting_key(sub[0].config), _method_key(sub[0].config, method), label)
            groups.append(Group(label, setting, sorted(sub, key=lambda r: r.config.get("seed", 0)), key))
    for g in groups:
        seeds = [r.config.get("seed") for r in g.runs]
        if len(set(seeds)) < len(seeds):
            log.warning("%s, %s: the same seed appears more than once (%s)", g.method, g.setting, seeds)
    return sorted(groups, key=lambda g: g.sort_key)
