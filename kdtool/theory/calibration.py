"""Calibrating Eq. 2's predicted floor against observed distillation floors (paper section 6.3).

Four fits, each reported with R^2 = 1 - SS_res / SS_tot, RMSE, leave-one-out (LOO) prediction
error and seeded bootstrap 95% intervals:

    linear        y = C x                  (x = predicted floor; least squares through the origin)
    affine        y = C x + B              (least squares)
    affine_fixed  y = C x + B, B fixed     (B given, or the observed floor at a control width;
                                            C fit on the other widths)
    power_law     y = a d^-gamma + c       (d = width; a >= 0, gamma in [1e-3, 10], c >= 0)

and a decomposition per width: geometric = C x, baseline = B, pct_geometric = (y - B) / y.
See docs/theory.md for the choices (bootstrap scheme, what R^2 is computed over).

numpy at module top; scipy.optimize is imported inside the power-law fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdtool.errors import BadInput
from kdtool.formats import numeric_column, read_json, read_table

KIND = "kdtool.calibration"
FITS = ("linear", "affine", "affine_fixed", "power_law")
#: gamma is searched in this interval (the paper's 0.47 is well inside; a fit at a bound is flagged).
GAMMA_BOUNDS = (1e-3, 10.0)
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


def load_points(
    observed: str | os.PathLike,
    *,
    predicted: str | os.PathLike | None = None,
    column: str = "floor",
    layer: int | None = None,
) -> Points:
    """Observed floors (width + `column`), joined by width with a predicted floor.

    The predicted floor comes from `--predicted` (the output of `kdtool predict`: its `floor`
    column) when given, else from an optional `predicted` column of the observed table.
    """
    obs_path = Path(observed)
    cols = read_table(obs_path, required=("width", column))
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
# The four models: fit(x, y) -> params; predict(params, x) -> y_hat


@dataclass(frozen=True)
class Model:
    name: str
    formula: str
    x: Literal["predicted", "width"]  # which column is the regressor
    params: tuple[str, ...]  # free parameters, in the order fit() returns them
    fit: Callable[[np.ndarray, np.ndarray], np.ndarray]
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray]
    min_points: int  # fewest fit points that leave a residual degree of freedom
    min_distinct: int  # fewest distinct x values that make the fit well posed
    polish: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None  # main fit only


class Degenerate(ValueError):
    """A (bootstrap or LOO) sample on which a model is not identifiable; the sample is skipped."""


def _fit_linear(x, y):
    sxx = float(x @ x)
    if sxx <= 0:
        raise Degenerate("all predicted floors are 0")
    return np.array([float(x @ y) / sxx])


def _fit_affine(x, y):
    if np.ptp(x) <= 0:
        raise Degenerate("predicted floors are all equal")
    xm, ym = x.mean(), y.mean()
    c = float((x - xm) @ (y - ym)) / float((x - xm) @ (x - xm))
    return np.array([c, ym - c * xm])


def _fixed_baseline(b: float):
    def fit(x, y):
        sxx = float(x @ x)
        if sxx <= 0:
            raise Degenerate("all predicted floors are 0")
        return np.array([float(x @ (y - b)) / sxx])

    def predict(p, x):
        return p[0] * x + b

    return fit, predict


def _power_profile(d: np.ndarray, y: np.ndarray, gammas: np.ndarray):
    """For each gamma, the best a >= 0, c >= 0 (a 2-variable non-negative least squares, closed form).

    u = (d / d_min)^-gamma keeps the columns O(1); a = a' * d_min^gamma undoes the scaling.
    Returns sse [G], a' [G], c [G].
    """
    u = (d[None, :] / d.min()) ** (-gammas[:, None])  # [G, n]
    ubar, ybar = u.mean(1), y.mean()
    du = u - ubar[:, None]
    suu = (du * du).sum(1)
    a_free = np.where(suu > 0, (du * (y - ybar)).sum(1) / np.where(suu > 0, suu, 1.0), 0.0)
    c_free = ybar - a_free * ubar
    a_zero_c = np.maximum((u * y).sum(1) / (u * u).sum(1), 0.0)  # c = 0
    cands = [
        (a_free, c_free),
        (np.zeros_like(ubar), np.full_like(ubar, max(ybar, 0.0))),
        (a_zero_c, np.zeros_like(ubar)),
    ]
    best_sse = np.full(gammas.shape, np.inf)
    best_a, best_c = np.zeros_like(ubar), np.zeros_like(ubar)
    for a, c in cands:
        ok = (a >= 0) & (c >= 0)
        r = y[None, :] - a[:, None] * u - c[:, None]
        sse = np.where(ok, (r * r).sum(1), np.inf)
        better = sse < best_sse
        best_sse = np.where(better, sse, best_sse)
        best_a, best_c = np.where(better, a, best_a), np.where(better, c, best_c)
    return best_sse, best_a, best_c


def _fit_power_law(d, y):
    """y = a d^-gamma + c by variable projection: a 1-D profile over gamma, zoomed in from each local minimum.

    Multi-start: the profile SSE(gamma) is evaluated on a log grid over GAMMA_BOUNDS; each of
    its (up to 3) best local minima is refined by repeated 41-point grids on the bracket
    around it (each round shrinks the bracket 20x; 6 rounds reach ~1e-9 relative), and the
    best is kept, so a poor start cannot trap the fit. Vectorised numpy: ~1 ms per fit,
    cheap enough for the bootstrap. `_polish_power_law` then runs scipy.optimize on the main fit.
    """
    if np.unique(d).size < 3:
        raise Degenerate("needs 3 distinct widths")
    lo, hi = GAMMA_BOUNDS
    grid = np.geomspace(lo, hi, 121)
    sse, _, _ = _power_profile(d, y, grid)
    last = len(grid) - 1
    inner = [i for i in range(len(grid)) if sse[i] <= sse[max(i - 1, 0)] and sse[i] <= sse[min(i + 1, last)]]
    starts = sorted(inner, key=lambda i: sse[i])[:3] or [int(np.argmin(sse))]
    left = np.array([grid[max(i - 1, 0)] for i in starts])  # [S] one bracket per start, refined together
    right = np.array([grid[min(i + 1, last)] for i in starts])
    best_sse, gamma = float(sse[starts[0]]), float(grid[starts[0]])
    steps = np.linspace(0.0, 1.0, 41)
    for _ in range(6):
        sub = left[:, None] + (right - left)[:, None] * steps[None, :]  # [S, 41]
        s_sub = _power_profile(d, y, sub.ravel())[0].reshape(sub.shape)
        j = np.argmin(s_sub, axis=1)  # [S]
        k = int(np.argmin(s_sub[np.arange(len(j)), j]))
        if s_sub[k, j[k]] < best_sse:
            best_sse, gamma = float(s_sub[k, j[k]]), float(sub[k, j[k]])
        rows = np.arange(len(j))
        left, right = sub[rows, np.maximum(j - 1, 0)], sub[rows, np.minimum(j + 1, 40)]
    _, a_scaled, c = _power_profile(d, y, np.array([gamma]))
    a = float(a_scaled[0]) * float(d.min()) ** gamma
    return np.array([a, gamma, float(c[0])])


def _polish_power_law(d, y, p):
    """Joint bounded least squares (scipy.optimize.least_squares) from the profile solution; kept if better."""
    from scipy.optimize import least_squares

    lo, hi = GAMMA_BOUNDS
    scale = float(d.min())

    def resid(q):  # q = (a', gamma, c) with a = a' * d_min^gamma
        return q[0] * (d / scale) ** (-q[1]) + q[2] - y

    q0 = np.array([p[0] * scale ** (-p[1]), np.clip(p[1], lo, hi), max(p[2], 0.0)])
    try:
        res = least_squares(
            resid, q0, bounds=([0.0, lo, 0.0], [np.inf, hi, np.inf]), xtol=1e-14, ftol=1e-14, gtol=1e-14
        )
    except ValueError:
        return p
    if 2 * res.cost < float((resid(q0) ** 2).sum()):
        return np.array([res.x[0] * scale ** res.x[1], res.x[1], res.x[2]])
    return p


def _predict_power_law(p, d):
    return p[0] * np.asarray(d, dtype=np.float64) ** (-p[1]) + p[2]


def models(baseline: float | None) -> dict[str, Model]:
    out = {
        "linear": Model("linear", "y = C * predicted", "predicted", ("C",), _fit_linear, lambda p, x: p[0] * x, 2, 1),
        "affine": Model(
            "affine", "y = C * predicted + B", "predicted", ("C", "B"), _fit_affine, lambda p, x: p[0] * x + p[1], 3, 2
        ),
        "power_law": Model(
            "power_law",
            "y = a * width^-gamma + c",
            "width",
            ("a", "gamma", "c"),
            _fit_power_law,
            _predict_power_law,
            4,
            3,
            _polish_power_law,
        ),
    }
    if baseline is not None:
        fit, predict = _fixed_baseline(baseline)
        out["affine_fixed"] = Model(
            "affine_fixed", "y = C * predicted + B (B fixed)", "predicted", ("C",), fit, predict, 2, 1
        )
    return out


# ---------------------------------------------------------------------------------------------
# Fitting, scoring, bootstrapping


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """1 - SS_res / SS_tot (negative when the model is worse than the mean, as the paper's linear fit)."""
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - y_hat) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("-inf"))


def _round(values, digits: int = 8) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).tolist()]


def _bootstrap(
    model: Model, x: np.ndarray, y: np.ndarray, params: np.ndarray, cfg: CalibrationConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """Bootstrap the fit. residual: y* = y_hat + resampled residuals (centred, scaled by sqrt(n/(n-p)));
    pairs: resample (x, y) points. Samples on which the model is not identifiable are skipped."""
    n, k = len(y), len(model.params)
    info: dict[str, Any] = {"n": cfg.bootstrap, "method": cfg.method, "ok": 0}
    if cfg.bootstrap == 0:
        return info
    y_hat = model.predict(params, x)
    resid = y - y_hat
    if cfg.method == "residual":
        if n - k <= 0:
            info["note"] = "no residual degrees of freedom"
            return info
        resid = (resid - resid.mean()) * math.sqrt(n / (n - k))
    samples = []
    for _ in range(cfg.bootstrap):
        if cfg.method == "residual":
            xs, ys = x, y_hat + rng.choice(resid, size=n, replace=True)
        else:
            idx = rng.integers(0, n, size=n)
            xs, ys = x[idx], y[idx]
            if np.unique(xs).size < model.min_distinct:
                continue
        try:
            p = model.fit(xs, ys)
        except Degenerate:
            continue
        if np.all(np.isfinite(p)):
            samples.append(p)
    info["ok"] = len(samples)
    if not samples:
        return info
    arr = np.asarray(samples)  # [ok, k]
    info["ci95"] = {name: _round(np.percentile(arr[:, j], [2.5, 97.5])) for j, name in enumerate(model.params)}
    if model.x == "predicted":  # kept for predict --calibration's band; power_law has no use for them
        keep = arr[: cfg.samples_kept]
        info["samples"] = {name: _round(keep[:, j], 6) for j, name in enumerate(model.params)}
    return info


def _loo(model: Model, x: np.ndarray, y: np.ndarray, widths: np.ndarray) -> dict[str, Any]:
    """Leave-one-out: refit without point i, predict it. Errors are observed - predicted, per fit point."""
    n = len(y)
    if n - 1 < model.min_points - 1 or n - 1 < len(model.params):
        return {"loo_rmse": None, "loo_max_abs": None, "loo": None}
    errors: list[float | None] = []
    for i in range(n):
        keep = np.arange(n) != i
        try:
            if np.unique(x[keep]).size < model.min_distinct:
                raise Degenerate("too few distinct points")
            p = model.fit(x[keep], y[keep])
            errors.append(float(y[i] - model.predict(p, x[i : i + 1])[0]))
        except Degenerate:
            errors.append(None)
    per_point = [{"width": int(w_), "error": e} for w_, e in zip(widths.tolist(), errors, strict=True)]
    good = np.array([e for e in errors if e is not None])
    if good.size == 0:
        return {"loo_rmse": None, "loo_max_abs": None, "loo": per_point}
    return {"loo_rmse": float(np.sqrt(np.mean(good**2))), "loo_max_abs": float(np.max(np.abs(good))), "loo": per_point}


def fit_one(
    model: Model,
    x_all: np.ndarray,
    y_all: np.ndarray,
    fit_mask: np.ndarray,
    cfg: CalibrationConfig,
    rng: np.random.Generator,
    widths: np.ndarray,
) -> dict[str, Any]:
    """Fit on the masked points; score (R^2, RMSE) on all points; LOO and bootstrap on the fit points."""
    x, y = x_all[fit_mask], y_all[fit_mask]
    if len(y) < model.min_points or np.unique(x).size < model.min_distinct:
        return {
            "model": model.formula,
            "skipped": f"needs >= {model.min_points} points ({model.min_distinct} distinct), has {len(y)}",
        }
    try:
        params = model.fit(x, y)
    except Degenerate as exc:
        return {"model": model.formula, "skipped": str(exc)}
    if model.polish is not None:
        params = model.polish(x, y, params)
    y_hat = model.predict(params, x_all)
    out: dict[str, Any] = {"model": model.formula, "x": model.x}
    out.update({name: float(v) for name, v in zip(model.params, params, strict=True)})
    out["r2"] = r_squared(y_all, y_hat)
    out["rmse"] = float(np.sqrt(np.mean((y_all - y_hat) ** 2)))
    out["n"] = int(len(y_all))
    out["n_fit"] = int(len(y))
    out.update(_loo(model, x, y, widths[fit_mask]))
    boot = _bootstrap(model, x, y, params, cfg, rng)
    out["ci95"] = boot.pop("ci95", None)
    out["bootstrap"] = boot
    return out


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
        result[name] = fit_one(model, x, y, mask, cfg, rng, points.width)
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
# Using a calibration (predict --calibration)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read calib.json and check it is one."""
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"{p}: is a folder, expected calib.json")
    obj = read_json(p)
    if obj.get("kind") != KIND:
        raise BadInput(f"{p}: not a calibration file (kind={obj.get('kind')!r}; make one with kdtool calibrate -o)")
    return obj


def fit_params(calib: dict[str, Any], fit: str, path: str | os.PathLike = "calibration") -> dict[str, Any]:
    """C, B and bootstrap samples of one of the floor-scale fits (linear has B = 0)."""
    if fit not in ("linear", "affine", "affine_fixed"):
        raise BadInput(f"--fit: {fit!r} cannot map a predicted floor to nats (use affine, affine_fixed or linear)")
    entry = calib.get(fit)
    if not isinstance(entry, dict) or "C" not in entry:
        reason = entry.get("skipped") if isinstance(entry, dict) else "missing"
        raise BadInput(f"{path}: has no {fit} fit ({reason})")
    c = float(entry["C"])
    b = float(entry.get("B", 0.0))
    samples = (entry.get("bootstrap") or {}).get("samples") or {}
    cs = np.asarray(samples.get("C", []), dtype=np.float64)
    if fit == "affine":
        bs = np.asarray(samples.get("B", []), dtype=np.float64)
    else:
        bs = np.full(cs.shape, b)
    if cs.shape != bs.shape:
        raise BadInput(f"{path}: {fit} bootstrap samples of C and B differ in length")
    return {"fit": fit, "C": c, "B": b, "C_samples": cs, "B_samples": bs}


def calibrated_floor(params: dict[str, Any], floors: np.ndarray):
    """floor_kl = C L* + B; band = 2.5th / 97.5th percentiles of C_b L* + B_b over bootstrap samples b.

    The band is pointwise (per width) and reflects the fit's parameter uncertainty only.
    Without samples the band is None.
    """
    floors = np.asarray(floors, dtype=np.float64)
    mid = params["C"] * floors + params["B"]
    cs, bs = params["C_samples"], params["B_samples"]
    if cs.size == 0:
        return mid, None, None
    curves = cs[:, None] * floors[None, :] + bs[:, None]  # [samples, widths]
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    return mid, lo, hi


def scale_mismatch(calib: dict[str, Any], widths, floors, *, rtol: float = 0.05) -> list[str]:
    """Widths where this prediction differs from the predicted floor the calibration was fit on.

    A calibration maps one SAE's importance units to nats; applied to another it is meaningless.
    """
    fitted = {int(p["width"]): p.get("predicted") for p in calib.get("points", []) if p.get("predicted") is not None}
    out = []
    for w_, f_ in zip(np.asarray(widths).tolist(), np.asarray(floors).tolist(), strict=True):
        ref = fitted.get(int(w_))
        if ref is not None and not math.isclose(f_, ref, rel_tol=rtol, abs_tol=1e-12):
            out.append(f"width {w_}: predicted floor {f_:.4g} here vs {ref:.4g} in the calibration")
    return out
