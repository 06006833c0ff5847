"""Shared look of every kdtool figure: colour-blind-safe palette, paper/slides sizes, saving."""

from __future__ import annotations

from pathlib import Path

from kdtool.errors import BadInput

#: Okabe-Ito, safe for the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
SUFFIXES = {".png", ".pdf", ".svg"}

_STYLES = {
    # single-column paper figure: ~3.4in wide, small fonts that stay readable when printed
    "paper": {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
              "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.3, "panel_width": 3.4,
              "panel_height": 2.6},
    "slides": {"font.size": 14, "axes.titlesize": 15, "axes.labelsize": 14, "legend.fontsize": 12,
               "xtick.labelsize": 12, "ytick.labelsize": 12, "lines.linewidth": 2.2, "panel_width": 6.0,
               "panel_height": 4.5},
}


def check_output(output: Path) -> None:
    if output.suffix.lower() not in SUFFIXES:
        raise BadInput(f"{output}: figure format must be .png, .pdf or .svg")


def figure(style: str = "paper", nrows: int = 1, ncols: int = 1, **kwargs):
    """A matplotlib (fig, axes) sized for `style` with kdtool's rcParams applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    if style not in _STYLES:
        raise BadInput(f"--style must be paper or slides, got {style!r}")
    spec = dict(_STYLES[style])
    w, h = spec.pop("panel_width"), spec.pop("panel_height")
    plt.rcParams.update(spec | {"axes.prop_cycle": cycler(color=PALETTE), "axes.spines.top": False,
                                "axes.spines.right": False, "savefig.dpi": 200, "figure.dpi": 100,
                                "axes.grid": True, "grid.alpha": 0.25})
    kwargs.setdefault("figsize", (w * ncols, h * nrows))
    kwargs.setdefault("constrained_layout", True)
    return plt.subplots(nrows, ncols, squeeze=False, **kwargs)


def save(fig, output: Path) -> None:
    """Save by the output's suffix (png/pdf/svg), atomically, then close the figure."""
    import matplotlib.pyplot as plt

    from kdtool.formats import atomic_path

    check_output(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format=output.suffix.lower().lstrip("."), bbox_inches="tight",
                    metadata=None if output.suffix.lower() == ".svg" else {"Software": "kdtool"})
    plt.close(fig)
