"""The toy-model figures (paper section 4 and appendix B), drawn from `kdtool toy` outputs.

Inputs: toy.parquet (kind kdtool.toy) and, for toy-curves, toy.curves.parquet (--log-curves; a
toy.parquet beside it is found automatically). Options read: alpha (only these sparsities),
title, and via --set: measure=data|distill (which student loss; default: the file's `floor`),
n=40 (toy-curves, toy-grid: only this n), configs=6 (toy-curves: how many configurations).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.toy.config import ToyConfigKey
from kdtool.toy.predictions import floor_model, predictions
from kdtool.toy.stats import aggregate, read_toy_table, summarize
from kdtool.toy.store import CURVES_KIND, KIND, curves_path
from kdtool.toy.sweep import sample_configs

_MEASURES = {"data": "floor_data", "distill": "floor_distill"}


def _one_input(inputs: list[Path], what: str) -> Path:
    if len(inputs) != 1:
        raise BadInput(f"{what} takes one toy.parquet (written by kdtool toy), got {len(inputs)} inputs")
    return inputs[0]


def _table(path: Path, options: dict) -> dict:
    """The toy table with `floor` set by --set measure=..., filtered by --alpha / --set n=..."""
    cols, _ = read_toy_table(path, extra=("d_star",))
    measure = options.get("measure")
    if measure is not None:
        if measure not in _MEASURES:
            raise BadInput(f"--set measure must be data or distill, got {measure!r}")
        cols["floor"] = cols[_MEASURES[measure]]
    return select(cols, options, path)


def select(cols: dict[str, np.ndarray], options: dict, path: Path) -> dict[str, np.ndarray]:
    """The rows of a toy file (table or survival records) left by --alpha and --set n=...; BadInput if none."""
    keep = np.ones(len(cols["n"]), dtype=bool)
    if options.get("alpha"):
        keep &= np.isin(np.round(cols["alpha"].astype(float), 9), np.round(list(options["alpha"]), 9))
    if options.get("n") is not None:
        keep &= np.isin(cols["n"], np.atleast_1d(options["n"]))
    if not keep.any():
        raise BadInput(
            f"{path}: no rows left after --alpha / --set n= (alphas: {sorted(set(cols['alpha']))}, "
            f"n: {sorted(set(cols['n'].tolist()))})"
        )
    return {k: v[keep] for k, v in cols.items()}


def _agg(cols: dict):
    return aggregate(cols, "floor")


def _alpha_colors(alphas) -> dict[float, str]:
    return {a: st.PALETTE[i % len(st.PALETTE)] for i, a in enumerate(sorted(set(alphas)))}


def grid(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 2: floor vs d_S; rows n, columns alpha; measured mean +- std per d_T, Eq. 2 dashed, d* dotted."""
    path = _one_input(inputs, "toy-grid")
    agg = _agg(_table(path, options))
    ns, alphas = sorted(set(agg["n"].tolist())), sorted(set(agg["alpha"].tolist()))
    d_ts = sorted(set(agg["d_teacher"].tolist()))
    fig, axes = st.figure(style, len(ns), len(alphas), sharex=True)
    for r, n in enumerate(ns):
        for c, a in enumerate(alphas):
            ax = axes[r][c]
            sel_na = (agg["n"] == n) & (agg["alpha"] == a)
            for i, dt in enumerate(d_ts):
                sel = sel_na & (agg["d_teacher"] == dt)
                if not sel.any():
                    continue
                x, y, s = agg["d_student"][sel], agg["floor_mean"][sel], agg["floor_std"][sel]
                color = st.PALETTE[i % len(st.PALETTE)]
                ax.plot(x, y, "-", marker=st.MARKERS[i % len(st.MARKERS)], color=color, label=f"$d_T$={dt}")
                ax.fill_between(x, y - s, y + s, color=color, alpha=0.18, linewidth=0)
            widths = np.arange(1, max(agg["d_student"][sel_na]) + 1)
            fm = floor_model(n, a, _zipf(path))
            ax.plot(widths, fm.floor(widths), "--", color=st.GREY, label="Eq. 2")
            ax.axvline(fm.d_star, color="black", linestyle=":", linewidth=1, label="$d^*$")
            ax.set_title(f"n={n}, α={a:g}")
            if c == 0:
                ax.set_ylabel("floor (held-out loss)")
            if r == len(ns) - 1:
                ax.set_xlabel("student width $d_S$")
            ax.set_ylim(bottom=0)
    axes[0][0].legend(loc="upper right")
    if options.get("title"):
        fig.suptitle(options["title"])
    st.save(fig, output)


def _zipf(path: Path) -> float:
    prov = formats.parquet_metadata(path).get("provenance") or {}
    return float((prov.get("config") or {}).get("zipf_exponent", 1.0))


def scatter(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 3: predicted vs measured floor (log-log), refined and naive panels, colour = alpha."""
    path = _one_input(inputs, "toy-scatter")
    cols = _table(path, options)
    agg = _agg(cols)
    summ = summarize(cols, "floor")
    data = (agg["pred_refined"] > 0) & (agg["floor_mean"] > 0)
    if not data.any():
        raise BadInput(f"{path}: no data points (every width is at or beyond d*, where Eq. 2 predicts 0)")
    colors = _alpha_colors(agg["alpha"][data])
    fig, axes = st.figure(style, 1, 2)
    for ax, key, label in ((axes[0][0], "pred_refined", "refined, g(α)"), (axes[0][1], "pred_naive", "naive, g=1")):
        sel = data & (agg[key] > 0)
        for a, color in colors.items():
            s = sel & (agg["alpha"] == a)
            ax.scatter(
                agg["floor_mean"][s], agg[key][s], s=12, color=color, label=f"α={a:g}", alpha=0.85, edgecolors="none"
            )
        both = np.concatenate([agg["floor_mean"][sel], agg[key][sel]])
        lo, hi = both.min() / 1.5, both.max() * 1.5
        ax.plot([lo, hi], [lo, hi], "--", color=st.GREY, linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured floor")
        ax.set_ylabel("predicted floor")
        m = summ["refined" if key == "pred_refined" else "naive"]
        ax.set_title(f"{label}: r={_f(m['pearson_r'])}, MAPE={_f(m['mape_percent'])}%, R²={_f(m['r2'])}")
    axes[0][0].legend(loc="upper left")
    fig.suptitle(options.get("title") or f"{int(data.sum())} data points (d_S < d*), mean over seeds")
    st.save(fig, output)


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def accuracy(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 11: median accuracy (refined) per configuration; rows alpha, columns d_T, one panel per n."""
    path = _one_input(inputs, "toy-accuracy")
    agg = _agg(_table(path, options))
    ns, alphas = sorted(set(agg["n"].tolist())), sorted(set(agg["alpha"].tolist()))
    d_ts = sorted(set(agg["d_teacher"].tolist()))
    data = (agg["pred_refined"] > 0) & (agg["floor_mean"] > 0)
    acc = 1 - np.abs(agg["pred_refined"] - agg["floor_mean"]) / np.where(data, agg["floor_mean"], 1.0)
    fig, axes = st.figure(style, 1, len(ns))
    cmap = mpl.colormaps["RdYlGn"].with_extremes(bad="#DDDDDD")  # set_bad is deprecated (matplotlib 3.11)
    image = None
    for p, n in enumerate(ns):
        ax = axes[0][p]
        cell = np.full((len(alphas), len(d_ts)), np.nan)
        for i, a in enumerate(alphas):
            for j, dt in enumerate(d_ts):
                sel = data & (agg["n"] == n) & (agg["alpha"] == a) & (agg["d_teacher"] == dt)
                if sel.any():
                    cell[i, j] = float(np.median(acc[sel]))
        image = ax.imshow(np.ma.masked_invalid(cell), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
        for i in range(len(alphas)):
            for j in range(len(d_ts)):
                v = cell[i, j]
                ax.text(j, i, "–" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize="small")
        ax.set_xticks(range(len(d_ts)), [str(d) for d in d_ts])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("teacher width $d_T$")
        if p == 0:
            ax.set_ylabel("α")
        ax.set_title(f"n={n}")
        ax.grid(False)
    fig.colorbar(
        image, ax=[axes[0][p] for p in range(len(ns))], label="median accuracy (%/100); – = no d_S < d*", shrink=0.9
    )
    if options.get("title"):
        fig.suptitle(options["title"])
    st.save(fig, output)


def scaling(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 13: floor / total importance mass against d_S / d*, every configuration; Eq. 2 per n dashed."""
    path = _one_input(inputs, "toy-scaling")
    agg = _agg(_table(path, options))
    x = agg["d_student"] / agg["d_star"]
    y = agg["floor_mean"] / agg["total_mass"]
    colors = _alpha_colors(agg["alpha"])
    ns = sorted(set(agg["n"].tolist()))
    fig, axes = st.figure(style, 1, 1)
    ax = axes[0][0]
    for a, color in colors.items():
        for i, n in enumerate(ns):
            s = (agg["alpha"] == a) & (agg["n"] == n)
            ax.scatter(
                x[s],
                y[s],
                s=10,
                color=color,
                marker=st.MARKERS[i % len(st.MARKERS)],
                alpha=0.8,
                edgecolors="none",
                label=f"α={a:g}" if i == 0 else None,
            )
    zipf = _zipf(path)
    grid_x = np.geomspace(min(0.05, float(x.min()) / 1.2), max(1.5, float(x.max()) * 1.2), 600)
    for i, n in enumerate(ns):
        fm = floor_model(n, 0.99, zipf)  # the normalised Eq. 2 curve depends on n only: F_S = n * d_S/d*
        kept = np.minimum(np.floor(grid_x * n + 1e-9), n).astype(int)
        ax.plot(
            grid_x,
            fm.tail[kept] / fm.tail[0],
            linestyle=st.LINESTYLES[(i + 1) % len(st.LINESTYLES)],
            color=st.GREY,
            linewidth=1,
            label=f"Eq. 2, n={n} ({st.MARKERS[i % len(st.MARKERS)]})",
        )
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("$d_S / d^*$")
    ax.set_ylabel("floor / total importance mass")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    ax.set_title(options.get("title") or "universal scaling: measured (points) vs Eq. 2 (lines)")
    st.save(fig, output)


def _curves_input(inputs: list[Path]) -> tuple[Path, Path | None]:
    """(curves file, toy table or None) from either file."""
    path = _one_input(inputs, "toy-curves")
    kind = formats.parquet_metadata(path)["kind"]
    if kind == CURVES_KIND:
        table = path.with_name(path.name.replace(".curves.parquet", ".parquet"))
        return path, (table if table.exists() and table != path else None)
    if kind == KIND:
        cpath = curves_path(path)
        if not cpath.exists():
            raise BadInput(f"{path}: no {cpath.name} beside it; rerun kdtool toy with --log-curves")
        return cpath, path
    raise BadInput(f"{path}: a {kind} file; toy-curves needs toy.curves.parquet (kdtool toy --log-curves)")


def curves(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 14: student training loss vs step per width for a few configurations; Eq. 2 floors dashed."""
    cpath, _ = _curves_input(inputs)
    cols = formats.read_table(
        cpath, required=("n", "d_teacher", "alpha", "d_student", "seed", "role", "step", "loss", "loss_data")
    )
    keep = cols["role"].astype(str) == "student"
    if options.get("alpha"):
        keep &= np.isin(np.round(cols["alpha"].astype(float), 9), np.round(list(options["alpha"]), 9))
    if options.get("n") is not None:
        keep &= np.isin(cols["n"], np.atleast_1d(options["n"]))
    if not keep.any():
        raise BadInput(f"{cpath}: no student curves left after the filters")
    cols = {k: v[keep] for k, v in cols.items()}
    keys = sorted(
        {
            ToyConfigKey(int(n), int(d), float(a))
            for n, d, a in zip(cols["n"], cols["d_teacher"], cols["alpha"], strict=True)
        }
    )
    keys = sample_configs(keys, int(options.get("configs", 6)))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = st.figure(style, nrows, ncols)
    zipf = _zipf(cpath)
    which = "loss_data" if options.get("loss", "data") == "data" else "loss"
    for idx, k in enumerate(keys):
        ax = axes[idx // ncols][idx % ncols]
        sel_k = (cols["n"] == k.n) & (cols["d_teacher"] == k.d_teacher) & np.isclose(cols["alpha"], k.alpha)
        widths = sorted(set(cols["d_student"][sel_k].tolist()))
        pred = predictions(k.n, k.alpha, widths, zipf)
        cmap = mpl.colormaps["viridis"]
        for j, w in enumerate(widths):
            sel = sel_k & (cols["d_student"] == w)
            steps = np.unique(cols["step"][sel])
            mean = np.array([cols[which][sel & (cols["step"] == s)].mean() for s in steps])
            color = cmap(0.9 * j / max(1, len(widths) - 1))  # ordered colours: narrow = dark, wide = light
            ax.plot(steps, mean, color=color)
            ax.annotate(
                f"{w}",
                (steps[-1], mean[-1]),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                color=color,
                fontsize="small",
            )
            if pred["pred_refined"][j] > 0:
                ax.axhline(pred["pred_refined"][j], color=color, linestyle="--", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_title(k.label.replace("alpha", "α").replace("d_T", "$d_T$"))
        ax.set_xlabel("step")
        ax.margins(x=0.08)
        if idx % ncols == 0:
            ax.set_ylabel("training loss vs data" if which == "loss_data" else "training objective")
    for idx in range(len(keys), nrows * ncols):
        axes[idx // ncols][idx % ncols].axis("off")
    fig.suptitle(
        options.get("title")
        or "student training curves (mean over seeds), labelled by $d_S$; dashed = Eq. 2 floor (0 beyond d*: not drawn)"
    )
    st.save(fig, output)
