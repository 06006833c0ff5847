"""kdtool calibrate: fit observed distillation floors against Eq. 2's prediction (paper section 6.3).

Thin: build a CalibrationConfig, run kdtool.theory.calibration.calibrate_files (read and join the
tables, fit), write calib.json and/or print the fits and the decomposition.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common, options

BootMethod = options.choices("BootMethod", "residual", "pairs")
DecompFit = options.choices("DecompFit", "auto", "affine", "affine_fixed")


def main(
    observed: Annotated[
        Optional[Path],
        typer.Argument(
            help="Observed floors: CSV/Parquet/JSON with columns width and floor (e.g. students/floors.parquet); "
            "an optional predicted column is used when --predicted is not given. Or --example.",
            show_default=False,
        ),
    ] = None,
    example: Annotated[
        Optional[str],
        typer.Option(
            "--example",
            help="Use a data set shipped with kdtool instead of OBSERVED: `paper` = the paper's Pythia-410M "
            "floors and predictions (Tables 2-3).",
            show_default=False,
        ),
    ] = None,
    predicted: Annotated[
        Optional[Path],
        typer.Option("--predicted", "-p", help="Output of `kdtool predict` (csv/parquet/json), joined by width."),
    ] = None,
    layer: Annotated[
        Optional[int], typer.Option("--layer", "-l", help="Layer of a multi-layer --predicted table to use.")
    ] = None,
    column: Annotated[str, typer.Option("--column", help="Column of OBSERVED holding the observed floor.")] = "floor",
    loss: Annotated[
        Optional[str],
        typer.Option(
            "--loss",
            help="Which loss's floors to fit when OBSERVED has several (`distill --loss`): a loss name (one "
            "calibration per loss), or pooled (one fit over all). Default: kl when present, else the only one.",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        Optional[float], typer.Option("--baseline", help="Fix B for the affine_fixed fit (nats).")
    ] = None,
    baseline_width: Annotated[
        Optional[int],
        typer.Option(
            "--baseline-width",
            help="Fix B = the observed floor at this control width (the paper: 1024); "
            "affine_fixed fits C on the other widths.",
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% intervals (0: none).")
    ] = 1000,
    method: Annotated[
        BootMethod,
        typer.Option(
            "--bootstrap-method", help="residual (fixed widths, resampled residuals) or pairs (resampled points)."
        ),
    ] = BootMethod.residual,
    decomposition_fit: Annotated[
        DecompFit,
        typer.Option(
            "--decomposition-fit",
            help="Fit whose C and B the decomposition uses; auto: affine_fixed when a baseline is given, else affine.",
        ),
    ] = DecompFit.auto,
    seed: common.SeedOpt = 0,
    output: common.OutputOpt = None,
) -> None:
    """Fit observed floors to the predicted floor: linear, affine, affine_fixed and power-law fits.

    Each fit reports R^2 = 1 - SS_res/SS_tot, RMSE, leave-one-out error and bootstrap 95%
    intervals; the decomposition splits each floor into geometric C*predicted and baseline B.
    Like predict: without -o the result goes to stdout, as tables on a terminal and as calib.json's
    JSON in a pipe (or with --json); with -o FILE it is written there (read by `predict
    --calibration`) and the tables go to stderr.

    Example: kdtool calibrate --example paper --baseline-width 1024 -o calib.json
    """
    from kdtool.theory import calibration as cal

    observed = cal.observed_input(observed, example)
    cfg = cal.CalibrationConfig(
        baseline=baseline,
        baseline_width=baseline_width,
        bootstrap=bootstrap,
        seed=seed,
        method=method.value,
        decomposition_fit=decomposition_fit.value,
    )
    run = cal.calibrate_files(observed, cfg, predicted=predicted, column=column, layer=layer, loss=loss)
    for message in run.warnings:
        common.warn(message)
    obj = run.document(
        common.make_provenance(
            inputs=[p for p in (observed, predicted) if p is not None], seed=seed, config=run.result["config"]
        )
    )
    if not common.to_stdout(output):  # the data to the file; the tables to stderr, or --json's copy to stdout
        common.emit_json(obj, output)
        common.log(f"wrote {output}")
        if common.STATE.json:
            common.emit_json(obj)
        elif not common.STATE.quiet:
            _show(run.result, common.err_console())
    elif common.STATE.json or not sys.stdout.isatty():  # stdout is a pipe or a file: calib.json itself
        common.emit_json(obj)
    else:  # a person at a terminal: the tables
        _show(run.result, common.out_console())


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _show(result: dict, console) -> None:
    """The human tables (the fits, then the decomposition) on `console`."""
    from rich import box
    from rich.table import Table

    from kdtool.theory.calibration import FITS

    fits = Table(
        title="calibration fits (95% CI: bootstrap; LOO: leave-one-out RMSE)", title_justify="left", box=box.SIMPLE_HEAD
    )
    for name in ("fit", "param", "value", "95% CI", "R^2", "RMSE", "LOO"):
        fits.add_column(name, justify="left" if name in ("fit", "param") else "right", no_wrap=True)
    for name in FITS:
        entry = result[name]
        if "skipped" in entry:
            fits.add_row(name, "", "skipped", "", "", "", "")
            continue
        ci = entry.get("ci95") or {}
        keys = [k for k in ("C", "B", "a", "gamma", "c") if k in entry]
        for i, key in enumerate(keys):
            fixed = name == "affine_fixed" and key == "B"
            band = f"[{ci[key][0]:.3g}, {ci[key][1]:.3g}]" if key in ci else ("fixed" if fixed else "-")
            scores = (f"{entry['r2']:.4f}", _fmt(entry["rmse"]), _fmt(entry["loo_rmse"])) if i == 0 else ("", "", "")
            fits.add_row(name if i == 0 else "", key, _fmt(entry[key]), band, *scores)
    console.print(fits)
    for name in FITS:
        if "skipped" in result[name]:
            console.print(f"  {name}: skipped: {result[name]['skipped']}")
    dfit, rows = result["decomposition_fit"], result["decomposition"]
    if not rows:
        console.print(f"decomposition: none ({dfit.get('skipped', 'no predicted floors')})")
        return
    dec = Table(
        title=f"decomposition ({dfit['fit']}: C={dfit['C']:.4g}, B={dfit['B']:.4g})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for name in ("width", "observed", "predicted", "geometric C*pred", "baseline B", "% geometric"):
        dec.add_column(name, justify="right")
    for r in rows:
        pct = "-" if r["pct_geometric"] is None else f"{100 * r['pct_geometric']:.1f}%"
        dec.add_row(
            str(r["width"]),
            f"{r['observed']:.4g}",
            f"{r['predicted']:.4g}",
            f"{r['geometric']:.4g}",
            f"{r['baseline']:.4g}",
            pct,
        )
    console.print(dec)
