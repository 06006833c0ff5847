"""What each student is trained on: the names `distill --loss` accepts and how a student is named by them.

A run trains one student per (width, loss) against one teacher forward per batch. The losses
(formulas: kdtool/distill/losses.py for the output divergences, kdtool/distill/matching.py and
kdtool/distill/features.py for the residual-stream terms; references: docs/distill.md):

    kl            KL(p || q) at T, forward KL (Hinton et al. 2015): the paper's objective, the default
    reverse-kl    KL(q || p) at T
    jsd[:beta]    generalised JSD with TRL's convention (Agarwal et al. 2024, GKD): beta 0 = forward KL,
                  1 = reverse KL, in between beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
                  `jsd` alone is beta 0.5 (TRL's default)
    tvd           total variation 1/2 sum_v |p_v - q_v|
    hidden        kl + --hidden-weight x the FitNets term (Romero et al. 2015) at --hidden-layers
    features      kl + --feature-weight x the SAE-latent term of the teacher's most important features

Every student, whatever it trains on, is evaluated on the same held-out full-vocabulary KL at T, so
floors compare across losses; the training values do not.

A leaf module (kdtool.errors only): the config, the loop and the files all name students through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from kdtool.errors import BadInput

#: loss names in --help order
NAMES = ("kl", "reverse-kl", "jsd", "tvd", "hidden", "features")
#: TRL's GKDConfig default beta, used for a bare `jsd`
JSD_DEFAULT_BETA = 0.5
DEFAULT = "kl"


@dataclass(frozen=True)
class LossSpec:
    """One parsed `--loss` entry."""

    name: str  # one of NAMES
    beta: float | None = None  # jsd only: 0 = forward KL, 1 = reverse KL (TRL's convention)

    @property
    def label(self) -> str:
        """The canonical name: `loss` column, logs, --resume checks (jsd:0.50 -> jsd:0.5)."""
        return f"jsd:{self.beta:g}" if self.name == "jsd" else self.name

    @property
    def slug(self) -> str:
        """The folder suffix: '' for kl (its folders keep today's names), else the label without ':'."""
        return "" if self.name == DEFAULT else self.label.replace(":", "")

    @property
    def divergence(self) -> str:
        """The output divergence trained on: kl (also under hidden and features), reverse-kl, jsd or tvd."""
        return "kl" if self.name in ("hidden", "features") else self.name

    @property
    def matching(self) -> str | None:
        """The residual-stream term added to the divergence: hidden, features or None."""
        return self.name if self.name in ("hidden", "features") else None

    @property
    def needs_full_distribution(self) -> str | None:
        """Why a top-k teacher cache cannot train this loss (None when its tail bucket suffices)."""
        if self.name == "reverse-kl" or (self.name == "jsd" and (self.beta or 0.0) > 0):
            return (
                "it weighs the student's own likely tokens, whose teacher log-probs a top-k cache does not hold "
                "(TRL takes them over the student's top-k)"
            )
        if self.matching:
            return "it needs the teacher's residual stream, which the cache does not keep"
        return None


class StudentKey(NamedTuple):
    """One student of a run: its width and the label of the loss it trains on."""

    width: int
    loss: str


def parse_loss(text: str) -> LossSpec:
    """'jsd:0.9' -> LossSpec('jsd', 0.9); BadInput naming --loss for anything else."""
    raw = text.strip().lower()
    name, _, arg = raw.partition(":")
    if name not in NAMES:
        raise BadInput(f"--loss: unknown loss {text.strip()!r} (use {', '.join(NAMES)}; jsd:BETA for a beta)")
    if name != "jsd":
        if arg:
            raise BadInput(f"--loss: {name} takes no parameter, got {text.strip()!r}")
        return LossSpec(name)
    if not arg:
        return LossSpec("jsd", JSD_DEFAULT_BETA)
    try:
        beta = float(arg)
    except ValueError:
        raise BadInput(f"--loss: bad beta in {text.strip()!r} (try jsd:0.5)") from None
    if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise BadInput(f"--loss: jsd beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {arg}")
    return LossSpec("jsd", beta)


def parse_losses(items) -> list[LossSpec]:
    """A comma-separated string or a list of names -> LossSpecs in order; empty or repeated names are refused."""
    parts = items.split(",") if isinstance(items, str) else list(items)
    specs = [parse_loss(p) for p in parts if str(p).strip()]
    if not specs:
        raise BadInput("--loss: give at least one loss (kl is the default)")
    labels = [s.label for s in specs]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise BadInput(f"--loss: {', '.join(repeated)} given twice")
    return specs


def student_name(key: StudentKey) -> str:
    """The folder (and checkpoint file stem) of a student: width64 for kl, width64-jsd0.5 otherwise."""
    slug = parse_loss(key.loss).slug
    return f"width{key.width}" + (f"-{slug}" if slug else "")


#: --feature-weighting choices: w_i = I_i, or 1
WEIGHTINGS = ("importance", "uniform")


def check_feature_options(budget: str, weighting: str) -> tuple[str, str]:
    """--feature-budget (auto, all or a positive number) and --feature-weighting, normalised; BadInput otherwise."""
    b = str(budget).strip().lower()
    if not (b in ("auto", "all") or (b.isdigit() and int(b) > 0)):
        raise BadInput(f"--feature-budget: use auto (floor(d_S g(alpha))), all or a positive number, got {budget!r}")
    if weighting not in WEIGHTINGS:
        raise BadInput(f"--feature-weighting must be {' or '.join(WEIGHTINGS)}, got {weighting!r}")
    return b, weighting
