"""The affine map from a student's residual stream into the teacher's: ridge least squares, streamed.

A student has its own basis, so before the teacher's SAE can read a student's layer-L activation
x_t [d_S] it is mapped to the teacher's space by the affine map that best predicts the teacher's
activation y_t [d_T] at the same token:

    minimise over W [d_S, d_T], b [d_T]:   sum_t ||x_t W + b - y_t||^2  +  lam ||W||_F^2

The bias is not penalised, so the solution is the centred one:

    W = (S_xx + lam I)^-1 S_xy,     b = mean(y) - mean(x) W

with S_xx = sum_t (x_t - mean x)(x_t - mean x)^T [d_S, d_S] and S_xy likewise [d_S, d_T]: scatter
matrices (sums, not means). They come from running sums of x, y, x^T x and x^T y, so the fit
streams over any number of tokens in memory O(d_S (d_S + d_T)), and ends in ONE solve.

lam is given relative to the data: lam = ridge * tr(S_xx) / d_S, i.e. `ridge` times the mean
eigenvalue of the student's scatter matrix. That makes one default work at any activation scale
and token count; ridge = 0 is ordinary least squares (minimum-norm through a pseudo-inverse when
S_xx is singular, e.g. a student with a dead dimension). Sums are float64: residual streams have
large means (SmolLM2: some dimensions near 100 with a spread near 1), and the centring
S_xx = x^T x - n mean mean^T cancels most of x^T x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdtool.errors import BadInput


@dataclass
class AffineMap:
    """y_hat = x W + b: a student's activations [n, d_S] to the teacher's space [n, d_T]."""

    W: Any  # [d_S, d_T] float32
    b: Any  # [d_T] float32
    penalty: float = 0.0  # the absolute lam used (0 for the identity)
    ridge: float = 0.0  # the relative ridge it came from

    def __call__(self, x):
        return torch.addmm(self.b, x, self.W)  # [n, d_T]

    @classmethod
    def identity(cls, d: int, device="cpu") -> AffineMap:
        return cls(torch.eye(d, device=device), torch.zeros(d, device=device))


class RidgeFit:
    """Running sums for one (student, layer) map; `add` batches of aligned rows, then `solve` once."""

    def __init__(self, d_in: int, d_out: int, device="cpu"):
        f64 = {"dtype": torch.float64, "device": device}
        self.d_in, self.d_out = d_in, d_out
        self.n = 0
        self.sum_x = torch.zeros(d_in, **f64)  # [d_S]
        self.sum_y = torch.zeros(d_out, **f64)  # [d_T]
        self.xx = torch.zeros(d_in, d_in, **f64)  # [d_S, d_S]
        self.xy = torch.zeros(d_in, d_out, **f64)  # [d_S, d_T]

    def add(self, x, y) -> None:
        """x [n, d_S], y [n, d_T]: the student's and the teacher's activations at the same n tokens."""
        if x.shape[0] != y.shape[0] or x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise BadInput(
                f"ridge map: rows {tuple(x.shape)} and {tuple(y.shape)} do not match d_S={self.d_in}, d_T={self.d_out}"
            )
        x64, y64 = x.double(), y.double()
        self.n += int(x.shape[0])
        self.sum_x += x64.sum(dim=0)
        self.sum_y += y64.sum(dim=0)
        self.xx += x64.T @ x64
        self.xy += x64.T @ y64

    def solve(self, ridge: float) -> AffineMap:
        """The ridge solution above (BadInput with fewer than two rows or a negative ridge)."""
        if ridge < 0:
            raise BadInput(f"--ridge must be >= 0, got {ridge}")
        if self.n < 2:
            raise BadInput(f"ridge map: {self.n} token(s) to fit on; give more --tokens or a larger --fit-fraction")
        mean_x, mean_y = self.sum_x / self.n, self.sum_y / self.n
        s_xx = self.xx - self.n * torch.outer(mean_x, mean_x)  # [d_S, d_S]
        s_xy = self.xy - self.n * torch.outer(mean_x, mean_y)  # [d_S, d_T]
        s_xx = (s_xx + s_xx.T) / 2  # exactly symmetric despite rounding
        penalty = float(ridge * torch.trace(s_xx).clamp(min=0) / self.d_in)
        a = s_xx + penalty * torch.eye(self.d_in, dtype=torch.float64, device=s_xx.device)
        if penalty > 0:
            W = torch.linalg.solve(a, s_xy)
        else:  # ordinary least squares; the minimum-norm solution when S_xx is singular
            W = torch.linalg.pinv(a, hermitian=True) @ s_xy
        b = mean_y - mean_x @ W
        return AffineMap(W.float(), b.float(), penalty=penalty, ridge=float(ridge))
