"""kdtool predict: the loss floor Eq. 2 predicts at each student width, and the minimum width for a target.

Thin: parse options, build the importance source (kdtool.theory.importance), evaluate the floor
model (kdtool.theory), optionally map it to nats with a calibration (kdtool.theory.calibrated).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common


class CapacityChoice(str, Enum):
    paper = "paper"
    naive = "naive"


class FitChoice(str, Enum):
    affine = "affine"
    affine_fixed = "affine_fixed"
    linear = "linear"


def main(
    stats: Annotated[
        Optional[Path],
        typer.Argument(
            help="Stats table from `kdtool stats` (Parquet; CSV/JSON with an `importance` column also work). "
            "Omit it to use a parametric spec (--features/--alpha).",
            show_default=False,
        ),
    ] = None,
    widths: Annotated[
        Optional[str], typer.Option("--widths", "-w", help="Student widths d_S: 128,256,512 or a range 64:1024:64.")
    ] = None,
    features: Annotated[
        Optional[int], typer.Option("--features", help="Parametric spec: number of features F.")
    ] = None,
    alpha: Annotated[
        Optional[float],
        typer.Option("--alpha", help="Sparsity alpha in [0, 1) (parametric spec; with STATS it overrides the file's)."),
    ] = None,
    l0: Annotated[
        Optional[float], typer.Option("--l0", help="Parametric spec: mean active features per token; alpha = 1 - L0/F.")
    ] = None,
    importance: Annotated[
        str,
        typer.Option(
            "--importance", help="Parametric spec: importance profile I_i: zipf (1/i), zipf:S (i^-S) or uniform."
        ),
    ] = "zipf",
    sq_activation: Annotated[
        Optional[float],
        typer.Option("--sq-activation", help="Parametric spec: E(x_i^2); default (1-alpha)/3, the toy model's value."),
    ] = None,
    capacity: Annotated[
        Optional[CapacityChoice],
        typer.Option(
            "--capacity", help="paper (default): g(alpha) of Eq. 1; naive: one feature per dimension (g = 1)."
        ),
    ] = None,
    g_value: Annotated[
        Optional[float], typer.Option("--g", help="Use this capacity g instead of g(alpha) (Table 2 used g = 26.922).")
    ] = None,
    layer: Annotated[
        Optional[str],
        typer.Option(
            "--layer", "-l", help="Layers of STATS to use (8,12); for a parametric spec, the label of its rows [0]."
        ),
    ] = None,
    target_loss: Annotated[
        Optional[float],
        typer.Option("--target-loss", help="Print the minimum width whose floor is <= this (nats with --calibration)."),
    ] = None,
    calibration: Annotated[
        Optional[Path],
        typer.Option(
            "--calibration", "-c", help="calib.json from `kdtool calibrate`: adds floor_kl and its bootstrap band."
        ),
    ] = None,
    fit: Annotated[
        FitChoice, typer.Option("--fit", help="Which fit of --calibration maps L* to nats.")
    ] = FitChoice.affine,
    output: common.OutputOpt = None,
    fmt: common.FormatOpt = None,
) -> None:
    """Predict the distillation loss floor L*(d_S) of Eq. 2 at each student width.

    F_S = floor(d_S * g(alpha)) features fit in a width-d_S student; the floor is the
    importance mass of the rest. Columns: layer, width, features_kept, features_dropped,
    floor, normalized (+ floor_kl, floor_kl_low, floor_kl_high with --calibration).

    Example: kdtool predict --features 28665 --l0 218.3 --widths 128,256,512,768,1024
    """
    import numpy as np

    from kdtool.errors import BadInput
    from kdtool.parsing import parse_int_list
    from kdtool.theory import calibrated as calib_mod
    from kdtool.theory import importance as imp
    from kdtool.theory import theorem as theory

    cap = (capacity or CapacityChoice.paper).value
    if g_value is not None and capacity == CapacityChoice.naive:
        raise BadInput("--g and --capacity naive both set the capacity: give only one")
    if alpha is not None and l0 is not None:
        raise BadInput("--alpha and --l0 both set the sparsity: give only one")
    if widths is None and target_loss is None:
        raise BadInput("--widths: give the student widths to predict (e.g. 128,256,512), or --target-loss")
    width_list = common.parse_opt("--widths", parse_int_list, widths) if widths is not None else None

    # --- importance source: one block per layer
    if stats is not None:
        if features is not None:
            raise BadInput(f"{stats}: give a stats file or --features, not both")
        for flag, value in (("--l0", l0), ("--sq-activation", sq_activation)):
            if value is not None:
                raise BadInput(f"{flag} is for a parametric spec; {stats} already has the measured values")
        wanted = common.parse_opt("--layer", lambda t: parse_int_list(t, minimum=0), layer) if layer else None
        layers = imp.from_stats(stats, layers=wanted)
        if alpha is not None:
            if not (0 <= alpha < 1):
                raise BadInput(f"--alpha must be in [0, 1), got {alpha}")
            layers = [imp.LayerImportance(lay.layer, lay.weights, alpha, None, lay.source) for lay in layers]
    else:
        if features is None:
            raise BadInput("no importance source: give a STATS file, or --features N with --alpha A (or --l0)")
        label = common.parse_opt("--layer", lambda t: parse_int_list(t, minimum=0), layer) if layer else [0]
        if len(label) != 1:
            raise BadInput("--layer: a parametric spec is one layer; give one label")
        a = imp.alpha_from_l0(features, l0, what="--l0") if l0 is not None else alpha
        layers = [
            imp.parametric(features, alpha=a, importance=importance, sq_activation=sq_activation, layer=label[0], l0=l0)
        ]

    # --- calibration (maps importance units to nats)
    cal = None
    if calibration is not None:
        calib = calib_mod.load(calibration)
        cal = calib_mod.fit_params(calib, fit.value, calibration)
        if cal["C_samples"].size == 0:
            common.warn(f"{calibration}: no bootstrap samples (calibrate --bootstrap 0?): floor_kl_low/high are empty")

    columns: dict[str, list] = {
        k: [] for k in ("layer", "width", "features_kept", "features_dropped", "floor", "normalized")
    }
    if cal is not None:
        columns.update({"floor_kl": [], "floor_kl_low": [], "floor_kl_high": []})
    summary: dict = {"capacity": "explicit g" if g_value is not None else cap, "layers": {}}
    if cal is not None:
        summary["calibration"] = {
            "file": str(calibration),
            "fit": cal["fit"],
            "C": cal["C"],
            "B": cal["B"],
            "band": "pointwise 2.5-97.5 percentiles of C_b*L* + B_b over bootstrap fits",
        }
    targets = {}
    for lay in layers:
        model = imp.floor_model(lay, cap, g_value)
        info = {
            "F": lay.n_features,
            "alpha": lay.alpha,
            "L0": lay.l0,
            "g": model.g,
            "d_star": model.d_star,
            "source": lay.source,
        }
        summary["layers"][str(lay.layer)] = info
        alpha_txt = "?" if lay.alpha is None else f"{lay.alpha:.5f}"
        common.log(f"layer {lay.layer}: F={lay.n_features:,} alpha={alpha_txt} g={model.g:.4g} d*={model.d_star:,.1f}")
        ws = list(width_list) if width_list is not None else []
        if target_loss is not None:
            if cal is not None:
                d, why = theory.target_width(model, target_loss, scale=cal["C"], baseline=cal["B"], calibrated=True)
            else:
                d, why = theory.target_width(model, target_loss)
            targets[str(lay.layer)] = {"min_width": d, "message": why}
            if d is None:
                common.warn(f"layer {lay.layer}: {why}")
            else:
                common.log(f"layer {lay.layer}: minimum width {d:,}: {why}")
            if width_list is None and d is not None:
                ws = [d]
        if not ws:
            continue
        w_arr = np.asarray(ws, dtype=np.int64)
        kept = np.atleast_1d(model.kept(w_arr))
        floor = np.atleast_1d(model.floor(w_arr))
        ref = floor[int(np.argmin(w_arr))]
        columns["layer"] += [lay.layer] * len(ws)
        columns["width"] += w_arr.tolist()
        columns["features_kept"] += kept.tolist()
        columns["features_dropped"] += (lay.n_features - kept).tolist()
        columns["floor"] += floor.tolist()
        columns["normalized"] += [float(f / ref) if ref > 0 else None for f in floor]
        if cal is not None:
            mid, lo, hi = calib_mod.calibrated_floor(cal, floor)
            columns["floor_kl"] += mid.tolist()
            columns["floor_kl_low"] += [None] * len(ws) if lo is None else lo.tolist()
            columns["floor_kl_high"] += [None] * len(ws) if hi is None else hi.tolist()
            problems = calib_mod.scale_mismatch(calib, w_arr, floor)
            if problems:
                common.warn(
                    f"layer {lay.layer}: {calibration} was fit on other predicted floors ("
                    + "; ".join(problems[:2])
                    + ("; ..." if len(problems) > 2 else "")
                    + "): its C maps those importance units, not these"
                )
    if target_loss is not None:
        summary["target"] = {
            "loss": target_loss,
            "units": "nats (calibrated)" if cal is not None else "importance",
            "layers": targets,
        }
    common.emit_table(
        columns,
        fmt=fmt,
        output=output,
        kind="kdtool.predict",
        provenance=common.make_provenance(inputs=[p for p in (stats, calibration) if p is not None]),
        title=f"predicted floors (capacity {summary['capacity']})",
        summary=summary,
    )
