"""How survival is measured: one SurvivalConfig, shared by the pass (stream.py), the summary and the job.

A leaf module (no kdtool.survival imports), so every other module of the stage can take the config whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdtool.errors import BadInput
from kdtool.theory.theorem import Capacity

#: Default survival threshold on r2: a feature survives when the student reproduces at least half its variance.
DEFAULT_THRESHOLD = 0.5
#: Default minimum teacher firings on the measurement tokens for a feature's r2 to count.
DEFAULT_MIN_FIRES = 10


@dataclass(frozen=True)
class SurvivalConfig:
    """How survival is measured (every field is recorded in survival.parquet's provenance and summary)."""

    tokens: int = 1_000_000  # --tokens: held-out tokens read in all (map fit + measurement)
    fit_fraction: float = 0.5  # --fit-fraction: share of them the maps are fitted on; the rest measures
    ridge: float | None = None  # --ridge: relative ridge lambda of the maps; None (auto): chosen on held-out rows
    threshold: float = DEFAULT_THRESHOLD  # --threshold: a feature survives iff r2 >= this
    min_fires: int = DEFAULT_MIN_FIRES  # --min-fires: teacher firings needed for a feature to be measured
    fire_threshold: float = 1e-3  # --fire-threshold: firing = latent > this x the teacher's RMS residual norm
    capacity: Capacity = "paper"  # --capacity: g(alpha) of Eq. 1 (paper) or 1 (naive) for F_S
    batch_size: int = 8  # --batch-size: sequences per forward
    chunk_tokens: int = 2048  # --chunk-tokens: rows encoded at once (memory: chunk x d_sae floats per model)
    drop_first: bool = True  # --drop-first: skip position 0 of each sequence
    max_norm_ratio: float = 50.0  # --max-norm-ratio: skip positions whose teacher norm is above this x the median

    def __post_init__(self) -> None:
        if self.tokens < 4:
            raise BadInput(f"--tokens must be at least 4, got {self.tokens}")
        if not 0 < self.fit_fraction < 1:
            raise BadInput(f"--fit-fraction must be in (0, 1), got {self.fit_fraction}")
        if not 0 < self.fit_tokens < self.tokens:
            raise BadInput(f"--fit-fraction {self.fit_fraction} of --tokens {self.tokens} leaves one side empty")
        if self.ridge is not None and not self.ridge >= 0:
            raise BadInput(f"--ridge must be >= 0 or auto, got {self.ridge}")
        if not -1 <= self.threshold <= 1:
            raise BadInput(f"--threshold is an r2 threshold in [-1, 1], got {self.threshold}")
        if self.min_fires < 1:
            raise BadInput(f"--min-fires must be >= 1, got {self.min_fires}")
        if not self.fire_threshold >= 0:
            raise BadInput(f"--fire-threshold must be >= 0, got {self.fire_threshold}")
        if self.capacity not in ("paper", "naive"):
            raise BadInput(f"--capacity must be paper or naive, got {self.capacity!r}")
        if self.batch_size < 1 or self.chunk_tokens < 1:
            raise BadInput("--batch-size and --chunk-tokens must be >= 1")

    @property
    def fit_tokens(self) -> int:
        return int(round(self.tokens * self.fit_fraction))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
