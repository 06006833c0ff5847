"""Which features survive: per-feature r2 against importance rank per student, and survived count vs width.

Input: one survival.parquet from `kdtool survival`. One row of panels per layer: for each student (narrowest
first) r2 of every measured feature against its importance rank (log x), survivors coloured, the running
median, the --threshold line, F_S = floor(d_S g(alpha)) marked and Theorem 1's staircase (1 up to F_S, 0
beyond) drawn; the last panel puts each model's survived count against its width beside d_S g(alpha)
(capped at F, the alive count), the count the theorem predicts. The teacher's own row set (r2 = 1 by
construction) is only a point in that last panel. Students distilled with different losses (`kdtool distill
--loss`) are never pooled: each (width, loss) has its own panel, titled with its loss when the file holds
several, and the count panel draws one series per loss. Options read: layer, title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.kinds import expect
from kdtool.plots import style as st

REQUIRED = ("layer", "model", "role", "width", "rank", "r2", "measured", "survived")
R2_FLOOR = -0.2  # r2 below this is drawn at the bottom edge (it can be very negative for a lost feature)


def _read(path: Path) -> tuple[dict, dict]:
    expect(path, "kdtool.survival", "plot survival", allow_unmarked=False)
    meta = formats.parquet_metadata(path)
    cols = formats.read_table(path, required=REQUIRED)
    summary = meta.get("summary") or {}
    if not summary.get("rows"):
        raise BadInput(f"plot survival: {path} has no summary rows (write it with `kdtool survival`)")
    return {k: np.asarray(v) for k, v in cols.items()}, summary


def _running_median(x: np.ndarray, y: np.ndarray, bins: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Median of y in log-spaced bins of x (bins with fewer than 3 points are skipped)."""
    edges = np.unique(np.geomspace(1, x.max() + 1, bins + 1).astype(int))
    mx, my = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (x >= lo) & (x < hi)
        if sel.sum() >= 3:
            mx.append(np.sqrt(lo * hi))
            my.append(np.median(y[sel]))
    return np.asarray(mx), np.asarray(my)


def _feature_panel(ax, cols: dict, sel: np.ndarray, row: dict, threshold: float, several_losses: bool) -> None:
    rank = cols["rank"][sel].astype(float) + 1  # 1 = most important
    r2 = np.clip(np.nan_to_num(cols["r2"][sel].astype(float), nan=R2_FLOOR), R2_FLOOR, 1.0)
    surv = cols["survived"][sel].astype(bool)
    ax.scatter(rank[~surv], r2[~surv], s=3, color=st.GREY, alpha=0.5, lw=0, label="lost")
    ax.scatter(rank[surv], r2[surv], s=3, color=st.PALETTE[0], alpha=0.7, lw=0, label="survived")
    if rank.size >= 3:
        mx, my = _running_median(rank, r2)
        ax.plot(mx, my, color=st.PALETTE[1], lw=1.2, label="running median")
    ax.axhline(threshold, color=st.GREY, lw=0.8, ls=":", label=f"threshold r2 = {threshold:g}")
    top = max(rank.max() if rank.size else 1.0, 2.0)
    F_S = row.get("F_S")
    if F_S is not None:
        step_x = [1, max(F_S, 1), max(F_S, 1), top]
        ax.plot(step_x, [1, 1, 0, 0] if F_S > 0 else [0, 0, 0, 0], color=st.PALETTE[3], lw=1.0, ls="--",
                label="Theorem 1 staircase")  # fmt: skip
        if 0 < F_S < top:
            ax.axvline(F_S, color=st.PALETTE[3], lw=0.8, ls=":")
            ax.annotate(rf"$F_S={st.math_int(F_S)}$", (F_S, 0.5), xytext=(3, 0), textcoords="offset points",
                        fontsize="x-small", color=st.PALETTE[3])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(0.8, top * 1.25)
    ax.set_ylim(R2_FLOOR - 0.03, 1.05)
    ax.set_xlabel("importance rank (1 = most important)")
    ax.set_ylabel(r"survival $R^2$ of the feature")
    loss = f", {row['loss']}" if several_losses and row.get("loss") else ""
    title = f"{row['model']} ($d_S$={row['width']}{loss}): {row['survived']} of {row['measured']} survive"
    ax.set_title(title, fontsize="small")


def _losses(rows: list[dict]) -> list:
    """The students' losses in order of first appearance (None: a model folder of unknown loss)."""
    out: list = []
    for r in rows:
        if r["role"] != "teacher" and r.get("loss") not in out:
            out.append(r.get("loss"))
    return out


def _count_panel(ax, rows: list[dict], layer_info: dict) -> None:
    widths = np.array([r["width"] for r in rows], dtype=float)
    counts = np.array([r["survived"] for r in rows], dtype=float)
    losses = _losses(rows)
    colours = [c for i, c in enumerate(st.PALETTE) if i not in (2, 3)]  # 2: the teacher, 3: the prediction
    for i, loss in enumerate(losses):  # one series per loss: students of different objectives are not pooled
        mine = [r for r in rows if r["role"] != "teacher" and r.get("loss") == loss]
        label = "students: survived" if len(losses) == 1 else f"{loss or 'other'} students: survived"
        ax.plot([r["width"] for r in mine], [r["survived"] for r in mine], "o-" if len(losses) > 1 else "o",
                color=colours[i % len(colours)], lw=0.8, label=label)  # fmt: skip
    teacher = [r for r in rows if r["role"] == "teacher"]
    ax.plot([r["width"] for r in teacher], [r["survived"] for r in teacher], "s", color=st.PALETTE[2],
            label="teacher (reference)")  # fmt: skip
    g, F = layer_info.get("g"), layer_info.get("F")
    grid = np.linspace(0, widths.max() * 1.05, 200)
    if g:
        ax.plot(grid, np.minimum(grid * g, F or np.inf), color=st.PALETTE[3], ls="--",
                label=rf"$d_S\,g(\alpha)$, g = {g:.3g} (capped at F)")  # fmt: skip
    if F:
        ax.axhline(F, color=st.GREY, lw=0.8, ls=":", label=f"F = {st.fmt_int(F)} alive")
    ax.set_xlim(0, widths.max() * 1.05)
    ax.set_ylim(0, max(counts.max(), F or 0) * 1.1 + 1)
    ax.set_xlabel(r"width $d_S$")
    ax.set_ylabel("features that survive")
    ax.set_title("survived count vs width", fontsize="small")
    ax.legend(loc="best", fontsize="x-small")


def survival(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Per layer: one panel per student (r2 vs importance rank, F_S marked), then survived count vs width."""
    if len(inputs) != 1:
        raise BadInput(f"plot survival: give one survival.parquet (got {len(inputs)} inputs)")
    cols, summary = _read(inputs[0])
    layers = sorted({int(r["layer"]) for r in summary["rows"]})
    wanted = options.get("layer")
    if wanted:
        wanted = [wanted] if isinstance(wanted, int) else list(wanted)
        missing = [L for L in wanted if L not in layers]
        if missing:
            raise BadInput(f"--layer: {inputs[0]} has no layer {missing[0]} (layers: {', '.join(map(str, layers))})")
        layers = wanted
    threshold = float((summary.get("config") or {}).get("threshold", 0.5))
    several_losses = len(_losses(summary["rows"])) > 1
    n_students = max(sum(1 for r in summary["rows"] if r["layer"] == L and r["role"] != "teacher") for L in layers)
    fig, axes = st.figure(style, len(layers), n_students + 1)
    for i, L in enumerate(layers):
        rows = [r for r in summary["rows"] if r["layer"] == L]
        students = [r for r in rows if r["role"] != "teacher"]
        for j, row in enumerate(students):
            sel = (cols["layer"] == L) & (cols["model"] == row["model"]) & cols["measured"].astype(bool)
            _feature_panel(axes[i][j], cols, sel, row, threshold, several_losses)
        for j in range(len(students), n_students):
            axes[i][j].axis("off")
        axes[i][0].legend(loc="lower left", fontsize="x-small", markerscale=3)
        _count_panel(axes[i][n_students], rows, (summary.get("layers") or {}).get(str(L), {}))
        if len(layers) > 1:
            axes[i][0].annotate(f"layer {L}", (0, 1.08), xycoords="axes fraction", fontweight="bold")
    source = summary.get("importance_source", "?")
    per_loss = "; one series per loss" if several_losses else ""
    st.title(fig, options, f"{inputs[0].name}: importance {source}; measured features only{per_loss}")
    st.save(fig, output)
