"""Figure registry: `kdtool plot KIND INPUT... -o FIG` looks KIND up here.

Each entry names a module and a function with the signature
    fn(inputs: list[pathlib.Path], output: pathlib.Path, *, style: str, options: dict) -> None
that reads kdtool files, draws with matplotlib (Agg, chosen by kdtool.plots.style) and saves through
kdtool.plots.style.save (format from the suffix, atomic). One module per figure family.
`options` carries the generic plot flags (keys and types: see kdtool/cli/plot.py, e.g.
{"layer": [12], "widths": [128, 256]} plus any `--set KEY=VALUE`); functions ignore unknown keys.

Names, not imports: `kdtool plot --help` and TAB completion list the kinds from this module, so it
must load without matplotlib; `figure_function` imports a family's module when a figure is drawn.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from kdtool import kinds
from kdtool.errors import BadInput
from kdtool.plots import style as plot_style

#: the registry signature: fn(inputs, output, *, style, options) -> None
FigureFunction = Callable[..., None]

#: kind -> (module, function, one-line help naming the paper figure)
KINDS: dict[str, tuple[str, str, str]] = {
    "capacity": (
        "kdtool.plots.capacity",
        "capacity",
        "Fig. 1: g(alpha) and d* = F/g against alpha (input: stats files, optional)",
    ),
    "importance": (
        "kdtool.plots.floor",
        "importance",
        "Fig. 5a: feature importance vs rank, log-log, one line per layer (input: stats files)",
    ),
    "floor": (
        "kdtool.plots.floor",
        "floor",
        "Fig. 5b: predicted floor vs width, one line per layer, d* marked (input: stats or predict files)",
    ),
    "calibration": (
        "kdtool.plots.calibration",
        "calibration",
        "Fig. 7: observed vs predicted floors, linear and affine fits with R^2 (input: calib.json)",
    ),
    "calibration-normalized": (
        "kdtool.plots.calibration",
        "calibration_normalized",
        "Fig. 17: normalised predicted vs observed floors against width (input: calib.json)",
    ),
    "survival": (
        "kdtool.plots.survival",
        "survival",
        "Section 8: per-feature survival r2 vs importance rank per student, F_S and the staircase marked; "
        "survived count vs width against d_S g(alpha) (input: survival.parquet)",
    ),
    "probe": (
        "kdtool.plots.probe",
        "probe",
        "Fig. 8: probe accuracy heatmap (concepts x models) and change vs teacher (input: probe.parquet)",
    ),
    "distill-curves": (
        "kdtool.plots.distill",
        "curves",
        "Fig. 6a/16a: held-out KL vs step per width, floors dashed; training KL (input: students/)",
    ),
    "floors": (
        "kdtool.plots.distill_floors",
        "floors",
        "Fig. 6b: KL floor vs student width, one line per loss, seeds pooled; d* marked with a stats file, "
        "the predicted floor with a predict table (input: floors.parquet... [stats] [predict])",
    ),
    "objective-ablation": (
        "kdtool.plots.distill_floors",
        "floors",
        "same as `floors`, for floors tables of several losses and seeds (the name kdtool plot report uses)",
    ),
    "decomposition": (
        "kdtool.plots.distill",
        "decomposition",
        "Table 5: floor = baseline B + geometric part per width (input: calib.json or floors.parquet)",
    ),
    "sae-curves": (
        "kdtool.plots.sae",
        "curves",
        "Fig. 4/15: SAE reconstruction MSE, L1 term, L0 and fraction alive vs tokens, one line per layer "
        "(input: saes/ or train_log.parquet files)",
    ),
    "layers": (
        "kdtool.plots.sae",
        "layers",
        "Table 1 card: rows = SAEs, columns = F, L0, alpha, g, d*, MSE, dead (+ robust F and d*, fidelity scores "
        "when measured), shaded per column (input: stats files)",
    ),
    "sae-layers": ("kdtool.plots.sae", "layers", "same as `layers` (the name kdtool plot report uses)"),
    "layer-capacity": (
        "kdtool.plots.sae_trials",
        "capacity_by_layer",
        "alpha, g(alpha) and d* side by side against the layer, one series per SAE trial (input: stats files)",
    ),
    "layer-correlation": (
        "kdtool.plots.sae_trials",
        "correlation",
        "Pearson r across layers between SAE metrics (L0, alpha, g, d*, F, dead, MSE, expl. var.), one heatmap "
        "per SAE trial (input: stats files, >= 3 layers)",
    ),
    "sae-headline": (
        "kdtool.plots.sae_trials",
        "headline",
        "mean alpha, mean L0, total dead and mean d* of each SAE trial, as number tiles (input: stats files)",
    ),
    "l0-mse": (
        "kdtool.plots.sae",
        "l0_mse",
        "L0 vs reconstruction MSE per layer: stats files as points, train logs as trajectories "
        "(input: stats files, saes/ or train_log.parquet files)",
    ),
    "sensitivity": (
        "kdtool.plots.sensitivity",
        "sensitivity",
        "F, alpha, d* and the floor at chosen widths (paper and robust) against SAE width, lambda, seed or "
        "training tokens, one line per layer (input: stats files with several SAEs of a layer; --set x=...)",
    ),
    "toy-grid": (
        "kdtool.plots.toy",
        "grid",
        "Fig. 2: toy floor vs d_S, rows n, columns alpha; measured mean +- std per d_T, Eq. 2 dashed, "
        "d* dotted (input: toy.parquet)",
    ),
    "toy-scatter": (
        "kdtool.plots.toy",
        "scatter",
        "Fig. 3: predicted vs measured toy floors, log-log, refined and naive panels, colour = alpha "
        "(input: toy.parquet)",
    ),
    "toy-accuracy": (
        "kdtool.plots.toy",
        "accuracy",
        "Fig. 11: median accuracy of Eq. 2 per toy configuration, alpha x d_T, one panel per n (input: toy.parquet)",
    ),
    "toy-scaling": (
        "kdtool.plots.toy",
        "scaling",
        "Fig. 13: toy floor / total importance vs d_S / d*, all configurations (input: toy.parquet)",
    ),
    "toy-curves": (
        "kdtool.plots.toy",
        "curves",
        "Fig. 14: toy student training curves per width, Eq. 2 floors dashed "
        "(input: toy.curves.parquet from kdtool toy --log-curves)",
    ),
    "toy-survival": (
        "kdtool.plots.toy_survival",
        "staircase",
        "Toy survival staircase: fraction of seeds keeping each feature vs importance rank, a line per d_S, "
        "Eq. 2's F_S marked; rows alpha, columns n (input: toy.survival.parquet or toy.parquet)",
    ),
    "toy-kept": (
        "kdtool.plots.toy_survival",
        "kept_counts",
        "Toy kept features vs d_S per alpha against Eq. 2's floor(d_S g(alpha)) and d_S g_meas "
        "(input: toy.survival.parquet or toy.parquet)",
    ),
    # Not a figure: a run folder in, a report folder out. build_report(run_dir, out_dir, ...) has its own
    # signature; kdtool/cli/plot.py hands this kind to kdtool/cli/plot_report.py.
    "report": (
        "kdtool.report.build",
        "build_report",
        "every figure a run folder allows + index.html and README.md with the key tables "
        "(input: RUN_DIR; -o REPORT_DIR, default RUN_DIR/report)",
    ),
}


_STATS = ("kdtool.stats",)
_SAE_RUN = ("kdtool.sae", "kdtool.sae.checkpoint", "kdtool.sae.train_log")
_TOY = ("kdtool.toy",)

#: kind -> the recorded kinds (kdtool/kinds.py) its inputs may have; a file recording another kind is refused.
#: Files that record no kind (a CSV a user wrote) pass: the figure's reader checks their columns.
ACCEPTS: dict[str, tuple[str, ...]] = {
    "capacity": _STATS,
    "importance": _STATS,
    "floor": ("kdtool.stats", "kdtool.predict"),
    "calibration": ("kdtool.calibration",),
    "calibration-normalized": ("kdtool.calibration",),
    "survival": ("kdtool.survival",),
    "probe": ("kdtool.probe",),
    "distill-curves": ("kdtool.distill.floors", "kdtool.distill.curves"),
    "floors": ("kdtool.distill.floors", "kdtool.stats", "kdtool.predict"),
    "objective-ablation": ("kdtool.distill.floors", "kdtool.stats", "kdtool.predict"),
    "decomposition": ("kdtool.calibration", "kdtool.distill.floors"),
    "sae-curves": _SAE_RUN,
    "layers": _STATS,
    "sae-layers": _STATS,
    "layer-capacity": _STATS,
    "layer-correlation": _STATS,
    "sae-headline": _STATS,
    "l0-mse": _STATS + _SAE_RUN,
    "sensitivity": _STATS,
    "toy-grid": _TOY,
    "toy-scatter": _TOY,
    "toy-accuracy": _TOY,
    "toy-scaling": _TOY,
    "toy-curves": ("kdtool.toy.curves", "kdtool.toy"),  # toy.parquet: the curves file beside it
    "toy-survival": ("kdtool.toy.survival", "kdtool.toy"),
    "toy-kept": ("kdtool.toy.survival", "kdtool.toy"),
}


def check_inputs(kind: str, inputs: list[Path]) -> None:
    """Refuse an input whose recorded kind `kind` does not draw (BadInput naming both); `report` takes a folder."""
    accepted = ACCEPTS.get(kind)
    if accepted is None:
        return
    for path in inputs:
        kinds.expect(path, accepted, f"plot {kind}")


def entry(kind: str, registered: dict[str, tuple[str, str, str]] | None = None) -> tuple[str, str, str]:
    """(module, function, help) of `kind` in `registered` (default KINDS); BadInput for a kind not registered."""
    kinds = KINDS if registered is None else registered
    if kind not in kinds:
        raise BadInput(f"unknown figure kind {kind!r}; kinds: {', '.join(kinds)}")
    module_name, function_name, help_text = kinds[kind]
    if "." not in module_name:  # registry entries may name a module of kdtool.plots by its short name
        module_name = f"kdtool.plots.{module_name}"
    return module_name, function_name, help_text


def figure_function(kind: str, registered: dict[str, tuple[str, str, str]] | None = None) -> FigureFunction:
    """The function that draws `kind`, its module imported now (see `entry`)."""
    module_name, function_name, _ = entry(kind, registered)
    return getattr(importlib.import_module(module_name), function_name)


def draw(
    kind: str,
    inputs: list[Path],
    output: Path,
    *,
    style: str = "paper",
    options: dict | None = None,
    provenance: dict | None = None,
    registered: dict[str, tuple[str, str, str]] | None = None,
) -> Path:
    """Draw one registered figure from `inputs` into `output` (with `provenance` in its metadata); returns output."""
    fn = figure_function(kind, registered)
    with plot_style.provenance_context(provenance, kind=f"kdtool.figure.{kind}"):
        fn(list(inputs), Path(output), style=style, options=dict(options or {}))
    return Path(output)
