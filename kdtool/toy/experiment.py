"""kdtool toy's work (paper section 4, Experiment 1): sweep the grid into toy.parquet and summarise it.

`run_experiment` drives one sweep: the part store (kdtool.toy.store) decides what is already done
(--resume) or discards an earlier run's parts, the pending configurations are trained
(kdtool.toy.sweep.run_sweep), the floor compared with Eq. 2 is picked (--measure), the
summary computed (kdtool.toy.stats, and kdtool.toy.survival from the per-feature records, whose
`kept` column is set here at --kept-threshold), and the parts merged into the output, its survival
file (and the curves file); with --fit-capacity the capacity file follows (kdtool.toy.kept_capacity).
`check_convergence` trains a sample of the grid at --steps and 2x --steps.

Nothing is printed: what the command says comes back through `notify(level, text)` as it
happens, and progress through `on_progress`, in work units (a configuration's estimated cost,
kdtool.toy.sweep.chunk_cost): the sweep runs the biggest configurations first, so a count-based
ETA would start several times too long.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdtool import formats, locks
from kdtool.errors import BadInput
from kdtool.theory import capacity as capacity_mod
from kdtool.toy.config import Grid, ToyConfigKey, TrainConfig, settings_id, widths_label
from kdtool.toy.kept_capacity import capacity_file
from kdtool.toy.stats import MEASURE_COLUMN, fit_capacity, summarize
from kdtool.toy.store import PartStore, curves_path, parts_dir, survival_path
from kdtool.toy.survival import KEPT_RULE, KEPT_THRESHOLD, check_threshold, kept_mask, summarize_survival
from kdtool.toy.sweep import chunk_cost, convergence_check, default_workers, run_sweep, sample_configs

#: notify(level, text): level is "info" (a progress line) or "warning" (may change how to read the result)
Notify = Callable[[str, str], None]


def _silent(*_args) -> None:
    """The default notify and on_progress: say nothing."""


@dataclass(frozen=True)
class ExperimentConfig:
    """One `kdtool toy` sweep; the flag names are in the comments and the errors."""

    output: Path  # -o: toy.parquet; parts go to <output>.parts/ while the sweep runs
    grid: Grid  # --n, --d-teacher, --alpha, --seeds
    train: TrainConfig  # how every model trains; its curve_points is --curve-points with --log-curves, else 0
    workers: int | None = None  # --workers: worker processes (None: one per core)
    resume: bool = False  # --resume: keep configurations already written with the same settings
    log_curves: bool = False  # --log-curves: also write OUTPUT-stem.curves.parquet
    measure: str = "data"  # --measure: the student loss compared with Eq. 2, against the data or the teacher
    fit_capacity: bool = False  # --fit-capacity: add the capacity fits to the summary and write the capacity file
    kept_threshold: float = KEPT_THRESHOLD  # --kept-threshold: kept iff error / variance of x_i below this
    capacity_out: Path | None = None  # --capacity-out: the capacity file (default OUTPUT-stem.capacity.json)
    capacity_from: str = "kept"  # --capacity-from: the capacity file's law, from kept counts or from the floors

    def __post_init__(self) -> None:
        if self.log_curves and self.train.curve_points < 2:
            raise BadInput(f"--curve-points must be >= 2, got {self.train.curve_points}")
        if self.workers is None:
            object.__setattr__(self, "workers", default_workers())
        if self.workers < 1:
            raise BadInput(f"--workers must be >= 1, got {self.workers}")
        if not formats.is_parquet(self.output):
            raise BadInput(f"{self.output}: the toy table is Parquet; use a .parquet name")
        if self.measure not in MEASURE_COLUMN:
            raise BadInput(f"--measure must be data or distill, got {self.measure!r}")
        check_threshold(self.kept_threshold)
        if self.capacity_from not in ("kept", "floors"):
            raise BadInput(f"--capacity-from must be kept or floors, got {self.capacity_from!r}")
        if self.capacity_out is None and self.fit_capacity:
            stem = self.output.name[: -len(self.output.suffix)] if self.output.suffix else self.output.name
            object.__setattr__(self, "capacity_out", self.output.with_name(stem + ".capacity.json"))

    def settings(self) -> dict[str, Any]:
        """The grid and training settings, as the output's provenance records them."""
        grid = {"n": list(self.grid.ns), "d_teacher": list(self.grid.d_teachers), "alpha": list(self.grid.alphas)}
        grid.update({"seeds": self.grid.seeds, "student_widths": widths_label(self.grid.student_widths)})
        return {"grid": grid, **self.train.to_dict(), "kept_threshold": self.kept_threshold}


@dataclass(frozen=True)
class SweepProgress:
    """Where a sweep stands. Work is in estimated-cost units; models_per_second counts this run only."""

    total: float  # work of every configuration of the grid
    done: float  # work of the configurations finished (resumed ones included)
    configs_done: int
    configs: int
    models_per_second: float | None = None  # None until a configuration of this run finishes


@dataclass
class ExperimentResult:
    """A finished sweep: the summary (`kdtool --json toy` prints it) and the table written to the output."""

    summary: dict[str, Any]
    table: dict[str, np.ndarray]


def run_experiment(
    config: ExperimentConfig,
    provenance: dict,
    *,
    notify: Notify | None = None,
    on_progress: Callable[[SweepProgress], None] | None = None,
) -> ExperimentResult:
    """Train what is pending, then write the output (and curves) and summarise measured vs predicted floors.

    The sweep is the only writer of its output, parts folder and curves file (kdtool/locks.py): a
    second sweep into them is refused instead of deleting the first one's parts.
    """
    companions = (parts_dir(config.output), curves_path(config.output), survival_path(config.output))
    with locks.claim(config.output, command=provenance.get("command"), also=companions):
        return _run(config, provenance, notify or _silent, on_progress)


def _run(config: ExperimentConfig, provenance: dict, notify: Notify, on_progress) -> ExperimentResult:
    grid, cfg = config.grid, config.train
    store = PartStore(config.output, settings_id(cfg, grid.seeds, grid.student_widths), provenance)
    keys = grid.keys()
    done = store.load(keys) if config.resume else []
    if not config.resume:
        discarded = store.clear()
        if discarded:
            notify("info", f"discarded {discarded} part files of an earlier run in {store.dir} (--resume keeps them)")
    pending = [k for k in keys if k not in set(done)]
    if config.log_curves and done and any(k.slug not in store.curves for k in done):
        notify("warning", "some resumed configurations have no training curves (they were run without --log-curves)")
    notify(
        "info",
        f"toy sweep: {len(keys)} configurations x {grid.seeds} seeds = {grid.models(keys)} models "
        f"({len(done)} configurations already done), {cfg.steps} steps, batch {cfg.batch_size}, "
        f"{config.workers} workers -> {config.output}",
    )
    seconds, trained = _train(config, store, keys, done, pending, on_progress or _silent)
    column = MEASURE_COLUMN[config.measure]
    for slug in store.rows:  # the floor compared with Eq. 2 (resumed rows may carry another --measure)
        store.rows[slug]["floor"] = store.rows[slug][column]
    cols = store.table(keys, store.rows)
    summary = summarize(cols, "floor")
    summary.update(
        {
            "target": cfg.target,
            "floor_column": column,
            "steps": cfg.steps,
            "seconds": round(seconds, 2),
            "models_trained_now": trained,
            "models_per_second": round(trained / seconds, 2) if seconds > 0 else None,
            "workers": config.workers,
            "output": str(config.output),
        }
    )
    scols = store.table(keys, store.survival)
    scols["kept"] = kept_mask(scols["rel_error"], config.kept_threshold)
    summary["survival"] = summarize_survival(scols, config.kept_threshold, cfg.target)
    doc = None
    if config.fit_capacity:
        summary["fit_capacity"] = fit_capacity(cols, "floor", cfg.zipf_exponent)
        doc = _capacity_doc(summary, config, provenance, notify)
    left = config.resume and not pending and _whole(config, column, summary["rows"])
    if left:
        notify("info", f"{config.output}: every configuration is already in it; left as it is")
    else:
        rules = {"kept_threshold": config.kept_threshold, "kept_rule": KEPT_RULE}
        store.merge(keys, summary, want_curves=config.log_curves, survival=(scols, rules))
    summary["survival_file"] = str(survival_path(config.output))
    if config.log_curves:
        summary["curves"] = str(curves_path(config.output))
    if doc is not None:
        if not (left and config.capacity_out.exists()):  # a finished sweep's capacity file is left too
            capacity_mod.write(config.capacity_out, doc)
        summary["capacity_file"] = str(config.capacity_out)
    return ExperimentResult(summary=summary, table=cols)


def _whole(config: ExperimentConfig, column: str, rows: int) -> bool:
    """A finished sweep's output, as this run would write it: no parts left over, this grid's rows only, the
    same floor column and capacity fit, its survival records, the curves file when --log-curves asks. Then
    --resume leaves it."""
    if not config.output.exists() or parts_dir(config.output).exists():
        return False
    spath = survival_path(config.output)
    if not spath.exists() or (formats.parquet_metadata(spath)["summary"] or {}).get("kept_threshold") != (
        config.kept_threshold
    ):
        return False
    if config.log_curves and not curves_path(config.output).exists():
        return False
    stored = formats.parquet_metadata(config.output)["summary"] or {}
    same = stored.get("floor_column") == column and stored.get("rows") == rows
    return same and ("fit_capacity" in stored) == config.fit_capacity


def _capacity_doc(summary: dict, config: ExperimentConfig, provenance: dict, notify: Notify) -> dict | None:
    """The capacity file's content, or None (with a warning) when the sweep cannot give a power law."""
    try:
        return capacity_file(summary, method=config.capacity_from, source=str(config.output), provenance=provenance)
    except BadInput as exc:
        notify("warning", f"no capacity file written: {exc}")
        return None


def _train(config, store, keys, done, pending, on_progress) -> tuple[float, int]:
    """Run the pending configurations, reporting progress; returns (wall seconds, models trained)."""
    seeds = config.grid.seeds
    work = {k.slug: chunk_cost([k], config.grid.student_widths) * seeds for k in keys}
    progress = SweepProgress(
        total=sum(work.values()), done=sum(work[k.slug] for k in done), configs_done=len(done), configs=len(keys)
    )
    trained = 0
    t0 = time.perf_counter()
    on_progress(progress)

    def on_done(key: ToyConfigKey, models: int, seconds: float) -> None:
        nonlocal progress, trained
        trained += models
        progress = replace(
            progress,
            done=progress.done + work[key.slug],
            configs_done=progress.configs_done + 1,
            models_per_second=trained / max(time.perf_counter() - t0, 1e-9),
        )
        on_progress(progress)

    if not pending:
        return 0.0, 0
    seconds = run_sweep(config.grid, config.train, store, workers=config.workers, pending=pending, on_done=on_done)
    return seconds, trained


def check_convergence(
    config: ExperimentConfig,
    configs: int,
    *,
    notify: Notify | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """--convergence-check: an even sample of `configs` configurations at --steps and 2x --steps (nothing written).

    on_progress(trainings done, trainings in all) starts at 0 and counts each finished training.
    """
    notify, on_progress = notify or _silent, on_progress or _silent
    keys = sample_configs(config.grid.keys(), configs)
    seeds, steps = config.grid.seeds, config.train.steps
    notify(
        "info",
        f"convergence check: {len(keys)} configurations x {seeds} seeds at {steps} and {2 * steps} steps "
        f"({config.workers} workers)",
    )
    count = {"done": 0}
    on_progress(0, 2 * len(keys))

    def on_done() -> None:
        count["done"] += 1
        on_progress(count["done"], 2 * len(keys))

    return convergence_check(
        keys, seeds, config.train, workers=config.workers, on_done=on_done, widths_spec=config.grid.student_widths
    )
