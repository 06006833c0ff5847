"""The theory figures: capacity g(alpha) (Fig. 1), importance (Fig. 5a), predicted floor (Fig. 5b),
calibration (Fig. 7) and normalised predicted vs observed floors (Fig. 17).

Inputs are kdtool files: a stats Parquet (`kdtool stats`), a predict table (`kdtool predict`) or a
calib.json (`kdtool calibrate`); see docs/formats.md. Each function has the registry signature
    fn(inputs, output, *, style, options)
and reads only the generic options it understands (layer, widths, features, alpha, capacity, title).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.theory import theorem as theory

#: The paper's layer-12 feature count (Table 1): the default F for the capacity figure.
PAPER_FEATURES = 28_665
#: Sparsity levels of the toy-model sweep (section 4), marked on Fig. 1 like the paper does.
TOY_ALPHAS = (0.80, 0.90, 0.95, 0.99)


# --------------------------------------------------------------------------- inputs


@dataclass
class LayerStats:
    """What the figures need from one layer of a stats file."""

    layer: int
    importance: np.ndarray  # [F] importance of alive features, sorted descending
    n_features: int  # F = number of alive features
    alpha: float
    g: float
    d_star: float
    d_in: int | None  # teacher width, when the stats summary records it


def _select_layers(available: list[int], options: dict, path: Path) -> list[int]:
    wanted = options.get("layer")
    if wanted in (None, [], ()):
        return available
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    missing = [layer for layer in wanted if layer not in available]
    if missing:
        raise BadInput(f"--layer: {path} has no layer {missing[0]} (layers: {', '.join(map(str, available))})")
    return wanted


def read_stats(path: Path, options: dict, capacity: str = "paper") -> list[LayerStats]:
    """Per-layer F, alpha, g, d* and sorted importances of a stats file, via kdtool.theory.importance.from_stats.

    alpha comes from the file's summary when present, else L0 = sum(freq), F = #alive (as `kdtool stats`).
    """
    from kdtool.theory import importance as imp_mod

    wanted = options.get("layer")
    layers = None if wanted in (None, [], ()) else ([wanted] if isinstance(wanted, int) else list(wanted))
    summary: dict = {}
    if path.suffix.lower() in (".parquet", ".pq"):
        summary = (formats.parquet_metadata(path).get("summary") or {}).get("layers", {}) or {}
    out = []
    for li in imp_mod.from_stats(path, layers=layers):
        g = imp_mod.capacity_g(li.alpha, capacity)  # warns below 1 - 1/e, where Eq. 1 is not monotone
        d_in = (summary.get(str(li.layer)) or {}).get("d_in")
        out.append(
            LayerStats(
                layer=li.layer,
                importance=li.weights,
                n_features=li.n_features,
                alpha=float(li.alpha),
                g=g,
                d_star=li.n_features / g,
                d_in=int(d_in) if d_in else None,
            )
        )
    return out


def _is_stats(path: Path) -> bool:
    """A stats file has per-feature rows (importance, alive); a predict table has width/floor rows."""
    if path.suffix.lower() in (".parquet", ".pq"):
        kind = formats.parquet_metadata(path).get("kind")
        if kind:
            return kind.startswith("kdtool.stats")
    cols = formats.read_table(path)
    return "importance" in cols and "alive" in cols


def _check_inputs(inputs: list[Path], kind: str, *, at_least: int = 1, at_most: int | None = None) -> None:
    if len(inputs) < at_least:
        raise BadInput(f"plot {kind}: needs at least {at_least} input file(s)")
    if at_most is not None and len(inputs) > at_most:
        raise BadInput(f"plot {kind}: takes at most {at_most} input file(s), got {len(inputs)}")


def _layer_label(layer: int, path: Path, n_files: int) -> str:
    return f"layer {layer}" if n_files == 1 else f"{path.stem}: layer {layer}"


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def _math_int(x: float) -> str:
    """A thousands-separated integer for inside $...$ (mathtext puts a space after a bare comma)."""
    return f"{x:,.0f}".replace(",", "{,}")


# --------------------------------------------------------------------------- Fig. 1: capacity


def capacity(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 1: g(alpha) (left) and d* = F / g(alpha) (right) against alpha, with the non-monotone region shaded.

    Without inputs: one d* curve for F = --features (default the paper's 28,665) and the toy-model
    sparsities marked. With stats files: each layer's (alpha, g) and (alpha, d*) marked, one d* curve
    per layer, and the teacher width when the stats summary records it.
    """
    _check_inputs(inputs, "capacity", at_least=0)
    layers: list[tuple[str, LayerStats]] = []
    for path in inputs:
        for ls in read_stats(path, options):
            layers.append((_layer_label(ls.layer, path, len(inputs)), ls))
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
        labels.append(f"F = {_fmt_int(int(features))}")
    for i, (label, ls) in enumerate(layers):
        sty = st.layer_style(i)
        (line,) = ax_d.plot(alpha, ls.n_features / g, color=sty["color"], ls=sty["linestyle"])
        (dot,) = ax_d.plot([ls.alpha], [ls.d_star], sty["marker"], color="black", mfc=sty["color"], zorder=4)
        handles.append((line, dot))
        labels.append(rf"{label}: F = {_fmt_int(ls.n_features)}, $d^*={_math_int(ls.d_star)}$")
    teacher = options.get("teacher_width") or next((ls.d_in for _, ls in layers if ls.d_in), None)
    if teacher:
        handles.append(ax_d.axhline(float(teacher), color=st.GREY, lw=0.9, ls="--"))
        labels.append(f"teacher width {_fmt_int(teacher)}")
    from matplotlib.patches import Patch

    handles.append(Patch(color=st.GREY, alpha=0.12, lw=0))
    labels.append(r"$\alpha<1-1/e$: g not monotone, formula doubtful")
    ax_d.set_yscale("log")
    ax_d.set_ylabel(r"critical width $d^*=F/g(\alpha)$ (dimensions)")
    ax_d.set_title("(b) critical width")
    from matplotlib.legend_handler import HandlerTuple

    st.legend_below(leg_g, *ax_g.get_legend_handles_labels())
    st.legend_below(leg_d, handles, labels, handler_map={tuple: HandlerTuple(ndivide=None)})
    _title(fig, options)
    st.save(fig, output)


def _alpha_ticks(ax, lo: float, hi: float) -> None:
    """Plain decimal ticks on the logit axis (its default 1-10^-2 labels read badly)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ticks = [t for t in (0.05, 0.2, 0.5, 0.8, 0.9, 0.99, 0.999) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


# --------------------------------------------------------------------------- Fig. 5a: importance


def importance(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 5a: sorted feature importance E[z_i^2] against rank, log-log, one line per layer."""
    _check_inputs(inputs, "importance")
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
                label=f"{_layer_label(ls.layer, path, len(inputs))} (F = {_fmt_int(ls.n_features)})",
            )
            i += 1
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("feature rank (by importance)")
    ax.set_ylabel(r"importance $I_i=\mathbb{E}[z_i^2]$ (squared SAE activation)")
    ax.set_title("feature importance")
    ax.legend(loc="lower left")
    _title(fig, options)
    st.save(fig, output)


# --------------------------------------------------------------------------- Fig. 5b: floor


def _predict_blocks(path: Path, options: dict, column: str) -> list[dict]:
    """Per-layer rows of a predict table, with d* estimated from F_S = floor(d_S g) when not stored."""
    cols = formats.read_table(path, required=("width", column))
    widths = formats.numeric_column(cols, "width", path, positive=True)
    y = formats.numeric_column(cols, column, path)
    layer_col = np.asarray(cols["layer"]).astype(np.int64) if "layer" in cols else np.zeros(widths.size, np.int64)
    summary = {}
    if path.suffix.lower() in (".parquet", ".pq"):
        summary = formats.parquet_metadata(path).get("summary") or {}
    blocks = []
    for layer in _select_layers(sorted(set(layer_col.tolist())), options, path):
        rows = layer_col == layer
        order = np.argsort(widths[rows])
        block = {"layer": layer, "width": widths[rows][order], "y": y[rows][order], "d_star": None, "exact": False}
        for band in ("low", "high"):
            name = f"{column}_{band}"
            if name in cols:
                block[band] = formats.numeric_column(cols, name, path)[rows][order]
        meta = (summary.get("layers", {}) or {}).get(str(layer), {}) if isinstance(summary, dict) else {}
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
    _check_inputs(inputs, "floor")
    widths_opt = options.get("widths")
    capacity_kind = options.get("capacity") or "paper"
    column = options.get("column") or "floor"
    series: list[dict] = []  # {label, x, y, marks: (x, y) | None, d_star, exact, band: (lo, hi) | None}
    for path in inputs:
        if _is_stats(path):
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
                        "label": _layer_label(ls.layer, path, len(inputs)),
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
                        "label": _layer_label(block["layer"], path, len(inputs)),
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
            label += rf" ($d^*{rel}{_math_int(s_['d_star'])}$)"
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
    _log_minor_labels(ax)
    handles, labels = ax.get_legend_handles_labels()
    if drew_d_star:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color=st.GREY, ls=":"))
        labels.append(r"$d^*$ (" + ("geometric " if column != "floor" else "") + "floor is 0 beyond it)")
    if leg_ax is not None:
        st.legend_below(leg_ax, handles, labels)
    else:
        ax.legend(handles, labels, loc="best")
    _title(fig, options)
    st.save(fig, output)


# --------------------------------------------------------------------------- Fig. 7 and 17: calibration


def read_calibration(path: Path, *, need_predicted: bool = True) -> dict:
    """widths / observed / predicted arrays and the fits of a calib.json written by `kdtool calibrate`.

    The points come from `points` [{width, observed, predicted}] (calibrate's own key), else from
    parallel `widths`/`observed`/`predicted` lists, else from the `decomposition` rows.
    """
    obj = formats.read_json(path)
    kind = obj.get("kind")
    if kind is not None and kind != "kdtool.calibration":
        raise BadInput(f"{path}: not a calibration file (kind={kind!r}; make one with kdtool calibrate -o)")
    rows = None
    for key in ("points", "decomposition"):
        if isinstance(obj.get(key), list) and obj[key]:
            rows = obj[key]
            break
    if isinstance(obj.get("widths"), list) and isinstance(obj.get("observed"), list):
        preds = obj.get("predicted") or [None] * len(obj["widths"])
        if not len(obj["widths"]) == len(obj["observed"]) == len(preds):
            raise BadInput(f"{path}: widths, observed and predicted differ in length")
        rows = [
            {"width": w, "observed": o, "predicted": p}
            for w, o, p in zip(obj["widths"], obj["observed"], preds, strict=False)
        ]
    if rows is None:
        raise BadInput(f"{path}: not a calibration file (no points; write one with `kdtool calibrate`)")
    try:
        width = np.asarray([r["width"] for r in rows], dtype=float)
        observed = np.asarray([r["observed"] for r in rows], dtype=float)
        raw_pred = [r.get("predicted") for r in rows]
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{path}: each point needs numeric width and observed") from None
    if any(p is None for p in raw_pred):
        if need_predicted:
            raise BadInput(f"{path}: no predicted floors (run kdtool calibrate with --predicted PRED)")
        predicted = None
    else:
        predicted = np.asarray(raw_pred, dtype=float)
    arrays = [width, observed] + ([predicted] if predicted is not None else [])
    if not all(np.all(np.isfinite(v)) for v in arrays):
        raise BadInput(f"{path}: widths, observed or predicted has NaN or infinite values")
    order = np.argsort(width, kind="stable")
    out: dict = {
        "width": width[order],
        "observed": observed[order],
        "predicted": None if predicted is None else predicted[order],
    }
    for fit in ("linear", "affine", "affine_fixed", "power_law"):
        if isinstance(obj.get(fit), dict):
            out[fit] = obj[fit]
    return out


def _fit(cal: dict, name: str, path: Path) -> dict:
    fit = cal.get(name)
    if not isinstance(fit, dict):
        raise BadInput(f"{path}: no {name!r} fit (expected keys linear and affine from `kdtool calibrate`)")
    if "skipped" in fit:
        raise BadInput(f"{path}: the {name} fit was skipped ({fit['skipped']})")
    return fit


def _fit_number(fit: dict, key: str, path: Path, name: str) -> float:
    value = fit.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{path}: {name}.{key} is missing or not a finite number")
    return float(value)


def _r2_text(fit: dict) -> str:
    r2 = fit.get("r2")
    return rf"$R^2={r2:.3f}$" if isinstance(r2, (int, float)) else r"$R^2$ n/a"


def calibration(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 7: observed vs predicted floors; (a) through-origin linear fit, (b) affine fit, R^2 in the titles."""
    _check_inputs(inputs, "calibration", at_most=1)
    path = inputs[0]
    cal = read_calibration(path)
    linear, affine = _fit(cal, "linear", path), _fit(cal, "affine", path)
    x, y, w = cal["predicted"], cal["observed"], cal["width"]
    c_lin = _fit_number(linear, "C", path, "linear")
    c_aff = _fit_number(affine, "C", path, "affine")
    b_aff = _fit_number(affine, "B", path, "affine")
    xs = np.linspace(0, float(x.max()) * 1.08, 50)

    fig, axes = st.figure(style, 1, 2, sharey=True)
    panels = [
        (axes[0][0], "(a) linear $y=Cx$", c_lin * xs, rf"fit: $C={c_lin:.3g}$", linear),
        (axes[0][1], "(b) affine $y=Cx+B$", c_aff * xs + b_aff, rf"fit: $C={c_aff:.3g}$, $B={b_aff:.3g}$", affine),
    ]
    for ax, title, fit_y, fit_label, fit in panels:
        ax.plot(xs, fit_y, color=st.PALETTE[3], ls="--", label=fit_label)
        ax.plot(x, y, "o", color=st.PALETTE[0], label="observed floors", zorder=3)
        for j, (xi, yi, wi) in enumerate(zip(x, y, w, strict=True)):
            # alternate below/above so neighbouring widths (768 and 1024 sit almost together) stay legible
            ax.annotate(
                f"{wi:g}",
                (xi, yi),
                xytext=(4, -9 if j % 2 == 0 else 4),
                textcoords="offset points",
                fontsize="x-small",
                color=st.GREY,
            )
        ax.set_title(f"{title}: {_r2_text(fit)}")
        ax.set_xlabel(r"predicted floor $L^*$ (importance units)")
        ax.set_xlim(0, float(xs[-1]))
        ax.legend(loc="lower right")
    axes[0][1].axhline(b_aff, color=st.GREY, lw=0.9, ls=":")
    axes[0][1].annotate(
        rf"baseline $B={b_aff:.3g}$",
        (float(xs[-1]), b_aff),
        xytext=(-4, -10),
        textcoords="offset points",
        ha="right",
        fontsize="small",
        color=st.GREY,
    )
    axes[0][0].set_ylabel("observed floor (nats/token)")
    ymax = max(float(y.max()), float(np.max(panels[0][2])), float(np.max(panels[1][2])))
    axes[0][0].set_ylim(0, ymax * 1.08)
    _title(fig, options, default="labels: student width $d_S$")
    st.save(fig, output)


def calibration_normalized(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 17: predicted and observed floors, each normalised to its value at the smallest width, against width."""
    _check_inputs(inputs, "calibration-normalized", at_most=1)
    path = inputs[0]
    cal = read_calibration(path)
    w, obs, pred = cal["width"], cal["observed"], cal["predicted"]
    if np.unique(w).size != w.size:
        raise BadInput(f"{path}: several points per width; normalising needs one floor per width")
    if obs[0] <= 0 or pred[0] <= 0:
        raise BadInput(f"{path}: floors at the smallest width must be > 0 to normalise")
    fig, axes = st.figure(style)
    ax = axes[0][0]
    ax.plot(w, pred / pred[0], color=st.GREY, ls="--", marker="s", label=r"predicted $L^*$ (Eq. 2)")
    ax.plot(w, obs / obs[0], color=st.PALETTE[3], ls="-", marker="o", label="observed (distillation)")
    # The paper's Fig. 17 baseline is the measured one (B fixed from the widest student, Table 5);
    # fall back to the fitted affine B when the calibration has no fixed-baseline fit.
    for fit, how in (("affine_fixed", "fixed"), ("affine", "fitted")):
        b = cal[fit].get("B") if isinstance(cal.get(fit), dict) and "skipped" not in cal[fit] else None
        if isinstance(b, (int, float)) and math.isfinite(b):
            ax.axhline(
                b / obs[0],
                color=st.PALETTE[3],
                lw=0.9,
                ls=":",
                label=rf"{how} baseline $B/L_{{obs}}({w[0]:g})={b / obs[0]:.2f}$",
            )
            break
    d_star = options.get("d_star")
    if d_star:
        ax.axvline(float(d_star), color="black", lw=0.8, ls=":", label=rf"$d^*={_math_int(float(d_star))}$")
    ax.set_xlabel(r"student width $d_S$ (hidden dimensions)")
    ax.set_ylabel(rf"floor / floor at $d_S={w[0]:g}$")
    ax.set_ylim(bottom=0)
    ax.set_title("normalised predicted vs observed floors")
    ax.legend(loc="upper right")
    _title(fig, options)
    st.save(fig, output)


def _log_minor_labels(ax) -> None:
    """Label some minor ticks of a log y axis spanning under two decades (else points float unlabelled)."""
    from matplotlib.ticker import LogFormatterSciNotation

    ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _title(fig, options: dict, default: str | None = None) -> None:
    title = options.get("title")
    if title:
        fig.suptitle(title)
    elif default:
        fig.text(0.5, -0.01, default, ha="center", va="top", fontsize="x-small", color=st.GREY)
