"""docs/cli.md, generated from the commands' own --help so the reference cannot drift.

`scripts/gen-docs` writes it; tests/test_docs.py fails when the file differs from `render()`.
Per command: the synopsis (the Usage line), the example(s) from its help, what it outputs, and
the full --help text rendered at a fixed width without colours. Not a subcommand (not in COMMANDS).
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import typer

#: Width the help is rendered at (fixed, so the output does not depend on the terminal).
WIDTH = 100
DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
PLACEHOLDER = "Not implemented yet"
_OUTPUT_START = re.compile(r"^(Outputs?|Writes|Creates|Prints)\b")


#: docs/cli.md's conventions section: where each command's output goes (tests/test_cli_manners.py checks them)
CONVENTIONS = [
    "## Where output goes",
    "",
    "One rule for every command:",
    "",
    "- **Data goes to stdout** when there is no `-o` (or with `-o -`): a table on a terminal, CSV in a pipe",
    "  (`predict`, `stats`' per-SAE rows), or the JSON document itself (`calibrate` writes calib.json's",
    "  JSON to a pipe and its tables to a terminal). `--format` picks another form; `--json` always gives JSON.",
    "- **With `-o FILE`** the data goes to the file and the human view (tables, summary) to stderr; `--json`",
    "  then also puts the machine result on stdout. `stats` saves its per-feature table (the input of",
    "  `predict`) only with `-o`: without it nothing is written to disk.",
    "- **Commands that write a folder or a named file** (`cache-acts`, `train-sae`, `distill`, `survival`,",
    "  `toy`, `probe run`) print their human tables on stderr and, with `--json` (or `--format`), the machine",
    "  summary on stdout; otherwise stdout stays empty.",
    "- **Messages, warnings and progress** always go to stderr: a bar on a terminal, elsewhere a plain line",
    "  every 10 s with the rate and ETA (`--quiet`: only warnings and errors). Starting over in an output",
    "  that holds a previous run takes `--overwrite`; continuing it, `--resume`.",
    "- **Inputs are checked by kind**: every kdtool file records what it is, and a file of another kind is",
    "  refused with a sentence naming what it is and what was wanted (exit 2).",
    "",
]


@dataclass
class Entry:
    """One command (a leaf, or a group) of the CLI tree."""

    path: list[str]  # ["plot"], ["probe", "run"]
    command: object  # the typer/click command object
    is_group: bool

    @property
    def name(self) -> str:
        return " ".join(["kdtool", *self.path])

    @property
    def doc(self) -> str:
        return (getattr(self.command, "help", None) or "").strip()


def _root():
    from typer.main import get_command

    from kdtool.cli.main import app

    return get_command(app)


def walk() -> list[Entry]:
    """Every command and group in --help order (groups before their subcommands)."""
    root = _root()
    ctx = typer._click.Context(root, info_name="kdtool")
    out: list[Entry] = []

    def visit(group, gctx, prefix: list[str]) -> None:
        for name in group.list_commands(gctx):
            cmd = group.get_command(gctx, name)
            if cmd is None or getattr(cmd, "hidden", False):
                continue
            is_group = hasattr(cmd, "list_commands")
            out.append(Entry(path=[*prefix, name], command=cmd, is_group=is_group))
            if is_group:
                visit(cmd, typer._click.Context(cmd, info_name=name, parent=gctx), [*prefix, name])

    visit(root, ctx, [])
    return out


def examples(doc: str) -> list[str]:
    """The `Example:` commands of a help text (continuation lines joined): see help_format.examples."""
    from kdtool.cli.help_format import examples as found

    return found(doc)


def example_commands(example: str) -> list[list[str]]:
    """The kdtool invocations in an example line, as argv lists (shell pipes, && and redirections cut)."""
    out = []
    for part in re.split(r"&&|\|\||\||;", example):
        part = re.split(r"\s\d?>{1,2}\s?|\s<\s", part)[0].strip()
        try:
            argv = shlex.split(part)
        except ValueError:
            continue
        if argv and argv[0] == "kdtool":
            out.append(argv[1:])
    return out


@contextlib.contextmanager
def _plain_help(width: int) -> Iterator[None]:
    """Typer's rich help at a fixed width, no colours and no terminal detection."""
    from typer import rich_utils

    saved = (rich_utils.MAX_WIDTH, rich_utils.FORCE_TERMINAL, rich_utils.COLOR_SYSTEM)
    rich_utils.MAX_WIDTH, rich_utils.FORCE_TERMINAL, rich_utils.COLOR_SYSTEM = width, False, None
    try:
        yield
    finally:
        rich_utils.MAX_WIDTH, rich_utils.FORCE_TERMINAL, rich_utils.COLOR_SYSTEM = saved


def help_text(path: list[str], width: int = WIDTH) -> str:
    """`kdtool PATH --help` exactly as a user sees it in a `width`-column terminal, without colours."""
    from typer.testing import CliRunner

    from kdtool.cli.main import app

    with _plain_help(width):
        r = CliRunner().invoke(
            app, [*path, "--help"], env={"COLUMNS": str(width), "NO_COLOR": "1"}, terminal_width=width
        )
    if r.exit_code != 0:
        raise RuntimeError(f"kdtool {' '.join(path)} --help failed: {r.output}")
    lines = [line.rstrip() for line in r.output.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _synopsis(help_: str) -> str:
    m = re.search(r"Usage:\s*(.+)", help_)
    return re.sub(r"\s+", " ", m.group(1)).strip() if m else ""


def _outputs(entry: Entry) -> str:
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", entry.doc)]
    found = [p for p in paragraphs if _OUTPUT_START.match(p)]
    if found:
        return " ".join(found)
    outputs = [p for p in getattr(entry.command, "params", []) if "--output" in getattr(p, "opts", [])]
    if outputs:
        return f"`-o/--output`: {outputs[0].help or 'the output file'}"
    return "stdout (data), stderr (logs)."


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", name.lower()).replace(" ", "-")


def render() -> str:
    entries = walk()
    out = [
        "# kdtool command reference",
        "",
        "<!-- Generated by scripts/gen-docs from each command's --help: edit the docstrings and option",
        "     help in kdtool/cli/, then rerun it. tests/test_docs.py fails when this file is stale. -->",
        "",
        "Global options go before or after the subcommand: `kdtool [--json] [--quiet] [--debug] COMMAND ...`.",
        "File formats: [formats.md](formats.md).",
        "",
        *CONVENTIONS,
        "| command | what it does |",
        "|---|---|",
    ]
    for e in entries:
        first = e.doc.split("\n\n")[0].replace("\n", " ").strip() or "(no help)"
        out.append(f"| [`{e.name}`](#{_anchor(e.name)}) | {first.replace('|', '/')} |")
    out += ["", "## `kdtool`", "", "```text", help_text([]), "```", ""]
    for e in entries:
        help_ = help_text(e.path)
        out += [f"## `{e.name}`", ""]
        first = e.doc.split("\n\n")[0].replace("\n", " ").strip()
        if first:
            out += [first, ""]
        out += ["**Synopsis**", "", "```text", _synopsis(help_), "```", ""]
        ex = examples(e.doc)
        if ex:
            out += ["**Example**", "", "```console", *[f"$ {x}" for x in ex], "```", ""]
        if not e.is_group:
            out += [f"**Outputs**: {_outputs(e)}", ""]
        out += [
            f"<details><summary><code>{e.name} --help</code></summary>",
            "",
            "```text",
            help_,
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def write(path: Path = DOC) -> Path:
    from kdtool.formats import write_text

    write_text(path, render())
    return path


if __name__ == "__main__":
    print(write())
