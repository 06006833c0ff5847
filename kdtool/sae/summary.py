"""Reading the summary of a stats file: one entry per SAE, whether the file holds one SAE per layer or several.

A stats file (`kdtool stats`, kind kdtool.stats) keeps its per-SAE numbers (F, L0, alpha, d*, the
robust count, fidelity, the SAE's training settings) in its summary metadata:

    {"saes":   {"<key>": {"layer": L, "F": ..., ...}},      every SAE, since issue 10
     "layers": {"<L>": {...}},                              the same entries keyed by layer, written
                                                            only when each layer has one SAE (older
                                                            files have only this)
     ...}

`entries` gives the SAEs of either form in file order, so that predict, the figures, the report and
`info` read old and new files alike. `sae_keys` names the SAEs of one run: the shortest trailing
part of each path that tells them apart (`layer12`; `x4/layer12` and `x8/layer12`;
`checkpoints/tokens-000000050000`), the `sae` column of the stats table.

Pure Python (no torch, no pyarrow): the figures and `kdtool info` import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One SAE of a stats file: its key (None in files made before the `sae` column), layer and numbers."""

    key: str | None
    layer: int
    info: dict

    def label(self, several: bool) -> str:
        """ "L12", or "L12 x8/layer12" when the file (or figure) shows several SAEs of one layer."""
        return f"L{self.layer}" if not several or self.key is None else f"L{self.layer} {self.key}"


def entries(summary: dict | None) -> list[Entry]:
    """The SAEs a stats summary describes, in file order ([] when it has neither `saes` nor `layers`)."""
    if not isinstance(summary, dict):
        return []
    saes = summary.get("saes")
    if isinstance(saes, dict) and saes:
        out = []
        for key, info in saes.items():
            if isinstance(info, dict) and isinstance(info.get("layer"), int):
                out.append(Entry(str(key), int(info["layer"]), info))
        return out
    layers = summary.get("layers")
    out = []
    if isinstance(layers, dict):
        for key, info in layers.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                continue
            out.append(Entry(None, layer, info if isinstance(info, dict) else {}))
    return sorted(out, key=lambda e: e.layer)


#: per SAE of a stats file, the numbers `kdtool info` shows first (fidelity ones: "fidelity.<name>")
OVERVIEW = ("layer", "F", "L0", "alpha", "d_star", "F_robust", "alpha_robust", "d_star_robust", "tokens",
            "fidelity.ce_loss_score", "fidelity.kl_div_score", "fidelity.kl", "fidelity.tokens")  # fmt: skip


def finished_saes(files: list[tuple[Any, dict | None]]) -> tuple[list[tuple[Any, Entry]], int]:
    """The finished SAEs of several stats summaries, each once: (file, entry) pairs and how many token
    checkpoints were left out.

    An SAE measured in two stats files counts once (by its folder and layer); train-sae's token checkpoints
    are snapshots on the way to an SAE (plot sensitivity's tokens axis), not SAEs to spread a prediction over.
    `files`: (anything naming the file, its summary)."""
    seen: set[tuple] = set()
    out, checkpoints = [], 0
    for i, (name, summary) in enumerate(files):
        for e in entries(summary):
            if e.info.get("checkpoint"):
                checkpoints += 1
                continue
            ident = (e.info["sae"], e.layer) if e.info.get("sae") else (i, e.key, e.layer)
            if ident not in seen:
                seen.add(ident)
                out.append((name, e))
    return out, checkpoints


def overview(summary: dict | None) -> list[dict]:
    """One row per SAE of a stats summary: its key and the OVERVIEW numbers it has (`kdtool info`)."""
    rows = []
    for e in entries(summary):
        row: dict = {"sae": e.key or f"layer{e.layer}"}
        for name in OVERVIEW:
            part, _, sub = name.partition(".")
            value = (e.info.get(part) or {}).get(sub) if sub else e.info.get(name)
            if value is not None:
                row[name] = value
        rows.append(row)
    return rows


def several_per_layer(items: list[Entry]) -> bool:
    """Whether some layer has more than one SAE among `items`."""
    layers = [e.layer for e in items]
    return len(set(layers)) != len(layers)


def layer_view(saes: dict[str, dict]) -> dict[str, dict] | None:
    """The `layers` form of per-SAE entries, or None when a layer has several SAEs (it cannot say which)."""
    by_layer: dict[str, dict] = {}
    for info in saes.values():
        key = str(info["layer"])
        if key in by_layer:
            return None
        by_layer[key] = info
    return by_layer


def sae_keys(paths: list[Path]) -> list[str]:
    """Short unique names for SAE folders: the fewest trailing path parts that tell them apart.

    ["run/saes/layer12"] -> ["layer12"]; ["a/layer12", "b/layer12"] -> ["a/layer12", "b/layer12"];
    paths that are equal (the same SAE given twice) get a "#2" suffix.
    """
    parts = [Path(p).resolve().parts for p in paths]
    keys = []
    for i, mine in enumerate(parts):
        n = 1
        while n < len(mine):
            tail = mine[-n:]
            if all(other[-n:] != tail for j, other in enumerate(parts) if j != i and other != mine):
                break
            n += 1
        keys.append("/".join(mine[-n:]))
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        out.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return out
