"""One stage of a reproduction plan (one kdtool command and what it costs), and how its command line is written.

A leaf module: kdtool/reproduce/commands.py builds the stages, kdtool/reproduce/plan.py orders them
into a Plan, kdtool/reproduce/run.py times and runs them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Stage:
    """One kdtool command of the plan and what it costs."""

    name: str  # unique: train-sae-A, stats-A, distill, ...
    family: str  # one of kdtool.reproduce.protocol.FAMILIES
    title: str
    argv: list[str]  # starts with "kdtool" or "torchrun"
    tokens: dict[str, int] = field(default_factory=dict)  # named token counts
    disk: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes) left on disk
    peak_extra: int = 0  # bytes held only while the stage runs (checkpoint swaps)
    rate: str | None = None  # which throughput times it (a MEASURED family, or "stats" for probe)
    amount: float = 0  # tokens (or steps for distill) at that rate
    extra: dict[str, float] = field(default_factory=dict)  # what else the time depends on
    resume_marker: Path | None = None  # a file that means "partly done: add --resume"
    detail: str = ""  # one line about the token counts
    seconds: float | None = None  # filled by estimate()
    time_note: str = ""

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def disk_bytes(self) -> int:
        return sum(b for _, b in self.disk)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "title": self.title,
            "command": self.command,
            "argv": self.argv,
            "tokens": self.tokens,
            "detail": self.detail,
            "disk": [{"what": w, "bytes": b} for w, b in self.disk],
            "disk_bytes": self.disk_bytes,
            "peak_extra_bytes": self.peak_extra,
            "rate": self.rate,
            "amount": self.amount,
            "seconds": self.seconds,
            "time_note": self.time_note,
        }


# ---- command lines -----------------------------------------------------------------------------
def compact(n: int) -> str:
    """300000000 -> '300M' (what parse_count reads back); other numbers as digits."""
    for suffix, unit in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def arg(v: Any) -> str:
    """One option value as command-line text: 2.0 -> '2', [8, 12] -> '8,12'."""
    if isinstance(v, float) and v == int(v) and abs(v) >= 1:
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def cmd(*head: str, **opts: Any) -> list[str]:
    """cmd('kdtool', 'stats', sae='x', alive_threshold=1e-5, o='y') -> [..., '--sae', 'x',
    '--alive-threshold', '1e-05', '-o', 'y']; None is left out, True is a bare flag."""
    argv = list(head)
    for k, v in opts.items():
        if v is None or v is False:
            continue
        flag = "-o" if k == "o" else "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, arg(v)]
    return argv
