"""The paper's toy model (section 4, Experiment 1): its data, initialisation, forward pass and loss.

Toy model (Elhage et al. 2022): x in R^n with x_i = 0 w.p. alpha, else U[0,1];
    h = W x (W: [d, n]);  x_hat = ReLU(W^T h + b);  loss = sum_i I_i (x_i - x_hat_i)^2, batch mean,
with I_i = i^-s (Zipf). A teacher of width d_T is trained on the data; students of every width
d_S = 1..d_T are then distilled from it (target = teacher x_hat) or trained on the data
(kdtool.toy.trainer trains them; kdtool.toy.predictions gives Eq. 2's floors for them).

Determinism: every random draw comes from a generator keyed by (base seed, n, d_T, alpha,
seed, purpose, width), never by a model's position in a batch, so a model trains identically
alone (`trainer.train_reference`, plain autograd + torch.optim) or in any batch or group
(`trainer.train_groups`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kdtool.theory import theorem as theory
from kdtool.toy.config import ToyConfigKey

_PURPOSE = {"teacher-data": 1, "student-data": 2, "eval": 3, "init": 4}


def generator_seed(base_seed: int, key: ToyConfigKey, seed: int, purpose: str, width: int = 0) -> int:
    """A 63-bit torch seed from everything that identifies a draw (never a batch position)."""
    alpha_key = int(round(key.alpha * 1_000_000_000))
    ss = np.random.SeedSequence([base_seed, key.n, key.d_teacher, alpha_key, seed, _PURPOSE[purpose], width])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def importance(n: int, exponent: float = 1.0) -> torch.Tensor:
    """I_i = i^-s as a float32 torch tensor [n]."""
    return torch.from_numpy(theory.zipf_weights(n, exponent)).float()


def data_stream(seed: int) -> np.random.Generator:
    """The generator of one data stream (numpy PCG64: half the cost per float of torch's CPU mt19937, measured)."""
    return np.random.Generator(np.random.PCG64(int(seed)))


def sparsify_(u, inv_keep):
    """Uniforms -> toy data in place: x = u / (1-alpha) where u < 1-alpha, else 0.

    One uniform per entry: P(u < p) = p = 1-alpha, and u/p given u < p is U[0,1).
    `inv_keep` is 1/(1-alpha) as float32 (a scalar tensor or [S, 1, 1]). Done as scale by -1/p,
    threshold at -1, negate: no boolean mask, 9x faster than multiplying by one (measured); dropped
    entries come out as -0.0, which every later product and sum treats as 0.
    """
    u.mul_(-inv_keep)
    F.threshold_(u, -1.0, 0.0)
    return u.neg_()


def sample(rng: np.random.Generator, batch: int, n: int, alpha: float):
    """One fresh batch [batch, n] of toy data from a data stream (`data_stream`)."""
    u = torch.from_numpy(rng.random((batch, n), dtype=np.float32))
    return sparsify_(u, torch.tensor(1.0 / (1.0 - alpha), dtype=torch.float32))


def init_weights(d: int, n: int, seed: int):
    """Xavier-normal W [d, n] (std sqrt(2/(n+d))) from its own generator; b = 0 [n]."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d, n, generator=gen) * math.sqrt(2.0 / (n + d))
    return W, torch.zeros(n)


def forward(W, b, x):
    """Reference forward for one model: W [d, n], b [n], x [B, n] -> x_hat [B, n]."""
    return torch.relu((x @ W.T) @ W + b)


def weighted_sq(imp, y, t):
    """Mean over the batch of sum_i I_i (y_i - t_i)^2 (last two dims [B, n])."""
    return ((y - t).square() * imp).sum(-1).mean(-1)
