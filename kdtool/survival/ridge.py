"""The affine map from a student's residual stream into the teacher's: ridge least squares, streamed.

A student has its own basis, so before the teacher's SAE can read a student's layer-L activation
x_t [d_S] it is mapped to the teacher's space by the affine map that best predicts the teacher's
activation y_t [d_T] at the same token:

    minimise over W [d_S, d_T], b [d_T]:   sum_t ||x_t W + b - y_t||^2  +  lam ||W||_F^2

The bias is not penalised, so the solution is the centred one:

    W = (S_xx + lam I)^-1 S_xy,     b = mean(y) - mean(x) W

with S_xx = sum_t (x_t - mean x)(x_t - mean x)^T [d_S, d_S] and S_xy likewise [d_S, d_T]: scatter
matrices (sums, not means). They come from running sums of x, y, x^T x and x^T y, so the fit
streams over any number of tokens in memory O(d_S (d_S + d_T)), and ends in one solve (plus one per
candidate ridge with --ridge auto, each on the sums, never on the tokens again).

lam is given relative to the data: lam = ridge * tr(S_xx) / d_S, i.e. `ridge` times the mean
eigenvalue of the student's scatter matrix, so a value means the same at any activation scale and
token count; ridge = 0 is ordinary least squares (minimum-norm through a pseudo-inverse when S_xx
is singular, e.g. a student with a dead dimension).

By default (ridge None, `--ridge auto`) it is chosen on held-out rows of the fit split: the rows
carry a fold (0 = fit, 1 = validation; stream.py puts every VALIDATE_EVERY-th sequence in fold 1),
each ridge of RIDGE_GRID is fitted on fold 0 and scored by the r2 of its predictions on fold 1
(computed exactly from fold 1's sums), and the best is refitted on both folds. Why: a student's
scatter spectrum spans many decades, and on the embedded SmolLM2 a fixed 1e-3 let a 20-step
width-256 student's map overfit: r2 0.23 on the tokens it was fitted on, -0.34 on others. The
chosen ridge and every candidate's validation r2 are recorded.

Sums are float64: residual streams have large means (SmolLM2: some dimensions near 100 with a
spread near 1), and the centring S_xx = x^T x - n mean mean^T cancels most of x^T x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdtool.errors import BadInput

#: Every VALIDATE_EVERY-th sequence of the fit split is held out to choose the ridge (--ridge auto; stream.py).
VALIDATE_EVERY = 5
#: Relative ridges tried by --ridge auto, each scored on the validation fold.
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class AffineMap:
    """y_hat = x W + b: a student's activations [n, d_S] to the teacher's space [n, d_T]."""

    W: Any  # [d_S, d_T] float32
    b: Any  # [d_T] float32
    penalty: float = 0.0  # the absolute lam used (0 for the identity)
    ridge: float | None = None  # the relative ridge it came from (None for the identity)
    validation: dict = field(default_factory=dict)  # --ridge auto: {ridge: r2 on the validation fold}

    def __call__(self, x):
        return torch.addmm(self.b, x, self.W)  # [n, d_T]

    @classmethod
    def identity(cls, d: int, device="cpu") -> AffineMap:
        return cls(torch.eye(d, device=device), torch.zeros(d, device=device))


class _Sums:
    """Sums over a set of rows: n, sum x [d_S], sum y [d_T], x^T x, x^T y and sum ||y||^2 (float64)."""

    def __init__(self, d_in: int, d_out: int, device):
        f64 = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.x = torch.zeros(d_in, **f64)
        self.y = torch.zeros(d_out, **f64)
        self.xx = torch.zeros(d_in, d_in, **f64)
        self.xy = torch.zeros(d_in, d_out, **f64)
        self.yy = 0.0

    def add(self, x64, y64) -> None:
        self.n += int(x64.shape[0])
        self.x += x64.sum(dim=0)
        self.y += y64.sum(dim=0)
        self.xx += x64.T @ x64
        self.xy += x64.T @ y64
        self.yy += float(y64.square().sum())

    def merged(self, other: _Sums) -> _Sums:
        out = _Sums(self.x.numel(), self.y.numel(), self.x.device)
        out.n, out.yy = self.n + other.n, self.yy + other.yy
        out.x, out.y, out.xx, out.xy = self.x + other.x, self.y + other.y, self.xx + other.xx, self.xy + other.xy
        return out

    def solve(self, ridge: float) -> tuple[Any, Any, float]:
        """(W, b, absolute lam) of the ridge problem on these rows."""
        mean_x, mean_y = self.x / self.n, self.y / self.n
        s_xx = self.xx - self.n * torch.outer(mean_x, mean_x)  # [d_S, d_S]
        s_xy = self.xy - self.n * torch.outer(mean_x, mean_y)  # [d_S, d_T]
        s_xx = (s_xx + s_xx.T) / 2  # exactly symmetric despite rounding
        d = s_xx.shape[0]
        penalty = float(ridge * torch.trace(s_xx).clamp(min=0) / d)
        a = s_xx + penalty * torch.eye(d, dtype=torch.float64, device=s_xx.device)
        if penalty > 0:
            W = torch.linalg.solve(a, s_xy)
        else:  # ordinary least squares; the minimum-norm solution when S_xx is singular
            W = torch.linalg.pinv(a, hermitian=True) @ s_xy
        return W, mean_y - mean_x @ W, penalty

    def r2(self, W, b) -> float:
        """1 - sum ||x W + b - y||^2 / sum ||y - mean y||^2 over these rows, from the sums alone."""
        sse = (
            float(((self.xx @ W) * W).sum())  # sum ||x W||^2
            + 2 * float(b @ (W.T @ self.x))
            + self.n * float(b @ b)
            - 2 * float((W * self.xy).sum())
            - 2 * float(b @ self.y)
            + self.yy
        )
        sst = self.yy - float(self.y @ self.y) / self.n
        return 1.0 - sse / sst if sst > 0 else float("nan")


class RidgeFit:
    """Running sums for one (student, layer) map, in two folds; `add` batches of aligned rows, then `solve` once."""

    def __init__(self, d_in: int, d_out: int, device="cpu"):
        self.d_in, self.d_out = d_in, d_out
        self.folds = (_Sums(d_in, d_out, device), _Sums(d_in, d_out, device))  # 0: fit, 1: validation

    @property
    def n(self) -> int:
        return self.folds[0].n + self.folds[1].n

    def add(self, x, y, fold: int = 0) -> None:
        """x [n, d_S], y [n, d_T]: the student's and the teacher's activations at the same n tokens."""
        if x.shape[0] != y.shape[0] or x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise BadInput(
                f"ridge map: rows {tuple(x.shape)} and {tuple(y.shape)} do not match d_S={self.d_in}, d_T={self.d_out}"
            )
        self.folds[fold].add(x.double(), y.double())

    def solve(self, ridge: float | None) -> AffineMap:
        """The ridge map on all rows; ridge None: chosen on the validation fold (module docstring)."""
        if ridge is not None and ridge < 0:
            raise BadInput(f"--ridge must be >= 0 or auto, got {ridge}")
        if self.n < 2:
            raise BadInput(f"ridge map: {self.n} token(s) to fit on; give more --tokens or a larger --fit-fraction")
        validation = {}
        if ridge is None:
            fit, held = self.folds
            if fit.n < 2 or held.n < 2:
                raise BadInput(
                    f"--ridge auto: {fit.n} fit and {held.n} validation token(s) (every {VALIDATE_EVERY}th fit "
                    "sequence is held out to choose the ridge); give more --tokens or a --ridge value"
                )
            for r in RIDGE_GRID:
                W, b, _ = fit.solve(r)
                validation[r] = held.r2(W, b)
            ridge = max(RIDGE_GRID, key=lambda r: (validation[r], r))  # ties: the larger, more stable ridge
        W, b, penalty = self.folds[0].merged(self.folds[1]).solve(ridge)
        return AffineMap(W.float(), b.float(), penalty=penalty, ridge=float(ridge), validation=validation)
