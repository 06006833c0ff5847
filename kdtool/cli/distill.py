"""kdtool distill: train narrower students of a teacher with KL at temperature T and measure their floors.

Thin: parse options, load the teacher (kdtool.models) and text (kdtool.data), build a
kdtool.distill.loop.DistillConfig, call kdtool.distill.loop.run, print the floors. The paper's run on a GPU:
    kdtool distill --model EleutherAI/pythia-410m --dataset monology/pile-uncopyrighted --heads paper
Several GPUs: torchrun --nproc_per_node 4 -m kdtool distill ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common
from kdtool.cli.options import (
    TeacherFlags,
    with_teacher_flags,
)

STUDENTS = "Students"
TRAIN = "Training"
EVAL = "Evaluation and checkpoints"


@with_teacher_flags
def main(
    widths: Annotated[
        str, typer.Option("--widths", help="Student hidden widths: 128,256,512 or 64:512:64.", rich_help_panel=STUDENTS)
    ] = "128,256,512,768,1024",
    heads: Annotated[
        str,
        typer.Option(
            "--heads",
            help="head-dim:N (width/N heads; keeps the rotary part of each head), paper (Table 8: 8 heads at "
            "width <= 128, else 16) or count:N.",
            rich_help_panel=STUDENTS,
        ),
    ] = "head-dim:64",
    ffn_ratio: Annotated[
        str,
        typer.Option(
            "--ffn-ratio",
            help="FFN size = ratio x width, or 'teacher' for the teacher's ratio.",
            rich_help_panel=STUDENTS,
        ),
    ] = "4",
    init_std: Annotated[
        str,
        typer.Option(
            "--init-std",
            help="Student init std: teacher (the teacher config's initializer_range), small-init "
            "(sqrt(2/(5 width))) or a number.",
            rich_help_panel=STUDENTS,
        ),
    ] = "teacher",
    temperature: Annotated[
        float,
        typer.Option("--temperature", "-T", help="Softmax temperature of teacher and student.", rich_help_panel=TRAIN),
    ] = 2.0,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.", rich_help_panel=TRAIN)] = 30_000,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1, help="Sequences per step (global, over all processes).", rich_help_panel=TRAIN
        ),
    ] = 32,
    micro_batch: Annotated[
        int,
        typer.Option(
            "--micro-batch",
            min=0,
            help="Sequences per forward pass (gradient accumulation; 0 = all).",
            rich_help_panel=TRAIN,
        ),
    ] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.", rich_help_panel=TRAIN)] = 3e-4,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Linear warmup steps.", rich_help_panel=TRAIN)] = 1000,
    min_lr_ratio: Annotated[
        float, typer.Option("--min-lr-ratio", help="Cosine decays to lr x this.", rich_help_panel=TRAIN)
    ] = 0.0,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay.", rich_help_panel=TRAIN)
    ] = 0.01,
    betas: Annotated[str, typer.Option("--betas", help="AdamW betas.", rich_help_panel=TRAIN)] = "0.9,0.999",
    grad_clip: Annotated[
        float, typer.Option("--grad-clip", help="Max gradient norm per student (0 = off).", rich_help_panel=TRAIN)
    ] = 1.0,
    ce_weight: Annotated[
        float,
        typer.Option(
            "--ce-weight",
            help="Mix in the data's cross-entropy: (1-w) T^2 KL + w CE (0 = pure KD).",
            rich_help_panel=TRAIN,
        ),
    ] = 0.0,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="Steps between held-out evaluations.", rich_help_panel=EVAL)
    ] = 500,
    eval_batches: Annotated[
        int, typer.Option("--eval-batches", min=1, help="Held-out batches per evaluation.", rich_help_panel=EVAL)
    ] = 8,
    save_every: Annotated[
        int,
        typer.Option(
            "--save-every", min=0, help="Steps between checkpoints (0 = only at the end).", rich_help_panel=EVAL
        ),
    ] = 1000,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoint (same options).", rich_help_panel=EVAL)
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over even if OUTPUT has a checkpoint.", rich_help_panel=EVAL)
    ] = False,
    teacher_cache: Annotated[
        Optional[Path],
        typer.Option(
            "--teacher-cache",
            help="Keep the teacher's top-k log-probs here; reruns skip the teacher.",
            file_okay=False,
            rich_help_panel=TRAIN,
        ),
    ] = None,
    topk: Annotated[
        int,
        typer.Option(
            "--topk", min=1, help="Teacher tokens kept per position with --teacher-cache.", rich_help_panel=TRAIN
        ),
    ] = 64,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output folder.", file_okay=False, rich_help_panel=EVAL)
    ] = Path("students"),
    fmt: common.FormatOpt = None,
    *,
    flags: TeacherFlags,
) -> None:
    """Distil the teacher into students of several widths at once and measure each one's loss floor.

    Students keep the teacher's architecture, depth, vocabulary and positions; only the width
    changes. Loss: KL(teacher || student) at --temperature (trained on T^2 x KL), AdamW with
    warmup + cosine, evaluated on held-out text every --eval-every steps. Floor = mean held-out
    per-token KL over the final 10% of steps. All widths share one teacher forward per batch.
    Writes OUTPUT/width{W}/ (HF folder), curves.parquet, floors.parquet, checkpoint/.
    Defaults are the paper's schedule (30k steps of 32 x 512); on a CPU pass small --steps.

    Example: kdtool distill --widths 64,128 --steps 200 --warmup 20 --batch-size 4 --seq-len 128 --eval-every 50
    """
    import os

    from kdtool.distill import loop as distill
    from kdtool.errors import BadInput
    from kdtool.parsing import parse_float_list, parse_int_list

    width_list = common.parse_opt("--widths", parse_int_list, widths)
    beta_list = common.parse_opt("--betas", parse_float_list, betas)
    if len(beta_list) != 2:
        raise BadInput(f"--betas: give two numbers, got {betas!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    mspec = flags.model_spec()
    if world > 1 and mspec.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            mspec.device = f"cuda:{local_rank}"
    from kdtool.models import EMBEDDED_NAME, resolve_device

    dev = str(resolve_device(mspec.device))
    dspec = flags.data_spec()
    run_key = {
        "teacher": flags.model or EMBEDDED_NAME,
        "revision": flags.revision,
        "teacher_dtype": mspec.dtype,
        "data": dspec.describe(),
    }
    cfg = distill.DistillConfig(
        widths=width_list,
        temperature=temperature,
        steps=steps,
        batch_size=batch_size,
        seq_len=flags.seq_len,
        micro_batch=micro_batch,
        lr=lr,
        min_lr_ratio=min_lr_ratio,
        warmup=warmup,
        weight_decay=weight_decay,
        betas=tuple(beta_list),
        grad_clip=grad_clip,
        ce_weight=ce_weight,
        eval_every=eval_every,
        eval_batches=eval_batches,
        save_every=save_every,
        seed=flags.seed,
        heads=heads,
        ffn_ratio=ffn_ratio,
        init_std=init_std,
        topk=topk if teacher_cache is not None else 0,
        device=dev,
        run_key=run_key,
    )
    if fmt is not None and fmt.value == "parquet":
        raise BadInput(f"--format parquet: the floors are written to {output}/floors.parquet; use table, csv or json")
    if resume and overwrite:
        raise BadInput("--resume and --overwrite contradict each other: give one")
    if (output / "checkpoint").exists() and not (resume or overwrite):
        raise BadInput(f"{output}/checkpoint exists: add --resume to continue that run or --overwrite to start over")
    d = distill.dist_init(dev)
    if not d.main:
        common.STATE.quiet = True  # one voice: rank 0 logs
    elif overwrite and (output / "checkpoint").exists():
        import shutil

        shutil.rmtree(output / "checkpoint")  # a kill before the first new checkpoint must not resume the old run
    try:
        _run(cfg, d, mspec, dspec, output=output, cache_dir=teacher_cache, resume=resume, fmt=fmt)
    finally:
        distill.dist_close(d)


def _run(cfg, d, mspec, dspec, *, output: Path, cache_dir: Path | None, resume: bool, fmt) -> None:
    import time

    from kdtool.cli.options import load_teacher
    from kdtool.distill import loop as distill
    from kdtool.text.tokens import token_batches

    per = cfg.batch_size // max(d.world, 1)
    rows = (d.rank * per, (d.rank + 1) * per)
    cache = None
    loaded = {}
    if cache_dir is not None:
        from kdtool.distill.teacher_cache import TeacherCache

        cache = TeacherCache(
            cache_dir,
            key={"run": cfg.run_key, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size},
            topk=cfg.topk,
            temperature=cfg.temperature,
            provenance=common.make_provenance(seed=cfg.seed, config={"key": cfg.run_key}),
        )
    if cache is not None and cache.covers(cfg.steps, cfg.eval_batches, rows):
        common.log(f"every batch is in {cache_dir}: the teacher is not loaded")
        teacher_config, tokenizer, teacher = cache.load_teacher_config(), cache.load_tokenizer(), None
        name, local = cfg.run_key["teacher"], None
    else:
        lm = load_teacher(mspec)
        loaded["lm"] = lm
        teacher_config, tokenizer, teacher, name, local = lm.model.config, lm.tokenizer, lm.model, lm.name, lm.path
        if cache is not None:
            cache.save_teacher(teacher_config, tokenizer)
        if hasattr(teacher_config, "vocab_size") and len(tokenizer) > teacher_config.vocab_size:
            common.warn(f"tokenizer has {len(tokenizer)} entries but the model {teacher_config.vocab_size} rows")

    def open_epoch(epoch: int, skip: int):
        spec = _replace(dspec, seed=dspec.seed + epoch)
        return token_batches(spec, tokenizer, cfg.batch_size, skip_batches=skip, drop_last=True)

    def on_new_epoch(epoch: int, at: int) -> None:
        common.warn(f"the training text ran out after {at} batches: epoch {epoch + 1} repeats it (reshuffled)")

    train = distill.repeating(open_epoch, on_new_epoch)

    def held_out():
        spec = _replace(dspec, holdout="eval")
        return token_batches(spec, tokenizer, cfg.batch_size, drop_last=True)

    inputs = [p for p in (local,) if p] + dspec.local_inputs()
    provenance = common.make_provenance(
        inputs=inputs,
        seed=cfg.seed,
        config={
            "distill": distill._cfg_dict(cfg),
            "data": dspec.describe(),
            "teacher": loaded["lm"].describe() if loaded else {"model": name},
            "world_size": d.world,
        },
    )
    common.log(
        f"distilling {name} into widths {','.join(map(str, cfg.widths))}: {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} tokens, T={cfg.temperature:g}, on {cfg.device}"
        + (f" x {d.world} processes" if d.world > 1 else "")
    )
    t0 = time.perf_counter()
    with common.progress() as bar:
        task = bar.add_task("distill", total=cfg.steps, rate="")
        plain = not common.show_progress()
        state = {"logged": t0, "start": None}

        def on_event(ev: dict) -> None:
            kind = ev["event"]
            if kind == "resumed":
                common.log(f"resumed from step {ev['step']} ({output}/checkpoint)")
                bar.update(task, completed=ev["step"])
            elif kind == "fresh" and resume:
                common.warn(f"--resume: {ev['reason']}; starting from step 0")
            elif kind == "step":
                now = time.perf_counter()
                if state["start"] is None:
                    state["start"] = (now, ev["step"] - 1)
                t_start, s_start = state["start"]
                rate = (ev["step"] - s_start) / (now - t_start) if now > t_start else 0.0
                bar.update(task, completed=ev["step"], rate=f"{rate:.2f} step/s")
                evals = [r for r in ev["rows"] if r["eval_kl"] == r["eval_kl"]]
                if evals:
                    common.log(
                        f"step {ev['step']}: eval KL " + ", ".join(f"w{r['width']} {r['eval_kl']:.4f}" for r in evals)
                    )
                elif plain and now - state["logged"] >= 60:
                    state["logged"] = now
                    common.log(
                        f"step {ev['step']}/{cfg.steps}, {rate:.2f} steps/s, train KL "
                        + ", ".join(f"w{r['width']} {r['train_kl']:.4f}" for r in ev["rows"])
                    )

        result = distill.run(
            cfg,
            teacher_config=teacher_config,
            teacher=teacher,
            train_batches=train,
            eval_batches=held_out,
            out_dir=output,
            tokenizer=tokenizer,
            cache=cache,
            resume=resume,
            provenance=provenance,
            callback=on_event,
        )
    if not d.main:
        return
    secs = time.perf_counter() - t0
    few = sorted({n for n in result.floors["n_evals"] if n < 2})
    if few:
        start = distill.floor_window(cfg.steps, cfg.floor_fraction)
        common.warn(
            f"each floor averages {few[0]} evaluation(s) (steps >= {start}); floor_std needs two or more: "
            f"use --eval-every <= {max(1, (cfg.steps - start) // 2)}"
        )
    common.log(f"wrote {output}/floors.parquet, curves.parquet and width*/ in {secs:.1f} s")
    shown = (
        "width",
        "params",
        "non_embedding_params",
        "floor",
        "floor_std",
        "floor_scaled",
        "raw_kl",
        "eval_ce",
        "steps",
    )
    cols = {k: result.floors[k] for k in shown}
    common.emit_table(
        cols,
        fmt=fmt,
        output=None,
        kind=distill.FLOORS_KIND,
        provenance=provenance,
        title="distillation floors (per-token KL at T, nats)",
    )


def _replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)
