"""Eq. 2's floors for the toy model (paper section 4): weights w_i = I_i (1-alpha)/3, refined and naive capacity.

numpy only (no torch): `kdtool toy --summarize`, the capacity fit and the toy figures use it.
"""

from __future__ import annotations

import numpy as np

from kdtool.theory import theorem as theory


def floor_model(
    n: int, alpha: float, zipf_exponent: float = 1.0, capacity: theory.Capacity = "paper", g_value: float | None = None
) -> theory.FloorModel:
    """Eq. 2 for the toy: weights I_i * E[x_i^2] with E[x_i^2] = (1-alpha)/3."""
    weights = theory.zipf_weights(n, zipf_exponent, (1.0 - alpha) / 3.0)
    return theory.FloorModel.from_weights(weights, alpha, capacity, g_value=g_value)


def predictions(n: int, alpha: float, widths, zipf_exponent: float = 1.0) -> dict[str, np.ndarray | float]:
    """Refined (g(alpha)) and naive (g = 1) floors at each width, plus g, d* and F_S."""
    refined = floor_model(n, alpha, zipf_exponent, "paper")
    naive = floor_model(n, alpha, zipf_exponent, "naive")
    widths = np.asarray(widths)
    return {
        "pred_refined": refined.floor(widths),
        "pred_naive": naive.floor(widths),
        "g": refined.g,
        "d_star": refined.d_star,
        "features_kept": refined.kept(widths),
        "total_mass": float(refined.tail[0]),
    }
