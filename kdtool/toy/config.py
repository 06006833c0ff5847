"""What a toy sweep is made of (paper section 4, Experiment 1): how each model trains, one configuration, the grid.

Shared by the trainer, the sweep, the part store and the figures, so it imports neither torch nor
any other toy module: `kdtool toy --summarize` and `kdtool plot toy-*` read it without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

from kdtool.errors import BadInput
from kdtool.theory import theorem as theory

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["constant", "cosine", "linear"]
Target = Literal["teacher", "data"]


@dataclass(frozen=True)
class TrainConfig:
    """How every toy model (teacher and student) is trained and measured."""

    steps: int = 3000  # optimiser steps per model (teachers and students alike)
    batch_size: int = 256  # fresh samples per step
    lr: float = 2e-2  # peak learning rate: the smallest of 1e-2, 2e-2, 3e-2 that passes the convergence check
    optimizer: Optimizer = "adam"  # adam (torch.optim.Adam defaults) or sgd (momentum 0.9)
    schedule: Schedule = "cosine"  # lr schedule over the steps: constant, cosine or linear decay to 0
    target: Target = "teacher"  # students learn the teacher's x_hat (distillation) or the data
    zipf_exponent: float = 1.0  # I_i = i^-s
    eval_samples: int = 4096  # held-out samples per (n, d_T, alpha, seed), drawn once
    floor_fraction: float = 0.1  # the floor averages held-out loss over this final fraction of steps
    eval_points: int = 10  # held-out evaluations inside that final window
    curve_points: int = 0  # >0: log this many training-loss points per model (--log-curves)
    base_seed: int = 0  # --seed: offsets every generator

    def __post_init__(self):
        checks = [
            (self.steps >= 10, f"--steps must be >= 10, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.optimizer in ("adam", "sgd"), f"--optimizer must be adam or sgd, got {self.optimizer!r}"),
            (
                self.schedule in ("constant", "cosine", "linear"),
                f"--schedule must be constant, cosine or linear, got {self.schedule!r}",
            ),
            (self.target in ("teacher", "data"), f"--target must be teacher or data, got {self.target!r}"),
            (
                math.isfinite(self.zipf_exponent) and self.zipf_exponent >= 0,
                f"--zipf-exponent must be >= 0, got {self.zipf_exponent}",
            ),
            (self.eval_samples >= 1, f"--eval-samples must be >= 1, got {self.eval_samples}"),
            (0 < self.floor_fraction <= 1, f"--floor-fraction must be in (0, 1], got {self.floor_fraction}"),
            (self.eval_points >= 1, f"--eval-points must be >= 1, got {self.eval_points}"),
            (self.curve_points >= 0, f"curve points must be >= 0, got {self.curve_points}"),
            (self.base_seed >= 0, f"--seed must be >= 0, got {self.base_seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        if self.eval_points > self.window:
            raise BadInput(
                f"--eval-points {self.eval_points} exceeds the {self.window} steps of the final "
                f"{self.floor_fraction:g} of training (--steps {self.steps})"
            )

    @property
    def window(self) -> int:
        """Number of final steps the floor averages over."""
        return max(1, math.ceil(self.steps * self.floor_fraction))

    def eval_steps(self) -> list[int]:
        """0-based step indices after which the held-out loss is measured (evenly spread, last = final step)."""
        start = self.steps - self.window
        points = range(self.eval_points)
        return sorted({start + math.ceil((k + 1) * self.window / self.eval_points) - 1 for k in points})

    def curve_steps(self) -> list[int]:
        if self.curve_points <= 0:
            return []
        return sorted(
            {
                min(self.steps - 1, round(k * (self.steps - 1) / max(1, self.curve_points - 1)))
                for k in range(self.curve_points)
            }
        )

    def lr_at(self, step: int) -> float:
        frac = step / self.steps
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, order=True)
class ToyConfigKey:
    """One configuration of the sweep: a teacher width and its students (`student_widths`), for each seed."""

    n: int
    d_teacher: int
    alpha: float

    @property
    def label(self) -> str:
        return f"n={self.n} d_T={self.d_teacher} alpha={self.alpha:g}"

    @property
    def slug(self) -> str:
        return f"n{self.n}-dT{self.d_teacher}-a{self.alpha:.6f}"


#: --student-widths policies besides an explicit list (see `student_widths`)
WIDTH_POLICIES = ("teacher", "to-dstar")


def student_widths(key: ToyConfigKey, spec: str | tuple[int, ...] = "teacher") -> list[int]:
    """The student widths d_S trained for one configuration, ascending.

    teacher: 1..d_T, the paper's grid. to-dstar: 1..max(d_T, ceil(d*) + 1) with d* = n / g(alpha):
    every width of the paper's grid, and beyond d_T up to one past the critical width, so that Eq. 2's
    data points (d_S < d*) and the first widths past d* exist at every alpha (at n = 80, alpha = 0.99:
    d* = 3.7, widths 1..5 with d_T <= 5). A tuple: exactly those widths, for every configuration.
    """
    if spec == "teacher":
        return list(range(1, key.d_teacher + 1))
    if spec == "to-dstar":
        d_star = theory.critical_width(key.n, key.alpha)
        return list(range(1, max(key.d_teacher, math.ceil(d_star) + 1) + 1))
    if isinstance(spec, str):
        raise BadInput(f"--student-widths must be teacher, to-dstar or a list of widths, got {spec!r}")
    return sorted(set(int(w) for w in spec))


def widths_label(spec: str | tuple[int, ...]) -> str:
    """The --student-widths spec as text (what provenance and the settings fingerprint record)."""
    return spec if isinstance(spec, str) else ",".join(str(w) for w in sorted(set(spec)))


@dataclass(frozen=True)
class Grid:
    """The sweep's axes (defaults = the paper's 48 configurations x 20 seeds)."""

    ns: tuple[int, ...] = (10, 20, 40)  # feature counts n
    d_teachers: tuple[int, ...] = (3, 5, 8, 10)  # teacher widths d_T
    alphas: tuple[float, ...] = (0.80, 0.90, 0.95, 0.99)  # sparsities
    seeds: int = 20  # seeds per configuration
    student_widths: str | tuple[int, ...] = "teacher"  # --student-widths: teacher, to-dstar or widths (see above)

    def __post_init__(self):
        if not self.ns or min(self.ns) < 1:
            raise BadInput(f"--n values must be >= 1, got {list(self.ns)}")
        if not self.d_teachers or min(self.d_teachers) < 1:
            raise BadInput(f"--d-teacher values must be >= 1, got {list(self.d_teachers)}")
        if not self.alphas or any(not (0.0 < a < 1.0) for a in self.alphas):
            raise BadInput(f"--alpha values must be in (0, 1), got {list(self.alphas)}")
        if self.seeds < 1:
            raise BadInput(f"--seeds must be >= 1, got {self.seeds}")
        theory.check_alpha(list(self.alphas), what="--alpha")  # warns below 1-1/e
        if not isinstance(self.student_widths, str) and (
            not self.student_widths or min(int(w) for w in self.student_widths) < 1
        ):
            raise BadInput(f"--student-widths values must be >= 1, got {list(self.student_widths)}")
        student_widths(ToyConfigKey(1, 1, 0.9), self.student_widths)  # refuses an unknown policy

    def widths(self, key: ToyConfigKey) -> list[int]:
        """Student widths of one configuration (`student_widths`)."""
        return student_widths(key, self.student_widths)

    def keys(self) -> list[ToyConfigKey]:
        return [
            ToyConfigKey(n, d, float(a))
            for n in sorted(set(self.ns))
            for d in sorted(set(self.d_teachers))
            for a in sorted(set(self.alphas))
        ]

    def models(self, keys=None) -> int:
        """Models trained for these configurations: per seed one teacher and its students."""
        return self.seeds * sum(len(self.widths(k)) + 1 for k in (keys if keys is not None else self.keys()))


def settings_id(cfg: TrainConfig, seeds: int, widths: str | tuple[int, ...] = "teacher") -> str:
    """Fingerprint of everything that changes a configuration's rows (curves excluded).

    The student-width policy is in it: the same configuration (n, d_T, alpha) has other rows under
    `teacher` and `to-dstar`, so --resume must not mix them. n, d_T and alpha are not: each
    configuration's part is keyed by them, so a grown grid resumes the configurations it shares.
    """
    d = cfg.to_dict()
    d.pop("curve_points")
    d["seeds"] = seeds
    d["student_widths"] = widths_label(widths)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
