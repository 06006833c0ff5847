"""The calibration models: each fits observed floors y to a regressor x and predicts y from it.

    linear        y = C x                  (x = predicted floor; least squares through the origin)
    affine        y = C x + B              (least squares)
    affine_fixed  y = C x + B, B fixed     (C fit with B given)
    power_law     y = a d^-gamma + c       (d = width; a >= 0, gamma in GAMMA_BOUNDS, c >= 0)

A `Model` is data (formula, parameter names, fit/predict callables); kdtool.theory.resampling
scores, cross-validates and bootstraps them; kdtool.theory.calibration runs them on a table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import least_squares

#: gamma is searched in this interval (the paper's 0.47 is well inside; a fit at a bound is flagged).
GAMMA_BOUNDS = (1e-3, 10.0)


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


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """1 - SS_res / SS_tot (negative when the model is worse than the mean, as the paper's linear fit)."""
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - y_hat) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("-inf"))
