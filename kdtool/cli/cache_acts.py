"""kdtool cache-acts: run a teacher over text and cache its residual stream as safetensors shards.

Thin: parse options, load the teacher (kdtool.models) and text (kdtool.text.tokens), run
kdtool.acts.caching.cache_activations (and kdtool.acts.shuffle.shuffle_cache), report. The paper's run on a GPU:
    kdtool cache-acts --model EleutherAI/pythia-410m --dataset monology/pile-uncopyrighted --tokens 300M
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli import common
from kdtool.cli.options import TeacherFlags, choices, parse_tokens, with_teacher_flags

PANEL = "Cache"

ActsDtype = choices("ActsDtype", "auto", "float16", "bfloat16", "float32")


@with_teacher_flags
def main(
    layers: Annotated[
        str,
        typer.Option(
            "--layers",
            help="hidden_states indices to cache: '8,12,16', a range '4:20:4', 'all' (0..n_layers), 'middle' "
            "(n_layers // 2) or 'default' (the paper's 8,12,16 if the model has more than 16 blocks, else about "
            "1/3, 1/2, 2/3 of its depth). L = residual stream after block L; 0 = embeddings.",
            rich_help_panel=PANEL,
        ),
    ] = "default",
    tokens: Annotated[
        str,
        typer.Option(
            "--tokens", help="Token positions to cache per layer (300M, 2.5B, 50K ...).", rich_help_panel=PANEL
        ),
    ] = "200K",
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="Token positions per shard file.", rich_help_panel=PANEL)
    ] = "64K",
    acts_dtype: Annotated[
        ActsDtype,
        typer.Option(
            "--acts-dtype",
            help="Storage dtype of the shards: float16, bfloat16, float32, or auto (bfloat16 for a bf16 teacher, "
            "else float16).",
            rich_help_panel=PANEL,
        ),
    ] = ActsDtype.auto,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.", rich_help_panel=PANEL)
    ] = 8,
    drop_first: Annotated[
        bool,
        typer.Option(
            "--drop-first/--keep-first",
            help="Drop position 0 of every packed sequence (its activation norm is an outlier).",
            rich_help_panel=PANEL,
        ),
    ] = True,
    max_norm_ratio: Annotated[
        float,
        typer.Option(
            "--max-norm-ratio",
            min=0.0,
            help="Skip positions whose residual norm exceeds this many times the batch median at any cached layer "
            "(massive activations / attention sinks, ~100x in SmolLM2). 0 keeps every position.",
            rich_help_panel=PANEL,
        ),
    ] = 50.0,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Cache folder.", file_okay=False, rich_help_panel=PANEL)
    ] = Path("acts"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the cache in --output after its last complete shard; a finished cache is left as is and "
            "an empty folder starts fresh, so scripts can always pass it.",
            rich_help_panel=PANEL,
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a cache already in --output.", rich_help_panel=PANEL)
    ] = False,
    shuffle: Annotated[
        bool,
        typer.Option(
            "--shuffle",
            help="After caching, rewrite the cache in one seeded random order (the same for every layer) so "
            "train-sae batches mix many documents; out of core, memory about one --shuffle-bucket of one layer, "
            "disk about one more cache while it runs. With --resume on a finished cache: shuffles that cache.",
            rich_help_panel=PANEL,
        ),
    ] = False,
    shuffle_only: Annotated[
        bool,
        typer.Option(
            "--shuffle-only",
            help="Shuffle the finished cache in --output in place and exit: loads no model, reads no text, ignores "
            "the other cache options. Atomic: a killed shuffle leaves the cache as it was.",
            rich_help_panel=PANEL,
        ),
    ] = False,
    shuffle_seed: Annotated[
        int, typer.Option("--shuffle-seed", help="Seed of the on-disk shuffle.", rich_help_panel=PANEL)
    ] = 0,
    shuffle_bucket: Annotated[
        str,
        typer.Option(
            "--shuffle-bucket",
            help="Rows per shuffle bucket (buckets = tokens / this): the memory bound, about (this + 2 shards) x "
            "d_model x bytes per value.",
            rich_help_panel=PANEL,
        ),
    ] = "1M",
    *,
    flags: TeacherFlags,
) -> None:
    """Cache a teacher's residual stream (hidden_states[L]) as safetensors shards for train-sae and stats.

    One forward per batch gives every requested layer and stops after the deepest one. Writes
    OUTPUT/manifest.json and OUTPUT/layer{L}/shard-NNNNN.safetensors; a killed run leaves only
    complete shards and --resume continues it. With no options: the embedded SmolLM2-135M on the
    embedded corpus, layers 8, 12, 16 (of 30 blocks; the middle is 15), 200K tokens into acts/.
    The paper's run: --model EleutherAI/pythia-410m --dataset monology/pile-uncopyrighted --tokens 300M.

    Rows are stored in document order and train-sae mixes only a few shards at a time; --shuffle
    (or --shuffle-only on a finished cache) rewrites the cache in one global random order, so a
    batch sees rows of many documents. The manifest's `shuffle` record (seed, method) shows in
    `kdtool info`; a shuffled cache cannot grow with --resume.

    Example: kdtool cache-acts --layers 12 --tokens 200K -o acts --shuffle

    Example: kdtool cache-acts --shuffle-only -o acts --shuffle-seed 1
    """
    from kdtool import locks
    from kdtool.acts import caching
    from kdtool.cli.options import load_teacher
    from kdtool.parsing import parse_count

    bucket_tokens = common.parse_opt("--shuffle-bucket", parse_count, shuffle_bucket)
    if shuffle_only:
        _shuffle(output, shuffle_seed, bucket_tokens, cached=None)
        return
    n_tokens = parse_tokens(tokens)
    shard_tokens = common.parse_opt("--shard-size", parse_count, shard_size)
    mspec = flags.model_spec()
    dspec = flags.data_spec()
    cfg = caching.CacheConfig(
        output=output,
        tokens=n_tokens,
        shard_tokens=shard_tokens,
        acts_dtype=acts_dtype.value,
        batch_size=batch_size,
        drop_first=drop_first,
        max_norm_ratio=max_norm_ratio,
        resume=resume,
        overwrite=overwrite,
    )
    if dspec.dataset is not None and not dspec.local_inputs() and flags.offline:
        common.warn(f"--dataset {flags.dataset}: not a local path; with --offline it must be in the datasets cache")
    # the output's one writer from before the teacher loads (a second run is refused at once) through --shuffle
    with locks.claim(output, command=common.command_line()):
        teacher = load_teacher(mspec)
        cfg.layers = caching.parse_layers(layers, teacher.n_layers)
        inputs = [p for p in (teacher.path,) if p] + dspec.local_inputs()
        provenance = common.make_provenance(
            inputs=inputs,
            seed=flags.seed,
            config={"cache": cfg.__dict__, "data": dspec.describe(), "teacher": teacher.describe()},
        )
        common.log(
            f"caching hidden_states{cfg.layers} of {teacher.name} into {output}/ "
            f"({n_tokens:,} tokens per layer, seq_len {flags.seq_len})"
        )
        with common.progress() as bar:
            task = bar.add_task("cache-acts", total=n_tokens, rate="")
            on_progress = _progress_reporter(bar, task)
            result = caching.cache_activations(teacher, dspec, cfg, provenance=provenance, on_progress=on_progress)
        if result.finished:
            common.log(f"{output}/ already holds its {result.tokens:,} tokens (a finished cache): left as it is")
        if result.exhausted:
            common.warn(f"the data ran out after {result.tokens:,} tokens (asked for {n_tokens:,})")
        if not common.STATE.json and not result.finished:
            common.log(
                f"cached {result.tokens:,} tokens x {len(result.layers)} layers ({result.dtype}) in "
                f"{result.shards} shards at {output}/ ; this run: {result.new_tokens:,} tokens in "
                f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tok/s), "
                f"{result.dropped_outliers:,} outlier positions skipped (--max-norm-ratio {max_norm_ratio:g})"
            )
        if shuffle:
            _shuffle(output, shuffle_seed, bucket_tokens, cached=result.record())
        elif common.STATE.json:
            common.emit_json(result.record())


def _progress_reporter(bar, task):
    """on_progress for the caching job: the bar's rate (off a terminal common.progress logs it every 10 s)."""
    state = {"t0": None, "start": 0}

    def on_progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if state["t0"] is None:  # rates start after the first batch (model warm-up excluded)
            state["t0"], state["start"] = now, done
            bar.update(task, completed=done)
            return
        elapsed = now - state["t0"]
        rate = (done - state["start"]) / elapsed if elapsed > 0 else 0.0
        bar.update(task, completed=done, rate=f"{rate:,.0f} tok/s")

    return on_progress


def _shuffle(output: Path, seed: int, bucket_tokens: int, cached: dict | None) -> None:
    """Shuffle the cache in `output` on disk; report (with the caching run's summary when there was one)."""
    from kdtool.acts import shuffle

    shuffle.check_shufflable(output, seed)
    provenance = common.make_provenance(
        inputs=[output / "manifest.json"], seed=seed, config={"seed": seed, "bucket_tokens": bucket_tokens}
    )
    common.log(f"shuffling {output}/ on disk (seed {seed}, buckets of {bucket_tokens:,} rows)")
    with common.progress() as bar:
        task = bar.add_task("shuffle", total=1, rate="")

        def on_progress(phase: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, rate=phase)

        result = shuffle.shuffle_cache(
            output, seed=seed, bucket_tokens=bucket_tokens, provenance=provenance, on_progress=on_progress
        )
    out = {"kind": "kdtool.acts.shuffle", **result.as_dict()}
    if common.STATE.json:
        common.emit_json(out if cached is None else {**cached, "shuffle": out})
        return
    if result.skipped:
        common.log(f"{output}/ is already shuffled with seed {seed}; left as is")
        return
    common.log(
        f"shuffled {result.tokens:,} tokens x {len(result.layers)} layers into {result.shards} shards at {output}/ "
        f"in {result.seconds:.1f} s ({result.buckets} buckets, largest {result.max_bucket_rows:,} rows, "
        f"at most {result.peak_rows:,} rows of one layer in memory)"
    )
