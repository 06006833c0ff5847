"""The data model of `kdtool plot report`: what was found, what to draw, what was drawn, the tables.

A leaf module (no kdtool.report imports) shared by discovery (kdtool/report/discover.py), figure
planning (kdtool/report/figures.py), the table builders (kdtool/report/tables*.py), the page
(kdtool/report/page.py) and kdtool/report/build.py, so none of those imports another for its types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdtool import teachers

#: Kind of report.json (docs/formats.md).
KIND = "kdtool.report"

#: Report sections in page order ("Inputs" comes after them).
SECTIONS = (
    "SAE measurements",
    "Predicted floors",
    "Distillation",
    "Objective ablation",
    "Calibration",
    "Feature survival",
    "Probing",
    "Toy model",
)

# Artifact kinds (docs/formats.md) the figures and tables read.
STATS, PREDICT, SAE_LOG = "kdtool.stats", "kdtool.predict", "kdtool.sae.train_log"
CURVES, FLOORS, CALIB = "kdtool.distill.curves", "kdtool.distill.floors", "kdtool.calibration"
PROBE, TOY, TOY_CURVES = "kdtool.probe", "kdtool.toy", "kdtool.toy.curves"
SURVIVAL = "kdtool.survival"
TOY_SURVIVAL = "kdtool.toy.survival"


@dataclass
class Artifact:
    """One kdtool file (or folder) found in the run folder."""

    path: Path  # file or folder
    rel: str  # path relative to the run folder, for display
    kind: str  # kdtool kind, e.g. kdtool.stats
    provenance: dict | None = None
    summary: Any = None  # Parquet kdtool.summary, or the JSON object itself for JSON artifacts
    details: str = ""  # a short description for the inputs table (rows, layer, tokens, ...)
    teacher: str | None = None  # the model the file measures (kdtool.teachers.teacher_of); None: not recorded


def of_kind(arts: list[Artifact], kind: str) -> list[Artifact]:
    """The artifacts of one kind, in discovery order."""
    return [a for a in arts if a.kind == kind]


def same_model(a: Artifact, b: Artifact) -> bool:
    """Whether two files may be combined in one figure or answer: they name the same teacher (or neither names
    one and one command wrote both)."""
    return a is b or teachers.same_teacher(a.teacher, b.teacher, a.provenance, b.provenance)


def model_groups(arts: list[Artifact]) -> list[list[Artifact]]:
    """The artifacts split by the teacher they measure, in discovery order; those naming none form one group
    (a run of files too old to say keeps its figures whole)."""
    groups: dict[str | None, list[Artifact]] = {}
    for a in arts:
        groups.setdefault(a.teacher.lower() if a.teacher else None, []).append(a)
    return list(groups.values())


# --------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class FigureRule:
    """Which figure a set of artifact kinds allows, and how its inputs are chosen."""

    figure: str  # figure kind in kdtool.plots.registry.KINDS
    inputs: tuple[str, ...]  # artifact kinds it reads; the first kind present in the run is used
    #: one figure from all those files ("run"), one per file ("file"), one per SAE run folder ("sae-run":
    #: train logs grouped by the folder above their layer{L}/, so two train-sae runs do not share a figure),
    #: or one per SAE trial ("trial": stats layers grouped by how their SAEs were trained, kdtool/report/trials.py)
    per: Literal["run", "file", "sae-run", "trial"]
    section: str  # report section the figure goes to
    title: str
    extra: tuple[str, ...] = ()  # artifact kinds appended to the inputs when present (optional inputs)
    hints: tuple[str, ...] = ()  # options filled from the run: "widths" (student widths), "d_star"
    extra_scope: Literal["run", "folder"] = "run"  # extras from anywhere, or only beside the main input
    #: a named condition on a group's main inputs beyond their kind (kdtool/report/figures.py CONDITIONS):
    #: "several-losses" (floors of more than one loss), "several-saes" (several SAEs of a layer in a stats file)
    when: str | None = None
    min_layers: int = 0  # per "trial": only trials with at least this many layers


@dataclass
class FigureJob:
    """One figure to draw: its rule, the artifacts it reads, where it goes and its options."""

    rule: FigureRule
    inputs: list[Artifact]
    file: str  # path relative to the report folder, e.g. figures/floor.png
    options: dict
    title: str | None = None  # the rule's title with what tells this figure apart (an SAE trial); None: the rule's


@dataclass
class FigureResult:
    """One figure as drawn, or the note saying why it was not."""

    figure: str  # figure kind
    section: str
    title: str
    caption: str
    file: str | None  # relative path of the PNG, None when it failed
    inputs: list[str]  # relative input paths
    note: str | None = None  # why it could not be drawn
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- tables

#: Cell formats: int (thousands separators), f1..f5 (fixed decimals), g3/g4 (significant digits),
#: pct (fraction shown as %), pm (a (mean, std) pair, 1 decimal), pm4 (the same, 4 decimals), text.
FORMATS = ("int", "f1", "f2", "f3", "f4", "f5", "g3", "g4", "pct", "pm", "pm4", "text")


@dataclass
class Table:
    """One key table: raw cell values plus a format per column (kdtool/report/page.py formats them)."""

    key: str  # machine name, e.g. "sae_layers"
    section: str  # report section (SECTIONS, or "Inputs")
    title: str
    columns: list[str]  # column headers
    formats: list[str]  # one of FORMATS per column
    rows: list[list[Any]] = field(default_factory=list)  # raw cell values
    sources: list[str] = field(default_factory=list)  # relative paths of the files read
    note: str = ""  # shown under the table

    def add(self, *cells: Any) -> None:
        self.rows.append([_plain(c) for c in cells])


def _plain(v: Any) -> Any:
    """numpy scalars -> Python; NaN/inf -> None (JSON has neither)."""
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def number(x: Any) -> float | None:
    """A cell value as a finite float, None for missing, non-numeric or non-finite values."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def format_cell(v: Any, fmt: str) -> str:
    """A cell as text ('–' for missing values)."""
    if v is None:
        return "–"
    if fmt == "text" or isinstance(v, str):
        return str(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if fmt in ("pm", "pm4"):
        mean, std = v
        if mean is None:
            return "–"
        d = 4 if fmt == "pm4" else 1
        return f"{mean:.{d}f} ± {std:.{d}f}" if std is not None else f"{mean:.{d}f}"
    if fmt == "int":
        return f"{int(round(v)):,}"
    if fmt == "pct":
        return f"{100 * v:.1f}%"
    if fmt.startswith("f"):
        return f"{v:,.{int(fmt[1:])}f}"
    if fmt.startswith("g"):
        return f"{v:.{int(fmt[1:])}g}"
    return str(v)


# --------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything one report shows; kdtool/report/page.py renders it as HTML, Markdown and report.json."""

    run_dir: Path
    out_dir: Path
    artifacts: list[Artifact]
    figures: list[FigureResult]
    tables: list[Table]
    notes: list[str]  # problems with inputs and figures, one line each
    unavailable: list[str]  # figure kinds the run allows but this kdtool has not registered
    provenance: dict | None
    headline: list = field(default_factory=list)  # kdtool.report.headline.Card per teacher, shown first

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"
