"""The kdtool command of each stage of a reproduction plan, with its token counts and disk.

One builder per stage family, in plan order: SAE stages (cache-acts, train-sae and stats per trial),
predict, distill, calibrate, probe (with build-concepts) and the report. Sizes come from
kdtool/reproduce/sizes.py; kdtool/reproduce/plan.py puts the stages in order. This is the one part
of kdtool that writes kdtool command lines.
"""

from __future__ import annotations

from typing import Any

from kdtool.reproduce.protocol import Protocol, Teacher
from kdtool.reproduce.sizes import (
    STATS_ROW_BYTES,
    acts_bytes,
    fmt_bytes,
    sae_bytes,
    sae_checkpoint_count,
    sae_optimizer_bytes,
    student_bytes,
    student_checkpoint_bytes,
    teacher_cache_bytes,
)
from kdtool.reproduce.stage import Stage, arg, cmd, compact

#: keys of a trial in paper-sae-trials.toml that describe it rather than being train-sae options
TRIAL_TEXT = ("label", "name")


def teacher_opts(p: Protocol) -> dict[str, Any]:
    """The teacher flags every teacher-reading command of the plan gets."""
    return {"model": p.model, "revision": p.revision, "device": p.device, "offline": p.offline}


def data_opts(p: Protocol) -> dict[str, Any]:
    """The text-data flags, left out where they are the commands' defaults."""
    return {
        "dataset": p.dataset,
        "split": None if p.split == "train" else p.split,
        "text_column": None if p.text_column == "text" else p.text_column,
    }


def sae_stages(p: Protocol, t: Teacher, source: dict, seed: int | None) -> list[Stage]:
    """cache-acts (with --sae-input cache), then train-sae and stats for each SAE trial."""
    d, n_layers, layers = t.d_model, len(p.layers), p.layers
    F = int(round(p.expansion * d))
    stages = []
    if p.sae_input == "cache":
        acts = p.out / "acts"
        stages.append(
            Stage(
                "cache-acts",
                "cache-acts",
                f"cache the residual stream at layers {arg(layers)}",
                cmd(
                    "kdtool",
                    "cache-acts",
                    **teacher_opts(p),
                    **data_opts(p),
                    seq_len=p.sae_seq_len,
                    batch_size=p.teacher_batch,
                    layers=layers,
                    tokens=compact(p.sae_tokens),
                    seed=seed,
                    o=acts,
                ),
                tokens={"teacher_forward": p.sae_tokens, "cached_per_layer": p.sae_tokens},
                disk=[
                    (
                        f"activation cache: {p.sae_tokens:,} tokens x {n_layers} layers x {d} x 2 bytes",
                        acts_bytes(p.sae_tokens, n_layers, d),
                    )
                ],
                rate="cache-acts",
                amount=p.sae_tokens,
                resume_marker=acts / "manifest.json",
                detail=f"teacher forward {p.sae_tokens:,} tokens; each cached at {n_layers} layers",
            )
        )
    steps = p.sae_tokens // p.sae_batch_tokens
    trained = steps * p.sae_batch_tokens
    every = max(p.sae_batch_tokens, p.sae_tokens // max(p.sae_checkpoints, 1))
    n_ckpt = sae_checkpoint_count(p.sae_tokens, p.sae_batch_tokens, every)
    one, opt = sae_bytes(d, F), sae_optimizer_bytes(d, F)
    streamed = p.sae_input == "stream"
    for name, trial in p.trials.items():
        out = p.out / f"saes-{name}"
        stages.append(
            Stage(
                f"train-sae-{name}",
                "train-sae",
                f"SAE trial {name} ({trial.get('name', name)}): {trial.get('label', '')}",
                cmd(
                    "kdtool",
                    "train-sae",
                    **source,
                    layer=layers,
                    expansion=p.expansion,
                    batch_tokens=p.sae_batch_tokens,
                    tokens=compact(p.sae_tokens),
                    checkpoint_every=compact(every),
                    shuffle_buffer=compact(p.shuffle_buffer) if streamed else None,
                    **{k: v for k, v in trial.items() if k not in TRIAL_TEXT},
                    seed=seed,
                    o=out,
                ),
                tokens={"teacher_forward": trained if streamed else 0, "sae_train_per_layer": trained, "steps": steps},
                disk=[
                    (
                        f"{n_layers} SAEs x {1 + n_ckpt} (final + {n_ckpt} checkpoints), {fmt_bytes(one)} each "
                        f"({d} x {F:,} fp32)",
                        n_layers * (1 + n_ckpt) * one,
                    ),
                    (f"Adam state in the latest checkpoint ({n_layers} x {fmt_bytes(opt)})", n_layers * opt),
                ],
                # the new checkpoint's Adam state is written before the previous one is deleted
                peak_extra=n_layers * opt,
                rate="train-sae",
                amount=trained,
                # the brief measured runs wrote one checkpoint; this one writes n_ckpt
                extra={"checkpoint_writes": n_ckpt - 1, "checkpoint_bytes": n_layers * (one + opt)},
                resume_marker=out / "checkpoint.json",
                detail=(f"teacher forward {trained:,} tokens; " if streamed else "")
                + f"{trained:,} tokens x {n_layers} layers ({steps:,} steps of {p.sae_batch_tokens:,})",
            )
        )
    for name in p.trials:
        stages.append(
            Stage(
                f"stats-{name}",
                "stats",
                f"F, L0, alpha, d* and importances of trial {name}",
                cmd(
                    "kdtool",
                    "stats",
                    sae=p.out / f"saes-{name}",
                    **source,
                    tokens=compact(p.stats_tokens),
                    alive_threshold=None if p.alive_threshold == 1e-5 else p.alive_threshold,
                    o=p.out / f"stats-{name}.parquet",
                ),
                tokens={"teacher_forward": p.stats_tokens if streamed else 0, "measured": p.stats_tokens},
                disk=[("stats table", n_layers * F * STATS_ROW_BYTES)],
                rate="stats",
                amount=p.stats_tokens,
                detail=f"{p.stats_tokens:,} tokens through {n_layers} SAEs",
            )
        )
    return stages


def _trial_stage(family: str, name: str, title: str, argv: list[str], disk: tuple[str, int]) -> Stage:
    """A stage run once per SAE trial that takes seconds and leaves one small file."""
    return Stage(f"{family}-{name}", family, title, argv, disk=[disk])


def predict_stage(p: Protocol, name: str) -> Stage:
    """`kdtool predict` of one SAE trial's stats at the distilled widths."""
    stats, out = p.out / f"stats-{name}.parquet", p.out / f"predict-{name}.parquet"
    argv = cmd("kdtool", "predict", str(stats), widths=p.distill["widths"], o=out)
    return _trial_stage(
        "predict", name, f"predicted floors L*(d_S) of trial {name}, every layer", argv, ("predict table", 16 * 1024)
    )


def distill_stage(p: Protocol, t: Teacher, seed: int | None) -> Stage:
    """`kdtool distill` (under torchrun with several processes) into every width."""
    ds = p.distill
    steps, bs, seq = int(ds["steps"]), int(ds["batch-size"]), int(ds["seq-len"])
    train_tokens = steps * bs * seq
    eval_tokens = int(ds["eval-batches"]) * bs * seq
    every, save = int(ds["eval-every"]), int(ds["save-every"])
    n_evals = 1 + steps // every + (1 if steps % every else 0)  # step 0, every N, the last
    n_saves = (steps // save + (1 if steps % save else 0)) if save else 1
    params = sum(c["params"] for c in t.students.values())
    disk = [
        (f"{len(t.students)} students, {params / 1e6:,.1f}M params (fp32)", student_bytes(params)),
        ("checkpoint/ (weights + AdamW moments, fp32)", student_checkpoint_bytes(params)),
    ]
    cache = None
    if p.teacher_cache:
        cache = p.out / "teacher-cache"
        disk.append(
            (
                f"teacher cache: top-{p.topk} of {train_tokens:,} training tokens, all {t.vocab:,} log-probs "
                f"of {eval_tokens:,} held-out ones",
                teacher_cache_bytes(train_tokens, eval_tokens, p.topk, t.vocab),
            )
        )
    launcher = ["kdtool"] if p.torchrun == 1 else ["torchrun", "--nproc_per_node", str(p.torchrun), "-m", "kdtool"]
    out = p.out / "students"
    opts = {k.replace("-", "_"): v for k, v in ds.items()}
    return Stage(
        "distill",
        "distill",
        f"distil into widths {arg(ds['widths'])}: {steps:,} steps of {bs} x {seq}"
        + (f" on {p.torchrun} processes" if p.torchrun > 1 else ""),
        cmd(
            *launcher,
            "distill",
            **teacher_opts(p),
            **data_opts(p),
            **opts,
            teacher_cache=cache,
            topk=p.topk if cache else None,
            seed=seed,
            o=out,
        ),
        tokens={
            "teacher_forward": train_tokens + eval_tokens,
            "train_per_student": train_tokens,
            "steps": steps,
            "evaluations": n_evals,
            "checkpoints": n_saves,
        },
        disk=disk,
        peak_extra=student_checkpoint_bytes(params),  # old and new checkpoint/ while it is swapped
        rate="distill",
        amount=steps,
        # the brief measured runs evaluated twice and saved once
        extra={
            "evaluations": n_evals - 2,
            "eval_batches": int(ds["eval-batches"]),
            "checkpoint_writes": n_saves - 1,
            "checkpoint_bytes": student_checkpoint_bytes(params),
        },
        resume_marker=out / "checkpoint" / "state.pt",
        detail=f"teacher forward {train_tokens + eval_tokens:,} tokens (one per batch for every width); "
        f"{train_tokens:,} training tokens per student; {n_evals} held-out evaluations",
    )


def calibrate_stage(p: Protocol, name: str) -> Stage:
    """`kdtool calibrate`: the observed floors against one trial's predictions."""
    floors, predicted = p.out / "students" / "floors.parquet", p.out / f"predict-{name}.parquet"
    argv = cmd(
        "kdtool",
        "calibrate",
        str(floors),
        predicted=predicted,
        layer=p.calibrate_layer,
        baseline_width=p.baseline_width,
        o=p.out / f"calib-{name}.json",
    )
    title = f"fit the observed floors to trial {name}'s predictions at layer {p.calibrate_layer}"
    return _trial_stage("calibrate", name, title, argv, ("calib.json", 64 * 1024))


def probe_stages(p: Protocol, seed: int | None) -> list[Stage]:
    """build-concepts (unless --concepts names a table) and the linear probes."""
    pr = p.probe
    stages = []
    concepts = p.concepts or p.out / "concepts.parquet"
    if p.concepts is None:
        stages.append(
            Stage(
                "concepts",
                "concepts",
                "six binary concepts from Debian text (fetches the packages with apt-get download)",
                cmd("kdtool", "probe", "build-concepts", o=concepts, per_class=pr["per_class"], fetch=True, seed=seed),
                disk=[("concepts table", 6 * 2 * int(pr["per_class"]) * 600)],
            )
        )
    models = ["teacher", *(str(p.out / "students" / f"width{w}") for w in pr["widths"])]
    n_tokens = 6 * 2 * int(pr["per_class"]) * int(pr["max_length"]) * len(models)
    stages.append(
        Stage(
            "probe",
            "probe",
            f"linear probes at layer {pr['layer']}: teacher and students {arg(pr['widths'])}",
            cmd(
                "kdtool",
                "probe",
                "run",
                str(concepts),
                teacher=p.model,
                models=models,
                layer=pr["layer"],
                per_class=pr["per_class"],
                seeds=pr["seeds"],
                max_length=pr["max_length"],
                pool=pr["pool"],
                device=p.device,
                offline=p.offline,
                seed=seed,
                o=p.out / "probe.parquet",
            ),
            tokens={"forward_at_most": n_tokens},
            disk=[("probe table", 64 * 1024)],
            # forward passes: bounded by the rate of the stage that runs the teacher (+ SAE encoding or disk writes)
            rate="stats" if p.sae_input == "stream" else "cache-acts",
            amount=n_tokens,
            detail=f"at most {n_tokens:,} tokens forward (6 concepts x 2 x {pr['per_class']} texts x "
            f"{pr['max_length']} tokens x {len(models)} models)",
        )
    )
    return stages


def report_stage(p: Protocol) -> Stage:
    """`kdtool plot report` over the run folder."""
    return Stage(
        "report",
        "report",
        "every figure and table the run folder allows",
        cmd("kdtool", "plot", "report", str(p.out)),
        disk=[("report/ (figures, HTML, Markdown)", 5 * 10**6)],
    )
