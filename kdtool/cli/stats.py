"""kdtool stats: per-feature statistics of SAEs over activations -> stats.parquet (paper section 5.2).

Thin: load each --sae (kdtool, SAELens, sparsify or dictionary_learning layout, auto-detected by
kdtool.sae.layouts), stream the cached activations (or a teacher) through them
(kdtool.sae.stats: load_saes, open_activations, measure), write stats.parquet and print one
summary row per layer.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli import common, options
from kdtool.cli.options import StreamBatchSizeOpt, StreamDropFirstOpt, StreamOpt, TeacherFlags, with_teacher_flags

PANEL = "Stats"

DecoderNorm = options.choices("DecoderNorm", "fold", "raw")

ActsOpt = options.acts_option(PANEL)
LayerOpt = options.layers_option(
    "Layer of each SAE, in --sae order (12 or 8,12,16), when its files do not say (or to override them).", PANEL
)
TokensOpt = options.tokens_option("Measure on at most this many tokens (default: all cached).", PANEL)


@with_teacher_flags
def main(
    sae: Annotated[
        list[Path],
        typer.Option(
            "--sae",
            "-s",
            help="SAE folder (kdtool, SAELens, sparsify) or ae.pt (dictionary_learning); "
            "repeat for several; a folder of SAE folders (saes/) means all of them.",
            rich_help_panel=PANEL,
            show_default=False,
        ),
    ],
    acts: ActsOpt = None,
    layer: LayerOpt = None,
    tokens: TokensOpt = None,
    alive_threshold: Annotated[
        float,
        typer.Option(
            "--alive-threshold",
            help="A feature is alive iff its firing frequency is above this.",
            rich_help_panel=PANEL,
        ),
    ] = 1e-5,
    decoder_norm: Annotated[
        DecoderNorm,
        typer.Option(
            "--decoder-norm",
            help="fold: measure z_i * ||W_dec[i]|| (residual-stream units; "
            "no change for unit-norm SAEs); raw: z as the SAE outputs it.",
            rich_help_panel=PANEL,
        ),
    ] = DecoderNorm.fold,
    chunk_tokens: Annotated[
        int,
        typer.Option(
            "--chunk-tokens",
            min=1,
            help="Tokens encoded at once (memory: chunk x d_sae floats).",
            rich_help_panel=PANEL,
        ),
    ] = 4096,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The stats table (Parquet).", dir_okay=False, rich_help_panel=PANEL)
    ] = Path("stats.parquet"),
    fmt: common.FormatOpt = None,
    stream: StreamOpt = False,
    batch_size: StreamBatchSizeOpt = 8,
    drop_first: StreamDropFirstOpt = True,
    *,
    flags: TeacherFlags,
) -> None:
    """Measure each SAE's features: F, L0, alpha, g(alpha), d*, dead latents, MSE (paper section 5.2, Table 1).

    One streaming pass over the activations per run: per latent the fire count, frequency, mean
    activation, importance E[z^2] and maximum; alive iff frequency > --alive-threshold. Writes
    OUTPUT (stats.parquet: one row per feature per layer, the summary in its metadata) for
    `kdtool predict`, and prints one row per layer: F = alive latents, L0 = mean active latents
    per token, alpha = 1 - L0/F, g, d* = F/g, dead, MSE, explained variance.

    Example: kdtool stats --sae saes/layer12 -o stats.parquet
    """
    from kdtool import formats
    from kdtool.errors import BadInput
    from kdtool.models import resolve_device
    from kdtool.sae import sources
    from kdtool.sae import stats as sae_stats

    cfg = sae_stats.StatsConfig(
        alive_threshold=alive_threshold,
        decoder_norm=decoder_norm.value,
        max_tokens=options.parse_tokens(tokens),
        chunk_tokens=chunk_tokens,
        device=str(resolve_device(flags.device)),
    )
    if not formats.is_parquet(output):
        raise BadInput(f"--output {output}: stats are written as Parquet (.parquet)")
    teacher = None
    if sources.wants_stream(acts=acts, stream=stream, model=flags.model, dataset=flags.dataset):
        mspec = replace(flags.model_spec(), device=cfg.device)
        teacher = sources.TeacherStream(mspec, flags.data_spec(), options.load_teacher, batch_size, drop_first)
    paths, saes = sae_stats.load_saes(sae, options.parse_layers(layer))
    for s in saes:
        common.log(f"sae {s.describe()} (layer from {s.layer_source})")
    source = sae_stats.open_activations(sorted({s.layer for s in saes}), acts, teacher, max_tokens=cfg.max_tokens)
    with common.progress() as bar:
        task = bar.add_task("stats", total=source.total, rate="")
        result = sae_stats.measure(cfg, saes, source, on_progress=lambda n: bar.update(task, completed=n))
    for note in result.notes:
        common.warn(note)
    provenance = common.make_provenance(
        inputs=[*source.inputs, *paths],
        seed=flags.seed,
        config={"alive_threshold": cfg.alive_threshold, "source": source.info, "decoder_norm": cfg.decoder_norm},
    )
    formats.write_parquet(
        output, result.columns, kind=sae_stats.STATS_KIND, provenance=provenance, summary=result.summary
    )
    common.log(
        f"wrote {output} ({len(result.columns['feature']):,} features, {len(result.summary['layers'])} layer(s), "
        f"{result.tokens:,} tokens); next: kdtool predict {output} --widths 128,256,512"
    )
    common.emit_table(
        result.table(),
        fmt=fmt,
        output=None,
        kind="kdtool.stats.summary",
        provenance=provenance,
        title=f"SAE statistics ({output})",
        summary=result.summary,
    )
