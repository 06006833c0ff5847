"""Which figures a run folder allows and drawing them (`kdtool plot report`, steps 2 and 3).

`plan_figures(artifacts)` maps artifact kinds to figure kinds with the table FIGURES below and keeps
the figure kinds registered in kdtool.plots.registry.KINDS (a kind another module has not landed yet
is listed as "not available", not drawn). `render_figure(job, ...)` draws one planned figure with its
registered function; a figure that fails becomes a one-line note and the rest of the report goes on.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from kdtool import formats, teachers
from kdtool import provenance as prov_mod
from kdtool.distill import ablation
from kdtool.errors import KdtoolError
from kdtool.plots import registry
from kdtool.report import trials as trials_mod
from kdtool.report.discover import one_line
from kdtool.report.model import (
    CALIB,
    CURVES,
    FLOORS,
    PREDICT,
    PROBE,
    SAE_LOG,
    SECTIONS,
    STATS,
    SURVIVAL,
    TOY,
    TOY_CURVES,
    TOY_SURVIVAL,
    Artifact,
    FigureJob,
    FigureResult,
    FigureRule,
    model_groups,
    same_model,
)
from kdtool.sae.summary import entries, several_per_layer

#: Figure format of the report (embedded in HTML and Markdown).
FIGURE_SUFFIX = ".png"

Warn = Callable[[str], None]

_S, _P, _D, _A, _C, _SV, _PR, _T = SECTIONS

#: Artifact kinds -> figure kinds: the one place that decides what a run folder allows.
# fmt: off
FIGURES: tuple[FigureRule, ...] = (
    #          figure                    inputs           per     section
    FigureRule("sae-curves",             (SAE_LOG,),      "sae-run", _S, "SAE training curves (Fig. 4, 15)"),
    FigureRule("l0-mse",                 (SAE_LOG, STATS), "sae-run", _S, "Sparsity vs reconstruction (L0 vs MSE)",
               extra=(STATS,)),
    FigureRule("sae-headline",           (STATS,),        "trial", _S, "SAE trial at a glance"),
    FigureRule("sae-layers",             (STATS,),        "trial", _S, "Per-layer SAE measurements (Table 1)"),
    FigureRule("layer-capacity",         (STATS,),        "trial", _S, "alpha, g(alpha) and d* per layer"),
    FigureRule("layer-correlation",      (STATS,),        "trial", _S, "SAE metrics correlated across layers",
               min_layers=3),
    FigureRule("importance",             (STATS,),        "file", _S, "Feature importance by rank (Fig. 5a)"),
    FigureRule("capacity",               (STATS,),        "run",  _S, "Capacity and critical width (Fig. 1)"),
    FigureRule("sensitivity",            (STATS,),        "file", _S, "Sensitivity of F, α, d* and floors to the SAE",
               hints=("widths",), when="several-saes"),
    FigureRule("floor",                  (STATS, PREDICT), "file", _P, "Predicted floor vs width (Fig. 5b)",
               hints=("widths",)),
    FigureRule("distill-curves",         (CURVES,),       "file", _D, "Distillation curves (Fig. 6a)",
               extra=(FLOORS,), extra_scope="folder"),
    FigureRule("floors",                 (FLOORS,),       "file", _D, "Distillation floor vs width (Fig. 6b)",
               extra=(STATS,)),
    FigureRule("objective-ablation",     (FLOORS,),       "run",  _A, "Floor vs width per loss, seeds pooled",
               extra=(PREDICT, STATS), when="several-losses"),
    FigureRule("calibration",            (CALIB,),        "file", _C, "Observed vs predicted floors (Fig. 7)"),
    FigureRule("calibration-normalized", (CALIB,),        "file", _C, "Normalised predicted vs observed (Fig. 17)",
               hints=("d_star",)),
    FigureRule("decomposition",          (CALIB, FLOORS), "file", _C, "Geometric vs baseline floor (Table 5)"),
    FigureRule("survival",               (SURVIVAL,),     "file", _SV, "Which features survive (section 8)"),
    FigureRule("probe",                  (PROBE,),        "run",  _PR, "Linear probes (Fig. 8)"),
    FigureRule("toy-grid",               (TOY,),          "file", _T, "Floor vs width, all configurations (Fig. 2)"),
    FigureRule("toy-scatter",            (TOY,),          "file", _T, "Predicted vs actual floor (Fig. 3)"),
    FigureRule("toy-accuracy",           (TOY,),          "file", _T, "Prediction accuracy (Fig. 10, 11)"),
    FigureRule("toy-scaling",            (TOY,),          "file", _T, "Floor vs d_S / d* (Fig. 13)"),
    FigureRule("toy-curves",             (TOY_CURVES,),   "file", _T, "Toy training curves (Fig. 14)"),
    FigureRule("toy-survival",           (TOY_SURVIVAL,), "file", _T, "Which features survive, by importance rank"),
    FigureRule("toy-kept",               (TOY_SURVIVAL,), "file", _T, "Features kept vs width against Eq. 2"),
)
# fmt: on


def several_saes_per_layer(arts: list[Artifact]) -> bool:
    """Whether the stats files among `arts` (one file: the sensitivity rule draws per file) hold several SAEs of
    a layer: widths, lambdas, seeds or token checkpoints of one layer measured together."""
    return several_per_layer([e for a in arts if a.kind == STATS for e in entries(a.summary)])


def _slug(rel: str, *, path: bool = True) -> str:
    """A file-name-safe form of a path (its suffix dropped) or, path=False, of a label."""
    stem = rel.rsplit(".", 1)[0] if path and "/" not in rel.rsplit(".", 1)[-1] else rel
    out = "".join(ch if ch.isalnum() else "-" for ch in stem).strip("-").lower()
    while "--" in out:
        out = out.replace("--", "-")
    return out or "input"


def student_widths(artifacts: list[Artifact]) -> list[int] | None:
    """The distilled widths (floors tables), else the predicted widths (predict tables); None without either."""
    for kinds in ((FLOORS,), (PREDICT,)):
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
    """d* of the layer a calibration used, from a stats summary of the same model (the only layer when it names
    none); None when no stats file measures the calibration's model."""
    layer = ((calib.summary or {}).get("inputs") or {}).get("layer") if isinstance(calib.summary, dict) else None
    found: dict[str, float] = {}
    for art in artifacts:
        if art.kind == STATS and same_model(art, calib):
            for e in entries(art.summary):  # the first SAE of a layer (a calibration names a layer, not an SAE)
                if isinstance(e.info.get("d_star"), (int, float)):
                    found.setdefault(str(e.layer), float(e.info["d_star"]))
    if layer is not None:
        return found.get(str(layer))
    return next(iter(found.values())) if len(found) == 1 else None


def _several_losses(floors: list[Artifact]) -> bool:
    """True when the floors tables hold more than one loss (an objective ablation to show)."""
    try:
        return ablation.several_losses([a.path for a in floors])
    except KdtoolError:
        return False


#: FigureRule.when: a named condition on one group's main inputs, beyond their kind
CONDITIONS = {
    "several-losses": _several_losses,  # floors tables of more than one loss: an objective ablation
    "several-saes": several_saes_per_layer,  # a stats file with several SAEs of a layer: the sensitivity figure
}


def _trial_groups(main: list[Artifact], min_layers: int) -> list[tuple[list[Artifact], dict, str]]:
    """Per SAE trial of the stats files: (its files, {"trial": key}, its label); [] when they cannot be read."""
    by_path = {a.path: a for a in main}
    try:
        found = trials_mod.trials(list(by_path))
    except KdtoolError:  # an unreadable stats file: its own figures and tables say so
        return []
    return [([by_path[p] for p in t.paths], {"trial": t.key}, t.label) for t in found if len(t.layers) >= min_layers]


def _groups(main: list[Artifact], per: str) -> list[list[Artifact]]:
    if len(main) == 1:
        return [main]
    if per == "run":  # one figure per model: a figure never combines two teachers
        return model_groups(main)
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
        registered = registry.KINDS
    base = {"layer": None, "widths": None, "features": None, "alpha": None, "capacity": "paper", "title": None}
    base.update({k: v for k, v in (options or {}).items() if v is not None})
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
        if rule.per == "trial":
            groups_opts = _trial_groups(main, rule.min_layers)
        else:
            groups_opts = [(g, {}, g[0].rel) for g in _groups(main, rule.per)]
        groups_opts = [(g, o, lab) for g, o, lab in groups_opts if rule.when is None or CONDITIONS[rule.when](g)]
        groups = [g for g, _, _ in groups_opts]
        for group, group_opts, label in groups_opts:
            # extras and hints only from files of the main input's model (d* of another teacher is no hint)
            mine = [a for a in artifacts if same_model(a, group[0])]
            extra = [a for a in mine if a.kind in rule.extra]
            if rule.extra_scope == "folder":
                extra = [a for a in extra if a.path.parent == group[0].path.parent]
            opts = dict(base) | group_opts
            if "widths" in rule.hints and not base["widths"] and (widths := student_widths(mine)):
                opts["widths"] = widths
            if "d_star" in rule.hints:
                d_star = _d_star_for(group[0], mine)
                if d_star is not None:
                    opts["d_star"] = d_star
            # sae-run: name the figure after the run folder (fixed/saes/layer6/... -> fixed/saes); trial: its label;
            # run: the model (one figure per teacher)
            if rule.per == "sae-run" and group[0].kind == SAE_LOG and label.count("/") >= 2:
                label = label.rsplit("/", 2)[0]
            if rule.per == "run":
                label = teachers.short(group[0].teacher)
            trial = rule.per == "trial"
            name = (
                rule.figure
                if len(groups) == 1
                else f"{rule.figure}--{_slug(label, path=rule.per != 'run' and not trial)}"
            )
            while any(j.file == f"figures/{name}{FIGURE_SUFFIX}" for j in jobs):
                name += "-2"
            jobs.append(
                FigureJob(
                    rule,
                    group + [a for a in extra if a not in group],
                    f"figures/{name}{FIGURE_SUFFIX}",
                    opts,
                    # several figures of one rule: each title says which file, run, trial or model it shows
                    f"{rule.title} — {label}" if len(groups) > 1 else None,
                )
            )
    return jobs, unavailable


def _close_all_figures() -> None:
    """Close what a failed figure function left open, without importing pyplot when nothing did (it would
    pick a backend before kdtool.plots.style chooses Agg)."""
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def render_figure(
    job: FigureJob, out_dir: Path, *, style: str, registered: dict, provenance: dict | None, on_warning: Warn
) -> FigureResult:
    """Draw one figure with its registered function; any failure becomes the result's note."""
    module_name, function_name, caption = registry.entry(job.rule.figure, registered)
    title = job.title or job.rule.title
    result = FigureResult(job.rule.figure, job.rule.section, title, caption, None, [a.rel for a in job.inputs])
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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registry.draw(
                job.rule.figure, paths, output, style=style, options=job.options, provenance=prov, registered=registered
            )
        if not output.is_file():
            raise RuntimeError(f"{module_name}.{function_name} wrote no file")
        result.file = job.file
        result.warnings = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if str(w.message)))
        for w in result.warnings:
            on_warning(f"{job.file}: {w}")
    except Exception as exc:  # a failing figure is a note in the report, not the end of it
        msg = one_line(exc)
        for art in job.inputs:  # paths as the report shows them, relative to the run folder
            msg = msg.replace(str(art.path), art.rel)
        result.note = f"{job.rule.figure} ({', '.join(result.inputs)}): not drawn, {msg}"
        on_warning(result.note)
    finally:
        _close_all_figures()
    return result
