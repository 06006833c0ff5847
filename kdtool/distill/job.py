"""A distillation job on text: what `kdtool distill` runs, callable from Python.

`distill_text` takes a DistillConfig, the text (a kdtool.text.tokens.DataSpec) and a loader for
the teacher; it opens the --teacher-cache (and skips the teacher when every batch is there),
builds the training and held-out streams (the epoch policy, kdtool/distill/data.py), records
provenance and runs kdtool.distill.loop.run. Under torchrun the caller joins the process group
(kdtool.distributed.dist_init) and passes it as `dist=`; rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdtool import provenance as _provenance
from kdtool.distill.config import DistillConfig
from kdtool.distill.data import text_streams
from kdtool.distill.features import FeaturePlan
from kdtool.distill.loop import DistillResult, rank_rows, run
from kdtool.distill.teacher_cache import TeacherCache
from kdtool.distributed import Dist, world_size
from kdtool.errors import BadInput
from kdtool.models import EMBEDDED_NAME, LoadedModel, ModelSpec
from kdtool.text.tokens import DataSpec


def rank_device(device: str) -> str:
    """The --device of this process: under torchrun, auto and cuda mean the rank's own GPU (cuda:LOCAL_RANK)."""
    if world_size() > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def run_key(model: ModelSpec, data: DataSpec) -> dict[str, Any]:
    """What identifies a run's teacher and text (DistillConfig.run_key): --resume and --teacher-cache check it."""
    return {
        "teacher": model.model or EMBEDDED_NAME,
        "revision": model.revision,
        "teacher_dtype": model.dtype,
        "data": data.describe(),
    }


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
        name = cfg.run_key.get("teacher")
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
    emit = callback or (lambda event: None)
    check_output(out, resume=resume, overwrite=overwrite)
    if cache_dir is not None and cfg.topk < 1:
        raise BadInput("--teacher-cache needs --topk >= 1")
    if overwrite and d.main and (out / "checkpoint").exists():
        shutil.rmtree(out / "checkpoint")  # a kill before the first new checkpoint must not resume the old run
    rows = rank_rows(cfg.batch_size, d)
    features = None
    if cfg.sae is not None:  # read and checked before the (slow) teacher load
        features = FeaturePlan.load(cfg.sae, cfg.stats, cfg.widths, cfg.feature_budget, cfg.feature_weighting)
        identity = {"sae": _provenance.fingerprint(cfg.sae), "stats": _provenance.fingerprint(cfg.stats)}
        cfg = dataclasses.replace(cfg, run_key=cfg.run_key | {"features": identity})  # --resume checks them
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
    train, held_out = text_streams(
        data,
        teacher.tokenizer,
        cfg.batch_size,
        on_new_epoch=lambda epoch, at: emit({"event": "epoch", "epoch": epoch, "at": at}),
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
