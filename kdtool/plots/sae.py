"""The SAE figures: training curves (Fig. 4 / 15), the per-layer summary card (Table 1), L0 vs MSE.

Inputs are `kdtool train-sae` outputs (train_log.parquet files, or a saes/ folder that holds
layer*/train_log.parquet) and `kdtool stats` outputs (stats.parquet); see docs/formats.md.
Options read: layer (only these layers), title, and via --set: x=tokens|step (sae-curves).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib.colors import LinearSegmentedColormap

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import style as st
from kdtool.report import trials

LOG_KIND = "kdtool.sae.train_log"
STATS_KIND = "kdtool.stats"


# --------------------------------------------------------------------------- inputs


def _kind(path: Path) -> str | None:
    if not formats.is_parquet(path):
        return None
    return formats.parquet_metadata(path).get("kind")


def _expand(inputs: list[Path]) -> list[Path]:
    """A saes/ folder (or one saes/layer{L}/ folder) stands for its train_log.parquet files."""
    out: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            found = (
                [p / "train_log.parquet"]
                if (p / "train_log.parquet").exists()
                else sorted(p.glob("layer*/train_log.parquet"), key=lambda f: _folder_key(f.parent.name))
            )
            if not found:
                raise BadInput(f"{p}: no train_log.parquet here or in layer*/ (a `kdtool train-sae` output?)")
            out += found
        elif not p.exists():
            raise BadInput(f"{p}: no such file")
        else:
            out.append(p)
    return out


def _folder_key(name: str) -> tuple:
    """Sort key of SAE folders: by layer, then naturally (layer12-x4 before layer12-x16)."""
    return _layer_number(name), [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layer_number(name: str) -> int:
    """layer12 -> 12, layer12-x8 -> 12 (an SAE trained beside others: the layer, not the other digits)."""
    m = re.match(r"layer(\d+)", name)
    return int(m.group(1)) if m else 0


def _wanted(options: dict) -> set[int] | None:
    w = options.get("layer")
    if w in (None, [], ()):
        return None
    return {int(w)} if isinstance(w, int) else {int(v) for v in w}


def read_log(path: Path) -> tuple[int, dict]:
    """(layer, numpy columns) of a train_log.parquet."""
    cols = formats.read_table(path, required=("step", "tokens", "mse", "l0"))
    meta = formats.parquet_metadata(path)
    layer = cols["layer"][0] if "layer" in cols else (meta.get("summary") or {}).get("layer")
    if layer is None:
        raise BadInput(f"{path}: train log without a layer column")
    return int(layer), cols


def _run_name(path: Path) -> str:
    """saes_a/layer12/train_log.parquet -> saes_a (the run a log belongs to); saes/layer12-x8/... -> saes x8
    (an SAE trained beside others of its layer: what sets it apart)."""
    parent = path.parent
    if not parent.name.startswith("layer"):
        return parent.name
    apart = re.sub(r"^layer\d+-?", "", parent.name)
    return f"{parent.parent.name} {apart}" if apart else parent.parent.name


def read_logs(inputs: list[Path], options: dict) -> list[tuple[int, dict, Path]]:
    wanted = _wanted(options)
    logs = []
    for path in _expand(inputs):
        kind = _kind(path)
        if kind not in (None, LOG_KIND):
            raise BadInput(f"{path}: a {kind} file, not a train-sae log (train_log.parquet)")
        layer, cols = read_log(path)
        if wanted is None or layer in wanted:
            logs.append((layer, cols, path))
    if not logs:
        raise BadInput(f"--layer: no train log for layer(s) {sorted(wanted or [])}")
    return sorted(logs, key=lambda t: t[0])


def read_summaries(inputs: list[Path], options: dict) -> list[tuple[str, dict, Path]]:
    """(row label, per-layer summary, file) from stats files' metadata, trial by trial (kdtool/report/trials.py).

    Option trial: only that trial's layers (a Trial.key, as kdtool plot report sets it). Rows of
    several trials are labelled with the trial ("L12 A (dense)"), told apart by how the SAEs were
    trained, not by the file names.
    """
    wanted = _wanted(options)
    for path in inputs:
        if not Path(path).exists():
            raise BadInput(f"{path}: no such file")
    found = trials.select([Path(p) for p in inputs], options.get("trial"))
    rows = []
    for t in found:
        for tl in t.layers:
            if wanted is None or tl.layer in wanted:
                rows.append((f"L{tl.layer}" + (f" {t.label}" if len(found) > 1 else ""), tl.summary, tl.path))
    if not rows:
        raise BadInput("no layer to show (check --layer)")
    return rows


# --------------------------------------------------------------------------- figures


def curves(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Fig. 4 / 15: reconstruction MSE, L1 term, L0 and fraction alive against tokens, one line per layer."""
    logs = read_logs(inputs, options)
    x_key = str(options.get("x", "tokens"))
    if x_key not in ("tokens", "step"):
        raise BadInput(f"--set x={x_key}: use tokens or step")
    fig, axes = st.figure(style, 2, 2, sharex=True)
    panels = [("mse", "reconstruction MSE", True), ("l1_term", "L1 term (lambda * sum z)", True),
              ("l0", "L0 (active latents / token)", True), ("alive_fraction", "fraction alive", False)]  # fmt: skip
    layers_seen = [layer for layer, _, _ in logs]
    for i, (layer, cols, path) in enumerate(logs):
        sty = st.layer_style(i)
        label = f"layer {layer}" if layers_seen.count(layer) == 1 else f"layer {layer} ({_run_name(path)})"
        x = np.asarray(cols[x_key], dtype=float)
        for ax, (key, _, _) in zip(axes.flat, panels, strict=True):
            if key in cols:
                y = np.asarray(cols[key], dtype=float)
                # a log of one step is one point: a line through it draws nothing, a marker shows it
                ax.plot(x, y, color=sty["color"], linestyle=sty["linestyle"], label=label,
                        marker=sty["marker"] if x.size == 1 else None)  # fmt: skip
    for ax, (key, label, logy) in zip(axes.flat, panels, strict=True):
        ax.set_title(label)
        if logy:
            _log_if_wide(ax, "y", [np.asarray(c[key], dtype=float) for _, c, _ in logs if key in c])
    for ax in axes[1]:
        ax.set_xlabel("training tokens" if x_key == "tokens" else "step")
    axes[1][1].set_ylim(-0.02, 1.02)
    if all(np.asarray(c[x_key]).size == 1 for _, c, _ in logs):
        axes[0][0].annotate("one step logged", (0.02, 0.04), xycoords="axes fraction", fontsize="small", color="0.4")
    axes[0][0].legend(loc="best")
    if options.get("title"):
        fig.suptitle(options["title"])
    st.save(fig, output)


_CARD = (  # column, header, format
    ("F", "alive F", "{:,.0f}"),
    ("L0", "L0", "{:,.1f}"),
    ("alpha", "alpha", "{:.4f}"),
    ("g", "g(alpha)", "{:.2f}"),
    ("d_star", "d*", "{:,.0f}"),
    ("mse", "MSE", "{:.3g}"),
    ("dead", "dead", "{:,.0f}"),
)
#: shown when some row has them: the robust count (stats since issue 10) and fidelity (stats --fidelity)
_CARD_EXTRA = (
    ("F_robust", "F robust", "{:,.0f}"),
    ("d_star_robust", "d* robust", "{:,.0f}"),
    ("fidelity.ce_loss_score", "CE score", "{:.3f}"),
    ("fidelity.kl_div_score", "KL score", "{:.3f}"),
    ("fidelity.kl", "KL (nats)", "{:.3g}"),
)


def _value(summary: dict, key: str):
    """A card cell: summary[key], or summary["fidelity"][...] for "fidelity.<name>"."""
    if key.startswith("fidelity."):
        return _num((summary.get("fidelity") or {}).get(key.split(".", 1)[1]))
    return _num(summary.get(key))


def layers(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Table 1 as a card: rows = SAEs (layers), columns = F, L0, alpha, g, d*, MSE, dead, and when known the robust
    F and d* and the fidelity scores (CE score, KL score, KL), each column shaded on its range."""
    rows = read_summaries(inputs, options)
    card = _CARD + tuple(c for c in _CARD_EXTRA if any(math.isfinite(_value(s, c[0])) for _, s, _ in rows))
    values = np.array([[_value(s, key) for key, _, _ in card] for _, s, _ in rows], dtype=float)
    shade = np.full_like(values, 0.5)
    for j in range(values.shape[1]):
        col = values[:, j]
        ok = np.isfinite(col)
        if ok.sum() >= 2 and np.nanmax(col) > np.nanmin(col):
            shade[ok, j] = (col[ok] - np.nanmin(col)) / (np.nanmax(col) - np.nanmin(col))
        else:
            shade[:, j] = 0.0  # one value (or one row): nothing to compare, no shade
        shade[~ok, j] = np.nan
    n_rows, n_cols = values.shape
    scale = 1.0 if style == "paper" else 1.7  # slides fonts are larger
    fig, axes = st.figure(style, figsize=(scale * (0.85 * n_cols + 1.3), scale * (0.32 * n_rows + 0.9)))
    ax = axes[0][0]
    cmap = _cmap()
    ax.imshow(np.ma.masked_invalid(shade), cmap=cmap, vmin=-0.15, vmax=1.25, aspect="auto")
    for i in range(n_rows):
        for j, (_, _, fmt) in enumerate(card):
            v = values[i, j]
            dark = math.isfinite(shade[i, j]) and shade[i, j] > 0.65
            ax.text(j, i, "n/a" if not math.isfinite(v) else fmt.format(v), ha="center", va="center",
                    color="white" if dark else "black", fontsize="small")  # fmt: skip
    ax.set_xticks(range(n_cols), [h for _, h, _ in card])
    ax.set_yticks(range(n_rows), [label for label, _, _ in rows])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    found = trials.select([Path(p) for p in inputs], options.get("trial"))
    what = f": {found[0].label}" if len(found) == 1 else ""
    ax.set_title(options.get("title") or f"SAE measurements per layer{what}\n(shade: low to high within each column)",
                 pad=14, fontsize="medium")  # fmt: skip
    st.save(fig, output)


def _log_if_wide(ax, axis: str, series: list) -> None:
    """Log scale when the values are positive and span more than a decade (else the ticks read badly)."""
    vals = np.concatenate([np.asarray(v, dtype=float).ravel() for v in series]) if series else np.array([])
    vals = vals[np.isfinite(vals)]
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > 10:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _cmap():
    return LinearSegmentedColormap.from_list("kdtool_card", ["#FFFFFF", st.PALETTE[5], st.PALETTE[0]])


def _num(v) -> float:
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def l0_mse(inputs: list[Path], output: Path, *, style: str, options: dict) -> None:
    """Sparsity vs reconstruction per layer: stats files as points, train logs as trajectories ending in a point."""
    fig, axes = st.figure(style)
    ax = axes[0][0]
    stats_inputs = [p for p in inputs if Path(p).is_file() and _kind(Path(p)) == STATS_KIND]
    log_inputs = [p for p in inputs if p not in stats_inputs]
    n_series = 0
    if log_inputs:
        logs = read_logs(log_inputs, options)
        layers_seen = [layer for layer, _, _ in logs]
        for layer, cols, path in logs:
            sty = st.layer_style(n_series)
            n_series += 1
            run = f", {_run_name(path)}" if layers_seen.count(layer) > 1 else ""
            l0, mse = np.asarray(cols["l0"], dtype=float), np.asarray(cols["mse"], dtype=float)
            ax.plot(l0, mse, color=sty["color"], alpha=0.45, linewidth=0.9)
            ax.plot(l0[-1:], mse[-1:], linestyle="none", marker=sty["marker"], color=sty["color"],
                    label=f"layer {layer} (training{run})")  # fmt: skip
    if stats_inputs:
        points: dict[int, list[tuple[float, float]]] = {}
        for label, s, _ in read_summaries(stats_inputs, options):
            if s.get("L0") is not None and s.get("mse") is not None:
                points.setdefault(int(label.split()[0][1:]), []).append((float(s["L0"]), float(s["mse"])))
        for layer, pts in sorted(points.items()):
            sty = st.layer_style(n_series)
            n_series += 1
            xs, ys = zip(*sorted(pts), strict=True)
            ax.plot(xs, ys, color=sty["color"], linestyle=sty["linestyle"], marker=sty["marker"],
                    markerfacecolor="white", label=f"layer {layer} (stats)")  # fmt: skip
    if not n_series:
        raise BadInput("l0-mse: give train_log.parquet files, a saes/ folder or stats.parquet files")
    drawn = [line.get_xydata() for line in ax.get_lines()]
    _log_if_wide(ax, "x", [d[:, 0] for d in drawn])
    _log_if_wide(ax, "y", [d[:, 1] for d in drawn])
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("reconstruction MSE")
    ax.legend(loc="best")
    if options.get("title"):
        ax.set_title(options["title"])
    st.save(fig, output)
