"""`kdtool plot report RUN_DIR`: every figure a run folder allows, on one HTML and one Markdown page.

Three steps, each a plain function in its own module:

1. `discover(run_dir)` (kdtool/report/discover.py) finds the kdtool files in the folder by their own
   metadata, never by name.
2. `plan_figures(artifacts)` (kdtool/report/figures.py) maps artifact kinds to figure kinds with its
   table FIGURES and keeps the kinds registered in kdtool.plots.registry.KINDS.
3. `build_report(run_dir, out_dir)` (here) draws each planned figure (`render_figure`: a figure that
   fails becomes a one-line note, the rest of the report goes on), builds the key tables
   (kdtool/report/tables.py) and writes, atomically:
       REPORT_DIR/figures/*.png   the figures (provenance in their PNG text chunks)
       REPORT_DIR/index.html      self-contained page (inline CSS, relative image paths, no network)
       REPORT_DIR/README.md       the same content as Markdown
       REPORT_DIR/report.json     kind kdtool.report: figures, notes, tables (raw numbers), inputs, provenance

The data model (Artifact, FigureRule, Report, Table, ...) is kdtool/report/model.py.
Library code: no printing; warnings go to the `on_warning` callback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kdtool import formats
from kdtool.errors import BadInput
from kdtool.plots import registry
from kdtool.report import headline as report_headline
from kdtool.report import page as report_page
from kdtool.report import tables as report_tables
from kdtool.report.discover import discover, one_line, read_json_quiet
from kdtool.report.figures import Warn, plan_figures, render_figure
from kdtool.report.model import KIND, FigureResult, Report


def _remove_stale_figures(out_dir: Path, keep: set[str]) -> None:
    """Delete figures a previous report in this folder drew and this one did not (only those it listed)."""
    old = read_json_quiet(out_dir / "report.json")
    if not old or old.get("kind") != KIND:
        return
    for fig in old.get("figures") or []:
        rel = fig.get("file") if isinstance(fig, dict) else None
        if isinstance(rel, str) and rel.startswith("figures/") and "/.." not in rel and rel not in keep:
            (out_dir / rel).unlink(missing_ok=True)


def build_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    style: str = "paper",
    options: dict | None = None,
    provenance: dict | None = None,
    on_warning: Warn | None = None,
    on_figure: Callable[[FigureResult], None] | None = None,
    registered: dict | None = None,
) -> Report:
    """Discover, draw, tabulate and write the report of `run_dir` into `out_dir` (default RUN_DIR/report).

    options: figure options applied to every figure (layer, widths, capacity); widths default to the
    run's student widths. Raises BadInput when the folder holds no kdtool file at all.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise BadInput(f"-o {out}: exists and is not a folder (the report is a folder: index.html, figures/)")
    warn = on_warning or (lambda _msg: None)
    if registered is None:
        registered = registry.KINDS
    registered = {k: v for k, v in registered.items() if k != "report"}
    artifacts, notes = discover(run_dir, exclude=[out])
    if not artifacts:
        raise BadInput(
            f"{run_dir}: no kdtool files found (looked for Parquet/JSON with a kdtool kind, activation caches, "
            "SAE and student folders)"
        )
    for n in notes:
        warn(n)
    jobs, unavailable = plan_figures(artifacts, registered=registered, options=options)
    figures = []
    for job in jobs:
        res = render_figure(job, out, style=style, registered=registered, provenance=provenance, on_warning=warn)
        figures.append(res)
        if on_figure is not None:
            on_figure(res)
    notes += [f.note for f in figures if f.note]
    tables, table_notes = report_tables.build_tables(artifacts)
    table_notes = [n.replace(f"{run_dir}/", "") for n in table_notes]
    for n in table_notes:
        warn(n)
    notes += table_notes
    try:
        cards = report_headline.headline(artifacts, options)
    except Exception as exc:  # the headline must not cost the rest of the report
        cards = []
        notes.append(f"headline: not built, {one_line(exc)}")
        warn(notes[-1])
    report = Report(run_dir, out, artifacts, figures, tables, notes, unavailable, provenance, cards)
    _remove_stale_figures(out, {f.file for f in figures if f.file})
    formats.write_text(out / "index.html", report_page.html(report))
    formats.write_text(out / "README.md", report_page.markdown(report))
    formats.write_json(out / "report.json", report_page.as_json(report))
    return report
