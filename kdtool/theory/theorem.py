"""The minimum-width theorem (paper section 3): capacity g(alpha), d*, kept features, floors.

Definitions (paper Eq. 1-2, checked against Tables 1, 2 and 7 in tests/test_theory.py):
    g(alpha)   = 1 / ((1 - alpha) * ln(1 / (1 - alpha)))
    d*         = F / g(alpha)
    F_S(d_S)   = floor(d_S * g(alpha))            (capped at F)
    L*(d_S)    = sum_{i > F_S} w_i                (w sorted descending)
where w_i is the per-feature loss weight: I_i * E[x_i^2] in the toy model, and the SAE
importance E[z_i^2] for a real model (paper section 5.2 folds E[x^2] into I).

numpy only: this module is imported by commands that must start fast.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kdtool.errors import BadInput

Capacity = Literal["paper", "naive"]

#: Below this sparsity g(alpha) is not monotone (its minimum, e, is at alpha = 1 - 1/e).
MONOTONE_FROM = 1.0 - 1.0 / math.e


class NonMonotoneCapacity(UserWarning):
    """alpha < 1 - 1/e: g(alpha) decreases with alpha there, so the formula's reading is doubtful."""


def check_alpha(alpha, *, what: str = "alpha") -> np.ndarray:
    """Validate sparsity values: error outside [0, 1), warning below 1 - 1/e."""
    a = np.asarray(alpha, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a >= 1):
        raise BadInput(f"{what} must be in [0, 1), got {alpha!r}")
    if np.any(a < MONOTONE_FROM):
        warnings.warn(
            f"{what}={np.min(a):.4g} < 1-1/e = {MONOTONE_FROM:.4f}: g(alpha) is not monotone there "
            "(g -> infinity as alpha -> 0; the paper's g(0)=1 is a convention, not the formula)",
            NonMonotoneCapacity,
            stacklevel=3,
        )
    return a


def g(alpha, capacity: Capacity = "paper"):
    """Features per dimension at sparsity alpha (Eq. 1). 'naive' is one feature per dimension."""
    a = check_alpha(alpha)
    if capacity == "naive":
        out = np.ones_like(a)
    elif capacity == "paper":
        one_minus = 1.0 - a
        with np.errstate(divide="ignore"):
            out = 1.0 / (one_minus * np.log(1.0 / one_minus))
    else:
        raise BadInput(f"unknown capacity {capacity!r} (use paper or naive)")
    return float(out) if out.ndim == 0 else out


def critical_width(n_features, alpha, capacity: Capacity = "paper"):
    """d* = F / g(alpha): below it, features are necessarily dropped."""
    return (
        np.asarray(n_features, dtype=np.float64) / g(alpha, capacity)
        if np.ndim(n_features)
        else (float(n_features) / g(alpha, capacity))
    )


def features_kept(width, g_value: float, n_features: int):
    """F_S = floor(d_S * g), capped at F. Vectorised over widths."""
    w = np.asarray(width, dtype=np.float64)
    kept = np.minimum(np.floor(w * g_value + 1e-9 * np.maximum(1.0, w * g_value)), n_features)
    kept = kept.astype(np.int64)
    return int(kept) if kept.ndim == 0 else kept


def zipf_weights(n_features: int, exponent: float = 1.0, sq_activation: float = 1.0) -> np.ndarray:
    """Per-feature loss weights I_i * E[x^2] with I_i = i^-s (I_1 = 1), sorted descending."""
    if n_features < 1:
        raise BadInput(f"--features must be >= 1, got {n_features}")
    if not math.isfinite(exponent) or exponent < 0:
        raise BadInput(f"zipf exponent must be >= 0, got {exponent}")
    ranks = np.arange(1, n_features + 1, dtype=np.float64)
    return ranks ** (-exponent) * sq_activation


@dataclass(frozen=True)
class FloorModel:
    """Eq. 2 for one layer: sorted weights and their tail sums, so each width costs O(1).

    Build once in O(F log F) with `FloorModel.from_weights`, then call `floor(widths)`.
    """

    weights: np.ndarray  # [F] descending per-feature loss weights
    tail: np.ndarray  # [F+1] tail[k] = sum(weights[k:]); tail[F] = 0
    alpha: float
    g: float

    @classmethod
    def from_weights(cls, weights, alpha: float, capacity: Capacity = "paper", *, g_value: float | None = None):
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.size == 0:
            raise BadInput("no features: the importance vector is empty")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise BadInput("importances must be finite and >= 0")
        w = np.sort(w)[::-1]
        tail = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])
        gv = float(g(alpha, capacity)) if g_value is None else float(g_value)
        if not (gv > 0 and math.isfinite(gv)):
            raise BadInput(f"capacity g must be a positive finite number, got {gv}")
        return cls(weights=w, tail=tail, alpha=float(alpha), g=gv)

    @property
    def n_features(self) -> int:
        return int(self.weights.size)

    @property
    def d_star(self) -> float:
        return self.n_features / self.g

    def kept(self, widths):
        return features_kept(widths, self.g, self.n_features)

    def floor(self, widths):
        """L*(d_S): the weight mass beyond rank F_S."""
        return self.tail[self.kept(widths)]

    def min_width(self, target: float, *, scale: float = 1.0, baseline: float = 0.0) -> int | None:
        """Smallest integer d_S with scale * L*(d_S) + baseline <= target; None if none exists.

        Pure arithmetic: target == baseline is met once every feature with non-zero weight is
        kept. `target_width` adds the calibrated reading (a target at or below B is refused).
        """
        if scale <= 0:
            raise BadInput(f"calibration slope must be > 0, got {scale}")
        budget = (target - baseline) / scale
        if budget < 0:
            return None
        # smallest k with tail[k] <= budget (tail is non-increasing, tail[F] = 0)
        k = int(np.searchsorted(-self.tail, -budget, side="left"))
        if k == 0:
            return 1  # even a student that keeps nothing meets the target
        d = max(1, math.ceil(k / self.g))
        while d > 1 and self.kept(d - 1) >= k:  # guard against float rounding either way
            d -= 1
        while self.kept(d) < k:
            d += 1
        return d


def target_width(
    model: FloorModel, target: float, *, scale: float = 1.0, baseline: float = 0.0, calibrated: bool = False
) -> tuple[int | None, str]:
    """Minimum width for a target loss, with a one-line explanation.

    Uncalibrated: the smallest d_S with L*(d_S) <= target. Calibrated (floor = C L* + B): the
    smallest d_S with C L*(d_S) + B <= target, and None when target <= B: B is the
    width-independent part of the floor (paper section 6.3), so widening the student only
    approaches it; reaching it exactly would need a geometric floor of 0 *and* an exact fit.
    """
    if not math.isfinite(target):
        raise BadInput(f"--target-loss must be a finite number, got {target}")
    if calibrated:
        if not (math.isfinite(scale) and scale > 0):
            raise BadInput(
                f"calibration slope C = {scale:.4g} is not > 0: the fit says floors do not fall with "
                "the predicted floor, so no width can be solved for"
            )
        if target <= baseline:
            return None, (
                f"no width reaches {target:g}: it is at or below the width-independent baseline "
                f"B = {baseline:.4g} nats; a wider student only shrinks the geometric part C*L*, "
                "so only a different objective or depth can go below B"
            )
        d = model.min_width(target, scale=scale, baseline=baseline)
        return d, (
            f"smallest width with C*L* + B = {scale:.4g}*L* + {baseline:.4g} <= {target:g} (d* = {model.d_star:,.0f})"
        )
    if target < 0:
        return None, f"no width reaches {target:g}: the floor L* is a sum of importances, never < 0"
    d = model.min_width(target)
    return d, f"smallest width with L* <= {target:g} (d* = {model.d_star:,.0f})"
