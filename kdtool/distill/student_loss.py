"""The loss one student trains on for one chunk, and the sums every student is evaluated by.

Training (per student, spec = its --loss):
    loss = (1 - ce_weight) T^2 D / local tokens  [+ ce_weight CE / local CE positions]
           [+ hidden_weight x FitNets term / local tokens]  [+ feature_weight x features term / local tokens]
(the features term sums over the positions kdtool/distill/features.py counts, the others over real tokens)
where D is the sum over real tokens of the student's output divergence at T (kdtool/distill/losses.py).
T^2 multiplies every divergence (Hinton et al.'s factor for KL), so --lr means the same for each.

Evaluation: every student, whatever it trains on, on the full-vocabulary KL(teacher || student) at T.
"""

from __future__ import annotations

import math

import torch

from kdtool.distill.cohort import AuxTargets, Students
from kdtool.distill.config import DistillConfig
from kdtool.distill.losses import LossSums, ce_per_token, divergence_per_token
from kdtool.distill.matching import hidden_term
from kdtool.distill.objectives import LossSpec, StudentKey

NAN = float("nan")


def output_sums(logits, tokens, mask, target, spec: LossSpec | None, temperature: float):
    """(divergence sum, CE sum, LossSums) of one chunk; spec None = evaluation (forward KL)."""
    name = "kl" if spec is None else spec.divergence
    beta = 0.0 if spec is None else (spec.beta or 0.0)
    div = divergence_per_token(name, logits, target, temperature, beta)  # [b, S]
    m = mask.float()
    div_sum = (div * m).sum()
    ce, valid = ce_per_token(logits, tokens, mask)
    ce_sum = (ce * valid.float()).sum()
    div_value = div_sum.item()  # one device read
    is_kl = name == "kl" or (name == "jsd" and beta == 0.0)  # jsd at beta 0 is forward KL (divergence_per_token)
    sums = LossSums(
        div_value if is_kl else NAN,
        m.sum().item(),
        ce_sum.item(),
        valid.float().sum().item(),
        float((mask.sum(1) > 0).sum().item()),
        div_value,
        NAN,
    )
    return div_sum, ce_sum, sums


def eval_sums(model, tokens, mask, target, cfg: DistillConfig, autocast) -> LossSums:
    """The held-out sums of one student LM on one chunk (KL at T, raw KL, CE)."""
    with autocast():
        logits = model(input_ids=tokens, attention_mask=mask).logits  # [b, S, V]
    return output_sums(logits, tokens, mask, target, None, cfg.temperature)[2]


def train_loss(
    module, key: StudentKey, students: Students, tokens, mask, target, aux: AuxTargets, autocast, denominators
) -> tuple[torch.Tensor, LossSums]:
    """One student's loss on one chunk (for backward) and its sums; denominators = (local tokens, local CE)."""
    cfg = students.cfg
    spec = students.specs[key.loss]
    local_tokens, local_ce = denominators
    with autocast():
        logits, mapped = module(tokens, mask)  # [b, S, V], {L: [b, S, d_T]}
    div_sum, ce_sum, sums = output_sums(logits, tokens, mask, target, spec, cfg.temperature)
    loss = (1 - cfg.ce_weight) * cfg.temperature**2 * div_sum / local_tokens
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * ce_sum / local_ce
    if spec.matching is not None:
        if spec.matching == "hidden":
            term, weight = hidden_term(mapped, aux.hidden, students.hidden_layers), cfg.hidden_weight
            counted = mask
        else:
            plan = students.plan
            term = plan.term(mapped[plan.layer], aux.latents, aux.hidden[plan.layer], key.width)
            weight, counted = cfg.feature_weight, aux.kept
        aux_sum = (term * counted.float()).sum()  # [b, S] -> sum over the positions that count
        loss = loss + weight * aux_sum / local_tokens
        sums.aux_sum = aux_sum.item()
    return loss, sums


def diverged(values: dict[StudentKey, dict], specs: dict[str, LossSpec]) -> list[str]:
    """The students (width/loss) whose training loss, or matching term when they have one, is not finite."""
    bad = []
    for key, v in values.items():
        if not math.isfinite(v["loss"]) or (specs[key.loss].matching and not math.isfinite(v["aux"])):
            bad.append(f"{key.width}/{key.loss}")
    return bad
