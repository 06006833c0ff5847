"""Distillation losses, named so nobody confuses them (paper section 6, Table 3).

For teacher logits t and student logits s over a vocabulary of V, at temperature T:
    p = softmax(t / T), q = softmax(s / T)
    kl      per-token KL(p || q) in nats, averaged over real (non-padding) tokens.
            This is the paper's "per-token KL" and what kdtool calls the floor (1.320 at d_S=128).
    scaled  T^2 * kl: Hinton et al.'s scaling that keeps gradients comparable across T;
            it is what the student is trained on.
    raw     T^2 * (KL summed over a sequence's positions), averaged over sequences: the paper's
            "raw KL" (2,703 at d_S=128 = 1.320 x 512 x 4). The authors' code got it from
            reduction="batchmean" on [B, S, V]; kdtool computes it explicitly.
    ce      the student's next-token cross-entropy on the data at T=1 (nats/token).

Top-k targets (kdtool.teacher_cache) keep the teacher's k most likely tokens at T plus the
remaining mass r_p. Their KL is computed over k+1 bins (the k tokens and "everything else"),
which by the data-processing inequality is a lower bound of the full KL:
    KL_k = sum_{i in top-k} p_i (log p_i - log q_i) + r_p (log r_p - log r_q)
where r_q is the student's mass outside the teacher's top k (computed exactly, not as 1 - sum).

The other output divergences `distill --loss` trains on (kdtool/distill/objectives.py), per position:
    reverse-kl  KL(q || p) = sum_v q_v (log q_v - log p_v)
    jsd(beta)   beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (Agarwal et al. 2024,
                TRL's GKD convention: beta = 0 is exactly forward KL, 1 exactly reverse KL, as TRL computes)
    tvd         1/2 sum_v |p_v - q_v|
On top-k targets the same tail bucket serves tvd (1/2 (sum_top |p_i - q_i| + |r_p - r_q|)) and
jsd:0 (= KL_k): like KL_k they are f-divergences of the coarsened distributions, so lower bounds of
the full ones. reverse-kl and jsd with beta > 0 refuse top-k targets (see LossSpec.needs_full_distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FullTarget:
    """Teacher log-probs at T over the whole vocabulary."""

    logp: torch.Tensor  # [B, S, V] float32

    def rows(self, lo: int, hi: int) -> FullTarget:
        return FullTarget(self.logp[lo:hi])

    def to(self, device) -> FullTarget:
        return FullTarget(self.logp.to(device))

    def nbytes(self) -> int:
        return self.logp.numel() * self.logp.element_size()


@dataclass
class TopKTarget:
    """The teacher's top-k token ids and log-probs at T, and the log of the remaining mass."""

    ids: torch.Tensor  # [B, S, k] int64
    logp: torch.Tensor  # [B, S, k] float32
    log_rest: torch.Tensor  # [B, S] float32, log(1 - sum_k p), computed exactly

    def rows(self, lo: int, hi: int) -> TopKTarget:
        return TopKTarget(self.ids[lo:hi], self.logp[lo:hi], self.log_rest[lo:hi])

    def to(self, device) -> TopKTarget:
        return TopKTarget(self.ids.to(device), self.logp.to(device), self.log_rest.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.logp, self.log_rest))

    @staticmethod
    def cat(parts: list[TopKTarget]) -> TopKTarget:
        return TopKTarget(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.logp for p in parts]),
            torch.cat([p.log_rest for p in parts]),
        )


def teacher_target(logits: torch.Tensor, temperature: float, topk: int | None = None) -> FullTarget | TopKTarget:
    """Soften teacher logits [B, S, V] at T; keep all of it, or the top k and the rest mass."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # [B, S, V]
    if topk is None:
        return FullTarget(logp)
    vocab = logp.shape[-1]
    if not 0 < topk < vocab:
        raise ValueError(f"topk must be in [1, {vocab - 1}] for a vocabulary of {vocab}")
    top, ids = logp.topk(topk, dim=-1)  # [B, S, k]
    log_rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)  # [B, S]
    return TopKTarget(ids, top, log_rest)


def kl_per_token(student_logits: torch.Tensor, target: FullTarget | TopKTarget, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at T for every position: [B, S] nats (padding not yet masked)."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, S, V]
    if isinstance(target, FullTarget):
        p = target.logp.exp()
        # p * (log p - log q), with 0 where p underflows to 0 (avoids 0 * -inf)
        return torch.where(p > 0, p * (target.logp - logq), torch.zeros_like(p)).sum(-1)
    logq_k = logq.gather(-1, target.ids)  # [B, S, k]
    logq_rest = logq.scatter(-1, target.ids, float("-inf")).logsumexp(-1)  # [B, S], finite since k < V
    p_k = target.logp.exp()
    head = (p_k * (target.logp - logq_k)).sum(-1)
    rest = target.log_rest.exp() * (target.log_rest - logq_rest)  # r_p underflow -> 0 * finite = 0
    return head + rest


def reverse_kl_per_token(student_logits: torch.Tensor, target: FullTarget, temperature: float) -> torch.Tensor:
    """KL(student || teacher) at T for every position: [B, S] nats."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, S, V]
    q = logq.exp()
    return torch.where(q > 0, q * (logq - target.logp), torch.zeros_like(q)).sum(-1)


def jsd_per_token(student_logits: torch.Tensor, target: FullTarget, temperature: float, beta: float) -> torch.Tensor:
    """Generalised JSD(beta) at T for every position: [B, S] nats (beta 1: reverse KL, as TRL; beta 0, forward
    KL, is sent to kl_per_token by divergence_per_token, which also serves top-k targets)."""
    if beta == 1.0:
        return reverse_kl_per_token(student_logits, target, temperature)
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, S, V]
    logp = target.logp
    # log m = log(beta p + (1 - beta) q), computed in log space
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))  # [B, S, V]
    p, q = logp.exp(), logq.exp()
    to_p = torch.where(p > 0, p * (logp - logm), torch.zeros_like(p)).sum(-1)  # KL(p || m)
    to_q = torch.where(q > 0, q * (logq - logm), torch.zeros_like(q)).sum(-1)  # KL(q || m)
    return beta * to_p + (1.0 - beta) * to_q


def tvd_per_token(student_logits: torch.Tensor, target: FullTarget | TopKTarget, temperature: float) -> torch.Tensor:
    """Total variation 1/2 sum |p - q| at T for every position: [B, S] (top-k: over the k+1 bins)."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, S, V]
    if isinstance(target, FullTarget):
        return 0.5 * (target.logp.exp() - logq.exp()).abs().sum(-1)
    q_k = logq.gather(-1, target.ids).exp()  # [B, S, k]
    r_q = logq.scatter(-1, target.ids, float("-inf")).logsumexp(-1).exp()  # [B, S]
    head = (target.logp.exp() - q_k).abs().sum(-1)
    return 0.5 * (head + (target.log_rest.exp() - r_q).abs())


def divergence_per_token(
    name: str, student_logits: torch.Tensor, target: FullTarget | TopKTarget, temperature: float, beta: float = 0.0
) -> torch.Tensor:
    """The output divergence `name` (kl, reverse-kl, jsd, tvd) at T for every position: [B, S] nats."""
    if name == "kl" or (name == "jsd" and beta == 0.0):
        return kl_per_token(student_logits, target, temperature)
    if name == "tvd":
        return tvd_per_token(student_logits, target, temperature)
    if isinstance(target, TopKTarget):
        raise ValueError(f"{name} needs the teacher's full distribution, not top-k targets")
    if name == "reverse-kl":
        return reverse_kl_per_token(student_logits, target, temperature)
    if name == "jsd":
        return jsd_per_token(student_logits, target, temperature, beta)
    raise ValueError(f"unknown divergence {name!r}")


def ce_per_token(student_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """Next-token cross-entropy: ([B, S-1] nats, [B, S-1] bool mask of positions that count)."""
    logits = student_logits[:, :-1].float()  # [B, S-1, V]
    labels = tokens[:, 1:]
    valid = mask[:, :-1] & mask[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return ce.view(labels.shape), valid


@dataclass
class LossSums:
    """Sums that make the named values once divided, and that add across chunks and ranks.

    In training, kl_sum is NaN for a student whose loss computes no forward KL (reverse-kl, jsd, tvd:
    no extra full-vocabulary pass for a diagnostic); loss_sum is always its own divergence, aux_sum
    its hidden/features term (NaN when it has none). In evaluation every student's kl_sum is the KL.
    """

    kl_sum: float = 0.0  # sum of per-token KL at T over real tokens
    tokens: float = 0.0  # real tokens
    ce_sum: float = 0.0
    ce_tokens: float = 0.0
    sequences: float = 0.0  # sequences with at least one real token
    loss_sum: float = 0.0  # sum of the student's own output divergence per token at T
    aux_sum: float = 0.0  # sum of its matching term per token (hidden / features)

    FIELDS = ("kl_sum", "tokens", "ce_sum", "ce_tokens", "sequences", "loss_sum", "aux_sum")

    def add(self, other: LossSums) -> None:
        for k in self.FIELDS:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, k) for k in self.FIELDS], dtype=torch.float64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> LossSums:
        v = t.tolist()
        return LossSums(*v)

    def values(self, temperature: float) -> dict[str, float]:
        kl = self.kl_sum / max(self.tokens, 1.0)
        return {
            "kl": kl,
            "kl_scaled": temperature**2 * kl,
            "raw_kl": temperature**2 * self.kl_sum / max(self.sequences, 1.0),
            "ce": self.ce_sum / max(self.ce_tokens, 1.0),
            "loss": self.loss_sum / max(self.tokens, 1.0),
            "aux": self.aux_sum / max(self.tokens, 1.0),
        }
