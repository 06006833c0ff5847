"""Shared look of every kdtool figure: colour-blind-safe palette, paper/slides sizes, saving.

Every saved figure carries provenance like every other kdtool file, in the metadata slot each
format has (read back by `kdtool info`):
    PNG  tEXt chunks  `Software` = "kdtool X.Y.Z", `kdtool` = provenance JSON
    PDF  info dict    `Creator` = "kdtool X.Y.Z", `Subject` = provenance JSON, `Keywords` = kind
    SVG  Dublin Core  `Creator` = "kdtool X.Y.Z", `Description` = provenance JSON, `Title` = kind
The `kdtool plot` command sets the provenance for the figure it draws (`provenance_context`);
a figure function only calls `save(fig, output)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import html
import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from kdtool import __version__
from kdtool.errors import BadInput
from kdtool.formats import atomic_path
from kdtool.provenance import dumps

#: Okabe-Ito, safe for the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
#: Line styles cycled alongside colours so lines stay apart in greyscale print.
LINESTYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
GREY = "#6E6E6E"
SUFFIXES = {".png", ".pdf", ".svg"}
STYLES = ("paper", "slides")

_STYLES = {
    # single-column paper figure: ~3.4in wide, small fonts that stay readable when printed
    "paper": {
        "font.size": 8,
        "axes.titlesize": 8,
        "axes.labelsize": 8,
        "legend.fontsize": 7,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "lines.linewidth": 1.3,
        "lines.markersize": 4,
        "panel_width": 3.4,
        "panel_height": 2.6,
    },
    "slides": {
        "font.size": 14,
        "axes.titlesize": 15,
        "axes.labelsize": 14,
        "legend.fontsize": 12,
        "xtick.labelsize": 12,
        "ytick.labelsize": 12,
        "lines.linewidth": 2.2,
        "lines.markersize": 7,
        "panel_width": 6.0,
        "panel_height": 4.5,
    },
}

_PROVENANCE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kdtool_figure_provenance", default=None)
_KIND: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdtool_figure_kind", default=None)


@contextlib.contextmanager
def provenance_context(provenance: dict | None, kind: str | None = None) -> Iterator[None]:
    """Figures saved inside this block carry `provenance` (and the figure kind) in their metadata."""
    tok_p, tok_k = _PROVENANCE.set(provenance), _KIND.set(kind)
    try:
        yield
    finally:
        _PROVENANCE.reset(tok_p)
        _KIND.reset(tok_k)


def check_output(output: Path) -> None:
    if Path(output).suffix.lower() not in SUFFIXES:
        raise BadInput(f"{output}: figure format must be .png, .pdf or .svg (from the output's suffix)")


def check_style(style: str) -> None:
    if style not in _STYLES:
        raise BadInput(f"--style must be paper or slides, got {style!r}")


def figure(style: str = "paper", nrows: int = 1, ncols: int = 1, **kwargs):
    """A matplotlib (fig, axes[nrows][ncols]) sized for `style` with kdtool's rcParams applied."""
    # matplotlib is imported here, not at the top: the backend must be Agg before pyplot loads, and the
    # registry, `kdtool plot --help` and `kdtool info` import this module without drawing anything.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    check_style(style)
    spec = dict(_STYLES[style])
    w, h = spec.pop("panel_width"), spec.pop("panel_height")
    plt.rcParams.update(
        spec
        | {
            "axes.prop_cycle": cycler(color=PALETTE),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "savefig.dpi": 200,
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "legend.frameon": True,  # a light box keeps in-panel legends readable over grid and d* lines
            "legend.framealpha": 0.85,
            "legend.edgecolor": "none",
            "svg.hashsalt": "kdtool",
            "axes.formatter.use_mathtext": True,
        }
    )
    kwargs.setdefault("figsize", (w * ncols, h * nrows))
    kwargs.setdefault("constrained_layout", True)
    return plt.subplots(nrows, ncols, squeeze=False, **kwargs)


def figure_with_legend_row(style: str, ncols: int, legend_entries: int):
    """(fig, axes[ncols], legend_axes[ncols]): panels on top, a blank row below each for its legend.

    For legends too long to sit inside a panel: the row is sized to `legend_entries` lines, so the
    legend never covers data or the axis label (fill it with `legend_below`).
    """
    check_style(style)
    spec = _STYLES[style]
    w, h = spec["panel_width"], spec["panel_height"]
    line_in = spec["legend.fontsize"] * 1.55 / 72  # one legend entry, in inches
    leg_h = legend_entries * line_in + 0.08
    fig, axes = figure(style, 2, ncols, figsize=(w * ncols, h + leg_h), gridspec_kw={"height_ratios": [h, leg_h]})
    for ax in axes[1]:
        ax.axis("off")
    return fig, list(axes[0]), list(axes[1])


def legend_below(legend_ax, handles, labels, **kwargs) -> None:
    """Put a legend at the top of a blank legend axis (from figure_with_legend_row)."""
    if handles:
        legend_ax.legend(handles, labels, loc="upper center", borderaxespad=0.0, **kwargs)


def legend_outside(ax, handles=None, labels=None, **kwargs) -> None:
    """A legend to the right of the axes, outside them: it never covers data; the figure grows by its width."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)
        fig = ax.figure  # widen the figure by the legend, or constrained layout shrinks the axes to make room
        width = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
        fig.set_figwidth(fig.get_figwidth() + width + 0.1)


def layer_style(index: int) -> dict:
    """Colour, line style and marker for the index-th series (layers, runs), distinct in colour and print."""
    return {
        "color": PALETTE[index % len(PALETTE)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "marker": MARKERS[index % len(MARKERS)],
    }


def fmt_int(x: float) -> str:
    """A thousands-separated integer for plain text (legends, labels)."""
    return f"{x:,.0f}"


def math_int(x: float) -> str:
    """A thousands-separated integer for inside $...$ (mathtext puts a space after a bare comma)."""
    return f"{x:,.0f}".replace(",", "{,}")


def title(fig, options: dict, default: str | None = None) -> None:
    """The figure title from `--title`; without one, `default` as a small note under the figure."""
    text = options.get("title")
    if text:
        fig.suptitle(text)
    elif default:
        fig.text(0.5, -0.01, default, ha="center", va="top", fontsize="x-small", color=GREY)


#: per format: the metadata keys of (creator, provenance, kind); SVG uses Dublin Core keys only
_METADATA_KEYS = {
    ".png": ("Software", "kdtool", "kdtool.kind"),
    ".pdf": ("Creator", "Subject", "Keywords"),
    ".svg": ("Creator", "Description", "Title"),
}


def _metadata(suffix: str, provenance: dict | None, kind: str | None) -> dict:
    creator_key, provenance_key, kind_key = _METADATA_KEYS.get(suffix, _METADATA_KEYS[".svg"])
    meta = {creator_key: f"kdtool {__version__}"}
    prov = dumps(provenance) if provenance is not None else None
    if prov:
        meta[provenance_key] = prov
    if kind:
        meta[kind_key] = kind
    return meta


def save(fig, output: Path, *, provenance: dict | None = None, kind: str | None = None) -> None:
    """Save by the output's suffix (png/pdf/svg) with provenance metadata, atomically, then close the figure."""
    import matplotlib.pyplot as plt  # see figure()

    output = Path(output)
    check_output(output)
    suffix = output.suffix.lower()
    prov = provenance if provenance is not None else _PROVENANCE.get()
    meta = _metadata(suffix, prov, kind or _KIND.get())
    try:
        with atomic_path(output) as tmp:
            fig.savefig(tmp, format=suffix.lstrip("."), bbox_inches="tight", metadata=meta)
    finally:
        plt.close(fig)


def read_figure_metadata(path: Path) -> dict:
    """Provenance and kind stored by `save` in a PNG, PDF or SVG ({'kind', 'provenance', 'creator'}; None if absent)."""
    path = Path(path)
    suffix = path.suffix.lower()
    out: dict = {"kind": None, "provenance": None, "creator": None}
    if suffix == ".png":
        text = _png_text_chunks(path)
        out["creator"], out["kind"] = text.get("Software"), text.get("kdtool.kind")
        prov = text.get("kdtool")
    elif suffix == ".svg":
        head = path.read_text(errors="replace")[:200_000]
        m = re.search(r"<metadata>(.*?)</metadata>", head, re.S)
        block = m.group(1) if m else ""
        creator_m = re.search(r"<dc:creator>(.*?)</dc:creator>", block, re.S)
        block_wo_creator = block.replace(creator_m.group(0), "") if creator_m else block

        def dc(tag: str, text: str = block_wo_creator):
            m = re.search(rf"<dc:{tag}>(.*?)</dc:{tag}>", text, re.S)
            if m is None:
                return None
            inner = re.sub(r"<[^>]+>", "", m.group(1)).strip()
            return html.unescape(inner) or None

        out["creator"], out["kind"], prov = dc("creator", block), dc("title"), dc("description")
    elif suffix == ".pdf":
        info = _pdf_info(path)
        out["creator"], out["kind"], prov = info.get("Creator"), info.get("Keywords"), info.get("Subject")
    else:
        raise BadInput(f"{path}: not a figure (.png, .pdf or .svg)")
    if prov:
        try:
            out["provenance"] = json.loads(prov)
        except json.JSONDecodeError:
            out["provenance"] = None
    return out


def _signed_bytes(path: Path, signature: bytes, what: str) -> bytes:
    """The file's bytes; BadInput unless they start with the format's signature."""
    data = path.read_bytes()
    if not data.startswith(signature):
        raise BadInput(f"{path}: not a {what} file (bad signature)")
    return data


def _png_text_chunks(path: Path) -> dict[str, str]:
    data = _signed_bytes(path, b"\x89PNG\r\n\x1a\n", "PNG")
    chunks: dict[str, str] = {}
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if ctype == b"tEXt" and b"\x00" in body:
            key, value = body.split(b"\x00", 1)
            chunks[key.decode("latin-1")] = value.decode("latin-1")
        elif ctype == b"zTXt" and b"\x00" in body:
            key, value = body.split(b"\x00", 1)
            chunks[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
        elif ctype == b"iTXt" and b"\x00" in body:
            key, rest = body.split(b"\x00", 1)
            compressed, rest = rest[0], rest[2:]
            _lang, rest = rest.split(b"\x00", 1)
            _tkey, value = rest.split(b"\x00", 1)
            chunks[key.decode("latin-1")] = (zlib.decompress(value) if compressed else value).decode("utf-8")
        elif ctype == b"IEND":
            break
        pos += 12 + length
    return chunks


def _pdf_info(path: Path) -> dict[str, str]:
    """The document info strings matplotlib writes (uncompressed literal strings in the trailer's /Info)."""
    data = _signed_bytes(path, b"%PDF", "PDF")
    out: dict[str, str] = {}
    for key in ("Creator", "Subject", "Keywords", "Producer"):
        m = re.search(rb"/" + key.encode() + rb" \(((?:\\.|[^\\)])*)\)", data)
        if m:
            raw = m.group(1)
            raw = re.sub(rb"\\([()\\])", rb"\1", raw)
            out[key] = raw.decode("latin-1")
    return out
