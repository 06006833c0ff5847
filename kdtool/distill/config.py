"""The settings of one distillation job (kdtool/distill/loop.py runs it, kdtool/distill/files.py records it).

A leaf module: it imports neither the loop nor its files, so both can import it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kdtool.distill.objectives import LossSpec, StudentKey, check_feature_options, parse_losses
from kdtool.distill.students import StudentPolicy, student_heads
from kdtool.errors import BadInput


@dataclass
class DistillConfig:
    """One distillation job (defaults = the paper's schedule, appendix E)."""

    widths: list[int]  # student hidden widths
    temperature: float = 2.0  # softmax temperature T of teacher and student
    steps: int = 30_000  # optimizer steps
    batch_size: int = 32  # sequences per step (global, across ranks)
    seq_len: int = 512  # tokens per sequence
    micro_batch: int = 0  # rows per forward pass (0 = the whole local batch); gradients accumulate
    lr: float = 3e-4  # peak AdamW learning rate
    min_lr_ratio: float = 0.0  # cosine decays to lr x this (0 = to zero, as transformers' cosine schedule)
    warmup: int = 1000  # linear warmup steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay, on every parameter (torch's default grouping)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (torch defaults; the paper does not say)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm per student (0 = off)
    ce_weight: float = 0.0  # loss = (1-w) T^2 KL + w CE on the data; 0 = pure distillation (paper)
    eval_every: int = 500  # steps between held-out evaluations (plus step 0 and the last step)
    eval_batches: int = 8  # held-out batches per evaluation (the same batches every time)
    save_every: int = 1000  # steps between checkpoints (0 = only at the end)
    floor_fraction: float = 0.1  # floor = mean eval KL over evaluations at step >= (1 - this) x steps
    seed: int = 0  # student init (per width: seed, width) and anything else random
    heads: str = "head-dim:64"  # student head policy (kdtool.distill.students)
    ffn_ratio: str = "4"  # FFN = ratio x width, or "teacher"
    init_std: str = "teacher"  # teacher | small-init | number
    topk: int = 0  # > 0 when training on cached top-k teacher targets (--teacher-cache)
    device: str = "cpu"  # torch device for teacher and students
    amp: str = "auto"  # auto (bf16 autocast on CUDA) | bf16 | off
    eval_target_budget: int = 1 << 30  # keep held-out teacher targets in memory up to this many bytes
    run_key: dict = field(default_factory=dict)  # teacher/data identity, checked on --resume
    # what the students train on (kdtool/distill/objectives.py); one student per (width, loss)
    losses: list[str] = field(default_factory=lambda: ["kl"])  # --loss, canonical labels once parsed
    hidden_layers: list[int] = field(default_factory=list)  # --hidden-layers (empty: the teacher's middle layer)
    hidden_weight: float = 1.0  # --hidden-weight: loss = T^2 KL + this x the FitNets term
    feature_weight: float = 1.0  # --feature-weight: loss = T^2 KL + this x the features term
    feature_budget: str = "auto"  # --feature-budget: auto (floor(d_S g(alpha))), all or a number
    feature_weighting: str = "importance"  # --feature-weighting: importance (w_i = I_i) or uniform
    sae: str | None = None  # --sae: the teacher SAE of --loss features
    stats: str | None = None  # --stats: its `kdtool stats` file (importances, alpha)

    def __post_init__(self):
        self.widths = [int(w) for w in self.widths]
        self.betas = tuple(float(b) for b in self.betas)
        if not self.widths:
            raise BadInput("--widths: give at least one width")
        if len(set(self.widths)) != len(self.widths):
            raise BadInput(f"--widths: repeated width in {self.widths}")
        checks = [
            (0 < self.temperature < math.inf, "--temperature must be a finite number > 0"),
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.seq_len >= 2, "--seq-len must be >= 2"),
            (self.micro_batch >= 0, "--micro-batch must be >= 0"),
            (0 < self.lr < math.inf, "--lr must be a finite number > 0"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (0 <= self.warmup < self.steps, f"--warmup ({self.warmup}) must be < --steps ({self.steps})"),
            (0 <= self.weight_decay < math.inf, "--weight-decay must be a finite number >= 0"),
            (all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "--betas must be two numbers in [0, 1)"),
            (0 <= self.grad_clip < math.inf, "--grad-clip must be a finite number >= 0"),
            (0 <= self.ce_weight <= 1, "--ce-weight must be in [0, 1]"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.eval_batches >= 1, "--eval-batches must be >= 1"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (0 < self.floor_fraction <= 1, "floor fraction must be in (0, 1]"),
            (self.topk >= 0, "--topk must be >= 0"),
            (self.amp in ("auto", "bf16", "off"), "amp must be auto, bf16 or off"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        self._check_losses()
        _ = self.policy  # validates heads/ffn/init
        for w in self.widths:  # fail before a slow teacher load
            student_heads(w, self.heads)

    def _check_losses(self) -> None:
        """Parse --loss and refuse the options that contradict it (before any model is loaded)."""
        specs = parse_losses(self.losses)
        self.losses = [s.label for s in specs]
        self.hidden_layers = [int(x) for x in self.hidden_layers]
        names = {s.name for s in specs}
        for value, option in ((self.hidden_weight, "--hidden-weight"), (self.feature_weight, "--feature-weight")):
            if not (math.isfinite(value) and value > 0):
                raise BadInput(f"{option} must be a positive number, got {value}")
        self.feature_budget, self.feature_weighting = check_feature_options(self.feature_budget, self.feature_weighting)
        if self.hidden_layers and "hidden" not in names:
            raise BadInput("--hidden-layers is read by --loss hidden only")
        if any(x < 0 for x in self.hidden_layers):
            raise BadInput(f"--hidden-layers must be >= 0, got {self.hidden_layers}")
        if "features" in names and not (self.sae and self.stats):
            raise BadInput("--loss features needs the teacher's SAE (--sae) and its stats file (--stats)")
        if "features" not in names and (self.sae or self.stats):
            raise BadInput("--sae and --stats are read by --loss features only")
        if self.topk:
            for spec in specs:
                why = spec.needs_full_distribution
                if why:
                    raise BadInput(f"--loss {spec.label} cannot train from --teacher-cache: {why}; run it without one")

    @property
    def specs(self) -> list[LossSpec]:
        """The parsed losses, in --loss order."""
        return parse_losses(self.losses)

    @property
    def students(self) -> list[StudentKey]:
        """Every student of the run, width-major: (w1, loss1), (w1, loss2), (w2, loss1), ..."""
        return [StudentKey(w, loss) for w in self.widths for loss in self.losses]

    @property
    def policy(self) -> StudentPolicy:
        return StudentPolicy(heads=self.heads, ffn_ratio=str(self.ffn_ratio), init_std=str(self.init_std))

    def as_dict(self) -> dict:
        """The settings as JSON types (betas as a list), as files and checkpoints record them."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out
