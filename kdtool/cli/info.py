"""kdtool info FILE...: what a kdtool artifact (or a plain Parquet/CSV/safetensors file) is.

Example: kdtool info stats.parquet calib.json saes/layer12
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdtool.cli import common

#: Summary entries shown per file in the human view (--json has them all).
MAX_SUMMARY_LINES = 60


def main(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Files or folders: Parquet, CSV, JSON, safetensors, figures, activation caches, SAEs.",
            show_default=False,
        ),
    ],
) -> None:
    """Show kind, shape/schema, summary numbers and provenance of kdtool files.

    Reads any kdtool artifact (Parquet with kdtool metadata, safetensors with __metadata__, kdtool
    JSON, activation-cache and SAE folders, figures) and plain Parquet/CSV/safetensors. An unknown
    or corrupt file stops with exit 2 before anything is printed.

    Outputs: a human view on stdout; `kdtool --json info` prints {"files": [{path, format, kind,
    size_bytes, shape, schema, summary, provenance, metadata}, ...]}. Writes no file.

    Example: kdtool info stats.parquet calib.json
    """
    from kdtool import info

    descriptions = [info.describe(f) for f in files]
    if common.STATE.json:
        common.emit_json({"files": descriptions})
        return
    console = common.out_console()
    with console.capture() as captured:
        for i, d in enumerate(descriptions):
            if i:
                console.print()
            _render(console, d)
    # rich pads every cell of a grid to its column's width: no trailing blanks in a pipe or a file
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _fmt_num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and len(obj) > 8:
        return [(prefix, f"[{len(obj)} items]")]
    return [(prefix, obj)]


def _render(console, d: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(d['path'])}[/bold]")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    grid.add_row("kind", escape(d["kind"] or "(none: not written by kdtool)"))
    if d.get("part_of"):
        grid.add_row("part of", escape(f"{d['part_of']['folder']} ({d['part_of']['kind']})"))
    shape = ", ".join(f"{_fmt_num(v)} {k.replace('_', ' ')}" for k, v in d["shape"].items() if v is not None)
    grid.add_row(
        "format", escape(f"{d['format']}, {_fmt_bytes(d.get('size_bytes'))}" + (f"; {shape}" if shape else ""))
    )
    for key, value in (d.get("metadata") or {}).items():
        grid.add_row(f"meta {escape(str(key))}", escape(str(value)))
    console.print(grid)
    if d["schema"]:
        console.print(_schema_table(d["schema"]))
    if d.get("saes"):  # a stats file: its SAEs' key numbers first, none cut (the summary below may be)
        console.print("[bold]SAEs[/bold]")
        console.print(_schema_table([{"name": r["sae"], **r} for r in d["saes"]], names=None))
    if d.get("summary"):
        summary_view = d["summary"]
        if isinstance(summary_view, dict) and "saes" in summary_view and "layers" in summary_view:
            summary_view = {k: v for k, v in summary_view.items() if k != "layers"}  # the same entries twice
        items = _flatten(summary_view)
        summary = Table.grid(padding=(0, 2))
        summary.add_column(style="dim", no_wrap=True)
        summary.add_column()
        for key, value in items[:MAX_SUMMARY_LINES]:
            summary.add_row(escape(key), escape(_fmt_num(value)))
        if len(items) > MAX_SUMMARY_LINES:
            summary.add_row("...", f"{len(items) - MAX_SUMMARY_LINES} more (kdtool --json info shows all)")
        console.print("[bold]summary[/bold]")
        console.print(summary)
    console.print("[bold]provenance[/bold]")
    console.print(_provenance_grid(d.get("provenance")))


def _schema_table(schema: list[dict], names: list[str] | None = ()):
    """A table of dicts: the schema columns (names=()), or every key they have (names=None)."""
    from rich.markup import escape
    from rich.table import Table

    if names is None:
        names = list(dict.fromkeys(k for col in schema for k in col if k != "sae"))
    else:
        names = _schema_keys(schema)
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for n in names:
        table.add_column(n, justify="left" if n in ("name", "type", "dtype", "shape", "layout") else "right")
    for col in schema:
        table.add_row(*[escape(_fmt_num(col.get(n, ""))) if col.get(n) is not None else "" for n in names])
    return table


def _schema_keys(schema: list[dict]) -> list[str]:
    return ["name"] + [
        k
        for k in (
            "type",
            "dtype",
            "shape",
            "layout",
            "d_in",
            "d_sae",
            "parameters",
            "min",
            "max",
            "mean",
            "true",
            "distinct",
            "nulls",
            "nan_or_inf",
        )
        if any(k in col for col in schema)
    ]


def _provenance_grid(prov: dict | None):
    from rich.markup import escape
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    if not prov:
        grid.add_row("", "(none recorded)")
        return grid
    rows = [
        ("command", prov.get("command")),
        ("kdtool", prov.get("kdtool_version")),
        ("created", prov.get("created")),
        ("seed", prov.get("seed")),
        ("host", prov.get("host")),
    ]
    for key, value in rows:
        if value is not None:
            grid.add_row(key, escape(str(value)))
    for i, inp in enumerate(prov.get("inputs") or []):
        bits = [str(inp.get("path"))]
        if inp.get("size") is not None:
            bits.append(_fmt_bytes(inp["size"]))
        if inp.get("sha256"):
            bits.append(f"sha256 {inp['sha256'][:12]}")
        elif inp.get("mtime"):
            bits.append(f"mtime {inp['mtime']:.0f}")
        grid.add_row("inputs" if i == 0 else "", escape(", ".join(bits)))
    return grid
