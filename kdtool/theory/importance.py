"""Where the per-feature loss weights of Eq. 2 come from: a stats file or a parametric spec.

Two sources give the same thing, one `LayerImportance` per layer:
- a stats table written by `kdtool stats` (docs/formats.md, kind `kdtool.stats`): the alive
  features' `importance` (I_i = E[z_i^2], which already folds in E[x^2], paper section 5.2)
  sorted descending; alpha from the file's summary metadata, else recomputed as
  L0 = sum(freq), F = #alive, alpha = 1 - L0 / F;
- a parametric spec (the toy model, paper section 4): F features with I_i = i^-s (Zipf) and
  E[x_i^2] = (1 - alpha) / 3 unless given, so w_i = I_i * E[x_i^2].

`capacity_g` turns alpha into g(alpha) (paper or naive), or takes an explicit g: the paper's
Table 2 was computed with g = 26.922, a rounded value that differs from g(1 - 218.3/28665)
= 26.921 enough to move F_S at d_S = 128 by one feature.

numpy only (plus pyarrow through kdtool.formats for stats files): imported by `predict`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool.errors import BadInput
from kdtool.formats import is_parquet, numeric_column, parquet_metadata, read_table
from kdtool.theory import theorem as theory

#: freq above which a feature counts as alive when a stats table has no `alive` column (paper section 5.2).
ALIVE_THRESHOLD = 1e-5


@dataclass(frozen=True)
class LayerImportance:
    """The per-feature loss weights of one layer and the sparsity they were measured at."""

    layer: int  # residual-stream layer (a label only, for parametric specs)
    weights: np.ndarray  # [F] per-feature loss weights w_i = I_i * E[x_i^2], sorted descending
    alpha: float | None  # sparsity 1 - L0/F; None when only an explicit g is known
    l0: float | None  # mean number of active features per token, when known
    source: str  # where the weights came from (file path or the parametric spec)
    features: np.ndarray | None = None  # [F] the SAE latent index of each weight (stats files only)

    @property
    def n_features(self) -> int:
        return int(self.weights.size)


def alpha_from_l0(n_features: float, l0: float, *, what: str = "L0") -> float:
    """alpha = 1 - L0 / F (paper section 5.2). Table 1, layer 12: F=28,665, L0=218.3 -> 0.99238."""
    if not (n_features >= 1):
        raise BadInput(f"F must be >= 1 to compute alpha, got {n_features}")
    if not (math.isfinite(l0) and 0 <= l0 < n_features):
        raise BadInput(f"{what} must be in [0, F) = [0, {n_features:g}), got {l0}")
    return 1.0 - l0 / n_features


def parse_importance_spec(spec: str) -> float:
    """'zipf' -> 1.0, 'zipf:1.5' -> 1.5, 'uniform' -> 0.0: the Zipf exponent s of I_i = i^-s."""
    text = spec.strip().lower()
    if text == "uniform":
        return 0.0
    if text == "zipf":
        return 1.0
    if text.startswith("zipf:"):
        try:
            s = float(text[5:])
        except ValueError:
            raise BadInput(f"--importance: bad Zipf exponent in {spec!r} (try zipf:1.2)") from None
        if not math.isfinite(s) or s < 0:
            raise BadInput(f"--importance: Zipf exponent must be finite and >= 0, got {spec!r}")
        return s
    raise BadInput(f"--importance: unknown spec {spec!r} (use zipf, zipf:S or uniform)")


def parametric(
    n_features: int,
    *,
    alpha: float | None,
    importance: str = "zipf",
    sq_activation: float | None = None,
    layer: int = 0,
    l0: float | None = None,
) -> LayerImportance:
    """Toy-model weights: w_i = i^-s * E[x^2], with E[x^2] = (1 - alpha) / 3 by default."""
    if n_features < 1:
        raise BadInput(f"--features must be >= 1, got {n_features}")
    exponent = parse_importance_spec(importance)
    if alpha is not None and not (math.isfinite(alpha) and 0 <= alpha < 1):
        raise BadInput(f"--alpha must be in [0, 1), got {alpha}")
    if sq_activation is None:
        if alpha is None:
            raise BadInput("--sq-activation is needed when alpha is unknown (its default is (1-alpha)/3)")
        sq_activation = (1.0 - alpha) / 3.0
    if not (math.isfinite(sq_activation) and sq_activation > 0):
        raise BadInput(f"--sq-activation must be a positive number, got {sq_activation}")
    weights = theory.zipf_weights(n_features, exponent, sq_activation)
    spec = f"parametric F={n_features} importance={importance} E[x^2]={sq_activation:.6g}"
    return LayerImportance(layer=layer, weights=weights, alpha=alpha, l0=l0, source=spec)


def _summary_layers(path: Path) -> dict[int, dict]:
    """The per-layer summary of a stats Parquet file ({} for CSV/JSON or files without one)."""
    if not is_parquet(path):
        return {}
    summary = parquet_metadata(path).get("summary") or {}
    layers = summary.get("layers") if isinstance(summary, dict) else None
    out: dict[int, dict] = {}
    if isinstance(layers, dict):
        for key, value in layers.items():
            try:
                out[int(key)] = value if isinstance(value, dict) else {}
            except (TypeError, ValueError):
                continue
    return out


def from_stats(path: str | os.PathLike, *, layers: list[int] | None = None) -> list[LayerImportance]:
    """One LayerImportance per layer of a stats table (Parquet from `kdtool stats`, or CSV/JSON).

    Needs an `importance` column. `layer` is optional (one layer, labelled 0, without it);
    `alive` defaults to freq > 1e-5 (or importance > 0 without `freq`). alpha comes from the
    summary metadata when it has one, else from the rows: L0 = sum(freq), F = #alive.
    """
    p = Path(path)
    cols = read_table(p, required=("importance",))
    importance = numeric_column(cols, "importance", p)
    if np.any(importance < 0):
        raise BadInput(f"{p}: column 'importance' has negative values (it is E[z^2] >= 0)")
    n = importance.size
    if "layer" in cols:
        layer_col = numeric_column(cols, "layer", p)
        if np.any(layer_col != np.round(layer_col)):
            raise BadInput(f"{p}: column 'layer' must hold integers")
        layer_col = layer_col.astype(np.int64)
    else:
        layer_col = np.zeros(n, dtype=np.int64)
    freq = numeric_column(cols, "freq", p) if "freq" in cols else None
    if freq is not None and (np.any(freq < 0) or np.any(freq > 1)):
        raise BadInput(f"{p}: column 'freq' must be in [0, 1] (fires / tokens)")
    if "alive" in cols:
        try:
            alive = np.asarray(cols["alive"]).astype(bool)
        except (TypeError, ValueError):
            raise BadInput(f"{p}: column 'alive' is not boolean") from None
    elif freq is not None:
        alive = freq > ALIVE_THRESHOLD
    else:
        alive = importance > 0
    summary = _summary_layers(p)
    ids = numeric_column(cols, "feature", p).astype(np.int64) if "feature" in cols else None

    present = sorted(int(v) for v in np.unique(layer_col))
    chosen = present if not layers else list(dict.fromkeys(layers))
    missing = [v for v in chosen if v not in present]
    if missing:
        raise BadInput(
            f"--layer: layer(s) {', '.join(map(str, missing))} not in {p} (it has: {', '.join(map(str, present))})"
        )
    out = []
    for layer in chosen:
        rows = layer_col == layer
        kept = np.flatnonzero(rows & alive)
        order = kept[np.argsort(-importance[kept], kind="stable")]  # descending; ties keep the file's order
        weights = importance[order]
        if weights.size == 0:
            raise BadInput(f"{p}: layer {layer} has no alive features")
        info = summary.get(layer, {})
        l0 = info.get("L0")
        alpha = info.get("alpha")
        if alpha is None:
            if l0 is None:
                if freq is None:
                    raise BadInput(f"{p}: no alpha in its summary and no 'freq' column to compute it; give --alpha")
                l0 = float(np.sum(freq[rows]))
            alpha = alpha_from_l0(weights.size, float(l0), what=f"{p}: layer {layer} L0")
        alpha = float(alpha)
        if not (math.isfinite(alpha) and 0 <= alpha < 1):
            raise BadInput(f"{p}: layer {layer} has alpha={alpha}, outside [0, 1)")
        out.append(
            LayerImportance(
                layer=layer,
                weights=weights,
                alpha=alpha,
                l0=None if l0 is None else float(l0),
                source=str(p),
                features=(ids if ids is not None else np.cumsum(rows) - 1)[order],  # else: row within the layer
            )
        )
    return out


def capacity_g(alpha: float | None, capacity: theory.Capacity = "paper", g_value: float | None = None) -> float:
    """g to use for F_S = floor(d_S g): an explicit value wins, else g(alpha) (paper) or 1 (naive)."""
    if g_value is not None:
        if not (math.isfinite(g_value) and g_value > 0):
            raise BadInput(f"--g must be a positive number, got {g_value}")
        return float(g_value)
    if capacity == "naive":
        return 1.0
    if alpha is None:
        raise BadInput("alpha is unknown: give --alpha, --l0 or --g")
    if alpha == 0:
        raise BadInput(
            "alpha=0: Eq. 1 gives g(0) = infinity (the paper's g(0)=1 is a convention); use --capacity naive or --g 1"
        )
    return float(theory.g(alpha, capacity))  # warns below 1 - 1/e, where Eq. 1 is not monotone


def floor_model(
    layer: LayerImportance, capacity: theory.Capacity = "paper", g_value: float | None = None
) -> theory.FloorModel:
    """The Eq. 2 model of one layer with the chosen capacity."""
    gv = capacity_g(layer.alpha, capacity, g_value)
    return theory.FloorModel.from_weights(
        layer.weights, layer.alpha if layer.alpha is not None else float("nan"), g_value=gv
    )
