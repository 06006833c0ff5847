"""Distil one teacher into several narrower students at once (paper section 6, appendix E).

Every width trains against ONE teacher forward per batch: the teacher's soft targets for a
micro-batch are computed once and every student steps on them. Per width: AdamW, linear
warmup, cosine decay to ``min_lr_ratio x lr``, gradient clipping; evaluation on a held-out
split (never the training batches: the authors' code evaluated on its first training
batches) every ``eval_every`` steps and at the last step; floor = mean eval per-token KL over
the evaluations in the final ``floor_fraction`` (10%) of steps, with its std.

Under torchrun every rank reads the same global batch and trains on its own rows
(rank r of W takes rows [r B/W, (r+1) B/W)); DDP averages the gradients, so W processes
follow the single-process run up to float rounding. NCCL on GPU, gloo on CPU.

Outputs (rank 0): ``width{W}/`` (HF save_pretrained + tokenizer + kdtool.json),
``curves.parquet``, ``floors.parquet``, and ``checkpoint/`` for --resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtool.distill.files import (  # noqa: F401 - re-exported: the files a run writes
    CURVE_COLUMNS,
    CURVES_KIND,
    FLOORS_KIND,
    RESUME_FIELDS,
    _cfg_dict,
    _columns,
    _curve_rows,
    compute_floors,
    floor_window,
    load_checkpoint,
    save_checkpoint,
    write_outputs,
)
from kdtool.distill.students import StudentPolicy
from kdtool.distributed import Dist, dist_close, dist_init  # re-exported for cli/distill.py, distill_io.py
from kdtool.distributed import all_reduce as _all_reduce
from kdtool.errors import BadInput, RuntimeFailure


@dataclass
class DistillConfig:
    """One distillation job (defaults = the paper's schedule, appendix E)."""

    widths: list[int]  # student hidden widths
    temperature: float = 2.0  # softmax temperature T of teacher and student
    steps: int = 30_000  # optimizer steps
    batch_size: int = 32  # sequences per step (global, across ranks)
    seq_len: int = 512  # tokens per sequence
    micro_batch: int = 0  # rows per forward pass (0 = the whole local batch); gradients accumulate
    lr: float = 3e-4  # peak AdamW learning rate
    min_lr_ratio: float = 0.0  # cosine decays to lr x this (0 = to zero, as transformers' cosine schedule)
    warmup: int = 1000  # linear warmup steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay, on every parameter (torch's default grouping)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (torch defaults; the paper does not say)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm per student (0 = off)
    ce_weight: float = 0.0  # loss = (1-w) T^2 KL + w CE on the data; 0 = pure distillation (paper)
    eval_every: int = 500  # steps between held-out evaluations (plus step 0 and the last step)
    eval_batches: int = 8  # held-out batches per evaluation (the same batches every time)
    save_every: int = 1000  # steps between checkpoints (0 = only at the end)
    floor_fraction: float = 0.1  # floor = mean eval KL over evaluations at step >= (1 - this) x steps
    seed: int = 0  # student init (per width: seed, width) and anything else random
    heads: str = "head-dim:64"  # student head policy (kdtool.distill.students)
    ffn_ratio: str = "4"  # FFN = ratio x width, or "teacher"
    init_std: str = "teacher"  # teacher | small-init | number
    topk: int = 0  # > 0 when training on cached top-k teacher targets (--teacher-cache)
    device: str = "cpu"  # torch device for teacher and students
    amp: str = "auto"  # auto (bf16 autocast on CUDA) | bf16 | off
    eval_target_budget: int = 1 << 30  # keep held-out teacher targets in memory up to this many bytes
    run_key: dict = field(default_factory=dict)  # teacher/data identity, checked on --resume

    def __post_init__(self):
        self.widths = [int(w) for w in self.widths]
        self.betas = tuple(float(b) for b in self.betas)
        if not self.widths:
            raise BadInput("--widths: give at least one width")
        if len(set(self.widths)) != len(self.widths):
            raise BadInput(f"--widths: repeated width in {self.widths}")
        checks = [
            (self.temperature > 0, "--temperature must be > 0"),
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.seq_len >= 2, "--seq-len must be >= 2"),
            (self.micro_batch >= 0, "--micro-batch must be >= 0"),
            (self.lr > 0, "--lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (0 <= self.warmup < self.steps, f"--warmup ({self.warmup}) must be < --steps ({self.steps})"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "--betas must be two numbers in [0, 1)"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0"),
            (0 <= self.ce_weight <= 1, "--ce-weight must be in [0, 1]"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.eval_batches >= 1, "--eval-batches must be >= 1"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (0 < self.floor_fraction <= 1, "floor fraction must be in (0, 1]"),
            (self.topk >= 0, "--topk must be >= 0"),
            (self.amp in ("auto", "bf16", "off"), "amp must be auto, bf16 or off"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        _ = self.policy  # validates heads/ffn/init
        from kdtool.distill.students import student_heads

        for w in self.widths:  # fail before a slow teacher load
            student_heads(w, self.heads)

    @property
    def policy(self) -> StudentPolicy:
        return StudentPolicy(heads=self.heads, ffn_ratio=str(self.ffn_ratio), init_std=str(self.init_std))


def lr_factor(step: int, *, warmup: int, steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# data


def as_batch(x):
    """Normalise what a data source yields to (tokens LongTensor[B,S], mask BoolTensor[B,S])."""
    import torch

    if isinstance(x, dict):
        ids = x["input_ids"]
        mask = x.get("attention_mask")
    elif isinstance(x, (tuple, list)):
        ids, mask = x[0], (x[1] if len(x) > 1 else None)
    else:
        ids, mask = x, None
    ids = torch.as_tensor(ids).long()
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    return ids, mask


class _Cursor:
    """The training stream, positioned at a batch index; reopened with skip_batches when it jumps."""

    def __init__(self, open_fn: Callable[[int], Iterator], cfg: DistillConfig):
        self.open_fn, self.cfg = open_fn, cfg
        self.it, self.pos = None, -1

    def get(self, index: int):
        if self.it is None or self.pos != index:
            self.it, self.pos = iter(self.open_fn(index)), index
        try:
            x = next(self.it)
        except StopIteration:
            raise RuntimeFailure(
                f"training data ran out after {index} batches of {self.cfg.batch_size}x{self.cfg.seq_len}; "
                "use a bigger dataset or fewer --steps"
            ) from None
        self.pos += 1
        return _check_shape(as_batch(x), self.cfg, "training")


def repeating(open_epoch: Callable[[int, int], Iterator], on_new_epoch: Callable[[int, int], None] | None = None):
    """train_batches(skip) over a finite corpus: when epoch e ends, epoch e+1 starts (reshuffled by the caller).

    open_epoch(epoch, skip) yields epoch `epoch`'s batches after `skip` of them; every epoch has the
    same number of batches (the same documents packed in another order). on_new_epoch(epoch, at_batch)
    is told when the data starts repeating.
    """
    length: list[int] = []  # batches per epoch, once known

    def count(epoch: int) -> int:
        if not length:
            length.append(sum(1 for _ in open_epoch(epoch, 0)))
        return length[0]

    def train_batches(skip: int) -> Iterator:
        epoch, s = divmod(skip, length[0]) if length and length[0] else (0, skip)
        position = skip
        while True:
            n = 0
            for batch in open_epoch(epoch, s):
                n += 1
                position += 1
                yield batch
            if n == 0 and s > 0 and not length:  # skipped past the end: learn the epoch length, then jump
                per = count(epoch)
                if per == 0:
                    return
                epoch, s = divmod(skip, per)
                continue
            if n + s == 0:
                return  # no data at all
            if not length:
                length.append(n + s)
            epoch, s = epoch + 1, 0
            if on_new_epoch is not None:
                on_new_epoch(epoch, position)

    return train_batches


def _check_shape(batch, cfg: DistillConfig, what: str):
    ids, mask = batch
    if tuple(ids.shape) != (cfg.batch_size, cfg.seq_len) or ids.shape != mask.shape:
        raise RuntimeFailure(f"{what} batch has shape {tuple(ids.shape)}, expected ({cfg.batch_size}, {cfg.seq_len})")
    return ids, mask


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class DistillResult:
    floors: dict[str, list]  # columns of floors.parquet
    curves: dict[str, list]  # columns of curves.parquet
    out_dir: Path | None
    resumed_from: int = 0


class _Teacher:
    """Soft targets for train step i / eval batch j: from the cache, or one teacher forward."""

    def __init__(self, cfg, teacher, cache, rows, device, autocast):
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

    def compute(self, tokens, mask, *, full: bool = False):
        """Teacher targets for a chunk: top-k when training from a cache, the full vocabulary if `full`."""
        import torch

        from kdtool.distill.losses import teacher_target

        with torch.no_grad(), self.autocast():
            logits = self.model(input_ids=tokens.to(self.device), attention_mask=mask.to(self.device)).logits
        self.forwards += 1
        return teacher_target(logits, self.cfg.temperature, None if full else (self.cfg.topk or None))


def _chunks(n: int, micro: int) -> list[tuple[int, int]]:
    size = micro if 0 < micro < n else n
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _student_sums(model, tokens, mask, target, cfg, autocast):
    """Forward one student on a chunk: (loss sums as tensors for backward, LossSums)."""
    from kdtool.distill.losses import LossSums, ce_per_token, kl_per_token

    with autocast():
        logits = model(input_ids=tokens, attention_mask=mask).logits  # [b, S, V]
    kl = kl_per_token(logits, target, cfg.temperature)  # [b, S]
    m = mask.float()
    kl_sum = (kl * m).sum()
    ce, valid = ce_per_token(logits, tokens, mask)
    ce_sum = (ce * valid.float()).sum()
    sums = LossSums(
        kl_sum.item(), m.sum().item(), ce_sum.item(), valid.float().sum().item(), float((mask.sum(1) > 0).sum().item())
    )
    return kl_sum, ce_sum, sums


def run(
    cfg: DistillConfig,
    *,
    teacher_config,
    teacher=None,
    train_batches: Callable[[int], Iterator] | None = None,
    eval_batches: Callable[[], Iterator] | None = None,
    out_dir: str | Path | None = None,
    tokenizer=None,
    cache=None,
    resume: bool = False,
    provenance: dict | None = None,
    callback: Callable[[dict], None] | None = None,
) -> DistillResult:
    """Train one student per width against the teacher; write outputs to out_dir (rank 0).

    teacher: a causal LM (or a zero-argument loader, called only if some batch is not cached).
    train_batches(skip) -> iterator of global [B, S] batches (a LongTensor, a (ids, mask) pair or
    a dict with input_ids/attention_mask), starting after `skip` batches. eval_batches() -> the
    held-out stream. Both must be deterministic: the same call yields the same batches.
    """
    import torch

    from kdtool.distill import students as st
    from kdtool.distill.losses import LossSums

    d = dist_init(cfg.device)
    try:
        device = torch.device(f"cuda:{d.local_rank}" if cfg.device.startswith("cuda") and d.world > 1 else cfg.device)
        use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")

        def autocast():
            if use_amp:
                return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            import contextlib

            return contextlib.nullcontext()

        if cfg.batch_size % d.world:
            raise BadInput(f"--batch-size {cfg.batch_size} must be divisible by the {d.world} processes")
        per = cfg.batch_size // d.world
        rows = (d.rank * per, (d.rank + 1) * per)
        out = Path(out_dir) if out_dir is not None else None
        emit = callback or (lambda event: None)

        models = {w: st.build_student(teacher_config, w, cfg.policy, seed=cfg.seed).to(device) for w in cfg.widths}
        optims = {
            w: torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
            for w, m in models.items()
        }

        def factor(s):
            return lr_factor(s, warmup=cfg.warmup, steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)

        scheds = {w: torch.optim.lr_scheduler.LambdaLR(o, factor) for w, o in optims.items()}
        step, tokens_seen, rows_log = 0, 0, []
        resumed_from = 0
        if resume:
            if out is None:
                raise BadInput("--resume needs an output folder")
            state = load_checkpoint(out, cfg, models, optims, scheds, device)
            if state is not None:
                step, tokens_seen, rows_log = state["step"], state["tokens_seen"], state["curves"]
                resumed_from = step
                emit({"event": "resumed", "step": step})
            else:
                emit({"event": "fresh", "reason": f"no checkpoint in {out / 'checkpoint'}"})
        train = {w: (torch.nn.parallel.DistributedDataParallel(m) if d.world > 1 else m) for w, m in models.items()}

        teach = _Teacher(cfg, teacher, cache, rows, device, autocast)
        cursor = _Cursor(train_batches, cfg) if train_batches is not None else None
        evaluator = _Evaluator(cfg, teach, eval_batches, rows, device, autocast, d)
        if step == 0:
            rows_log += _curve_rows(cfg, 0, 0, None, evaluator.run(models), {}, {})
            emit({"event": "eval", "step": 0, "eval": rows_log[-1]})

        while step < cfg.steps:
            hit = cache.load("train", step, rows) if cache is not None else None
            if hit is not None:
                tokens, mask, target_all = hit
            else:
                if cursor is None:
                    raise RuntimeFailure(f"no training data given and step {step} is not in --teacher-cache")
                tokens, mask = cursor.get(step)
                tokens, mask = tokens[rows[0] : rows[1]], mask[rows[0] : rows[1]]
                target_all = None
            local_tokens = max(float(mask.sum().item()), 1.0)
            local_ce = max(float((mask[:, :-1] & mask[:, 1:]).sum().item()), 1.0)
            stats = {w: LossSums() for w in cfg.widths}
            pieces = []
            chunks = _chunks(tokens.shape[0], cfg.micro_batch)
            for ci, (lo, hi) in enumerate(chunks):
                tok, m = tokens[lo:hi].to(device), mask[lo:hi].to(device)
                if target_all is not None:
                    target = target_all.rows(lo, hi).to(device)
                else:
                    target = teach.compute(tok, m)
                    pieces.append(target)
                for w, model in train.items():
                    sync = ci == len(chunks) - 1 or d.world == 1
                    ctx = model.no_sync() if not sync else _null()
                    with ctx:
                        kl_sum, ce_sum, sums = _student_sums(model, tok, m, target, cfg, autocast)
                        loss = (1 - cfg.ce_weight) * cfg.temperature**2 * kl_sum / local_tokens
                        if cfg.ce_weight:
                            loss = loss + cfg.ce_weight * ce_sum / local_ce
                        loss.backward()
                    stats[w].add(sums)
            if cache is not None and target_all is None:
                from kdtool.distill.losses import TopKTarget

                cache.save("train", step, rows, tokens, mask, TopKTarget.cat(pieces))
            norms, lrs = {}, {}
            for w, model in models.items():
                lrs[w] = scheds[w].get_last_lr()[0]
                if cfg.grad_clip > 0:
                    norms[w] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                optims[w].step()
                scheds[w].step()
                optims[w].zero_grad(set_to_none=True)
            train_vals = {}
            for w in cfg.widths:
                s = LossSums.from_tensor(_all_reduce(stats[w].as_tensor(), d))
                train_vals[w] = s.values(cfg.temperature) | {"tokens": s.tokens}
            tokens_seen += int(train_vals[cfg.widths[0]]["tokens"])
            if not all(math.isfinite(v["kl"]) for v in train_vals.values()):
                bad = [w for w, v in train_vals.items() if not math.isfinite(v["kl"])]
                raise RuntimeFailure(
                    f"training diverged at step {step + 1} (non-finite KL at width {bad}); lower --lr or raise --warmup"
                )
            step += 1
            ev = evaluator.run(models) if (step % cfg.eval_every == 0 or step == cfg.steps) else None
            new = _curve_rows(cfg, step, tokens_seen, train_vals, ev, lrs, norms)
            rows_log += new
            emit({"event": "step", "step": step, "rows": new, "teacher_forwards": teach.forwards})
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps and out is not None:
                save_checkpoint(out, cfg, models, optims, scheds, step, tokens_seen, rows_log, d)
                emit({"event": "checkpoint", "step": step})

        curves = _columns(rows_log)
        floors = compute_floors(cfg, curves, models)
        if out is not None and d.main:
            write_outputs(out, cfg, models, tokenizer, curves, floors, provenance)
            save_checkpoint(out, cfg, models, optims, scheds, step, tokens_seen, rows_log, d)
        if d.world > 1:
            import torch.distributed as td

            td.barrier()
        return DistillResult(floors=floors, curves=curves, out_dir=out, resumed_from=resumed_from)
    finally:
        dist_close(d)


def _null():
    import contextlib

    return contextlib.nullcontext()


class _Evaluator:
    """Held-out evaluation: the same `eval_batches` batches every time, always on the full-vocabulary KL
    (also with --teacher-cache, whose held-out batches are stored in full: a top-k KL there would report
    a lower bound, about half the floor for SmolLM2 at T=2, see docs/distill.md). Targets stay in memory
    up to `eval_target_budget` bytes; beyond that they are re-read from the cache or recomputed."""

    def __init__(self, cfg, teach: _Teacher, source, rows, device, autocast, d: Dist):
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
                tok, m = _check_shape(as_batch(next(it)), self.cfg, "held-out")
                pos += 1
            except StopIteration:
                raise RuntimeFailure(f"held-out data ran out after {j} batches; lower --eval-batches") from None
            out.append((tok[self.rows[0] : self.rows[1]], m[self.rows[0] : self.rows[1]]))
        self.batches = out

    def _target(self, j, tok, m):
        import torch

        from kdtool.distill.losses import FullTarget

        if j in self.targets:
            return self.targets[j]
        cache = self.teach.cache
        hit = cache.load("eval", j, self.rows) if cache is not None else None
        if hit is not None:
            return hit[2]
        parts = [
            self.teach.compute(tok[lo:hi].to(self.device), m[lo:hi].to(self.device), full=True)
            for lo, hi in _chunks(tok.shape[0], self.cfg.micro_batch)
        ]
        target = FullTarget(torch.cat([p.logp for p in parts]))
        if cache is not None:
            cache.save("eval", j, self.rows, tok, m, target)
        self._keep(j, target)
        return target

    def run(self, models) -> dict[int, dict[str, float]]:
        import torch

        from kdtool.distill.losses import LossSums

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
                        sums[w].add(_student_sums(model, t, mk, sub, self.cfg, self.autocast)[2])
        for m in models.values():
            m.train()
        out = {}
        for w in models:
            s = LossSums.from_tensor(_all_reduce(sums[w].as_tensor(), self.d))
            out[w] = s.values(self.cfg.temperature)
        return out
