"""The paper's sparse autoencoder (section 5.1, appendix D), its loss and the L1 controller.

    xc    = x - b_pre                       [B, d]   pre-encoder bias, subtracted before encoding
    pre   = xc @ W_enc + b_enc              [B, F]
    z     = ReLU(pre)                       [B, F]
    x_hat = z @ W_dec + b_pre               [B, d]   ... and added back after decoding
    loss  = mean_b ( ||x_b - x_hat_b||^2 + lambda * sum_j z_bj )

The L1 term is summed over features and averaged over the batch (the authors' code took the
mean over features, which made lambda 32x weaker than stated: field-notes). Rows of W_dec (the
paper's decoder columns) are kept at unit norm: the gradient component parallel to each row is
removed before the step and the rows are renormalised after it. Master weights and Adam state
are fp32; `matmul_dtype=bfloat16` runs the big products in bf16 on a GPU.

Gradients are written by hand instead of autograd because only the encoder's forward product
needs the dense [B, F] matrix: the decoder and every gradient touch only the active (token,
feature) pairs, a few percent of F at the sparsity SAEs reach (EleutherAI sparsify's idea).
`kernel="sparse"` computes them with CSR kernels; `"dense"` with plain matmuls; `"auto"` picks
sparse on CPU when the batch's density is below SPARSE_BELOW (measured by scripts/bench/train_sae).
Both give the same numbers up to float rounding (tests/test_sae.py checks them against autograd).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch

Kernel = Literal["auto", "dense", "sparse"]

#: auto kernel: CSR kernels when the fraction of active (token, feature) pairs is below this.
#: On a 2-core CPU the sparse step wins below about 5% density (scripts/bench/train_sae).
SPARSE_BELOW = 0.05

#: Safetensors names, SAELens layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec (= b_pre).
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class SparseAutoencoder(torch.nn.Module):
    """ReLU SAE with a pre-encoder bias and unit-norm decoder rows. Parameters are fp32."""

    def __init__(self, d_in: int, d_sae: int, *, device: str | torch.device = "cpu"):
        super().__init__()
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        f32 = {"device": device, "dtype": torch.float32}
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae, **f32))  # [d, F]
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, **f32))  # [F]
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in, **f32))  # [F, d], unit-norm rows
        self.b_pre = torch.nn.Parameter(torch.zeros(d_in, **f32))  # [d]

    @classmethod
    def initialise(
        cls, d_in: int, d_sae: int, *, seed: int, device: str | torch.device = "cpu", b_pre: torch.Tensor | None = None
    ) -> SparseAutoencoder:
        """Random unit-norm decoder rows, W_enc = W_dec^T (tied init), b_enc = 0, b_pre given (e.g. a batch mean).

        The random numbers come from a CPU generator so the same seed gives the same SAE on any device.
        """
        sae = cls(d_in, d_sae, device=device)
        gen = torch.Generator().manual_seed(int(seed))
        w = torch.randn(d_sae, d_in, generator=gen)
        w /= w.norm(dim=1, keepdim=True)
        with torch.no_grad():
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w.t())
            if b_pre is not None:
                sae.b_pre.copy_(b_pre)
        return sae

    # ---- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = ReLU((x - b_pre) W_enc + b_enc): [n, d] -> [n, F]."""
        return torch.addmm(self.b_enc, x - self.b_pre, self.W_enc).relu_()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = z W_dec + b_pre: [n, F] -> [n, d]."""
        return torch.addmm(self.b_pre, z, self.W_dec)

    # ---- decoder constraint ----------------------------------------------------------------
    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder row to unit norm (after each optimizer step)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min(torch.finfo(torch.float32).tiny))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (before the step)."""
        g = self.W_dec.grad
        if g is not None:
            g -= (g * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec

    def tensors(self) -> dict[str, torch.Tensor]:
        """The SAELens-named tensors (b_dec is the pre-encoder bias), on CPU."""
        return {
            "W_enc": self.W_enc.detach().cpu(),
            "b_enc": self.b_enc.detach().cpu(),
            "W_dec": self.W_dec.detach().cpu(),
            "b_dec": self.b_pre.detach().cpu(),
        }

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.W_enc.copy_(tensors["W_enc"])
        self.b_enc.copy_(tensors["b_enc"])
        self.W_dec.copy_(tensors["W_dec"])
        self.b_pre.copy_(tensors["b_dec"])


@dataclass
class StepStats:
    """What one forward/backward saw, summed over the batch (tensors: no device sync needed)."""

    tokens: int
    sse: torch.Tensor  # sum over tokens of ||x - x_hat||^2
    sst: torch.Tensor  # sum over tokens of ||x - mean_batch(x)||^2 (for explained variance)
    l1_sum: torch.Tensor  # sum over tokens and features of z
    fires: torch.Tensor  # [F] int64: tokens on which each feature was active
    sparse: bool  # which kernel ran

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


def _buffer(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    key = (name, like.dtype, like.device)
    n = math.prod(shape)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        _WORKSPACE.pop(key, None)  # free the smaller block before allocating the larger one
        buf = _WORKSPACE[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def release_workspace() -> None:
    """Free the scratch tensors (they are rebuilt on the next step)."""
    _WORKSPACE.clear()


def loss_value(sae: SparseAutoencoder, x: torch.Tensor, l1: float) -> torch.Tensor:
    """The paper's loss with autograd: mean over the batch of ||x - x_hat||^2 + l1 * sum_j z_j.

    Reference implementation (slow, dense); the training step computes the same gradients by hand.
    """
    z = torch.relu((x - sae.b_pre) @ sae.W_enc + sae.b_enc)
    x_hat = z @ sae.W_dec + sae.b_pre
    return ((x - x_hat) ** 2).sum(dim=1).mean() + l1 * z.abs().sum(dim=1).mean()


@torch.no_grad()
def forward_backward(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    l1: float,
    *,
    kernel: Kernel = "auto",
    matmul_dtype: torch.dtype | None = None,
) -> StepStats:
    """Compute the loss's gradients into sae.<param>.grad and return the batch's statistics.

    x: [B, d_in] float32 on the SAE's device. The gradients are those of
    mean_b(||x_b - x_hat_b||^2 + l1 * sum_j z_bj), exactly (see `loss_value`).
    """
    B = x.shape[0]
    F = sae.d_sae
    xc = x - sae.b_pre  # [B, d]
    if matmul_dtype is None:
        pre = torch.addmm(sae.b_enc, xc, sae.W_enc, out=_buffer("pre", (B, F), x))  # [B, F]
    else:
        pre = _mm(xc, sae.W_enc, matmul_dtype).add_(sae.b_enc)
    z = pre.relu_()  # in place: pre is not needed again (z > 0 <=> pre > 0)
    use_sparse = kernel == "sparse"
    if kernel == "auto" and x.device.type == "cpu":
        use_sparse = int(torch.count_nonzero(z)) < SPARSE_BELOW * B * F
    sst = (x - x.mean(dim=0)).pow(2).sum()
    if use_sparse:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            zc = z.to_sparse_csr()  # [B, F] CSR: per token, its active features
            zt = _buffer("zt", (F, B), x).copy_(z.t()).to_sparse_csr()  # [F, B] CSR: per feature, its tokens
        del z, pre
        x_hat = torch.sparse.mm(zc, sae.W_dec).add_(sae.b_pre)  # [B, d]
        e = x_hat.sub_(x)  # [B, d] x_hat - x
        G = e * (2.0 / B)  # dL/dx_hat
        # dL/dz at the active pairs only: (G W_dec^T)[b, j] + l1 / B, sampled on the transposed pattern
        dzt = torch.sparse.sampled_addmm(zt, sae.W_dec, G.t(), beta=0.0)  # [F, B] CSR
        vals = dzt.values()
        vals.add_(l1 / B)
        sae.W_dec.grad = torch.sparse.mm(zt, G)  # [F, d] = z^T G
        sae.W_enc.grad = torch.sparse.mm(dzt, xc).t().contiguous()  # [d, F] = xc^T dz
        crow = dzt.crow_indices()
        g_benc = torch.segment_reduce(vals, "sum", offsets=crow) if vals.numel() else torch.zeros_like(sae.b_enc)
        fires = zt.crow_indices().diff()
        l1_sum = zc.values().sum()
    else:
        x_hat = (
            torch.addmm(sae.b_pre, z, sae.W_dec)
            if matmul_dtype is None
            else _mm(z, sae.W_dec, matmul_dtype).add_(sae.b_pre)
        )
        e = x_hat.sub_(x)
        G = e * (2.0 / B)
        scratch = matmul_dtype is None
        dz = _mm(G, sae.W_dec.t(), matmul_dtype, out=_buffer("dz", (B, F), x) if scratch else None)  # [B, F]
        dz.add_(l1 / B)
        # 1.0 where z > 0: a float mask (a bool one costs 3x more in conversions)
        active = torch.sign(z, out=_buffer("active", (B, F), x)) if scratch else torch.sign(z)
        dz.mul_(active)
        fires = active.sum(dim=0)  # exact in float32 for B < 2^24
        sae.W_dec.grad = _mm(z.t(), G, matmul_dtype)  # [F, d]
        sae.W_enc.grad = _mm(xc.t(), dz, matmul_dtype)  # [d, F]
        g_benc = dz.sum(dim=0)
        l1_sum = z.sum()
    sae.b_enc.grad = g_benc
    sae.b_pre.grad = G.sum(dim=0) - sae.W_enc @ g_benc  # b_pre enters twice: + after decoding, - before encoding
    return StepStats(
        tokens=B, sse=e.pow(2).sum(), sst=sst, l1_sum=l1_sum, fires=fires.to(torch.int64), sparse=use_sparse
    )


@dataclass
class L1Controller:
    """lambda for each step: fixed, or steered toward a target L0 (the paper's trial C).

    Proportional control on the running L0 (an exponential moving average of the batch L0):
        log lambda += rate * log(L0_running / target)      after each step past warmup.
    Working in logs keeps lambda positive, makes the same rate work at any scale of activations,
    and bounds the first steps (L0 starts near d_sae / 2, far above any target: a linear error
    there grew lambda so fast that it killed most latents before L0 could respond).
    During `warmup_steps` the applied lambda ramps linearly from 0 to its value (the controller
    only watches L0 there).
    """

    l1: float  # current lambda (fixed value, or the controller's state)
    target_l0: float | None = None  # None: fixed lambda
    rate: float = 0.01  # proportional gain on log(L0 / target), per step
    warmup_steps: int = 0  # linear lambda ramp
    ema: float = 0.9  # decay of the running L0
    l0_running: float | None = None

    def __post_init__(self):
        if not (self.l1 >= 0 and math.isfinite(self.l1)):
            raise ValueError(f"--l1 must be a finite number >= 0, got {self.l1}")
        if self.target_l0 is not None:
            if not self.target_l0 > 0:
                raise ValueError(f"--target-l0 must be > 0, got {self.target_l0}")
            if not self.l1 > 0:
                raise ValueError("--target-l0 needs a starting --l1 > 0 (the controller scales it)")
        if not 0 <= self.ema < 1:
            raise ValueError(f"L0 running-average decay must be in [0, 1), got {self.ema}")

    def value(self, step: int) -> float:
        """The lambda applied at `step` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.l1 * (step + 1) / self.warmup_steps
        return self.l1

    def update(self, l0: float, step: int) -> None:
        """Feed the batch L0 seen at `step`; adapts lambda when a target is set."""
        self.l0_running = l0 if self.l0_running is None else self.ema * self.l0_running + (1 - self.ema) * l0
        if self.target_l0 is not None and step >= self.warmup_steps:
            err = math.log(max(self.l0_running, 1e-3) / self.target_l0)
            self.l1 *= math.exp(self.rate * err)

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> L1Controller:
        return cls(**state)
