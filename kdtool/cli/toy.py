"""kdtool toy: the paper's toy-model validation (Experiment 1), a batched sweep on CPU in minutes.

Example: kdtool toy --n 10,20 --d-teacher 3,5 --alpha 0.9,0.99 --seeds 4 --steps 600 -o toy.parquet
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common

PANEL_GRID = "Grid (defaults = the paper's 48 configurations x 20 seeds)"
PANEL_TRAIN = "Training"
PANEL_RUN = "Running"
PANEL_REPORT = "Reporting"


class OptimizerChoice(str, Enum):
    adam = "adam"
    sgd = "sgd"


class ScheduleChoice(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class TargetChoice(str, Enum):
    teacher = "teacher"
    data = "data"


class MeasureChoice(str, Enum):
    data = "data"
    distill = "distill"


MEASURE_COLUMN = {"data": "floor_data", "distill": "floor_distill"}


def main(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Parquet file with one row per (n, d_T, alpha, d_S, seed).",
            dir_okay=False,
            rich_help_panel=PANEL_RUN,
        ),
    ] = Path("toy.parquet"),
    n: Annotated[
        str, typer.Option("--n", help="Feature counts n (list or start:stop:step).", rich_help_panel=PANEL_GRID)
    ] = "10,20,40",
    d_teacher: Annotated[
        str,
        typer.Option(
            "--d-teacher", help="Teacher widths d_T; students get every d_S = 1..d_T.", rich_help_panel=PANEL_GRID
        ),
    ] = "3,5,8,10",
    alpha: Annotated[
        str, typer.Option("--alpha", help="Sparsities (probability a feature is 0).", rich_help_panel=PANEL_GRID)
    ] = "0.8,0.9,0.95,0.99",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per configuration.", rich_help_panel=PANEL_GRID)] = 20,
    zipf_exponent: Annotated[
        float, typer.Option("--zipf-exponent", help="Importance I_i = i^-s.", rich_help_panel=PANEL_GRID)
    ] = 1.0,
    steps: Annotated[
        int,
        typer.Option("--steps", help="Optimiser steps per model (teacher and students).", rich_help_panel=PANEL_TRAIN),
    ] = 3000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Fresh samples per step.", rich_help_panel=PANEL_TRAIN)
    ] = 256,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=PANEL_TRAIN)] = 2e-2,
    optimizer: Annotated[
        OptimizerChoice,
        typer.Option("--optimizer", help="adam (torch defaults) or sgd (momentum 0.9).", rich_help_panel=PANEL_TRAIN),
    ] = (OptimizerChoice.adam),
    schedule: Annotated[
        ScheduleChoice,
        typer.Option("--schedule", help="Learning-rate schedule (decays to 0).", rich_help_panel=PANEL_TRAIN),
    ] = ScheduleChoice.cosine,
    target: Annotated[
        TargetChoice,
        typer.Option(
            "--target",
            help="Students learn the trained teacher's x_hat (distillation) or the data.",
            rich_help_panel=PANEL_TRAIN,
        ),
    ] = (TargetChoice.teacher),
    eval_samples: Annotated[
        int, typer.Option("--eval-samples", help="Held-out samples per (config, seed).", rich_help_panel=PANEL_TRAIN)
    ] = 4096,
    floor_fraction: Annotated[
        float,
        typer.Option(
            "--floor-fraction",
            help="Floor = mean held-out loss over this final fraction of training.",
            rich_help_panel=PANEL_TRAIN,
        ),
    ] = 0.1,
    eval_points: Annotated[
        int, typer.Option("--eval-points", help="Held-out evaluations in that window.", rich_help_panel=PANEL_TRAIN)
    ] = 10,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Base seed (every draw is keyed by it and the configuration).", rich_help_panel=PANEL_TRAIN
        ),
    ] = 0,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers", help="Worker processes, one torch thread each (default: all cores).", rich_help_panel=PANEL_RUN
        ),
    ] = None,
    configs_per_batch: Annotated[
        int,
        typer.Option(
            "--configs-per-batch",
            help="Configurations with the same (n, d_T) trained as one batch.",
            rich_help_panel=PANEL_RUN,
        ),
    ] = 1,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Keep configurations already written (part files or an existing output with the same settings).",
            rich_help_panel=PANEL_RUN,
        ),
    ] = False,
    log_curves: Annotated[
        bool,
        typer.Option(
            "--log-curves", help="Also write training curves to OUTPUT-stem.curves.parquet.", rich_help_panel=PANEL_RUN
        ),
    ] = False,
    curve_points: Annotated[
        int, typer.Option("--curve-points", help="Points per curve with --log-curves.", rich_help_panel=PANEL_RUN)
    ] = 100,
    measure: Annotated[
        Optional[MeasureChoice],
        typer.Option(
            "--measure",
            help="Which student loss is the "
            "'floor' compared with Eq. 2: against the data or "
            "against the teacher (default: data).",
            rich_help_panel=PANEL_REPORT,
        ),
    ] = None,
    fit_capacity: Annotated[
        bool,
        typer.Option(
            "--fit-capacity",
            help="Fit the capacity g_hat per alpha that explains the measured floors, and g_hat = k g(alpha)^p.",
            rich_help_panel=PANEL_REPORT,
        ),
    ] = False,
    summarize: Annotated[
        Optional[Path],
        typer.Option(
            "--summarize",
            help="Do not train: summarise an existing toy.parquet.",
            exists=False,
            dir_okay=False,
            rich_help_panel=PANEL_REPORT,
        ),
    ] = None,
    convergence_check: Annotated[
        bool,
        typer.Option(
            "--convergence-check",
            help="Do not sweep: train a sample of configurations at --steps and 2x --steps and compare floors.",
            rich_help_panel=PANEL_REPORT,
        ),
    ] = False,
    check_configs: Annotated[
        int,
        typer.Option(
            "--check-configs", help="Configurations in the convergence check's sample.", rich_help_panel=PANEL_REPORT
        ),
    ] = 6,
) -> None:
    """Sweep the toy model of the paper's section 4: teachers, distilled students, measured vs predicted floors.

    For each configuration (n, d_T, alpha) and seed: a teacher of width d_T is trained on the data,
    then students of every width d_S = 1..d_T learn its output; each floor is the mean held-out loss
    over the final 10% of training, next to Eq. 2's refined (g(alpha)) and naive (g = 1) predictions.
    All models of a configuration train as one batched computation; configurations run in parallel
    worker processes and are written as they finish (--resume continues a killed sweep).

    Example: kdtool toy --n 10,20 --d-teacher 3,5 --alpha 0.9,0.99 --seeds 4 --steps 600 -o toy.parquet
    """
    import warnings

    from kdtool.errors import BadInput
    from kdtool.parsing import parse_float_list, parse_int_list
    from kdtool.toy.config import Grid, TrainConfig, settings_id
    from kdtool.toy.stats import fit_capacity as fit
    from kdtool.toy.stats import read_toy_table
    from kdtool.toy.stats import summarize as summary_of
    from kdtool.toy.store import PartStore, curves_path
    from kdtool.toy.sweep import chunk_cost, default_workers, run_sweep, sample_configs
    from kdtool.toy.sweep import convergence_check as check

    if summarize is not None:
        cols, meta = read_toy_table(summarize)
        column = MEASURE_COLUMN[measure.value] if measure is not None else "floor"
        zipf = ((meta.get("provenance") or {}).get("config") or {}).get("zipf_exponent", zipf_exponent)
        result = summary_of(cols, column)
        if fit_capacity:
            result["fit_capacity"] = fit(cols, column, zipf)
        _report(result, None)
        return

    grid_ns = common.parse_opt("--n", parse_int_list, n)
    grid_d = common.parse_opt("--d-teacher", parse_int_list, d_teacher)
    grid_a = common.parse_opt("--alpha", parse_float_list, alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        grid = Grid(tuple(grid_ns), tuple(grid_d), tuple(grid_a), seeds)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer.value,
        schedule=schedule.value,
        target=target.value,
        zipf_exponent=zipf_exponent,
        eval_samples=eval_samples,
        floor_fraction=floor_fraction,
        eval_points=eval_points,
        curve_points=curve_points if log_curves else 0,
        base_seed=seed,
    )
    if log_curves and curve_points < 2:
        raise BadInput(f"--curve-points must be >= 2, got {curve_points}")
    n_workers = workers if workers is not None else default_workers()
    if n_workers < 1:
        raise BadInput(f"--workers must be >= 1, got {n_workers}")
    if output.suffix.lower() not in (".parquet", ".pq"):
        raise BadInput(f"{output}: the toy table is Parquet; use a .parquet name")
    config = {"grid": {"n": grid_ns, "d_teacher": grid_d, "alpha": grid_a, "seeds": seeds}, **cfg.to_dict()}

    if convergence_check:
        keys = sample_configs(grid.keys(), check_configs)
        common.log(
            f"convergence check: {len(keys)} configurations x {seeds} seeds at {steps} and {2 * steps} steps "
            f"({n_workers} workers)"
        )
        with common.progress() as bar:
            task = bar.add_task("convergence", total=2 * len(keys), rate="")
            result = check(keys, seeds, cfg, workers=n_workers, on_done=lambda: bar.advance(task))
        _report_check(result)
        return

    column = MEASURE_COLUMN[(measure or MeasureChoice.data).value]
    provenance = common.make_provenance(seed=seed, config=config)
    store = PartStore(output, settings_id(cfg, seeds), provenance)
    keys = grid.keys()
    done = store.load(keys) if resume else []
    if not resume:
        discarded = store.clear()
        if discarded:
            common.log(f"discarded {discarded} part files of an earlier run in {store.dir} (--resume keeps them)")
    pending = [k for k in keys if k not in set(done)]
    if log_curves and done and any(k.slug not in store.curves for k in done):
        common.warn("some resumed configurations have no training curves (they were run without --log-curves)")
    total_models = grid.models(keys)
    common.log(
        f"toy sweep: {len(keys)} configurations x {seeds} seeds = {total_models} models "
        f"({len(done)} configurations already done), {steps} steps, batch {batch_size}, "
        f"{n_workers} workers -> {output}"
    )
    trained = {"models": 0}
    t0 = time.perf_counter()
    # the bar advances by each configuration's estimated work, not by 1: the sweep runs the biggest first,
    # so a count-based ETA would start several times too long
    work = {k.slug: chunk_cost([k]) * seeds for k in keys}
    finished = {"configs": len(done)}
    with common.progress(counts=False) as bar:
        task = bar.add_task(
            "toy sweep",
            total=sum(work.values()),
            completed=sum(work[k.slug] for k in done),
            rate=f"{len(done)}/{len(keys)} configs",
        )

        def on_done(key, models, seconds):
            trained["models"] += models
            finished["configs"] += 1
            rate = trained["models"] / max(time.perf_counter() - t0, 1e-9)
            bar.update(
                task, advance=work[key.slug], rate=f"{finished['configs']}/{len(keys)} configs, {rate:.0f} models/s"
            )

        seconds = run_sweep(grid, cfg, store, workers=n_workers, pending=pending, on_done=on_done) if pending else 0.0
    for slug in store.rows:  # the floor compared with Eq. 2 (resumed rows may carry another --measure)
        store.rows[slug]["floor"] = store.rows[slug][column]
    cols = store.table(keys, store.rows)
    result = summary_of(cols, "floor")
    result.update(
        {
            "target": cfg.target,
            "floor_column": column,
            "steps": steps,
            "seconds": round(seconds, 2),
            "models_trained_now": trained["models"],
            "models_per_second": round(trained["models"] / seconds, 2) if seconds > 0 else None,
            "workers": n_workers,
            "output": str(output),
        }
    )
    if fit_capacity:
        result["fit_capacity"] = fit(cols, "floor", zipf_exponent)
    store.merge(keys, result, want_curves=log_curves)
    if log_curves:
        result["curves"] = str(curves_path(output))
    _report(result, output)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _report(result: dict, output: Path | None) -> None:
    """--json: the summary on stdout. Otherwise a short human summary on stderr."""
    if common.STATE.json:
        common.emit_json({"kind": "kdtool.toy.summary", **result})
        return
    if common.STATE.quiet:
        for note in (result.get("fit_capacity") or {}).get("notes", []):
            common.warn(note)
        return
    ref, nai = result["refined"], result["naive"]
    lines = []
    if output is not None:
        lines.append(
            f"wrote {output}: {result['rows']} rows, {result['models']} models in {result['configs']} "
            f"configurations ({_fmt(result.get('seconds'))} s, {_fmt(result.get('models_per_second'))} "
            "models/s this run)"
        )
    lines.append(
        f"data points: {result['data_points']} of {result['points']} (config, d_S) points "
        f"[{result['data_point_rule']}]; floor = {result.get('floor_column', result['measure'])}"
    )
    lines.append(
        f"refined (g(alpha)): Pearson r {_fmt(ref['pearson_r'])}, log-log r {_fmt(ref['pearson_r_loglog'])}, "
        f"MAPE {_fmt(ref['mape_percent'])}%, median accuracy {_fmt(ref['median_accuracy'])}, "
        f"R^2 {_fmt(ref['r2'])}"
    )
    lines.append(
        f"naive   (g = 1):    Pearson r {_fmt(nai['pearson_r'])}, log-log r {_fmt(nai['pearson_r_loglog'])}, "
        f"MAPE {_fmt(nai['mape_percent'])}%, median accuracy {_fmt(nai['median_accuracy'])}, "
        f"R^2 {_fmt(nai['r2'])}"
    )
    for a, row in result["by_alpha"].items():
        lines.append(
            f"  alpha {a}: {row['points']} points, median accuracy refined {_fmt(row['median_accuracy'])}, "
            f"naive {_fmt(row['median_accuracy_naive'])}; measured / predicted median refined "
            f"{_fmt(row.get('median_measured_over_refined'))}, naive {_fmt(row.get('median_measured_over_naive'))}"
        )
    order = result.get("ordering")
    if order:
        w, a = order["falls_with_width"], order["falls_with_alpha"]
        lines.append(
            f"ranking: the floor falls with d_S in {w[0]}/{w[1]} adjacent comparisons, with alpha in {a[0]}/{a[1]}; "
            f"refined prediction below the floor at {result['underestimated_by_refined']}/{result['data_points']} "
            "data points"
        )
    bd = result["beyond_d_star"]
    lines.append(
        f"beyond d* ({bd['points']} points, formula = 0): measured floor / total mass median "
        f"{_fmt(bd['median_normalized_floor'])}, max {_fmt(bd['max_normalized_floor'])}"
    )
    fitted = result.get("fit_capacity")
    if fitted:
        for p in fitted["per_alpha"]:
            lines.append(
                f"  fit alpha {p['alpha']:g}: g_hat {_fmt(p['g_hat'])} vs g(alpha) {_fmt(p['g'])} "
                f"(x{_fmt(p['ratio'])}), log-rmse {_fmt(p['rmse_log_fit'])} vs {_fmt(p['rmse_log_paper_g'])} "
                f"with g(alpha), {p['points']} points"
            )
        if fitted["power_law"]:
            pl = fitted["power_law"]
            lines.append(
                f"  power law: g_hat = {_fmt(pl['k'])} * g(alpha)^{_fmt(pl['p'])} (R^2 on logs {_fmt(pl['r2_log'])})"
            )
    for line in lines:
        common.log(line)
    for note in (fitted or {}).get("notes", []):
        common.warn(note)


def _report_check(result: dict) -> None:
    if common.STATE.json:
        common.emit_json({"kind": "kdtool.toy.convergence", **result})
        return
    for c in result["configs"]:
        common.log(
            f"  {c['config']}: max |rel. change| data {_fmt(c['max_abs_rel_floor_data'])}, "
            f"distill {_fmt(c['max_abs_rel_floor_distill'])}"
        )
    for col, o in result["overall"].items():
        common.log(
            f"{col}: {o['points']} data points, median |rel. change| {_fmt(o['median_abs_rel'])}, "
            f"max {_fmt(o['max_abs_rel'])}, mean signed {_fmt(o['mean_rel'])} "
            f"({result['steps']} vs {result['steps_doubled']} steps)"
        )
    verdict = "converged" if result["passed"] else "NOT converged"
    common.log(
        f"{verdict}: max |rel. change| of the data floor {'<' if result['passed'] else '>='} {result['threshold']:.0%}"
    )
