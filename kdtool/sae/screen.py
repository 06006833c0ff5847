"""The sparse kernel's active pairs without the encoder's fp32 product: a bf16 screen, then fp32 on its candidates.

Why: at 1% active the encoder's dense [B, F] product is two thirds of a sparse step, and only the
pairs with pre = xc . W_enc[:, j] + b_enc[j] > 0 are used after it. On a CPU with bf16 dot
products (AVX512-BF16, AMX) a bf16 product runs 2.3x faster than the fp32 one (measured on the
2-core EPYC: 56 against 127 ms for [4096, 576] x [576, 4608]). The screen finds a superset of the
active pairs from it, with a margin that bounds bf16's error; the candidates' pre-activations are
then computed in fp32 (a sampled product, as the step's dL/dz is) and the positive ones kept. So
the pairs and their z are fp32 numbers, like the dense product's up to float rounding (a pair
within rounding of zero may fall either way, as between the two kernels).

The bound. Scale each token's row by N_b = ||xc_b|| and each latent's column by M_j = ||W_enc[:, j]||:

    q_bj = (xc_b / N_b) . (W_j / M_j) + b_j / (N_b M_j) = pre_bj / (N_b M_j)

Rounding the two unit vectors to bf16 (unit roundoff u = 2^-9) changes each product of the dot by
at most (2u + u^2) of its size, and their sizes sum to at most 1 (Cauchy-Schwarz), so the bf16
product is within (2u + u^2) of q, plus fp32 accumulation (K * 2^-24 per unit of the sizes' sum).
The bias term enters exactly to u^2: 1/N_b and b_j/M_j are split into bf16 high and low parts and
all four cross products summed. So with

    needed_b = 1.1 (2u + 2u^2) + 2^-12 (1 + max_j |b_j| / M_j / N_b)

(the second term covers the accumulation and the fp32 reference's own rounding: 2^-12 is about
4x them at K = 592), every pair with pre > 0 has q_bj > -needed_b. The margin alpha_b >= 1.25
needed_b enters the product itself (a column of alpha_b against a row of ones), so a candidate is
q'_bj = q_bj + alpha_b > 0: one comparison of the bf16 result's bits as int16 (a bf16 number is
> 0 iff its bits are, as an int16), with a quarter of the margin between the bound and zero.
About 1.4x the active pairs pass at 1% density (the benchmark's batch: 271K candidates for 189K active).

The bound assumes what bf16 matmuls do on CPUs (exact products, fp32 sums). `check` tests it on a
real batch against the fp32 product before the first use (kdtool/sae/kernel_choice.py), and a
backend that breaks it is not used.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from kdtool.sae.kernels import scratch, transposed, true_indices, word_mask

if TYPE_CHECKING:  # pragma: no cover
    from kdtool.sae.model import SparseAutoencoder

U = 2.0**-9  # bf16 unit roundoff (round to nearest)
#: inner dimension of the screen's product: d, four bias columns, the margin, padded to a multiple of this
K_MULTIPLE = 16
_TINY = torch.finfo(torch.float32).tiny


def _hi_lo(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v as the sum of two bf16 numbers, exact to about u^2 of |v|."""
    hi = v.to(torch.bfloat16)
    return hi, (v - hi.float()).to(torch.bfloat16)


def needed_margin(N: torch.Tensor, M: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """[B] the bound on |bf16 screen - pre / (N M)| per token (see the module docstring)."""
    beta = (b_enc.abs() / M).max() / N
    return 1.1 * (2 * U + 2 * U * U) + 2.0**-12 * (1 + beta)


def _norms(xc: torch.Tensor, W_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms N [B] and latent norms M [F], floored at 1e-6 of their largest (a zero row would overflow the
    bias columns). Any N_b >= ||xc_b|| keeps the bound: the sign of pre / (N M) is pre's, and the
    unit-vector sum is then <= 1."""
    N = torch.linalg.vector_norm(xc, dim=1)
    M = torch.linalg.vector_norm(W_t, dim=1)  # rows of W_enc^T: contiguous
    return N.clamp_min_(max(float(N.max()) * 1e-6, _TINY)), M.clamp_min_(max(float(M.max()) * 1e-6, _TINY))


def screen_product(sae: SparseAutoencoder, xc: torch.Tensor, W_t: torch.Tensor, margin: bool = True) -> torch.Tensor:
    """[B, F] bf16: q'_bj = pre_bj / (N_b M_j) + alpha_b (0 with margin=False). W_t: W_enc.t(), contiguous."""
    B, d = xc.shape
    F = sae.d_sae
    b = sae.b_enc.detach()
    N, M = _norms(xc, W_t)  # [B], [F]
    K = -(-(d + 5) // K_MULTIPLE) * K_MULTIPLE
    X = torch.zeros(B, K, dtype=torch.bfloat16, device=xc.device)  # [B, K]
    torch.div(xc, N[:, None], out=X[:, :d])
    inv_hi, inv_lo = _hi_lo(1.0 / N)
    X[:, d], X[:, d + 1], X[:, d + 2], X[:, d + 3] = inv_hi, inv_hi, inv_lo, inv_lo
    if margin:  # rounded up: bf16 rounding moves it by at most 2^-9 of itself, less than the 1.25 spare
        X[:, d + 4] = (1.25 * (1 + 2.0**-7) * needed_margin(N, M, b)).to(torch.bfloat16)
    Wn = torch.zeros(K, F, dtype=torch.bfloat16, device=xc.device)  # [K, F]
    torch.div(sae.W_enc.detach(), M, out=Wn[:d])
    b_hi, b_lo = _hi_lo(b / M)
    Wn[d], Wn[d + 1], Wn[d + 2], Wn[d + 3] = b_hi, b_lo, b_hi, b_lo
    Wn[d + 4] = 1.0
    # into reused scratch: a fresh [B, F] block is a new mmap whose pages fault in (13 ms of 70 here)
    return torch.mm(X, Wn, out=scratch("screen", (B, F), X))


def screened_pairs(sae: SparseAutoencoder, xc: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """((flat index b * F + j, z) of the active pairs, row-major, as `kernels.active_pairs`), number of candidates."""
    B, F = xc.shape[0], sae.d_sae
    W_t = transposed(sae.W_enc.detach())  # [F, d]: the candidates' dot products read its rows
    q = screen_product(sae, xc, W_t).view(-1)
    mask = word_mask(q)
    torch.gt(q.view(torch.int16), 0, out=mask[: q.numel()])  # a bf16 number is > 0 iff its bits are
    cand = true_indices(mask)  # [n_cand] ascending
    tok64 = cand.div(F, rounding_mode="floor")
    lat = cand - tok64 * F
    crow = torch._convert_indices_from_coo_to_csr(tok64.to(torch.int32), B, out_int32=True)
    with warnings.catch_warnings():  # torch warns that CSR support is "in beta" on every construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, lat.to(torch.int32), torch.zeros(cand.numel(), device=xc.device), (B, F), check_invariants=False
        )
    # fp32 pre-activations at the candidates (beta 0: the pattern's zeros are ignored)
    pre = torch.sparse.sampled_addmm(pattern, xc, W_t.t(), beta=0.0).values()
    pre.add_(sae.b_enc.detach().index_select(0, lat))
    keep = (pre > 0).nonzero().squeeze(1)
    return (cand.index_select(0, keep), pre.index_select(0, keep)), cand.numel()


def check(sae: SparseAutoencoder, xc: torch.Tensor, pre: torch.Tensor) -> str | None:
    """None if the screen's bound holds on this batch against its fp32 product `pre` (with b_enc); else why not.

    Two checks: the screen without its margin is within the bound of pre / (N M) on every pair
    (plus bf16's rounding of the result), and every pair with pre > 0 is a candidate.
    """
    W_t = transposed(sae.W_enc.detach())
    N, M = _norms(xc, W_t)
    q = screen_product(sae, xc, W_t, margin=False).float()
    err = (q - pre / N[:, None] / M[None, :]).abs_()
    allowed = needed_margin(N, M, sae.b_enc.detach())[:, None] + U * q.abs()
    worst = float((err / allowed).max())
    if not worst <= 1.0:
        return f"its bf16 product was off by {worst:.3g}x the bound"
    passed = screen_product(sae, xc, W_t).view(-1).view(torch.int16) > 0
    if not bool(passed[pre.view(-1) > 0].all()):
        return "a pair active in the fp32 product was not a candidate"
    return None
