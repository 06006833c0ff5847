"""`distill`'s loss flags (--loss and what the hidden and features losses read), spelled once.

The command receives them parsed, as `losses: LossFlags`, and passes `losses.config()` into its
DistillConfig, which checks them against each other before any model is loaded
(kdtool/distill/config.py). The losses themselves: docs/distill.md, kdtool/distill/objectives.py.

Only typer and the standard library at import time (this runs on every TAB press).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli.options import choices, with_flag_group

PANEL = "Losses"
Weighting = choices("Weighting", "importance", "uniform")

LossOpt = Annotated[
    str,
    typer.Option(
        "--loss",
        help="What the students train on; several (comma-separated) train side by side on one teacher forward, "
        "one student per (width, loss): kl (forward KL at T, the paper's), reverse-kl, jsd[:BETA] (TRL's "
        "convention: 0 = forward, 1 = reverse KL; jsd = jsd:0.5), tvd, hidden (kl + FitNets term), features "
        "(kl + SAE-feature term). Every student is evaluated on the same held-out KL.",
        rich_help_panel=PANEL,
    ),
]
HiddenLayersOpt = Annotated[
    Optional[str],
    typer.Option(
        "--hidden-layers",
        help="--loss hidden: layers whose residual stream is matched (hidden_states[L]) [default: the middle one].",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
HiddenWeightOpt = Annotated[
    float,
    typer.Option(
        "--hidden-weight",
        help="--loss hidden: loss = T^2 KL + this x (||r(h_S) - h_T||^2 / ||h_T||^2).",
        rich_help_panel=PANEL,
    ),
]
SaeOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--sae",
        help="--loss features: the teacher's SAE (any layout `kdtool stats` reads); its layer is matched.",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
StatsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--stats",
        help="--loss features: the SAE's `kdtool stats` file (importances I_i, alpha).",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
BudgetOpt = Annotated[
    str,
    typer.Option(
        "--feature-budget",
        help="--loss features: features matched per width: auto (F_S = floor(d_S g(alpha)), most important "
        "first), all (every alive feature) or a number.",
        rich_help_panel=PANEL,
    ),
]
FeatureWeightOpt = Annotated[
    float,
    typer.Option(
        "--feature-weight", help="--loss features: loss = T^2 KL + this x the features term.", rich_help_panel=PANEL
    ),
]
WeightingOpt = Annotated[
    Weighting,
    typer.Option(
        "--feature-weighting",
        help="--loss features: weight each feature's error by its importance I_i, or uniformly.",
        rich_help_panel=PANEL,
    ),
]


@dataclass(frozen=True)
class LossFlags:
    """The loss flags of one command line, as given."""

    loss: str = "kl"
    hidden_layers: str | None = None
    hidden_weight: float = 1.0
    sae: Path | None = None
    stats: Path | None = None
    feature_budget: str = "auto"
    feature_weight: float = 1.0
    feature_weighting: Weighting | str = Weighting.importance

    def config(self) -> dict:
        """The DistillConfig fields they set (lists parsed; errors name the option)."""
        from kdtool.cli.common import parse_opt
        from kdtool.parsing import parse_int_list

        layers = [] if self.hidden_layers is None else parse_opt("--hidden-layers", parse_int_list, self.hidden_layers)
        return {
            "losses": self.loss.split(","),
            "hidden_layers": layers,
            "hidden_weight": self.hidden_weight,
            "sae": None if self.sae is None else str(self.sae),
            "stats": None if self.stats is None else str(self.stats),
            "feature_budget": self.feature_budget,
            "feature_weight": self.feature_weight,
            "feature_weighting": str(getattr(self.feature_weighting, "value", self.feature_weighting)),
        }


_FLAGS = (
    ("loss", LossOpt),
    ("hidden_layers", HiddenLayersOpt),
    ("hidden_weight", HiddenWeightOpt),
    ("sae", SaeOpt),
    ("stats", StatsOpt),
    ("feature_budget", BudgetOpt),
    ("feature_weight", FeatureWeightOpt),
    ("feature_weighting", WeightingOpt),
)


def with_loss_flags(command):
    """Append the loss flags to a command and hand them to it as `losses: LossFlags`."""
    return with_flag_group(command, "losses", LossFlags, _FLAGS)
