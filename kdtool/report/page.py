"""Render a kdtool.report.model.Report as a self-contained HTML page, a Markdown page and report.json.

HTML: inline CSS, figures by relative path (figures/*.png), no scripts, no network. Every text
that comes from a file is escaped. Markdown: GitHub-flavoured pipe tables, same order.
"""

from __future__ import annotations

import html as _html
import json
from typing import Any

from kdtool import __version__
from kdtool.report.headline import title as card_title
from kdtool.report.model import KIND, SECTIONS, FigureResult, Report, Table, format_cell

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-bottom:.3em}
.meta{color:#555;font-size:.92em}code{background:#f4f4f4;padding:0 .25em;border-radius:3px;font-size:.92em}
table{border-collapse:collapse;margin:.5em 0 .3em;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f3f5f8}td.t,th.t{text-align:left}tbody tr:nth-child(even){background:#fafafa}
.tnote{color:#555;font-size:.85em;margin:0 0 1.2em}.src{color:#777;font-size:.8em}
figure{margin:1em 0 1.8em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.88em;color:#444}.note{background:#fff4e5;border-left:4px solid #e69f00;padding:.4em .7em;
font-size:.9em}.warn{color:#8a5300;font-size:.85em}
ul.notes li{margin:.2em 0}details{font-size:.85em;margin:.2em 0}pre{white-space:pre-wrap;overflow-wrap:break-word}
td.cmd{max-width:32em;text-align:left;word-break:normal;overflow-wrap:normal}
td.cmd code{white-space:pre-wrap;word-break:normal;overflow-wrap:normal}
.headline{border:2px solid #0072b2;border-radius:6px;background:#f5f9fc;padding:.2em 1.1em .6em;margin:1em 0 2em}
.headline h2{margin-top:.4em;border:0}.headline p{margin:.4em 0}
"""


def _esc(text: Any) -> str:
    return _html.escape("" if text is None else str(text), quote=True)


def _sections(report: Report) -> list[tuple[str, list, list[Table]]]:
    out = []
    for name in (*SECTIONS, "Inputs"):
        figs = [f for f in report.figures if f.section == name]
        tabs = [t for t in report.tables if t.section == name]
        if figs or tabs:
            out.append((name, figs, tabs))
    return out


def _made_by(report: Report) -> tuple[str, str, str]:
    prov = report.provenance or {}
    return (
        prov.get("command") or "kdtool plot report",
        prov.get("kdtool_version") or __version__,
        prov.get("created") or "",
    )


def _counts(report: Report) -> str:
    drawn = sum(1 for f in report.figures if f.file)
    failed = sum(1 for f in report.figures if not f.file)
    return (
        f"{len(report.artifacts)} kdtool files, {drawn} figures drawn"
        + (f", {failed} not drawn" if failed else "")
        + f", {len(report.tables)} tables"
    )


# --------------------------------------------------------------------------------------------- HTML


def _cls(name: str) -> str:
    return f' class="{name}"' if name else ""


def _html_table(t: Table) -> str:
    head = "".join(
        f"<th{_cls('t' if f == 'text' else '')}>{_esc(c)}</th>" for c, f in zip(t.columns, t.formats, strict=True)
    )
    body = []
    for row in t.rows:
        cells = []
        for col, v, f in zip(t.columns, row, t.formats, strict=True):
            if col == "command" and v:  # wraps at spaces only: a command never breaks inside a word
                cells.append(f'<td class="cmd"><code>{_esc(format_cell(v, f))}</code></td>')
                continue
            cls = "cmd" if col == "command" else ("t" if f == "text" else "")
            cells.append(f"<td{_cls(cls)}>{_esc(format_cell(v, f))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    src = ", ".join(f"<code>{_esc(s)}</code>" for s in t.sources[:6]) + (" …" if len(t.sources) > 6 else "")
    out = [
        f'<h3 id="table-{_esc(t.key)}">{_esc(t.title)}</h3>',
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
    ]
    if t.note or (src and t.key != "inputs"):
        out.append(
            f'<p class="tnote">{_esc(t.note)}'
            + (f' <span class="src">from {src}</span>' if src and t.key != "inputs" else "")
            + "</p>"
        )
    return "\n".join(out)


def _html_figure(f: FigureResult) -> str:
    if f.file is None:
        return f'<h3>{_esc(f.title)}</h3>\n<p class="note">{_esc(f.note)}</p>'
    # warnings raised while drawing go to stderr and report.json, never into the page
    inputs = ", ".join(f"<code>{_esc(i)}</code>" for i in f.inputs)
    return (
        f'<figure id="fig-{_esc(f.file.rsplit("/", 1)[-1].rsplit(".", 1)[0])}"><h3>{_esc(f.title)}</h3>'
        f'<img src="{_esc(f.file)}" alt="{_esc(f.title)}">'
        f'<figcaption>{_esc(f.caption)}. <span class="src">kdtool plot {_esc(f.figure)} {inputs}</span>'
        "</figcaption></figure>"
    )


def _html_inputs_provenance(report: Report) -> str:
    parts = []
    for a in report.artifacts:
        if a.provenance:
            parts.append(
                f"<details><summary><code>{_esc(a.rel)}</code> provenance</summary><pre>"
                f"{_esc(json.dumps(a.provenance, indent=1, default=str))}</pre></details>"
            )
    return "\n".join(parts)


def _html_headline(report: Report) -> str:
    if not report.headline:
        return ""
    out = ['<section class="headline" id="headline"><h2>Headline</h2>']
    for card in report.headline:
        if len(report.headline) > 1 or card.teacher:
            out.append(f"<h3>{_esc(card_title(card))}</h3>")
        out += [_html_table(t) for t in card.tables]
        out += [f"<p>{_esc(line)}</p>" for line in card.lines]
    out.append("</section>")
    return "\n".join(out)


def html(report: Report) -> str:
    """The whole report page (UTF-8 text)."""
    command, version, created = _made_by(report)
    body = [
        f"<h1>kdtool report: {_esc(report.run_dir.name or report.run_dir)}</h1>",
        f'<p class="meta">Run folder <code>{_esc(report.run_dir)}</code>. {_esc(_counts(report))}.<br>'
        f"Made by <code>{_esc(command)}</code> with kdtool {_esc(version)}"
        + (f" at {_esc(created)}" if created else "")
        + ".</p>",
    ]
    body.append(_html_headline(report))
    sections = _sections(report)
    body.append(
        "<p>"
        + " · ".join(f'<a href="#{_esc(_anchor(n))}">{_esc(n)}</a>' for n, _, _ in sections)
        + (' · <a href="#notes">Notes</a>' if report.notes or report.unavailable else "")
        + "</p>"
    )
    if report.notes:
        body.append(
            f'<p class="note">{len(report.notes)} problem(s) while building this report: see '
            '<a href="#notes">Notes</a>.</p>'
        )
    for name, figs, tabs in sections:
        body.append(f'<h2 id="{_esc(_anchor(name))}">{_esc(name)}</h2>')
        body += [_html_table(t) for t in tabs]
        body += [_html_figure(f) for f in figs]
        if name == "Inputs":
            body.append(_html_inputs_provenance(report))
    if report.notes or report.unavailable:
        body.append('<h2 id="notes">Notes</h2><ul class="notes">')
        body += [f"<li>{_esc(n)}</li>" for n in report.notes]
        if report.unavailable:
            body.append(
                "<li>The inputs allow these figures, which this kdtool has not registered (kdtool plot "
                f"--list): {_esc(', '.join(report.unavailable))}.</li>"
            )
        body.append("</ul>")
    prov = json.dumps(report.provenance or {}, indent=1, default=str)
    body.append(f"<details><summary>Provenance of this report</summary><pre>{_esc(prov)}</pre></details>")
    title = f"kdtool report: {report.run_dir.name or report.run_dir}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="generator" content="kdtool {_esc(version)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _anchor(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())


# --------------------------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    """Plain text safe inside a Markdown table cell, heading or emphasis: no pipes, stars or line breaks."""
    for ch in ("\\", "|", "*", "_", "`", "[", "]", "<"):
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def _md_code(text: str) -> str:
    """`text` as a code span (a longer fence when it holds backticks; pipes escaped for tables)."""
    text = str(text).replace("\n", " ").replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_table(t: Table) -> str:
    lines = [
        f"### {_md_cell(t.title)}",
        "",
        "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
        "|" + "|".join(":---" if f == "text" else "---:" for f in t.formats) + "|",
    ]
    for row in t.rows:
        cells = [
            _md_code(v) if c in ("file", "log", "command") and v else _md_cell(format_cell(v, f))
            for c, v, f in zip(t.columns, row, t.formats, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tail = f"*{_md_cell(t.note)}*" if t.note else ""
    if t.sources and t.key != "inputs":
        tail += (" " if tail else "") + "From " + ", ".join(_md_code(s) for s in t.sources[:6]) + "."
    if tail:
        lines += ["", tail]
    return "\n".join(lines) + "\n"


def _md_figure(f: FigureResult) -> str:
    if f.file is None:
        return f"### {_md_cell(f.title)}\n\n> **Not drawn:** {_md_cell(f.note or '')}\n"
    lines = [
        f"### {_md_cell(f.title)}",
        "",
        f"![{_md_cell(f.title)}]({f.file})",
        "",
        f"*{_md_cell(f.caption)}.* " + _md_code(f"kdtool plot {f.figure} {' '.join(f.inputs)}"),
    ]
    return "\n".join(lines) + "\n"


def _md_headline(report: Report) -> list[str]:
    if not report.headline:
        return []
    out = ["## Headline", ""]
    for card in report.headline:
        if len(report.headline) > 1 or card.teacher:
            out += [f"**{_md_cell(card_title(card))}**", ""]
        out += [_md_table(t) for t in card.tables]
        out += [f"> {_md_cell(line)}" + ("  " if i < len(card.lines) - 1 else "") for i, line in enumerate(card.lines)]
        out += [""] if card.lines else []
    return out


def markdown(report: Report) -> str:
    """The report as GitHub-flavoured Markdown (figures by relative path)."""
    command, version, created = _made_by(report)
    out = [
        f"# kdtool report: {_md_cell(report.run_dir.name or str(report.run_dir))}",
        "",
        f"Run folder {_md_code(report.run_dir)}. {_counts(report)}.  ",
        f"Made by {_md_code(command)} with kdtool {version}" + (f" at {created}" if created else "") + ".",
        "",
        *_md_headline(report),
    ]
    for name, figs, tabs in _sections(report):
        out += [f"## {name}", ""]
        out += [_md_table(t) for t in tabs]
        out += [_md_figure(f) for f in figs]
    if report.notes or report.unavailable:
        out += ["## Notes", ""]
        out += [f"- {_md_cell(n)}" for n in report.notes]
        if report.unavailable:
            out.append(
                "- The inputs allow these figures, which this kdtool has not registered (kdtool plot --list): "
                + ", ".join(report.unavailable)
                + "."
            )
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- JSON


def _table_json(t: Table) -> dict:
    return {
        "key": t.key,
        "section": t.section,
        "title": t.title,
        "columns": t.columns,
        "formats": t.formats,
        "rows": t.rows,
        "sources": t.sources,
        "note": t.note,
    }


def as_json(report: Report) -> dict:
    """report.json: what was found, drawn and tabulated, with raw numbers (kind kdtool.report)."""
    return {
        "kind": KIND,
        "run_dir": str(report.run_dir),
        "figures": [
            {
                "figure": f.figure,
                "section": f.section,
                "title": f.title,
                "file": f.file,
                "inputs": f.inputs,
                "note": f.note,
                "warnings": f.warnings,
            }
            for f in report.figures
        ],
        "unavailable": report.unavailable,
        "notes": report.notes,
        "headline": {
            "models": [
                {
                    "teacher": c.teacher,
                    "lines": c.lines,
                    "tables": [_table_json(t) for t in c.tables],
                    "sources": c.sources,
                }
                for c in report.headline
            ]
        },
        "tables": [_table_json(t) for t in report.tables],
        "inputs": [
            {"path": a.rel, "kind": a.kind, "details": a.details, "provenance": a.provenance} for a in report.artifacts
        ],
        "provenance": report.provenance,
    }
