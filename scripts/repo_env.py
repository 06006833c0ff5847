"""Let the repository's Python scripts run from a plain shell: re-run them under the checkout's .venv.

scripts/demo and scripts/test make `.venv` (scripts/_setup.sh); the Python scripts beside them
(reproduce-paper, topk-effect) start with `#!/usr/bin/env python3`, which is the system Python on a
fresh shell. `ensure` re-executes the script under `.venv/bin/python` when this interpreter lacks
what the script imports, and otherwise says in one line how to get it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def ensure(script: str, modules: tuple[str, ...] = ("torch",)) -> None:
    """Return if `modules` import here; else exec the checkout's .venv Python on `script`, or exit 1 with a hint."""
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return
    venv_python = Path(script).resolve().parents[1] / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.executable).absolute() != venv_python.absolute():
        os.execv(venv_python, [str(venv_python), script, *sys.argv[1:]])
    name = Path(script).name
    sys.exit(
        f"{name}: this Python ({sys.executable}) lacks {', '.join(modules)}; run scripts/test or scripts/demo "
        "once (they make .venv), or activate an environment with kdtool installed"
    )
