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
as in the training loss) and explained variance 1 - SSE / SST, SST around the mean of x
(SAELens's definition). Beside them, the robust count of kdtool/sae/robust.py (its columns
group, group_importance, counted and F_robust, alpha_robust, d*_robust).

z is measured in units of the residual stream: when an SAE's decoder rows are not unit-norm,
z_i is multiplied by ||W_dec[i]|| (`fold_decoder_norm`, on by default), so that E[z_i^2] is the
squared contribution of feature i to the reconstruction whatever the SAE's convention. For
kdtool's own SAEs the norms are 1 and nothing changes.

Memory is flat in the number of tokens: one [chunk, d_sae] block at a time, float64 sums.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdtool.errors import BadInput
from kdtool.sae.layouts import LoadedSAE
from kdtool.sae.record import training_record
from kdtool.sae.robust import GroupStats, RobustConfig, dedup_groups
from kdtool.theory import theorem as theory

ALIVE_THRESHOLD = 1e-5


@dataclass
class FeatureStats:
    """Streaming accumulator for one SAE."""

    sae: LoadedSAE
    fold_decoder_norm: bool = True
    robust: RobustConfig | None = field(default_factory=RobustConfig)  # None: skip the robust count
    tokens: int = 0
    fires: Any = None  # [F] int64
    sum_z: Any = None  # [F] float64
    sum_z2: Any = None  # [F] float64
    max_z: Any = None  # [F] float32
    sse: float = 0.0
    sum_x: Any = None  # [d] float64
    sum_x2: float = 0.0
    scale: Any = None  # [F] decoder row norms (or None)
    groups: GroupStats | None = None

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
        if self.robust is not None:
            self.groups = GroupStats(dedup_groups(self.sae.W_dec, self.robust.cosine), dev)

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
        if self.groups is not None:
            self.groups.update(z)

    def mean_x(self) -> torch.Tensor:
        """[d_in] mean activation over the tokens seen (the mean-ablation value of `stats --fidelity`)."""
        return (self.sum_x / max(self.tokens, 1)).float()

    def result(self, layer: int, alive_threshold: float = ALIVE_THRESHOLD) -> tuple[dict, dict]:
        """(columns of stats.parquet for this SAE, its summary with a "notes" list)."""
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
            "layer": layer,
            "F": F_alive,
            "L0": l0,
            "alpha": None,
            "g": None,
            "d_star": None,
            "dead": F - F_alive,
            "dead_fraction": (F - F_alive) / F,
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
            "checkpoint": bool((self.sae.cfg.get("kdtool") or {}).get("checkpoint")),  # a train-sae token checkpoint
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
        if self.groups is not None:
            robust_cols, robust = self.groups.result(self.robust)
            cols |= robust_cols
            notes.extend(f"layer {layer}: {note}" for note in robust.pop("notes"))
            detail = {k: robust.pop(k) for k in ("groups", "duplicates", "largest_group", "mass_counted")}
            summary |= robust | {"robust": detail}
        summary["notes"] = notes
        return cols, summary


def collect(
    saes: list[tuple[int, LoadedSAE]],
    batches: Iterator[dict],
    *,
    chunk_tokens: int = 4096,
    max_tokens: int | None = None,
    fold_decoder_norm: bool = True,
    robust: RobustConfig | None = None,
    device: str = "cpu",
    on_progress=None,
) -> list[tuple[int, FeatureStats]]:
    """Stream batches ({layer: [n, d]}) through each (layer, SAE); return the accumulators.

    Stops after max_tokens tokens (None: all). Work is done in chunks of chunk_tokens rows so
    memory stays bounded by chunk_tokens x d_sae whatever the shard size.
    """
    accs = [(layer, FeatureStats(sae.to(device), fold_decoder_norm, robust)) for layer, sae in saes]
    layers = [layer for layer, _ in accs]
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
                # each layer's rows converted once, whatever the number of its SAEs
                xs = {layer: batch[layer][start:stop].to(device, torch.float32) for layer in dict.fromkeys(layers)}
                for layer, acc in accs:
                    acc.update(xs[layer])
            seen += n
            if on_progress is not None:
                on_progress(seen)
            if max_tokens is not None and seen >= max_tokens:
                break
    if seen == 0:
        raise BadInput("no activations to measure (the source is empty)")
    return accs
