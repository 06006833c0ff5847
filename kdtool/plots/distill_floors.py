"""Fig. 6b and the objective ablation: the distillation floor vs student width, one line per loss.

Inputs: floors tables (`kdtool distill`: students/floors.parquet or the folder), optionally stats
files (d* = F/g(alpha) marked per layer) and predict tables (the predicted floor: `floor_kl` in nats
when the table was calibrated, `predict --calibration`, drawn on the same axis; else Eq. 2's L* in
importance units on a right-hand axis). Floors tables of comparable runs pool (kdtool/distill/ablation.py):
seeds give the error bars (sample std over seeds) where every loss has two or more; otherwise the
bars are the std of the held-out KL over the floor window's evaluations, and the legend says so.
Tables of runs that are not comparable get their own lines, labelled by their folder.
Options: widths, layer (of the stats/predict files), title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.distill import ablation
from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.plots.distill import CURVES_KIND, FLOORS_KIND, _expand, _want_widths, _width_ticks
from kdtool.plots.inputs import read_stats
from kdtool.sae.summary import entries, finished_saes

PREDICT_KIND = "kdtool.predict"


def _d_stars(stats_files: list[Path], options: dict) -> list[tuple[str, float, int | None]]:
    """A d* mark per finished SAE of the stats files, each once (kdtool.sae.summary.finished_saes)."""
    summaries = [
        (p, formats.parquet_metadata(p).get("summary") if formats.is_parquet(p) else None) for p in stats_files
    ]
    chosen, _ = finished_saes(summaries)
    kept = {(p, e.layer, e.key) for p, e in chosen}
    described = {p for p, summary in summaries if entries(summary)}  # files without SAE entries: every layer
    out = []
    for p in stats_files:
        for ls in read_stats(p, options):
            if p in described and not any(k[:2] == (p, ls.layer) and ls.sae in (None, k[2]) for k in kept):
                continue
            out.append((f"$d^*$ (layer {ls.layer}{' ' + ls.sae if ls.sae else ''})", float(ls.d_star), ls.d_in))
    return out


def _spread_note(floors: list[ablation.LossFloor]) -> str:
    sources = {f.spread_source for f in floors}
    seeds = max((f.seeds for f in floors), default=1)
    if sources == {"seeds"}:
        return f"bars: std over {seeds} seeds"
    if "seeds" in sources:
        return "bars: std over seeds if repeated, else over the window"
    return "bars: std over the floor window (1 seed)"


def _predicted(ax, predict_files: list[Path], options: dict, widths: list[int]):
    """The predicted floor per layer: floor_kl (nats) on ax, else L* on a right-hand axis (returned, or None)."""
    right = None
    wanted = options.get("layer")
    for j, p in enumerate(predict_files):
        cols = formats.read_table(p, required=("width", "floor"))
        layer_col = np.asarray(cols["layer"]).astype(int) if "layer" in cols else np.zeros(len(cols["width"]), int)
        for layer in sorted(set(layer_col.tolist())):
            if wanted and layer not in wanted:
                continue
            sel = layer_col == layer
            w = np.asarray(cols["width"], float)[sel]
            keep = np.isin(w, widths) if widths else np.ones(len(w), bool)
            order = np.argsort(w[keep])
            calibrated = "floor_kl" in cols and np.all(np.isfinite(np.asarray(cols["floor_kl"], float)[sel]))
            y = np.asarray(cols["floor_kl" if calibrated else "floor"], float)[sel][keep][order]
            style = dict(color=st.GREY, linestyle=(0, (4, 2 + j)), marker="x", markersize=4, linewidth=1.0)
            if calibrated:
                ax.plot(w[keep][order], y, label=f"predicted, layer {layer} (calibrated)", **style)
            else:
                right = right or ax.twinx()
                right.plot(w[keep][order], y, label=f"predicted $L^*$, layer {layer} (right axis)", **style)
    if right is not None:
        right.set_ylabel("predicted $L^*$ (importance units)")
        right.set_ylim(bottom=0)
    return right


def _series(floor_files: list[Path], options: dict) -> tuple[list[dict], list[ablation.LossFloor]]:
    """One line per (group of comparable runs, loss): label, widths, floors, bars."""
    groups = ablation.group_tables(floor_files)
    lines, every = [], []
    for group in groups:
        lf = ablation.loss_floors(ablation.pooled(group))
        every += lf
        losses = list(dict.fromkeys(f.loss for f in lf))
        for loss in losses:
            pts = [f for f in lf if f.loss == loss]
            w = np.array([f.width for f in pts])
            keep = _want_widths(options, w)
            if len(groups) == 1:
                label = loss if len(losses) > 1 else None
            else:  # runs that do not pool: named by their folder
                folder = min(p.parent.name or p.stem for p in group)  # seed repeats: the plainest name
                label = folder + (f" ({loss})" if len(losses) > 1 or loss != "kl" else "")
            lines.append(
                {
                    "label": label,
                    "w": w[keep],
                    "y": np.array([f.floor for f in pts])[keep],
                    "err": np.array([f.spread if f.spread is not None else 0.0 for f in pts])[keep],
                }
            )
    return lines, every


def floors(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 6b: per-token KL floor vs student width, one line per loss (per group of comparable runs),
    error bars = seed std or the floor window's eval-to-eval std; d* dotted per stats layer, the
    teacher's width dashed, the predicted floor from a predict table. Several lines: the legend goes
    below the panel and the y axis fits the floors (the paper's single line keeps y from 0)."""
    files = _expand(inputs)
    floor_files = [p for p, k in files if k == FLOORS_KIND or (k is None and p.name.startswith("floors"))]
    stats_files = [p for p, k in files if k and k.startswith("kdtool.stats")]
    predict_files = [p for p, k in files if k == PREDICT_KIND]
    other = [p for p, k in files if p not in floor_files + stats_files + predict_files and k != CURVES_KIND]
    if other:
        raise BadInput(f"plot floors: {other[0]} is neither a floors table, a stats file nor a predict table")
    if not floor_files:
        raise BadInput("plot floors: give at least one floors.parquet (or a students/ folder)")
    lines, every = _series(floor_files, options)
    marks = _d_stars(stats_files, options)
    several = len(lines) > 1 or any(f.seeds > 1 for f in every)
    if several:
        n_legend = len(lines) + len(marks) + len({d for *_, d in marks if d}) + 2 + len(predict_files)
        fig, (ax,), (leg_ax,) = st.figure_with_legend_row(style, 1, n_legend)
    else:
        fig, axes = st.figure(style, 1, 1)
        ax, leg_ax = axes[0][0], None
    all_w = []
    for n, line in enumerate(lines):
        s = st.layer_style(n)
        ax.errorbar(line["w"], line["y"], yerr=line["err"], color=s["color"], linestyle=s["linestyle"],
                    marker=s["marker"], markersize=4, capsize=2, label=line["label"])  # fmt: skip
        if not several:
            for wi, f in zip(line["w"], line["y"], strict=True):
                ax.annotate(f"{f:.3f}", (wi, f), textcoords="offset points", xytext=(4, 4), fontsize="small")
        all_w += line["w"].tolist()
    ax.set_xscale("log", base=2)
    right = _predicted(ax, predict_files, options, sorted(set(all_w)))
    teacher_widths = set()
    for j, (label, d_star, d_in) in enumerate(marks):
        ax.axvline(d_star, color="0.3", linestyle=(0, (1, 1 + j)), linewidth=1.0, label=f"{label} = {d_star:,.0f}")
        if d_in:
            teacher_widths.add(d_in)
    for d_in in sorted(teacher_widths):
        ax.axvline(d_in, color="0.6", linestyle="--", linewidth=0.8, label=f"teacher width {d_in:,}")
    _width_ticks(ax, all_w)
    ax.set_xlabel("student width $d_S$")
    ax.set_ylabel("floor: per-token KL at T (nats)")
    if not several:
        ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if several:
        handles.append(ax.plot([], [], linestyle="none")[0])
        labels.append(_spread_note(every))  # says what the bars measure
        st.legend_below(leg_ax, handles, labels)
    elif handles:
        st.legend_outside(ax, handles, labels)  # inside, it covered the floors and their labels
    if options.get("title"):
        ax.set_title(options["title"])
    st.save(fig, output)
