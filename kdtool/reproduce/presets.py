"""Preset files for the paper's named experiments: small TOML files that can be read, diffed and cited.

- ``paper-protocol.toml``: teacher, text, layers, SAE run size, stats, calibration and probe settings;
- ``paper-sae-trials.toml``: the SAE trials: the authors' A, B, C and two extra ones (train-sae options);
- ``paper-distill.toml``: the five widths and the distillation schedule (distill options).

They are data, never executed (unlike nanoGPT's exec-based configurator). ``scripts/reproduce-paper``
reads them through `load`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kdtool.errors import BadInput

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pyproject pulls tomli there)
    import tomli as tomllib

PRESETS_DIR = Path(__file__).resolve().parents[1] / "data" / "presets"


def names() -> list[str]:
    """Names of the bundled presets ('paper-distill', ...)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def path(name: str | Path) -> Path:
    """A bundled preset by name ('paper-distill'), or a .toml file of the user's."""
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    bundled = PRESETS_DIR / f"{name}.toml"
    if bundled.exists():
        return bundled
    raise BadInput(f"preset {str(name)!r}: no such file, and not one of {', '.join(names())}")


def load(name: str | Path) -> dict[str, Any]:
    """Parse a preset (see `path`) into a dict; a syntax error names the file and line."""
    p = path(name)
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{p}: not valid TOML: {e}") from None
