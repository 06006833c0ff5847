"""Where the per-feature loss weights of Eq. 2 come from: a stats file or a parametric spec.

Two sources give the same thing, one `LayerImportance` per layer (per SAE, when a stats file
holds several SAEs of a layer: its `sae` column tells their rows apart):
- a stats table written by `kdtool stats` (docs/formats.md, kind `kdtool.stats`): the alive
  features' `importance` (I_i = E[z_i^2], which already folds in E[x^2], paper section 5.2)
  sorted descending; alpha from the file's summary metadata, else recomputed as
  L0 = sum(freq), F = #alive, alpha = 1 - L0 / F. With `estimator="robust"`, the de-duplicated
  features counted in F_robust instead (their `group_importance`, one per `group`) with
  alpha_robust (kdtool/sae/robust.py);
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
from kdtool.sae.summary import entries
from kdtool.theory import theorem as theory

#: freq above which a feature counts as alive when a stats table has no `alive` column (paper section 5.2).
ALIVE_THRESHOLD = 1e-5
#: paper: the alive latents and alpha = 1 - L0/F (section 5.2); robust: kdtool/sae/robust.py's count
ESTIMATORS = ("paper", "robust")
ROBUST_COLUMNS = ("group", "group_importance", "counted")


@dataclass(frozen=True)
class LayerImportance:
    """The per-feature loss weights of one layer and the sparsity they were measured at."""

    layer: int  # residual-stream layer (a label only, for parametric specs)
    weights: np.ndarray  # [F] per-feature loss weights w_i = I_i * E[x_i^2], sorted descending
    alpha: float | None  # sparsity 1 - L0/F; None when only an explicit g is known
    l0: float | None  # mean number of active features per token, when known
    source: str  # where the weights came from (file path or the parametric spec)
    sae: str | None = None  # the SAE's key in a stats file (its `sae` column); None for older files and specs
    estimator: str = "paper"  # which count the weights and alpha are: paper or robust
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
            raise BadInput(
                "--features needs the sparsity: give --alpha A or --l0 L0 (or --g G with --sq-activation S, "
                "whose default (1-alpha)/3 needs alpha)"
            )
        sq_activation = (1.0 - alpha) / 3.0
    if not (math.isfinite(sq_activation) and sq_activation > 0):
        raise BadInput(f"--sq-activation must be a positive number, got {sq_activation}")
    weights = theory.zipf_weights(n_features, exponent, sq_activation)
    spec = f"parametric F={n_features} importance={importance} E[x^2]={sq_activation:.6g}"
    return LayerImportance(layer=layer, weights=weights, alpha=alpha, l0=l0, source=spec)


def _summary_entries(path: Path) -> dict[tuple[str | None, int], dict]:
    """{(sae key, layer): its summary} of a stats Parquet file ({} for CSV/JSON or files without one)."""
    if not is_parquet(path):
        return {}
    return {(e.key, e.layer): e.info for e in entries(parquet_metadata(path).get("summary"))}


def _int_column(cols: dict, name: str, p: Path) -> np.ndarray:
    values = numeric_column(cols, name, p)
    if np.any(values != np.round(values)):
        raise BadInput(f"{p}: column {name!r} must hold integers")
    return values.astype(np.int64)


def from_stats(
    path: str | os.PathLike, *, layers: list[int] | None = None, estimator: str = "paper"
) -> list[LayerImportance]:
    """One LayerImportance per SAE of a stats table (Parquet from `kdtool stats`, or CSV/JSON), in file order.

    Needs an `importance` column. `layer` is optional (one layer, labelled 0, without it); `sae`
    tells several SAEs of a layer apart; `alive` defaults to freq > 1e-5 (or importance > 0 without
    `freq`). alpha comes from the summary metadata when it has one, else from the rows: L0 =
    sum(freq), F = #alive. estimator="robust" reads the robust columns and alpha_robust instead.
    """
    if estimator not in ESTIMATORS:
        raise BadInput(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    p = Path(path)
    cols = read_table(p, required=("importance",))
    importance = numeric_column(cols, "importance", p)
    if np.any(importance < 0):
        raise BadInput(f"{p}: column 'importance' has negative values (it is E[z^2] >= 0)")
    n = importance.size
    layer_col = _int_column(cols, "layer", p) if "layer" in cols else np.zeros(n, dtype=np.int64)
    sae_col = np.asarray(cols["sae"]).astype(str) if "sae" in cols else None
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
    if estimator == "robust":
        missing = [c for c in ROBUST_COLUMNS if c not in cols]
        if missing:
            raise BadInput(
                f"{p}: no robust count (columns {', '.join(missing)} missing); --estimator robust needs a "
                "stats file from this kdtool's `kdtool stats` (rerun it)"
            )
    summary = _summary_entries(p)
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
        in_layer = layer_col == layer
        keys = [None] if sae_col is None else list(dict.fromkeys(sae_col[in_layer]))
        for key in keys:
            rows = in_layer if key is None else in_layer & (sae_col == key)
            info = summary.get((key, layer)) or summary.get((None, layer)) or {}
            where = f"{p}: layer {layer}" + (f" (SAE {key})" if key is not None else "")
            latent = ids if ids is not None else _row_within(rows)
            if estimator == "robust":
                out.append(_robust(cols, rows, info, p, where, layer, key, latent))
            else:
                out.append(_paper(importance, rows & alive, freq, rows, info, p, where, layer, key, latent))
    return out


def _row_within(rows: np.ndarray) -> np.ndarray:
    """Each row's index within the selected rows: the latent index of a file without a `feature` column."""
    return np.cumsum(rows) - 1


def _paper(importance, keep, freq, rows, info, p, where, layer, key, latent) -> LayerImportance:
    kept = np.flatnonzero(keep)
    order = kept[np.argsort(-importance[kept], kind="stable")]  # descending; ties keep the file's order
    weights = importance[order]
    if weights.size == 0:
        raise BadInput(f"{where} has no alive features")
    l0, alpha = info.get("L0"), info.get("alpha")
    if alpha is None and l0 is None:
        if freq is None:
            raise BadInput(f"{p}: no alpha in its summary and no 'freq' column to compute it; give --alpha")
        l0 = float(np.sum(freq[rows]))
    alpha, l0 = _checked_alpha(alpha, l0, weights.size, where, "")
    return LayerImportance(layer, weights, alpha, l0, str(p), key, "paper", latent[order])


def _checked_alpha(alpha, l0, n_features: int, where: str, suffix: str) -> tuple[float, float | None]:
    """alpha from the summary, else from L0 (alpha = 1 - L0/F); refused outside [0, 1). suffix: "" or "_robust"."""
    if alpha is None:
        alpha = alpha_from_l0(n_features, float(l0), what=f"{where} L0{suffix}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0 <= alpha < 1):
        raise BadInput(f"{where} has alpha{suffix}={alpha}, outside [0, 1)")
    return alpha, None if l0 is None else float(l0)


def _robust(cols, rows, info, p, where, layer, key, latent) -> LayerImportance:
    """The F_robust counted features of one SAE: one weight per de-duplicated group, alpha_robust.

    A group's latent is its first member in the file's order."""
    counted = np.flatnonzero(rows & np.asarray(cols["counted"]).astype(bool))
    groups = np.asarray(cols["group"])[counted]
    gi = np.asarray(cols["group_importance"], dtype=np.float64)[counted]
    _, first = np.unique(groups, return_index=True)
    first = np.sort(first)
    order = first[np.argsort(-gi[first], kind="stable")]
    weights = gi[order]
    alpha, l0 = info.get("alpha_robust"), info.get("L0_robust")
    if weights.size == 0:
        raise BadInput(f"{where} has no feature in its robust count")
    if alpha is None and l0 is None:
        raise BadInput(f"{where}: no alpha_robust in the stats summary (rerun `kdtool stats`)")
    alpha, l0 = _checked_alpha(alpha, l0, weights.size, where, "_robust")
    return LayerImportance(layer, weights, alpha, l0, str(p), key, "robust", latent[counted[order]])


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


def entry_of_sae(layers: list[LayerImportance], layer: int, sae_path, stats_path) -> LayerImportance:
    """The stats entry of --sae: its layer's only SAE, or the one whose key (trailing path parts) it ends with.

    layers: from_stats(stats_path). Used by distill --loss features and survival --stats.
    """
    here = [x for x in layers if x.layer == layer]
    if not here:
        raise BadInput(f"--stats {stats_path}: has no layer {layer} (the layer of --sae {sae_path})")
    if len(here) == 1:
        return here[0]
    mine = Path(sae_path).resolve().parts
    named = [x for x in here if x.sae and mine[-len(Path(x.sae).parts) :] == Path(x.sae).parts]
    if len(named) != 1:
        keys = ", ".join(str(x.sae) for x in here)
        raise BadInput(f"--stats {stats_path}: layer {layer} has several SAEs ({keys}); none is --sae {sae_path}")
    return named[0]
