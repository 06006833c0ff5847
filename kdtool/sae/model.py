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
kdtool/sae/kernels.py has both kernels: "sparse" (weighted row bags and sampled dot products on
the active pairs) and "dense" (plain matmuls); "auto" runs the one kdtool/sae/kernel_choice.py
measured to be faster for this SAE on this machine. Both give the same numbers up to float
rounding (tests/test_sae.py checks them against autograd).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from kdtool.sae.kernel_choice import KernelChoice
from kdtool.sae.kernels import StepStats, active_pairs, dense_grads, encoder_product, sparse_grads
from kdtool.sae.screen import screened_pairs

Kernel = Literal["auto", "dense", "sparse"]
Screen = Literal["auto", "on", "off"]

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
        self.kernel_choice = KernelChoice()  # what --kernel auto measured for this SAE (saved in checkpoints)

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
        norms = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True)  # [F, 1] (8x faster than .norm here)
        self.W_dec.div_(norms.clamp_min(torch.finfo(torch.float32).tiny))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (before the step)."""
        g = self.W_dec.grad
        if g is not None:  # g -= (g . w) w per row, without [F, d] temporaries (3x faster than the plain form)
            g.addcmul_(self.W_dec, torch.linalg.vecdot(g, self.W_dec).unsqueeze(1), value=-1.0)

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
    screen: Screen = "auto",
) -> StepStats:
    """Compute the loss's gradients into sae.<param>.grad and return the batch's statistics.

    x: [B, d_in] float32 on the SAE's device. The gradients are those of
    mean_b(||x_b - x_hat_b||^2 + l1 * sum_j z_bj), exactly (see `loss_value`), from the dense or
    the sparse kernel (kdtool/sae/kernels.py); auto asks `sae.kernel_choice` (kdtool/sae/kernel_choice.py),
    which also decides, from the previous step's density, whether the sparse kernel finds its active
    pairs with the bf16 screen (kdtool/sae/screen.py) or from the fp32 product.
    """
    choice = sae.kernel_choice
    if kernel == "auto":
        use_sparse = choice.decide(sae, x, l1, matmul_dtype=matmul_dtype, screen_mode=screen)
    else:
        use_sparse = kernel == "sparse"
    xc = x - sae.b_pre  # [B, d]
    if use_sparse and matmul_dtype is None and choice.screens(sae, xc, screen):
        st = sparse_grads(sae, x, xc, screened_pairs(sae, xc)[0], l1)
        st.screened = True
    else:
        pre = encoder_product(sae, xc, matmul_dtype)  # [B, F]
        if use_sparse:
            st = sparse_grads(sae, x, xc, active_pairs(pre), l1)
        else:
            st = dense_grads(sae, x, xc, pre, l1, matmul_dtype)
    choice.density = int(st.nnz) / (x.shape[0] * sae.d_sae)
    return st


@torch.no_grad()
def apply_gradients(sae: SparseAutoencoder, opt: torch.optim.Optimizer, grad_clip: float) -> None:
    """The update after `forward_backward`, in the trainer's order: keep the decoder's gradient
    tangent to its unit rows, clip the gradient norm, step Adam, renormalise the rows."""
    sae.project_decoder_grad()
    clip_grad_norm(list(sae.parameters()), grad_clip)
    opt.step()
    sae.normalise_decoder()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ (same numbers), without its multiply by 1.0 when nothing is clipped, on CPU.

    Why: that multiply reads and writes every gradient, 1-2 ms of a 170 ms sparse step on the 2-core
    CPU. Skipping it needs the norm on the host; on a GPU that would be a sync per step, so torch's
    own runs there. A non-finite norm multiplies, as torch does (the gradients become NaN).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or grads[0].device.type != "cpu":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = max_norm / (total + 1e-6)  # torch's formula, in float32
    if not float(coef) >= 1.0:
        for g in grads:
            g.mul_(coef)


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
