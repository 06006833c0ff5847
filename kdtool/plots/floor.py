"""The importance spectrum and the floor it predicts: Fig. 5a (importance vs rank) and Fig. 5b (L*(d_S)).

Inputs: stats Parquet files (`kdtool stats`) or predict tables (`kdtool predict`); see
docs/formats.md. Each function has the registry signature fn(inputs, output, *, style, options) and
reads the generic options layer, widths, capacity, title (and `--set column=...` for `floor`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatterSciNotation

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.plots.inputs import check_inputs, is_stats, layer_label, read_stats, select_layers
from kdtool.theory import theorem as theory

# --------------------------------------------------------------------------- Fig. 5a: importance


def importance(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 5a: sorted feature importance E[z_i^2] against rank, log-log, one line per layer."""
    check_inputs(inputs, "importance")
    fig, axes = st.figure(style)
    ax = axes[0][0]
    i = 0
    for path in inputs:
        for ls in read_stats(path, options):
            sty = st.layer_style(i)
            imp = ls.importance[ls.importance > 0]
            if imp.size == 0:
                raise BadInput(f"{path}: layer {ls.layer}: every alive feature has zero importance")
            rank = np.arange(1, imp.size + 1)
            ax.plot(
                rank,
                imp,
                color=sty["color"],
                ls=sty["linestyle"],
                label=f"{layer_label(ls.layer, path, len(inputs), ls.sae)} (F = {st.fmt_int(ls.n_features)})",
            )
            i += 1
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("feature rank (by importance)")
    ax.set_ylabel(r"importance $I_i=\mathbb{E}[z_i^2]$ (squared SAE activation)")
    ax.set_title("feature importance")
    ax.legend(loc="lower left")
    st.title(fig, options)
    st.save(fig, output)


# --------------------------------------------------------------------------- Fig. 5b: floor


def _predict_blocks(path: Path, options: dict, column: str) -> list[dict]:
    """Per-layer rows of a predict table, with d* estimated from F_S = floor(d_S g) when not stored."""
    cols = formats.read_table(path, required=("width", column))
    widths = formats.numeric_column(cols, "width", path, positive=True)
    y = formats.numeric_column(cols, column, path)
    layer_col = np.asarray(cols["layer"]).astype(np.int64) if "layer" in cols else np.zeros(widths.size, np.int64)
    summary = {}
    if formats.is_parquet(path):
        summary = formats.parquet_metadata(path).get("summary") or {}
    sae_col = np.asarray(cols["sae"]).astype(str) if "sae" in cols else None  # several SAEs of a layer
    blocks = []
    chosen = select_layers(sorted(set(layer_col.tolist())), options, path)
    pairs = [(L, k) for L in chosen for k in ([None] if sae_col is None else dict.fromkeys(sae_col[layer_col == L]))]
    for layer, key in pairs:
        rows = (layer_col == layer) & (True if key is None else sae_col == key)
        order = np.argsort(widths[rows])
        block = {"layer": layer, "sae": key, "width": widths[rows][order], "y": y[rows][order], "d_star": None,
                 "exact": False}  # fmt: skip
        for band in ("low", "high"):
            name = f"{column}_{band}"
            if name in cols:
                block[band] = formats.numeric_column(cols, name, path)[rows][order]
        meta = {}
        if isinstance(summary, dict):
            meta = (summary.get("saes") or {}).get(key) or (summary.get("layers") or {}).get(str(layer)) or {}
        if meta.get("d_star"):
            block["d_star"], block["exact"] = float(meta["d_star"]), True
        elif "features_kept" in cols and "features_dropped" in cols:
            kept = formats.numeric_column(cols, "features_kept", path)[rows][order]
            dropped = formats.numeric_column(cols, "features_dropped", path)[rows][order]
            total = kept + dropped
            below = kept < total
            if np.any(below):
                # F_S = floor(d g) -> g in [F_S/d, (F_S+1)/d); the widest width below d* bounds it best.
                j = np.flatnonzero(below)[-1]
                g_est = (kept[j] + 0.5) / block["width"][j]
                block["d_star"] = float(total[j] / g_est)
        blocks.append(block)
    return blocks


def floor(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 5b: predicted floor L*(d_S) against student width, one line per layer, d* marked (log y).

    Inputs: stats files (the floor is computed from the importances, Eq. 2, as a curve over
    widths 1 .. 1.15 d*, with --widths marked) or predict tables (their rows; d* from their summary,
    else estimated from F_S = floor(d_S g)). `--set column=normalized|floor_kl` plots another
    predict column (floor_kl draws its bootstrap band).
    """
    check_inputs(inputs, "floor")
    widths_opt = options.get("widths")
    capacity_kind = options.get("capacity") or "paper"
    column = options.get("column") or "floor"
    series: list[dict] = []  # {label, x, y, marks: (x, y) | None, d_star, exact, band: (lo, hi) | None}
    for path in inputs:
        if is_stats(path):
            for ls in read_stats(path, options, capacity=capacity_kind):
                model = theory.FloorModel.from_weights(ls.importance, ls.alpha, g_value=ls.g)
                top = max(ls.d_star * 1.15, max(widths_opt) if widths_opt else 0.0)
                grid = np.unique(np.linspace(1, math.ceil(top), 800).round().astype(np.int64))
                marks = None
                if widths_opt:
                    w = np.asarray(widths_opt, dtype=float)
                    marks = (w, model.floor(w))
                series.append(
                    {
                        "label": layer_label(ls.layer, path, len(inputs), ls.sae),
                        "x": grid.astype(float),
                        "y": model.floor(grid),
                        "marks": marks,
                        "d_star": model.d_star,
                        "exact": True,
                        "band": None,
                        "line_only": True,
                        "x_max": top,
                    }
                )
        else:
            for block in _predict_blocks(path, options, column):
                band = (block["low"], block["high"]) if "low" in block and "high" in block else None
                series.append(
                    {
                        "label": layer_label(block["layer"], path, len(inputs), block["sae"]),
                        "x": block["width"],
                        "y": block["y"],
                        "marks": None,
                        "d_star": block["d_star"],
                        "exact": block["exact"],
                        "band": band,
                        "line_only": False,
                        "x_max": max(float(block["width"].max()), block["d_star"] or 0.0),
                    }
                )
    if not series:
        raise BadInput("plot floor: nothing to draw (no layers selected)")
    drew_d_star = any(s_["d_star"] is not None for s_ in series)
    n_legend = len(series) + int(drew_d_star)
    if n_legend > 2:  # several layers: legend in its own row so it never covers a curve
        fig, (ax,), (leg_ax,) = st.figure_with_legend_row(style, 1, n_legend)
    else:
        fig, axes = st.figure(style)
        ax, leg_ax = axes[0][0], None
    for i, s_ in enumerate(series):
        sty = st.layer_style(i)
        label = s_["label"]
        if s_["d_star"] is not None:
            rel = "=" if s_["exact"] else r"\approx"
            label += rf" ($d^*{rel}{st.math_int(s_['d_star'])}$)"
            ax.axvline(s_["d_star"], color=sty["color"], lw=0.9, ls=":")
        pos = s_["y"] > 0  # the floor is exactly 0 from d* on: nothing to draw on a log axis
        marker = None if s_["line_only"] else sty["marker"]
        ax.plot(s_["x"][pos], s_["y"][pos], color=sty["color"], ls=sty["linestyle"], marker=marker, label=label)
        if s_["marks"] is not None:
            mx, my = s_["marks"]
            ax.plot(mx[my > 0], my[my > 0], sty["marker"], color=sty["color"], ls="none")
        if s_["band"] is not None:
            ax.fill_between(
                s_["x"], s_["band"][0], s_["band"][1], color=sty["color"], alpha=0.15, lw=0, label="bootstrap 95% band"
            )
    ax.set_yscale("log")
    ax.set_xlim(0, max(s_["x_max"] for s_ in series) * 1.03)
    ax.set_xlabel(r"student width $d_S$ (hidden dimensions)")
    ylabels = {
        "floor": r"predicted floor $L^*(d_S)$ (importance units)",
        "normalized": r"normalised floor $L^*(d_S)/L^*(d_{min})$",
        "floor_kl": "calibrated floor (nats/token)",
    }
    ax.set_ylabel(ylabels.get(column, column))
    titles = {"floor": "predicted loss floor vs width (Eq. 2)", "floor_kl": r"calibrated floor $C L^* + B$ vs width"}
    ax.set_title(titles.get(column, f"{column} vs width"))
    log_minor_labels(ax)
    handles, labels = ax.get_legend_handles_labels()
    if drew_d_star:
        handles.append(Line2D([], [], color=st.GREY, ls=":"))
        labels.append(r"$d^*$ (" + ("geometric " if column != "floor" else "") + "floor is 0 beyond it)")
    if leg_ax is not None:
        st.legend_below(leg_ax, handles, labels)
    else:
        ax.legend(handles, labels, loc="best")
    st.title(fig, options)
    st.save(fig, output)


def log_minor_labels(ax) -> None:
    """Label some minor ticks of a log y axis spanning under two decades (else points float unlabelled)."""
    ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
