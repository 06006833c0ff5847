"""The floor tables of a run report: predicted (Table 2), distilled (Table 3), calibrated (Tables 4 and 5).

Builders take the run's artifacts and return kdtool.report.model.Tables (see kdtool/report/tables.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kdtool import formats
from kdtool.report.model import CALIB, FLOORS, PREDICT, Artifact, Table, format_cell, number, of_kind


def _rows_table(
    art: Artifact, spec: list, key: str, section: str, title: str, order: Callable, cols: dict | None = None
) -> Table:
    """One row per row of a width/floor table (`cols`, read here if not given), in `order(cols)`; the spec's
    (column, header, format) it has."""
    cols = cols if cols is not None else formats.read_table(art.path, required=("width", "floor"))
    present = [s for s in spec if s[0] in cols]
    t = Table(key, section, title, [s[1] for s in present], [s[2] for s in present], sources=[art.rel])
    for i in order(cols):
        t.add(*(str(cols[s[0]][i]) if s[2] == "text" else number(cols[s[0]][i]) for s in present))
    return t


def _by_layer_then_width(cols: dict) -> np.ndarray:
    """Row order of a predict table: by layer, then width."""
    return np.lexsort((np.asarray(cols["width"], float), np.asarray(cols.get("layer", cols["width"]), float)))


def _by_width(cols: dict) -> np.ndarray:
    """Row order of a floors table: by width (stable)."""
    return np.argsort(np.asarray(cols["width"], float), kind="stable")


def predicted(arts: list[Artifact]) -> list[Table]:
    """Table 2: the rows of each predict table (Eq. 2: F_S = floor(d_S g), L* = importance mass dropped)."""
    preds = of_kind(arts, PREDICT)
    out = []
    spec = [
        ("layer", "layer", "int"),
        ("width", "d_S", "int"),
        ("features_kept", "F_S kept", "int"),
        ("features_dropped", "dropped", "int"),
        ("floor", "L*(d_S)", "g4"),
        ("normalized", "normalised", "g4"),
        ("floor_kl", "floor (nats)", "g4"),
        ("floor_kl_low", "2.5%", "g4"),
        ("floor_kl_high", "97.5%", "g4"),
    ]
    for art in preds:
        title = "Predicted floors (Eq. 2, Table 2)" + (f": {art.rel}" if len(preds) > 1 else "")
        t = _rows_table(art, spec, "predicted", "Predicted floors", title, _by_layer_then_width)
        t.note = "L* in the importance units of the stats file; floor (nats) = C·L* + B with the calibration."
        out.append(t)
    return out


def distill_floors(arts: list[Artifact]) -> list[Table]:
    """Table 3: the distillation floor of each student (mean held-out KL over the final 10% of steps)."""
    floors = of_kind(arts, FLOORS)
    spec = [
        ("width", "d_S", "int"),
        ("params", "params", "int"),
        ("non_embedding_params", "non-emb. params", "int"),
        ("floor", "floor (nats/token)", "f4"),
        ("floor_std", "std", "f4"),
        ("floor_scaled", "T²·floor", "f4"),
        ("raw_kl", "raw KL", "f1"),
        ("eval_ce", "eval CE", "f3"),
        ("n_evals", "evals", "int"),
        ("steps", "steps", "int"),
        ("tokens", "tokens", "int"),
    ]
    out = []
    for art in floors:
        title = "Distillation floors (Table 3)" + (f": {art.rel}" if len(floors) > 1 else "")
        cols = formats.read_table(art.path, required=("width", "floor"))
        losses = set(cols.get("loss", ["kl"]))
        mine = spec if losses == {"kl"} else [spec[0], ("loss", "loss", "text"), *spec[1:]]  # say which loss
        t = _rows_table(art, mine, "distill_floors", "Distillation", title, _by_width, cols)
        t.note = (
            "floor = per-token KL(teacher‖student) at temperature T, nats; raw KL = T² × KL summed over a "
            "sequence (the paper's raw value)."
        )
        out.append(t)
    return out


_FITS = (("linear", "C"), ("affine", "C, B"), ("affine_fixed", "C, B fixed"), ("power_law", "a, γ, c"))


def calibration(arts: list[Artifact]) -> list[Table]:
    """Table 4 (fits: C, B, a, gamma, c, R^2) and Table 5 (decomposition) of each calib.json."""
    out = []
    cals = of_kind(arts, CALIB)
    for art in cals:
        cal = art.summary if isinstance(art.summary, dict) else formats.read_json(art.path)
        suffix = f": {art.rel}" if len(cals) > 1 else ""
        t = Table(
            "calibration",
            "Calibration",
            "Calibration fits (Table 4)" + suffix,
            ["fit", "model", "C", "B", "a", "γ", "c", "R²", "RMSE", "LOO RMSE", "n", "note"],
            ["text", "text", "g4", "g4", "g4", "g4", "g4", "f4", "g3", "g3", "int", "text"],
            sources=[art.rel],
        )
        for name, _ in _FITS:
            fit = cal.get(name)
            if not isinstance(fit, dict):
                continue
            if fit.get("skipped"):
                t.add(
                    name,
                    fit.get("model"),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    f"skipped: {fit['skipped']}",
                )
                continue
            t.add(
                name,
                fit.get("model"),
                *(number(fit.get(k)) for k in ("C", "B", "a", "gamma", "c", "r2", "rmse", "loo_rmse", "n")),
                "",
            )
        t.note = "R² = 1 − SS_res/SS_tot over all points (negative when a fit is worse than the mean)."
        out.append(t)
        decomp = cal.get("decomposition")
        if isinstance(decomp, list) and decomp:
            dfit = cal.get("decomposition_fit") or {}
            d = Table(
                "decomposition",
                "Calibration",
                "Floor decomposition (Table 5)" + suffix,
                ["d_S", "observed", "predicted L*", "geometric C·L*", "baseline B", "fitted", "% geometric"],
                ["int", "f3", "g4", "f3", "f3", "f3", "pct"],
                sources=[art.rel],
            )
            for row in decomp:
                d.add(
                    *(
                        number(row.get(k))
                        for k in ("width", "observed", "predicted", "geometric", "baseline", "fitted", "pct_geometric")
                    )
                )
            d.note = (
                f"fit: {dfit.get('fit', '?')} (C = {format_cell(number(dfit.get('C')), 'g4')}, "
                f"B = {format_cell(number(dfit.get('B')), 'g4')}); % geometric = (observed − B) / observed."
            )
            out.append(d)
    return out
