"""`kdtool plot report RUN_DIR [-o REPORT_DIR]`: the CLI side of kdtool/report/build.py.

Called by kdtool/cli/plot.py when KIND is "report" (a folder in, a folder out, unlike the other
kinds). Parses the generic plot flags that make sense for a whole run, calls build_report, and
reports: one warning line per figure or file that failed, then where the page is.

Example: kdtool plot report run/ -o run/report
"""

from __future__ import annotations

from pathlib import Path

from kdtool.cli import common, options
from kdtool.errors import BadInput


def run(
    inputs: list[Path] | None, output: Path | None, *, style: str, layer: str | None, widths: str | None, capacity: str
) -> None:
    from kdtool import parsing
    from kdtool.report.build import build_report
    from kdtool.report.model import KIND

    paths = list(inputs or [])
    if len(paths) != 1:
        raise BadInput(f"plot report: give exactly one run folder (got {len(paths)}); e.g. kdtool plot report run/")
    run_dir = paths[0]
    if not run_dir.exists():
        raise BadInput(f"{run_dir}: no such folder")
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: not a folder (kdtool plot report takes the run folder)")
    figure_options = {
        "layer": options.parse_layers(layer) if layer else None,
        "widths": common.parse_opt("--widths", parsing.parse_int_list, widths) if widths else None,
        "capacity": capacity,
    }
    out_dir = output if output is not None else run_dir / "report"
    prov = common.make_provenance(
        inputs=[run_dir], config={"kind": "report", "style": style, "options": figure_options}
    )

    def on_figure(res) -> None:
        if res.file:
            common.log(f"report: drew {res.file}")

    rep = build_report(
        run_dir,
        out_dir,
        style=style,
        options=figure_options,
        provenance=prov,
        on_warning=common.warn,
        on_figure=on_figure,
    )
    drawn = [f.file for f in rep.figures if f.file]
    if common.STATE.json:
        common.emit_json(
            {
                "kind": KIND,
                "output": str(out_dir),
                "index": str(rep.index),
                "markdown": str(out_dir / "README.md"),
                "figures": drawn,
                "not_drawn": [f.note for f in rep.figures if not f.file],
                "unavailable": rep.unavailable,
                "notes": rep.notes,
                "inputs": [a.rel for a in rep.artifacts],
            }
        )
    else:
        common.log(
            f"report: {len(rep.artifacts)} kdtool files, {len(drawn)} figures, {len(rep.tables)} tables, "
            f"{len(rep.notes)} notes"
        )
        common.log(f"wrote {rep.index} and {out_dir / 'README.md'}")
