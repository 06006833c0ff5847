"""kdtool plot KIND INPUT... -o FIG: draw one of the registered figures (kdtool/plots/registry.py KINDS).

Example: kdtool plot capacity -o capacity.png
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common, options
from kdtool.errors import BadInput

PlotStyle = options.choices("PlotStyle", "paper", "slides")
CapacityKind = options.choices("CapacityKind", "paper", "naive")


#: options-dict keys filled by the generic flags (a --set KEY may not reuse them)
GENERIC_KEYS = ("layer", "widths", "features", "alpha", "capacity", "title")


def _kinds() -> dict[str, tuple[str, str, str]]:
    from kdtool.plots.registry import KINDS  # a plain dict: no matplotlib, cheap on every TAB press

    return KINDS


def complete_kind(incomplete: str) -> list[tuple[str, str]]:
    """TAB completion for KIND: registered kinds with their help."""
    return [(name, spec[2]) for name, spec in _kinds().items() if name.startswith(incomplete)]


def _parse_set(items: list[str]) -> dict:
    """--set KEY=VALUE (repeatable): VALUE is read as JSON when it parses (numbers, true, [1,2]), else text."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise BadInput(f"--set: expected KEY=VALUE with KEY a name, got {item!r}")
        if key in GENERIC_KEYS:
            raise BadInput(f"--set: {key!r} has its own flag (--{key})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(
    kind: Annotated[
        Optional[str],
        typer.Argument(help="Figure kind (see --list).", autocompletion=complete_kind, show_default=False),
    ] = None,
    inputs: Annotated[
        Optional[list[Path]],
        typer.Argument(
            help="Input files: stats Parquet, predict table, calib.json, ... (per kind).", show_default=False
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Figure file; format from the suffix: .png, .pdf or .svg (`report`: the report folder).",
        ),
    ] = None,
    style: Annotated[PlotStyle, typer.Option("--style", help="paper (column width) or slides.")] = PlotStyle.paper,
    layer: options.layers_option("Only these layers: 12 or 8,12,16.", short=False) = None,
    widths: Annotated[
        Optional[str], typer.Option("--widths", help="Student widths to mark: 128,256,512 or 64:1024:64.")
    ] = None,
    features: Annotated[
        Optional[int], typer.Option("--features", help="Feature count F for `capacity` (default 28,665 = paper).")
    ] = None,
    alpha: Annotated[
        Optional[str], typer.Option("--alpha", help="Sparsities to mark on `capacity` (default 0.8,0.9,0.95,0.99).")
    ] = None,
    capacity: Annotated[
        CapacityKind, typer.Option("--capacity", help="g(alpha) per Eq. 1 (paper) or 1 (naive) for `floor`.")
    ] = CapacityKind.paper,
    title: Annotated[Optional[str], typer.Option("--title", help="Figure title.")] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", help="Extra figure option KEY=VALUE, repeatable (e.g. --set d_star=1065).", show_default=False
        ),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the figure kinds and exit.")] = False,
) -> None:
    """Draw a figure from kdtool files: `kdtool plot KIND INPUT... -o FIG`.

    Writes FIG (.png, .pdf or .svg, from the suffix; atomically) with this command's provenance in
    its metadata (`kdtool info FIG` shows it). `kdtool plot --list` prints the kinds.

    Example: kdtool plot floor stats.parquet --layer 12 --widths 128,256,512,768,1024 -o floor.pdf
    """
    from kdtool.plots import registry
    from kdtool.plots import style as plot_style

    if list_:
        return _render_list(registry.KINDS)
    if kind is None:
        raise BadInput("KIND is missing: give a figure kind (kdtool plot --list shows them)")
    registry.entry(kind)  # BadInput naming the kinds when KIND is unknown
    if kind == "report":  # a run folder in, a report folder out (kdtool/report/build.py, CLI side in plot_report.py)
        from kdtool.cli import plot_report

        return plot_report.run(inputs, output, style=style.value, layer=layer, widths=widths, capacity=capacity.value)
    if output is None:
        raise BadInput("-o/--output FIG is required (.png, .pdf or .svg)")
    plot_style.check_output(output)
    paths = list(inputs or [])
    for p in paths:
        if not p.exists():
            raise BadInput(f"{p}: no such file")
    registry.check_inputs(kind, paths)
    figure_options = _figure_options(layer, widths, features, alpha, capacity.value, title, list(set_ or []))
    prov = common.make_provenance(inputs=paths, config={"kind": kind, "style": style.value, "options": figure_options})
    written = registry.draw(kind, paths, output, style=style.value, options=figure_options, provenance=prov)
    if common.STATE.json:
        common.emit_json({"kind": kind, "output": str(written), "inputs": [str(p) for p in paths]})
    else:
        common.log(f"wrote {written}")


def _render_list(kinds: dict[str, tuple[str, str, str]]) -> None:
    """`--list`: one line per kind with its help, or {kind: {help, module, function}} with --json."""
    if common.STATE.json:
        common.emit_json(
            {name: {"help": spec[2], "module": spec[0], "function": spec[1]} for name, spec in kinds.items()}
        )
        return
    width = max(map(len, kinds), default=0)
    for name, spec in kinds.items():
        print(f"{name:<{width}}  {spec[2]}")


def _figure_options(
    layer: str | None,
    widths: str | None,
    features: int | None,
    alpha: str | None,
    capacity: str,
    title: str | None,
    set_items: list[str],
) -> dict:
    """The figure functions' `options`: --set items, then the generic flags parsed (errors name the flag)."""
    from kdtool import parsing

    out: dict = _parse_set(set_items)
    out.update(
        {
            "layer": options.parse_layers(layer) if layer else None,
            "widths": common.parse_opt("--widths", parsing.parse_int_list, widths) if widths else None,
            "features": features,
            "alpha": common.parse_opt("--alpha", parsing.parse_float_list, alpha) if alpha else None,
            "capacity": capacity,
            "title": title,
        }
    )
    if features is not None and features < 1:
        raise BadInput(f"--features must be >= 1, got {features}")
    return out


def _kinds_help() -> str:
    # "\[" keeps Typer's rich markup from eating bracketed text such as "[stats]"
    lines = [f"  {name}: {spec[2]}".replace("[", "\\[") for name, spec in _kinds().items()]
    return "\n\nKinds:\n\n" + "\n\n".join(lines) if lines else ""


main.__doc__ = (main.__doc__ or "").rstrip() + _kinds_help() + "\n"
