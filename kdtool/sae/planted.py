"""Planted activations: a residual stream made of K known directions with known firing rates.

Why: every feature-count estimator (the paper's alive count F, kdtool's F_robust) has to be
checked where the truth is known before its number on a real model means anything. Here
x = sum_i a_i c_i u_i + b + noise with

    u_i   K random unit directions in d dimensions        (the true features)
    a_i   Bernoulli(p_i), independent                     (p: the firing-rate profile)
    c_i   U[c_lo, c_hi], or exponential                   (magnitude when firing)
    b     a fixed offset (0.3 N(0, I)), noise N(0, sigma^2 I)

so the true F is K, L0 = sum_i p_i, alpha = 1 - L0 / K and d* = K / g(alpha) (paper Eq. 1).
Firing-rate profiles: `uniform` (p_i = L0 / K) and `zipf` (p_i proportional to i^-s, scaled to
the same L0 and capped at `p_max`: a few frequent features and a long tail of rare ones, the
shape SAE latents have on real models).

Used by tests/test_robust_count.py and scripts/planted-count (the numbers in docs/sae.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtool.acts import store
from kdtool.errors import BadInput
from kdtool.theory import theorem as theory

PROFILES = ("uniform", "zipf")
MAGNITUDES = ("uniform", "exponential")


@dataclass(frozen=True)
class PlantedSpec:
    """The ground truth: K directions in d dimensions, their firing rates and magnitudes."""

    d: int = 64  # residual-stream width
    k: int = 200  # true features K
    l0: float = 3.0  # mean active true features per token (sum of the firing rates)
    profile: str = "uniform"  # firing rates: uniform or zipf
    zipf_exponent: float = 1.0  # zipf: p_i proportional to i^-s
    p_max: float = 0.5  # zipf: no feature fires on more than this share of tokens
    magnitude: str = "uniform"  # magnitude when firing: uniform U[c_lo, c_hi], or exponential of mean (c_lo + c_hi) / 2
    c_lo: float = 0.5
    c_hi: float = 1.5
    noise: float = 0.01  # isotropic Gaussian noise std per dimension
    seed: int = 0

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise BadInput(f"planted profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.magnitude not in MAGNITUDES:
            raise BadInput(f"planted magnitude must be one of {', '.join(MAGNITUDES)}, got {self.magnitude!r}")
        if not (0 < self.l0 < self.k):
            raise BadInput(f"planted L0 must be in (0, K={self.k}), got {self.l0}")
        if not (0 < self.p_max <= 1) or self.l0 > self.p_max * self.k:
            raise BadInput(f"planted L0 {self.l0} cannot be reached with rates capped at {self.p_max}")

    def rates(self) -> np.ndarray:
        """[K] firing probabilities p_i, summing to L0, sorted descending."""
        if self.profile == "uniform":
            return np.full(self.k, self.l0 / self.k)
        raw = np.arange(1, self.k + 1, dtype=np.float64) ** -self.zipf_exponent
        p = np.zeros(self.k)
        capped = np.zeros(self.k, dtype=bool)
        for _ in range(self.k):  # water-filling: scale the uncapped rates until the capped ones fit
            free = self.l0 - self.p_max * capped.sum()
            p = np.where(capped, self.p_max, raw * free / raw[~capped].sum())
            over = (p > self.p_max) & ~capped
            if not over.any():
                break
            capped |= over
        return p

    def directions(self) -> torch.Tensor:
        """[K, d] unit directions u_i (seeded)."""
        g = torch.Generator().manual_seed(self.seed)
        u = torch.randn(self.k, self.d, generator=g)
        return u / u.norm(dim=1, keepdim=True)

    def truth(self) -> dict:
        """The numbers an estimator should recover: F = K, L0, alpha, g(alpha), d* = K / g."""
        alpha = 1.0 - self.l0 / self.k
        g = float(theory.g(alpha))
        return {"F": self.k, "L0": self.l0, "alpha": alpha, "g": g, "d_star": self.k / g}


def batches(spec: PlantedSpec, tokens: int, *, batch: int = 25_000) -> Iterator[torch.Tensor]:
    """[n, d] float32 blocks of planted activations, `tokens` rows in all (seeded by spec.seed)."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    u = spec.directions()  # [K, d]
    p = torch.from_numpy(spec.rates()).float()  # [K]
    offset = 0.3 * torch.randn(spec.d, generator=torch.Generator().manual_seed(spec.seed + 2))
    done = 0
    while done < tokens:
        n = min(batch, tokens - done)
        active = torch.rand(n, spec.k, generator=g) < p  # [n, K]
        r = torch.rand(n, spec.k, generator=g)  # [n, K]
        if spec.magnitude == "uniform":
            c = spec.c_lo + (spec.c_hi - spec.c_lo) * r
        else:  # exponential: -mean * log(1 - r)
            c = -0.5 * (spec.c_lo + spec.c_hi) * torch.log1p(-r)
        yield (active * c) @ u + offset + spec.noise * torch.randn(n, spec.d, generator=g)
        done += n


def write_cache(spec: PlantedSpec, root: str | Path, tokens: int, *, layer: int = 1) -> Path:
    """An activation cache (kdtool.acts, float32) of `tokens` planted rows at `layer`, for train-sae and stats."""
    shard = min(25_000, max(1, tokens))
    w = store.ShardWriter(
        root,
        layers=[layer],
        d_model=spec.d,
        dtype="float32",
        shard_tokens=shard,
        info={"model": f"planted K={spec.k} d={spec.d} {spec.profile} L0={spec.l0:g}", "planted": _spec_dict(spec)},
        provenance={},
    )
    for x in batches(spec, tokens, batch=shard):
        w.add({layer: x})
    w.close()
    return Path(root)


def _spec_dict(spec: PlantedSpec) -> dict:
    out = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
    out["truth"] = {k: (v if math.isfinite(v) else None) for k, v in spec.truth().items()}
    return out
