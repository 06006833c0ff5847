"""Fig. 8: linear-probe accuracy per concept and model (heatmap) and its change vs the teacher.

Input: one or more probe.parquet files from `kdtool probe run` (rows are concatenated).
Options read: layer (keep only these layers), title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st

REQUIRED = ("concept", "model", "width", "layer", "accuracy", "accuracy_std")


def _read(inputs: list[Path], options: dict) -> list[dict]:
    if not inputs:
        raise BadInput("probe: give a probe.parquet file (from `kdtool probe run`)")
    rows = []
    for path in inputs:
        cols = formats.read_table(path, required=REQUIRED)
        n = len(cols["concept"])
        role = cols.get("role")
        for i in range(n):
            model = str(cols["model"][i])
            rows.append(
                {
                    "concept": str(cols["concept"][i]),
                    "model": model,
                    "width": int(cols["width"][i]),
                    "layer": int(cols["layer"][i]),
                    "accuracy": float(cols["accuracy"][i]),
                    "accuracy_std": float(cols["accuracy_std"][i]),
                    "selectivity": float(cols["selectivity"][i]) if "selectivity" in cols else None,
                    "teacher": (str(role[i]) == "teacher") if role is not None else model == "teacher",
                }
            )
    layers = options.get("layer")
    if layers:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        rows = [r for r in rows if r["layer"] in wanted]
        if not rows:
            raise BadInput(f"--layer: no probe rows at layer(s) {sorted(wanted)}")
    return rows


def _model_labels(rows: list[dict]) -> tuple[list[str], dict[str, str]]:
    """Models in paper order (teacher, then students from widest to narrowest) and their axis labels."""
    models = {}
    for r in rows:
        models.setdefault(r["model"], r)
    order = sorted(models, key=lambda m: (not models[m]["teacher"], -models[m]["width"], m))
    widths = [models[m]["width"] for m in order if not models[m]["teacher"]]
    labels = {}
    for m in order:
        r = models[m]
        if r["teacher"]:
            labels[m] = f"Teacher\n(d={r['width']})"
        elif widths.count(r["width"]) == 1:
            labels[m] = f"$d_S$={r['width']}"
        else:
            labels[m] = Path(m).name
    return order, labels


def probe(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """(a) accuracy heatmap, concepts x models; (b) accuracy change vs the teacher in points (or selectivity)."""
    rows = _read(inputs, options)
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    order, labels = _model_labels(rows)
    layers = sorted({r["layer"] for r in rows})
    cell = {(r["concept"], r["model"]): r for r in rows}
    if len(cell) != len(rows):
        raise BadInput("probe: a (concept, model) pair appears twice (several layers? pick one with --layer)")
    acc = np.full((len(concepts), len(order)), np.nan)
    std = np.full_like(acc, np.nan)
    for i, c in enumerate(concepts):
        for j, m in enumerate(order):
            if (c, m) in cell:
                acc[i, j] = 100 * cell[(c, m)]["accuracy"]
                std[i, j] = 100 * cell[(c, m)]["accuracy_std"]
    teachers = [j for j, m in enumerate(order) if any(r["teacher"] and r["model"] == m for r in rows)]
    students = [j for j in range(len(order)) if j not in teachers]

    fig, axes = st.figure(style, 1, 2, gridspec_kw={"width_ratios": [max(len(order), 2), 3]})
    ax = axes[0][0]
    ax.grid(False)
    im = ax.imshow(acc, cmap="viridis", vmin=50, vmax=100, aspect="auto")
    ax.set_xticks(range(len(order)), [labels[m] for m in order])
    ax.set_yticks(range(len(concepts)), concepts)
    for i in range(len(concepts)):
        for j in range(len(order)):
            if np.isfinite(acc[i, j]):
                ax.text(
                    j,
                    i,
                    f"{acc[i, j]:.1f}",
                    ha="center",
                    va="center",
                    color="white" if acc[i, j] < 80 else "black",
                    fontsize="small",
                )
    fig.colorbar(im, ax=ax, label="accuracy (%)", shrink=0.9)
    layer_note = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    ax.set_title(f"(a) probe accuracy, {layer_note}")

    ax = axes[0][1]
    y = np.arange(len(concepts))
    if teachers and students:
        t = teachers[0]
        bar_h = 0.8 / len(students)
        for k, j in enumerate(students):
            delta = acc[:, j] - acc[:, t]
            err = np.sqrt(std[:, j] ** 2 + std[:, t] ** 2)
            ax.barh(
                y - 0.4 + (k + 0.5) * bar_h,
                delta,
                height=bar_h,
                xerr=err,
                color=st.PALETTE[k % len(st.PALETTE)],
                label=labels[order[j]].replace("\n", " "),
                error_kw={"elinewidth": 0.6, "capsize": 1.5},
            )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("accuracy change vs teacher (points)")
        ax.set_title("(b) change vs teacher")
    else:  # teacher only, or students only: show what each probe adds over its control task
        bar_h = 0.8 / len(order)
        for k, m in enumerate(order):
            sel = [100 * (cell[(c, m)]["selectivity"] or 0.0) if (c, m) in cell else np.nan for c in concepts]
            ax.barh(
                y - 0.4 + (k + 0.5) * bar_h,
                sel,
                height=bar_h,
                color=st.PALETTE[k % len(st.PALETTE)],
                label=labels[m].replace("\n", " "),
            )
        ax.set_xlabel("selectivity: accuracy - control (points)")
        ax.set_title("(b) selectivity")
    ax.set_yticks(y, concepts)
    ax.invert_yaxis()
    if len(order) > 1:
        ax.legend(loc="best", fontsize="small")
    if options.get("title"):
        fig.suptitle(options["title"])
    st.save(fig, output)
