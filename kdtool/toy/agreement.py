"""How well a predicted floor matches a measured one: Pearson r (linear and log-log), MAPE, median accuracy, R^2.

Shared by the summary of Eq. 2 (kdtool.toy.stats) and of the measured-kept predictor
(kdtool.toy.survival), so the two are scored by the same definitions (docs/toy.md):
accuracy = 1 - |pred - actual| / actual per point (negative when pred > 2 actual);
MAPE = mean |pred - actual| / actual x 100; R^2 = 1 - SS_res/SS_tot of the prediction as is.
"""

from __future__ import annotations

import numpy as np


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r, or None with fewer than 3 points or a constant side."""
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def r2(actual: np.ndarray, pred: np.ndarray) -> float | None:
    """1 - SS_res/SS_tot of `pred` as is (no fitted scale or offset); None when SS_tot is 0."""
    if len(actual) < 2:
        return None
    ss_tot = float(np.sum((actual - actual.mean()) ** 2))
    if ss_tot == 0:
        return None
    return 1.0 - float(np.sum((actual - pred) ** 2)) / ss_tot


def agreement(actual: np.ndarray, pred: np.ndarray) -> dict:
    """The scores of `pred` against `actual` (actual > 0 everywhere: the caller keeps only such points)."""
    rel = np.abs(pred - actual) / actual
    pos = (actual > 0) & (pred > 0)
    return {
        "points": int(len(actual)),
        "pearson_r": pearson(actual, pred),
        "pearson_r_loglog": pearson(np.log(actual[pos]), np.log(pred[pos])) if pos.sum() >= 3 else None,
        "mape_percent": float(100 * rel.mean()) if len(rel) else None,
        "median_accuracy": float(np.median(1 - rel)) if len(rel) else None,
        "r2": r2(actual, pred),
    }
