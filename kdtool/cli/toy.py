"""kdtool toy: the paper's toy-model validation (Experiment 1), a batched sweep on CPU in minutes.

Thin: parse the grid and training flags into kdtool.toy.experiment.ExperimentConfig, call
run_experiment (or check_convergence, or kdtool.toy.stats.summarize_file for --summarize), show
its progress on a bar and its summary on stderr (kdtool/cli/toy_report.py; or as JSON).

Example: kdtool toy --n 10,20 --d-teacher 3,5 --alpha 0.9,0.99 --seeds 4 --steps 600 -o toy.parquet
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common, options, toy_report

PANEL_GRID = "Grid (defaults = the paper's 48 configurations x 20 seeds)"
PANEL_TRAIN = "Training"
PANEL_RUN = "Running"
PANEL_REPORT = "Reporting"


OptimizerChoice = options.choices("OptimizerChoice", "adam", "sgd")
ScheduleChoice = options.choices("ScheduleChoice", "cosine", "linear", "constant")
TargetChoice = options.choices("TargetChoice", "teacher", "data")
MeasureChoice = options.choices("MeasureChoice", "data", "distill")
CapacityFromChoice = options.choices("CapacityFromChoice", "kept", "floors")


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
    student_widths: Annotated[
        str,
        typer.Option(
            "--student-widths",
            help="Student widths d_S: teacher (1..d_T), to-dstar (1..max(d_T, ceil(d*)+1), d* = n/g(alpha)) "
            "or a list for every configuration (1,2,4 or 1:12).",
            rich_help_panel=PANEL_GRID,
        ),
    ] = "teacher",
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
            help="Fit the capacity per alpha (from kept counts and from the floors), g_hat = k g(alpha)^p, "
            "and write it as a capacity file for `kdtool predict --capacity FILE`.",
            rich_help_panel=PANEL_REPORT,
        ),
    ] = False,
    capacity_out: Annotated[
        Optional[Path],
        typer.Option(
            "--capacity-out",
            help="The capacity file of --fit-capacity (default: OUTPUT-stem.capacity.json, beside the toy table).",
            dir_okay=False,
            rich_help_panel=PANEL_REPORT,
        ),
    ] = None,
    capacity_from: Annotated[
        CapacityFromChoice,
        typer.Option(
            "--capacity-from",
            rich_help_panel=PANEL_REPORT,
            help="The capacity file's law: from the students' kept counts (g_meas) or from the floors (g_hat).",
        ),
    ] = CapacityFromChoice.kept,
    kept_threshold: Annotated[
        Optional[float],
        typer.Option(
            "--kept-threshold",
            help="A feature is kept when its held-out error is below this fraction of its variance "
            "(default 0.5; with --summarize, the one the records were written with).",
            rich_help_panel=PANEL_REPORT,
        ),
    ] = None,
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
    then students of every width d_S = 1..d_T (--student-widths) learn its output; each floor is the
    mean held-out loss over the final 10% of training, next to Eq. 2's refined (g(alpha)) and naive
    (g = 1) predictions. Beside the table, OUTPUT-stem.survival.parquet records each feature's share of
    every model's floor and whether it is kept; the summary compares kept counts with Eq. 2's F_S and
    charges Eq. 2 on the features actually dropped. All models of a configuration train as one batched
    computation; configurations run in parallel worker processes and are written as they finish
    (--resume continues a killed sweep).

    Example: kdtool toy --n 10,20 --d-teacher 3,5 --alpha 0.9,0.99 --seeds 4 --steps 600 -o toy.parquet
    """
    import warnings

    from kdtool.parsing import parse_float_list, parse_int_list
    from kdtool.toy import experiment
    from kdtool.toy.config import WIDTH_POLICIES, Grid, TrainConfig
    from kdtool.toy.stats import summarize_file
    from kdtool.toy.survival import KEPT_THRESHOLD

    if summarize is not None:
        from kdtool import kinds

        kinds.expect(summarize, "kdtool.toy", "--summarize")
        which = measure.value if measure is not None else None
        summary = summarize_file(
            summarize,
            which,
            capacity_fit=fit_capacity,
            zipf_exponent=zipf_exponent,
            kept_threshold=kept_threshold,
            capacity_out=capacity_out or summarize.with_name(summarize.stem + ".capacity.json"),
            capacity_from=capacity_from.value,
            provenance=common.make_provenance(inputs=[summarize]),
        )
        toy_report.report(summary, None)
        return
    grid_ns = common.parse_opt("--n", parse_int_list, n)
    grid_d = common.parse_opt("--d-teacher", parse_int_list, d_teacher)
    grid_a = common.parse_opt("--alpha", parse_float_list, alpha)
    widths = student_widths
    if student_widths not in WIDTH_POLICIES:
        widths = tuple(common.parse_opt("--student-widths", parse_int_list, student_widths))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        grid = Grid(tuple(grid_ns), tuple(grid_d), tuple(grid_a), seeds, widths)
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
        kept_threshold=KEPT_THRESHOLD if kept_threshold is None else kept_threshold,
        capacity_out=capacity_out,
        capacity_from=capacity_from.value,
    )
    if convergence_check:
        with common.progress() as bar:
            checked = experiment.check_convergence(config, check_configs, notify=_say, on_progress=_counter(bar))
        toy_report.report_check(checked)
        return
    provenance = common.make_provenance(seed=seed, config=config.settings())
    with common.progress(counts=False) as bar:
        result = experiment.run_experiment(config, provenance, notify=_say, on_progress=_work_bar(bar))
    toy_report.report(result.summary, output)


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
