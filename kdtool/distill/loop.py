"""Distil one teacher into several narrower students at once (paper section 6, appendix E).

Every width trains against ONE teacher forward per batch: the teacher's soft targets for a
micro-batch are computed once and every student steps on them. Per width: AdamW, linear
warmup, cosine decay to ``min_lr_ratio x lr``, gradient clipping; evaluation on a held-out
split (never the training batches: the authors' code evaluated on its first training
batches) every ``eval_every`` steps and at the last step; floor = mean eval per-token KL over
the evaluations in the final ``floor_fraction`` (10%) of steps, with its std.

Under torchrun (the caller joins the group, kdtool.distributed.dist_init, and passes it as
`dist=`) every rank reads the same global batch and trains on its own rows
(rank r of W takes rows [r B/W, (r+1) B/W)); DDP averages the gradients, so W processes
follow the single-process run up to float rounding. NCCL on GPU, gloo on CPU.

Several losses (--loss, kdtool/distill/objectives.py) train one student per (width, loss), all on the
same teacher forward; every student is evaluated on the same held-out full-vocabulary KL.

Outputs (rank 0): ``width{W}/`` (``width{W}-{loss}/`` for losses other than kl; HF save_pretrained +
tokenizer + kdtool.json),
``curves.parquet``, ``floors.parquet``, and ``checkpoint/`` for --resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdtool.distill.cohort import Progress, Students
from kdtool.distill.config import DistillConfig
from kdtool.distill.data import Cursor, EvalBatches, TrainBatches, as_batch, check_shape
from kdtool.distill.features import FeaturePlan
from kdtool.distill.files import compute_floors, curve_columns, curve_rows, write_outputs
from kdtool.distill.losses import FullTarget, LossSums, TopKTarget, teacher_target
from kdtool.distill.student_loss import diverged, eval_sums, train_loss
from kdtool.distributed import Dist, all_reduce, barrier
from kdtool.errors import BadInput, RuntimeFailure

Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclass
class DistillResult:
    """What run() returns (on every rank; rank 0 also wrote it to out_dir)."""

    floors: dict[str, list]  # columns of floors.parquet
    curves: dict[str, list]  # columns of curves.parquet
    out_dir: Path | None
    resumed_from: int = 0
    provenance: dict | None = None  # as written into the files


def rank_rows(batch_size: int, d: Dist) -> tuple[int, int]:
    """The rows [lo, hi) of each global batch that this rank trains on."""
    per = batch_size // d.world
    return d.rank * per, (d.rank + 1) * per


def _autocast(amp: str, device: torch.device) -> Autocast:
    """bf16 autocast for the students' forwards (amp=bf16, or auto on CUDA), else a no-op context."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _chunks(n: int, micro: int) -> list[tuple[int, int]]:
    size = micro if 0 < micro < n else n
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


class Teacher:
    """Soft targets for train step i / eval batch j: from the cache, or one teacher forward."""

    def __init__(self, cfg: DistillConfig, teacher, cache, rows, device, autocast: Autocast):
        self.cfg, self._teacher, self.cache, self.rows = cfg, teacher, cache, rows
        self.device, self.autocast = device, autocast
        self.forwards = 0

    @property
    def model(self):
        if self._teacher is None:
            raise RuntimeFailure("the teacher is needed (a batch is not in --teacher-cache) but was not loaded")
        if callable(self._teacher) and not hasattr(self._teacher, "forward"):
            self._teacher = self._teacher()
            self._teacher.eval()
        return self._teacher

    def compute(self, tokens, mask, *, full: bool = False, layers: list[int] = ()):
        """(targets, {L: hidden_states[L]}) of a chunk: top-k targets when training from a cache, the full
        vocabulary if `full`; the residual stream at `layers` (for the matching terms) from the same forward."""
        ids, m = tokens.to(self.device), mask.to(self.device)
        with torch.no_grad(), self.autocast():
            if layers:
                out = self.model(input_ids=ids, attention_mask=m, output_hidden_states=True)
                hidden = {layer: out.hidden_states[layer] for layer in layers}
            else:
                out, hidden = self.model(input_ids=ids, attention_mask=m), {}
        self.forwards += 1
        return teacher_target(out.logits, self.cfg.temperature, None if full else (self.cfg.topk or None)), hidden

    def train_batch(self, step: int, cursor: Cursor | None):
        """This rank's rows of training batch `step`: (tokens, mask, cached targets or None)."""
        hit = self.cache.load("train", step, self.rows) if self.cache is not None else None
        if hit is not None:
            return hit
        if cursor is None:
            raise RuntimeFailure(f"no training data given and step {step} is not in --teacher-cache")
        tokens, mask = cursor.get(step)
        return tokens[self.rows[0] : self.rows[1]], mask[self.rows[0] : self.rows[1]], None

    def keep(self, step: int, tokens, mask, pieces: list[TopKTarget]) -> None:
        """Store the targets computed for training batch `step` in the cache (if there is one)."""
        if self.cache is not None:
            self.cache.save("train", step, self.rows, tokens, mask, TopKTarget.cat(pieces))


def train_step(step: int, students: Students, teach: Teacher, cursor: Cursor | None, d: Dist):
    """Optimizer step `step` + 1 of every student on one batch: (train values, lrs, gradient norms) per student.

    The batch is cut into micro-batches; each gets one teacher forward (or cached targets) that every
    (width, loss) student trains on, gradients accumulate, and under DDP only the last micro-batch
    synchronises. Each student's loss: kdtool/distill/student_loss.py.
    """
    cfg, device = students.cfg, teach.device
    tokens, mask, cached = teach.train_batch(step, cursor)
    local_tokens = max(float(mask.sum().item()), 1.0)
    local_ce = max(float((mask[:, :-1] & mask[:, 1:]).sum().item()), 1.0)
    stats = {k: LossSums() for k in cfg.students}
    pieces = []
    chunks = _chunks(tokens.shape[0], cfg.micro_batch)
    for ci, (lo, hi) in enumerate(chunks):
        tok, m = tokens[lo:hi].to(device), mask[lo:hi].to(device)
        if cached is not None:
            target, hidden = cached.rows(lo, hi).to(device), {}
        else:
            target, hidden = teach.compute(tok, m, layers=students.teacher_layers)
            pieces.append(target)
        aux = students.aux_targets(hidden, m)
        sync = ci == len(chunks) - 1 or d.world == 1
        for key, module in students.train.items():
            with module.no_sync() if not sync else contextlib.nullcontext():
                per = (local_tokens, local_ce)
                loss, sums = train_loss(module, key, students, tok, m, target, aux, teach.autocast, per)
                loss.backward()
            stats[key].add(sums)
    if cached is None:
        teach.keep(step, tokens, mask, pieces)
    lrs, norms = students.step()
    values = {}
    for key in cfg.students:
        s = LossSums.from_tensor(all_reduce(stats[key].as_tensor(), d))
        values[key] = s.values(cfg.temperature) | {"tokens": s.tokens}
    bad = diverged(values, students.specs)
    if bad:
        raise RuntimeFailure(
            f"training diverged at step {step + 1} (non-finite loss of width/loss {', '.join(bad)}); "
            "lower --lr or raise --warmup"
        )
    return values, lrs, norms


class Evaluator:
    """Held-out evaluation: the same `eval_batches` batches every time, always on the full-vocabulary KL
    (also with --teacher-cache, whose held-out batches are stored in full: a top-k KL there would report
    a lower bound, about half the floor for SmolLM2 at T=2, see docs/distill.md). Targets stay in memory
    up to `eval_target_budget` bytes; beyond that they are re-read from the cache or recomputed."""

    def __init__(self, cfg, teach: Teacher, source, rows, device, autocast, d: Dist):
        self.cfg, self.teach, self.source, self.rows = cfg, teach, source, rows
        self.device, self.autocast, self.d = device, autocast, d
        self.batches = None
        self.targets: dict[int, Any] = {}
        self.kept_bytes = 0

    def _keep(self, j, target) -> None:
        if self.kept_bytes + target.nbytes() <= self.cfg.eval_target_budget:
            self.targets[j] = target
            self.kept_bytes += target.nbytes()

    def _load(self):
        cache = self.teach.cache
        out, it, pos = [], None, 0
        for j in range(self.cfg.eval_batches):
            hit = cache.load("eval", j, self.rows) if cache is not None else None
            if hit is not None:
                tok, m, tgt = hit
                out.append((tok, m))
                self._keep(j, tgt)
                continue
            if self.source is None:
                raise RuntimeFailure("no held-out data given and the eval batches are not in --teacher-cache")
            try:
                if it is None:
                    it = iter(self.source())
                while pos < j:  # batches before j were cached: skip them in the stream
                    next(it)
                    pos += 1
                tok, m = check_shape(as_batch(next(it)), self.cfg, "held-out")
                pos += 1
            except StopIteration:
                if j == 0:
                    raise BadInput(
                        f"no held-out batch: the held-out text does not fill one batch of {self.cfg.batch_size}x"
                        f"{self.cfg.seq_len} tokens; give more text (or a smaller --batch-size / --seq-len)"
                    ) from None
                raise RuntimeFailure(f"held-out data ran out after {j} batches; lower --eval-batches") from None
            out.append((tok[self.rows[0] : self.rows[1]], m[self.rows[0] : self.rows[1]]))
        self.batches = out

    def _target(self, j, tok, m):
        if j in self.targets:
            return self.targets[j]
        cache = self.teach.cache
        hit = cache.load("eval", j, self.rows) if cache is not None else None
        if hit is not None:
            return hit[2]
        parts = [
            self.teach.compute(tok[lo:hi].to(self.device), m[lo:hi].to(self.device), full=True)[0]
            for lo, hi in _chunks(tok.shape[0], self.cfg.micro_batch)
        ]
        target = FullTarget(torch.cat([p.logp for p in parts]))
        if cache is not None:
            cache.save("eval", j, self.rows, tok, m, target)
        self._keep(j, target)
        return target

    def run(self, models) -> dict:
        """Held-out KL, raw KL and CE per student (summed over the ranks' rows); models are left in train mode."""
        if self.batches is None:
            self._load()
        sums = {w: LossSums() for w in models}
        for m in models.values():
            m.eval()
        with torch.no_grad():
            for j, (tok, mask) in enumerate(self.batches):
                target = self._target(j, tok, mask)
                for lo, hi in _chunks(tok.shape[0], self.cfg.micro_batch):
                    t, mk = tok[lo:hi].to(self.device), mask[lo:hi].to(self.device)
                    sub = target.rows(lo, hi).to(self.device)
                    for w, model in models.items():
                        sums[w].add(eval_sums(model, t, mk, sub, self.cfg, self.autocast))
        for m in models.values():
            m.train()
        out = {}
        for w in models:
            s = LossSums.from_tensor(all_reduce(sums[w].as_tensor(), self.d))
            out[w] = s.values(self.cfg.temperature)
        return out


def run(
    cfg: DistillConfig,
    *,
    teacher_config,
    teacher=None,
    train_batches: TrainBatches | None = None,
    eval_batches: EvalBatches | None = None,
    out_dir: str | Path | None = None,
    tokenizer=None,
    cache=None,
    resume: bool = False,
    provenance: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    dist: Dist | None = None,
    features: FeaturePlan | None = None,
) -> DistillResult:
    """Train one student per (width, loss) against the teacher; write outputs to out_dir (rank 0).

    teacher: a causal LM (or a zero-argument loader, called only if some batch is not cached).
    train_batches(skip) -> iterator of global [B, S] batches (a LongTensor, a (ids, mask) pair or
    a dict with input_ids/attention_mask), starting after `skip` batches. eval_batches() -> the
    held-out stream. Both must be deterministic: the same call yields the same batches.
    dist: the torchrun process group (kdtool.distributed.dist_init), None for one process.
    features: the chosen SAE features of --loss features (read from cfg.sae and cfg.stats when None).
    callback(event) hears "resumed"/"fresh", "eval" (step 0), "step" and "checkpoint".
    """
    d = dist or Dist()
    device = torch.device(f"cuda:{d.local_rank}" if cfg.device.startswith("cuda") and d.world > 1 else cfg.device)
    autocast = _autocast(cfg.amp, device)
    if cfg.batch_size % d.world:
        raise BadInput(f"--batch-size {cfg.batch_size} must be divisible by the {d.world} processes")
    rows = rank_rows(cfg.batch_size, d)
    out = Path(out_dir) if out_dir is not None else None
    emit = callback or (lambda event: None)

    if features is None and cfg.sae is not None:
        features = FeaturePlan.load(cfg.sae, cfg.stats, cfg.widths, cfg.feature_budget, cfg.feature_weighting)
    students = Students(cfg, teacher_config, device, features)
    p = students.restore(out, device, emit) if resume else Progress()
    resumed_from = p.step
    students.wrap(d)
    teach = Teacher(cfg, teacher, cache, rows, device, autocast)
    cursor = Cursor(train_batches, cfg) if train_batches is not None else None
    evaluator = Evaluator(cfg, teach, eval_batches, rows, device, autocast, d)
    if p.step == 0:
        p.rows += curve_rows(cfg, 0, 0, None, evaluator.run(students.models), {}, {})
        emit({"event": "eval", "step": 0, "eval": p.rows[-1]})

    while p.step < cfg.steps:
        values, lrs, norms = train_step(p.step, students, teach, cursor, d)
        p.tokens += int(values[cfg.students[0]]["tokens"])
        p.step += 1
        due = p.step % cfg.eval_every == 0 or p.step == cfg.steps
        new = curve_rows(cfg, p.step, p.tokens, values, evaluator.run(students.models) if due else None, lrs, norms)
        p.rows += new
        emit({"event": "step", "step": p.step, "rows": new, "teacher_forwards": teach.forwards})
        if cfg.save_every and p.step % cfg.save_every == 0 and p.step < cfg.steps and out is not None:
            students.save(out, p, d)
            emit({"event": "checkpoint", "step": p.step})

    curves = curve_columns(p.rows)
    floors = compute_floors(cfg, curves, students.models)
    if out is not None and d.main:
        objectives = {k: students.objective(k) for k in cfg.students}
        write_outputs(out, cfg, students.modules, objectives, tokenizer, curves, floors, provenance)
        students.save(out, p, d)
    barrier(d)
    return DistillResult(floors=floors, curves=curves, out_dir=out, resumed_from=resumed_from, provenance=provenance)
