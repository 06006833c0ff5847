"""The students of one run: one per (width, loss), each with its AdamW, its schedule and its maps.

Every student of a width starts from the same weights (seeded per (seed, width), whatever its loss),
so the losses are compared from one initialisation; the maps of the hidden and features losses start
at zero (kdtool/distill/matching.py says why). Each student has its own optimizer and schedule: several (width,
loss) students in one run follow exactly the trajectories they would follow alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdtool.distill import students as st
from kdtool.distill.config import DistillConfig
from kdtool.distill.features import FeaturePlan, check_teacher, kept_positions
from kdtool.distill.files import load_checkpoint, save_checkpoint
from kdtool.distill.matching import Student
from kdtool.distill.objectives import LossSpec, StudentKey
from kdtool.distributed import Dist
from kdtool.errors import BadInput
from kdtool.models import check_layers


def lr_factor(step: int, *, warmup: int, steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Progress:
    """Where a run stands: what a checkpoint saves and --resume restores."""

    step: int = 0  # optimizer steps done (= training batches consumed)
    tokens: int = 0  # real training tokens seen, over all ranks
    rows: list[dict] = field(default_factory=list)  # curves.parquet rows so far


@dataclass
class AuxTargets:
    """The teacher's side of the matching terms for one chunk, computed once for every student."""

    hidden: dict[int, torch.Tensor]  # {L: teacher hidden_states[L] [b, S, d_T]}
    latents: torch.Tensor | None  # [b, S, F_max] the chosen SAE latents (features loss), else None
    kept: torch.Tensor | None  # [b, S] bool: the positions the features term counts, else None


def hidden_layers(cfg: DistillConfig, n_layers: int) -> list[int]:
    """The layers --loss hidden matches: --hidden-layers, else the teacher's middle layer (n_layers // 2)."""
    if not any(s.name == "hidden" for s in cfg.specs):
        return []
    return check_layers(cfg.hidden_layers or [n_layers // 2], n_layers, "--hidden-layers")


class Students:
    """One student per (width, loss) of cfg.students, each with its AdamW and its warmup + cosine schedule."""

    def __init__(self, cfg: DistillConfig, teacher_config, device, plan: FeaturePlan | None = None):
        self.cfg, self.plan = cfg, plan
        d_teacher, n_layers = st.teacher_width(teacher_config), int(teacher_config.num_hidden_layers)
        self.specs: dict[str, LossSpec] = {s.label: s for s in cfg.specs}
        self.hidden_layers = hidden_layers(cfg, n_layers)
        if plan is not None:
            check_teacher(plan, d_teacher, n_layers)
            plan.to(device)
        self.modules: dict[StudentKey, Student] = {}
        for key in cfg.students:
            lm = st.build_student(teacher_config, key.width, cfg.policy, seed=cfg.seed)
            self.modules[key] = Student(lm, self.layers_of(key), d_teacher).to(device)
        self.models = {k: m.lm for k, m in self.modules.items()}  # the LMs: evaluated and saved as HF folders
        self.optims = {
            k: torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
            for k, m in self.modules.items()
        }

        def factor(s):
            return lr_factor(s, warmup=cfg.warmup, steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)

        self.scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in self.optims.items()}
        self.train: dict[StudentKey, torch.nn.Module] = dict(self.modules)  # what the backward passes go through

    def layers_of(self, key: StudentKey) -> list[int]:
        """The layers whose residual stream this student maps to the teacher's (none for output-only losses)."""
        matching = self.specs[key.loss].matching
        if matching == "hidden":
            return self.hidden_layers
        if matching == "features":
            return [self.plan.layer]
        return []

    @property
    def teacher_layers(self) -> list[int]:
        """The teacher's hidden_states the matching terms read (empty: the teacher runs as before)."""
        layers = set(self.hidden_layers) | ({self.plan.layer} if self.plan is not None else set())
        return sorted(layers)

    def aux_targets(self, hidden: dict[int, torch.Tensor], mask: torch.Tensor) -> AuxTargets:
        """The teacher's side of every matching term of one chunk (the SAE encodes once for all widths)."""
        if self.plan is None:
            return AuxTargets(hidden, None, None)
        h = hidden[self.plan.layer]
        return AuxTargets(hidden, self.plan.latents(h), kept_positions(h, mask))

    def objective(self, key: StudentKey) -> dict:
        """What a student trained on, as its kdtool.json records it."""
        spec = self.specs[key.loss]
        out: dict = {"loss": spec.label, "divergence": spec.divergence, "temperature": self.cfg.temperature}
        if spec.name == "jsd":
            out["beta"] = spec.beta
        if spec.matching == "hidden":
            out |= {"layers": self.hidden_layers, "weight": self.cfg.hidden_weight, "map_file": "residual_map"}
        if spec.matching == "features":
            out |= {"weight": self.cfg.feature_weight, "features": self.plan.describe(key.width)}
        return out

    def restore(self, out: Path | None, device, emit: Callable[[dict], None]) -> Progress:
        """Load out/checkpoint (models, maps, optimizers, schedules, RNG) for --resume; a fresh start without one."""
        if out is None:
            raise BadInput("--resume needs an output folder")
        state = load_checkpoint(out, self.cfg, self.modules, self.optims, self.scheds, device)
        if state is None:
            emit({"event": "fresh", "reason": f"no checkpoint in {out / 'checkpoint'}"})
            return Progress()
        emit({"event": "resumed", "step": state["step"]})
        return Progress(state["step"], state["tokens_seen"], state["curves"])

    def wrap(self, d: Dist) -> None:
        """Under torchrun, train through DDP wrappers (made after a resume: DDP starts from rank 0's weights)."""
        if d.world > 1:
            self.train = {k: torch.nn.parallel.DistributedDataParallel(m) for k, m in self.modules.items()}

    def save(self, out: Path, p: Progress, d: Dist) -> None:
        """Write out/checkpoint (rank 0): every student's state and where the run stands."""
        save_checkpoint(out, self.cfg, self.modules, self.optims, self.scheds, p.step, p.tokens, p.rows, d)

    def step(self) -> tuple[dict[StudentKey, float], dict[StudentKey, float]]:
        """Clip, step and zero every student's optimizer, advance its schedule: (lr used, gradient norm) per student."""
        norms, lrs = {}, {}
        for k, module in self.modules.items():
            lrs[k] = self.scheds[k].get_last_lr()[0]
            if self.cfg.grad_clip > 0:
                norms[k] = float(torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.grad_clip))
            self.optims[k].step()
            self.scheds[k].step()
            self.optims[k].zero_grad(set_to_none=True)
        return lrs, norms
