"""Which features Theorem 1 says a student keeps: importance ranks and F_S = floor(d_S g(alpha)).

Importance I_i = E[z_i^2] and sparsity alpha = 1 - L0/F (F = alive features) come from one of two
sources, recorded in the output:
- a `kdtool stats` file (`--stats`): measured on the teacher's training-side activations, the same
  numbers `kdtool predict` uses, so the staircase here is the one Eq. 2 charged;
- measured on the survival run's own measurement tokens (held-out text), when no stats file is given.

Rank 0 is the most important alive feature; dead features (never fire in the source) come after every
alive one, in feature order, and are never predicted kept: F_S is capped at F, as in Eq. 2.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool.errors import BadInput
from kdtool.formats import numeric_column, read_table
from kdtool.theory import importance as imp
from kdtool.theory import theorem as theory


@dataclass
class LayerRanking:
    """Per-feature importance of one layer's SAE, in feature order, and the sparsity it implies."""

    layer: int
    importance: np.ndarray  # [d_sae] I_i = E[z_i^2], feature order
    alive: np.ndarray  # [d_sae] bool
    alpha: float | None  # 1 - L0 / F; None when no feature is alive
    source: str  # "stats PATH" or "measured on N held-out tokens"

    @property
    def n_alive(self) -> int:
        return int(self.alive.sum())

    def ranks(self) -> np.ndarray:
        """[d_sae] int: 0 = most important alive feature; dead ones last; ties by feature index."""
        order = np.lexsort((np.arange(self.importance.size), -self.importance, ~self.alive))
        ranks = np.empty(self.importance.size, dtype=np.int64)
        ranks[order] = np.arange(self.importance.size)
        return ranks

    def capacity(self, capacity: theory.Capacity = "paper") -> tuple[float | None, list[str]]:
        """(g, notes): g(alpha) of Eq. 1 (or 1 for naive), None when alpha is undefined; notes say why."""
        if capacity == "naive":
            return 1.0, []
        if self.alpha is None or not (0 < self.alpha < 1):
            return None, [f"layer {self.layer}: alpha = {self.alpha} ({self.source}): g and F_S are undefined"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gv = float(theory.g(self.alpha, capacity))
        return gv, [f"layer {self.layer}: {w.message}" for w in caught]

    def features_kept(self, width: int, g_value: float | None) -> int | None:
        """F_S = floor(d_S g), capped at F (None when g is unknown)."""
        return None if g_value is None else int(theory.features_kept(width, g_value, self.n_alive))


def from_stats(path: str | os.PathLike, layer: int, d_sae: int, sae_path=None) -> LayerRanking:
    """The ranking a `kdtool stats` file gives one layer (BadInput when it is of another SAE size).

    A stats file of several SAEs of this layer (its `sae` column) gives the rows of `sae_path`, the SAE
    survival reads, matched by its key as `distill --loss features` matches it.
    """
    p = Path(path)
    cols = read_table(p, required=("layer", "feature", "importance"))
    layers = numeric_column(cols, "layer", p).astype(np.int64)
    rows = layers == layer
    if not rows.any():
        have = ", ".join(map(str, sorted(set(layers.tolist()))))
        raise BadInput(f"--stats {p}: no rows for layer {layer} (it has layers {have}); give stats of this SAE")
    entries = imp.from_stats(p, layers=[layer])
    entry = imp.entry_of_sae(entries, layer, sae_path, p) if len(entries) > 1 else entries[0]
    if "sae" in cols and entry.sae is not None:
        rows &= np.asarray(cols["sae"]).astype(str) == entry.sae
    feature = numeric_column(cols, "feature", p)[rows].astype(np.int64)
    if feature.size != d_sae or sorted(feature.tolist()) != list(range(d_sae)):
        raise BadInput(
            f"--stats {p}: layer {layer} has {feature.size} features but its SAE has {d_sae} "
            "(stats of another SAE?); run kdtool stats on the same --sae"
        )
    importance = np.zeros(d_sae)
    importance[feature] = numeric_column(cols, "importance", p)[rows]
    alive = np.zeros(d_sae, dtype=bool)
    if "alive" in cols:
        alive[feature] = np.asarray(cols["alive"])[rows].astype(bool)
    else:
        alive[feature] = importance[feature] > 0
    alpha = entry.alpha if alive.any() else None
    return LayerRanking(layer, importance, alive, alpha, f"stats {p}")


def measured(layer: int, numbers: dict, tokens: int) -> LayerRanking:
    """The ranking measured on the survival run's own tokens (numbers: TeacherFeatures.importance())."""
    alpha = numbers["alpha"]
    if alpha is not None and not math.isfinite(alpha):
        alpha = None
    return LayerRanking(
        layer, numbers["importance"], numbers["alive"], alpha, f"measured on {tokens:,} held-out tokens"
    )
