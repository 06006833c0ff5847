"""The sensitivity figure: how F, alpha, d* and the floor move with the SAE's width, lambda, seed and training tokens.

Why: every number `predict` gives is measured through an SAE whose size, sparsity penalty, seed
and training length are the user's choices. This figure puts each SAE of a layer (from one or
more stats files, `kdtool stats --sae A --sae B ...`, or the token checkpoints
saes/layer{L}/checkpoints/) at its value of the varied setting and draws, for the paper's
estimator (solid) and the robust one (dashed): F, alpha, d* and the floor at chosen widths as a
share of the SAE's total importance (L*(d_S) / L*(0), comparable across SAEs whose importances
differ in scale). A paper F that climbs with the width while the robust F stays flat is feature
splitting; a d* still moving at the last token checkpoint has not converged.

Options: `--set x=width|l1|seed|tokens` (default: the setting with the most distinct values),
`--widths` (floors at these student widths; default 1/2, 1 and 2 x the median robust d*),
`--layer`, `--title`. The settings come from each SAE's cfg.json, as `stats` recorded them
(each SAE's `trained` record in the stats summary, kdtool/sae/record.py; the width from `d_sae`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.plots.inputs import check_inputs
from kdtool.sae.summary import entries
from kdtool.theory import importance as imp
from kdtool.theory import theorem as theory

#: x axis name -> (key of the SAE's training record, axis label, log scale)
AXES = {
    "width": ("d_sae", "SAE width (latents)", True),
    "l1": ("l1", "L1 coefficient lambda (start)", True),
    "seed": ("init_seed", "initialisation seed", False),
    "tokens": ("tokens", "SAE training tokens", True),
}
STATS_KIND = "kdtool.stats"


def _points(inputs: list[Path], options: dict) -> list[dict]:
    """One record per SAE: layer, key, train settings, paper and robust F/alpha/d*, their sorted weights."""
    wanted = options.get("layer")
    wanted = None if wanted in (None, [], ()) else ({wanted} if isinstance(wanted, int) else set(wanted))
    out = []
    for path in inputs:
        meta = formats.parquet_metadata(path) if formats.is_parquet(path) else {}
        if meta.get("kind") != STATS_KIND:
            raise BadInput(f"{path}: plot sensitivity reads `kdtool stats` files (this is {meta.get('kind')!r})")
        info = {(e.key, e.layer): e.info for e in entries(meta.get("summary"))}
        by_est = {est: imp.from_stats(path, estimator=est) for est in _estimators(path, info)}
        for i, paper in enumerate(by_est["paper"]):
            if wanted is not None and paper.layer not in wanted:
                continue
            s = info.get((paper.sae, paper.layer)) or {}
            train = (s.get("trained") or {}) | {"d_sae": s.get("d_sae")}  # the record (kdtool SAEs) and the width
            rec = {"layer": paper.layer, "key": paper.sae or path.stem, "train": train, "file": path}
            for est, found in by_est.items():
                li = found[i]
                g = float(theory.g(li.alpha)) if li.alpha and li.alpha > 0 else math.nan
                rec[est] = {"F": li.n_features, "alpha": li.alpha, "d_star": li.n_features / g, "weights": li.weights,
                            "g": g}  # fmt: skip
            out.append(rec)
    if not out:
        raise BadInput("plot sensitivity: no SAE to show (check --layer)")
    return out


def _estimators(path: Path, info: dict) -> tuple[str, ...]:
    return ("paper", "robust") if any("F_robust" in s for s in info.values()) else ("paper",)


def _axis(points: list[dict], options: dict) -> str:
    """The x axis: --set x=..., else the setting with the most distinct values within a layer."""
    if options.get("x"):
        name = str(options["x"])
        if name not in AXES:
            raise BadInput(f"--set x={name}: use one of {', '.join(AXES)}")
        return name
    best, best_n = None, 1
    for name, (key, _, _) in AXES.items():
        n = max(len({p["train"].get(key) for p in points if p["layer"] == L}) for L in {p["layer"] for p in points})
        if n > best_n and all(p["train"].get(key) is not None for p in points):
            best, best_n = name, n
    if best is None:
        raise BadInput(
            "plot sensitivity: every SAE has the same width, lambda, seed and tokens (give several SAEs of a layer: "
            "`kdtool stats --sae A --sae B`, or saes/layer12/checkpoints)"
        )
    return best


def sensitivity(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """F, alpha, d* and the floor share at chosen widths against SAE width, lambda, seed or training tokens."""
    check_inputs(inputs, "sensitivity")
    points = _points([Path(p) for p in inputs], options)
    name = _axis(points, options)
    key, xlabel, logx = AXES[name]
    if any(p["train"].get(key) is None for p in points):
        raise BadInput(f"--set x={name}: some SAEs do not record their {key} (not trained by kdtool?)")
    ests = [e for e in ("paper", "robust") if all(e in p for p in points)]
    widths = options.get("widths") or _default_widths(points, ests[-1])
    fig, axes = st.figure(style, 2, 2, sharex=True)
    panels = [("F", "features F", True), ("alpha", "sparsity alpha", False), ("d_star", "critical width d*", True)]
    for j, layer in enumerate(sorted({p["layer"] for p in points})):
        pts = sorted((p for p in points if p["layer"] == layer), key=lambda p: float(p["train"][key]))
        x = np.array([float(p["train"][key]) for p in pts])
        color = st.PALETTE[j % len(st.PALETTE)]
        for est, ls in zip(ests, ("-", "--"), strict=False):
            for ax, (q, _, _) in zip(axes.flat, panels, strict=False):
                ax.plot(x, [p[est][q] for p in pts], ls=ls, marker="o", color=color, label=f"L{layer} {est}")
            ax = axes[1][1]
            for k, w in enumerate(widths):
                share = [_share(p[est], w) for p in pts]
                label = f"L{layer}, d_S = {w}" if est == ests[0] else None  # line style says the estimator
                ax.plot(x, share, ls=ls, marker=st.MARKERS[k % len(st.MARKERS)], color=color, label=label)
    for ax, (_, label, logy) in zip(axes.flat, panels, strict=False):
        ax.set_title(label)
        if logy:
            _log_if_positive(ax, "y")
    axes[1][1].set_title("floor L*(d_S) / L*(0) at " + ", ".join(map(str, widths)))
    xs = sorted({float(p["train"][key]) for p in points})
    for ax in axes[1]:
        ax.set_xlabel(xlabel)
        if logx and xs[0] > 0:
            ax.set_xscale("log", base=2 if name == "width" else 10)
        if len(xs) <= 8:  # tick the settings the SAEs have, not powers of the scale
            ax.set_xticks(xs, [f"{v:g}" if name == "l1" else st.fmt_int(v) for v in xs])
            ax.minorticks_off()
    axes[0][0].legend(loc="best", fontsize="x-small")
    axes[1][1].legend(loc="best", fontsize="xx-small")
    st.title(fig, options, "Sensitivity of the prediction to the SAE (solid: paper F; dashed: robust)")
    st.save(fig, output)


def _share(est: dict, width: int) -> float:
    model = theory.FloorModel.from_weights(est["weights"], est["alpha"], g_value=est["g"])
    total = float(np.sum(est["weights"]))
    return float(model.floor(np.asarray([width]))[0]) / total if total > 0 else math.nan


def _default_widths(points: list[dict], est: str) -> list[int]:
    d = float(np.median([p[est]["d_star"] for p in points if math.isfinite(p[est]["d_star"])] or [1.0]))
    return sorted({max(1, int(round(f * d))) for f in (0.5, 1.0, 2.0)})


def _log_if_positive(ax, axis: str) -> None:
    vals = np.concatenate([line.get_ydata() for line in ax.get_lines()]) if ax.get_lines() else np.array([])
    vals = vals[np.isfinite(vals)]
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > 4:
        ax.set_yscale("log")
