"""The two ways to compute one SAE step's gradients: dense matmuls, or only the active (token, latent) pairs.

Both start from the encoder's product `xc @ W_enc` ([B, F], dense: ReLU needs every
pre-activation) and return the gradients of the paper's loss (kdtool/sae/model.py) in
`sae.<param>.grad` plus the batch's statistics. They agree up to float rounding
(tests/test_sae.py, tests/test_sae_kernels.py).

Sparse: after ReLU only a few percent of the [B, F] pairs are active, and every other product
of the step touches only those pairs:

    x_hat[b]     = sum over active j of z[b, j] W_dec[j]          decoder: a weighted bag of rows
    dz[b, j]     = G[b] . W_dec[j] + l1 / B   at active pairs     sampled dot products (SDDMM)
    dW_dec[j]    = sum over active b of z[b, j] G[b]               a weighted bag of rows of G
    dW_enc[:, j] = sum over active b of dz[b, j] xc[b]             a weighted bag of rows of xc

A weighted sum of gathered rows is exactly what `embedding_bag(mode="sum",
per_sample_weights=...)` computes, with kernels written for recommender models (FBGEMM on CPU).
Measured on the 2-core CPU (d=576, F=4608, batch 4096, 1% active, one thread): the three bags
took 40-50 ms each where torch.sparse's CSR x dense products took 230-340 ms, and building the
per-latent order by sorting the 188K active pairs' latent ids (3 ms) replaced a dense [F, B]
transpose and a second CSR conversion (440 ms).

Finding the active pairs is the other cost: one comparison writes a [B, F] byte mask (a quarter
of the product's size: it stays in the 32 MB L3 here), and torch.nonzero then scans that mask
eight bytes at a time (`_positive`), with no ReLU pass over the product; measured 14 -> 12 ms per
batch on two threads. Gathers use index_select, 1.7x faster than advanced indexing at these
sizes, and the W_enc gradient is transposed in tiles of rows (3.6 -> 1.9 ms for [4608, 576]).
The dense path is the five plain matmuls, with reused [B, F] scratch blocks (`scratch`).
On a CPU with bf16 dot products the sparse kernel's active pairs may come from a bf16 screen
instead of the fp32 product (kdtool/sae/screen.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as nnf

if TYPE_CHECKING:  # pragma: no cover
    from kdtool.sae.model import SparseAutoencoder

#: Rows of the [F, d] W_enc gradient per tile of the CPU transpose (`transposed`).
TRANSPOSE_TILE = 256


@dataclass
class StepStats:
    """What one forward/backward saw, summed over the batch (tensors: no device sync needed)."""

    tokens: int
    sse: torch.Tensor  # sum over tokens of ||x - x_hat||^2
    sst: torch.Tensor  # sum over tokens of ||x - mean_batch(x)||^2 (for explained variance)
    l1_sum: torch.Tensor  # sum over tokens and features of z
    fires: torch.Tensor  # [F] int64: tokens on which each feature was active
    sparse: bool  # which kernel ran
    screened: bool = False  # the sparse kernel's active pairs came from the bf16 screen (kdtool/sae/screen.py)

    @property
    def nnz(self) -> torch.Tensor:
        return self.fires.sum()


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None, out: torch.Tensor | None = None) -> torch.Tensor:
    if dtype is None:
        return torch.mm(a, b, out=out) if out is not None else a @ b
    return (a.to(dtype) @ b.to(dtype)).float()


#: Reused [B, F]-sized scratch memory, one flat block per role, shared by every SAE.
#: Why: a fresh tensor of more than 32 MB is a new mmap whose pages fault in on first touch;
#: measured on this CPU, allocating the [B, F] blocks cost as much as a third of the step.
#: Each block grows to the largest shape asked for and smaller shapes are views of its start, so
#: SAEs of different widths trained side by side (train-sae --expansion 4,8,16) reuse it instead
#: of reallocating at every SAE, and hold the largest SAE's blocks only.
_WORKSPACE: dict = {}


def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or like.dtype
    key = (name, dtype, like.device)
    n = math.prod(shape)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        _WORKSPACE.pop(key, None)  # free the smaller block before allocating the larger one
        buf = _WORKSPACE[key] = torch.empty(n, dtype=dtype, device=like.device)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free the scratch tensors (each is rebuilt when a kernel next asks for it).

    kernel_choice calls it after timing both kernels, so that a run keeps only the blocks of the
    kernel it then runs (the dense kernel's dz and active blocks are [B, F] fp32 each).
    """
    _WORKSPACE.clear()


def encoder_product(sae: SparseAutoencoder, xc: torch.Tensor, matmul_dtype: torch.dtype | None) -> torch.Tensor:
    """pre = xc @ W_enc + b_enc: [B, F] (fp32; a scratch buffer in fp32 mode). Shared by both kernels."""
    if matmul_dtype is not None:
        return _mm(xc, sae.W_enc, matmul_dtype).add_(sae.b_enc)
    return torch.addmm(sae.b_enc, xc, sae.W_enc, out=scratch("pre", (xc.shape[0], sae.d_sae), xc))


def _finish(sae: SparseAutoencoder, G: torch.Tensor, g_benc: torch.Tensor) -> None:
    sae.b_enc.grad = g_benc
    # b_pre enters twice: + after decoding, - before encoding
    sae.b_pre.grad = G.sum(dim=0) - sae.W_enc @ g_benc


def _sumsq(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of all elements, without a temporary (a dot product)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _sst(x: torch.Tensor) -> torch.Tensor:
    return _sumsq(x - x.mean(dim=0))


def dense_grads(
    sae: SparseAutoencoder,
    x: torch.Tensor,  # [B, d]
    xc: torch.Tensor,  # [B, d] = x - b_pre
    pre: torch.Tensor,  # [B, F] = xc @ W_enc + b_enc; overwritten
    l1: float,
    matmul_dtype: torch.dtype | None = None,
) -> StepStats:
    """The step with plain matmuls over the whole [B, F] block."""
    B = x.shape[0]
    F = sae.d_sae
    z = pre.relu_()  # [B, F], in place (z > 0 <=> pre > 0)
    if matmul_dtype is None:
        x_hat = torch.addmm(sae.b_pre, z, sae.W_dec)  # [B, d]
    else:
        x_hat = _mm(z, sae.W_dec, matmul_dtype).add_(sae.b_pre)
    e = x_hat.sub_(x)  # [B, d] x_hat - x
    sse = _sumsq(e)
    G = e.mul_(2.0 / B)  # dL/dx_hat, in place
    reuse = matmul_dtype is None
    dz = _mm(G, sae.W_dec.t(), matmul_dtype, out=scratch("dz", (B, F), x) if reuse else None)  # [B, F]
    dz.add_(l1 / B)
    # 1.0 where z > 0: a float mask (a bool one costs 3x more in conversions)
    active = torch.sign(z, out=scratch("active", (B, F), x)) if reuse else torch.sign(z)
    dz.mul_(active)
    fires = active.sum(dim=0)  # exact in float32 for B < 2^24
    sae.W_dec.grad = _mm(z.t(), G, matmul_dtype)  # [F, d]
    sae.W_enc.grad = _mm(xc.t(), dz, matmul_dtype)  # [d, F]
    _finish(sae, G, dz.sum(dim=0))
    return StepStats(tokens=B, sse=sse, sst=_sst(x), l1_sum=z.sum(), fires=fires.to(torch.int64), sparse=False)


def _positive(flat: torch.Tensor) -> torch.Tensor:
    """Indices of the entries > 0 of a flat float32 tensor, ascending (CPU)."""
    n = flat.numel()
    mask = word_mask(flat)
    torch.gt(flat, 0, out=mask[:n])  # NaN and -0.0 are not active
    return true_indices(mask)


def word_mask(flat: torch.Tensor) -> torch.Tensor:
    """A reused bool scratch block for `flat`'s mask, padded with False to whole int64 words."""
    n = flat.numel()
    mask = scratch("mask", (-(-n // 8) * 8,), flat, dtype=torch.bool)
    mask[n:].fill_(False)
    return mask


def true_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a flat bool mask of whole int64 words (`word_mask`), ascending.

    Two levels: nonzero over the mask viewed as int64 words (eight entries each) finds the words
    holding a True entry, then nonzero over just those words' bytes. torch's nonzero costs about a
    nanosecond per element scanned on this CPU, so an eighth of the elements is an eighth of the scan.
    """
    words = mask.view(torch.int64)
    hit = words.nonzero().squeeze(1)  # [n_hit] words with an active entry
    k = words.index_select(0, hit).view(torch.bool).nonzero().squeeze(1)  # [nnz] bytes of those words
    return hit.index_select(0, k >> 3).mul_(8).add_(k & 7)


def active_pairs(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The active pairs of z = ReLU(pre): (flat index b * F + j [nnz] int64, z value [nnz]), row-major.

    On CPU `pre` is left as it is (`_positive` reads a mask); on a GPU ReLU is applied in place and
    nonzero runs in one pass.
    """
    flat = pre.view(-1)
    if pre.device.type != "cpu":
        z = flat.relu_()
        idx = z.nonzero().squeeze(1)
        return idx, z[idx]
    idx = _positive(flat)
    return idx, flat.index_select(0, idx)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """t.t() as a contiguous tensor; on CPU copied in tiles of rows, which stay in cache."""
    if t.device.type != "cpu":
        return t.t().contiguous()
    out = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype)
    for i in range(0, t.shape[0], TRANSPOSE_TILE):
        out[:, i : i + TRANSPOSE_TILE].copy_(t[i : i + TRANSPOSE_TILE].t())
    return out


def sparse_grads(
    sae: SparseAutoencoder,
    x: torch.Tensor,  # [B, d]
    xc: torch.Tensor,  # [B, d] = x - b_pre
    pairs: tuple[torch.Tensor, torch.Tensor],  # `active_pairs` of the encoder's product, or kdtool/sae/screen.py's
    l1: float,
) -> StepStats:
    """The step on the active pairs only: weighted row bags (embedding_bag) and sampled dot products."""
    B, F = x.shape[0], sae.d_sae
    idx, vals = pairs  # [nnz] each, row-major (token, then latent): flat index b * F + j, and z there
    tok64 = idx.div(F, rounding_mode="floor")
    # int32 token and latent ids: embedding_bag's kernels ran up to 1.6x faster with them than with int64
    tok = tok64.to(torch.int32)  # [nnz] token of each pair
    lat = (idx - tok64 * F).to(torch.int32)  # [nnz] latent of each pair
    crow = torch._convert_indices_from_coo_to_csr(tok, B, out_int32=True)  # [B + 1] where each token's pairs start
    W_dec = sae.W_dec.detach()
    x_hat = nnf.embedding_bag(lat, W_dec, crow[:-1], mode="sum", per_sample_weights=vals)  # [B, d] = z W_dec
    e = x_hat.add_(sae.b_pre).sub_(x)  # [B, d] x_hat - x
    sse = _sumsq(e)
    G = e.mul_(2.0 / B)  # dL/dx_hat, in place
    # per latent: its pairs' tokens and z (a stable sort keeps tokens ascending within a latent)
    order = torch.argsort(lat, stable=True)  # [nnz]
    fires = torch.bincount(lat, minlength=F)  # [F] int64
    ccol = torch.cat([fires.new_zeros(1), fires.cumsum(0)]).to(torch.int32)  # [F + 1] where each latent's pairs start
    tok_by_lat = tok.index_select(0, order)  # [nnz]
    z_by_lat = vals.index_select(0, order)  # [nnz]
    with warnings.catch_warnings():  # torch warns that CSR support is "in beta" on every construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        zt = torch.sparse_csr_tensor(ccol, tok_by_lat, z_by_lat, (F, B), check_invariants=False)  # z^T [F, B]
    # dz at the active pairs, latent-major: (W_dec G^T)[j, b] + l1 / B (a sampled product: SDDMM)
    dz = torch.sparse.sampled_addmm(zt, W_dec, G.t(), beta=0.0).values().add_(l1 / B)  # [nnz]
    sae.W_dec.grad = nnf.embedding_bag(tok_by_lat, G, ccol[:-1], mode="sum", per_sample_weights=z_by_lat)  # [F, d]
    dW_enc_t = nnf.embedding_bag(tok_by_lat, xc, ccol[:-1], mode="sum", per_sample_weights=dz)  # [F, d]
    # [d, F], contiguous: torch's fused Adam (checkpoint.make_optimizer) reads a grad as if it had its
    # parameter's strides, so a transposed view trained W_enc on scrambled gradients (issue 15's kernel
    # shipped that way: the demo's SAE reached L0 227 / EV 0.61 instead of 141 / 0.82 with the dense kernel)
    sae.W_enc.grad = transposed(dW_enc_t)
    # per-latent sums of dz in a fixed order (index_add_ would use atomics, in any order, on a GPU)
    g_benc = torch.segment_reduce(dz, "sum", offsets=ccol.long()) if dz.numel() else torch.zeros_like(sae.b_enc)
    _finish(sae, G, g_benc)
    return StepStats(tokens=B, sse=sse, sst=_sst(x), l1_sum=vals.sum(), fires=fires, sparse=True)
