"""The per-trial SAE figures of the authors' project pages: SAE measurements across the layers of one trial.

- `capacity_by_layer` (layer-capacity): alpha, g(alpha) and d* side by side, one point per layer;
- `correlation` (layer-correlation): Pearson r across layers between the SAE metrics (L0, alpha, g,
  d*, alive F, dead, MSE, explained variance), e.g. "alpha tracks the dead-feature count";
- `headline` (sae-headline): mean alpha, mean L0, total dead, mean d* of each trial, as number tiles.
The per-layer summary card (Table 1) is kdtool/plots/sae.py `layers`.

Inputs are stats.parquet files; their layers are grouped into trials by how each SAE was trained
(kdtool/report/trials.py), so a run folder with stats of trials A, B and C draws one series (or one
panel, or one row of tiles) per trial. Options read: layer, title, trial (only that trial, as
`kdtool plot report` sets it per figure).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.colors import LinearSegmentedColormap

from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.report import trials as trials_mod

#: the metrics `correlation` relates: (stats summary key, label)
METRICS = (
    ("L0", "L0"),
    ("alpha", "alpha"),
    ("g", "g(alpha)"),
    ("d_star", "d*"),
    ("F", "alive F"),
    ("dead", "dead"),
    ("mse", "MSE"),
    ("explained_variance", "expl. var."),
)
#: correlation needs this many layers: with two, every r is +-1 whatever the metrics do
MIN_LAYERS = 3


def read_trials(inputs: list[Path], options: dict) -> list[trials_mod.Trial]:
    """The trials of the stats files (only `trial` when given), restricted to --layer; BadInput if none is left."""
    for path in inputs:
        if not Path(path).exists():
            raise BadInput(f"{path}: no such file")
    found = trials_mod.select([Path(p) for p in inputs], options.get("trial"))
    w = options.get("layer")
    if w not in (None, [], ()):
        wanted = {int(w)} if isinstance(w, int) else {int(v) for v in w}
        for t in found:
            t.layers = [x for x in t.layers if x.layer in wanted]
    found = [t for t in found if t.layers]
    if not found:
        raise BadInput("no layer to show (check --layer)")
    return found


def capacity_by_layer(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """alpha, g(alpha) and d* against the layer, side by side; one series per trial."""
    found = read_trials(inputs, options)
    fig, axes = st.figure(style, 1, 3, sharex=True)
    panels = (("alpha", "alpha = 1 - L0 / F"), ("g", "g(alpha)"), ("d_star", "d* = F / g(alpha)"))
    for i, t in enumerate(found):
        sty = st.layer_style(i)
        x = [tl.layer for tl in t.layers]
        for ax, (key, _) in zip(axes[0], panels, strict=True):
            ax.plot(x, t.values(key), color=sty["color"], linestyle=sty["linestyle"], marker=sty["marker"],
                    markersize=4, label=t.label)  # fmt: skip
    for ax, (_, label) in zip(axes[0], panels, strict=True):
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
    low = 1 - 1 / math.e  # below it g is not monotone in alpha (field notes): mark it when the data go there
    alphas = [v for t in found for v in t.values("alpha") if math.isfinite(v)]
    if alphas and min(alphas) < low + 0.05:
        axes[0][0].axhline(low, color=st.GREY, linestyle=":", linewidth=0.8, label="1 - 1/e")
    g_vals = [v for t in found for v in t.values("g") if math.isfinite(v) and v > 0]
    if g_vals and max(g_vals) / min(g_vals) > 10:
        axes[0][1].set_yscale("log")
    if len(found) > 1 or alphas and min(alphas) < low + 0.05:
        axes[0][0].legend(loc="best", fontsize="x-small")
    st.title(fig, options, _default_title(found, "alpha, g(alpha) and d* per layer"))
    st.save(fig, output)


def correlations(t: trials_mod.Trial) -> tuple[list[str], np.ndarray]:
    """(labels, r [m, m]) of the metrics across the trial's layers; NaN where a metric does not vary."""
    labels = [label for _, label in METRICS]
    values = np.array([t.values(key) for key, _ in METRICS], dtype=float)  # [metrics, layers]
    m = len(METRICS)
    r = np.full((m, m), np.nan)
    for i in range(m):
        for j in range(m):
            ok = np.isfinite(values[i]) & np.isfinite(values[j])
            a, b = values[i][ok], values[j][ok]
            if ok.sum() >= MIN_LAYERS and a.std() > 0 and b.std() > 0:
                r[i, j] = float(np.corrcoef(a, b)[0, 1])
    return labels, r


def correlation(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Pearson r across layers between the SAE metrics, one heatmap per trial."""
    found = read_trials(inputs, options)
    short = [t for t in found if len(t.layers) < MIN_LAYERS]
    if short:
        raise BadInput(
            f"layer-correlation: {short[0].label} has {len(short[0].layers)} layer(s); a correlation across "
            f"layers needs at least {MIN_LAYERS}"
        )
    scale = 1.0 if style == "paper" else 1.5
    fig, axes = st.figure(style, 1, len(found), figsize=(scale * 4.6 * len(found), scale * 4.2))
    cmap = _diverging()
    for ax, t in zip(axes[0], found, strict=True):
        labels, r = correlations(t)
        ax.imshow(np.ma.masked_invalid(r), cmap=cmap, vmin=-1, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                text = "n/a" if not math.isfinite(r[i, j]) else f"{r[i, j]:.2f}"
                dark = math.isfinite(r[i, j]) and abs(r[i, j]) > 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize="xx-small", color="white" if dark else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="x-small")
        ax.set_yticks(range(len(labels)), labels, fontsize="x-small")
        ax.grid(False)
        names = [label for _, label in METRICS]
        ra = r[names.index("alpha"), names.index("dead")]
        note = f"alpha vs dead: r = {ra:.2f}" if math.isfinite(ra) else "alpha vs dead: n/a (constant)"
        ax.set_title(f"{t.label}\n{len(t.layers)} layers; {note}", fontsize="small")
    st.title(fig, options, "Pearson r across layers (n/a: a metric constant over the layers)")
    st.save(fig, output)


def headline(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Each trial's headline numbers as tiles: mean alpha, mean L0, total dead (of all latents), mean d*."""
    found = read_trials(inputs, options)
    scale = 1.0 if style == "paper" else 1.5
    fig, axes = st.figure(style, len(found), 4, figsize=(scale * 7.2, scale * (1.25 * len(found) + 0.35)))
    for row, t in zip(axes, found, strict=True):
        h = t.headline()
        tiles = (
            (f"{h['mean_alpha']:.4f}", "mean alpha"),
            (f"{h['mean_l0']:,.1f}", "mean L0"),
            (f"{h['total_dead']:,.0f}", f"dead of {h['total_latents']:,.0f} ({100 * h['dead_fraction']:.1f}%)"),
            (f"{h['mean_d_star']:,.0f}", "mean d*"),
        )
        for ax, (big, small) in zip(row, tiles, strict=True):
            ax.axis("off")
            ax.text(0.5, 0.58, big.replace("nan", "n/a"), ha="center", va="center", fontsize="xx-large",
                    fontweight="bold", color=st.PALETTE[0])  # fmt: skip
            ax.text(0.5, 0.18, small, ha="center", va="center", fontsize="small", color=st.GREY)
        row[0].set_title(f"{t.label}: {h['layers']} layers", loc="left", fontsize="medium")
    st.title(fig, options)
    st.save(fig, output)


def _default_title(found: list, what: str) -> str:
    return f"{what}: {found[0].label}" if len(found) == 1 else what


def _diverging():
    return LinearSegmentedColormap.from_list("kdtool_r", [st.PALETTE[3], "#FFFFFF", st.PALETTE[0]])
