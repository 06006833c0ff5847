"""kdtool train-sae: train the paper's sparse autoencoders, one per layer, on cached or streamed activations.

Thin: parse options into kdtool.sae.config.TrainConfig, pick the activation source (the cache
written by cache-acts, or a teacher streamed through a shuffle buffer), run the trainer with a
progress bar, report one summary row per layer. The paper's run on a GPU:
    kdtool train-sae --layer 8,12,16 --expansion 32 --batch-tokens 32768 --tokens 300M --checkpoint-every 50M
Several GPUs: torchrun --nproc_per_node 4 -m kdtool train-sae ... (same result as one process; rank 0 writes)
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common
from kdtool.cli.options import (
    STREAM_PANEL,
    StreamBatchSizeOpt,
    StreamDropFirstOpt,
    TeacherFlags,
    with_teacher_flags,
)

SAE_PANEL = "SAE"
SPARSITY_PANEL = "Sparsity (lambda)"
RUN_PANEL = "Run"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class NormalizeChoice(str, Enum):
    none = "none"
    expected_norm = "expected-norm"


class KernelChoice(str, Enum):
    auto = "auto"
    dense = "dense"
    sparse = "sparse"


@with_teacher_flags
def main(
    layer: Annotated[
        Optional[str],
        typer.Option(
            "--layer",
            "-l",
            help="Layer(s) to train, one SAE each: 12 or 8,12,16 (hidden_states index). "
            "Default: every layer in the cache.",
            rich_help_panel=SAE_PANEL,
            show_default=False,
        ),
    ] = None,
    acts: Annotated[
        Optional[Path],
        typer.Option(
            "--acts",
            help="Activation cache from `kdtool cache-acts` [default: acts].",
            file_okay=False,
            rich_help_panel=SAE_PANEL,
            show_default=False,
        ),
    ] = None,
    expansion: Annotated[
        float,
        typer.Option(
            "--expansion", help="Latents per SAE = expansion x d_model (paper: 32).", rich_help_panel=SAE_PANEL
        ),
    ] = 32.0,
    features: Annotated[
        Optional[int],
        typer.Option("--features", min=1, help="Latents per SAE (overrides --expansion).", rich_help_panel=SAE_PANEL),
    ] = None,
    l1: Annotated[
        float,
        typer.Option(
            "--l1",
            help="lambda of the L1 term (summed over features, averaged over tokens; the paper's 8e-4). "
            "Its effect scales with the activations: prefer --target-l0 or --normalize expected-norm. "
            "The controller's start with --target-l0.",
            rich_help_panel=SPARSITY_PANEL,
        ),
    ] = 8e-4,
    target_l0: Annotated[
        Optional[float],
        typer.Option(
            "--target-l0",
            help="Adapt lambda so the running L0 reaches this (the paper's trial C).",
            rich_help_panel=SPARSITY_PANEL,
        ),
    ] = None,
    l1_rate: Annotated[
        float,
        typer.Option(
            "--l1-rate",
            help="Controller gain: log lambda += rate * log(L0 / target) per step.",
            rich_help_panel=SPARSITY_PANEL,
        ),
    ] = 0.01,
    normalize: Annotated[
        NormalizeChoice,
        typer.Option(
            "--normalize",
            help="expected-norm: train on x / s, s = mean ||x|| / sqrt(d_in) per layer from the first 32K tokens "
            "(SAELens's expected-norm scaling; lambda then acts like lambda * s on raw activations). "
            "s is folded into the saved SAE, which reads raw activations. none: the paper's raw activations.",
            rich_help_panel=SPARSITY_PANEL,
        ),
    ] = NormalizeChoice.none,
    l1_warmup: Annotated[
        int,
        typer.Option("--l1-warmup", min=0, help="Steps of linear lambda ramp from 0.", rich_help_panel=SPARSITY_PANEL),
    ] = 0,
    batch_tokens: Annotated[
        str, typer.Option("--batch-tokens", help="Tokens per step (paper: 32768).", rich_help_panel=RUN_PANEL)
    ] = "4096",
    tokens: Annotated[
        Optional[str],
        typer.Option(
            "--tokens",
            help="Tokens to train on (300M; more than cached loops the cache). Default: one pass over the cache.",
            rich_help_panel=RUN_PANEL,
            show_default=False,
        ),
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.", rich_help_panel=RUN_PANEL)] = 3e-4,
    grad_clip: Annotated[
        float, typer.Option("--grad-clip", help="Max gradient norm per SAE.", rich_help_panel=RUN_PANEL)
    ] = 1.0,
    checkpoint_every: Annotated[
        Optional[str],
        typer.Option(
            "--checkpoint-every",
            help="Save a checkpoint every N tokens (50M). A final one is always saved.",
            rich_help_panel=RUN_PANEL,
            show_default=False,
        ),
    ] = None,
    log_every: Annotated[
        int, typer.Option("--log-every", min=1, help="Steps per train_log row.", rich_help_panel=RUN_PANEL)
    ] = 10,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision", help="bf16: big matmuls in bf16 on a GPU (fp32 master weights).", rich_help_panel=RUN_PANEL
        ),
    ] = Precision.fp32,
    kernel: Annotated[
        KernelChoice,
        typer.Option(
            "--kernel",
            help="Gradient kernels: sparse (CSR, only active latents), dense, or auto (sparse on CPU below 5% active).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = KernelChoice.auto,
    shuffle_shards: Annotated[
        int,
        typer.Option(
            "--shuffle-shards", min=1, help="Cache shards mixed per shuffle buffer.", rich_help_panel=RUN_PANEL
        ),
    ] = 4,
    alive_window: Annotated[
        str,
        typer.Option(
            "--alive-window", help="train_log alive_fraction: fired within this many tokens.", rich_help_panel=RUN_PANEL
        ),
    ] = "1M",
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Folder for saes/layer{L}/ and checkpoints.",
            file_okay=False,
            rich_help_panel=RUN_PANEL,
        ),
    ] = Path("saes"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the latest checkpoint in --output (exact on CPU).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a previous run's SAEs for these layers.", rich_help_panel=RUN_PANEL)
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Read activations from the teacher as it runs (implied by --model or --dataset) instead of --acts.",
            rich_help_panel=STREAM_PANEL,
        ),
    ] = False,
    shuffle_buffer: Annotated[
        str,
        typer.Option(
            "--shuffle-buffer", help="Streaming: token positions per shuffle buffer.", rich_help_panel=STREAM_PANEL
        ),
    ] = "256K",
    batch_size: StreamBatchSizeOpt = 8,
    drop_first: StreamDropFirstOpt = True,
    *,
    flags: TeacherFlags,
) -> None:
    """Train sparse autoencoders on residual-stream activations (paper section 5.1, appendix D).

    Per layer: z = ReLU((x - b_pre) W_enc + b_enc), x_hat = z W_dec + b_pre with unit-norm decoder
    rows; loss = ||x - x_hat||^2 + lambda * sum_j z_j (summed over features, averaged over tokens);
    Adam (lr 3e-4, betas 0.9/0.999), gradient clipping 1.0, fp32 master weights. Writes
    OUTPUT/layer{L}/cfg.json + sae_weights.safetensors (SAELens layout plus kdtool's fields) and
    train_log.parquet, checkpoints under OUTPUT/layer{L}/checkpoints/, and OUTPUT/checkpoint.json
    for --resume. Prints one summary row per layer.

    --normalize expected-norm trains on x / s (s per layer) and folds s into the saved weights.

    Example: kdtool train-sae --layer 12 --l1 8e-5
    """
    import torch

    from kdtool import distributed as dist
    from kdtool.errors import BadInput
    from kdtool.parsing import parse_count, parse_int_list
    from kdtool.sae import sources
    from kdtool.sae.config import TrainConfig

    n_batch = common.parse_opt("--batch-tokens", parse_count, batch_tokens)
    n_tokens = common.parse_opt("--tokens", parse_count, tokens) if tokens is not None else None
    every = common.parse_opt("--checkpoint-every", parse_count, checkpoint_every) if checkpoint_every else 0
    window = common.parse_opt("--alive-window", parse_count, alive_window)
    buffer_tokens = common.parse_opt("--shuffle-buffer", parse_count, shuffle_buffer)
    stream = stream or flags.model is not None or flags.dataset is not None
    if stream and acts is not None:
        raise BadInput("--acts and --stream/--model/--dataset are two activation sources: give one")
    device = flags.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.world_size() > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per process

    # --- the activation source
    if stream:
        from kdtool.cli.options import load_teacher

        if n_tokens is None:
            raise BadInput("--tokens: streaming from a teacher needs a token budget (e.g. --tokens 2M)")
        mspec = flags.model_spec()
        dspec = flags.data_spec()
        teacher = load_teacher(mspec)
        source = sources.ModelSource(
            teacher, dspec, buffer_tokens=buffer_tokens, batch_size=batch_size, drop_first=drop_first
        )
        available = list(range(teacher.n_layers + 1))
        default_layers = None
    else:
        root = acts if acts is not None else Path("acts")
        source = sources.CacheSource(root, buffer_shards=shuffle_shards)
        available = source.store.layers
        default_layers = available
    if layer is not None:
        layers = common.parse_opt("--layer", lambda t: parse_int_list(t, minimum=0), layer)
    elif default_layers is not None:
        layers = list(default_layers)
    else:
        raise BadInput("--layer: say which layer(s) to train when streaming (e.g. --layer 12)")
    missing = [L for L in layers if L not in available]
    if missing:
        where = "the cache" if not stream else "the model"
        hint = f" (cached: {','.join(map(str, available))}; run `kdtool cache-acts --layers ...`)" if not stream else ""
        raise BadInput(f"--layer: layer(s) {missing} not in {where}{hint}")
    d_sae = features if features is not None else int(round(expansion * source.d_in))
    if features is None and not expansion > 0:
        raise BadInput(f"--expansion must be > 0, got {expansion}")
    cfg = TrainConfig(
        layers=layers,
        d_in=source.d_in,
        d_sae=d_sae,
        l1=l1,
        target_l0=target_l0,
        l1_rate=l1_rate,
        l1_warmup=l1_warmup,
        lr=lr,
        grad_clip=grad_clip,
        batch_tokens=n_batch,
        tokens=n_tokens,
        checkpoint_every=every,
        log_every=log_every,
        seed=flags.seed,
        device=device,
        precision=precision.value,
        kernel=kernel.value,
        alive_window=window,
        normalize=normalize.value,
    )
    if n_batch % dist.world_size():
        raise BadInput(f"--batch-tokens {n_batch} must be divisible by the {dist.world_size()} processes")
    provenance = common.make_provenance(
        inputs=source.inputs,
        seed=flags.seed,
        config={"train": cfg.as_dict(), "source": source.info, "world_size": dist.world_size()},
    )
    d = dist.dist_init(device)
    if not d.main:
        common.STATE.quiet = True  # one voice: rank 0 logs
    try:
        _train(cfg, source, d, output=output, provenance=provenance, resume=resume, force=force)
    finally:
        dist.dist_close(d)


def _train(cfg, source, d, *, output: Path, provenance: dict, resume: bool, force: bool) -> None:
    from kdtool.formats import finite_or_none
    from kdtool.sae import training as sae_train

    layers, n_tokens = cfg.layers, cfg.tokens
    l1, target_l0, device = cfg.l1, cfg.target_l0, cfg.device
    total = n_tokens if n_tokens is not None else source.approx_tokens()
    cached = source.approx_tokens()
    if n_tokens is not None and cached and n_tokens > cached:
        common.log(
            f"--tokens {n_tokens:,} is more than the {cached:,} cached: the cache is read about "
            f"{n_tokens / cached:.1f} times, reshuffled on each pass"
        )
    what = f"{total:,} tokens" if total else "the data"
    common.log(
        f"train-sae: layers {','.join(map(str, layers))}, d_in {cfg.d_in} -> d_sae {cfg.d_sae:,}, "
        f"batch {cfg.batch_tokens:,}, {what}, lambda "
        + (f"-> L0 {target_l0:g} (start {l1:g})" if target_l0 else f"{l1:g}")
        + (f" on x / s ({cfg.normalize})" if cfg.normalize != "none" else "")
        + f", on {device}"
        + (f" x {d.world} processes" if d.world > 1 else "")
    )

    with common.progress() as bar:
        task = bar.add_task("train-sae", total=total, rate="")
        clock = {"t0": None, "tok0": 0, "logged": 0.0}
        plain = not common.show_progress()

        def on_step(done: int, step: int, row: dict) -> None:
            import time

            now = time.perf_counter()
            if clock["t0"] is None:
                clock.update(t0=now, tok0=done, logged=now)
            rate = (done - clock["tok0"]) / (now - clock["t0"]) if now > clock["t0"] else 0.0
            extra = f" L0 {row['l0']:.1f} EV {row['explained_variance']:.3f}" if row else ""
            bar.update(task, completed=done, rate=f"{rate:,.0f} tok/s{extra}")
            if plain and now - clock["logged"] >= 60:
                clock["logged"] = now
                common.log(f"train-sae: {done:,} tokens, step {step}, {rate:,.0f} tok/s{extra}")

        trainer = sae_train.train(
            cfg,
            source,
            output,
            resume=resume,
            force=force,
            provenance=provenance,
            on_step=on_step,
            on_message=common.log,
            dist=d,
        )
    if not d.main:
        return

    rows = {
        k: []
        for k in ("layer", "tokens", "steps", "mse", "explained_variance", "l0", "alive_fraction", "lambda", "sae")
    }
    for L, run in trainer.runs.items():
        last = run.last
        rows["layer"].append(L)
        rows["tokens"].append(trainer.at.tokens)
        rows["steps"].append(trainer.at.step)
        for k in ("mse", "explained_variance", "l0", "alive_fraction", "lambda"):
            rows[k].append(finite_or_none(last.get(k)))
        rows["sae"].append(str(output / f"layer{L}"))
    common.log(
        f"trained {len(trainer.runs)} SAE(s) on {trainer.at.tokens:,} tokens in {trainer.at.elapsed:.1f} s "
        f"({trainer.at.tokens / max(trainer.at.elapsed, 1e-9):,.0f} tok/s); next: kdtool stats --sae {output}"
    )
    common.emit_table(
        rows, fmt=None, output=None, kind="kdtool.sae.train_summary", provenance=provenance, title="train-sae"
    )
