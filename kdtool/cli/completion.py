"""kdtool completion SHELL: print the TAB-completion script for bash, zsh or fish.

Example: kdtool completion bash > ~/.local/share/bash-completion/completions/kdtool
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion_script(shell: str) -> str:
    """The script Typer's completion protocol expects (env var _KDTOOL_COMPLETE)."""
    from typer._completion_shared import get_completion_script  # Typer's own generator

    return get_completion_script(prog_name="kdtool", complete_var="_KDTOOL_COMPLETE", shell=shell) + "\n"


def main(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the TAB-completion script for SHELL (completions/ holds prebuilt copies).

    Example: kdtool completion zsh > ~/.zfunc/_kdtool
    """
    print(completion_script(shell.value), end="")
