"""Calibrating Eq. 2's predicted floor against observed distillation floors (paper section 6.3).

Four fits (kdtool.theory.fits), each reported with R^2 = 1 - SS_res / SS_tot, RMSE, leave-one-out
(LOO) prediction error and seeded bootstrap 95% intervals (kdtool.theory.resampling):

    linear        y = C x                  (x = predicted floor; least squares through the origin)
    affine        y = C x + B              (least squares)
    affine_fixed  y = C x + B, B fixed     (B given, or the observed floor at a control width;
                                            C fit on the other widths)
    power_law     y = a d^-gamma + c       (d = width; a >= 0, gamma in [1e-3, 10], c >= 0)

and a decomposition per width: geometric = C x, baseline = B, pct_geometric = (y - B) / y.
See docs/theory.md for the choices (bootstrap scheme, what R^2 is computed over).

This module reads the observed (and predicted) floors, runs the fits and builds calib.json
(`calibrate_files`); kdtool.theory.calibrated reads it back for predict --calibration.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdtool import teachers
from kdtool.errors import BadInput
from kdtool.formats import numeric_column, read_table
from kdtool.kinds import expect
from kdtool.theory.calibrated import KIND
from kdtool.theory.fits import GAMMA_BOUNDS, models
from kdtool.theory.resampling import fit_one

FITS = ("linear", "affine", "affine_fixed", "power_law")
#: fewest distinct widths calibrate accepts (an affine fit through 2 points has nothing left to test).
MIN_WIDTHS = 3


@dataclass
class CalibrationConfig:
    """Options of one `kdtool calibrate` run."""

    baseline: float | None = None  # B for affine_fixed, given directly (--baseline)
    baseline_width: int | None = None  # B = observed floor at this width; C fit on the others (--baseline-width)
    bootstrap: int = 1000  # bootstrap resamples for the 95% intervals; 0 turns them off (--bootstrap)
    seed: int = 0  # seeds the bootstrap (--seed)
    method: Literal["residual", "pairs"] = "residual"  # bootstrap scheme (--bootstrap-method)
    decomposition_fit: Literal["auto", "affine", "affine_fixed"] = "auto"  # auto: affine_fixed if B given
    samples_kept: int = 1000  # bootstrap samples of C (and B) stored in calib.json for predict's band

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline_width is not None:
            raise BadInput("--baseline and --baseline-width both fix B: give only one")
        if self.baseline is not None and not math.isfinite(self.baseline):
            raise BadInput(f"--baseline must be a finite number, got {self.baseline}")
        if self.baseline_width is not None and self.baseline_width < 1:
            raise BadInput(f"--baseline-width must be a width >= 1, got {self.baseline_width}")
        if self.bootstrap < 0:
            raise BadInput(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.method not in ("residual", "pairs"):
            raise BadInput(f"--bootstrap-method must be residual or pairs, got {self.method!r}")
        if self.decomposition_fit not in ("auto", "affine", "affine_fixed"):
            raise BadInput(f"--decomposition-fit must be auto, affine or affine_fixed, got {self.decomposition_fit!r}")

    @property
    def has_baseline(self) -> bool:
        return self.baseline is not None or self.baseline_width is not None


@dataclass(frozen=True)
class Points:
    """Observed floors by width, with Eq. 2's predicted floor where known."""

    width: np.ndarray  # [n] student widths d_S
    observed: np.ndarray  # [n] observed floors (e.g. per-token KL, nats)
    predicted: np.ndarray | None  # [n] predicted floors L*(d_S) in importance units, or None


# ---------------------------------------------------------------------------------------------
# Reading inputs


def _positive_widths(cols: dict, path: Path) -> np.ndarray:
    w = numeric_column(cols, "width", path)
    if np.any(w <= 0) or np.any(w != np.round(w)):
        raise BadInput(f"{path}: column 'width' must hold positive integers")
    return w.astype(np.int64)


def _select_layer(cols: dict, path: Path, layer: int | None) -> dict:
    """Keep one layer's rows of a predict table (several layers need --layer)."""
    if "layer" not in cols:
        return cols
    try:
        layers = np.asarray(cols["layer"], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInput(f"{path}: column 'layer' is not numeric") from None
    present = sorted({int(v) for v in layers if math.isfinite(v)})
    if layer is None:
        if len(present) > 1:
            raise BadInput(f"{path}: has layers {', '.join(map(str, present))}; pick one with --layer")
        return cols
    if layer not in present:
        raise BadInput(f"--layer: layer {layer} not in {path} (it has: {', '.join(map(str, present)) or 'none'})")
    keep = layers == layer
    return {k: np.asarray(v)[keep] for k, v in cols.items()}


#: --loss value that fits the floors of every loss together
POOLED = "pooled"


def select_loss(cols: dict, path: Path, loss: str | None) -> tuple[dict, str]:
    """Keep one loss's rows of a floors table (`distill --loss`): (columns, the loss used).

    Default: kl when the table has it (the paper's objective; tables from before --loss are all kl),
    else its only loss; a table of several losses without kl needs --loss. `pooled` keeps every row:
    one fit over all losses, which treats the objective as noise around one floor curve.
    """
    names = list(dict.fromkeys(str(x) for x in cols["loss"])) if "loss" in cols else ["kl"]
    if loss == POOLED:
        return cols, POOLED
    if loss is None:
        if "kl" not in names and len(names) > 1:
            raise BadInput(f"{path}: has floors of {', '.join(names)}; pick one with --loss NAME, or --loss {POOLED}")
        loss = "kl" if "kl" in names else names[0]
    if loss not in names:
        raise BadInput(f"--loss {loss}: {path} has floors of {', '.join(names)} only")
    if "loss" not in cols:
        return cols, loss
    keep = np.asarray([str(x) == loss for x in cols["loss"]])
    return {k: np.asarray(v)[keep] for k, v in cols.items()}, loss


def load_points(
    observed: str | os.PathLike,
    *,
    predicted: str | os.PathLike | None = None,
    column: str = "floor",
    layer: int | None = None,
    loss: str | None = None,
) -> Points:
    """Observed floors (width + `column`) of one loss (`select_loss`), joined by width with a predicted floor.

    The predicted floor comes from `--predicted` (the output of `kdtool predict`: its `floor`
    column) when given, else from an optional `predicted` column of the observed table.
    """
    obs_path = Path(observed)
    cols, _ = select_loss(read_table(obs_path, required=("width", column)), obs_path, loss)
    if predicted is None:
        cols = _select_layer(cols, obs_path, layer)
    width = _positive_widths(cols, obs_path)
    y = numeric_column(cols, column, obs_path)
    if np.any(y < 0):
        raise BadInput(f"{obs_path}: column {column!r} has negative floors (a KL floor is >= 0)")
    x = None
    if predicted is not None:
        pred_path = Path(predicted)
        pcols = read_table(pred_path, required=("width", "floor"))
        pcols = _select_layer(pcols, pred_path, layer)
        pw = _positive_widths(pcols, pred_path)
        pf = numeric_column(pcols, "floor", pred_path)
        lookup: dict[int, float] = {}
        for w_, f_ in zip(pw.tolist(), pf.tolist(), strict=True):
            if w_ in lookup and lookup[w_] != f_:
                raise BadInput(
                    f"{pred_path}: width {w_} appears twice with different floors; pick a layer with --layer"
                )
            lookup[w_] = f_
        absent = sorted({int(w_) for w_ in width if int(w_) not in lookup})
        if absent:
            raise BadInput(f"{pred_path}: no predicted floor for width(s) {', '.join(map(str, absent))} of {obs_path}")
        x = np.array([lookup[int(w_)] for w_ in width], dtype=np.float64)
    elif "predicted" in cols:
        x = numeric_column(cols, "predicted", obs_path)
    if x is not None and np.any(x < 0):
        raise BadInput(f"{predicted or obs_path}: predicted floors must be >= 0")
    order = np.argsort(width, kind="stable")
    return Points(width=width[order], observed=y[order], predicted=None if x is None else x[order])


# ---------------------------------------------------------------------------------------------
# Fitting


def calibrate(points: Points, cfg: CalibrationConfig) -> dict[str, Any]:
    """All four fits and the decomposition table, as a JSON-able dict (calib.json without kind/provenance)."""
    width = points.width.astype(np.float64)
    y = points.observed
    if np.unique(points.width).size < MIN_WIDTHS:
        raise BadInput(f"calibrate needs at least {MIN_WIDTHS} distinct widths, got {np.unique(points.width).size}")
    baseline, baseline_source = cfg.baseline, "--baseline" if cfg.baseline is not None else None
    fixed_mask = np.ones(len(y), dtype=bool)
    if cfg.baseline_width is not None:
        at = points.width == cfg.baseline_width
        if not np.any(at):
            raise BadInput(
                f"--baseline-width: width {cfg.baseline_width} is not in the observed data "
                f"(widths: {', '.join(map(str, np.unique(points.width).tolist()))})"
            )
        baseline = float(y[at].mean())
        baseline_source = f"observed floor at width {cfg.baseline_width}"
        fixed_mask = ~at
    rng = np.random.default_rng(cfg.seed)
    result: dict[str, Any] = {
        "points": [
            {
                "width": int(w_),
                "observed": float(o),
                "predicted": None if points.predicted is None else float(points.predicted[i]),
            }
            for i, (w_, o) in enumerate(zip(points.width, y, strict=True))
        ],
        "config": asdict(cfg),
    }
    all_models = models(baseline)
    for name in FITS:
        if name == "affine_fixed" and baseline is None:
            result[name] = {
                "model": "y = C * predicted + B (B fixed)",
                "skipped": "no baseline: give --baseline B or --baseline-width W",
            }
            continue
        model = all_models[name]
        if model.x == "predicted" and points.predicted is None:
            result[name] = {
                "model": model.formula,
                "skipped": "no predicted floors: give --predicted PRED or a 'predicted' column",
            }
            continue
        x = points.predicted if model.x == "predicted" else width
        mask = fixed_mask if name == "affine_fixed" else np.ones(len(y), dtype=bool)
        result[name] = fit_one(
            model,
            x,
            y,
            mask,
            points.width,
            resamples=cfg.bootstrap,
            method=cfg.method,
            samples_kept=cfg.samples_kept,
            rng=rng,
        )
        if name == "affine_fixed" and "skipped" not in result[name]:
            result[name]["B"] = float(baseline)
            result[name]["B_source"] = baseline_source
        if name == "power_law" and "gamma" in result[name]:
            gm = result[name]["gamma"]
            result[name]["at_bound"] = bool(np.isclose(gm, GAMMA_BOUNDS[0]) or np.isclose(gm, GAMMA_BOUNDS[1]))
    if all("skipped" in result[name] for name in FITS):
        raise BadInput("no fit is possible on these points: " + "; ".join(f"{n}: {result[n]['skipped']}" for n in FITS))
    result["decomposition_fit"], result["decomposition"] = _decomposition(points, result, cfg)
    return result


def _decomposition(points: Points, result: dict, cfg: CalibrationConfig) -> tuple[dict, list[dict]]:
    """Per width: geometric = C x, baseline = B, pct_geometric = (observed - B) / observed (paper Table 5)."""
    name = cfg.decomposition_fit
    if name == "auto":
        name = "affine_fixed" if cfg.has_baseline else "affine"
    fit = result.get(name, {})
    if "skipped" in fit or points.predicted is None:
        return {"fit": name, "skipped": fit.get("skipped", "no predicted floors")}, []
    c, b = fit["C"], fit["B"]
    rows = []
    for w_, o, x in zip(points.width.tolist(), points.observed.tolist(), points.predicted.tolist(), strict=True):
        rows.append(
            {
                "width": int(w_),
                "observed": o,
                "predicted": x,
                "geometric": c * x,
                "baseline": b,
                "fitted": c * x + b,
                "pct_geometric": (o - b) / o if o > 0 else None,
            }
        )
    return {"fit": name, "C": c, "B": b}, rows


# ---------------------------------------------------------------------------------------------
# From files to calib.json (kdtool calibrate)


@dataclass
class Calibration:
    """One calibration of an observed table: the fits as calib.json holds them, and what to warn about."""

    inputs: dict[str, Any]  # observed, predicted, column, layer: the files and columns read
    result: dict[str, Any]  # `calibrate`'s dict: points, config, the four fits, the decomposition
    warnings: list[str] = field(default_factory=list)  # skipped fits and power-law fits at a gamma bound

    def document(self, provenance: dict) -> dict[str, Any]:
        """calib.json: kind, inputs, the result, provenance (read back by kdtool.theory.calibrated.load)."""
        return {"kind": KIND, "inputs": self.inputs, **self.result, "provenance": provenance}


#: Data sets shipped with kdtool (`calibrate --example NAME`): the paper's own numbers, reachable from anywhere.
EXAMPLES = {"paper": "paper_pythia410m.csv"}
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def example_path(name: str) -> Path:
    """The shipped file behind `--example NAME` (BadInput naming the known ones otherwise)."""
    if name not in EXAMPLES:
        raise BadInput(f"--example {name!r}: no such data set (known: {', '.join(EXAMPLES)})")
    return DATA_DIR / EXAMPLES[name]


def observed_input(observed: str | os.PathLike | None, example: str | None) -> Path:
    """OBSERVED or --example: exactly one of them names the observed floors."""
    if observed is None and example is None:
        raise BadInput("no observed floors: give OBSERVED (e.g. students/floors.parquet) or --example paper")
    if observed is not None and example is not None:
        raise BadInput(f"give OBSERVED ({observed}) or --example {example}, not both")
    return Path(observed) if example is None else example_path(example)


def calibrate_files(
    observed: str | os.PathLike,
    cfg: CalibrationConfig,
    *,
    predicted: str | os.PathLike | None = None,
    column: str = "floor",
    layer: int | None = None,
    loss: str | None = None,
) -> Calibration:
    """Read the observed floors of one loss, or all (`select_loss`; joined with `predicted` by width), run
    every fit, and list the warnings. One calibration per loss: call once per --loss.

    A skipped affine_fixed is only a warning when a baseline was asked for; a power law whose
    gamma sits on GAMMA_BOUNDS is flagged.
    """
    expect(observed, "kdtool.distill.floors", "OBSERVED")
    if predicted is not None:
        expect(predicted, "kdtool.predict", "--predicted")
    table = read_table(observed, required=("width", column))
    used = select_loss(table, Path(observed), loss)[1]
    points = load_points(observed, predicted=predicted, column=column, layer=layer, loss=used)
    result = calibrate(points, cfg)
    warnings = []
    names = list(dict.fromkeys(str(x) for x in table.get("loss", [])))
    if loss is None and len(names) > 1:
        warnings.append(f"{observed} has floors of {', '.join(names)}: calibrating {used} (--loss picks another)")
    for name in FITS:
        if "skipped" in result[name] and not (name == "affine_fixed" and not cfg.has_baseline):
            warnings.append(f"{name} fit skipped: {result[name]['skipped']}")
        elif result[name].get("at_bound"):
            warnings.append(f"power_law: gamma = {result[name]['gamma']:.4g} is at its search bound {GAMMA_BOUNDS}")
    inputs = {
        "observed": str(observed),
        "predicted": None if predicted is None else str(predicted),
        "column": column,
        "layer": layer,
        "loss": used,
        # the teacher these floors measure: the report combines this calibration only with files of the same model
        "model": teachers.of_file(observed) or (teachers.of_file(predicted) if predicted is not None else None),
    }
    return Calibration(inputs=inputs, result=result, warnings=warnings)
