"""kdtool survival: which teacher features each student keeps, against Theorem 1's staircase (paper section 8).

Thin: parse options into kdtool.survival.job.SurvivalConfig and SurvivalInputs, call `survival_files`
(teacher, SAEs, students, held-out text -> survival.parquet), print the per-width summary table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common, options
from kdtool.cli.options import TeacherFlags, with_teacher_flags

PANEL = "Survival"
Capacity = options.choices("SurvivalCapacity", "paper", "naive")


def _opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, rich_help_panel=PANEL, **kw)


@with_teacher_flags
def main(
    sae: Annotated[
        list[Path], _opt("--sae", "-s", help="Teacher SAE folder (any layout), one per layer; saes/ = all of them.")
    ],
    students: Annotated[
        list[Path],
        _opt(
            "--students",
            help="A `kdtool distill` folder (all its width{W}[-{loss}]/ students) or a model folder; repeatable.",
        ),
    ],
    stats: Annotated[
        Optional[Path],
        _opt(
            "--stats",
            help="`kdtool stats` file of the same SAEs: importance ranks and alpha (default: measured).",
            dir_okay=False,
            show_default=False,
        ),  # fmt: skip
    ] = None,
    layer: options.layers_option("Layer of each SAE, in --sae order, when its files do not say.", PANEL) = None,
    tokens: options.tokens_option("Held-out tokens read in all: map fit + measurement (default 1M).", PANEL) = None,
    fit_fraction: Annotated[float, _opt("--fit-fraction", help="Share of the tokens the maps are fitted on.")] = 0.5,
    ridge: Annotated[
        str, _opt("--ridge", help="Maps' ridge lambda, relative to the mean variance; auto: best on held-out rows.")
    ] = "auto",
    threshold: Annotated[float, _opt("--threshold", help="A feature survives iff its r2 is >= this.")] = 0.5,
    min_fires: Annotated[int, _opt("--min-fires", help="Teacher firings a feature needs to be measured.")] = 10,
    fire_threshold: Annotated[
        float, _opt("--fire-threshold", help="Firing = latent above this x the RMS residual norm (0: z > 0).")
    ] = 1e-3,
    capacity: Annotated[Capacity, _opt("--capacity", help="F_S = floor(d_S g): g(alpha) or 1.")] = Capacity.paper,
    batch_size: Annotated[int, _opt("--batch-size", min=1, help="Sequences per forward.")] = 8,
    chunk_tokens: Annotated[int, _opt("--chunk-tokens", min=1, help="Rows encoded at once.")] = 2048,
    drop_first: Annotated[bool, _opt("--drop-first/--keep-first", help="Skip position 0 of each sequence.")] = True,
    max_norm_ratio: Annotated[
        float, _opt("--max-norm-ratio", help="Skip positions whose teacher norm is above this x the median (0: off).")
    ] = 50.0,
    output: Annotated[Path, _opt("--output", "-o", help="Per-feature survival (Parquet).", dir_okay=False)] = Path(
        "survival.parquet"
    ),
    fmt: common.FormatOpt = None,
    *,
    flags: TeacherFlags,
) -> None:
    """Measure which teacher SAE features each student keeps, against the predicted staircase.

    Maps each student's layer-L residual stream into the teacher's by ridge least squares (fitted on
    the first --fit-fraction of the held-out tokens), reads it through the teacher's SAE encoder, and
    per feature compares with the teacher's own latents on the remaining tokens: r2, fire recall and
    precision, survived (r2 >= --threshold), predicted_kept (importance rank < F_S = floor(d_S g)).
    The teacher against itself is the reference (1.0). Writes OUTPUT (survival.parquet) and prints
    per student (width and distill loss; on stderr, on stdout with --json or --format): survived vs
    F_S, staircase agreement, Spearman(r2, importance), importance mass kept.
    Students of different losses are never pooled.

    Example: kdtool survival --sae saes/layer12 --students students --stats stats.parquet --tokens 200K
    """
    from kdtool import locks
    from kdtool.cli.options import load_teacher
    from kdtool.errors import BadInput
    from kdtool.survival import job, summary
    from kdtool.survival.config import SurvivalConfig

    # the options are named after SurvivalConfig's fields; --tokens, --capacity and --ridge need parsing first
    opts = locals()
    given = {f.name: opts[f.name] for f in dataclasses.fields(SurvivalConfig) if f.name in opts}
    n_tokens = SurvivalConfig.tokens if tokens is None else options.parse_tokens(tokens)
    try:
        lam = None if ridge == "auto" else float(ridge)
    except ValueError:
        raise BadInput(f"--ridge must be a number or auto, got {ridge!r}") from None
    cfg = SurvivalConfig(**given | {"tokens": n_tokens, "capacity": capacity.value, "ridge": lam})
    layers = options.parse_layers(layer)
    inputs = job.SurvivalInputs(
        saes=tuple(sae),
        students=tuple(students),
        teacher=flags.model_spec(),
        data=flags.data_spec(),
        stats=stats,
        layers=None if layers is None else tuple(layers),
        output=output,
    )
    # one survival run writes OUTPUT at a time (kdtool/locks.py), its stale temporary files cleared first
    with locks.claim(output, command=common.command_line()), common.progress() as bar:
        task = bar.add_task("survival", total=cfg.tokens, rate="")
        result = job.survival_files(
            inputs,
            cfg,
            load_teacher=load_teacher,
            provenance=common.make_provenance,
            notify=common.log,
            on_progress=lambda n: bar.update(task, completed=n),
        )
    for note in result.summary["notes"]:
        common.warn(note)
    t = result.summary["tokens"]
    common.log(f"wrote {output} (maps fitted on {t['fit']:,} tokens, survival measured on {t['measured']:,})")
    title = f"feature survival (r2 >= {cfg.threshold:g}; importance {result.summary['importance_source']})"
    described = {"kind": summary.SUMMARY_KIND, "provenance": result.provenance, "summary": result.summary}
    common.emit_summary(summary.table(result.rows), fmt=fmt, title=title, **described)
