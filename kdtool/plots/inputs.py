"""What the figures read from kdtool files: the per-layer numbers of a stats file, and input checks.

`read_stats` reads a stats table through kdtool.theory.importance.from_stats (the reader `kdtool
predict` uses), so a figure and the prediction table agree on F, alpha and the importances.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.sae.summary import entries
from kdtool.theory import importance as imp_mod


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
    sae: str | None = None  # the SAE's key, when the file holds several SAEs of this layer (it goes in labels)


def select_layers(available: list[int], options: dict, path: Path) -> list[int]:
    """The layers `--layer` picks out of `available` (all of them without it); BadInput for one not there."""
    wanted = options.get("layer")
    if wanted in (None, [], ()):
        return available
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    missing = [layer for layer in wanted if layer not in available]
    if missing:
        raise BadInput(f"--layer: {path} has no layer {missing[0]} (layers: {', '.join(map(str, available))})")
    return wanted


def read_stats(path: Path, options: dict, capacity: str = "paper") -> list[LayerStats]:
    """Per-SAE F, alpha, g, d* and sorted importances of a stats file, via kdtool.theory.importance.from_stats.

    alpha comes from the file's summary when present, else L0 = sum(freq), F = #alive (as `kdtool stats`).
    `--set estimator=robust` reads the robust count instead.
    """
    wanted = options.get("layer")
    layers = None if wanted in (None, [], ()) else ([wanted] if isinstance(wanted, int) else list(wanted))
    d_ins: dict = {}
    if formats.is_parquet(path):
        d_ins = {(e.key, e.layer): e.info.get("d_in") for e in entries(formats.parquet_metadata(path).get("summary"))}
    found = imp_mod.from_stats(path, layers=layers, estimator=str(options.get("estimator") or "paper"))
    several = len({li.layer for li in found}) != len(found)
    out = []
    for li in found:
        g = imp_mod.capacity_g(li.alpha, capacity)  # warns below 1 - 1/e, where Eq. 1 is not monotone
        d_in = d_ins.get((li.sae, li.layer)) or d_ins.get((None, li.layer))
        out.append(
            LayerStats(
                layer=li.layer,
                importance=li.weights,
                n_features=li.n_features,
                alpha=float(li.alpha),
                g=g,
                d_star=li.n_features / g,
                d_in=int(d_in) if d_in else None,
                sae=li.sae if several else None,
            )
        )
    return out


def is_stats(path: Path) -> bool:
    """A stats file has per-feature rows (importance, alive); a predict table has width/floor rows."""
    if formats.is_parquet(path):
        kind = formats.parquet_metadata(path).get("kind")
        if kind:
            return kind.startswith("kdtool.stats")
    cols = formats.read_table(path)
    return "importance" in cols and "alive" in cols


def check_inputs(inputs: list[Path], kind: str, *, at_least: int = 1, at_most: int | None = None) -> None:
    """BadInput unless a figure got between `at_least` and `at_most` input files."""
    if len(inputs) < at_least:
        raise BadInput(f"plot {kind}: needs at least {at_least} input file(s)")
    if at_most is not None and len(inputs) > at_most:
        raise BadInput(f"plot {kind}: takes at most {at_most} input file(s), got {len(inputs)}")


def layer_label(layer: int, path: Path, n_files: int, sae: str | None = None) -> str:
    """A series label: the layer (and the SAE's key when given), with the file's name when the figure reads several."""
    base = f"layer {layer}" + (f" {sae}" if sae else "")
    return base if n_files == 1 else f"{path.stem}: {base}"
