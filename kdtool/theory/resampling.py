"""Scoring one calibration model on observed floors: the fit, R^2 and RMSE, leave-one-out, bootstrap 95% intervals.

Bootstrap schemes (docs/theory.md): residual keeps the widths and resamples centred residuals
scaled by sqrt(n/(n-p)); pairs resamples (x, y) points. Samples on which a model is not
identifiable (`Degenerate`) are skipped and counted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kdtool.theory.fits import Degenerate, Model, r_squared


def _round(values, digits: int = 8) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).tolist()]


def _bootstrap(
    model: Model,
    x: np.ndarray,
    y: np.ndarray,
    params: np.ndarray,
    *,
    resamples: int,
    method: str,
    samples_kept: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Bootstrap the fit. residual: y* = y_hat + resampled residuals (centred, scaled by sqrt(n/(n-p)));
    pairs: resample (x, y) points. Samples on which the model is not identifiable are skipped."""
    n, k = len(y), len(model.params)
    info: dict[str, Any] = {"n": resamples, "method": method, "ok": 0}
    if resamples == 0:
        return info
    y_hat = model.predict(params, x)
    resid = y - y_hat
    if method == "residual":
        if n - k <= 0:
            info["note"] = "no residual degrees of freedom"
            return info
        resid = (resid - resid.mean()) * math.sqrt(n / (n - k))
    samples = []
    for _ in range(resamples):
        if method == "residual":
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
        keep = arr[:samples_kept]
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
    widths: np.ndarray,
    *,
    resamples: int,
    method: str,
    samples_kept: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Fit on the masked points; score (R^2, RMSE) on all points; LOO and bootstrap on the fit points.

    resamples, method and samples_kept are CalibrationConfig's bootstrap, method and samples_kept.
    """
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
    boot = _bootstrap(model, x, y, params, resamples=resamples, method=method, samples_kept=samples_kept, rng=rng)
    out["ci95"] = boot.pop("ci95", None)
    out["bootstrap"] = boot
    return out
