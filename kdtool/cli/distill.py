"""kdtool distill: train narrower students of a teacher (KL at temperature T, or other --loss) and measure their floors.

Thin: parse options, build a kdtool.distill.config.DistillConfig, join the torchrun group, call
kdtool.distill.job.distill_text, report its events and print the floors. The paper's run on a GPU:
    kdtool distill --model EleutherAI/pythia-410m --dataset monology/pile-uncopyrighted --heads paper
Several GPUs: torchrun --nproc_per_node 4 -m kdtool distill ...
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtool.cli import common
from kdtool.cli.loss_options import LossFlags, with_loss_flags
from kdtool.cli.options import (
    TeacherFlags,
    with_teacher_flags,
)

STUDENTS = "Students"
TRAIN = "Training"
EVAL = "Evaluation and checkpoints"


@with_teacher_flags
@with_loss_flags
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
    warmup: Annotated[
        Optional[int],
        typer.Option(
            "--warmup",
            min=0,
            help="Linear warmup steps. Default: min(1000, steps // 10), as the authors' code scaled it.",
            rich_help_panel=TRAIN,
            show_default=False,
        ),
    ] = None,
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
    losses: LossFlags,
) -> None:
    """Distil the teacher into students of several widths at once and measure each one's loss floor.

    Students keep the teacher's architecture, depth, vocabulary and positions; only the width
    changes. Loss: KL(teacher || student) at --temperature (trained on T^2 x KL), or any of
    --loss, several at once (one student per width and loss); AdamW with warmup + cosine,
    evaluated on held-out text every --eval-every steps. Floor = mean held-out per-token KL over
    the final 10% of steps, the same measure for every loss. All students share one teacher
    forward per batch. Writes OUTPUT/width{W}/ (HF folder; width{W}-{loss}/ for losses other
    than kl), curves.parquet, floors.parquet, checkpoint/ (for --resume; `rm -r` it once the run
    is done). Defaults are the paper's schedule (30k steps of 32 x 512); on a CPU pass small
    --steps. The floors table goes to stderr (stdout with --json or --format).

    Example: kdtool distill --widths 64,128 --steps 200 --batch-size 4 --seq-len 128 --eval-every 50
    """
    from kdtool.cli.options import load_teacher
    from kdtool.distill import job
    from kdtool.distill.config import DistillConfig
    from kdtool.distributed import dist_close, dist_init
    from kdtool.errors import BadInput
    from kdtool.models import resolve_device
    from kdtool.parsing import parse_float_list, parse_int_list

    width_list = common.parse_opt("--widths", parse_int_list, widths)
    beta_list = common.parse_opt("--betas", parse_float_list, betas)
    if len(beta_list) != 2:
        raise BadInput(f"--betas: give two numbers, got {betas!r}")
    mspec = flags.model_spec()
    mspec.device = job.rank_device(mspec.device)
    device = str(resolve_device(mspec.device))
    dspec = flags.data_spec()
    cfg = DistillConfig(
        widths=width_list,
        temperature=temperature,
        steps=steps,
        batch_size=batch_size,
        seq_len=flags.seq_len,
        micro_batch=micro_batch,
        lr=lr,
        min_lr_ratio=min_lr_ratio,
        warmup=default_warmup(steps) if warmup is None else warmup,
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
        device=device,
        run_key=job.run_key(mspec, dspec),
        **losses.config(),
    )
    if teacher_cache is not None:
        from kdtool import kinds

        kinds.expect(teacher_cache, "kdtool.teacher_cache", "--teacher-cache")
    if fmt is not None and fmt.value == "parquet":
        raise BadInput(f"--format parquet: the floors are written to {output}/floors.parquet; use table, csv or json")
    d = dist_init(cfg.device)
    if not d.main:
        common.STATE.quiet = True  # one voice: rank 0 logs
    try:
        with _Report(cfg, output, resume=resume) as report:
            result = job.distill_text(
                cfg,
                dspec,
                lambda: load_teacher(mspec),
                output,
                cache_dir=teacher_cache,
                resume=resume,
                overwrite=overwrite,
                dist=d,
                provenance=common.make_provenance,
                callback=report.on_event,
            )
    except BaseException:
        dist_close(d, finished=False)
        raise
    dist_close(d)
    if d.main:
        report.done(result, fmt)


def default_warmup(steps: int) -> int:
    """--warmup when not given: the paper's 1000 steps, scaled down for short runs (a tenth of them)."""
    return min(1000, steps // 10)


#: floors.parquet columns printed
SHOWN = ("width", "params", "non_embedding_params", "floor", "floor_std", "floor_scaled", "raw_kl", "eval_ce", "steps")


def shown(cfg) -> tuple[str, ...]:
    """The columns printed: SHOWN, with the loss after the width when a run trains anything but kl alone."""
    return SHOWN if cfg.losses == ["kl"] else (SHOWN[0], "loss", *SHOWN[1:])


def _who(row: dict) -> str:
    """w128 for a kl student, w128/tvd for others (log lines)."""
    return f"w{row['width']}" + ("" if row["loss"] == "kl" else f"/{row['loss']}")


class _Report:
    """Renders distill_text's events: log lines, warnings, and a progress bar once training starts."""

    def __init__(self, cfg, output: Path, *, resume: bool):
        self.cfg, self.output, self.resume = cfg, output, resume
        self.stack = contextlib.ExitStack()
        self.bar = self.task = self.start = None
        self.t0 = 0.0
        self.finished = False  # a --resume found the run done: nothing was written

    def __enter__(self) -> _Report:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _open_bar(self) -> None:
        self.t0 = time.perf_counter()
        self.bar = self.stack.enter_context(common.progress())
        self.task = self.bar.add_task("distill", total=self.cfg.steps, rate="")

    def on_event(self, ev: dict) -> None:
        kind, cfg = ev["event"], self.cfg
        if kind == "teacher-cached":
            common.log(f"every batch is in {ev['cache']}: the teacher is not loaded")
        elif kind == "vocab":
            common.warn(f"tokenizer has {ev['tokenizer']} entries but the model {ev['model']} rows")
        elif kind == "epoch":
            common.warn(
                f"the training text ran out after {ev['at']} batches: epoch {ev['epoch'] + 1} repeats it (reshuffled)"
            )
        elif kind == "start":
            common.log(
                f"distilling {ev['teacher']} into widths {','.join(map(str, cfg.widths))}: {cfg.steps} steps of "
                f"{cfg.batch_size}x{cfg.seq_len} tokens, T={cfg.temperature:g}, on {cfg.device}"
                + ("" if cfg.losses == ["kl"] else f", losses {','.join(cfg.losses)}")
                + (f" x {ev['world']} processes" if ev["world"] > 1 else "")
            )
            self._open_bar()
        elif kind == "finished":
            self.finished = True
            common.log(f"{self.output}: already trained for {ev['step']} steps; left as it is")
        elif kind == "resumed":
            common.log(f"resumed from step {ev['step']} ({self.output}/checkpoint)")
            self.bar.update(self.task, completed=ev["step"])
        elif kind == "fresh" and self.resume:
            common.warn(f"--resume: {ev['reason']}; starting from step 0")
        elif kind == "step":
            self._step(ev)

    def _step(self, ev: dict) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = (now, ev["step"] - 1)
        t_start, s_start = self.start
        rate = (ev["step"] - s_start) / (now - t_start) if now > t_start else 0.0
        self.bar.update(self.task, completed=ev["step"], rate=f"{rate:.2f} step/s")
        evals = [r for r in ev["rows"] if r["eval_kl"] == r["eval_kl"]]
        if evals:
            common.log(f"step {ev['step']}: eval KL " + ", ".join(f"{_who(r)} {r['eval_kl']:.4f}" for r in evals))

    def done(self, result, fmt) -> None:
        """After the run (rank 0): the floor warning, where the files are, the floors table on stdout."""
        from kdtool.distill.files import FLOORS_KIND, few_evaluations

        secs = time.perf_counter() - self.t0
        note = few_evaluations(self.cfg, result.floors)
        if note:
            common.warn(note)
        if not self.finished:
            common.log(f"wrote {self.output}/floors.parquet, curves.parquet and width*/ in {secs:.1f} s")
            checkpoint_note(self.output)
        common.emit_summary(
            {k: result.floors[k] for k in shown(self.cfg)},
            fmt=fmt,
            kind=FLOORS_KIND,
            provenance=result.provenance,
            title="distillation floors (per-token KL at T, nats)",
        )


def checkpoint_note(output: Path) -> None:
    """One line at the end of a run: the checkpoint it leaves, its size, what it is for and how to drop it."""
    import shlex

    folder = output / "checkpoint"
    if not folder.is_dir():
        return
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    common.log(
        f"{folder}/ ({size / 2**20:,.0f} MB: every student's weights and optimizer state) is what --resume "
        f"continues from; the students do not need it: `rm -r {shlex.quote(str(folder))}` once you will not "
        "resume this run"
    )
