"""Feature-prioritised distillation (`--loss features`): keep the teacher's most important SAE features.

The paper's authors propose "feature prioritisation": when width is constrained, use the SAE
importance distribution so that the high-value features are the ones preserved. kdtool's own
version of it (no published recipe exists): with a teacher SAE at layer L (`--sae`, any layout
kdtool.sae.layouts reads) and its `kdtool stats` file (`--stats`), the student's layer-L residual
stream goes through a learned map r: d_S -> d_T (kdtool/distill/matching.py) and the SAE encoder's
pre-activation of each chosen feature i is asked to reproduce the teacher's latent z_i:

    x   = rms(h_T) r(n(h_S))                           (the student's mapped stream, at the teacher's
                                                          per-token RMS: matching.py explains n and rms)
    u_i = e_i . (x - b_dec) + b_enc_i                   (its pre-activation; b_dec only if the SAE
                                                          subtracts it from its input)
    err_i = u_i - z_i        where the teacher fires (z_i > 0): the gradient reaches a feature the
                             student has not learnt yet (through ReLU(u_i) it would get none)
          = ReLU(u_i)        where it does not: firing costs, staying below zero does not
    features = sum_{i in S} w_i err_i^2 / sum_{i in S} w_i I_i      per real token

S = the F_S alive features of highest importance I_i = E[z_i^2]: `--feature-budget auto` =
floor(d_S g(alpha)) (Eq. 2's budget, alpha from the stats file, per width), a number, or `all`.
w_i = I_i (`--feature-weighting importance`, the default) or 1 (`uniform`). The denominator is what
predicting zero costs on average (E[z_i^2] = I_i), so 1 = "reproduces none of S", whatever the
SAE's units. Note that Eq. 2 already charges a dropped feature I_i when every err_i counts
equally (uniform); importance weighting leans further toward the top of S.

Which positions count: as `cache-acts` keeps them by default (the activations SAEs are trained and
measured on), not position 0 of a packed sequence and not a position whose teacher norm is above
MAX_NORM_RATIO x its sequence's median ("massive activations": SmolLM2's first position has ~170x
the median norm; through the SAE it gave the demo a term of 132,000 at that one position and a mean
near 967 instead of 1.6). The median is per sequence, so micro-batching does not change the mask.

Latents are in the stats file's units: when it folded the decoder norms (`decoder_norm: fold`,
kdtool/sae/stats.py) and they are not 1, err_i and z_i are multiplied by ||W_dec[i]|| too.
For TopK and groupmax SAEs the teacher's z comes from the full encoder (its own top k); for ReLU
and JumpReLU only the chosen columns are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtool import formats, kinds
from kdtool.distill.matching import rms
from kdtool.distill.objectives import check_feature_options
from kdtool.errors import BadInput
from kdtool.sae.layouts import LoadedSAE, load_sae
from kdtool.theory import importance as imp
from kdtool.theory import theorem

#: positions whose teacher norm exceeds this x their sequence's median are left out (cache-acts' default)
MAX_NORM_RATIO = 50.0


def kept_positions(h_teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, S] bool: the real positions the features term counts (not position 0, no massive norm)."""
    norms = h_teacher.float().norm(dim=-1)  # [b, S]
    real = mask.bool().clone()
    real[:, 0] = False
    masked = torch.where(real, norms, torch.full_like(norms, float("nan")))
    median = masked.nanmedian(dim=1, keepdim=True).values  # [b, 1]; NaN for a row with no position left
    return real & (norms <= MAX_NORM_RATIO * median)


@dataclass
class FeaturePlan:
    """The chosen features of one run: which SAE latents, their importances, each width's budget."""

    layer: int  # residual-stream layer L (hidden_states[L]) of the SAE
    sae: LoadedSAE
    ids: torch.Tensor  # [F_max] SAE latent indices, most important first (the longest budget's prefix)
    importance: torch.Tensor  # [F_max] I_i of those latents (stats file units)
    scale: torch.Tensor | None  # [F_max] ||W_dec[i]|| when the stats file folded non-unit norms, else None
    budgets: dict[int, int]  # width -> F_S (the first F_S of ids)
    weighting: str  # importance | uniform
    info: dict  # what kdtool.json records: sae, stats, alpha, g, alive

    @classmethod
    def load(cls, sae_path, stats_path, widths: list[int], budget: str, weighting: str) -> FeaturePlan:
        """Read the SAE and its stats file and choose each width's features (BadInput on any mismatch)."""
        budget, weighting = check_feature_options(budget, weighting)
        kinds.expect(sae_path, "kdtool.sae", "--sae")  # a foreign layout records no kind: load_sae checks it
        kinds.expect(stats_path, "kdtool.stats", "--stats")
        if not Path(stats_path).exists():
            raise BadInput(f"--stats {stats_path}: no such file")
        sae = load_sae(sae_path)
        layers = imp.from_stats(stats_path)
        layer = sae.layer
        if layer is None:
            if len({x.layer for x in layers}) != 1:
                have = ", ".join(sorted({str(x.layer) for x in layers}))
                raise BadInput(f"--sae {sae_path}: says no layer and --stats {stats_path} has several ({have})")
            layer = layers[0].layer
        li = imp.entry_of_sae(layers, layer, sae_path, stats_path)
        if li.features is None or int(li.features.max()) >= sae.d_sae:
            raise BadInput(f"--stats {stats_path}: features beyond the SAE's d_sae={sae.d_sae}: not this SAE's stats")
        g = imp.capacity_g(li.alpha)
        alive = li.n_features
        budgets = {}
        for w in widths:
            if budget == "auto":
                budgets[w] = int(theorem.features_kept(np.array([w]), g, alive)[0])
            else:
                budgets[w] = alive if budget == "all" else min(int(budget), alive)
        if min(budgets.values()) < 1:
            raise BadInput(f"--feature-budget: width {min(budgets, key=budgets.get)} keeps no feature (g = {g:.3g})")
        top = max(budgets.values())
        ids = torch.as_tensor(li.features[:top].copy(), dtype=torch.long)
        norms = sae.W_dec.norm(dim=1)[ids]
        unit = torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-4)
        folded = _decoder_norm(Path(stats_path)) == "fold"
        info = {
            "sae": str(sae_path),
            "stats": str(stats_path),
            "layer": int(layer),
            "alpha": li.alpha,
            "g": g,
            "alive": alive,
            "budget": budget,
            "weighting": weighting,
        }
        imp_t = torch.as_tensor(li.weights[:top].copy(), dtype=torch.float32)
        return cls(int(layer), sae, ids, imp_t, None if (unit or not folded) else norms, budgets, weighting, info)

    def __post_init__(self) -> None:
        self._select()

    def _select(self) -> None:
        """The chosen encoder columns, gathered once: [d_T, F_max] and [F_max]."""
        self._w_enc = self.sae.W_enc[:, self.ids].contiguous()
        self._b_enc = self.sae.b_enc[self.ids]
        self._threshold = None if self.sae.threshold is None else self.sae.threshold[self.ids]

    def to(self, device) -> FeaturePlan:
        self.sae = self.sae.to(device)
        self.ids, self.importance = self.ids.to(device), self.importance.to(device)
        self.scale = None if self.scale is None else self.scale.to(device)
        self._select()
        return self

    def describe(self, width: int) -> dict:
        """The record of one student's chosen features (kdtool.json `objective.features`)."""
        k = self.budgets[width]
        return self.info | {"kept": k, "features": self.ids[:k].tolist()}

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pre-activations of the chosen latents: x [n, d_T] -> [n, F_max]."""
        sae = self.sae
        xin = x - sae.b_dec if sae.apply_b_dec_to_input else x
        return xin @ self._w_enc + self._b_enc

    def latents(self, h_teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's latents z of the chosen features: [b, S, d_T] -> [b, S, F_max] (no gradient)."""
        sae = self.sae
        with torch.no_grad():
            x = h_teacher.float().reshape(-1, h_teacher.shape[-1])  # [n, d_T]
            if sae.activation == "relu":
                z = self._pre(x).relu()
            elif sae.activation == "jumprelu":
                pre = self._pre(x)
                z = (pre * (pre > self._threshold)).relu()
            else:  # topk / groupmax: which latents fire depends on all of them
                z = sae.encode(x)[:, self.ids]
        return z.reshape(*h_teacher.shape[:-1], -1)

    def term(self, mapped: torch.Tensor, z: torch.Tensor, h_teacher: torch.Tensor, width: int) -> torch.Tensor:
        """The features term per position for a student of `width`: [b, S].

        mapped [b, S, d_T] = r(n(h_S)); z [b, S, F_max] = latents(h_teacher); h_teacher [b, S, d_T].
        """
        k = self.budgets[width]
        x = mapped.float() * rms(h_teacher)  # [b, S, d_T]: in the teacher's units
        u = self._pre(x.reshape(-1, x.shape[-1]))[:, :k].reshape(*x.shape[:-1], k)
        zk = z[..., :k]
        err = torch.where(zk > 0, u - zk, u.relu())  # [b, S, k]
        imp_k = self.importance[:k]
        if self.scale is not None:
            err = err * self.scale[:k]
        w = imp_k if self.weighting == "importance" else torch.ones_like(imp_k)
        return (err.square() * w).sum(-1) / (w * imp_k).sum().clamp_min(1e-30)


def _decoder_norm(stats: Path) -> str | None:
    """The stats file's `decoder_norm` summary entry (fold or raw), None when it has none."""
    if not formats.is_parquet(stats):
        return None
    summary = formats.parquet_metadata(stats).get("summary")
    value = summary.get("decoder_norm") if isinstance(summary, dict) else None
    return value if isinstance(value, str) else None


def check_teacher(plan: FeaturePlan, d_teacher: int, n_layers: int) -> None:
    """Refuse an SAE that does not read this teacher's residual stream (before any training)."""
    if plan.sae.d_in != d_teacher:
        raise BadInput(f"--sae {plan.info['sae']}: reads d_in={plan.sae.d_in}, the teacher's width is {d_teacher}")
    if not 0 <= plan.layer <= n_layers:
        raise BadInput(f"--sae {plan.info['sae']}: layer {plan.layer} outside the teacher's 0..{n_layers}")
