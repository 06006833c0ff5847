"""kdtool predict: the loss floor Eq. 2 predicts at each student width, and the minimum width for a target.

Thin: parse options into a kdtool.theory.prediction.PredictionConfig, call `predict` (the importance
source, the floor model, the calibration, the target width), print its messages and emit its table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common, options

INPUT, SPEC, WIDTHS = "Input", "Parametric spec (instead of STATS)", "Widths and target"
CAPACITY, CALIBRATION, OUTPUT = "Capacity", "Calibration (floors in nats)", "Output"


def _spec(name: str, help: str):
    """An option of the parametric spec panel."""
    return typer.Option(name, help=help, rich_help_panel=SPEC)


EstimatorChoice = options.choices("EstimatorChoice", "paper", "robust")
FitChoice = options.choices("FitChoice", "affine", "affine_fixed", "linear")


def main(
    stats: Annotated[
        Optional[Path],
        typer.Argument(
            help="Stats table from `kdtool stats` (Parquet; CSV/JSON with an `importance` column also work). "
            "Omit it to use a parametric spec (--features/--alpha).",
            show_default=False,
            rich_help_panel=INPUT,
        ),
    ] = None,
    layer: options.layers_option(
        "Layers of STATS to use (8,12); for a parametric spec, the label of its rows [0].", INPUT
    ) = None,
    sae: Annotated[
        Optional[str],
        typer.Option(
            "--sae",
            help="Only these SAEs of STATS (its `sae` keys: layer12, or x8/layer12,x16/layer12).",
            rich_help_panel=INPUT,
        ),
    ] = None,
    estimator: Annotated[
        EstimatorChoice,
        typer.Option(
            "--estimator",
            help="paper: F = alive latents and alpha = 1 - L0/F as the paper defines them; robust: "
            "F_robust, alpha_robust (de-duplicated features carrying 99% of the importance; docs/sae.md).",
            rich_help_panel=INPUT,
        ),
    ] = EstimatorChoice.paper,
    features: Annotated[
        Optional[int], typer.Option("--features", help="Parametric spec: number of features F.", rich_help_panel=SPEC)
    ] = None,
    alpha: Annotated[
        Optional[float],
        _spec("--alpha", "Sparsity alpha in [0, 1) (parametric spec; with STATS it overrides the file's)."),
    ] = None,
    l0: Annotated[
        Optional[float], _spec("--l0", "Parametric spec: mean active features per token; alpha = 1 - L0/F.")
    ] = None,
    importance: Annotated[
        str, _spec("--importance", "Parametric spec: importance profile I_i: zipf (1/i), zipf:S (i^-S) or uniform.")
    ] = "zipf",
    sq_activation: Annotated[
        Optional[float],
        _spec("--sq-activation", "Parametric spec: E(x_i^2); default (1-alpha)/3, the toy model's value."),
    ] = None,  # fmt: skip
    widths: Annotated[
        Optional[str],
        typer.Option(
            "--widths", "-w", help="Student widths d_S: 128,256,512 or a range 64:1024:64.", rich_help_panel=WIDTHS
        ),
    ] = None,
    target_loss: Annotated[
        Optional[float],
        typer.Option(
            "--target-loss",
            help="Print the minimum width whose floor is <= this (nats with --calibration).",
            rich_help_panel=WIDTHS,
        ),
    ] = None,
    capacity: Annotated[
        str,
        typer.Option(
            "--capacity",
            help="Features per dimension g_hat: paper (g(alpha) of Eq. 1), naive (g = 1), power:K,P "
            "(K g(alpha)^P) or a capacity file from `kdtool toy --fit-capacity`.",
            rich_help_panel=CAPACITY,
        ),
    ] = "paper",
    g_value: Annotated[
        Optional[float],
        typer.Option(
            "--g", help="Use this capacity g instead of g(alpha) (Table 2 used g = 26.922).", rich_help_panel=CAPACITY
        ),
    ] = None,
    calibration: Annotated[
        Optional[Path],
        typer.Option(
            "--calibration",
            "-c",
            help="calib.json from `kdtool calibrate`: adds floor_kl and its bootstrap band.",
            rich_help_panel=CALIBRATION,
        ),
    ] = None,
    fit: Annotated[
        FitChoice,
        typer.Option("--fit", help="Which fit of --calibration maps L* to nats.", rich_help_panel=CALIBRATION),
    ] = FitChoice.affine,
    spread: Annotated[
        bool,
        typer.Option(
            "--spread",
            help="With several SAEs of a layer: output min/median/max over them per width instead.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    output: common.output_option(OUTPUT) = None,
    fmt: common.format_option(OUTPUT) = None,
) -> None:
    """Predict the distillation loss floor L*(d_S) of Eq. 2 at each student width.

    F_S = floor(d_S * g_hat) features fit in a width-d_S student (g_hat = g(alpha) unless --capacity
    says otherwise); the floor is the importance mass of the rest. Columns: layer, width,
    features_kept, features_dropped, floor, normalized, g, capacity, estimator (+ floor_kl, floor_kl_low,
    floor_kl_high with --calibration).

    Several SAEs of one layer in STATS (widths, lambdas, seeds, checkpoints): one row set per SAE
    (column sae) and their spread per layer (min/median/max of d* and of each width's floor; --spread
    outputs it as the table).

    Example: kdtool predict --features 28665 --l0 218.3 --widths 128,256,512,768,1024
    """
    from kdtool.errors import BadInput
    from kdtool.parsing import parse_int_list
    from kdtool.theory import prediction
    from kdtool.theory import spread as spread_mod

    cfg = prediction.PredictionConfig(
        stats=stats,
        widths=None if widths is None else tuple(common.parse_opt("--widths", parse_int_list, widths)),
        layers=None if not layer else tuple(options.parse_layers(layer)),
        features=features,
        alpha=alpha,
        l0=l0,
        importance=importance,
        sq_activation=sq_activation,
        capacity=capacity,
        g_value=g_value,
        target_loss=target_loss,
        calibration=calibration,
        fit=fit.value,
        estimator=estimator.value,
        saes=None if sae is None else tuple(k.strip() for k in sae.split(",") if k.strip()),
    )
    result = prediction.predict(
        cfg, notify=lambda level, text: (common.warn if level == "warning" else common.log)(text)
    )
    if spread and "spread" not in result.summary:
        raise BadInput("--spread: STATS has one SAE per layer; there is no spread over SAEs to show")
    common.emit_table(
        spread_mod.table(result.summary["spread"]) if spread else result.columns,
        fmt=fmt,
        output=output,
        kind=spread_mod.SPREAD_KIND if spread else prediction.KIND,
        provenance=common.make_provenance(inputs=[p for p in (stats, calibration, _file(capacity)) if p is not None]),
        title=f"predicted floors ({'spread over SAEs, ' if spread else ''}capacity {result.summary['capacity']}, "
        f"estimator {result.summary['estimator']})",
        summary=result.summary,
    )


def _file(capacity: str) -> Path | None:
    """The capacity file --capacity names, for the provenance's inputs (None for paper, naive, power:K,P)."""
    return Path(capacity) if Path(capacity).is_file() else None
