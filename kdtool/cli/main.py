"""The `kdtool` app: global flags, subcommand registration and the one-line error rule.

Each subcommand lives in its own module under kdtool/cli/ and exposes `main` (a command) or
`app` (a Typer group). Every command is wrapped so that a KdtoolError prints one line and
exits with its code (2 bad input, 1 runtime failure); --debug shows the traceback instead.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import signal
import sys
import traceback
import warnings
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # Typer's own click

from kdtool import __version__
from kdtool.cli import signals
from kdtool.cli.common import STATE
from kdtool.cli.help_format import plain_metavars, tidy
from kdtool.errors import KdtoolError


class KdtoolGroup(typer.core.TyperGroup):
    """The root command: lists subcommands in pipeline order and gives every option table plain metavars."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain_metavars(self)

    def list_commands(self, ctx):
        order = [name for name, _ in COMMANDS]
        return sorted(super().list_commands(ctx), key=lambda n: order.index(n) if n in order else len(order))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Usage errors (unknown command or option, a bad value Typer checks itself) as one line, exit 2.

        Typer would draw them as a multi-line box; kdtool's rule is one line naming the option, for
        every error. Runs the command in click's non-standalone mode and does standalone's exits here.
        """
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # bare `kdtool` or a bare group: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            where = getattr(getattr(exc, "ctx", None), "command_path", None) or "kdtool"
            hint = f" (see {where} --help)" if isinstance(exc, UsageError) else ""
            message = " ".join(exc.format_message().split())
            print(f"{where}: error: {message}{hint}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("kdtool: aborted", file=sys.stderr, flush=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=KdtoolGroup,
    name="kdtool",
    help="Predict how small a knowledge-distillation student can get, from SAE measurements.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

#: (command name, module under kdtool.cli), in pipeline order: the order of --help and of TAB completion.
COMMANDS = [
    ("cache-acts", "cache_acts"),
    ("train-sae", "train_sae"),
    ("stats", "stats"),
    ("predict", "predict"),
    ("distill", "distill"),
    ("calibrate", "calibrate"),
    ("survival", "survival"),
    ("probe", "probe"),
    ("plot", "plot"),
    ("toy", "toy"),
    ("info", "info"),
    ("completion", "completion"),
]

#: The global flags, also accepted after the subcommand (`kdtool calibrate FILE --json`): name -> STATE field.
GLOBAL_FLAGS = {"json": ("--json",), "quiet": ("--quiet", "-q"), "debug": ("--debug",)}


def _version(value: bool) -> None:
    if value:
        print(f"kdtool {__version__}")
        raise typer.Exit(0)


def _showwarning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Machine-readable JSON on stdout; no progress bars.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Predict how small a knowledge-distillation student can get, from SAE measurements.

    Subcommands exchange safetensors and Parquet files so they chain in shell scripts.
    Example: kdtool predict --features 28665 --alpha 0.99238 --widths 128,256,512
    """
    STATE.json, STATE.quiet, STATE.debug = json_out, quiet, debug
    warnings.showwarning = _showwarning


def _fail(name: str, message: str, code: int) -> None:
    print(f"kdtool {name}: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _with_global_flags(fn, wrapper):
    """Give `wrapper` fn's signature plus hidden --json/--quiet/--debug, so they work after the subcommand too."""
    own = list(inspect.signature(fn, eval_str=True).parameters.values())
    taken = {p.name for p in own}
    extra = [
        inspect.Parameter(
            f"global_{name}",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[bool, typer.Option(*flags, hidden=True)],
            default=False,
        )
        for name, flags in GLOBAL_FLAGS.items()
        if f"global_{name}" not in taken
    ]
    wrapper.__signature__ = inspect.Signature(own + extra, return_annotation=None)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra} | {"return": None}
    return wrapper


def guarded(name: str, fn):
    """Wrap a command: accept the global flags after it; record its options for provenance; errors -> one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for flag in GLOBAL_FLAGS:  # given after the subcommand: the same as before it
            if kwargs.pop(f"global_{flag}", False):
                setattr(STATE, flag, True)
        STATE.command = f"kdtool {name}"
        STATE.params = dict(kwargs)
        try:
            with signals.interruptible(name):
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except KdtoolError as exc:
            if STATE.debug:
                traceback.print_exc()
            _fail(name, str(exc), exc.exit_code)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (kdtool/cli/signals.py): one line, 130 or 143
            signum = getattr(exc, "signum", signal.SIGINT)
            hint = "; rerun it with --resume to continue" if "resume" in kwargs else ""
            print(f"kdtool {name}: interrupted by {signals.describe(signum)}{hint}", file=sys.stderr, flush=True)
            raise typer.Exit(signals.exit_code(signum)) from None
        except Exception as exc:
            if STATE.debug:
                traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(name, f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)", 1)

    return _with_global_flags(fn, wrapper)


def _register() -> None:
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"kdtool.cli.{module_name}")
        if hasattr(module, "app"):
            for cmd in module.app.registered_commands:
                cmd.help = tidy(cmd.help or cmd.callback.__doc__)
                cmd.callback = guarded(f"{name} {cmd.name or cmd.callback.__name__}", cmd.callback)
            module.app.info.help = tidy(module.app.info.help)
            app.add_typer(module.app, name=name)
        else:
            app.command(name, help=tidy(module.main.__doc__))(guarded(name, module.main))


_register()


def run() -> None:
    """Console-script entry point."""
    if "_KDTOOL_COMPLETE" in os.environ:  # TAB pressed: register Typer's shell classes (add_completion=False skips it)
        from typer._completion_classes import completion_init

        completion_init()
    app(prog_name="kdtool")
