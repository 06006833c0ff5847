"""Help text that reads well at 80 columns: whole paragraphs, copy-pasteable examples, no cut words.

Typer's rich help keeps a docstring's line breaks and then wraps each line again, so paragraphs
hard-wrapped at 100 columns come out ragged at 80, and a long `Example:` line breaks in the middle
of a command. `tidy` rewrites a command's help once, when the CLI is assembled:

- prose paragraphs become one line each (rich wraps them to the terminal);
- paragraphs whose lines are laid out on purpose (indented, bullets, tables) keep their breaks;
- every `Example: kdtool ...` becomes its own block, the command split at word boundaries into
  lines of at most EXAMPLE_WIDTH characters joined by shell continuations (` \\`), so it pastes
  into a shell as one command.

`plain_metavars` gives flags no `<bool>` type and long choice lists a short name, so the option
table's help column keeps its width. Only the standard library and typer's click here (TAB path).
"""

from __future__ import annotations

import inspect
import re
import shlex

#: Widest example line (two-space indent included), so an 80-column terminal never wraps it.
EXAMPLE_WIDTH = 76
#: Choice lists longer than this (as `a|b|c`) are shown as an upper-case name, listed in the help.
MAX_CHOICE_LABEL = 14
_LAID_OUT = re.compile(r"^(\s+\S|[-*] |\|)")


def _is_laid_out(lines: list[str]) -> bool:
    return len(lines) > 1 and any(_LAID_OUT.match(line) for line in lines[1:])


def wrap_command(command: str, width: int = EXAMPLE_WIDTH, indent: str = "  ") -> list[str]:
    """A shell command as lines of at most `width` characters, continued with ` \\`; words never split."""
    try:
        words = shlex.split(command, posix=False)  # keeps quotes, so the lines paste back as typed
    except ValueError:
        words = command.split()
    lines: list[str] = []
    current = indent
    for word in words:
        if current.strip() and len(current) + 1 + len(word) + 2 > width:  # + 2: room for " \\"
            lines.append(current + " \\")
            current = indent + "  " + word
        else:
            current = f"{current} {word}" if current.strip() else current + word
    lines.append(current)
    return lines


def examples(text: str) -> list[str]:
    """The commands of the `Example:` lines of a help text, continuation lines (indented, or after ` \\`) joined."""
    out: list[str] = []
    open_ = False
    for line in text.splitlines():
        m = re.match(r"\s*Example:\s*(.*)", line)
        if m:
            out.append(m.group(1).strip().rstrip("\\").strip())
            open_ = True
        elif open_ and line.startswith(" ") and line.strip():
            out[-1] = f"{out[-1]} {line.strip().rstrip(chr(92)).strip()}".strip()
        else:
            open_ = False
    return [x for x in out if x]


def tidy(doc: str | None) -> str | None:
    """A docstring rewritten for rich help at any width (see the module docstring)."""
    if not doc:
        return doc
    text = inspect.cleandoc(doc)
    head, _, tail = text.partition("\f")
    out: list[str] = []
    for para in re.split(r"\n\s*\n", head.strip()):
        lines = para.splitlines()
        at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("Example:")), len(lines))
        prose, example = lines[:at], lines[at:]
        if prose:
            out.append("\n".join(prose) if _is_laid_out(prose) else " ".join(line.strip() for line in prose))
        for command in examples("\n".join(example)):
            out.append("\n".join(["Example:", *wrap_command(command)]))
    return "\n\n".join(out) + (f"\f{tail}" if tail else "")


def _plain_help_option(command) -> None:
    """click builds the --help option on demand: give that one no `<bool>` either."""
    build = command.get_help_option

    def get_help_option(ctx):
        option = build(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option


def _range_in_help(param, desc) -> None:
    """`<int range> [x>=1]` in the type column squeezes the help column: show `<int>` and say the range in the help."""
    range_help = getattr(param, "_get_number_range_help_str", None)
    bounds = range_help() if range_help else None
    if not bounds or param.metavar is not None:
        return
    annotation = getattr(desc, "annotation", None)
    param.metavar = f"<{getattr(annotation, '__name__', 'number')}>"
    param._get_number_range_help_str = lambda: None
    param.help = f"{(param.help or '').rstrip()} [{bounds}]".strip()


def plain_metavars(command) -> None:
    """Flags show no type; a long choice list shows NAME, with the choices appended to the option's help."""
    _plain_help_option(command)
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.metavar = ""
            continue
        desc = getattr(param, "type_descriptor", None)
        _range_in_help(param, desc)
        if desc is None or not desc.is_choice or param.metavar is not None:
            continue
        names = [str(getattr(c, "value", c)) for c in desc.choices or ()]
        if len("|".join(names)) <= MAX_CHOICE_LABEL:
            continue
        param.metavar = param.name.upper().replace("_", "-")
        help_ = (param.help or "").rstrip()
        if not all(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", help_) for n in names):
            param.help = f"{help_} One of: {', '.join(names)}.".strip()
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)
