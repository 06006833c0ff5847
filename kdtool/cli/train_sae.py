"""kdtool train-sae: train the paper's sparse autoencoders, one per layer, on cached or streamed activations.

Several SAEs per layer train side by side on the same batches (one read of the data):
    kdtool train-sae --layer 12 --expansion 4,8,16      -> saes/layer12-x4/, layer12-x8/, layer12-x16/

Thin: parse options into kdtool.sae.config.TrainConfig, open the activation source
(kdtool.sae.sources: the cache written by cache-acts, or a teacher streamed through a shuffle
buffer), run kdtool.sae.training.train with a progress bar, report one summary row per layer.
The paper's run on a GPU:
    kdtool train-sae --layer 8,12,16 --expansion 32 --batch-tokens 32768 --tokens 300M --checkpoint-every 50M
Several GPUs: torchrun --nproc_per_node 4 -m kdtool train-sae ... (same result as one process; rank 0 writes)
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common
from kdtool.cli.options import (
    STREAM_PANEL,
    StreamBatchSizeOpt,
    StreamDropFirstOpt,
    TeacherFlags,
    acts_option,
    choices,
    layers_option,
    parse_layers,
    parse_tokens,
    tokens_option,
    values_option,
    with_teacher_flags,
)

SAE_PANEL = "SAE"
SPARSITY_PANEL = "Sparsity (lambda)"
RUN_PANEL = "Run"

Precision = choices("Precision", "fp32", "bf16")
NormalizeChoice = choices("NormalizeChoice", "none", "expected-norm")
KernelChoice = choices("KernelChoice", "auto", "dense", "sparse")
ScreenChoice = choices("ScreenChoice", "auto", "on", "off")

LayerOpt = layers_option(
    "Layer(s) to train: 12 or 8,12,16 (hidden_states index), one SAE each (one per combination with several "
    "--expansion/--l1/--init-seed). Default: every layer in the cache.",
    SAE_PANEL,
)
ActsOpt = acts_option(SAE_PANEL)
# one value, or several: one SAE per combination of the values, per layer, trained side by side
ExpansionOpt = values_option(
    "--expansion",
    "Latents per SAE = expansion x d_model (paper: 32). Several (4,8,16): one SAE per value, trained side by "
    "side on the same batches.",
    SAE_PANEL,
)
FeaturesOpt = values_option(
    "--features",
    "Latents per SAE (overrides --expansion); several (1024,4096): one SAE per value.",
    SAE_PANEL,
    optional=True,
)
InitSeedOpt = values_option(
    "--init-seed",
    "SAE initialisation seed(s) (default: --seed); several (0,1,2): one SAE per seed. --seed alone sets the "
    "data order, shared by all.",
    SAE_PANEL,
    optional=True,
)
L1Opt = values_option(
    "--l1",
    "lambda of the L1 term (summed over features, averaged over tokens; the paper's 8e-4). Its effect scales with "
    "the activations: prefer --target-l0 or --normalize expected-norm. The controller's start with --target-l0. "
    "Several (3e-4,8e-5): one SAE per value.",
    SPARSITY_PANEL,
)
TokensOpt = tokens_option(
    "Tokens to train on (300M; more than cached loops the cache). Default: one pass over the cache.", RUN_PANEL
)


@with_teacher_flags
def main(
    layer: LayerOpt = None,
    acts: ActsOpt = None,
    expansion: ExpansionOpt = "32",
    features: FeaturesOpt = None,
    init_seed: InitSeedOpt = None,
    l1: L1Opt = "8e-4",
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
    tokens: TokensOpt = None,
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
            help="Gradient kernels: sparse (only the active latents), dense, or auto (the one measured faster "
            "for this SAE on this machine, at the batch's density).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = KernelChoice.auto,
    bf16_screen: Annotated[
        ScreenChoice,
        typer.Option(
            "--bf16-screen",
            help="Sparse kernel on a CPU: find the active latents with a bf16 product and an error margin, then "
            "fp32 (kdtool/sae/screen.py). auto: if measured faster; on: whenever its bound holds on the batch "
            "(no timing: every run chooses alike); off: from the fp32 product.",
            rich_help_panel=RUN_PANEL,
        ),
    ] = ScreenChoice.auto,
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
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace a previous run's SAEs for these layers.", rich_help_panel=RUN_PANEL),
    ] = False,
    force: Annotated[bool, typer.Option("--force", hidden=True, help="Old name of --overwrite.")] = False,
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
            "--shuffle-buffer",
            help="Streaming: token positions in the mixing buffer (each batch mixes two halves of it; "
            "the teacher forwards only what --tokens uses).",
            rich_help_panel=STREAM_PANEL,
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
    for --resume. Prints one summary row per SAE.

    Several --expansion, --features, --l1 or --init-seed values train one SAE per combination and
    layer side by side on the same batches, each equal to the SAE a run of it alone trains, into
    OUTPUT/layer{L}-x8/, OUTPUT/layer{L}-lambda3e-4/, ... (named by what differs).

    --normalize expected-norm trains on x / s (s per layer) and folds s into the saved weights.

    Example: kdtool train-sae --layer 12 --normalize expected-norm --l1 1 --expansion 4 --batch-tokens 512 --lr 1e-3
    """
    from kdtool import distributed as dist
    from kdtool.cli.options import load_teacher
    from kdtool.models import resolve_device, torchrun_local_rank
    from kdtool.parsing import parse_count, parse_float_list, parse_int_list
    from kdtool.sae import sources
    from kdtool.sae.config import TrainConfig, check_processes, sae_widths

    n_batch = common.parse_opt("--batch-tokens", parse_count, batch_tokens)
    every = common.parse_opt("--checkpoint-every", parse_count, checkpoint_every) if checkpoint_every else 0
    window = common.parse_opt("--alive-window", parse_count, alive_window)
    buffer_tokens = common.parse_opt("--shuffle-buffer", parse_count, shuffle_buffer)
    n_tokens, requested = parse_tokens(tokens), parse_layers(layer)
    expansions = common.parse_opt("--expansion", parse_float_list, expansion)
    widths = common.parse_opt("--features", parse_int_list, features) if features is not None else None
    l1s = common.parse_opt("--l1", parse_float_list, l1)
    seeds = common.parse_opt("--init-seed", lambda t: parse_int_list(t, minimum=0), init_seed) if init_seed else None
    device = str(resolve_device(flags.device, local_rank=torchrun_local_rank()))
    if acts is not None:
        from kdtool import kinds

        kinds.expect(acts, "kdtool.acts", "--acts")
    teacher = None
    if sources.wants_stream(acts=acts, stream=stream, model=flags.model, dataset=flags.dataset):
        mspec = replace(flags.model_spec(), device=device)  # the teacher on this process's device too
        teacher = sources.TeacherStream(mspec, flags.data_spec(), load_teacher, batch_size, drop_first)
    source = sources.open_source(
        acts, teacher, tokens=n_tokens, buffer_tokens=buffer_tokens, shuffle_shards=shuffle_shards
    )
    cfg = TrainConfig(
        layers=source.select_layers(requested),
        d_in=source.d_in,
        d_sae=sae_widths(source.d_in, features=widths, expansion=expansions),
        l1=l1s,
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
        bf16_screen=bf16_screen.value,
        alive_window=window,
        normalize=normalize.value,
        init_seed=seeds,
    )
    check_processes(cfg.batch_tokens, dist.world_size())
    provenance = common.make_provenance(
        inputs=source.inputs,
        seed=flags.seed,
        config={"train": cfg.as_dict(), "source": source.info, "world_size": dist.world_size()},
    )
    d = dist.dist_init(device)
    if not d.main:
        common.STATE.quiet = True  # one voice: rank 0 logs
    try:
        _train(
            cfg, source, d, output=output, provenance=provenance, resume=resume, force=overwrite or force, flags=flags
        )
    except BaseException:
        dist.dist_close(d, finished=False)
        raise
    dist.dist_close(d)


def _train(cfg, source, d, *, output: Path, provenance: dict, resume: bool, force: bool, flags=None) -> None:
    """Run kdtool.sae.training.train with a progress bar; rank 0 prints the summary table."""
    from kdtool.sae.training import train

    total = _announce(cfg, source, d)
    with common.progress() as bar:
        task = bar.add_task("train-sae", total=total, rate="")
        trainer = train(
            cfg,
            source,
            output,
            resume=resume,
            force=force,
            provenance=provenance,
            on_step=_step_reporter(bar, task),
            on_message=common.log,
            dist=d,
        )
    if not d.main:
        return
    at = trainer.at
    if trainer.outcome == "trained":
        common.log(
            f"trained {len(trainer.runs)} SAE(s) on {at.tokens:,} tokens in {at.elapsed:.1f} s "
            f"({at.tokens / max(at.elapsed, 1e-9):,.0f} tok/s): {_time_split(trainer, source)}"
        )
    common.log(f"next: {_next_command(output, source, flags)}")
    common.emit_summary(trainer.summary(), kind="kdtool.sae.train_summary", provenance=provenance, title="train-sae")


def _next_command(output: Path, source, flags) -> str:
    """The stats command for these SAEs: stats finds the cache in the SAEs' cfg.json; a stream needs its flags."""
    import shlex

    argv = ["kdtool", "stats", "--sae", str(output), "-o", str(output.parent / "stats.parquet")]
    if getattr(source, "forwarded_tokens", None) is not None and flags is not None:  # streamed: no cache to find
        argv += ["--stream", "--tokens", "1M", "--seq-len", str(flags.seq_len)]
        argv += [
            a
            for opt in ("model", "revision", "dataset")
            if getattr(flags, opt)
            for a in (f"--{opt}", getattr(flags, opt))
        ]
    return shlex.join(argv)


def _time_split(trainer, source) -> str:
    """Where this run's time went: the SAE steps, and the teacher's forward (streaming) or reading the cache."""
    steps = f"SAE steps {trainer.step_seconds:.1f} s"
    forwarded = getattr(source, "forwarded_tokens", None)
    if forwarded is None:
        return f"{steps}, reading the cache {trainer.source_seconds:.1f} s"
    fwd = source.forward_seconds
    return (
        f"teacher forward {forwarded:,} tokens in {fwd:.1f} s ({forwarded / max(fwd, 1e-9):,.0f} tok/s), {steps}, "
        f"waiting for the teacher {trainer.source_seconds:.1f} s"
    )


def _announce(cfg, source, d) -> int | None:
    """Log what the run will do; returns the tokens the progress bar counts to (None: unknown)."""
    n_tokens, cached = cfg.tokens, source.approx_tokens()
    total = n_tokens if n_tokens is not None else cached
    if n_tokens is not None and cached and n_tokens > cached:
        common.log(
            f"--tokens {n_tokens:,} is more than the {cached:,} cached: the cache is read about "
            f"{n_tokens / cached:.1f} times, reshuffled on each pass"
        )
    what = f"{total:,} tokens" if total else "the data"
    d_sae, lam = _listed(cfg.d_sae, "{:,}"), _listed(cfg.l1, "{:g}")
    common.log(
        f"train-sae: layers {','.join(map(str, cfg.layers))}, d_in {cfg.d_in} -> d_sae {d_sae}, "
        f"batch {cfg.batch_tokens:,}, {what}, lambda "
        + (f"-> L0 {cfg.target_l0:g} (start {lam})" if cfg.target_l0 else lam)
        + (f", init seeds {_listed(cfg.init_seed, '{}')}" if isinstance(cfg.init_seed, list) else "")
        + (f" on x / s ({cfg.normalize})" if cfg.normalize != "none" else "")
        + f", on {cfg.device}"
        + (f" x {d.world} processes" if d.world > 1 else "")
    )
    per_layer = len(cfg.specs())
    if per_layer > 1:
        common.log(f"train-sae: {per_layer} SAEs per layer side by side on the same batches")
    return total


def _listed(value, fmt: str) -> str:
    """A config value that is one number or a list of them, for the log line."""
    return "/".join(fmt.format(v) for v in value) if isinstance(value, list) else fmt.format(value)


def _step_reporter(bar, task):
    """on_step for the trainer: the bar's rate, L0 and EV (a plain line every 10 s off a terminal)."""
    clock = {"t0": None, "tok0": 0}

    def on_step(done: int, step: int, row: dict) -> None:
        now = time.perf_counter()
        if clock["t0"] is None:
            clock.update(t0=now, tok0=done)
        rate = (done - clock["tok0"]) / (now - clock["t0"]) if now > clock["t0"] else 0.0
        extra = f" L0 {row['l0']:.1f} EV {row['explained_variance']:.3f}" if row else ""
        bar.update(task, completed=done, rate=f"{rate:,.0f} tok/s, step {step}{extra}")

    return on_step
