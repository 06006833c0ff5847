"""kdtool toy: the paper's toy-model validation (Experiment 1), a batched sweep on CPU in minutes.

Thin: parse the grid and training flags into kdtool.toy.experiment.ExperimentConfig, call
run_experiment (or check_convergence, or kdtool.toy.stats.summarize_file for --summarize), show
its progress on a bar and its summary on stderr (or as JSON).

Example: kdtool toy --n 10,20 --d-teacher 3,5 --alpha 0.9,0.99 --seeds 4 --steps 600 -o toy.parquet
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common, options

PANEL_GRID = "Grid (defaults = the paper's 48 configurations x 20 seeds)"
PANEL_TRAIN = "Training"
PANEL_RUN = "Running"
PANEL_REPORT = "Reporting"


OptimizerChoice = options.choices("OptimizerChoice", "adam", "sgd")
ScheduleChoice = options.choices("ScheduleChoice", "cosine", "linear", "constant")
TargetChoice = options.choices("TargetChoice", "teacher", "data")
MeasureChoice = options.choices("MeasureChoice", "data", "distill")


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

    from kdtool.parsing import parse_float_list, parse_int_list
    from kdtool.toy import experiment
    from kdtool.toy.config import Grid, TrainConfig
    from kdtool.toy.stats import summarize_file

    if summarize is not None:
        which = measure.value if measure is not None else None
        _report(summarize_file(summarize, which, capacity_fit=fit_capacity, zipf_exponent=zipf_exponent), None)
        return
    grid_ns = common.parse_opt("--n", parse_int_list, n)
    grid_d = common.parse_opt("--d-teacher", parse_int_list, d_teacher)
    grid_a = common.parse_opt("--alpha", parse_float_list, alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        grid = Grid(tuple(grid_ns), tuple(grid_d), tuple(grid_a), seeds)
    train = TrainConfig(
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
    config = experiment.ExperimentConfig(
        output=output,
        grid=grid,
        train=train,
        workers=workers,
        resume=resume,
        log_curves=log_curves,
        measure=(measure or MeasureChoice.data).value,
        fit_capacity=fit_capacity,
    )
    if convergence_check:
        with common.progress() as bar:
            checked = experiment.check_convergence(config, check_configs, notify=_say, on_progress=_counter(bar))
        _report_check(checked)
        return
    provenance = common.make_provenance(seed=seed, config=config.settings())
    with common.progress(counts=False) as bar:
        result = experiment.run_experiment(config, provenance, notify=_say, on_progress=_work_bar(bar))
    _report(result.summary, output)


def _say(level: str, text: str) -> None:
    (common.warn if level == "warning" else common.log)(text)


def _counter(bar):
    """on_progress for the convergence check: trainings done of all."""
    task = None

    def show(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("convergence", total=total, rate="")
        bar.update(task, completed=done)

    return show


def _work_bar(bar):
    """on_progress for the sweep: the bar's units are estimated work, its text counts configurations."""
    task = None

    def show(p) -> None:
        nonlocal task
        rate = f"{p.configs_done}/{p.configs} configs"
        if p.models_per_second is not None:
            rate += f", {p.models_per_second:.0f} models/s"
        if task is None:
            task = bar.add_task("toy sweep", total=p.total, completed=p.done, rate=rate)
        else:
            bar.update(task, completed=p.done, rate=rate)

    return show


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
    fitted = result.get("fit_capacity") or {}
    if not common.STATE.quiet:
        for line in _summary_lines(result, output) + _fit_lines(fitted):
            common.log(line)
    for note in fitted.get("notes", []):
        common.warn(note)


def _agreement(label: str, r: dict) -> str:
    return (
        f"{label}Pearson r {_fmt(r['pearson_r'])}, log-log r {_fmt(r['pearson_r_loglog'])}, "
        f"MAPE {_fmt(r['mape_percent'])}%, median accuracy {_fmt(r['median_accuracy'])}, R^2 {_fmt(r['r2'])}"
    )


def _summary_lines(result: dict, output: Path | None) -> list[str]:
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
    lines.append(_agreement("refined (g(alpha)): ", result["refined"]))
    lines.append(_agreement("naive   (g = 1):    ", result["naive"]))
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
    return lines


def _fit_lines(fitted: dict) -> list[str]:
    """--fit-capacity: g_hat per alpha against g(alpha), and the power law across alphas."""
    lines = [
        f"  fit alpha {p['alpha']:g}: g_hat {_fmt(p['g_hat'])} vs g(alpha) {_fmt(p['g'])} "
        f"(x{_fmt(p['ratio'])}), log-rmse {_fmt(p['rmse_log_fit'])} vs {_fmt(p['rmse_log_paper_g'])} "
        f"with g(alpha), {p['points']} points"
        for p in fitted.get("per_alpha", [])
    ]
    pl = fitted.get("power_law")
    if pl:
        lines.append(
            f"  power law: g_hat = {_fmt(pl['k'])} * g(alpha)^{_fmt(pl['p'])} (R^2 on logs {_fmt(pl['r2_log'])})"
        )
    return lines


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
