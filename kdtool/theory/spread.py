"""How much the prediction depends on the SAE: min / median / max over the SAEs of a layer.

Why: F, alpha and d* are measured through an SAE whose width, lambda, seed and training tokens are
the user's choices. When a stats file holds several SAEs of one layer (`kdtool stats --sae A --sae
B ...`), `kdtool predict` reports each one's floors and, per layer, their spread: the minimum,
median and maximum over the SAEs of d*, F, alpha and, per width, of the floor and the features kept.
With two SAEs the median is their mean. The spread is a range over the SAEs given, not a
confidence interval: it says how much the choices you varied move the answer.
"""

from __future__ import annotations

import numpy as np

SPREAD_KIND = "kdtool.predict.spread"
STATS = ("min", "median", "max")
SPREAD_COLUMNS = ("layer", "width", "saes", "floor_min", "floor_median", "floor_max", "features_kept_min",
                  "features_kept_median", "features_kept_max", "d_star_min", "d_star_median", "d_star_max")  # fmt: skip


def _mmm(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return dict.fromkeys(STATS)
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def spread(columns: dict[str, list], per_sae: dict[str, dict]) -> dict[str, dict]:
    """{"<layer>": {saes, d_star, F, alpha, widths: {"<width>": {floor, features_kept}}}} from predict's rows."""
    out: dict[str, dict] = {}
    for layer in sorted({info["layer"] for info in per_sae.values()}):
        keys = [k for k, info in per_sae.items() if info["layer"] == layer]
        entry = {"saes": keys} | {q: _mmm(per_sae[k][q] for k in keys) for q in ("d_star", "F", "alpha")}
        widths: dict[str, dict] = {}
        rows = [i for i, L in enumerate(columns.get("layer", [])) if L == layer]
        for w in sorted({columns["width"][i] for i in rows}):
            at = [i for i in rows if columns["width"][i] == w]
            widths[str(w)] = {q: _mmm(columns[q][i] for i in at) for q in ("floor", "features_kept")}
        entry["widths"] = widths
        out[str(layer)] = entry
    return out


def describe(spread_summary: dict[str, dict]) -> list[str]:
    """One line per layer: how far d* moves over its SAEs."""
    lines = []
    for layer, s in spread_summary.items():
        d = s["d_star"]
        if d["min"] is None:
            continue
        lines.append(
            f"layer {layer}: {len(s['saes'])} SAEs, d* min {d['min']:,.1f} / median {d['median']:,.1f} / "
            f"max {d['max']:,.1f} (x{d['max'] / d['min']:.2f}); per-width floors: predict --spread"
        )
    return lines


def table(spread_summary: dict[str, dict]) -> dict[str, list]:
    """`predict --spread`: one row per layer and width with the min / median / max over the layer's SAEs."""
    cols: dict[str, list] = {k: [] for k in SPREAD_COLUMNS}
    for layer, s in spread_summary.items():
        for w, at in s["widths"].items():
            cols["layer"].append(int(layer))
            cols["width"].append(int(w))
            cols["saes"].append(len(s["saes"]))
            for q in ("floor", "features_kept"):
                for stat in STATS:
                    cols[f"{q}_{stat}"].append(at[q][stat])
            for stat in STATS:
                cols[f"d_star_{stat}"].append(s["d_star"][stat])
    return cols
