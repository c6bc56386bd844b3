"""The NSGA-II driver of the design-time DSE (paper, "Design-Time DSE", Fig. 3 and Fig. 4).

:func:`run_dse` evolves a population of per-layer dropout vectors with pygmo's NSGA-II, one
generation at a time, and writes

* ``checkpoint.json`` after every generation (atomically): decision vectors and objectives
  of the population, the generation index, the random-stream state, the normalisation, the
  per-generation history and the whole evaluation cache;
* at the end: the LUT (``lut.json``, :class:`flwr_distreal.core.lut.LUT`) with about ``lut_size``
  vectors spread evenly along the non-dominated front of *all* evaluated vectors (always
  including the all-zero vector), ``evaluations.json`` (every vector with MACs, accuracy gain
  per seed, mean, normalised objectives, generation), ``summary.json`` (hypervolumes of the
  DSE front and of the equal-rate vectors) and ``front.png`` (Fig. 4 style).

Reproducibility: the initial population comes from ``SeedSequence([seed, 0])`` and
generation ``g`` runs ``nsga2(gen=1, seed=derive(seed, g))`` on a population rebuilt from the
stored decision vectors and objectives. An uninterrupted run takes exactly the same path as
one resumed from any checkpoint, so both end with the same front, bit for bit.

No Flower or Hydra imports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pygmo as pg

from ..core.dropout import DropoutModel
from ..core.lut import LUT
from .evaluator import CachedEvaluator, EvalRecord
from .front import best_gain_at_budget, hypervolume, non_dominated, spread_evenly
from .plot import plot_fronts
from .problem import MAX_RATE, DropoutProblem, DSEError, Normaliser, SharedEvaluator, vector_key
from .settings import DSESettings, is_int

__all__ = ["DSESettings", "DSEResult", "run_dse", "CHECKPOINT_NAME", "nsga2_seed"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.json"
CHECKPOINT_FORMAT = "flwr-distreal-dse-checkpoint/1"


def nsga2_seed(seed: int, generation: int) -> int:
    """Seed of generation ``generation``'s ``nsga2`` instance (32 bits, pagmo's seed type)."""
    return int(np.random.SeedSequence([int(seed), 1, int(generation)]).generate_state(1, dtype=np.uint32)[0])


@dataclass
class DSEResult:
    """What :func:`run_dse` produced.

    Attributes
    ----------
    lut : LUT
        The written LUT.
    front_vectors : np.ndarray
        All non-dominated vectors of the DSE, sorted by MACs.
    front_objectives : np.ndarray
        Their normalised objectives.
    population_x, population_f : np.ndarray
        The final population.
    hypervolume_dse, hypervolume_uniform : float
        Hypervolumes of the DSE front and of the equal-rate vectors (same reference point).
    better_at_matched_macs : float
        Fraction of the equal-rate vectors (between the extremes) for which the DSE front offers
        a strictly higher accuracy gain within the same MACs.
    generations_done : int
        Last completed generation.
    paths : dict[str, Path]
        Written files.
    evaluator : CachedEvaluator
        The evaluator (cache and counters).
    """

    lut: LUT
    front_vectors: np.ndarray
    front_objectives: np.ndarray
    population_x: np.ndarray
    population_f: np.ndarray
    hypervolume_dse: float
    hypervolume_uniform: float
    better_at_matched_macs: float
    generations_done: int
    paths: dict[str, Path] = field(default_factory=dict)
    evaluator: CachedEvaluator | None = None


# -- checkpoint I/O -----------------------------------------------------------------------------
def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _initial_population(n_layers: int, settings: DSESettings) -> np.ndarray:
    """All-0, all-0.5, then ``population - 2`` uniform random vectors (paper, Fig. 4)."""
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 0]))
    random = rng.uniform(0.0, MAX_RATE, size=(settings.population - 2, n_layers))
    return np.vstack([np.zeros((1, n_layers)), np.full((1, n_layers), MAX_RATE), random])


class _Progress:
    """Per-generation progress: a rich progress bar when available, always a log line."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total = total
        self._bar = None
        self._task = None
        if enabled and total > start:
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            except ImportError:  # rich is a dependency, but progress is optional
                return
            self._bar = Progress(
                TextColumn("[bold]DSE[/bold] gen {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("dse", total=total, completed=start, info="")

    def update(self, generation: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=generation, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# -- the driver -----------------------------------------------------------------------------
def run_dse(
    evaluator: CachedEvaluator,
    model: DropoutModel,
    settings: DSESettings,
    output: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    extra_meta: dict[str, Any] | None = None,
    on_generation: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> DSEResult | None:
    """Run (or resume) the NSGA-II DSE and write the LUT and reports.

    Parameters
    ----------
    evaluator : CachedEvaluator
        Measures vectors (its backend fixes the model's layer count and the fitness).
    model : DropoutModel
        The model the LUT is for (layer names, exact MACs).
    settings : DSESettings
        Search settings.
    output : str or Path
        Output directory (created).
    resume : bool
        Continue from ``output/checkpoint.json`` if present (refused if it was written with
        other search or fitness settings). Without ``resume`` an existing checkpoint is refused
        so that no run is overwritten by accident.
    progress : bool
        Show a rich progress bar (a log line per generation is always written).
    stop_after : int, optional
        Stop after this generation has been checkpointed, without writing the final outputs
        (simulates an interruption; returns ``None``).
    extra_meta : dict, optional
        Provenance stored in the LUT's ``meta`` and in ``summary.json``.
    on_generation : callable, optional
        ``on_generation(g, X, F)`` after each generation's checkpoint (e.g. for tests).

    Returns
    -------
    DSEResult or None
        ``None`` when stopped by ``stop_after``.

    Raises
    ------
    DSEError
        For invalid settings, a checkpoint that does not match, or a degenerate fitness.
    """
    backend = evaluator.backend
    n_layers = int(backend.n_layers)
    if model.num_dropout_layers != n_layers:
        raise DSEError(
            f"model has {model.num_dropout_layers} dropout layers, the fitness {n_layers}"
        )
    if stop_after is not None and (not is_int(stop_after) or stop_after < 0):
        raise DSEError(f"stop_after must be a non-negative integer, got {stop_after!r}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    fingerprint = {
        "model": getattr(model, "model_name", "") or type(model).__name__,
        "layers": list(model.dropout_layer_names),
        "search": settings.search_fingerprint(),
        "fitness": evaluator.fingerprint(),
    }
    # JSON round trip so that tuples/lists compare equal to a loaded checkpoint.
    fingerprint = json.loads(json.dumps(fingerprint))

    history: list[dict[str, Any]] = []
    if ckpt_path.exists() and not resume:
        raise DSEError(
            f"{ckpt_path} exists; pass resume=true to continue that run or choose another output directory"
        )
    if resume and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, fingerprint)
        evaluator.load_state_dict(state["evaluator"])
        normaliser = Normaliser(**state["normaliser"])
        X = np.asarray(state["population"]["x"], dtype=np.float64)
        F = np.asarray(state["population"]["f"], dtype=np.float64)
        gen_done = int(state["generation"])
        history = state["history"]
        log.info("resuming DSE from %s after generation %d (%d vectors cached)", ckpt_path, gen_done, len(evaluator.records))
    else:
        if resume:
            log.info("resume requested but %s does not exist; starting a new DSE", ckpt_path)
        X = _initial_population(n_layers, settings)
        evaluator.generation = 0
        t0 = time.perf_counter()
        records = evaluator.evaluate_records(X)
        normaliser = Normaliser(
            macs_full=float(records[0].macs),
            macs_half=float(records[1].macs),
            dacc_full=records[0].dacc_mean,
            dacc_half=records[1].dacc_mean,
        )
        F = normaliser.normalise([r.macs for r in records], [r.dacc_mean for r in records])
        gen_done = 0
        history = [_history_entry(0, F, settings, evaluator, normaliser, time.perf_counter() - t0)]
        _save_checkpoint(ckpt_path, fingerprint, 0, X, F, normaliser, history, evaluator, settings)
        log.info(
            "DSE generation 0/%d: %d evaluations, %d trainings, hypervolume %.4f",
            settings.generations, len(evaluator.records), evaluator.n_trainings, history[-1]["hypervolume"],
        )
        if stop_after is not None and stop_after <= 0:
            return None

    problem = pg.problem(DropoutProblem(n_layers, SharedEvaluator(evaluator), normaliser))
    bar = _Progress(settings.generations, gen_done, progress)
    times: list[float] = []
    try:
        for g in range(gen_done + 1, settings.generations + 1):
            t0 = time.perf_counter()
            evaluator.generation = g
            pop = pg.population(problem, size=0, seed=nsga2_seed(settings.seed, 0))
            for x, f in zip(X, F):
                pop.push_back(x, f)
            algo = pg.nsga2(gen=1, cr=settings.cr, eta_c=settings.eta_c, m=settings.m,
                            eta_m=settings.eta_m, seed=nsga2_seed(settings.seed, g))
            algo.set_bfe(pg.bfe())
            pop = pg.algorithm(algo).evolve(pop)
            X, F = np.array(pop.get_x(), dtype=np.float64), np.array(pop.get_f(), dtype=np.float64)
            dt = time.perf_counter() - t0
            times.append(dt)
            history.append(_history_entry(g, F, settings, evaluator, normaliser, dt))
            _save_checkpoint(ckpt_path, fingerprint, g, X, F, normaliser, history, evaluator, settings)
            eta = (settings.generations - g) * float(np.mean(times))
            info = (
                f"evals {len(evaluator.records)} trainings {evaluator.n_trainings} "
                f"hv {history[-1]['hypervolume']:.4f}"
            )
            bar.update(g, info)
            log.info(
                "DSE generation %d/%d: %d evaluations, %d trainings, hypervolume %.4f, %.1f s, ETA %.0f s",
                g, settings.generations, len(evaluator.records), evaluator.n_trainings,
                history[-1]["hypervolume"], dt, eta,
            )
            if on_generation is not None:
                on_generation(g, X, F)
            if stop_after is not None and g >= stop_after:
                return None
            gen_done = g
    finally:
        bar.close()
    gen_done = max(gen_done, int(history[-1]["generation"]))
    return _finish(evaluator, model, settings, out, normaliser, X, F, gen_done, history, extra_meta)


def _history_entry(
    generation: int,
    F: np.ndarray,
    settings: DSESettings,
    evaluator: CachedEvaluator,
    normaliser: Normaliser,
    seconds: float,
) -> dict[str, Any]:
    recs = [r for r in evaluator.records.values() if r.generation >= 0]
    archive = normaliser.normalise([r.macs for r in recs], [r.dacc_mean for r in recs])
    return {
        "generation": int(generation),
        "population_f": F.tolist(),
        "hypervolume": hypervolume(archive, settings.reference),
        "hypervolume_population": hypervolume(F, settings.reference),
        "evaluations": len(evaluator.records),
        "trainings": int(evaluator.n_trainings),
        "seconds": float(seconds),
    }


def _save_checkpoint(
    path: Path,
    fingerprint: dict[str, Any],
    generation: int,
    X: np.ndarray,
    F: np.ndarray,
    normaliser: Normaliser,
    history: list[dict[str, Any]],
    evaluator: CachedEvaluator,
    settings: DSESettings,
) -> None:
    _atomic_write_json(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "generation": int(generation),
            "rng": {
                "scheme": "initial population: SeedSequence([seed, 0]); generation g: "
                "nsga2(seed=SeedSequence([seed, 1, g]).generate_state(1)[0])",
                "seed": settings.seed,
                "next_generation": int(generation) + 1,
                "next_nsga2_seed": nsga2_seed(settings.seed, generation + 1),
            },
            "population": {"x": X.tolist(), "f": F.tolist()},
            "normaliser": normaliser.to_dict(),
            "history": history,
            "evaluator": evaluator.state_dict(),
        },
    )


def _load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DSEError(f"cannot read DSE checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DSEError(f"{path} is not a DSE checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    old = state.get("fingerprint", {})
    if old != fingerprint:
        diffs = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        detail = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {fingerprint.get(k)!r}" for k in diffs)
        raise DSEError(f"checkpoint {path} was written with other settings ({detail}); use another output directory")
    return state


# -- final outputs ------------------------------------------------------------------------------
def _representatives(records: list[EvalRecord], F: np.ndarray) -> tuple[list[EvalRecord], np.ndarray]:
    """One record per distinct objective point; the all-zero vector represents its point."""
    seen: dict[bytes, int] = {}
    reps: list[EvalRecord] = []
    rows: list[np.ndarray] = []
    for rec, f in zip(records, F):
        key = f.tobytes()
        if key in seen:
            if not rec.vector.any():  # the exact all-zero vector wins its point
                reps[seen[key]] = rec
            continue
        seen[key] = len(reps)
        reps.append(rec)
        rows.append(f)
    return reps, np.array(rows, dtype=np.float64).reshape(-1, 2)


def _finish(
    evaluator: CachedEvaluator,
    model: DropoutModel,
    settings: DSESettings,
    out: Path,
    normaliser: Normaliser,
    X: np.ndarray,
    F: np.ndarray,
    gen_done: int,
    history: list[dict[str, Any]],
    extra_meta: dict[str, Any] | None,
) -> DSEResult:
    n_layers = int(evaluator.backend.n_layers)
    dse_records = [r for r in evaluator.records.values() if r.generation >= 0]
    all_f = normaliser.normalise([r.macs for r in dse_records], [r.dacc_mean for r in dse_records])
    reps, rep_f = _representatives(dse_records, all_f)
    front_idx = non_dominated(rep_f)
    zero_key = vector_key(np.zeros(n_layers))
    zero_rec = evaluator.records[zero_key]
    zero_f = normaliser.normalise(zero_rec.macs, zero_rec.dacc_mean)
    front_recs = [reps[i] for i in front_idx]
    front_f = rep_f[front_idx]
    if not any(not r.vector.any() for r in front_recs):
        # A vector that trains better than no dropout with fewer MACs dominates the all-zero
        # vector; the LUT still needs the full model for devices that can afford it.
        log.info("the all-zero vector is dominated; adding it to the LUT anyway")
        order = np.argsort(np.append(front_f[:, 0], zero_f[0]), kind="stable")
        front_recs = [(front_recs + [zero_rec])[i] for i in order]
        front_f = np.vstack([front_f, zero_f])[order]
    if len(front_recs) < settings.lut_size:
        # Few layers (FEMNIST CNN: 2) allow few distinct kept-count pairs on the front.
        log.info("the front has %d vectors, fewer than lut_size %d: the LUT takes all of them",
                 len(front_recs), settings.lut_size)
    pick = spread_evenly(front_f, settings.lut_size)
    lut_recs = [front_recs[i] for i in pick]
    lut_f = front_f[pick]
    if not any(not r.vector.any() for r in lut_recs):  # defensive: both ends are always picked
        raise DSEError("internal error: the all-zero vector was not selected for the LUT")

    # Equal-rate reference vectors, evaluated with the same fitness (after the front is fixed,
    # so they never enter the DSE's front).
    evaluator.generation = -1
    uni_vectors = np.array([np.full(n_layers, r) for r in settings.uniform_rates], dtype=np.float64)
    uni_records = evaluator.evaluate_records(uni_vectors) if len(uni_vectors) else []
    uni_f = normaliser.normalise([r.macs for r in uni_records], [r.dacc_mean for r in uni_records]).reshape(-1, 2)
    hv_dse = hypervolume(front_f, settings.reference)
    hv_uni = hypervolume(uni_f, settings.reference) if len(uni_records) else 0.0
    # At matched MACs: does the front offer a higher gain within each uniform vector's MACs?
    inner = [r for r in uni_records if 0.0 < float(r.vector[0]) < MAX_RATE]
    if inner:
        best = best_gain_at_budget(
            np.array([r.macs for r in front_recs]), np.array([r.dacc_mean for r in front_recs]),
            np.array([r.macs for r in inner]),
        )
        wins = [b > r.dacc_mean for b, r in zip(best, inner)]
        better = float(np.mean(wins))
    else:
        wins, better = [], float("nan")

    meta = {
        "kind": "dse",
        "generations": gen_done,
        "settings": asdict(settings),
        "fitness": evaluator.fingerprint(),
        "normaliser": normaliser.to_dict(),
        "dacc_mean": [r.dacc_mean for r in lut_recs],
        "objectives": lut_f.tolist(),
        **(extra_meta or {}),
    }
    lut = LUT.from_vectors(model, [r.vector for r in lut_recs], meta=meta)
    paths = {"lut": lut.save(out / "lut.json")}

    evaluations = {
        "model": getattr(model, "model_name", ""),
        "layers": list(model.dropout_layer_names),
        "normaliser": normaliser.to_dict(),
        "reference": list(settings.reference),
        "fitness": evaluator.fingerprint(),
        "counters": evaluator.state_dict()["counters"],
        "evaluations": [
            {
                **rec.to_dict(),
                "objectives": [float(v) for v in normaliser.normalise(rec.macs, rec.dacc_mean)],
                "source": "uniform" if rec.generation < 0 else "dse",
            }
            for rec in evaluator.records.values()
        ],
    }
    paths["evaluations"] = out / "evaluations.json"
    _atomic_write_json(paths["evaluations"], evaluations)

    summary = {
        "generations": gen_done,
        "population": settings.population,
        "evaluated_vectors_dse": len(dse_records),
        "distinct_trainings": len(evaluator.trainings),
        "short_trainings_run": evaluator.n_trainings,
        "front_size": len(front_recs),
        "lut_size": len(lut),
        "reference": list(settings.reference),
        "hypervolume_dse": hv_dse,
        "hypervolume_uniform": hv_uni,
        "uniform": [
            {"rate": float(r.vector[0]), "macs": r.macs, "dacc_mean": r.dacc_mean, "objectives": f.tolist()}
            for r, f in zip(uni_records, uni_f)
        ],
        "dse_better_at_matched_macs": better,
        "dse_better_at_matched_macs_per_rate": [
            {"rate": float(r.vector[0]), "dse_better": bool(w)} for r, w in zip(inner, wins)
        ],
        "hypervolume_per_generation": [h["hypervolume"] for h in history],
        "seconds_per_generation": [h["seconds"] for h in history],
        **(extra_meta or {}),
    }
    paths["summary"] = out / "summary.json"
    _atomic_write_json(paths["summary"], summary)
    try:  # plot_fronts imports matplotlib when called
        paths["plot"] = plot_fronts(history, front_f, uni_f, settings, out / "front.png",
                                    title=f"{evaluations['model']}: DSE front vs equal rates")
    except ImportError as err:  # matplotlib is a dependency; a broken install only loses the plot
        log.warning("front plot skipped: %s", err)
    log.info(
        "DSE done: %d generations, %d vectors, front %d, LUT %d; hypervolume DSE %.4f vs uniform %.4f",
        gen_done, len(dse_records), len(front_recs), len(lut), hv_dse, hv_uni,
    )
    return DSEResult(
        lut=lut,
        front_vectors=np.array([r.vector for r in front_recs]),
        front_objectives=front_f,
        population_x=X,
        population_f=F,
        hypervolume_dse=hv_dse,
        hypervolume_uniform=hv_uni,
        better_at_matched_macs=better,
        generations_done=gen_done,
        paths=paths,
        evaluator=evaluator,
    )
