"""The toy-model tables of a run report: Eq. 2 against the actual floor per sparsity (Fig. 3), and what the
students keep (the survival records: measured capacity, Eq. 2 on the measured kept set).

See kdtool/report/tables.py for the other tables.
"""

from __future__ import annotations

import numpy as np

from kdtool import formats
from kdtool.report.model import TOY, TOY_SURVIVAL, Artifact, Table, of_kind
from kdtool.theory import theorem as theory
from kdtool.toy.survival import KEPT_THRESHOLD, read_survival, summarize_survival


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def toy(arts: list[Artifact]) -> list[Table]:
    """Per sparsity: configurations, points, and Pearson r between the seed-mean actual floor and Eq. 2."""
    out = []
    files = of_kind(arts, TOY)
    for art in files:
        cols = formats.read_table(
            art.path, required=("n", "d_teacher", "alpha", "d_student", "floor_data", "pred_refined")
        )
        key = np.stack([np.asarray(cols[c], float) for c in ("n", "d_teacher", "alpha", "d_student")], axis=1)
        uniq, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        obs = np.bincount(inv, weights=np.asarray(cols["floor_data"], float)) / np.bincount(inv)
        pred = np.bincount(inv, weights=np.asarray(cols["pred_refined"], float)) / np.bincount(inv)
        naive = (
            np.bincount(inv, weights=np.asarray(cols["pred_naive"], float)) / np.bincount(inv)
            if "pred_naive" in cols
            else None
        )
        seeds = len(np.unique(np.asarray(cols["seed"]))) if "seed" in cols else None
        title = "Toy model: Eq. 2 vs actual floor per sparsity (Fig. 3)" + (f": {art.rel}" if len(files) > 1 else "")
        t = Table(
            "toy",
            "Toy model",
            title,
            [
                "α",
                "g(α)",
                "configurations",
                "points",
                "seeds",
                "mean actual",
                "mean predicted",
                "Pearson r (refined)",
                "Pearson r (naive)",
            ],
            ["text", "g4", "int", "int", "int", "g4", "g4", "f3", "f3"],
            sources=[art.rel],
        )
        groups = [(f"{a:g}", uniq[:, 2] == a, float(theory.g(a))) for a in np.unique(uniq[:, 2])]
        groups.append(("all", np.ones(len(uniq), bool), None))
        for label, sel, g in groups:
            configs = len(np.unique(uniq[sel][:, :3], axis=0))
            t.add(
                label,
                g,
                configs,
                int(sel.sum()),
                seeds,
                float(obs[sel].mean()),
                float(pred[sel].mean()),
                _pearson(pred[sel], obs[sel]),
                _pearson(naive[sel], obs[sel]) if naive is not None else None,
            )
        t.note = (
            "A point is one (n, d_T, α, d_S) averaged over seeds; actual = the student's importance-weighted "
            "loss on data (floor_data); refined = Eq. 2 with g(α), naive = g = 1."
        )
        out.append(t)
    return out


def toy_survival(arts: list[Artifact]) -> list[Table]:
    """Per sparsity, from the survival records: g(alpha) against the measured g_meas, and Eq. 2 charged on the
    measured kept set against Eq. 2 itself (median accuracy on the data points)."""
    out = []
    files = of_kind(arts, TOY_SURVIVAL)
    for art in files:
        cols, meta = read_survival(art.path)
        threshold = (meta.get("summary") or {}).get("kept_threshold", KEPT_THRESHOLD)
        target = ((art.provenance or {}).get("config") or {}).get("target", "teacher")
        s = summarize_survival(cols, threshold, target)
        title = "Toy model: features kept, measured capacity, Eq. 2 on the measured kept set"
        t = Table(
            "toy_survival",
            "Toy model",
            title + (f": {art.rel}" if len(files) > 1 else ""),
            ["α", "g(α)", "g_meas", "g_meas / g", "points", "kept / F_S", "acc. measured kept", "acc. Eq. 2"],
            ["text", "g4", "g4", "f3", "int", "f3", "f3", "f3"],
            sources=[art.rel],
        )
        fit = {f"{p['alpha']:g}": p for p in s["capacity"]["per_alpha"]}
        for a, row in s["by_alpha"].items():
            p = fit.get(a, {})
            score = row["data_points"]
            t.add(
                a,
                float(theory.g(float(a))),
                p.get("g_meas"),
                p.get("ratio"),
                p.get("points"),
                row["median_kept_over_F_S"],
                score["measured_kept"]["median_accuracy"],
                score["refined"]["median_accuracy"],
            )
        law = s["capacity"]["power_law"]
        t.note = (
            f"kept: held-out error < {threshold:g} x the feature's variance; g_meas: least-squares kept / d_S over "
            "capacity-limited points (the student keeps fewer than its teacher); kept / F_S: median over points "
            "with F_S < n; accuracies: median 1 - |pred - floor| / floor over d_S < d*."
            + (f" Power law: g_meas = {law['k']:.3g} g(α)^{law['p']:.3g}." if law else "")
        )
        out.append(t)
    return out
