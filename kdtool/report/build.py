"""`kdtool plot report RUN_DIR`: every figure a run folder allows, on one HTML and one Markdown page.

Three steps, each a plain function:

1. `discover(run_dir)` finds the kdtool files in the folder by their own metadata, never by name:
   Parquet schema `kdtool.kind`, JSON top-level `kind`, activation-cache/teacher-cache manifests,
   SAE folders (cfg.json + weights) and student folders (kdtool.json). Files without a kind are
   ignored; files that cannot be read become notes.
2. `plan_figures(artifacts)` maps artifact kinds to figure kinds with the table FIGURES below and
   keeps the figure kinds registered in kdtool.plots.KINDS (a kind another module has not landed
   yet is listed as "not available", not drawn).
3. `build_report(run_dir, out_dir)` draws each planned figure by calling its registered function
   (a figure that fails becomes a one-line note, the rest of the report goes on), builds the key
   tables (kdtool/report/tables.py) and writes, atomically:
       REPORT_DIR/figures/*.png   the figures (provenance in their PNG text chunks)
       REPORT_DIR/index.html      self-contained page (inline CSS, relative image paths, no network)
       REPORT_DIR/README.md       the same content as Markdown
       REPORT_DIR/report.json     kind kdtool.report: figures, notes, tables (raw numbers), inputs, provenance

Library code: no printing; warnings go to the `on_warning` callback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdtool import formats
from kdtool.errors import BadInput, KdtoolError

KIND = "kdtool.report"
#: JSON files bigger than this are not opened while looking for kdtool files (tokenizers, datasets).
MAX_JSON_BYTES = 16 * 2**20
#: Folders never searched: checkpoints and resumable part files hold nothing a report shows.
SKIP_DIRS = {"checkpoint", "checkpoints", "__pycache__", "node_modules"}
SAE_WEIGHTS = ("sae_weights.safetensors", "sae.safetensors")
#: Figure format of the report (embedded in HTML and Markdown).
FIGURE_SUFFIX = ".png"

Warn = Callable[[str], None]


@dataclass
class Artifact:
    """One kdtool file (or folder) found in the run folder."""

    path: Path  # file or folder
    rel: str  # path relative to the run folder, for display
    kind: str  # kdtool kind, e.g. kdtool.stats
    provenance: dict | None = None
    summary: Any = None  # Parquet kdtool.summary, or the JSON object itself for JSON artifacts
    details: str = ""  # a short description for the inputs table (rows, layer, tokens, ...)


@dataclass(frozen=True)
class FigureRule:
    """Which figure a set of artifact kinds allows, and how its inputs are chosen."""

    figure: str  # figure kind in kdtool.plots.KINDS
    inputs: tuple[str, ...]  # artifact kinds it reads; the first kind present in the run is used
    #: one figure from all those files ("run"), one per file ("file"), or one per SAE run folder ("sae-run":
    #: train logs grouped by the folder above their layer{L}/, so two train-sae runs do not share a figure)
    per: Literal["run", "file", "sae-run"]
    section: str  # report section the figure goes to
    title: str
    extra: tuple[str, ...] = ()  # artifact kinds appended to the inputs when present (optional inputs)
    hints: tuple[str, ...] = ()  # options filled from the run: "widths" (student widths), "d_star"
    extra_scope: Literal["run", "folder"] = "run"  # extras from anywhere, or only beside the main input


SECTIONS = ("SAE measurements", "Predicted floors", "Distillation", "Calibration", "Probing", "Toy model")

# Artifact kinds (docs/formats.md) the figures read.
STATS, PREDICT, SAE_LOG = "kdtool.stats", "kdtool.predict", "kdtool.sae.train_log"
CURVES, FLOORS, CALIB = "kdtool.distill.curves", "kdtool.distill.floors", "kdtool.calibration"
PROBE, TOY, TOY_CURVES = "kdtool.probe", "kdtool.toy", "kdtool.toy.curves"
_S, _P, _D, _C, _PR, _T = SECTIONS

#: Artifact kinds -> figure kinds: the one place that decides what a run folder allows.
# fmt: off
FIGURES: tuple[FigureRule, ...] = (
    #          figure                    inputs           per     section
    FigureRule("sae-curves",             (SAE_LOG,),      "sae-run", _S, "SAE training curves (Fig. 4, 15)"),
    FigureRule("l0-mse",                 (SAE_LOG, STATS), "sae-run", _S, "Sparsity vs reconstruction (L0 vs MSE)",
               extra=(STATS,)),
    FigureRule("sae-layers",             (STATS,),        "run",  _S, "Per-layer SAE measurements (Table 1)"),
    FigureRule("importance",             (STATS,),        "file", _S, "Feature importance by rank (Fig. 5a)"),
    FigureRule("capacity",               (STATS,),        "run",  _S, "Capacity and critical width (Fig. 1)"),
    FigureRule("floor",                  (STATS, PREDICT), "file", _P, "Predicted floor vs width (Fig. 5b)",
               hints=("widths",)),
    FigureRule("distill-curves",         (CURVES,),       "file", _D, "Distillation curves (Fig. 6a)",
               extra=(FLOORS,), extra_scope="folder"),
    FigureRule("floors",                 (FLOORS,),       "file", _D, "Distillation floor vs width (Fig. 6b)",
               extra=(STATS,)),
    FigureRule("calibration",            (CALIB,),        "file", _C, "Observed vs predicted floors (Fig. 7)"),
    FigureRule("calibration-normalized", (CALIB,),        "file", _C, "Normalised predicted vs observed (Fig. 17)",
               hints=("d_star",)),
    FigureRule("decomposition",          (CALIB, FLOORS), "file", _C, "Geometric vs baseline floor (Table 5)"),
    FigureRule("probe",                  (PROBE,),        "run",  _PR, "Linear probes (Fig. 8)"),
    FigureRule("toy-grid",               (TOY,),          "file", _T, "Floor vs width, all configurations (Fig. 2)"),
    FigureRule("toy-scatter",            (TOY,),          "file", _T, "Predicted vs actual floor (Fig. 3)"),
    FigureRule("toy-accuracy",           (TOY,),          "file", _T, "Prediction accuracy (Fig. 10, 11)"),
    FigureRule("toy-scaling",            (TOY,),          "file", _T, "Floor vs d_S / d* (Fig. 13)"),
    FigureRule("toy-curves",             (TOY_CURVES,),   "file", _T, "Toy training curves (Fig. 14)"),
)
# fmt: on


@dataclass
class FigureJob:
    rule: FigureRule
    inputs: list[Artifact]
    file: str  # path relative to the report folder, e.g. figures/floor.png
    options: dict


@dataclass
class FigureResult:
    figure: str  # figure kind
    section: str
    title: str
    caption: str
    file: str | None  # relative path of the PNG, None when it failed
    inputs: list[str]  # relative input paths
    note: str | None = None  # why it could not be drawn
    warnings: list[str] = field(default_factory=list)


@dataclass
class Report:
    run_dir: Path
    out_dir: Path
    artifacts: list[Artifact]
    figures: list[FigureResult]
    tables: list  # report_tables.Table
    notes: list[str]  # problems with inputs and figures, one line each
    unavailable: list[str]  # figure kinds the run allows but this kdtool has not registered
    provenance: dict | None

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"


# --------------------------------------------------------------------------------------------- discovery


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def natural_key(text: str) -> list:
    """Sort key that puts layer6 before layer12."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, KdtoolError) else f"{type(exc).__name__}: {msg}".rstrip(": ")


def _read_json_quiet(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _parquet_artifact(path: Path, root: Path) -> Artifact | None:
    import pyarrow.parquet as pq

    meta = formats.parquet_metadata(path)  # BadInput when unreadable
    if not meta["kind"]:
        return None
    rows = pq.ParquetFile(path).metadata.num_rows
    summary = meta["summary"]
    details = f"{rows:,} rows"
    if meta["kind"] == "kdtool.stats" and isinstance(summary, dict) and isinstance(summary.get("layers"), dict):
        details += ", layers " + ", ".join(sorted(summary["layers"], key=lambda s: (len(s), s)))
    elif meta["kind"] == "kdtool.sae.train_log" and isinstance(summary, dict) and summary.get("layer") is not None:
        details += f", layer {summary['layer']}"
    return Artifact(path, _rel(path, root), meta["kind"], meta["provenance"], summary, details)


def _json_artifact(path: Path, root: Path) -> Artifact | None:
    obj = formats.read_json(path)  # BadInput when not valid JSON
    kind = obj.get("kind")
    if not (isinstance(kind, str) and kind.startswith("kdtool.")) or kind == KIND:
        return None
    details = ""
    if isinstance(obj.get("rows"), list):
        details = f"{len(obj['rows']):,} rows"
    elif isinstance(obj.get("points"), list):
        details = f"{len(obj['points'])} points"
    return Artifact(path, _rel(path, root), kind, obj.get("provenance"), obj, details)


def _folder_artifact(folder: Path, root: Path, names: set[str]) -> tuple[Artifact | None, bool]:
    """A kdtool folder recognised by its marker file: (artifact or None, prune its subfolders)."""
    if "manifest.json" in names:
        m = _read_json_quiet(folder / "manifest.json")
        if m and isinstance(m.get("kind"), str) and m["kind"].startswith("kdtool."):
            if m["kind"] == "kdtool.acts":
                layers = ", ".join(map(str, m.get("layers") or []))
                details = f"{m.get('model', '?')}, {int(m.get('tokens') or 0):,} tokens, layers {layers}"
                details += f", d_model {m.get('d_model')}"
                shuffled = m.get("shuffle") if isinstance(m.get("shuffle"), dict) else None
                details += f", shuffled (seed {shuffled.get('seed')})" if shuffled else ", document order"
            else:
                details = ", ".join(f"{k} {m[k]}" for k in ("topk", "temperature", "vocab_size") if k in m)
            return Artifact(folder, _rel(folder, root), m["kind"], m.get("provenance"), m, details), True
    if "cfg.json" in names and any(w in names for w in SAE_WEIGHTS):
        cfg = _read_json_quiet(folder / "cfg.json") or {}
        kd = cfg.get("kdtool") if isinstance(cfg.get("kdtool"), dict) else {}
        bits = []
        if kd.get("layer") is not None:
            bits.append(f"layer {kd['layer']}")
        for key in ("d_in", "d_sae"):
            if cfg.get(key) is not None:
                bits.append(f"{key} {cfg[key]}")
        norm = kd.get("normalize") if isinstance(kd.get("normalize"), dict) else {}
        if norm.get("method") not in (None, "none"):
            bits.append(f"trained on x / {norm.get('scale', 0):.3g} ({norm['method']}, folded)")
        layout = "kdtool" if kd else ("saelens" if "sae_weights.safetensors" in names else "sparsify")
        bits.append(f"{layout} layout")
        return Artifact(folder, _rel(folder, root), "kdtool.sae", cfg.get("provenance"), cfg, ", ".join(bits)), False
    if "kdtool.json" in names:  # a distilled student (HF save_pretrained + kdtool.json)
        info = _read_json_quiet(folder / "kdtool.json")
        if info and isinstance(info.get("kind"), str):
            floor = info.get("floor") if isinstance(info.get("floor"), dict) else {}
            details = f"width {floor['width']}" if "width" in floor else ""
            return Artifact(folder, _rel(folder, root), info["kind"], info.get("provenance"), info, details), True
    if "report.json" in names:  # another report inside the run folder: not an input
        rep = _read_json_quiet(folder / "report.json")
        if rep and rep.get("kind") == KIND:
            return None, True
    return None, False


def discover(run_dir: str | os.PathLike, *, exclude: list[Path] = ()) -> tuple[list[Artifact], list[str]]:
    """The kdtool files under `run_dir` (sorted by path) and one-line notes about files that could not be read."""
    root = Path(run_dir)
    if not root.is_dir():
        raise BadInput(f"{root}: not a folder (kdtool plot report takes a run folder)")
    excluded = {p.resolve() for p in exclude}
    artifacts: list[Artifact] = []
    notes: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here.resolve() in excluded:
            dirnames[:] = []
            continue
        names = set(filenames)
        found, prune = _folder_artifact(here, root, names)
        if found is not None:
            artifacts.append(found)
        dirnames[:] = (
            []
            if prune
            else sorted(
                d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".parts")
            )
        )
        if prune:
            continue
        for name in sorted(filenames):
            if name.startswith("."):  # temporary files of atomic writes, editor files
                continue
            path = here / name
            suffix = path.suffix.lower()
            try:
                if suffix in (".parquet", ".pq"):
                    art = _parquet_artifact(path, root)
                elif suffix == ".json" and name not in ("cfg.json", "manifest.json"):
                    if path.stat().st_size > MAX_JSON_BYTES:
                        continue
                    art = _json_artifact(path, root)
                else:
                    continue
            except Exception as exc:  # one unreadable file must not stop the report
                msg = _one_line(exc)
                msg = msg[len(f"{path}: ") :] if msg.startswith(f"{path}: ") else msg  # the note names the file
                notes.append(f"{_rel(path, root)}: skipped, {msg}")
                continue
            if art is not None:
                artifacts.append(art)
    artifacts.sort(key=lambda a: natural_key(a.rel))
    return artifacts, notes


# --------------------------------------------------------------------------------------------- figures


def _slug(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0] if "/" not in rel.rsplit(".", 1)[-1] else rel
    out = "".join(ch if ch.isalnum() else "-" for ch in stem).strip("-").lower()
    while "--" in out:
        out = out.replace("--", "-")
    return out or "input"


def student_widths(artifacts: list[Artifact]) -> list[int] | None:
    """The distilled widths (floors tables), else the predicted widths (predict tables); None without either."""
    for kinds in (("kdtool.distill.floors",), ("kdtool.predict",)):
        widths: set[int] = set()
        for art in artifacts:
            if art.kind in kinds:
                try:
                    cols = formats.read_table(art.path, required=("width",))
                    widths.update(int(w) for w in formats.numeric_column(cols, "width", art.path, positive=True))
                except KdtoolError:
                    continue
        if widths:
            return sorted(widths)
    return None


def _d_star_for(calib: Artifact, artifacts: list[Artifact]) -> float | None:
    """d* of the layer a calibration used, from a stats summary (the only layer when it names none)."""
    layer = ((calib.summary or {}).get("inputs") or {}).get("layer") if isinstance(calib.summary, dict) else None
    found: dict[str, float] = {}
    for art in artifacts:
        if art.kind == "kdtool.stats" and isinstance(art.summary, dict):
            for key, info in (art.summary.get("layers") or {}).items():
                if isinstance(info, dict) and isinstance(info.get("d_star"), (int, float)):
                    found.setdefault(str(key), float(info["d_star"]))
    if layer is not None:
        return found.get(str(layer))
    return next(iter(found.values())) if len(found) == 1 else None


def _groups(main: list[Artifact], per: str) -> list[list[Artifact]]:
    if per == "run" or len(main) == 1:
        return [main]
    if per == "file":
        return [[a] for a in main]
    by_folder: dict[Path, list[Artifact]] = {}
    for a in main:  # sae-run: saes/layer6/train_log.parquet -> saes (a stats file stands alone)
        key = a.path.parent.parent if a.kind == SAE_LOG else a.path
        by_folder.setdefault(key, []).append(a)
    return list(by_folder.values())


def plan_figures(
    artifacts: list[Artifact], *, registered: dict | None = None, options: dict | None = None
) -> tuple[list[FigureJob], list[str]]:
    """The figures the artifacts allow: (jobs for registered figure kinds, allowed kinds not registered)."""
    if registered is None:
        from kdtool.plots import KINDS as registered
    base = {"layer": None, "widths": None, "features": None, "alpha": None, "capacity": "paper", "title": None}
    base.update({k: v for k, v in (options or {}).items() if v is not None})
    widths = base["widths"] or student_widths(artifacts)
    jobs: list[FigureJob] = []
    unavailable: list[str] = []
    for rule in FIGURES:
        kind = next((k for k in rule.inputs if any(a.kind == k for a in artifacts)), None)
        if kind is None:
            continue
        if rule.figure not in registered:
            unavailable.append(rule.figure)
            continue
        main = [a for a in artifacts if a.kind == kind]
        groups = _groups(main, rule.per)
        for group in groups:
            extra = [a for a in artifacts if a.kind in rule.extra]
            if rule.extra_scope == "folder":
                extra = [a for a in extra if a.path.parent == group[0].path.parent]
            opts = dict(base)
            if "widths" in rule.hints and widths:
                opts["widths"] = widths
            if "d_star" in rule.hints:
                d_star = _d_star_for(group[0], artifacts)
                if d_star is not None:
                    opts["d_star"] = d_star
            label = group[0].rel  # sae-run: name the figure after the run folder (fixed/saes/layer6/... -> fixed/saes)
            if rule.per == "sae-run" and group[0].kind == SAE_LOG and label.count("/") >= 2:
                label = label.rsplit("/", 2)[0]
            name = rule.figure if len(groups) == 1 else f"{rule.figure}--{_slug(label)}"
            while any(j.file == f"figures/{name}{FIGURE_SUFFIX}" for j in jobs):
                name += "-2"
            jobs.append(
                FigureJob(rule, group + [a for a in extra if a not in group], f"figures/{name}{FIGURE_SUFFIX}", opts)
            )
    return jobs, unavailable


def _close_all_figures() -> None:
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def render_figure(
    job: FigureJob, out_dir: Path, *, style: str, registered: dict, provenance: dict | None, on_warning: Warn
) -> FigureResult:
    """Draw one figure with its registered function; any failure becomes the result's note."""
    import importlib

    from kdtool import provenance as prov_mod
    from kdtool.plots import style as plot_style

    module_name, function_name, caption = registered[job.rule.figure]
    if "." not in module_name:
        module_name = f"kdtool.plots.{module_name}"
    result = FigureResult(job.rule.figure, job.rule.section, job.rule.title, caption, None, [a.rel for a in job.inputs])
    output = out_dir / job.file
    paths = [a.path for a in job.inputs]
    prov = None
    if provenance is not None:
        prov = {
            **provenance,
            "inputs": [prov_mod.fingerprint(p) for p in paths],
            "config": {"kind": job.rule.figure, "style": style, "options": job.options, "report": True},
        }
    try:
        fn = getattr(importlib.import_module(module_name), function_name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with plot_style.provenance_context(prov, kind=f"kdtool.figure.{job.rule.figure}"):
                fn(paths, output, style=style, options=dict(job.options))
        if not output.is_file():
            raise RuntimeError(f"{module_name}.{function_name} wrote no file")
        result.file = job.file
        result.warnings = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if str(w.message)))
        for w in result.warnings:
            on_warning(f"{job.file}: {w}")
    except Exception as exc:  # a failing figure is a note in the report, not the end of it
        msg = _one_line(exc)
        for art in job.inputs:  # paths as the report shows them, relative to the run folder
            msg = msg.replace(str(art.path), art.rel)
        result.note = f"{job.rule.figure} ({', '.join(result.inputs)}): not drawn, {msg}"
        on_warning(result.note)
    finally:
        _close_all_figures()
    return result


# --------------------------------------------------------------------------------------------- build


def _remove_stale_figures(out_dir: Path, keep: set[str]) -> None:
    """Delete figures a previous report in this folder drew and this one did not (only those it listed)."""
    old = _read_json_quiet(out_dir / "report.json")
    if not old or old.get("kind") != KIND:
        return
    for fig in old.get("figures") or []:
        rel = fig.get("file") if isinstance(fig, dict) else None
        if isinstance(rel, str) and rel.startswith("figures/") and "/.." not in rel and rel not in keep:
            (out_dir / rel).unlink(missing_ok=True)


def build_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    style: str = "paper",
    options: dict | None = None,
    provenance: dict | None = None,
    on_warning: Warn | None = None,
    on_figure: Callable[[FigureResult], None] | None = None,
    registered: dict | None = None,
) -> Report:
    """Discover, draw, tabulate and write the report of `run_dir` into `out_dir` (default RUN_DIR/report).

    options: figure options applied to every figure (layer, widths, capacity); widths default to the
    run's student widths. Raises BadInput when the folder holds no kdtool file at all.
    """
    from kdtool.report import page as report_page
    from kdtool.report import tables as report_tables

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise BadInput(f"-o {out}: exists and is not a folder (the report is a folder: index.html, figures/)")
    warn = on_warning or (lambda _msg: None)
    if registered is None:
        from kdtool.plots import KINDS as registered
    registered = {k: v for k, v in registered.items() if k != "report"}
    artifacts, notes = discover(run_dir, exclude=[out])
    if not artifacts:
        raise BadInput(
            f"{run_dir}: no kdtool files found (looked for Parquet/JSON with a kdtool kind, activation caches, "
            "SAE and student folders)"
        )
    for n in notes:
        warn(n)
    jobs, unavailable = plan_figures(artifacts, registered=registered, options=options)
    figures = []
    for job in jobs:
        res = render_figure(job, out, style=style, registered=registered, provenance=provenance, on_warning=warn)
        figures.append(res)
        if on_figure is not None:
            on_figure(res)
    notes += [f.note for f in figures if f.note]
    tables, table_notes = report_tables.build_tables(artifacts)
    table_notes = [n.replace(f"{run_dir}/", "") for n in table_notes]
    for n in table_notes:
        warn(n)
    notes += table_notes
    report = Report(run_dir, out, artifacts, figures, tables, notes, unavailable, provenance)
    _remove_stale_figures(out, {f.file for f in figures if f.file})
    formats.write_text(out / "index.html", report_page.html(report))
    formats.write_text(out / "README.md", report_page.markdown(report))
    formats.write_json(out / "report.json", report_page.as_json(report))
    return report


def plot_report(inputs: list[Path], output: Path | None, *, style: str, options: dict) -> None:
    """The KINDS entry "report": inputs = [RUN_DIR], output = the report folder (default RUN_DIR/report)."""
    if len(inputs) != 1:
        raise BadInput(f"plot report: give exactly one run folder, got {len(inputs)} inputs")
    build_report(inputs[0], output, style=style, options=options)
