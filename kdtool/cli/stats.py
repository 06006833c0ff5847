"""kdtool stats: per-feature statistics of SAEs over activations -> stats.parquet (paper section 5.2).

Thin: parse the options into a kdtool.sae.stats.StatsConfig, call kdtool.sae.stats.run (load each
--sae in any layout, stream the activations through them, the robust count, and with --fidelity
the teacher with each SAE spliced in), write stats.parquet and print one row per SAE.

--fidelity is an option of stats rather than its own command because its numbers belong beside
F and d* in the same file, and its mean ablation uses the mean activation the stats pass measures.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common, options
from kdtool.cli.options import StreamBatchSizeOpt, StreamDropFirstOpt, StreamOpt, TeacherFlags, with_teacher_flags

PANEL, ROBUST, FIDELITY = "Stats", "Robust feature count", "Fidelity in the model"

DecoderNorm = options.choices("DecoderNorm", "fold", "raw")


def _opt(names: str, help: str, panel: str = PANEL, **kw):
    return typer.Option(*names.split(), help=help, rich_help_panel=panel, **kw)


SaeOpt = Annotated[list[Path], _opt("--sae -s", "SAE folder (kdtool, SAELens, sparsify) or ae.pt "
    "(dictionary_learning); repeat for several, several per layer too (widths, lambdas, seeds, "
    "saes/layer12/checkpoints: one row set each); a folder of SAE folders means all of them.",
    show_default=False)]  # fmt: skip
LayerOpt = options.layers_option("Layer of each SAE, in --sae order (12 or 8,12,16), when its files do not say.", PANEL)
TokensOpt = options.tokens_option("Measure on at most this many tokens (default: all cached).", PANEL)
AliveOpt = Annotated[float, _opt("--alive-threshold", "A feature is alive iff its firing frequency is above this.")]
NormOpt = Annotated[DecoderNorm, _opt("--decoder-norm", "fold: measure z_i * ||W_dec[i]|| (residual-stream units; "
    "no change for unit-norm SAEs); raw: z as the SAE outputs it.")]  # fmt: skip
ChunkOpt = Annotated[int, _opt("--chunk-tokens", "Tokens encoded at once (memory: chunk x d_sae floats).", min=1)]
OutOpt = Annotated[Optional[Path], _opt("--output -o", "Save the per-feature stats table here (Parquet), the input of "
    "`kdtool predict`; `-o -`: to stdout (--format). Without -o nothing is saved: the per-SAE summary goes to "
    "stdout.", dir_okay=False, show_default=False)]  # fmt: skip
AnyLayerOpt = Annotated[bool, _opt("--any-layer", "Measure an SAE on the --layer given even when its files record "
    "another layer (an SAE trained on layer 12 measured on layer 8).")]  # fmt: skip
CosineOpt = Annotated[float, _opt("--robust-cosine", "Latents whose decoder rows have at least this cosine are one "
    "feature (de-duplication).", ROBUST)]  # fmt: skip
MassOpt = Annotated[
    float, _opt("--robust-mass", "F_robust = fewest features carrying this share of sum E[h^2].", ROBUST)
]
ThetaOpt = Annotated[
    float, _opt("--robust-theta", "A feature is active on a token when h > theta * E[h^2]/E[h].", ROBUST)
]
FidelityOpt = Annotated[bool, _opt("--fidelity", "Also run the teacher on held-out text with each SAE spliced in, "
    "zero- and mean-ablated: CE, KL, ce_loss_score, kl_div_score (SAELens definitions).", FIDELITY)]  # fmt: skip
FidTokensOpt = Annotated[str, _opt("--fidelity-tokens", "Held-out tokens to score (whole sequences).", FIDELITY)]
FidBatchOpt = Annotated[int, _opt("--fidelity-batch-size", "Sequences per teacher forward.", FIDELITY, min=1)]


@with_teacher_flags
def main(
    sae: SaeOpt,
    acts: options.acts_option(PANEL) = None,
    layer: LayerOpt = None,
    tokens: TokensOpt = None,
    alive_threshold: AliveOpt = 1e-5,
    decoder_norm: NormOpt = DecoderNorm.fold,
    chunk_tokens: ChunkOpt = 4096,
    robust_cosine: CosineOpt = 0.9,
    robust_mass: MassOpt = 0.99,
    robust_theta: ThetaOpt = 0.2,
    fidelity: FidelityOpt = False,
    fidelity_tokens: FidTokensOpt = "64K",
    fidelity_batch_size: FidBatchOpt = 2,
    output: OutOpt = None,
    any_layer: AnyLayerOpt = False,
    fmt: common.FormatOpt = None,
    stream: StreamOpt = False,
    batch_size: StreamBatchSizeOpt = 8,
    drop_first: StreamDropFirstOpt = True,
    *,
    flags: TeacherFlags,
) -> None:
    """Measure each SAE's features: F, L0, alpha, g(alpha), d*, the robust F/alpha/d*, and with --fidelity
    the model's loss with the SAE spliced in (paper section 5.2, Table 1).

    One streaming pass over the activations: per latent the fire count, frequency, mean
    activation, importance E[z^2] and maximum; alive iff frequency > --alive-threshold. F = alive
    latents, L0 = mean active latents per token, alpha = 1 - L0/F, d* = F/g; F_robust, alpha_robust,
    d_star_robust do not grow with the SAE's width (docs/sae.md). Several SAEs of one layer give one
    row set each (the sensitivity of d*). Prints one row per SAE on stdout; with -o OUTPUT saves
    the per-feature table (one row per feature per SAE, the summary in its metadata) for `kdtool
    predict` and prints the rows on stderr instead. --acts defaults to the cache the SAE was
    trained on (its cfg.json records it), else ./acts.

    Example: kdtool stats --sae saes/layer12 --fidelity --fidelity-tokens 16K -o stats.parquet
    """
    from kdtool import formats, locks
    from kdtool.errors import BadInput
    from kdtool.models import resolve_device
    from kdtool.sae import fidelity as fid
    from kdtool.sae import robust, sources
    from kdtool.sae import stats as sae_stats

    device = str(resolve_device(flags.device))
    cfg = sae_stats.StatsConfig(
        alive_threshold=alive_threshold,
        decoder_norm=decoder_norm.value,
        max_tokens=options.parse_tokens(tokens),
        chunk_tokens=chunk_tokens,
        device=device,
        robust=robust.RobustConfig(robust_cosine, robust_mass, robust_theta),
        fidelity=fid.FidelityConfig(
            common.parse_opt("--fidelity-tokens", _count, fidelity_tokens), fidelity_batch_size, drop_first
        )
        if fidelity
        else None,
    )
    saved = not common.to_stdout(output)
    if saved and not formats.is_parquet(output):
        raise BadInput(f"--output {output}: stats are written as Parquet (.parquet)")
    teacher = None
    if sources.wants_stream(acts=acts, stream=stream, model=flags.model, dataset=flags.dataset):
        mspec = replace(flags.model_spec(), device=device)
        teacher = sources.TeacherStream(mspec, flags.data_spec(), options.load_teacher, batch_size, drop_first)
    claim = locks.claim(output, command=common.command_line()) if saved else contextlib.nullcontext()
    with claim:  # one stats run writes OUTPUT at a time
        with common.progress() as bar:
            tasks = {}

            def tick(name: str):
                def update(total, n):
                    if name not in tasks:  # one task per phase (setdefault would add a task on every call)
                        tasks[name] = bar.add_task(name, total=total)
                    bar.update(
                        tasks[name], completed=n, total=None if total is None else max(total, n)
                    )  # the last batch may overshoot

                return update

            result = sae_stats.run(cfg, sae, options.parse_layers(layer), acts, teacher, base_spec=flags.model_spec(),
                                   load=options.load_teacher, on_progress=tick("stats"), any_layer=any_layer,
                                   on_fidelity_progress=tick("fidelity"), on_sae=_log_sae)  # fmt: skip
        for note in result.notes:
            common.warn(note)
        provenance = common.make_provenance(
            inputs=result.inputs,
            seed=flags.seed,
            config={
                "alive_threshold": cfg.alive_threshold,
                "source": result.summary["source"],
                "decoder_norm": cfg.decoder_norm,
            },
        )
        title = f"SAE statistics ({output if saved else 'not saved: -o FILE.parquet saves the per-feature table'})"
        if output is None:  # the data is the per-SAE summary: stdout (table on a TTY, CSV in a pipe, JSON with --json)
            common.emit_table(result.table(), fmt=fmt, output=None, kind="kdtool.stats.summary", provenance=provenance,
                              title=title, summary=result.summary)  # fmt: skip
            return
        if not saved:  # -o -: the per-feature table itself to stdout
            common.emit_table(result.columns, fmt=fmt, output=output, kind=sae_stats.STATS_KIND,
                              provenance=provenance, summary=result.summary)  # fmt: skip
            common.show_table(result.table(), title="SAE statistics")
            return
        formats.write_parquet(
            output, result.columns, kind=sae_stats.STATS_KIND, provenance=provenance, summary=result.summary
        )
    common.log(
        f"wrote {output} ({len(result.columns['feature']):,} features, {len(result.summary['saes'])} SAE(s), "
        f"{result.tokens:,} tokens); next: kdtool predict {output} --widths 128,256,512"
    )
    common.emit_summary(result.table(), fmt=fmt, kind="kdtool.stats.summary", provenance=provenance, title=title,
                        summary=result.summary)  # fmt: skip


def _log_sae(s) -> None:
    common.log(f"sae {s.describe()} (layer from {s.layer_source})")


def _count(text: str) -> int:
    from kdtool.parsing import parse_count

    return parse_count(text)
