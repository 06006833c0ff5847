"""How well Eq. 2 predicts the toy sweep's floors: summary statistics and a capacity fit.

Definitions (docs/toy.md):
- A *point* is one (n, d_T, alpha, d_S) with its floor averaged over seeds.
- The *data points* are the points whose refined prediction is > 0, i.e. d_S < d* (F_S < n).
  The paper's "140 data points" for its 48 configurations are exactly these. Beyond d* the
  formula predicts 0, so relative errors are undefined there; those points are summarised
  separately ("beyond_d_star").
- accuracy = 1 - |pred - actual| / actual (can be negative); MAPE = mean |pred - actual| / actual * 100.
- R^2 = 1 - SS_res / SS_tot of the prediction as-is (no fitted scale), over the data points.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.theory.capacity import write as capacity_write
from kdtool.toy.agreement import agreement
from kdtool.toy.kept_capacity import capacity_file, power_law
from kdtool.toy.predictions import floor_model
from kdtool.toy.store import KIND, survival_path
from kdtool.toy.survival import KEPT_THRESHOLD, read_survival, summarize_survival

POINT_KEYS = ("n", "d_teacher", "alpha", "d_student")
DATA_POINT_RULE = "(n, d_T, alpha, d_S) with refined prediction > 0 (d_S < d* = n/g(alpha)); floor = mean over seeds"
FIT_POINT_RULE = DATA_POINT_RULE + "; students distilled from a teacher: only d_S <= d_T"
_TINY = 1e-12  # a zero prediction in log space (the capacity fit): heavily penalised, never -inf


#: --measure: the student loss whose seed mean is compared with Eq. 2 (against the data or the teacher)
MEASURE_COLUMN = {"data": "floor_data", "distill": "floor_distill"}
TABLE_COLUMNS = ("n", "d_teacher", "alpha", "d_student", "seed", "floor", "pred_refined", "pred_naive", "total_mass")


def read_toy_table(path, *, extra: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], dict]:
    """A toy.parquet (or a CSV/JSON copy) as columns, plus its kdtool metadata; refuses other kinds."""
    path = Path(path)
    meta = formats.parquet_metadata(path) if formats.is_parquet(path) else {}
    if meta.get("kind") not in (None, KIND):
        raise BadInput(f"{path}: a {meta.get('kind')} file, expected {KIND} (written by kdtool toy)")
    return formats.read_table(path, required=TABLE_COLUMNS + tuple(extra)), meta


def aggregate(cols: dict[str, np.ndarray], measure: str = "floor") -> dict[str, np.ndarray]:
    """Seed-mean and std of `measure` per (n, d_T, alpha, d_S), with the row's predictions."""
    if measure not in cols:
        raise BadInput(f"no column {measure!r} in the toy table (has: {', '.join(cols)})")
    keys = np.stack([np.asarray(cols[k], dtype=np.float64) for k in POINT_KEYS], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    values = np.asarray(cols[measure], dtype=np.float64)
    count = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)
    mean = np.bincount(inverse, weights=values, minlength=len(uniq)) / count
    sq = np.bincount(inverse, weights=(values - mean[inverse]) ** 2, minlength=len(uniq))
    std = np.sqrt(sq / np.maximum(count - 1, 1))
    first = np.zeros(len(uniq), dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(inverse))[::-1]  # first row of each point
    out = {k: uniq[:, i] for i, k in enumerate(POINT_KEYS)}
    for k in ("n", "d_teacher", "d_student"):
        out[k] = out[k].astype(np.int64)
    out.update({"floor_mean": mean, "floor_std": std, "seeds": count.astype(np.int64)})
    for k in ("pred_refined", "pred_naive", "d_star", "g", "total_mass"):
        out[k] = np.asarray(cols[k], dtype=np.float64)[first]
    if "teacher_floor" in cols:
        out["teacher_floor_mean"] = (
            np.bincount(inverse, weights=np.asarray(cols["teacher_floor"], dtype=np.float64), minlength=len(uniq))
            / count
        )
    return out


def _ordering(agg: dict[str, np.ndarray]) -> dict:
    """Does the measured floor rank as Eq. 2 ranks it? Adjacent comparisons over every point (data or not).

    falls_with_width: (n, d_T, alpha) fixed, d_S -> d_S + 1; falls_with_alpha: (n, d_T, d_S) fixed, alpha -> the
    next larger alpha of the grid. Each is [comparisons where the floor falls, comparisons].
    """
    floor = {
        (int(n), int(d), float(a), int(w)): f
        for n, d, a, w, f in zip(
            agg["n"], agg["d_teacher"], agg["alpha"], agg["d_student"], agg["floor_mean"], strict=True
        )
    }
    alphas = sorted({k[2] for k in floor})
    width = [floor[k] > floor[(*k[:3], k[3] + 1)] for k in floor if (*k[:3], k[3] + 1) in floor]
    step = dict(zip(alphas, alphas[1:], strict=False))
    alpha = [
        floor[k] > floor[(k[0], k[1], step[k[2]], k[3])] for k in floor if (k[0], k[1], step.get(k[2]), k[3]) in floor
    ]
    return {"falls_with_width": [int(sum(width)), len(width)], "falls_with_alpha": [int(sum(alpha)), len(alpha)]}


def summarize(cols: dict[str, np.ndarray], measure: str = "floor") -> dict:
    """The numbers the paper reports for Experiment 1, computed from a toy table."""
    agg = aggregate(cols, measure)
    configs = {(int(n), int(d), float(a)) for n, d, a in zip(agg["n"], agg["d_teacher"], agg["alpha"], strict=True)}
    seeds = int(np.max(agg["seeds"]))
    data = agg["pred_refined"] > 0
    actual = agg["floor_mean"][data]
    bad = actual <= 0
    if bad.any():  # a floor of exactly 0 has no relative error; keep the count honest
        data[np.flatnonzero(data)[bad]] = False
        actual = agg["floor_mean"][data]
    refined = agreement(actual, agg["pred_refined"][data])
    naive = agreement(actual, agg["pred_naive"][data])
    by_alpha = {}
    for a in sorted(set(agg["alpha"][data].tolist())):
        sel = agg["alpha"][data] == a
        r = agreement(actual[sel], agg["pred_refined"][data][sel])
        nv = agreement(actual[sel], agg["pred_naive"][data][sel])
        by_alpha[f"{a:g}"] = {
            "points": int(sel.sum()),
            "median_accuracy": r["median_accuracy"],
            "median_accuracy_naive": nv["median_accuracy"],
            "mape_percent": r["mape_percent"],
            # > 1: the formula underestimates the measured floor
            "median_measured_over_refined": float(np.median(actual[sel] / agg["pred_refined"][data][sel])),
            "median_measured_over_naive": float(np.median(actual[sel] / agg["pred_naive"][data][sel])),
        }
    beyond = agg["pred_refined"] <= 0
    norm = agg["floor_mean"][beyond] / agg["total_mass"][beyond]
    students = int(len(cols["n"]))
    return {
        "configs": len(configs),
        "seeds": seeds,
        "models": students + seeds * len(configs),  # students + one teacher per (config, seed)
        "rows": students,
        "measure": measure,
        "points": int(len(agg["n"])),
        "data_points": int(data.sum()),
        "data_point_rule": DATA_POINT_RULE,
        "refined": refined,
        "naive": naive,
        "by_alpha": by_alpha,
        "underestimated_by_refined": int(np.sum(actual > agg["pred_refined"][data])),
        "ordering": _ordering(agg),
        "beyond_d_star": {
            "points": int(beyond.sum()),
            "median_normalized_floor": float(np.median(norm)) if len(norm) else None,
            "max_normalized_floor": float(np.max(norm)) if len(norm) else None,
            "note": "formula predicts 0 here; normalized floor = measured floor / total importance mass",
        },
    }


def _continuous_floor(weights_tail: np.ndarray, weights: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """L* at a real-valued number of kept features k: the tail mass, interpolated linearly between ranks."""
    n = len(weights)
    k = np.clip(ranks, 0, n)
    lo = np.floor(k).astype(np.int64)
    frac = k - lo
    nxt = np.where(lo < n, weights[np.minimum(lo, n - 1)], 0.0)
    return weights_tail[lo] - frac * nxt


def fit_capacity(cols: dict[str, np.ndarray], measure: str = "floor", zipf_exponent: float = 1.0) -> dict:
    """Per alpha, the capacity g_hat whose Eq. 2 floors best match the measured ones (least squares on logs).

    Fitted on the data points of that alpha (FIT_POINT_RULE), with F_S = d_S * g_hat taken as a
    real number (linear interpolation between ranks) so the objective is continuous in g_hat. Then a
    power law g_hat = k * g(alpha)^p across alphas (least squares on logs). Students distilled from a
    teacher narrower than themselves (--student-widths to-dstar) are left out: their floor is the
    teacher's (they keep what it keeps), so it measures the teacher's capacity, not theirs.
    """
    agg = aggregate(cols, measure)
    data = (agg["pred_refined"] > 0) & (agg["floor_mean"] > 0)
    distilled = "data" not in set(np.asarray(cols.get("target", ["teacher"])).astype(str).tolist())
    if distilled:
        data &= agg["d_student"] <= agg["d_teacher"]
    per_alpha = []
    for a in sorted(set(agg["alpha"][data].tolist())):
        sel = data & (agg["alpha"] == a)
        ns, widths, actual = agg["n"][sel], agg["d_student"][sel], agg["floor_mean"][sel]
        models = {int(n): floor_model(int(n), a, zipf_exponent) for n in set(ns.tolist())}
        log_actual = np.log(actual)

        def loss(log_g, ns=ns, widths=widths, log_actual=log_actual, models=models):
            gh = math.exp(log_g)
            pred = np.array(
                [
                    _continuous_floor(models[int(n)].tail, models[int(n)].weights, np.array([w * gh]))[0]
                    for n, w in zip(ns, widths, strict=True)
                ]
            )
            return float(np.mean((np.log(np.maximum(pred, _TINY)) - log_actual) ** 2))

        grid = np.linspace(math.log(0.05), math.log(1e4), 800)
        values = np.array([loss(v) for v in grid])
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        best = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
        log_g = float(best.x) if best.fun <= values[i] else float(grid[i])
        g_paper = models[int(ns[0])].g
        per_alpha.append(
            {
                "alpha": a,
                "g": g_paper,
                "g_hat": math.exp(log_g),
                "ratio": math.exp(log_g) / g_paper,
                "points": int(sel.sum()),
                "rmse_log_fit": math.sqrt(loss(log_g)),
                "rmse_log_paper_g": math.sqrt(loss(math.log(g_paper))),
            }
        )
    law = power_law([p["alpha"] for p in per_alpha], [p["g_hat"] for p in per_alpha])
    out: dict = {"per_alpha": per_alpha, "points_rule": FIT_POINT_RULE, "power_law": law, "notes": []}
    for p in per_alpha:
        if not 0.5 <= p["ratio"] <= 2.0:
            out["notes"].append(
                f"alpha={p['alpha']:g}: the measured floors imply a capacity of {p['g_hat']:.3g} "
                f"features/dim, not g(alpha)={p['g']:.3g} (x{p['ratio']:.2f})"
            )
    return out


def summarize_file(
    path,
    measure: str | None = None,
    *,
    capacity_fit: bool = False,
    zipf_exponent: float = 1.0,
    kept_threshold: float | None = None,
    capacity_out=None,
    capacity_from: str = "kept",
    provenance: dict | None = None,
) -> dict:
    """`kdtool toy --summarize`: the summary of a toy table, on its `floor` column or on --measure's.

    The capacity fit uses the Zipf exponent the table was made with (its provenance), else `zipf_exponent`.
    With the survival records beside the table (OUTPUT-stem.survival.parquet) the summary gains
    `survival` (kdtool.toy.survival), at `kept_threshold` (default: the one the records were written with).
    With capacity_fit and capacity_out, the capacity file (kind kdtool.capacity) of `capacity_from` is written
    (when a power law can be fitted; otherwise fit_capacity.notes says why not).
    """
    cols, meta = read_toy_table(path)
    column = MEASURE_COLUMN[measure] if measure is not None else "floor"
    zipf = ((meta.get("provenance") or {}).get("config") or {}).get("zipf_exponent", zipf_exponent)
    result = summarize(cols, column)
    spath = survival_path(Path(path))
    if spath.exists():
        scols, smeta = read_survival(spath)
        mine, theirs = (meta.get("summary") or {}).get("settings"), (smeta.get("summary") or {}).get("settings")
        if mine != theirs:
            raise BadInput(f"{spath}: made by another sweep than {path} (settings {theirs} vs {mine})")
        recorded = (smeta.get("summary") or {}).get("kept_threshold", KEPT_THRESHOLD)
        target = str(cols["target"][0]) if "target" in cols and len(cols["target"]) else "teacher"
        result["survival"] = summarize_survival(scols, recorded if kept_threshold is None else kept_threshold, target)
    if capacity_fit:
        result["fit_capacity"] = fit_capacity(cols, column, zipf)
        if capacity_out is not None:
            try:
                doc = capacity_file(result, method=capacity_from, source=str(path), provenance=provenance)
            except BadInput as exc:  # no power law (one alpha): the summary stands, the file is not written
                result["fit_capacity"]["notes"].append(f"no capacity file written: {exc}")
            else:
                capacity_write(capacity_out, doc)
                result["capacity_file"] = str(capacity_out)
    return result
