"""Activation caches with known contents, written in-process for the SAE tests."""

from __future__ import annotations

import torch

from kdtool.acts import store as activations


def write_random(root, *, d=16, n=20_000, layers=(3,), seed=0, shard=5_000, scale=1.0, offset=0.0):
    """Gaussian activations times `scale` (per layer also times 1 + L), plus a constant `offset` in every dimension."""
    g = torch.Generator().manual_seed(seed)
    w = activations.ShardWriter(
        root,
        layers=list(layers),
        d_model=d,
        dtype="float32",
        shard_tokens=shard,
        info={"model": "random"},
        provenance={},
    )
    for _ in range(0, n, shard):
        w.add({L: (torch.randn(shard, d, generator=g) * (1 + L) + offset) * scale for L in layers})
    w.close()
    return root
