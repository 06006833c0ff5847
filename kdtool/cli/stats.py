"""kdtool stats: per-feature statistics of SAEs over activations -> stats.parquet (paper section 5.2).

Thin: load each --sae (kdtool, SAELens, sparsify or dictionary_learning layout, auto-detected by
kdtool.sae.layouts), stream the cached activations (or a teacher) through them
(kdtool.sae.stats), write stats.parquet and print one summary row per layer.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common
from kdtool.cli.options import (
    StreamBatchSizeOpt,
    StreamDropFirstOpt,
    StreamOpt,
    TeacherFlags,
    with_teacher_flags,
)

PANEL = "Stats"


class DecoderNorm(str, Enum):
    fold = "fold"
    raw = "raw"


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
    acts: Annotated[
        Optional[Path],
        typer.Option(
            "--acts",
            help="Activation cache from `kdtool cache-acts` [default: acts].",
            file_okay=False,
            rich_help_panel=PANEL,
            show_default=False,
        ),
    ] = None,
    layer: Annotated[
        Optional[str],
        typer.Option(
            "--layer",
            "-l",
            help="Layer of each SAE, in --sae order (12 or 8,12,16), when its files do not say (or to override them).",
            rich_help_panel=PANEL,
            show_default=False,
        ),
    ] = None,
    tokens: Annotated[
        Optional[str],
        typer.Option(
            "--tokens",
            help="Measure on at most this many tokens (default: all cached).",
            rich_help_panel=PANEL,
            show_default=False,
        ),
    ] = None,
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
    import torch

    from kdtool import formats
    from kdtool.errors import BadInput
    from kdtool.parsing import parse_count, parse_int_list
    from kdtool.sae import stats as sae_stats
    from kdtool.sae.layouts import load_saes

    if not (0 <= alive_threshold < 1):
        raise BadInput(f"--alive-threshold must be in [0, 1), got {alive_threshold}")
    if output.suffix.lower() not in (".parquet", ".pq"):
        raise BadInput(f"--output {output}: stats are written as Parquet (.parquet)")
    max_tokens = common.parse_opt("--tokens", parse_count, tokens) if tokens is not None else None
    stream = stream or flags.model is not None or flags.dataset is not None
    if stream and acts is not None:
        raise BadInput("--acts and --stream/--model/--dataset are two activation sources: give one")
    device = flags.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    override = common.parse_opt("--layer", lambda t: parse_int_list(t, minimum=0), layer) if layer is not None else None
    loaded = load_saes(sae, override)
    paths = [s.path for s in loaded]
    for s in loaded:
        common.log(f"sae {s.describe()} (layer from {s.layer_source})")
    layers = sorted({s.layer for s in loaded})

    if stream:
        from kdtool.cli.options import load_teacher
        from kdtool.models import check_layers
        from kdtool.sae.training import ModelSource

        if max_tokens is None:
            raise BadInput("--tokens: streaming from a teacher needs a token budget (e.g. --tokens 1M)")
        mspec = flags.model_spec()
        dspec = flags.data_spec()
        teacher = load_teacher(mspec)
        check_layers(layers, teacher.n_layers, "--layer")
        src = ModelSource(teacher, dspec, batch_size=batch_size, drop_first=drop_first)
        batches = src.model_rows(layers)
        d_model, inputs, source_info = teacher.d_model, src.inputs, src.info
        total = max_tokens
    else:
        from kdtool.acts.store import ActivationStore

        root = acts if acts is not None else Path("acts")
        store = ActivationStore(root)
        missing = [L for L in layers if L not in store.layers]
        if missing:
            raise BadInput(
                f"--acts {root}: layer(s) {missing} not cached (cached: {store.layers}); "
                "cache them with `kdtool cache-acts --layers ...` or give --layer"
            )
        batches = store.iter_shards(layers)
        d_model, inputs = store.d_model, [root / "manifest.json"]
        source_info = {k: store.manifest.get(k) for k in ("model", "revision", "dataset", "seq_len")} | {
            "acts": str(root),
            "source": "cache",
        }
        total = min(store.n_tokens, max_tokens) if max_tokens else store.n_tokens
    for s in loaded:
        if s.d_in != d_model:
            raise BadInput(
                f"{s.path}: SAE expects d_in={s.d_in} but the activations have d_model={d_model} "
                "(an SAE for another model?)"
            )

    with common.progress() as bar:
        task = bar.add_task("stats", total=total, rate="")
        accs = sae_stats.collect(
            [(s.layer, s) for s in loaded],
            batches,
            chunk_tokens=chunk_tokens,
            max_tokens=max_tokens,
            fold_decoder_norm=decoder_norm == DecoderNorm.fold,
            device=device,
            on_progress=lambda n: bar.update(task, completed=n),
        )
    columns, summary = sae_stats.tables(accs, alive_threshold)
    summary["source"] = source_info
    summary["decoder_norm"] = decoder_norm.value
    for info in summary["layers"].values():
        for note in info.pop("notes", []):
            common.warn(note)
    provenance = common.make_provenance(
        inputs=[*inputs, *paths],
        seed=flags.seed,
        config={"alive_threshold": alive_threshold, "source": source_info, "decoder_norm": decoder_norm.value},
    )
    formats.write_parquet(output, columns, kind=sae_stats.STATS_KIND, provenance=provenance, summary=summary)
    common.log(
        f"wrote {output} ({len(columns['feature']):,} features, {len(summary['layers'])} layer(s), "
        f"{accs[0][1].tokens:,} tokens); next: kdtool predict {output} --widths 128,256,512"
    )
    keys = ("F", "L0", "alpha", "g", "d_star", "dead", "d_sae", "mse", "explained_variance", "tokens")
    rows: dict[str, list] = {"layer": []} | {k: [] for k in keys}
    for L, info in sorted(summary["layers"].items(), key=lambda kv: int(kv[0])):
        rows["layer"].append(int(L))
        for k in keys:
            v = info.get(k)
            rows[k].append(formats.finite_or_none(v) if isinstance(v, float) else v)
    common.emit_table(
        rows,
        fmt=fmt,
        output=None,
        kind="kdtool.stats.summary",
        provenance=provenance,
        title=f"SAE statistics ({output})",
        summary=summary,
    )
