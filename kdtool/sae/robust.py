"""F_robust, alpha_robust, d*_robust: a feature count that does not grow with the SAE's width.

Why. The paper's F counts latents that fire on more than 1e-5 of the tokens. An SAE's latent count
is a choice of its trainer, and a wider SAE spends its extra latents on copies of features it
already has (feature splitting) and on near-dead latents that fire a handful of times; both count
in F, so F, alpha and d* grow with `--expansion` (docs/sae.md measures it on planted activations:
F = 250 -> 1,032 for 1.25x -> 16x SAEs of K = 200 true features). Three steps, each removing one
of those effects, give a count that stays near K:

1. **De-duplicate** (`cosine`, default 0.9): latents whose decoder rows have cosine >= 0.9 write
   the same direction, so they are one feature; the groups are the connected components of that
   graph (single linkage). A group's activation on a token is h_G = sum of its latents' z
   (residual-stream units; its decoder rows are nearly equal, so this is its coefficient).
2. **Count by importance mass** (`mass`, default 0.99): F_robust = the fewest groups whose
   importance E[h_G^2] sums to 99% of the total. The groups left out carry at most 1% of the
   importance, so they can change Eq. 2's floor at any width by at most 1% of L*(0); near-dead
   latents land there however many of them a wide SAE has.
3. **Count activity by size** (`theta`, default 0.2): a counted feature is active on a token when
   h_G > theta * s_G, s_G = E[h_G^2] / E[h_G] its importance-weighted typical size. An encoder
   fires weakly on tokens where its feature is absent (interference from the features that are
   present: on planted data 40% of a latent's firings, at a median of 1/10 of its typical size),
   and L0 counts those firings like real ones; below 0.2 s_G a firing carries less than 4% of the
   feature's typical squared contribution. 0.2 is the value that kept d*_robust closest to the
   truth over the planted grid of docs/sae.md (bounded and exponential magnitudes; 0.1 overcounts
   where the superposition is dense, 0.3 undercounts exponential magnitudes), not a fit to any
   paper number. L0_robust = mean number of active counted features per token, alpha_robust =
   1 - L0_robust / F_robust, g and d*_robust = F_robust / g(alpha_robust) as the paper defines them.

The paper's F, L0, alpha and d* are kept exactly as defined, beside these. Every choice above
(0.9, 0.99, 0.2) moves the numbers; docs/sae.md shows by how much, and where each estimator fails.

Streaming: step 1 needs only the decoder; steps 2 and 3 need per-group sums of h and h^2 and a
histogram of h per group (log2-spaced bins, a quarter octave wide), so one pass over the tokens
does it with memory independent of their number. The threshold count interpolates inside the bin
that holds theta * s_G (log-uniformly).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kdtool.errors import BadInput
from kdtool.theory import theorem as theory

ROBUST_COSINE = 0.9
ROBUST_MASS = 0.99
ROBUST_THETA = 0.2
#: activation histogram: bin k holds log2(h) in [(k - OFFSET) * WIDTH, (k + 1 - OFFSET) * WIDTH)
BINS, BIN_WIDTH, BIN_OFFSET = 256, 0.25, 128


@dataclass(frozen=True)
class RobustConfig:
    """The three choices of the robust estimator (`kdtool stats --robust-cosine/--robust-mass/--robust-theta`)."""

    cosine: float = ROBUST_COSINE  # decoder rows at least this similar are one feature
    mass: float = ROBUST_MASS  # F_robust = fewest features carrying this share of the importance
    theta: float = ROBUST_THETA  # a feature is active when h > theta * E[h^2] / E[h]

    def __post_init__(self):
        if not (0 < self.cosine <= 1):
            raise BadInput(f"--robust-cosine must be in (0, 1], got {self.cosine}")
        if not (0 < self.mass <= 1):
            raise BadInput(f"--robust-mass must be in (0, 1], got {self.mass}")
        if not (0 <= self.theta < 1):
            raise BadInput(f"--robust-theta must be in [0, 1), got {self.theta}")

    def describe(self) -> dict:
        return {
            "cosine": self.cosine,
            "mass": self.mass,
            "theta": self.theta,
            "definition": "groups = decoder rows with cosine >= cosine (single linkage), h_G = sum of their z; "
            "F_robust = fewest groups with `mass` of sum E[h_G^2]; active iff h_G > theta E[h_G^2]/E[h_G]; "
            "L0_robust = mean active counted groups per token; alpha, g, d* from those (docs/sae.md)",
        }


def dedup_groups(w_dec: torch.Tensor, cosine: float, *, block: int = 4096) -> np.ndarray:
    """[d_sae] group id of each latent: connected components of 'decoder rows have cosine >= `cosine`'.

    w_dec: [d_sae, d_in]. Ids are numbered in order of each group's first latent. Memory: one
    [block, d_sae] similarity block at a time.
    """
    n = int(w_dec.shape[0])
    w = w_dec.detach().float()
    norms = w.norm(dim=1, keepdim=True)  # [F, 1]
    unit = torch.where(norms > 0, w / norms.clamp_min(1e-30), torch.zeros_like(w))  # [F, d]; zero rows stay alone
    rows, cols = [], []
    for start in range(0, n, block):
        sims = unit[start : start + block] @ unit.t()  # [b, F]
        a, b = torch.nonzero(sims >= cosine, as_tuple=True)
        keep = b > a + start  # each pair once, no self-pairs
        rows.append((a[keep] + start).cpu().numpy())
        cols.append(b[keep].cpu().numpy())
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))  # component -> rank of its first latent
    return order[labels].astype(np.int64)


class GroupStats:
    """Streaming sums over tokens for the de-duplicated features of one SAE (see the module docstring)."""

    def __init__(self, groups: np.ndarray, device):
        self.groups = torch.as_tensor(groups, dtype=torch.long, device=device)  # [F] latent -> group
        self.n_groups = int(groups.max()) + 1 if groups.size else 0
        G = self.n_groups
        self.sum_h = torch.zeros(G, dtype=torch.float64, device=device)  # [G]
        self.sum_h2 = torch.zeros(G, dtype=torch.float64, device=device)  # [G]
        self.hist = torch.zeros(G * BINS, dtype=torch.int64, device=device)  # [G x BINS] flattened
        self.tokens = 0

    def update(self, z: torch.Tensor) -> None:
        """z: [n, F] latents (already in residual-stream units)."""
        n = z.shape[0]
        h = torch.zeros(n, self.n_groups, dtype=z.dtype, device=z.device).index_add_(1, self.groups, z)  # [n, G]
        self.tokens += n
        on = h > 0  # only positive h count (ReLU-family latents: h >= 0)
        _, col = torch.nonzero(on, as_tuple=True)  # [nnz]
        vals = h[on]  # [nnz], the same row-major order as nonzero
        v64 = vals.double()  # sums over the nonzero entries only: exact in float64 and cheap when sparse
        self.sum_h.index_add_(0, col, v64)
        self.sum_h2.index_add_(0, col, v64.square())
        b = (torch.log2(vals) / BIN_WIDTH).floor().long().add_(BIN_OFFSET).clamp_(0, BINS - 1)
        self.hist += torch.bincount(col * BINS + b, minlength=self.n_groups * BINS)

    def result(self, cfg: RobustConfig) -> tuple[dict, dict]:
        """(per-latent columns group/group_importance/counted, the SAE's robust summary)."""
        n = self.tokens
        sum_h, sum_h2 = self.sum_h.cpu().numpy(), self.sum_h2.cpu().numpy()
        hist = self.hist.view(self.n_groups, BINS).cpu().numpy()
        importance = sum_h2 / n  # [G] E[h_G^2]
        rank = np.argsort(-importance, kind="stable")  # most important first
        total = float(importance.sum())
        n_counted = 0
        if total > 0:
            share = np.cumsum(importance[rank]) / total
            n_counted = int(min(np.searchsorted(share, cfg.mass - 1e-12) + 1, (importance > 0).sum()))
        counted_groups = rank[:n_counted]
        scale = np.divide(sum_h2, sum_h, out=np.zeros_like(sum_h), where=sum_h > 0)  # [G] s_G
        active = _above(hist[counted_groups], cfg.theta * scale[counted_groups])  # [F_robust] tokens
        l0 = float(active.sum()) / n
        renumber = np.empty(self.n_groups, dtype=np.int64)
        renumber[rank] = np.arange(self.n_groups)
        groups = self.groups.cpu().numpy()
        counted = np.zeros(self.n_groups, dtype=bool)
        counted[counted_groups] = True
        cols = {
            "group": renumber[groups].astype(np.int32),
            "group_importance": importance[groups].astype(np.float64),
            "counted": counted[groups],
        }
        sizes = np.bincount(groups, minlength=self.n_groups)
        fired = sum_h > 0
        summary = {
            "F_robust": n_counted,
            "L0_robust": l0,
            "alpha_robust": None,
            "g_robust": None,
            "d_star_robust": None,
            "groups": int(fired.sum()),  # de-duplicated features that fired at all
            "duplicates": int((sizes[fired] - 1).sum()),  # latents merged into another latent's feature
            "largest_group": int(sizes.max()) if sizes.size else 0,
            "mass_counted": float(importance[counted_groups].sum() / total) if total > 0 else None,
        }
        notes = []
        if n_counted:
            alpha = 1.0 - l0 / n_counted
            summary["alpha_robust"] = alpha
            if 0 < alpha < 1:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    gv = float(theory.g(alpha))
                notes += [f"robust: {w.message}" for w in caught]
                if math.isfinite(gv) and gv > 0:
                    summary["g_robust"], summary["d_star_robust"] = gv, n_counted / gv
        return cols, summary | {"notes": notes}


def _above(hist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[G] tokens with h > threshold per group, from [G, BINS] histograms (log-uniform inside a bin)."""
    if hist.size == 0:
        return np.zeros(0)
    with np.errstate(divide="ignore"):
        pos = np.log2(np.maximum(thresholds, 0)) / BIN_WIDTH + BIN_OFFSET  # fractional bin of the threshold
    k = np.clip(np.floor(pos), -1, BINS).astype(np.int64)  # -1: below every bin; BINS: above
    above_bins = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [G, BINS] tokens in bins >= k
    out = np.zeros(hist.shape[0])
    below = k < 0  # the threshold is below every bin: all of the group's tokens
    out[below] = above_bins[below, 0]
    rows = np.flatnonzero((k >= 0) & (k < BINS))  # inside a bin: the higher bins and part of its own
    kr = k[rows]
    higher = np.where(kr + 1 < BINS, above_bins[rows, np.minimum(kr + 1, BINS - 1)], 0.0)
    out[rows] = higher + hist[rows, kr] * (1.0 - (pos[rows] - kr))
    return out
