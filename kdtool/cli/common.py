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


#: Seconds between the plain progress lines written when stderr is not a terminal.
LOG_EVERY_S = 10.0


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """What a bar says, as a plain stderr line every LOG_EVERY_S seconds: for logs, pipes, nohup and CI.

    Mirrors the part of rich.progress.Progress the commands use (add_task, update, advance, as a
    context manager); each task logs `name: done/total (pct), rate, elapsed, ETA`, and once more at the end.
    """

    def __init__(self, every: float = LOG_EVERY_S, clock=None):
        import time

        self.every, self.now = every, clock or time.monotonic
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for task in self.tasks.values():
                if task["logged_at"] != task["changed_at"]:
                    self._log(task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = self.now()
        task_id = len(self.tasks)
        self.tasks[task_id] = dict(
            description=description,
            total=total,
            completed=completed,
            fields=fields,
            start=now,
            start_done=completed,
            last=now,
            logged_at=None,
            changed_at=now,
        )
        return task_id

    def update(self, task_id: int, *, completed=None, total=None, advance=None, description=None, **fields) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        task["fields"].update(fields)
        now = self.now()
        task["changed_at"] = now
        if now - task["last"] >= self.every:
            self._log(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def reset(self, task_id: int, *, total=None, completed: float = 0, description=None, **fields) -> None:
        """Start the task over (a new phase): its clock, counts and line."""
        task = self.tasks[task_id]
        now = self.now()
        task.update(start=now, start_done=completed, completed=completed, last=now, changed_at=now, logged_at=None)
        task["total"] = total
        if description is not None:
            task["description"] = description
        task["fields"].update(fields)

    def line(self, task: dict) -> str:
        """`name: done/total (pct), rate, elapsed m:ss, ETA m:ss` from what the task knows."""
        done, total = task["completed"], task["total"]
        elapsed = self.now() - task["start"]
        parts = [f"{done:,.0f}/{total:,.0f} ({100 * done / total:.0f}%)" if total else f"{done:,.0f}"]
        rate = task["fields"].get("rate")
        if rate:
            parts.append(str(rate))
        parts.append(f"elapsed {_clock(elapsed)}")
        speed = (done - task["start_done"]) / elapsed if elapsed > 0 else 0
        if total and speed > 0 and done < total:
            parts.append(f"ETA {_clock((total - done) / speed)}")
        return f"{task['description']}: " + ", ".join(parts)

    def _log(self, task: dict) -> None:
        task["last"] = task["logged_at"] = task["changed_at"]
        log(self.line(task))


def progress(transient: bool = False, counts: bool = True):
    """Progress on stderr: a rich bar on a terminal; off a terminal, a plain line every LOG_EVERY_S seconds.

    Nothing with --quiet; with --json the plain lines (stderr) are kept, stdout stays clean.
    counts=False drops the "done/total" column, for bars whose units are work estimates, not items.
    """
    if not show_progress():
        return PlainProgress(every=LOG_EVERY_S)  # read now, so tests can shorten it; log() is silent under --quiet
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


def output_option(panel: str | None = None):
    """-o/--output FILE for a command's data (`-o -`: stdout), in help panel `panel`."""
    help = "Write data here instead of stdout (format from the suffix)."
    opt = typer.Option("--output", "-o", help=help, dir_okay=False, writable=True, rich_help_panel=panel)
    return Annotated[Optional[Path], opt]


def format_option(panel: str | None = None):
    """-f/--format of a command's data table, in help panel `panel`."""
    help = "table (rich, TTY default), csv (pipe default), json or parquet."
    return Annotated[Optional[TableFormat], typer.Option("--format", "-f", help=help, rich_help_panel=panel)]


OutputOpt = output_option()
FormatOpt = format_option()
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (everything kdtool does is seeded).")]


def to_stdout(output: Path | str | None) -> bool:
    """No -o, or `-o -`: the data goes to stdout."""
    return output is None or str(output) == "-"


def choose_format(fmt: TableFormat | None, output: Path | None) -> TableFormat:
    """--format wins; then --json; then the output's suffix; then table on a TTY, csv in a pipe."""
    if fmt is not None:
        return fmt
    if STATE.json:
        return TableFormat.json
    if not to_stdout(output):
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
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def fitted_table(
    headers: list[str],
    rows: list[list[str]],
    *,
    title: str | None = None,
    left: tuple[str, ...] = (),
    width: int | None = None,
):
    """A rich table of text cells that never cuts a cell: as columns when it fits, else one block per row.

    Rich shrinks a too-wide table by cutting cells with '…' (or wrapping numbers mid-digit); the
    numbers are what the user came for, so a table wider than the terminal is shown vertically
    instead: each row as `header  value` lines. `width` defaults to the stdout console's.
    """
    from rich import box
    from rich.console import Console, Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for h in headers:
        table.add_column(h, justify="left" if h in left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    width = width or out_console().width
    probe = Console(width=10_000)
    if probe.measure(table).maximum <= width:
        return table
    blocks: list = [Text(title, style="italic")] if title else []
    key_width = max(len(h) for h in headers)
    for i, r in enumerate(rows):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="dim", width=key_width)
        grid.add_column(overflow="fold")
        for h, cell in zip(headers, r, strict=True):
            grid.add_row(h, cell)
        blocks += [grid] if i == 0 else [Text(""), grid]
    return Group(*blocks)


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
    if to_stdout(output):
        output = None
    if chosen == TableFormat.parquet:
        if output is None:
            _parquet_to_stdout(columns, kind=kind, provenance=provenance, summary=summary)
        else:
            formats.write_parquet(output, columns, kind=kind, provenance=provenance, summary=summary)
        return
    if chosen in (TableFormat.json, TableFormat.csv):
        text = formats.table_text(columns, chosen.value, kind=kind, provenance=provenance, summary=summary)
    else:
        from rich.markup import escape

        rows = [[escape(_cell(jsonable(v))) for v in row] for row in zip(*columns.values(), strict=True)]
        table = fitted_table(list(columns), rows, title=title)
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


def show_table(columns: dict[str, list], *, title: str | None = None) -> None:
    """The human view of a result on stderr (silenced by --quiet): for commands whose data went to a file."""
    from rich.markup import escape

    from kdtool.provenance import jsonable

    if STATE.quiet:
        return
    rows = [[escape(_cell(jsonable(v))) for v in row] for row in zip(*columns.values(), strict=True)]
    console = err_console()
    console.print(fitted_table(list(columns), rows, title=title, width=console.width))


def emit_summary(
    columns: dict[str, list],
    *,
    fmt: TableFormat | None = None,
    kind: str,
    provenance: dict,
    title: str | None = None,
    summary: dict | None = None,
) -> None:
    """The summary table of a command whose data went to a file or folder (docs/cli.md, "Where output goes").

    A human table on stderr; with --json or an explicit --format, that form on stdout.
    """
    if fmt is None and not STATE.json:
        show_table(columns, title=title)
        return
    emit_table(columns, fmt=fmt, output=None, kind=kind, provenance=provenance, title=title, summary=summary)


def _parquet_to_stdout(columns: dict, **meta) -> None:
    """`-o - --format parquet`: the bytes to a pipe (never to a terminal, where they would be garbage)."""
    import tempfile

    from kdtool import formats

    if sys.stdout.isatty():
        raise BadInput("-o -: Parquet is binary; redirect stdout to a file or a pipe, or give -o FILE.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.parquet"
        formats.write_parquet(path, columns, **meta)
        sys.stdout.flush()
        sys.stdout.buffer.write(path.read_bytes())
        sys.stdout.buffer.flush()


def emit_json(obj: dict, output: Path | None = None) -> None:
    """Machine output: JSON to stdout (no -o, or -o -), or to -o FILE atomically."""
    from kdtool import formats
    from kdtool.provenance import jsonable

    if not to_stdout(output):
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
