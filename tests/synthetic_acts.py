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


def oracle_sae(spec, width: int, *, seed: int = 0, bias: float = 0.45, near_dead_bias: float = 2.0):
    """An SAE built from planted directions the way wide trained SAEs look (LoadedSAE, d_sae = width >= K).

    Every true direction u_i has a latent (encoder u_i, bias -`bias` against interference). Of the
    remaining width - K latents, half are split copies of true features, spread round-robin (the n
    latents of a feature decode to directions at cosine ~0.98 to u_i and each takes 1/n of its
    activation: feature splitting), half are near-dead latents (random directions, bias
    -`near_dead_bias`, firing on a few tokens). Its true count is K whatever the width.
    """
    from kdtool.sae.layouts import LoadedSAE

    g = torch.Generator().manual_seed(seed)
    u = spec.directions()  # [K, d]
    k, d = u.shape
    extra = width - k
    n_split, n_dead = extra // 2, extra - extra // 2
    owner = torch.cat([torch.arange(k), torch.randperm(k, generator=g).repeat(n_split // k + 1)[:n_split]])
    share = 1.0 / torch.bincount(owner, minlength=k).float()[owner]  # [K + n_split] 1/n of the feature each
    dec = (
        u[owner]
        + (torch.arange(owner.numel()) >= k).float()[:, None]
        * 0.2
        * torch.randn(owner.numel(), d, generator=g)
        / d**0.5
    )
    dec /= dec.norm(dim=1, keepdim=True)
    enc, b = u[owner] * share[:, None], -bias * share
    r = torch.randn(n_dead, d, generator=g)
    r /= r.norm(dim=1, keepdim=True)
    w_enc, w_dec = torch.cat([enc, r]), torch.cat([dec, r])
    b_enc = torch.cat([b, torch.full((n_dead,), -near_dead_bias)])
    offset = 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(spec.seed + 2))  # planted.batches' b
    return LoadedSAE(path=f"oracle-{width}", layout="kdtool", W_enc=w_enc.t().contiguous(), b_enc=b_enc,
                     W_dec=w_dec, b_dec=offset, layer=1, layer_source="test")  # fmt: skip
