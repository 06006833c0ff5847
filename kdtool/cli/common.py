"""What every subcommand shares: global flags, stderr logging, progress bars, output, provenance.

Only typer and rich at module top: this is imported on every TAB press.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kdtool.errors import BadInput


@dataclass
class State:
    """Global flags given before the subcommand (kdtool --json predict ...)."""

    json: bool = False
    quiet: bool = False
    debug: bool = False
    command: str = "kdtool"
    params: dict[str, Any] = field(default_factory=dict)


STATE = State()


def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 250)


def out_console():
    """Console for data on stdout. Off a terminal rich would cut tables to 80 columns: give them room."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 250)


def log(message: str) -> None:
    """A human message on stderr (silenced by --quiet)."""
    if not STATE.quiet:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet, since it may change how to read a result."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def show_progress() -> bool:
    return sys.stderr.isatty() and not STATE.json and not STATE.quiet


def progress(transient: bool = False, counts: bool = True):
    """A rich progress bar on stderr, disabled when stderr is not a TTY, or with --json/--quiet.

    counts=False drops the "done/total" column, for bars whose units are work estimates, not items.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        *([MofNCompleteColumn()] if counts else []),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        disable=not show_progress(),
        transient=transient,
    )


def command_line() -> str:
    """The command as typed; in-process (tests, notebooks) the subcommand and its parsed options."""
    import os
    import shlex

    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) in ("kdtool", "kdtool.exe") or argv0.endswith(os.path.join("kdtool", "__main__.py")):
        return shlex.join(["kdtool", *sys.argv[1:]])
    from kdtool.provenance import jsonable

    opts = [f"--{k.replace('_', '-')}={jsonable(v)}" for k, v in STATE.params.items() if v not in (None, False)]
    return shlex.join([*STATE.command.split(), *opts])


def make_provenance(*, inputs=(), seed: int | None = None, config: dict | None = None) -> dict:
    """Provenance for a file this command writes (command line, parsed options, inputs, seed)."""
    from kdtool import provenance

    return provenance.make(
        command=command_line(),
        params={"command": STATE.command, **STATE.params},
        inputs=list(inputs),
        seed=seed,
        config=config,
    )


class TableFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


OutputOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="Write data here instead of stdout (format from the suffix).",
        dir_okay=False,
        writable=True,
    ),
]
FormatOpt = Annotated[
    Optional[TableFormat],
    typer.Option("--format", "-f", help="table (rich, TTY default), csv (pipe default), json or parquet."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (everything kdtool does is seeded).")]


def choose_format(fmt: TableFormat | None, output: Path | None) -> TableFormat:
    """--format wins; then --json; then the output's suffix; then table on a TTY, csv in a pipe."""
    if fmt is not None:
        return fmt
    if STATE.json:
        return TableFormat.json
    if output is not None:
        suffix = output.suffix.lower()
        by_suffix = {
            ".csv": TableFormat.csv,
            ".json": TableFormat.json,
            ".parquet": TableFormat.parquet,
            ".pq": TableFormat.parquet,
        }
        if suffix not in by_suffix:
            raise BadInput(f"{output}: cannot tell the format from the suffix; use --format")
        return by_suffix[suffix]
    return TableFormat.table if sys.stdout.isatty() else TableFormat.csv


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def emit_table(
    columns: dict[str, list],
    *,
    fmt: TableFormat | None,
    output: Path | None,
    kind: str,
    provenance: dict,
    title: str | None = None,
    summary: dict | None = None,
) -> None:
    """Write a table of equal-length columns as a rich table, CSV, JSON or Parquet."""
    from kdtool import formats
    from kdtool.provenance import jsonable

    chosen = choose_format(fmt, output)
    if chosen == TableFormat.parquet:
        if output is None:
            raise BadInput("parquet output needs -o FILE (it is binary)")
        formats.write_parquet(output, columns, kind=kind, provenance=provenance, summary=summary)
        return
    if chosen in (TableFormat.json, TableFormat.csv):
        text = formats.table_text(columns, chosen.value, kind=kind, provenance=provenance, summary=summary)
    else:
        from rich.table import Table

        table = Table(title=title)
        for name in columns:
            table.add_column(name, justify="right")
        for row in zip(*columns.values(), strict=True):
            table.add_row(*[_cell(jsonable(v)) for v in row])
        if output is None:
            out_console().print(table)
            return
        console = out_console()
        with console.capture() as cap:
            console.print(table)
        text = cap.get()
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        formats.write_text(output, text)


def emit_json(obj: dict, output: Path | None = None) -> None:
    """Machine output: JSON to stdout, or to -o FILE atomically."""
    from kdtool import formats
    from kdtool.provenance import jsonable

    if output is not None:
        formats.write_json(output, obj)
    else:
        sys.stdout.write(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()


def parse_opt(option: str, parser, value):
    """Run a parsing.* function on an option's text; errors name the option (exit 2)."""
    try:
        return parser(value)
    except BadInput as exc:
        raise BadInput(f"{option}: {exc}") from None
