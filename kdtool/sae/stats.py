"""Per-feature statistics of SAEs over a stream of activations (`kdtool stats`, paper section 5.2).

For each SAE and each latent i, over all tokens seen:
    fires_i      tokens with z_i > 0
    freq_i       fires_i / tokens
    mean_act_i   E[z_i]
    importance_i E[z_i^2]          (the paper's I_i)
    max_act_i    max z_i
    alive_i      freq_i > alive threshold (default 1e-5)
and per SAE: F = #alive, L0 = mean number of active latents per token, alpha = 1 - L0 / F,
g = g(alpha), d* = F / g, dead = d_sae - F, MSE = E ||x - x_hat||^2 (summed over dimensions,
as in the training loss) and explained variance 1 - SSE / SST.

z is measured in units of the residual stream: when an SAE's decoder rows are not unit-norm,
z_i is multiplied by ||W_dec[i]|| (`fold_decoder_norm`, on by default), so that E[z_i^2] is the
squared contribution of feature i to the reconstruction whatever the SAE's convention. For
kdtool's own SAEs the norms are 1 and nothing changes.

Memory is flat in the number of tokens: one [chunk, d_sae] block at a time, float64 sums.

The whole job (`kdtool stats`): `load_saes` (each --sae with its layer), `open_activations` (the
cache or a streamed teacher), `measure` (-> stats.parquet's columns and summary, the table).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtool.acts.store import ActivationStore
from kdtool.errors import BadInput
from kdtool.formats import finite_or_none
from kdtool.models import check_layers
from kdtool.sae.layouts import LoadedSAE, find_saes, load_sae
from kdtool.sae.record import training_record
from kdtool.sae.sources import DEFAULT_ACTS, ModelSource, TeacherStream
from kdtool.theory import theorem as theory

ALIVE_THRESHOLD = 1e-5
STATS_KIND = "kdtool.stats"
DECODER_NORMS = ("fold", "raw")
#: the columns of stats' printed table (one row per layer), after "layer"
TABLE_KEYS = ("F", "L0", "alpha", "g", "d_star", "dead", "d_sae", "mse", "explained_variance", "tokens")


@dataclass
class StatsConfig:
    """How `kdtool stats` measures (its options, parsed)."""

    alive_threshold: float = ALIVE_THRESHOLD  # a feature is alive iff its firing frequency is above this
    decoder_norm: str = "fold"  # fold: measure z_i * ||W_dec[i]|| (residual-stream units); raw: z as output
    max_tokens: int | None = None  # measure on at most this many tokens (None: all)
    chunk_tokens: int = 4096  # tokens encoded at once (memory: chunk x d_sae floats)
    device: str = "cpu"  # where the SAEs run

    def __post_init__(self):
        if not (0 <= self.alive_threshold < 1):
            raise BadInput(f"--alive-threshold must be in [0, 1), got {self.alive_threshold}")
        if self.decoder_norm not in DECODER_NORMS:
            raise BadInput(f"--decoder-norm must be one of {', '.join(DECODER_NORMS)}, got {self.decoder_norm!r}")


@dataclass
class FeatureStats:
    """Streaming accumulator for one SAE."""

    sae: LoadedSAE
    fold_decoder_norm: bool = True
    tokens: int = 0
    fires: Any = None  # [F] int64
    sum_z: Any = None  # [F] float64
    sum_z2: Any = None  # [F] float64
    max_z: Any = None  # [F] float32
    sse: float = 0.0
    sum_x: Any = None  # [d] float64
    sum_x2: float = 0.0
    scale: Any = None  # [F] decoder row norms (or None)
    warnings: list = field(default_factory=list)

    def __post_init__(self):
        F, dev = self.sae.d_sae, self.sae.W_enc.device
        self.fires = torch.zeros(F, dtype=torch.int64, device=dev)
        self.sum_z = torch.zeros(F, dtype=torch.float64, device=dev)
        self.sum_z2 = torch.zeros(F, dtype=torch.float64, device=dev)
        self.max_z = torch.zeros(F, dtype=torch.float32, device=dev)
        self.sum_x = torch.zeros(self.sae.d_in, dtype=torch.float64, device=dev)
        norms = self.sae.W_dec.norm(dim=1)
        if self.fold_decoder_norm and not torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-4):
            self.scale = norms

    def update(self, x) -> None:
        """x: [n, d_in] float32 on the SAE's device."""
        if x.shape[1] != self.sae.d_in:
            raise BadInput(f"{self.sae.path}: SAE expects d_in={self.sae.d_in}, activations have d={x.shape[1]}")
        z = self.sae.encode(x)  # [n, F]
        x_hat = self.sae.decode(z)  # [n, d]
        if self.scale is not None:
            z = z * self.scale
        self.tokens += x.shape[0]
        self.fires += (z > 0).sum(dim=0)
        self.sum_z += z.sum(dim=0, dtype=torch.float64)
        self.sum_z2 += z.square().sum(dim=0, dtype=torch.float64)
        torch.maximum(self.max_z, z.max(dim=0).values, out=self.max_z)
        self.sse += float((x - x_hat).square().sum(dtype=torch.float64))
        self.sum_x += x.sum(dim=0, dtype=torch.float64)
        self.sum_x2 += float(x.square().sum(dtype=torch.float64))

    def result(self, layer: int, alive_threshold: float = ALIVE_THRESHOLD) -> tuple[dict, dict]:
        """(columns of stats.parquet for this layer, the layer's summary)."""
        if self.tokens == 0:
            raise BadInput(f"{self.sae.path}: no tokens seen")
        n = self.tokens
        fires = self.fires.cpu().numpy()
        freq = fires / n
        alive = freq > alive_threshold
        F_alive = int(alive.sum())
        F = self.sae.d_sae
        cols = {
            "layer": np.full(F, layer, dtype=np.int32),
            "feature": np.arange(F, dtype=np.int32),
            "fires": fires.astype(np.int64),
            "freq": freq.astype(np.float64),
            "mean_act": (self.sum_z.cpu().numpy() / n).astype(np.float64),
            "importance": (self.sum_z2.cpu().numpy() / n).astype(np.float64),
            "max_act": self.max_z.cpu().numpy().astype(np.float64),
            "alive": alive,
        }
        l0 = float(fires.sum()) / n
        mean_x = self.sum_x.cpu().numpy() / n
        sst = self.sum_x2 - n * float(mean_x @ mean_x)
        summary = {
            "F": F_alive,
            "L0": l0,
            "alpha": None,
            "g": None,
            "d_star": None,
            "dead": F - F_alive,
            "d_sae": F,
            "d_in": self.sae.d_in,
            "tokens": n,
            "mse": self.sse / n,
            "explained_variance": 1.0 - self.sse / sst if sst > 0 else None,
            "alive_threshold": alive_threshold,
            "sae": str(self.sae.path),
            "layout": self.sae.layout,
            "activation": self.sae.activation,
            "layer_source": self.sae.layer_source,
            "trained": training_record(self.sae.cfg),  # how a kdtool SAE was trained (its trial), else None
        }
        notes = []
        if n * alive_threshold < 1:
            notes.append(
                f"layer {layer}: {n} tokens cannot resolve --alive-threshold {alive_threshold:g} "
                f"(one firing is already a frequency of {1 / n:.2g}); cache more tokens"
            )
        if F_alive == 0:
            notes.append(f"layer {layer}: no feature is alive; alpha, g and d* are undefined")
        else:
            alpha = 1.0 - l0 / F_alive
            summary["alpha"] = alpha
            if 0 <= alpha < 1:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    gv = float(theory.g(alpha))
                notes.extend(f"layer {layer}: {w.message}" for w in caught)
                summary["g"] = gv if math.isfinite(gv) else None
                summary["d_star"] = F_alive / gv if math.isfinite(gv) and gv > 0 else None
            else:
                notes.append(
                    f"layer {layer}: alpha = 1 - L0/F = {alpha:.4g} is outside [0, 1) "
                    "(L0 exceeds the alive count); g and d* are undefined"
                )
        summary["notes"] = notes
        return cols, summary


def collect(
    saes: list[tuple[int, LoadedSAE]],
    batches: Iterator[dict],
    *,
    chunk_tokens: int = 4096,
    max_tokens: int | None = None,
    fold_decoder_norm: bool = True,
    device: str = "cpu",
    on_progress=None,
) -> list[tuple[int, FeatureStats]]:
    """Stream batches ({layer: [n, d]}) through each (layer, SAE); return the accumulators.

    Stops after max_tokens tokens (None: all). Work is done in chunks of chunk_tokens rows so
    memory stays bounded by chunk_tokens x d_sae whatever the shard size.
    """
    accs = [(layer, FeatureStats(sae.to(device), fold_decoder_norm=fold_decoder_norm)) for layer, sae in saes]
    seen = 0
    with torch.no_grad():
        for batch in batches:
            n = next(iter(batch.values())).shape[0]
            if max_tokens is not None:
                n = min(n, max_tokens - seen)
                if n <= 0:
                    break
            for start in range(0, n, chunk_tokens):
                stop = min(n, start + chunk_tokens)
                for layer, acc in accs:
                    acc.update(batch[layer][start:stop].to(device, torch.float32))
            seen += n
            if on_progress is not None:
                on_progress(seen)
            if max_tokens is not None and seen >= max_tokens:
                break
    if seen == 0:
        raise BadInput("no activations to measure (the source is empty)")
    return accs


def tables(accs: list[tuple[int, FeatureStats]], alive_threshold: float = ALIVE_THRESHOLD) -> tuple[dict, dict]:
    """Concatenate the layers into stats.parquet columns + the file's summary {"layers": {...}}."""
    layers = [layer for layer, _ in accs]
    if len(set(layers)) != len(layers):
        dup = sorted({L for L in layers if layers.count(L) > 1})
        raise BadInput(
            f"--sae: several SAEs for layer(s) {dup}; one stats file holds one SAE per layer "
            "(run stats once per SAE, or give --layer)"
        )
    parts, summary = [], {}
    for layer, acc in accs:
        cols, s = acc.result(layer, alive_threshold)
        parts.append(cols)
        summary[str(layer)] = s
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return columns, {"layers": summary}


# ---- the stats job ----------------------------------------------------------------------------


def load_saes(given: list[Path], layers: list[int] | None = None) -> tuple[list[Path], list[LoadedSAE]]:
    """Each --sae (a folder of SAE folders means all of them), loaded, with the layer it reads.

    `layers` (--layer) gives one layer per SAE, in order, over what their files say; an SAE whose
    layer is still unknown is refused.
    """
    paths = [p for g in given for p in find_saes(g)]
    loaded = [load_sae(p) for p in paths]
    if layers is not None:
        if len(layers) != len(loaded):
            raise BadInput(
                f"--layer: {len(layers)} layer(s) for {len(loaded)} SAE(s) "
                f"({', '.join(str(p) for p in paths)}); give one per SAE, in order"
            )
        for s, L in zip(loaded, layers, strict=True):
            s.layer, s.layer_source = L, "--layer"
    unknown = [str(s.path) for s in loaded if s.layer is None]
    if unknown:
        raise BadInput(
            f"--layer: cannot tell which layer {', '.join(unknown)} reads (no layer or known hook in its "
            "config); give --layer"
        )
    return paths, loaded


@dataclass
class Activations:
    """What `stats` streams its SAEs over: {layer: [n, d]} batches, and what to record about them."""

    batches: Iterator[dict]
    d_model: int
    inputs: list  # files for provenance
    info: dict  # the summary's "source"
    total: int | None  # tokens the progress bar counts to


def open_activations(
    layers: list[int], acts: Path | None, teacher: TeacherStream | None, *, max_tokens: int | None
) -> Activations:
    """The activations of `layers`: from a teacher if one is given (it needs --tokens), else from the cache."""
    if teacher is not None:
        if max_tokens is None:
            raise BadInput("--tokens: streaming from a teacher needs a token budget (e.g. --tokens 1M)")
        model = teacher.load(teacher.model)
        check_layers(layers, model.n_layers, "--layer")
        src = ModelSource(model, teacher.data, batch_size=teacher.batch_size, drop_first=teacher.drop_first)
        return Activations(src.model_rows(layers), model.d_model, src.inputs, src.info, max_tokens)
    root = acts if acts is not None else DEFAULT_ACTS
    store = ActivationStore(root)
    missing = [L for L in layers if L not in store.layers]
    if missing:
        raise BadInput(
            f"--acts {root}: layer(s) {missing} not cached (cached: {store.layers}); "
            "cache them with `kdtool cache-acts --layers ...` or give --layer"
        )
    info = {k: store.manifest.get(k) for k in ("model", "revision", "dataset", "seq_len")} | {
        "acts": str(root),
        "source": "cache",
    }
    total = min(store.n_tokens, max_tokens) if max_tokens else store.n_tokens
    return Activations(store.iter_shards(layers), store.d_model, [root / "manifest.json"], info, total)


@dataclass
class StatsResult:
    """stats.parquet's columns and summary, the notes to show, and the tokens measured."""

    columns: dict
    summary: dict
    notes: list[str]
    tokens: int

    def table(self) -> dict[str, list]:
        """One row per layer: F, L0, alpha, g, d*, dead, d_sae, MSE, explained variance, tokens."""
        rows: dict[str, list] = {"layer": []} | {k: [] for k in TABLE_KEYS}
        for L, info in sorted(self.summary["layers"].items(), key=lambda kv: int(kv[0])):
            rows["layer"].append(int(L))
            for k in TABLE_KEYS:
                v = info.get(k)
                rows[k].append(finite_or_none(v) if isinstance(v, float) else v)
        return rows


def measure(
    cfg: StatsConfig, saes: list[LoadedSAE], acts: Activations, *, on_progress: Callable[[int], None] | None = None
) -> StatsResult:
    """Stream `acts` through every SAE (each at its layer) and build stats.parquet's columns and summary."""
    for s in saes:
        if s.d_in != acts.d_model:
            raise BadInput(
                f"{s.path}: SAE expects d_in={s.d_in} but the activations have d_model={acts.d_model} "
                "(an SAE for another model?)"
            )
    accs = collect(
        [(s.layer, s) for s in saes],
        acts.batches,
        chunk_tokens=cfg.chunk_tokens,
        max_tokens=cfg.max_tokens,
        fold_decoder_norm=cfg.decoder_norm == "fold",
        device=cfg.device,
        on_progress=on_progress,
    )
    columns, summary = tables(accs, cfg.alive_threshold)
    summary["source"] = acts.info
    summary["decoder_norm"] = cfg.decoder_norm
    notes = [note for info in summary["layers"].values() for note in info.pop("notes", [])]
    return StatsResult(columns, summary, notes, accs[0][1].tokens)
