"""survival.parquet's rows and its per-width summary: measured survival against Theorem 1's staircase.

Per feature (one row per layer x model x SAE feature; a student is labelled by its width, the loss it was
distilled with and its run's seed, both null for the teacher and a model folder kdtool did not write): rank,
importance, the teacher's fires on the measurement tokens, r2, fire_recall, fire_precision
(kdtool/survival/measure.py), and

    measured        fires >= min_fires: enough firings for r2 to mean something
    survived        measured and r2 >= threshold
    predicted_kept  rank < F_S = floor(d_S g(alpha)) (capped at the alive count F)

Per (layer, model), over the measured features (the `summary` rows):

    survived, measured, F_S         counts; g_measured = survived / d_S (features per dimension kept)
    kept_agree                      #(predicted_kept and survived) / #predicted_kept
    lost_agree                      #(not predicted_kept and not survived) / #(not predicted_kept)
    spearman                        Spearman rank correlation of r2 with importance
    mass_kept, mass_kept_pred       importance share of the survived / of the predicted-kept features
    survived_at                     the survived count at other thresholds (how much the choice matters)
    map_r2                          how well the linear map predicts the teacher's activation vectors

A perfect staircase has kept_agree = lost_agree = 1. Either is None when its denominator is empty.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats as sps

from kdtool.survival.config import SurvivalConfig
from kdtool.survival.ranking import LayerRanking
from kdtool.survival.stream import ModelActs

KIND = "kdtool.survival"
SUMMARY_KIND = "kdtool.survival.summary"
COLUMNS = (
    "layer",
    "model",
    "role",
    "width",
    "loss",
    "seed",
    "feature",
    "rank",
    "importance",
    "fires",
    "r2",
    "fire_recall",
    "fire_precision",
    "measured",
    "survived",
    "predicted_kept",
)
#: Other thresholds whose survived counts every summary row records (docs/survival.md shows the spread).
THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Columns of the printed per-width table (all summary keys are in the Parquet summary and --json).
TABLE = (
    "layer",
    "model",
    "width",
    "loss",
    "F_S",
    "survived",
    "measured",
    "kept_agree",
    "lost_agree",
    "spearman",
    "mass_kept",
    "mass_kept_pred",
    "map_r2",
)


def _fraction(num: np.ndarray, den: np.ndarray) -> float | None:
    d = int(den.sum())
    return None if d == 0 else float((num & den).sum()) / d


def _share(weights: np.ndarray, part: np.ndarray, whole: np.ndarray) -> float | None:
    total = float(weights[whole].sum())
    return None if total <= 0 else float(weights[part & whole].sum()) / total


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None  # undefined for a constant series (the teacher's r2 is 1.0 everywhere)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(sps.spearmanr(a, b).statistic)
    return rho if np.isfinite(rho) else None


def model_rows(
    ranking: LayerRanking, fires: np.ndarray, match: dict, model: ModelActs, g_value: float | None, cfg: SurvivalConfig
) -> tuple[dict, dict]:
    """(survival.parquet columns for one model at one layer, its summary row).

    fires: [F] the teacher's firings on the measurement tokens; match: FeatureMatch.result().
    """
    d_sae = ranking.importance.size
    ranks = ranking.ranks()
    width = model.width
    F_S = ranking.features_kept(width, g_value)
    r2 = match["r2"]
    measured = fires >= cfg.min_fires
    r2_ok = np.nan_to_num(r2, nan=-np.inf)
    survived = measured & (r2_ok >= cfg.threshold)
    predicted = ranks < F_S if F_S is not None else np.zeros(d_sae, dtype=bool)
    columns = {
        "layer": np.full(d_sae, ranking.layer, dtype=np.int32),
        "model": [model.name] * d_sae,
        "role": [model.role] * d_sae,
        "width": np.full(d_sae, width, dtype=np.int32),
        "loss": [model.loss] * d_sae,
        "seed": [model.seed] * d_sae,
        "feature": np.arange(d_sae, dtype=np.int32),
        "rank": ranks.astype(np.int32),
        "importance": ranking.importance.astype(np.float64),
        "fires": fires.astype(np.int64),
        "r2": r2,
        "fire_recall": match["fire_recall"],
        "fire_precision": match["fire_precision"],
        "measured": measured,
        "survived": survived,
        "predicted_kept": predicted,
    }
    n_surv = int(survived.sum())
    row = {
        "layer": ranking.layer,
        "model": model.name,
        "role": model.role,
        "width": width,
        "loss": model.loss,
        "seed": model.seed,
        "F": ranking.n_alive,
        "F_S": F_S,
        "survived": n_surv,
        "measured": int(measured.sum()),
        "g": g_value,
        "g_measured": n_surv / width,
        "kept_agree": _fraction(survived, predicted & measured),
        "lost_agree": _fraction(~survived, ~predicted & measured),
        "spearman": _spearman(r2[measured], ranking.importance[measured]),
        "mass_kept": _share(ranking.importance, survived, measured),
        "mass_kept_pred": _share(ranking.importance, predicted, measured),
        "map_r2": match["map_r2"],
        "model_layer": model.layers.get(ranking.layer, ranking.layer),
        "mean_r2": float(np.mean(r2[measured])) if measured.any() else None,
        "survived_at": {f"{t:g}": int((measured & (r2_ok >= t)).sum()) for t in THRESHOLDS},
    }
    return columns, row


def concat(parts: list[dict]) -> dict:
    """One set of columns from several models' and layers' (in order)."""
    out = {}
    for name in COLUMNS:
        values = [p[name] for p in parts]
        out[name] = sum(values, []) if isinstance(values[0], list) else np.concatenate(values)
    return typed(out)


def typed(columns: dict) -> dict:
    """loss and seed as typed Arrow arrays, so they keep their types when all null (a teacher and model folders)."""
    import pyarrow as pa

    return columns | {"loss": pa.array(columns["loss"], pa.string()), "seed": pa.array(columns["seed"], pa.int64())}


def table(rows: list[dict]) -> dict[str, list]:
    """The printed per-width table: TABLE's columns of the summary rows."""
    return {k: [r[k] for r in rows] for k in TABLE}
