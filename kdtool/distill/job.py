"""A distillation job on text: what `kdtool distill` runs, callable from Python.

`distill_text` takes a DistillConfig, the text (a kdtool.text.tokens.DataSpec) and a loader for
the teacher; it opens the --teacher-cache (and skips the teacher when every batch is there),
builds the training and held-out streams (the epoch policy, kdtool/distill/data.py), records
provenance and runs kdtool.distill.loop.run. Under torchrun the caller joins the process group
(kdtool.distributed.dist_init) and passes it as `dist=`; rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdtool import kinds, locks
from kdtool import provenance as _provenance
from kdtool.distill.config import DistillConfig
from kdtool.distill.data import text_streams
from kdtool.distill.features import FeaturePlan
from kdtool.distill.files import STUDENT_KIND, finished_run
from kdtool.distill.loop import DistillResult, rank_rows, run
from kdtool.distill.teacher_cache import TeacherCache
from kdtool.distributed import Dist, barrier, world_size
from kdtool.errors import BadInput
from kdtool.identity import data_identity, describe, files_identity, model_identity
from kdtool.models import EMBEDDED_NAME, LoadedModel, ModelSpec, check_seq_len
from kdtool.text.tokens import DataSpec


def rank_device(device: str) -> str:
    """The --device of this process: under torchrun, auto and cuda mean the rank's own GPU (cuda:LOCAL_RANK)."""
    if world_size() > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def run_key(model: ModelSpec, data: DataSpec) -> dict[str, Any]:
    """What identifies a run's teacher and text (DistillConfig.run_key): --resume and --teacher-cache check it.

    By content (kdtool/identity.py), not by the names typed: the same teacher or text under another
    path spelling resumes, another teacher under the same name is refused.
    """
    described = data.describe()
    return {
        "teacher": model_identity(model.model, model.revision),
        "teacher_dtype": model.dtype,
        "text": data_identity(described, data.local_inputs()),
        "data": {k: v for k, v in described.items() if k != "dataset"},  # how it is cut and shuffled
    }


def earlier_students(out: Path) -> list[Path]:
    """The student folders a kdtool distill run left in `out` (their kdtool.json says so); other folders are
    not ours to remove."""
    return [f for f in sorted(out.glob("width*")) if kinds.kind_of(f) == STUDENT_KIND] if out.is_dir() else []


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an earlier run's checkpoint unless told to continue it or start over."""
    if resume and overwrite:
        raise BadInput("--resume and --overwrite contradict each other: give one")
    if (out / "checkpoint").exists() and not (resume or overwrite):
        raise BadInput(f"{out}/checkpoint exists: add --resume to continue that run or --overwrite to start over")


@dataclass
class _TeacherParts:
    """What the run needs of the teacher, whether loaded or read back from the cache."""

    config: Any  # transformers PretrainedConfig
    tokenizer: Any
    model: Any  # None when every batch is cached
    name: str
    path: str | None  # local folder loaded (for provenance inputs)
    describe: dict


def _open_teacher(cfg: DistillConfig, cache, rows, load_teacher: Callable[[], LoadedModel], emit) -> _TeacherParts:
    if cache is not None and cache.covers(cfg.steps, cfg.eval_batches, rows):
        emit({"event": "teacher-cached", "cache": cache.root})
        key = cfg.run_key.get("teacher")
        name = describe(key) if isinstance(key, dict) else str(key or EMBEDDED_NAME)
        return _TeacherParts(cache.load_teacher_config(), cache.load_tokenizer(), None, name, None, {"model": name})
    lm = load_teacher()
    config = lm.model.config
    if cache is not None:
        cache.save_teacher(config, lm.tokenizer)
    if hasattr(config, "vocab_size") and len(lm.tokenizer) > config.vocab_size:
        emit({"event": "vocab", "tokenizer": len(lm.tokenizer), "model": config.vocab_size})
    return _TeacherParts(config, lm.tokenizer, lm.model, lm.name, lm.path, lm.describe())


def distill_text(
    cfg: DistillConfig,
    data: DataSpec,
    load_teacher: Callable[[], LoadedModel],
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dist: Dist | None = None,
    provenance: Callable[..., dict] = _provenance.make,
    callback: Callable[[dict], None] | None = None,
) -> DistillResult:
    """Distil the teacher into cfg.widths on packed text; write out_dir (rank 0) and return the floors.

    load_teacher() is called only when some batch is not in the teacher cache (cache_dir, top-k
    cfg.topk). provenance(inputs=, seed=, config=) makes the record each file carries. callback(event)
    hears "teacher-cached" (the teacher is not loaded), "vocab" (the tokenizer has more entries than
    the embedding rows), "epoch" (the training text repeats from here), "start", then run()'s events.
    """
    d = dist or Dist()
    out = Path(out_dir)
    check_output(out, resume=resume, overwrite=overwrite)
    if cache_dir is not None and cfg.topk < 1:
        raise BadInput("--teacher-cache needs --topk >= 1")
    command = provenance().get("command")
    owner = locks.claim(out, command=command) if d.main else contextlib.nullcontext()
    with owner:  # rank 0 is `out`'s only writer, has put back a checkpoint a kill left aside, and can write
        barrier(d)  # the other ranks read the checkpoint only after that
        return _distill(cfg, data, load_teacher, out, cache_dir, resume, overwrite, d, provenance, callback)


def _distill(cfg, data, load_teacher, out, cache_dir, resume, overwrite, d, provenance, callback) -> DistillResult:
    emit = callback or (lambda event: None)
    features = None
    if cfg.sae is not None:  # read and checked before the (slow) teacher load and the --resume check
        features = FeaturePlan.load(cfg.sae, cfg.stats, cfg.widths, cfg.feature_budget, cfg.feature_weighting)
        identity = {"sae": files_identity(cfg.sae), "stats": files_identity(cfg.stats)}  # by content
        cfg = dataclasses.replace(cfg, run_key=cfg.run_key | {"features": identity})  # --resume checks them
    done = finished_run(out, cfg) if resume else None
    if done is not None:  # nothing to train: left as it is (the one rule for a finished run's --resume)
        emit({"event": "finished", "step": done["step"]})
        return DistillResult(done["floors"], done["curves"], out, done["step"], done["provenance"])
    if overwrite and d.main:
        if (out / "checkpoint").exists():
            shutil.rmtree(out / "checkpoint")  # a kill before the first new checkpoint must not resume the old run
        for folder in earlier_students(out):  # a run of other widths or losses must not leave its students beside
            shutil.rmtree(folder)
    rows = rank_rows(cfg.batch_size, d)
    cache = None
    if cache_dir is not None:
        cache = TeacherCache(
            cache_dir,
            key={"run": cfg.run_key, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size},
            topk=cfg.topk,
            temperature=cfg.temperature,
            provenance=provenance(seed=cfg.seed, config={"key": cfg.run_key}),
        )
    teacher = _open_teacher(cfg, cache, rows, load_teacher, emit)
    check_seq_len(teacher.config, cfg.seq_len, teacher.name)
    train, held_out = text_streams(
        data,
        teacher.tokenizer,
        cfg.batch_size,
        on_new_epoch=lambda epoch, at: emit({"event": "epoch", "epoch": epoch, "at": at}),
    )
    if teacher.model is not None and next(iter(train(0)), None) is None:
        name = f"--dataset {data.dataset}" if data.dataset is not None else "the embedded corpus"
        raise BadInput(
            f"{name}: no training batch of {cfg.batch_size}x{cfg.seq_len} tokens in it (empty, or too little text)"
        )
    record = provenance(
        inputs=[p for p in (teacher.path,) if p] + data.local_inputs(),
        seed=cfg.seed,
        config={"distill": cfg.as_dict(), "data": data.describe(), "teacher": teacher.describe, "world_size": d.world},
    )
    emit({"event": "start", "teacher": teacher.name, "world": d.world})
    return run(
        cfg,
        teacher_config=teacher.config,
        teacher=teacher.model,
        train_batches=train,
        eval_batches=held_out,
        out_dir=out,
        tokenizer=teacher.tokenizer,
        cache=cache,
        resume=resume,
        provenance=record,
        callback=callback,
        dist=d,
        features=features,
    )
