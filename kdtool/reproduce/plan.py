"""What a reproduction run will do: the plan of kdtool commands, each with its token counts and disk.

`build_plan(protocol, teacher)` turns a `Protocol` (kdtool/reproduce/protocol.py) into `Stage`s in order:
cache-acts (with --sae-input cache), one train-sae and one stats per SAE trial, predict, distill,
calibrate, concepts, probe and the report. Each stage carries its argv, the tokens it processes
and the bytes it leaves (from kdtool/reproduce/sizes.py); kdtool/reproduce/run.py fills in the
times and runs it. Kept apart from the protocol because this is the one part that writes kdtool
command lines.

Library code: no printing, no sys.exit.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtool.reproduce.protocol import Protocol, Teacher, teacher_shape
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

PLAN_KIND = "kdtool.reproduce.plan"
#: the stages whose time is measured; probe is derived from the stats rate, the rest take seconds
MEASURED = ("cache-acts", "train-sae", "stats", "distill")


# ---- stages -------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One kdtool command of the plan and what it costs."""

    name: str  # unique: train-sae-A, stats-A, distill, ...
    family: str  # one of FAMILIES
    title: str
    argv: list[str]  # starts with "kdtool" or "torchrun"
    tokens: dict[str, int] = field(default_factory=dict)  # named token counts
    disk: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes) left on disk
    peak_extra: int = 0  # bytes held only while the stage runs (checkpoint swaps)
    rate: str | None = None  # which throughput times it (a MEASURED family, or "stats" for probe)
    amount: float = 0  # tokens (or steps for distill) at that rate
    extra: dict[str, float] = field(default_factory=dict)  # what else the time depends on
    resume_marker: Path | None = None  # a file that means "partly done: add --resume"
    detail: str = ""  # one line about the token counts
    seconds: float | None = None  # filled by estimate()
    time_note: str = ""

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def disk_bytes(self) -> int:
        return sum(b for _, b in self.disk)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "title": self.title,
            "command": self.command,
            "argv": self.argv,
            "tokens": self.tokens,
            "detail": self.detail,
            "disk": [{"what": w, "bytes": b} for w, b in self.disk],
            "disk_bytes": self.disk_bytes,
            "peak_extra_bytes": self.peak_extra,
            "rate": self.rate,
            "amount": self.amount,
            "seconds": self.seconds,
            "time_note": self.time_note,
        }


@dataclass
class Plan:
    protocol: Protocol
    teacher: Teacher
    stages: list[Stage]
    notes: list[str]

    def totals(self) -> dict[str, Any]:
        final = sum(s.disk_bytes for s in self.stages)
        peak = final + max((s.peak_extra for s in self.stages), default=0)
        secs = [s.seconds for s in self.stages if s.rate]
        known = all(x is not None for x in secs)
        return {
            "disk_bytes": final,
            "disk_peak_bytes": peak,
            "teacher_download_bytes": 2 * self.teacher.params,
            "seconds": sum(x for x in secs if x is not None) if known else None,
            "seconds_known": sum(x for x in secs if x is not None),
            "stages_without_time": [s.name for s in self.stages if s.rate and s.seconds is None],
        }

    def as_dict(self) -> dict[str, Any]:
        t = self.teacher
        return {
            "kind": PLAN_KIND,
            "protocol": self.protocol.as_dict(),
            "teacher": {
                "model": self.protocol.model,
                "d_model": t.d_model,
                "n_layers": t.n_layers,
                "vocab": t.vocab,
                "params": t.params,
                "students": {str(w): c for w, c in t.students.items()},
                "config_source": t.source,
            },
            "stages": [s.as_dict() for s in self.stages],
            "totals": self.totals(),
            "notes": self.notes,
        }


def _compact(n: int) -> str:
    """300000000 -> '300M' (what parse_count reads back); other numbers as digits."""
    for suffix, unit in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _arg(v: Any) -> str:
    if isinstance(v, float) and v == int(v) and abs(v) >= 1:
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _cmd(*head: str, **opts: Any) -> list[str]:
    """_cmd('kdtool', 'stats', sae='x', alive_threshold=1e-5, o='y') -> [..., '--sae', 'x',
    '--alive-threshold', '1e-05', '-o', 'y']; None is left out, True is a bare flag."""
    argv = list(head)
    for k, v in opts.items():
        if v is None or v is False:
            continue
        flag = "-o" if k == "o" else "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, _arg(v)]
    return argv


def _teacher(p: Protocol) -> dict[str, Any]:
    return {"model": p.model, "revision": p.revision, "device": p.device, "offline": p.offline}


def _data(p: Protocol) -> dict[str, Any]:
    return {
        "dataset": p.dataset,
        "split": None if p.split == "train" else p.split,
        "text_column": None if p.text_column == "text" else p.text_column,
    }


def build_plan(p: Protocol, teacher: Teacher | None = None) -> Plan:
    """Every stage of the protocol, in order, with its command, token counts and disk."""
    t = teacher or teacher_shape(p)
    notes = list(p.notes)
    seed = p.seed or None
    if p.sae_input == "cache":
        source = {"acts": str(p.out / "acts")}
    else:
        source = {**_teacher(p), **_data(p), "seq_len": p.sae_seq_len, "batch_size": p.teacher_batch}
        cache = acts_bytes(p.sae_tokens, len(p.layers), t.d_model)
        notes.append(
            f"SAE input: streaming (the teacher runs inside train-sae and stats, nothing is cached). A cache "
            f"(--sae-input cache) would need {fmt_bytes(cache)} ({p.sae_tokens:,} tokens x {len(p.layers)} layers "
            f"x {t.d_model} x 2 bytes) and run the teacher once instead of {len(p.trials)} times."
        )
    stages = [
        *_sae_stages(p, t, source, seed),
        *[_predict_stage(p, name) for name in p.trials],
        _distill_stage(p, t, seed),
        *[_calibrate_stage(p, name) for name in p.trials],
        *_probe_stages(p, seed),
        Stage(
            "report",
            "report",
            "every figure and table the run folder allows",
            _cmd("kdtool", "plot", "report", str(p.out)),
            disk=[("report/ (figures, HTML, Markdown)", 5 * 10**6)],
        ),
    ]
    if p.revision:
        notes.append("probe has no --revision: it loads the teacher's default revision")
    return Plan(p, t, [s for s in stages if s.family not in p.skip], notes)


def _sae_stages(p: Protocol, t: Teacher, source: dict, seed: int | None) -> list[Stage]:
    d, n_layers, layers = t.d_model, len(p.layers), p.layers
    F = int(round(p.expansion * d))
    stages = []
    if p.sae_input == "cache":
        acts = p.out / "acts"
        stages.append(
            Stage(
                "cache-acts",
                "cache-acts",
                f"cache the residual stream at layers {_arg(layers)}",
                _cmd(
                    "kdtool",
                    "cache-acts",
                    **_teacher(p),
                    **_data(p),
                    seq_len=p.sae_seq_len,
                    batch_size=p.teacher_batch,
                    layers=layers,
                    tokens=_compact(p.sae_tokens),
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
                f"SAE trial {name}: {trial.get('label', '')}",
                _cmd(
                    "kdtool",
                    "train-sae",
                    **source,
                    layer=layers,
                    expansion=p.expansion,
                    batch_tokens=p.sae_batch_tokens,
                    tokens=_compact(p.sae_tokens),
                    checkpoint_every=_compact(every),
                    shuffle_buffer=_compact(p.shuffle_buffer) if streamed else None,
                    **{k: v for k, v in trial.items() if k != "label"},
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
                _cmd(
                    "kdtool",
                    "stats",
                    sae=p.out / f"saes-{name}",
                    **source,
                    tokens=_compact(p.stats_tokens),
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


def _predict_stage(p: Protocol, name: str) -> Stage:
    return Stage(
        f"predict-{name}",
        "predict",
        f"predicted floors L*(d_S) of trial {name}, every layer",
        _cmd(
            "kdtool",
            "predict",
            str(p.out / f"stats-{name}.parquet"),
            widths=p.distill["widths"],
            o=p.out / f"predict-{name}.parquet",
        ),
        disk=[("predict table", 16 * 1024)],
    )


def _distill_stage(p: Protocol, t: Teacher, seed: int | None) -> Stage:
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
        f"distil into widths {_arg(ds['widths'])}: {steps:,} steps of {bs} x {seq}"
        + (f" on {p.torchrun} processes" if p.torchrun > 1 else ""),
        _cmd(
            *launcher,
            "distill",
            **_teacher(p),
            **_data(p),
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


def _calibrate_stage(p: Protocol, name: str) -> Stage:
    return Stage(
        f"calibrate-{name}",
        "calibrate",
        f"fit the observed floors to trial {name}'s predictions at layer {p.calibrate_layer}",
        _cmd(
            "kdtool",
            "calibrate",
            str(p.out / "students" / "floors.parquet"),
            predicted=p.out / f"predict-{name}.parquet",
            layer=p.calibrate_layer,
            baseline_width=p.baseline_width,
            o=p.out / f"calib-{name}.json",
        ),
        disk=[("calib.json", 64 * 1024)],
    )


def _probe_stages(p: Protocol, seed: int | None) -> list[Stage]:
    pr = p.probe
    stages = []
    concepts = p.concepts or p.out / "concepts.parquet"
    if p.concepts is None:
        stages.append(
            Stage(
                "concepts",
                "concepts",
                "six binary concepts from Debian text (fetches the packages with apt-get download)",
                _cmd("kdtool", "probe", "build-concepts", o=concepts, per_class=pr["per_class"], fetch=True, seed=seed),
                disk=[("concepts table", 6 * 2 * int(pr["per_class"]) * 600)],
            )
        )
    models = ["teacher", *(str(p.out / "students" / f"width{w}") for w in pr["widths"])]
    n_tokens = 6 * 2 * int(pr["per_class"]) * int(pr["max_length"]) * len(models)
    stages.append(
        Stage(
            "probe",
            "probe",
            f"linear probes at layer {pr['layer']}: teacher and students {_arg(pr['widths'])}",
            _cmd(
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
