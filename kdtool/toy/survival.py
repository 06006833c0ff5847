"""Which features each toy model keeps, where the truth is known (issue 11, the toy half of the survival diagnostic).

The survival records (OUTPUT-stem.survival.parquet, kind kdtool.toy.survival, written by
`kdtool toy` through the part store) hold, per model (each seed's teacher and students) and feature:
its part of the model's held-out data floor (`loss`, summing to floor_data) and its squared error
relative to the feature's held-out variance (`rel_error` = 1 - R^2). From them (docs/toy.md):

- **kept**: rel_error < threshold (default 0.5: the feature is reconstructed better than halfway
  between exactly (0) and by its mean alone (1), what a student that drops it and learns a bias gets).
  `threshold_sensitivity` shows how far the counts move between 0.1 and 0.9.
- **kept count** per student, and per point (n, d_T, alpha, d_S) its seed mean next to Eq. 2's
  F_S = floor(d_S g(alpha)) (capped at n).
- **measured capacity** g_meas = kept / d_S (kdtool.toy.kept_capacity fits it per alpha).
- **measured-kept predictor**: Eq. 2 charged on the features actually dropped, sum_{i not kept} w_i
  with w_i = I_i (1-alpha)/3, no fitted parameter; scored against the measured data floors next to
  Eq. 2's own prediction on the same points (kdtool.toy.agreement).
- **A2** (the paper's "the student keeps the most important features"): the share of students whose
  kept set is exactly the top-k features by importance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.theory import theorem as theory
from kdtool.toy.agreement import agreement
from kdtool.toy.kept_capacity import available, fit_kept_capacity
from kdtool.toy.store import KIND, SURVIVAL_KIND, survival_path

KEPT_THRESHOLD = 0.5
SENSITIVITY = (0.1, 0.25, 0.5, 0.75, 0.9)  # thresholds the summary re-counts at
KEPT_RULE = "kept iff rel_error = held-out squared error of x_i / held-out variance of x_i < threshold"
RECORD_COLUMNS = ("n", "d_teacher", "alpha", "d_student", "seed", "role", "feature", "importance", "loss", "rel_error")
_POINT = ("n", "d_teacher", "alpha", "d_student")


def check_threshold(threshold: float, what: str = "--kept-threshold") -> float:
    """The kept threshold must lie in (0, 1]: at 1 a feature counts as kept whenever it beats its mean."""
    if not (0 < float(threshold) <= 1):
        raise BadInput(f"{what} must be in (0, 1], got {threshold}")
    return float(threshold)


def kept_mask(rel_error: np.ndarray, threshold: float = KEPT_THRESHOLD) -> np.ndarray:
    """kept per record: rel_error < threshold (a feature that never fires in the held-out set, NaN, is not)."""
    rel = np.asarray(rel_error, dtype=np.float64)
    return np.where(np.isnan(rel), False, rel < threshold)


def read_survival(path) -> tuple[dict[str, np.ndarray], dict]:
    """Survival records from OUTPUT-stem.survival.parquet or from the toy.parquet it sits beside."""
    path = Path(path)
    meta = formats.parquet_metadata(path)
    if meta["kind"] == KIND:
        spath = survival_path(path)
        if not spath.exists():
            raise BadInput(
                f"{path}: no {spath.name} beside it (a toy table made before kdtool recorded per-feature "
                "survival); rerun kdtool toy"
            )
        path, meta = spath, formats.parquet_metadata(spath)
    if meta["kind"] != SURVIVAL_KIND:
        raise BadInput(f"{path}: a {meta['kind']} file, expected {SURVIVAL_KIND} (written by kdtool toy)")
    return formats.read_table(path, required=RECORD_COLUMNS), meta


def group_ids(columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by equal values in all `columns`: (group id per row, first row of each group), groups in
    sorted order (as np.unique(axis=0), which is several times slower on the ~10^6 records of a sweep)."""
    order = np.lexsort(columns[::-1])  # the first column is the primary key
    change = np.zeros(len(order), dtype=bool)
    change[:1] = True
    for c in columns:
        ordered = np.asarray(c)[order]
        change[1:] |= ordered[1:] != ordered[:-1]
    inv = np.empty(len(order), dtype=np.int64)
    inv[order] = np.cumsum(change) - 1
    return inv, order[change]


def layout(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `per_model` needs besides the threshold, computed once: the models, each row's model and seed, and
    Eq. 2's F_S and charge per row (F_S = floor(d_S g(alpha)) capped at n; w_i = I_i (1-alpha)/3)."""
    student = np.asarray(cols["role"]).astype(str) == "student"
    alpha = np.asarray(cols["alpha"], dtype=np.float64)
    base = [np.asarray(cols[c]) for c in ("n", "d_teacher", "alpha", "seed")]
    inv, first = group_ids([*base, student, np.asarray(cols["d_student"])])
    d_student = np.asarray(cols["d_student"], dtype=np.int64)
    return {
        "inv": inv,
        "first": first,
        "seed_id": group_ids(base)[0],
        "student": student,
        "feature": np.asarray(cols["feature"], dtype=np.int64),
        "loss": np.asarray(cols["loss"], dtype=np.float64),
        "weight": np.asarray(cols["importance"], dtype=np.float64) * (1.0 - alpha) / 3.0,
        "f_s": theory.features_kept(d_student, theory.g(alpha), np.asarray(cols["n"], dtype=np.int64)),
    }


def per_model(
    cols: dict[str, np.ndarray], threshold: float = KEPT_THRESHOLD, rows: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """One entry per model (per configuration and seed: the teacher, then students by width): kept count, floor,
    Eq. 2 on its dropped set, A2. `rows` is `layout(cols)`, when the caller counts at several thresholds.

    floor = sum of the model's per-feature losses (its floor_data); pred_measured_kept = sum of
    w_i = I_i (1-alpha)/3 over the features it does not keep; dropped_loss = the part of its floor on
    those features (the rest is interference on kept ones); top_k: its kept set is exactly features 1..kept.
    teacher_kept (students): how many features its seed's teacher keeps; beyond_teacher: features the
    student keeps that its teacher does not; F_S and pred_refined: Eq. 2 on the same records.
    """
    lay = layout(cols) if rows is None else rows
    inv, first, seed_id, student, feature = lay["inv"], lay["first"], lay["seed_id"], lay["student"], lay["feature"]
    kept = kept_mask(cols["rel_error"], threshold)
    m = len(first)

    def total(values) -> np.ndarray:
        return np.bincount(inv, weights=np.asarray(values, dtype=np.float64), minlength=m)

    count = total(kept).round().astype(np.int64)
    top_rank = np.zeros(m, dtype=np.int64)
    np.maximum.at(top_rank, inv, np.where(kept, feature, 0))
    # the seed's teacher: its kept flag per feature, looked up by (n, d_T, alpha, seed, feature)
    table = np.zeros((seed_id.max() + 1, feature.max() + 1), dtype=bool)
    table[seed_id[~student], feature[~student]] = kept[~student]
    both = total(student & kept & table[seed_id, feature]).round().astype(np.int64)  # kept by student and teacher
    per_seed_teacher = np.bincount(seed_id[~student], weights=kept[~student], minlength=table.shape[0])
    return {
        "n": np.asarray(cols["n"], dtype=np.int64)[first],
        "d_teacher": np.asarray(cols["d_teacher"], dtype=np.int64)[first],
        "alpha": np.asarray(cols["alpha"], dtype=np.float64)[first],
        "seed": np.asarray(cols["seed"], dtype=np.int64)[first],
        "student": student[first],
        "d_student": np.asarray(cols["d_student"], dtype=np.int64)[first],
        "kept": count,
        "floor": total(lay["loss"]),
        "pred_measured_kept": total(np.where(kept, 0.0, lay["weight"])),
        "dropped_loss": total(np.where(kept, 0.0, lay["loss"])),
        "top_k": top_rank == count,
        "teacher_kept": per_seed_teacher[seed_id[first]].round().astype(np.int64),
        "beyond_teacher": np.where(student[first], count - both, 0),
        "F_S": lay["f_s"][first],
        "pred_refined": total(np.where(feature > lay["f_s"], lay["weight"], 0.0)),
    }


def points(models: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Students averaged over seeds per (n, d_T, alpha, d_S), next to Eq. 2's F_S and floor (refined)."""
    s = models["student"]
    inv, first = group_ids([np.asarray(models[c][s]) for c in _POINT])
    count = len(first)
    seeds = np.bincount(inv, minlength=count).astype(np.float64)

    def mean(name) -> np.ndarray:
        return np.bincount(inv, weights=np.asarray(models[name][s], dtype=np.float64), minlength=count) / seeds

    out = {c: np.asarray(models[c][s])[first] for c in _POINT}
    kept = np.asarray(models["kept"][s], dtype=np.float64)
    lo, hi = np.full(count, np.inf), np.full(count, -np.inf)
    np.minimum.at(lo, inv, kept)
    np.maximum.at(hi, inv, kept)
    out.update(
        {
            "seeds": seeds.astype(np.int64),
            "kept_mean": mean("kept"),
            "kept_min": lo.astype(np.int64),
            "kept_max": hi.astype(np.int64),
            "teacher_kept_mean": mean("teacher_kept"),
            "beyond_teacher_mean": mean("beyond_teacher"),
            "top_k_share": mean("top_k"),
            "floor_mean": mean("floor"),
            "pred_measured_kept": mean("pred_measured_kept"),
            "dropped_share": mean("dropped_loss") / np.where(mean("floor") > 0, mean("floor"), 1.0),
        }
    )
    out["F_S"] = np.asarray(models["F_S"][s])[first]
    out["pred_refined"] = mean("pred_refined")
    return out


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def _score(pts: dict[str, np.ndarray], sel: np.ndarray) -> dict:
    """The measured-kept predictor and Eq. 2 (refined) against the measured data floors at the selected points."""
    actual = pts["floor_mean"][sel]
    return {
        "points": int(sel.sum()),
        "measured_kept": agreement(actual, pts["pred_measured_kept"][sel]),
        "refined": agreement(actual, pts["pred_refined"][sel]),
    }


def _point_list(pts: dict[str, np.ndarray], limited: np.ndarray) -> list[dict]:
    """Every point as a JSON record (the summary never elides one)."""
    names = ("n", "d_teacher", "alpha", "d_student", "seeds", "kept_mean", "kept_min", "kept_max", "F_S")
    names += ("teacher_kept_mean", "top_k_share", "floor_mean", "pred_refined", "pred_measured_kept", "dropped_share")
    return [
        {**{k: pts[k][i].item() for k in names}, "capacity_limited": bool(limited[i])} for i in range(len(pts["n"]))
    ]


def summarize_survival(cols: dict[str, np.ndarray], threshold: float = KEPT_THRESHOLD, target: str = "teacher") -> dict:
    """Kept counts against F_S, the measured capacity, the measured-kept predictor and A2, from survival records.

    Scores use the seed-mean data floor (the sum of each student's per-feature losses, = floor_data) at
    the *data points* (Eq. 2's prediction > 0, d_S < d*, as in kdtool.toy.stats) and at every point with
    a positive floor (Eq. 2 predicts 0 beyond d*, where the measured-kept predictor still predicts).
    """
    threshold = check_threshold(threshold)
    rows = layout(cols)
    models = per_model(cols, threshold, rows)
    pts = points(models)
    fit = fit_kept_capacity(pts, target)
    limited = pts["kept_mean"] < available(pts, target) - 1e-9
    positive = pts["floor_mean"] > 0
    data = positive & (pts["pred_refined"] > 0)
    by_alpha = {}
    for a in sorted(set(pts["alpha"].tolist())):
        at = pts["alpha"] == a
        below = at & (pts["F_S"] < pts["n"])  # where F_S is not capped by n
        ratio = pts["kept_mean"][below] / pts["F_S"][below]
        by_alpha[f"{a:g}"] = {
            "points": int(at.sum()),
            "median_kept_over_F_S": _median(ratio),
            "data_points": _score(pts, data & at),
            "top_k_share": float(np.mean(models["top_k"][models["student"] & (models["alpha"] == a)])),
            "median_dropped_share": _median(pts["dropped_share"][at & positive]),
        }
    s = models["student"]
    wide = s & (models["d_student"] > models["d_teacher"])
    return {
        "kept_threshold": threshold,
        "kept_rule": KEPT_RULE,
        "target": target,
        "students": int(s.sum()),
        "teachers": int((~s).sum()),
        "points": int(len(pts["n"])),
        "kept_below_F_S": [int(np.sum(pts["kept_mean"] < pts["F_S"])), int(len(pts["n"]))],
        "capacity": fit,
        "measured_kept_predictor": {
            "data_points": _score(pts, data),
            "all_points": _score(pts, positive),
            "rule": "pred = sum of I_i (1-alpha)/3 over the features a student does not keep; seed means per point",
        },
        "by_alpha": by_alpha,
        "top_k_share": float(np.mean(models["top_k"][s])) if s.any() else None,
        "median_dropped_share": _median(pts["dropped_share"][positive]),
        "beyond_teacher": {
            "students_keeping_a_feature_their_teacher_drops": int(np.sum(models["beyond_teacher"][s] > 0)),
            "students": int(s.sum()),
            "wider_than_teacher": int(wide.sum()),
            "wider_keeping_more_than_teacher": int(np.sum(models["kept"][wide] > models["teacher_kept"][wide])),
        },
        "threshold_sensitivity": [_at_threshold(cols, t, target, rows) for t in SENSITIVITY],
        "point_list": _point_list(pts, limited),
    }


def _at_threshold(cols: dict[str, np.ndarray], threshold: float, target: str, rows: dict) -> dict:
    """Mean kept count per student and the measured capacity when `threshold` defines kept."""
    models = per_model(cols, threshold, rows)
    pts = points(models)
    fit = fit_kept_capacity(pts, target)
    law = fit["power_law"]
    return {
        "threshold": threshold,
        "mean_kept": float(np.mean(models["kept"][models["student"]])),
        "g_meas": {f"{p['alpha']:g}": p["g_meas"] for p in fit["per_alpha"]},
        "power_law": None if law is None else {"k": law["k"], "p": law["p"]},
    }
