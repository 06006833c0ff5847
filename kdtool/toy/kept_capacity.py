"""The toy students' measured capacity: g_meas = kept / d_S per alpha, a power law across alphas, the capacity file.

Eq. 2 says a width-d_S student keeps F_S = floor(d_S g(alpha)) features. The survival records count
what each student keeps (kdtool.toy.survival), so the capacity can be measured instead of assumed:

- A point (n, d_T, alpha, d_S; seed means) is **capacity-limited** when the student keeps fewer
  features than are available to it: fewer than its teacher keeps (students distilled from a
  teacher, `--target teacher`: a student cannot keep what the teacher lost, so students wider than
  the teacher only copy it) or fewer than n (`--target data`). Other points say nothing about capacity.
- **g_meas(alpha)** is the least-squares slope through the origin of the seed-mean kept count
  against d_S over that alpha's capacity-limited points, sum(kept * d_S) / sum(d_S^2): the capacity
  that best predicts kept counts as F_S = d_S g (how `predict --capacity` uses it); wide students
  weigh most. The median of kept / d_S and the value on the *strict* points (kept at most half of
  what is available, far from the ceiling) are reported beside it, and kept / d_S per width, because
  at high alpha it grows with d_S (a single number per alpha is a summary, not a law).
- **Power law** across alphas: log g_meas = log K + P log g(alpha), least squares (>= 2 alphas),
  the model `predict --capacity power:K,P` (or the capacity file written from it) applies.

`capacity_file` builds a kdtool.capacity document (kdtool.theory.capacity) from either this fit
(`--capacity-from kept`, the default) or the floor fit of kdtool.toy.stats (`--capacity-from floors`).
"""

from __future__ import annotations

import math

import numpy as np

from kdtool.errors import BadInput
from kdtool.theory import capacity as capacity_mod
from kdtool.theory import theorem as theory

LIMITED_RULE = (
    "capacity-limited point: seed-mean kept count below what is available to the student "
    "(its teacher's seed-mean kept count with --target teacher, n with --target data)"
)
STRICT_RULE = "strict: seed-mean kept count at most half of what is available"


def available(pts: dict[str, np.ndarray], target: str) -> np.ndarray:
    """Features available to each point's students: the teacher's kept count (distillation) or n (data)."""
    if target == "data":
        return np.asarray(pts["n"], dtype=np.float64)
    return np.asarray(pts["teacher_kept_mean"], dtype=np.float64)


def power_law(alphas, values) -> dict | None:
    """log value = log k + p log g(alpha) by least squares across alphas; None with fewer than 2 alphas."""
    if len(alphas) < 2:
        return None
    x = np.log([theory.g(a) for a in alphas])
    y = np.log(np.asarray(values, dtype=np.float64))
    p, logk = np.polyfit(x, y, 1)
    resid = y - (p * x + logk)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {
        "k": float(math.exp(logk)),
        "p": float(p),
        "r2_log": 1 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else None,
        "alphas": [float(a) for a in alphas],
    }


def _slope(kept: np.ndarray, widths: np.ndarray) -> float:
    return float(np.sum(kept * widths) / np.sum(widths**2))


def fit_kept_capacity(pts: dict[str, np.ndarray], target: str = "teacher") -> dict:
    """g_meas per alpha from the seed-mean kept counts (`kdtool.toy.survival.points`), and the power law."""
    kept = np.asarray(pts["kept_mean"], dtype=np.float64)
    widths = np.asarray(pts["d_student"], dtype=np.float64)
    avail = available(pts, target)
    limited = kept < avail - 1e-9
    strict = kept <= avail / 2
    per_alpha = []
    for a in sorted(set(np.asarray(pts["alpha"]).tolist())):
        at = np.asarray(pts["alpha"]) == a
        sel = at & limited & (kept > 0)
        if not sel.any():
            continue
        by_width = []
        for w in sorted(set(widths[sel].tolist())):
            sw = sel & (widths == w)
            by_width.append({"d_student": int(w), "kept_over_d": float(np.mean(kept[sw] / w)), "points": int(sw.sum())})
        ss = at & strict & (kept > 0)
        g_meas = _slope(kept[sel], widths[sel])
        per_alpha.append(
            {
                "alpha": float(a),
                "g": float(theory.g(a)),
                "g_meas": g_meas,
                "ratio": g_meas / float(theory.g(a)),
                "median_kept_over_d": float(np.median(kept[sel] / widths[sel])),
                "g_meas_strict": _slope(kept[ss], widths[ss]) if ss.any() else None,
                "points": int(sel.sum()),
                "points_strict": int(ss.sum()),
                "by_width": by_width,
            }
        )
    law = power_law([p["alpha"] for p in per_alpha], [p["g_meas"] for p in per_alpha])
    strict_alphas = [p for p in per_alpha if p["g_meas_strict"]]
    return {
        "per_alpha": per_alpha,
        "power_law": law,
        "power_law_strict": power_law([p["alpha"] for p in strict_alphas], [p["g_meas_strict"] for p in strict_alphas]),
        "points_rule": LIMITED_RULE,
        "strict_rule": STRICT_RULE,
        "estimator": "least-squares slope through the origin of seed-mean kept count vs d_S",
        "target": target,
    }


def capacity_file(summary: dict, *, method: str, source: str, provenance: dict | None) -> dict:
    """The capacity file (kind kdtool.capacity) of a toy summary: the power law of `method` (kept or floors).

    kept: g_meas from the survival records (summary["survival"]["capacity"]); floors: the g_hat that
    best explains the measured floors (summary["fit_capacity"], kdtool.toy.stats.fit_capacity).
    """
    if method == "kept":
        fit = (summary.get("survival") or {}).get("capacity")
        if not fit:
            raise BadInput(f"{source}: no survival records to measure the kept capacity; use --capacity-from floors")
        per_alpha = [
            {"alpha": p["alpha"], "g": p["g"], "g_hat": p["g_meas"], "ratio": p["ratio"], "points": p["points"]}
            for p in fit["per_alpha"]
        ]
        rules = {"kept_rule": summary["survival"]["kept_rule"], "kept_threshold": summary["survival"]["kept_threshold"]}
        rules.update({"points_rule": fit["points_rule"], "estimator": fit["estimator"]})
    elif method == "floors":
        fit = summary.get("fit_capacity")
        if not fit:
            raise BadInput(f"{source}: no floor capacity fit in the summary (internal: run with --fit-capacity)")
        per_alpha = [{k: p[k] for k in ("alpha", "g", "g_hat", "ratio", "points")} for p in fit["per_alpha"]]
        rules = {"points_rule": fit["points_rule"], "estimator": "g_hat minimising the log-floor error of Eq. 2"}
    else:
        raise BadInput(f"--capacity-from must be kept or floors, got {method!r}")
    law = fit.get("power_law")
    if law is None:
        raise BadInput(f"{source}: a power law needs measured capacities at 2 or more alphas, got {len(per_alpha)}")
    model = capacity_mod.CapacityModel("power", k=law["k"], p=law["p"])
    fitted_on = {
        "source": "kdtool toy",
        "file": source,
        "method": method,
        "alphas": [p["alpha"] for p in per_alpha],
        "points": int(sum(p["points"] for p in per_alpha)),
        "r2_log": law.get("r2_log"),
        **rules,
    }
    return capacity_mod.document(model, fitted_on=fitted_on, per_alpha=per_alpha, provenance=provenance)
