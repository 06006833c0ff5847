"""The capacity figure (Fig. 1): g(alpha) and the critical width d* = F / g(alpha) against alpha.

Inputs: none (the paper's F), or stats Parquet files (`kdtool stats`; docs/formats.md). The function
has the registry signature fn(inputs, output, *, style, options) and reads the generic options
features, alpha, layer, title (and `--set teacher_width=N`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from matplotlib.legend_handler import HandlerTuple
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.plots.inputs import LayerStats, check_inputs, layer_label, read_stats
from kdtool.theory import theorem as theory

#: The paper's layer-12 feature count (Table 1): the default F for the capacity figure.
PAPER_FEATURES = 28_665
#: Sparsity levels of the toy-model sweep (section 4), marked on Fig. 1 like the paper does.
TOY_ALPHAS = (0.80, 0.90, 0.95, 0.99)


def capacity(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 1: g(alpha) (left) and d* = F / g(alpha) (right) against alpha, with the non-monotone region shaded.

    Without inputs: one d* curve for F = --features (default the paper's 28,665) and the toy-model
    sparsities marked. With stats files: each layer's (alpha, g) and (alpha, d*) marked, one d* curve
    per layer, and the teacher width when the stats summary records it.
    """
    check_inputs(inputs, "capacity", at_least=0)
    layers: list[tuple[str, LayerStats]] = []
    for path in inputs:
        for ls in read_stats(path, options):
            layers.append((layer_label(ls.layer, path, len(inputs), ls.sae), ls))
    marks = options.get("alpha")
    if marks in (None, []):
        marks = [] if layers else list(TOY_ALPHAS)  # the toy sweep's levels, as in the paper's Fig. 1
    marks = [marks] if isinstance(marks, (int, float)) else [float(a) for a in marks]
    for a in marks:
        if not (0 <= a < 1):
            raise BadInput(f"--alpha must be in [0, 1), got {a}")
    features = options.get("features")
    if features is not None and int(features) < 1:
        raise BadInput(f"--features must be >= 1, got {features}")
    if features is None and not layers:
        features = PAPER_FEATURES

    # Logit-spaced grid: the interesting range (0.9 .. 0.999) gets room, and 0.05 .. 0.63 stays visible.
    lo, hi = 0.02, 0.9995
    lo = min([lo, *(m for m in marks if m > 0)])
    hi = max([hi, *(ls.alpha for _, ls in layers), *marks])
    z = np.linspace(math.log(lo / (1 - lo)), math.log(hi / (1 - hi)), 600)
    alpha = 1.0 / (1.0 + np.exp(-z))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", theory.NonMonotoneCapacity)
        g = theory.g(alpha)
        g_marks = [float(theory.g(a)) if a > 0 else math.inf for a in marks]
    a_min = theory.MONOTONE_FROM

    n_legend = max(2 + len(marks) + len(layers), (features is not None) + len(layers) + 2)
    fig, (ax_g, ax_d), (leg_g, leg_d) = st.figure_with_legend_row(style, 2, n_legend)
    for ax in (ax_g, ax_d):
        ax.set_xscale("logit")
        ax.set_xlim(lo, hi)
        ax.axvspan(lo, a_min, color=st.GREY, alpha=0.12, lw=0)
        ax.axvline(a_min, color=st.GREY, lw=0.8, ls=":")
        ax.set_xlabel(r"feature sparsity $\alpha$ (logit scale)")
        _alpha_ticks(ax, lo, hi)
    ax_g.text(
        0.03,
        0.97,
        r"$\alpha<1-1/e$:" + "\ng not monotone,\nformula doubtful",
        transform=ax_g.transAxes,
        va="top",
        ha="left",
        fontsize="small",
        color=st.GREY,
    )
    ax_g.plot(alpha, g, color="black", lw=1.0, label=r"$g(\alpha)=1/((1-\alpha)\ln\frac{1}{1-\alpha})$")
    ax_g.plot([a_min], [math.e], "o", color=st.GREY, mfc="white", zorder=3, label=r"minimum $g=e$ at $1-1/e$")
    for i, (a, gv) in enumerate(zip(marks, g_marks, strict=True)):
        ax_g.plot(
            [a],
            [gv],
            "o",
            color=st.PALETTE[(i + 1) % len(st.PALETTE)],
            zorder=3,
            label=rf"$\alpha={a:g}$: $g={gv:.3g}$",
        )
    for i, (label, ls) in enumerate(layers):
        sty = st.layer_style(i)
        ax_g.plot(
            [ls.alpha],
            [ls.g],
            sty["marker"],
            color="black",
            mfc=sty["color"],
            zorder=4,
            label=rf"{label}: $\alpha={ls.alpha:.4f}$, $g={ls.g:.2f}$",
        )
    ax_g.set_yscale("log")
    ax_g.set_ylabel(r"capacity $g(\alpha)$ (features per dimension)")
    ax_g.set_title("(a) capacity of a sparse representation")

    handles, labels = [], []
    if features is not None:
        (h,) = ax_d.plot(alpha, float(features) / g, color="black", lw=1.0)
        handles.append(h)
        labels.append(f"F = {st.fmt_int(int(features))}")
    for i, (label, ls) in enumerate(layers):
        sty = st.layer_style(i)
        (line,) = ax_d.plot(alpha, ls.n_features / g, color=sty["color"], ls=sty["linestyle"])
        (dot,) = ax_d.plot([ls.alpha], [ls.d_star], sty["marker"], color="black", mfc=sty["color"], zorder=4)
        handles.append((line, dot))
        labels.append(rf"{label}: F = {st.fmt_int(ls.n_features)}, $d^*={st.math_int(ls.d_star)}$")
    teacher = options.get("teacher_width") or next((ls.d_in for _, ls in layers if ls.d_in), None)
    if teacher:
        handles.append(ax_d.axhline(float(teacher), color=st.GREY, lw=0.9, ls="--"))
        labels.append(f"teacher width {st.fmt_int(teacher)}")
    handles.append(Patch(color=st.GREY, alpha=0.12, lw=0))
    labels.append(r"$\alpha<1-1/e$: g not monotone, formula doubtful")
    ax_d.set_yscale("log")
    ax_d.set_ylabel(r"critical width $d^*=F/g(\alpha)$ (dimensions)")
    ax_d.set_title("(b) critical width")
    st.legend_below(leg_g, *ax_g.get_legend_handles_labels())
    st.legend_below(leg_d, handles, labels, handler_map={tuple: HandlerTuple(ndivide=None)})
    st.title(fig, options)
    st.save(fig, output)


def _alpha_ticks(ax, lo: float, hi: float) -> None:
    """Plain decimal ticks on the logit axis (its default 1-10^-2 labels read badly)."""
    ticks = [t for t in (0.05, 0.2, 0.5, 0.8, 0.9, 0.99, 0.999) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
