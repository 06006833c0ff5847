"""Parsers for the compact notations users type: widths lists, ranges and token counts (and `short_float`, a
number written back compactly for names and labels)."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from kdtool.errors import BadInput

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str) -> int:
    """'300M' -> 300_000_000; '2.5B', '1e6', '50k' and plain integers too."""
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)", s)
    if not m:
        raise BadInput(f"not a count: {text!r} (try 300M, 2.5B, 1e6 or 50000)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise BadInput(f"not a whole non-negative count: {text!r}")
    return int(value)


def parse_int_list(text: str, *, minimum: int | None = 1) -> list[int]:
    """'128,256,512' or a range 'start:stop:step' (stop included), or a mix: '64:256:64,1024'."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            bits = part.split(":")
            if len(bits) not in (2, 3):
                raise BadInput(f"bad range {part!r}: use start:stop or start:stop:step")
            try:
                start, stop = int(bits[0]), int(bits[1])
                step = int(bits[2]) if len(bits) == 3 else 1
            except ValueError:
                raise BadInput(f"bad range {part!r}: start, stop and step must be integers") from None
            if step <= 0 or stop < start:
                raise BadInput(f"bad range {part!r}: need start <= stop and step > 0")
            out.extend(range(start, stop + 1, step))
        else:
            try:
                out.append(int(parse_count(part)) if re.search(r"[a-zA-Z.]", part) else int(part))
            except ValueError:
                raise BadInput(f"not an integer: {part!r} in {text!r}") from None
    if not out:
        raise BadInput(f"empty list: {text!r}")
    if minimum is not None and min(out) < minimum:
        raise BadInput(f"values must be >= {minimum}: {text!r}")
    return out


def parse_float_list(text: str) -> list[float]:
    """'0.8,0.9,0.95' -> [0.8, 0.9, 0.95]."""
    try:
        out = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise BadInput(f"not a list of numbers: {text!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise BadInput(f"not a list of finite numbers: {text!r}")
    return out


def short_float(x: float) -> str:
    """3e-4 -> '3e-4', 2.5e-5 -> '2.5e-5', 0.05 -> '0.05', 1.0 -> '1': repr's shortest digits, scientific below 1e-3."""
    d = Decimal(repr(float(x)))
    if d != 0 and abs(d) < Decimal("1e-3"):
        return format(d.normalize(), "e")
    return format(d.normalize(), "f")
