"""Figure registry: `kdtool plot KIND INPUT... -o FIG` looks KIND up here.

Each entry names a module and a function with the signature
    fn(inputs: list[pathlib.Path], output: pathlib.Path, *, style: str, options: dict) -> None
that reads kdtool files, draws with matplotlib (Agg, imported inside) and saves through
kdtool.plots.style.save (format from the suffix, atomic). One module per figure family.
`options` carries the generic plot flags (e.g. {"layer": 12}); functions ignore unknown keys.
"""

from __future__ import annotations

#: kind -> (module, function, one-line help naming the paper figure)
KINDS: dict[str, tuple[str, str, str]] = {
}
